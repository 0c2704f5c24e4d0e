"""Detached service processes and the pid files that find them again.

A pid file records the pid and the exact command line, so a later `rlm`
command can tell "our server is still running" from "the pid was reused by
something else" (a stale pid file) without trusting the number alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["PidRecord", "is_alive", "locked", "read_pid_file", "spawn_detached", "stop_processes", "write_pid_file"]


@contextlib.contextmanager
def locked(directory: Path, name: str = ".lock") -> Iterator[None]:
    """Hold an exclusive lock on `directory/name` (created as needed):
    serialises commands that change one directory (two `rlm up` at once)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / name, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass
class PidRecord:
    """What `rlm up` remembers about a service it started."""

    pid: int
    argv: list[str]
    ports: dict[str, int]
    log_file: str
    started_at: float = field(default_factory=time.time)


def read_pid_file(path: Path) -> PidRecord | None:
    try:
        return PidRecord(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError):
        return PidRecord(pid=-1, argv=[], ports={}, log_file="")  # unreadable: treat as stale


def write_pid_file(path: Path, record: PidRecord) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(record)))
    os.replace(tmp, path)


def _reap(pid: int) -> None:
    """Collect the exit status if `pid` is our child, so it is not a zombie."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def is_alive(record: PidRecord) -> bool:
    """True when the recorded process runs and is the one we started."""
    if record.pid <= 0:
        return False
    _reap(record.pid)
    proc = Path(f"/proc/{record.pid}")
    if proc.parent.is_dir():  # Linux: check the command line, not only the pid
        try:
            raw = (proc / "cmdline").read_bytes()
            # Just after exec the command line reads empty for a moment
            # (kernel threads keep it empty): give a new process time.
            for _ in range(40):
                if raw:
                    break
                time.sleep(0.025)
                raw = (proc / "cmdline").read_bytes()
            cmdline = raw.split(b"\0")[:-1]
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        return state != "Z" and [c.decode(errors="replace") for c in cmdline] == record.argv
    try:
        os.kill(record.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    return True


def spawn_detached(argv: list[str], *, env: dict[str, str], log_file: Path, cwd: Path) -> int:
    """Start `argv` in its own session (it outlives the CLI), output to `log_file`."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(argv)}\n".encode())
        log.flush()
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
            close_fds=True,
        )
    return process.pid


def _signal(pid: int, sig: int) -> None:
    try:
        # Each service leads its own session/group: signal the whole group.
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def stop_processes(records: list[PidRecord], *, timeout: float = 15.0) -> list[int]:
    """SIGTERM every live process, wait up to `timeout`, then SIGKILL the
    rest. Returns the pids that needed SIGKILL."""
    live = [r for r in records if is_alive(r)]
    for record in live:
        _signal(record.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while live and time.monotonic() < deadline:
        live = [r for r in live if is_alive(r)]
        if live:
            time.sleep(0.05)
    killed = [r.pid for r in live]
    for record in live:
        _signal(record.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while live and time.monotonic() < deadline:
        live = [r for r in live if is_alive(r)]
        if live:
            time.sleep(0.05)
    return killed
