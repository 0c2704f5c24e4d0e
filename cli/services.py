"""Embedded services for a machine without Docker: `rlm up`, `status`, `down`.

Temporal (dev server on SQLite) and S3 (SeaweedFS) run detached, bound to
127.0.0.1, with all state under `settings.data_dir`, so they outlive the CLI
and later commands (and test sessions with their own data dir and ports)
find them through pid files.
"""

from __future__ import annotations

import fcntl
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import structlog

from activities.settings import Settings
from cli import _local_model
from cli._ports import find_free_port, find_free_port_block, port_is_free
from cli._process import (
    PidRecord,
    is_alive,
    read_pid_file,
    spawn_detached,
    stop_processes,
    write_pid_file,
)
from cli._seaweed_server import SEAWEED_PORT_COUNT, seaweed_spec
from cli._service_spec import LauncherError, ServiceSpec
from cli._temporal_server import temporal_spec

__all__ = [
    "LauncherError",
    "ServiceStatus",
    "ServicesStatus",
    "down",
    "ensure_up",
    "private_settings",
    "status",
    "up",
]

log = structlog.get_logger(__name__)

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
_LOCAL_HOSTS = {"127.0.0.1", "localhost"}


@dataclass
class ServiceStatus:
    """One embedded service as `rlm status` reports it."""

    name: str
    address: str
    pid: int | None
    running: bool
    healthy: bool
    detail: str
    log_file: str


@dataclass
class ServicesStatus:
    """Both embedded services, plus where their state lives."""

    data_dir: str
    ui_url: str
    temporal: ServiceStatus
    s3: ServiceStatus
    local_model: dict[str, object] | None = None
    """The local model server (`local` extra installed), else None; optional,
    so it does not count toward `healthy`."""

    @property
    def healthy(self) -> bool:
        return self.temporal.healthy and self.s3.healthy

    def to_dict(self) -> dict[str, object]:
        return asdict(self) | {"healthy": self.healthy}


def private_settings(data_dir: Path, **overrides: object) -> Settings:
    """Settings for a private pair of embedded services (tests, benchmarks):
    every port freshly chosen, every field explicit, so RLM_* variables of
    the caller's environment cannot leak in."""
    taken: set[int] = set()

    def fresh() -> int:
        while (port := find_free_port()) in taken:
            pass
        taken.add(port)
        return port

    values: dict[str, object] = {
        name: field.get_default(call_default_factory=True) for name, field in Settings.model_fields.items()
    }
    values |= {
        "data_dir": data_dir,
        "temporal_address": f"127.0.0.1:{fresh()}",
        "temporal_ui_port": fresh(),
        "temporal_http_port": fresh(),
        "s3_endpoint": f"127.0.0.1:{fresh()}",
    }
    values["seaweed_port_base"] = find_free_port_block(SEAWEED_PORT_COUNT, avoid=taken)
    values["local_model_port"] = fresh()
    values["local_model"] = False  # a 1 GB model server only where asked for
    return Settings(**values | overrides)  # type: ignore[arg-type]


def _specs(settings: Settings) -> list[ServiceSpec]:
    for value, env in ((settings.temporal_host, "RLM_TEMPORAL_ADDRESS"), (settings.s3_host, "RLM_S3_ENDPOINT")):
        if value not in _LOCAL_HOSTS:
            raise LauncherError(
                f"{env} points at {value}, not this machine: the embedded services run on "
                f"127.0.0.1 only; unset {env} to use them, or skip `rlm up` for a remote cluster"
            )
    return [temporal_spec(settings), seaweed_spec(settings)]


@contextmanager
def _lock(settings: Settings) -> Iterator[None]:
    """Serialise up/down on one data dir (two `rlm up` at once)."""
    run_dir = settings.data_dir / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _running_record(spec: ServiceSpec) -> PidRecord | None:
    """Our live process for `spec`, or None; removes a stale pid file."""
    record = read_pid_file(spec.pid_file)
    if record is None:
        return None
    if is_alive(record):
        return record
    log.warning("removing stale pid file", service=spec.name, pid=record.pid, pid_file=str(spec.pid_file))
    spec.pid_file.unlink(missing_ok=True)
    return None


def _log_tail(path: Path, lines: int = 6) -> str:
    """The last start's error lines (Go fatal lines, ERROR), else its tail."""
    try:
        text = path.read_text(errors="replace").rsplit("\n--- ", 1)[-1].splitlines()[1:]
    except OSError:
        return ""
    errors = [line for line in text if re.match(r"^(F\d{4} |Error|.*level=(ERROR|FATAL))", line)]
    return "\n  ".join((errors or text)[-lines:])


def _options(argv: list[str]) -> list[str]:
    """Command-line options with their values ("--port 7233"), to name what changed."""
    options: list[str] = []
    for arg in argv:
        if options and options[-1].startswith("--") and " " not in options[-1] and not arg.startswith("-"):
            options[-1] += f" {arg}"
        else:
            options.append(arg)
    return options


