"""Embedded services for a machine without Docker: `rlm up`, `status`, `down`.

Temporal (dev server on SQLite) and S3 (SeaweedFS) run detached, bound to
127.0.0.1, with all state under `settings.data_dir`, so they outlive the CLI
and later commands (and test sessions with their own data dir and ports)
find them through pid files. A worker runs next to them (cli/_worker_service.py)
so that every run started on this machine has one serving it.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import structlog

from activities.settings import Settings
from cli import _local_model, _worker_service
from cli._ports import find_free_port, find_free_port_block, port_holders, port_is_free
from cli._process import (
    PidRecord,
    is_alive,
    locked,
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
    "ensure_worker",
    "stop_worker",
    "private_settings",
    "service_ports",
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
    """The local model server (`local` extra installed), else None; optional:
    it counts toward `healthy` only when it crashed."""
    worker: ServiceStatus | None = None
    """The embedded worker of this task queue; None when `embedded_worker` is off."""

    @property
    def healthy(self) -> bool:
        local_crashed = self.local_model is not None and self.local_model.get("state") == "crashed"
        return (
            self.temporal.healthy and self.s3.healthy and (self.worker is None or self.worker.healthy)
            and not local_crashed
        )

    def to_dict(self) -> dict[str, object]:
        return asdict(self) | {"healthy": self.healthy}


def private_settings(data_dir: Path, **overrides: object) -> Settings:
    """Settings for a private pair of embedded services (tests, benchmarks):
    every port freshly chosen, every field explicit, so RLM_* variables of
    the caller's environment cannot leak in."""
    taken: set[int] = set()

    def fresh() -> int:
        port = find_free_port(avoid=taken)
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
    values["embedded_worker"] = False  # callers run workers with their own model configuration
    return Settings(**values | overrides)  # type: ignore[arg-type]


def _specs(settings: Settings) -> list[ServiceSpec]:
    for value, env in ((settings.temporal_host, "RLM_TEMPORAL_ADDRESS"), (settings.s3_host, "RLM_S3_ENDPOINT")):
        if value not in _LOCAL_HOSTS:
            raise LauncherError(
                f"{env} points at {value}, not this machine: the embedded services run on "
                f"127.0.0.1 only; unset {env} to use them, or skip `rlm up` for a remote cluster"
            )
    return [temporal_spec(settings), seaweed_spec(settings)]


