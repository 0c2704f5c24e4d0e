"""One settings object for every process: CLI, worker, tests.

Values come from `RLM_*` environment variables; the defaults point at the
embedded services that `rlm up` starts on 127.0.0.1, so the same code talks to
a production Temporal cluster and MinIO by changing environment only.

A plain pydantic model read from the environment by `load_settings`, not
pydantic-settings: every field is a scalar, so reading `RLM_<FIELD>` (any
case) and letting the model convert the text is all that library did here,
and importing it cost every `rlm` command ~0.17 s of CPU at start.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import platformdirs
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from workflows.names import TASK_QUEUE_DEFAULT

__all__ = [
    "CREDENTIALS_FILENAME",
    "Settings",
    "is_loopback_host",
    "load_settings",
    "settings_from_env",
    "split_host_port",
]

ENV_PREFIX = "RLM_"
# Written by `rlm up` (mode 0600) into the data dir: the embedded S3 server's keys.
CREDENTIALS_FILENAME = "s3-credentials.json"
MAX_PORT = 65535
# What RLM_LOG_LEVEL may say (any case).
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
# What RLM_TEMPORAL_GRPC_COMPRESSION may say (any case).
GRPC_COMPRESSIONS = ("auto", "gzip", "none")
# S3's rule for bucket names; the S3 client raised a bare ValueError (a
# traceback) at first use.
_S3_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def _default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("durable-rlm", appauthor=False))


def split_host_port(address: str, *, what: str, env: str) -> tuple[str, int]:
    """Split `host:port`; a malformed value is reported with its env var."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= MAX_PORT:
        raise ValueError(
            f"{what} {address!r} is not host:port (e.g. 127.0.0.1:7233); fix {env}"
        )
    return host, int(port)