def _start(spec: ServiceSpec) -> PidRecord | None:
    """Start `spec` unless our instance already runs; returns the new record."""
    record = _running_record(spec)
    if record is not None:
        if record.argv != spec.argv:
            old = _options(record.argv)
            changed = " ".join(o for o in _options(spec.argv) if o not in old)[:300]
            raise LauncherError(
                f"{spec.name} already runs from {spec.pid_file.parent.parent} (pid {record.pid}) with other "
                f"settings (now: {changed or 'a different binary'}): run `rlm down` first, then `rlm up`"
            )
        log.info("already running", service=spec.name, pid=record.pid, address=spec.address)
        return None
    taken = [label for label, port in spec.ports.items() if not port_is_free(spec.host, port)]
    if taken:
        described = ", ".join(f"{spec.ports[label]} ({label})" for label in taken)
        variables = ", ".join(sorted({spec.port_settings[label] for label in taken}))
        raise LauncherError(
            f"port {described} on {spec.host} is already in use by another process: stop that "
            f"process, or move {spec.name} to free ports with {variables}"
        )
    for directory in (spec.data_dir, spec.pid_file.parent, *spec.extra_dirs):
        directory.mkdir(parents=True, exist_ok=True)
    pid = spawn_detached(spec.argv, env=spec.make_env(), log_file=spec.log_file, cwd=spec.data_dir)
    record = PidRecord(pid=pid, argv=spec.argv, ports=spec.ports, log_file=str(spec.log_file))
    write_pid_file(spec.pid_file, record)
    log.info("started", service=spec.name, pid=pid, address=spec.address, log=str(spec.log_file))
    return record


def _wait_ready(spec: ServiceSpec, record: PidRecord | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        reason = spec.ready()
        if reason is None:
            return
        if record is not None and not is_alive(record):
            spec.pid_file.unlink(missing_ok=True)
            raise LauncherError(
                f"{spec.name} exited during startup; see {spec.log_file}:\n  {_log_tail(spec.log_file)}"
            )
        if time.monotonic() > deadline:
            raise LauncherError(
                f"{spec.name} at {spec.address} not ready after {timeout:.0f} s ({reason}); "
                f"see {spec.log_file}"
            )
        time.sleep(0.1)


def up(settings: Settings, *, timeout: float = READY_TIMEOUT_S) -> ServicesStatus:
    """Start Temporal and S3 (or reuse them if already running), wait until
    both answer and the bucket exists. Safe to call again."""
    specs = _specs(settings)
    with _lock(settings):
        started: list[tuple[ServiceSpec, PidRecord | None]] = []
        try:
            for spec in specs:
                started.append((spec, _start(spec)))
            for spec, record in started:
                _wait_ready(spec, record, timeout)
        except BaseException:
            # Do not leave half a stack behind that the user did not ask for.
            stop_processes([r for _, r in started if r is not None], timeout=STOP_TIMEOUT_S)
            for spec, record in started:
                if record is not None:
                    spec.pid_file.unlink(missing_ok=True)
            raise
    if settings.local_model and _local_model.installed():
        _local_model.start(settings.data_dir, settings.local_model_port)
    return status(settings)


def ensure_up(settings: Settings) -> ServicesStatus:
    """Start the services unless they already run healthy."""
    current = status(settings)
    local_missing = settings.local_model and current.local_model is not None and not current.local_model["healthy"]
    return current if current.healthy and not local_missing else up(settings)


def _service_status(spec: ServiceSpec) -> ServiceStatus:
    record = read_pid_file(spec.pid_file)
    running = record is not None and is_alive(record)
    reason = spec.probe()
    if reason is None:
        detail = "ready" if running else "answering, but not started by `rlm up` from this data dir"
    elif record is not None and not running:
        detail = f"not running (stale pid file {spec.pid_file}); run `rlm up`"
    elif not running:
        detail = "not running; run `rlm up`"
    else:
        detail = f"running but not answering: {reason}; see {spec.log_file}"
    return ServiceStatus(
        name=spec.name,
        address=spec.address,
        pid=record.pid if running and record else None,
        running=running,
        healthy=reason is None,
        detail=detail,
        log_file=str(spec.log_file),
    )


def status(settings: Settings) -> ServicesStatus:
    """What runs where, and whether it answers."""
    temporal, s3 = _specs(settings)
    return ServicesStatus(
        data_dir=str(settings.data_dir),
        ui_url=str(settings.temporal_ui_url),
        temporal=_service_status(temporal),
        s3=_service_status(s3),
        local_model=_local_model.status(settings.data_dir, settings.local_model_port)
        if _local_model.installed()
        else None,
    )


def down(settings: Settings, *, timeout: float = STOP_TIMEOUT_S) -> list[str]:
    """Stop both services (SIGTERM, then SIGKILL after `timeout`); returns
    the names of the services that were running."""
    specs = _specs(settings)
    with _lock(settings):
        records = {spec.name: (spec, _running_record(spec)) for spec in specs}
        live = [record for _, record in records.values() if record is not None]
        killed = stop_processes(live, timeout=timeout)
        for spec, _ in records.values():
            spec.pid_file.unlink(missing_ok=True)
    for pid in killed:
        log.warning("did not stop in time, killed", pid=pid)
    stopped = [name for name, (_, record) in records.items() if record is not None]
    if _local_model.stop(settings.data_dir):
        stopped.append("local-model")
    log.info("stopped", services=stopped or "nothing was running")
    return stopped
