"""What the launcher needs to know about one embedded service."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["LauncherError", "ServiceSpec", "find_binary"]


class LauncherError(RuntimeError):
    """Starting, checking or stopping an embedded service failed; the
    message names the cause and the fix."""


@dataclass
class ServiceSpec:
    """One embedded server: how to start it and how to tell it is ready."""

    name: str
    """Short name used in pid/log file names and messages."""
    argv: list[str]
    make_env: Callable[[], dict[str, str]]
    """Environment for the process; called only when starting it (it may
    create credentials)."""
    host: str
    ports: dict[str, int]
    """Every port the server opens, by label ("gRPC", "UI", ...)."""
    port_settings: dict[str, str]
    """For each port label, the RLM_ variable that moves it."""
    address: str
    """What clients connect to, for `rlm status`."""
    probe: Callable[[], str | None]
    """None when the service answers, else a short reason; read-only."""
    ready: Callable[[], str | None]
    """Like probe, but may finish setup (create the bucket); used by `up`."""
    data_dir: Path
    """The service's own state directory (created before start)."""
    log_file: Path
    pid_file: Path
    extra_dirs: list[Path] = field(default_factory=list)
    """Further directories the server expects to exist."""


def find_binary(name: str, package: str) -> str:
    """The binary installed into this venv by `package`, else one on PATH."""
    beside_python = Path(sys.executable).parent / name
    if beside_python.is_file():
        return str(beside_python)
    found = shutil.which(name)
    if found:
        return found
    raise LauncherError(
        f"the `{name}` binary was not found next to {sys.executable} or on PATH: "
        f"install it with `pip install {package}`"
    )
