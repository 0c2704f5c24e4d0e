"""Runs the local model server and records how it ended.

`rlm up` exits right after starting the server, so nobody would collect its
exit status: a crash (SIGILL from a build for another CPU, SIGKILL from the
OOM killer) would leave only a silent log. This small parent stays with the
server: it holds a lock file while the server lives (so a worker can tell
"dead" from "busy" without trusting pids) and, when the server ends without
being asked to, writes an exit record naming the cause for `rlm status`,
`rlm up` and the worker to report.

    python -m cli._model_supervisor EXIT_RECORD ALIVE_LOCK -- SERVER_ARGV...
"""

from __future__ import annotations

import fcntl
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

from cli._cpu_features import reinstall_command

__all__ = ["describe_exit", "main"]


def describe_exit(returncode: int) -> str:
    """How a server process ended, in words, with the fix where one is known."""
    if returncode >= 0:
        return f"exited with code {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        return f"killed by signal {-returncode}"
    if name == "SIGILL":
        return (
            "killed by SIGILL (illegal instruction: llama.cpp was built for another CPU); "
            f"rebuild it portable: {reinstall_command()}"
        )
    if name == "SIGKILL":
        return "killed by SIGKILL (out of memory, or killed by hand)"
    if name in ("SIGSEGV", "SIGABRT", "SIGBUS"):
        return f"crashed with {name}"
    return f"killed by {name}"


def _write_record(path: Path, pid: int, returncode: int) -> None:
    record = {"pid": pid, "returncode": returncode, "cause": describe_exit(returncode), "ended_at": time.time()}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    exit_record, alive_lock, sep, *server = argv
    if sep != "--" or not server:
        sys.stderr.write(__doc__ or "")
        return 2
    stopping = False
    child: subprocess.Popen[bytes] | None = None

    def _forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True  # `rlm down` (SIGTERM to the group): an exit asked for, not a crash
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, _forward)
    signal.signal(signal.SIGINT, _forward)
    # Held by this process and inherited by the server: released only when both are gone.
    lock_fd = os.open(alive_lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"[supervisor] {alive_lock} is held: a server from this data dir still runs", flush=True)
        return 1
    # A crash must not leave a core file of several GB (the model is mapped) in the models dir.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    child = subprocess.Popen(server, pass_fds=(lock_fd,))
    if stopping:  # asked to stop while the server was being started
        child.send_signal(signal.SIGTERM)
    returncode = child.wait()
    if not stopping:
        _write_record(Path(exit_record), child.pid, returncode)
        print(f"[supervisor] local model server (pid {child.pid}) {describe_exit(returncode)}", flush=True)
    return 128 - returncode if returncode < 0 else returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
