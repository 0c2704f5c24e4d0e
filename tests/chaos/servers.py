"""A private Temporal dev server and S3 server that a test may kill -9 and
restart on the same state (SQLite file, SeaweedFS dir), for outages that
must not touch the session's shared servers."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from activities.settings import Settings
from cli import services as launcher
from cli._process import is_alive, read_pid_file
from tests.fixtures_services import isolated_settings

SERVICES = ("temporal", "s3")


class KillableServices:
    """Started by `up()` (through the project's launcher, as the session's are)."""

    def __init__(self, data_dir: Path) -> None:
        self.settings: Settings = isolated_settings(data_dir)

    def up(self) -> KillableServices:
        launcher.up(self.settings)
        return self

    def kill(self, service: str) -> None:
        """SIGKILL `service` ("temporal" or "s3") and wait until it is gone."""
        assert service in SERVICES, service
        record = read_pid_file(self.settings.data_dir / "run" / f"{service}.pid")
        assert record is not None and is_alive(record), f"{service} is not running"
        os.killpg(record.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while is_alive(record):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{service} (pid {record.pid}) survived SIGKILL for 10 s")
            time.sleep(0.05)  # polling the process table

    def restart(self) -> None:
        """Start what is not running, on the same data dir and ports; wait until ready."""
        launcher.up(self.settings)

    def down(self) -> None:
        launcher.down(self.settings)
