"""Worker subprocesses a chaos test can kill -9 and replace."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from activities.settings import Settings
from tests.run_harness import start_worker_process


class WorkerProcesses:
    """Workers on one task queue, each in its own process group; all stopped at exit."""

    def __init__(self, settings: Settings, fake_url: str, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.fake_url = fake_url
        self.log_path = log_path
        self.env = env or {}
        self.procs: list[subprocess.Popen] = []

    def start(self, module: str | None = None) -> subprocess.Popen:
        """A new worker (`module`: run it instead of worker.py)."""
        proc = start_worker_process(self.settings, self.fake_url, self.log_path, module=module, env=self.env)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        """SIGTERM the worker (a deploy's stop: it drains, then exits) and reap it."""
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)

    def kill(self, proc: subprocess.Popen) -> None:
        """SIGKILL the worker's whole process group and reap it."""
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def __enter__(self) -> WorkerProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
