"""A private Temporal dev server and S3 server that a test may kill -9 and
restart on the same state (SQLite file, SeaweedFS dir), for outages that
must not touch the session's shared servers."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

from activities.settings import Settings
from cli import services as launcher
from cli._ports import port_holders
from cli._process import is_alive, read_pid_file
from tests.fixtures_services import isolated_settings

SERVICES = ("temporal", "s3")
# How long a killed server's ports may stay held before they are left unreserved.
_RESERVE_S = 5.0


class KillableServices:
    """Started by `up()` (through the project's launcher, as the session's are)."""

    def __init__(self, data_dir: Path) -> None:
        self.settings: Settings = isolated_settings(data_dir)
        self._reserved: list[socket.socket] = []

    def up(self) -> KillableServices:
        launcher.up(self.settings)
        return self

    def kill(self, service: str) -> None:
        """SIGKILL `service` ("temporal" or "s3"), wait until it is gone, and
        hold its ports until `restart()`."""
        assert service in SERVICES, service
        record = read_pid_file(self.settings.data_dir / "run" / f"{service}.pid")
        assert record is not None and is_alive(record), f"{service} is not running"
        os.killpg(record.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while is_alive(record):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{service} (pid {record.pid}) survived SIGKILL for 10 s")
            time.sleep(0.05)  # polling the process table
        host = self.settings.temporal_host if service == "temporal" else self.settings.s3_host
        self._reserve(host, launcher.service_ports(self.settings)[service])

    def restart(self) -> None:
        """Start what is not running, on the same data dir and ports; wait until ready."""
        try:
            launcher.up(self.settings)
        finally:
            self._release()

    def down(self) -> None:
        self._release()
        launcher.down(self.settings)

    def _reserve(self, host: str, ports: list[int]) -> None:
        # A minute-long outage leaves the ports free for a minute, and CI once
        # lost the restart to a port taken meanwhile (S3's filer gRPC). A
        # socket bound but not listening keeps the kernel from handing the
        # port to any outgoing connection, while the restarted server, which
        # sets SO_REUSEADDR as Go's servers do, can still bind and listen.
        # Right after the kill the port can still be held for a moment by the
        # dead server's closing connections (CI once failed the bind here), so
        # each port is tried until a deadline; one still held then is left
        # unreserved: the restart either binds it (SO_REUSEADDR) or fails
        # naming its holder, which is the outage under test, not this guard.
        deadline = time.monotonic() + _RESERVE_S
        for port in ports:
            while True:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((host, port))
                except OSError:
                    sock.close()
                    if time.monotonic() > deadline:
                        print(f"port {port} left unreserved, held by: {port_holders(port) or 'nothing found'}")
                        break
                    time.sleep(0.05)  # polling the kernel's socket table
                    continue
                self._reserved.append(sock)
                break

    def _release(self) -> None:
        while self._reserved:
            self._reserved.pop().close()