def service_ports(settings: Settings) -> dict[str, list[int]]:
    """The TCP ports each embedded service listens on, by service name."""
    return {spec.name: list(spec.ports.values()) for spec in _specs(settings)}


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
        holders = "; ".join(h for label in taken for h in port_holders(spec.ports[label]))
        raise LauncherError(
            f"port {described} on {spec.host} is already in use by another process"
            f"{f' ({holders})' if holders else ''}: stop that process, or move {spec.name} to free ports "
            f"with {variables}"
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
    with locked(settings.data_dir / "run", "lock"):
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
    if settings.embedded_worker:
        ensure_worker(settings, timeout=timeout)
    return status(settings)


def ensure_up(settings: Settings, *, wait_for_worker: bool = True) -> None:
    """Start whatever is not running healthy: services, local model, worker.
    `wait_for_worker=False` (`rlm submit`) starts a missing worker without
    waiting for it to poll."""
    current = status(settings, with_worker=False)
    local_missing = settings.local_model and current.local_model is not None and not current.local_model["healthy"]
    if not current.healthy or local_missing:
        # The worker comes below, with the caller's choice of waiting.
        up(settings.model_copy(update={"embedded_worker": False}))
    if settings.embedded_worker:
        ensure_worker(settings, wait=wait_for_worker)


def ensure_worker(settings: Settings, *, wait: bool = True, timeout: float = READY_TIMEOUT_S) -> PidRecord:
    """Make sure the worker for `settings.task_queue` runs with the current
    code and settings: start it if none runs, restart it if its identity is
    outdated. Safe when several commands call it at once (one starts it, the
    others find it). With `wait`, return once it polls the task queue."""
    command = _worker_service.argv(settings, _worker_service.identity(settings))
    record = _worker_service.live_record(settings, remove_stale=False)
    if record is None or record.argv != command:
        with locked(settings.data_dir / "run", "lock"):
            record = _worker_service.live_record(settings, remove_stale=True)
            if record is not None and record.argv != command:
                log.info("restarting the worker: code or settings changed", pid=record.pid)
                stop_processes([record], timeout=STOP_TIMEOUT_S)
                record = None
            if record is None:
                record = _worker_service.start(settings, command)
                log.info("started", service="worker", pid=record.pid, task_queue=settings.task_queue)
    if wait:
        _wait_worker_ready(settings, record, timeout)
    return record


def stop_worker(settings: Settings, *, timeout: float = STOP_TIMEOUT_S) -> bool:
    """Stop the worker of `settings.task_queue` (graceful); True if one ran."""
    with locked(settings.data_dir / "run", "lock"):
        record = _worker_service.live_record(settings, remove_stale=True)
        if record is not None:
            stop_processes([record], timeout=timeout)
        _worker_service.WorkerFiles(settings).pid_file.unlink(missing_ok=True)
    return record is not None


def _wait_worker_ready(settings: Settings, record: PidRecord, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not _worker_service.is_ready(settings, record):
        if not is_alive(record):
            raise LauncherError(
                f"the worker exited during startup; see {record.log_file}:\n  {_log_tail(Path(record.log_file))}"
            )
        if time.monotonic() > deadline:
            raise LauncherError(f"the worker did not poll Temporal within {timeout:.0f} s; see {record.log_file}")
        time.sleep(0.05)


def _worker_status(settings: Settings) -> ServiceStatus:
    files = _worker_service.WorkerFiles(settings)
    record = _worker_service.live_record(settings, remove_stale=False)
    address = f"task queue {settings.task_queue}"
    if record is None:
        running = healthy = False
        detail = "not running; `rlm up` or `rlm run` starts it"
    else:
        running = True
        healthy = _worker_service.is_ready(settings, record)
        current = record.argv == _worker_service.argv(settings, _worker_service.identity(settings))
        detail = "ready" if healthy else "starting"
        if not current:
            detail += " (older code or other settings: the next `rlm up` or `rlm run` restarts it)"
    return ServiceStatus(
        name="worker",
        address=address,
        pid=record.pid if record else None,
        running=running,
        healthy=healthy,
        detail=detail,
        log_file=str(files.log_file),
    )


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


def status(settings: Settings, *, with_worker: bool = True) -> ServicesStatus:
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
        worker=_worker_status(settings) if with_worker and settings.embedded_worker else None,
    )


def down(settings: Settings, *, timeout: float = STOP_TIMEOUT_S) -> list[str]:
    """Stop both services (SIGTERM, then SIGKILL after `timeout`); returns
    the names of the services that were running."""
    specs = _specs(settings)
    with locked(settings.data_dir / "run", "lock"):
        # Workers first, while Temporal still runs: they shut down gracefully.
        workers = [r for f in _worker_service.all_pid_files(settings) if (r := read_pid_file(f)) and is_alive(r)]
        killed = stop_processes(workers, timeout=timeout)
        for pid_file in _worker_service.all_pid_files(settings):
            pid_file.unlink(missing_ok=True)
        records = {spec.name: (spec, _running_record(spec)) for spec in specs}
        live = [record for _, record in records.values() if record is not None]
        killed += stop_processes(live, timeout=timeout)
        for spec, _ in records.values():
            spec.pid_file.unlink(missing_ok=True)
    for pid in killed:
        log.warning("did not stop in time, killed", pid=pid)
    stopped = ["worker"] * bool(workers) + [name for name, (_, record) in records.items() if record is not None]
    if _local_model.stop(settings.data_dir):
        stopped.append("local-model")
    log.info("stopped", services=stopped or "nothing was running")
    return stopped