def is_loopback_host(host: str) -> bool:
    """True for a host name or address on this machine (localhost, 127.0.0.0/8, ::1)."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _one_of(value: str, words: tuple[str, ...], what: str) -> str:
    """`value` in lower case if it is one of `words` (in any case), else a ValueError naming them."""
    if value.lower() not in words:
        raise ValueError(f"{value!r} is not {what}: one of {', '.join(words)}")
    return value.lower()


class Settings(BaseModel):
    """Where Temporal and object storage live, and where local state goes.
    `Settings(...)` takes exactly the values given (defaults for the rest);
    `load_settings()` reads the environment."""

    model_config = ConfigDict(extra="ignore")

    data_dir: Path = Field(default_factory=_default_data_dir)
    """Directory for the embedded services' databases, logs, pid files and
    S3 credentials, and for contexts materialized for the sandbox."""

    temporal_address: str = "127.0.0.1:7233"
    """Temporal frontend gRPC address, host:port."""

    temporal_namespace: str = Field(default="default", min_length=1)
    """Temporal namespace for runs (the embedded server creates it)."""

    temporal_grpc_compression: str = "auto"
    """gzip on the connection to Temporal (requests, and the replies it then
    compresses): "gzip", "none", or "auto": none when the server is on this
    machine (loopback), where compressing only costs CPU on both sides
    (~4% of a busy worker's, bench/README.md), gzip otherwise."""

    task_queue: str = Field(default=TASK_QUEUE_DEFAULT, min_length=1)
    """Task queue the workers poll and runs are started on."""

    temporal_ui_port: int = Field(default=8233, ge=1, le=MAX_PORT)
    """Port of the embedded Temporal Web UI (loopback)."""

    temporal_http_port: int = Field(default=7243, ge=1, le=MAX_PORT)
    """Port of the embedded Temporal HTTP API, used to check readiness."""

    temporal_ui_url: str | None = None
    """Link to the Temporal Web UI shown to users; defaults to
    http://<temporal host>:<temporal_ui_port>."""

    s3_endpoint: str = "127.0.0.1:9000"
    """S3 endpoint as host:port (no scheme): MinIO, SeaweedFS or AWS."""

    s3_secure: bool = False
    """Use HTTPS for the S3 endpoint."""

    s3_access_key: str | None = None
    """S3 access key; when unset, read from the credentials file that
    `rlm up` writes into data_dir."""

    s3_secret_key: SecretStr | None = None
    """S3 secret key; when unset, read like s3_access_key."""

    s3_bucket: str = "rlm"
    """Bucket holding contexts, transcripts, snapshots and large values."""

    s3_region: str = "us-east-1"
    """S3 region; a fixed value saves a bucket-location request per client."""

    log_level: str = "info"
    """Log level of the CLI and the worker: debug, info, warning, error."""

    local_model: bool = True
    """Start the local model server with `rlm up` when the `local` extra is
    installed (Qwen2.5-Coder-1.5B, offline, 0 USD)."""

    local_model_port: int = Field(default=8090, ge=1, le=MAX_PORT)
    """Loopback port of the local model's OpenAI-compatible server; the
    model is reached as the registry entry `local`."""

    embedded_worker: bool = True
    """`rlm up`, `rlm run`, `rlm submit` and `rlm demo` keep a worker running
    for the embedded services (restarted when the code or settings change);
    false: run `rlm worker` yourself."""

    workflow_sandbox: bool = False
    """Run workflow code in Temporal's workflow sandbox, which re-imports the
    workflow modules for every run and enters them through `exec` at every
    activation and payload (~30% of a worker's CPU with 100 runs at once);
    false: as ordinary code. Determinism is checked either way by the tests
    (tests/test_workflow_determinism.py, and replays run in the sandbox)."""

    no_worker_warning_s: float = Field(default=30.0, gt=0)
    """Seconds a started run may wait for a worker to pick it up before
    `rlm run` and `rlm result` say what to start."""

    guest_memory_share: float = Field(default=0.5, gt=0, le=1)
    """Share of the machine's memory (MemTotal, or a smaller cgroup limit)
    that the REPL guests of one worker may hold together, counted by their
    memory caps (a guest waiting on its sub-calls counts only what it has
    grown to); a cell that does not fit waits, then is retried."""

    repl_idle_s: float = Field(default=300.0, gt=0)
    """Seconds a worker keeps an idle REPL warm (a run between cells, a
    session between questions) before closing it; the next cell rebuilds it
    from its snapshot on any worker."""

    context_cache_max_bytes: int = Field(default=8 << 30, ge=0)
    """Most bytes of contexts kept as files for the sandbox under
    data_dir/cache/contexts; past it, least recently used ones not in use are
    deleted down to 90% of it."""

    tools: str | None = None
    """Custom tools of the worker: `package.module:NAME[,...]`, NAME a list
    or dict of functions (what `worker.py --tools` takes); the embedded
    worker of `rlm up` / `rlm run` reads it as RLM_TOOLS."""

    seaweed_port_base: int = Field(default=17330, ge=1, le=MAX_PORT - 8)
    """First of nine consecutive loopback ports used internally by the
    embedded S3 server (master, volume, filer, admin and their gRPC ports)."""

    @field_validator("s3_bucket")
    @classmethod
    def _check_bucket(cls, value: str) -> str:
        if not _S3_BUCKET_NAME.fullmatch(value):
            raise ValueError(
                f"{value!r} is not an S3 bucket name: 3 to 63 lowercase letters, digits, dots and hyphens, "
                "starting and ending with a letter or digit"
            )
        return value

    @field_validator("temporal_grpc_compression")
    @classmethod
    def _check_grpc_compression(cls, value: str) -> str:
        return _one_of(value, GRPC_COMPRESSIONS, "a gRPC compression")

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        # Unknown levels were taken as "info" without a word.
        return _one_of(value, LOG_LEVELS, "a log level")

    @field_validator("temporal_address")
    @classmethod
    def _check_temporal_address(cls, value: str) -> str:
        split_host_port(value, what="Temporal address", env="RLM_TEMPORAL_ADDRESS")
        return value

    @field_validator("s3_endpoint")
    @classmethod
    def _check_s3_endpoint(cls, value: str) -> str:
        if "://" in value:
            raise ValueError(
                f"S3 endpoint {value!r} must be host:port without a scheme; "
                "set RLM_S3_ENDPOINT=host:port and RLM_S3_SECURE=true for HTTPS"
            )
        split_host_port(value, what="S3 endpoint", env="RLM_S3_ENDPOINT")
        return value

    @model_validator(mode="after")
    def _derive_ui_url(self) -> Settings:
        if self.temporal_ui_url is None:
            host = self.temporal_host
            self.temporal_ui_url = f"http://{host}:{self.temporal_ui_port}"
        return self

    @property
    def temporal_host(self) -> str:
        return split_host_port(self.temporal_address, what="", env="")[0]

    @property
    def temporal_port(self) -> int:
        return split_host_port(self.temporal_address, what="", env="")[1]

    @property
    def temporal_gzip(self) -> bool:
        """Whether the connection to Temporal is gzip-compressed ("auto" resolved)."""
        if self.temporal_grpc_compression == "auto":
            return not is_loopback_host(self.temporal_host)
        return self.temporal_grpc_compression == "gzip"

    @property
    def s3_host(self) -> str:
        return split_host_port(self.s3_endpoint, what="", env="")[0]

    @property
    def s3_port(self) -> int:
        return split_host_port(self.s3_endpoint, what="", env="")[1]

    @property
    def context_cache_dir(self) -> Path:
        """Where workers keep contexts as files for the sandbox (`rlm run`
        with the embedded worker writes an uploaded context there too)."""
        return self.data_dir / "cache" / "contexts"

    @property
    def credentials_file(self) -> Path:
        return self.data_dir / CREDENTIALS_FILENAME

    def s3_credentials(self) -> tuple[str, str] | None:
        """Access and secret key: explicit settings first, then the file
        written by `rlm up`; None when neither exists (yet)."""
        secret = self.s3_secret_key
        if self.s3_access_key and secret:
            # A str can arrive through model_copy(update=...), which skips validation.
            plain = secret.get_secret_value() if isinstance(secret, SecretStr) else str(secret)
            return self.s3_access_key, plain
        try:
            raw = json.loads(self.credentials_file.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"cannot read S3 credentials file {self.credentials_file}: {exc}; "
                "delete it and run `rlm up` again"
            ) from exc
        return str(raw["access_key"]), str(raw["secret_key"])

    def to_env(self) -> dict[str, str]:
        """These settings as `RLM_*` variables, for a subprocess (a worker)
        that must see exactly the same configuration."""
        env: dict[str, str] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            elif isinstance(value, bool):
                value = "true" if value else "false"
            env[f"{ENV_PREFIX}{name.upper()}"] = str(value)
        credentials = self.s3_credentials()
        if credentials is not None:
            env["RLM_S3_ACCESS_KEY"], env["RLM_S3_SECRET_KEY"] = credentials
        return env


def settings_from_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The `RLM_<FIELD>` variables of `environ` (names in any case) by field name."""
    names = {f"{ENV_PREFIX}{name}".upper(): name for name in Settings.model_fields}
    return {names[key.upper()]: value for key, value in environ.items() if key.upper() in names}


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment, with keyword overrides on top."""
    return Settings(**settings_from_env(os.environ) | overrides)  # type: ignore[arg-type]
