"""A live REPL session as a worker's pool keeps it (activities/_repl_pool.py),
one being made ahead of its cell, and the pool's refusals."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from activities._snapshot_store import RecordLocation, SnapshotSaver
from sandbox_wasm import ReplSession, SandboxLimits

__all__ = ["CheckoutCancelled", "GuestMemoryBusy", "GuestMemoryTooLarge", "LiveRepl", "Preparing", "same_but_timeout"]

CANCEL_POLL_S = 0.25
"""How often a checkout that waits (for memory, for its REPL being made) looks whether its cell was cancelled."""


class GuestMemoryBusy(RuntimeError):
    """The sessions busy on this worker hold its memory budget: retry later."""


class GuestMemoryTooLarge(ValueError):
    """One session's memory cap exceeds this worker's whole budget."""


class CheckoutCancelled(RuntimeError):
    """The cell was cancelled while its checkout waited: it stopped waiting."""


@dataclass
class LiveRepl:
    session: ReplSession
    limits: SandboxLimits
    snapshot_key: str | None
    """The snapshot this session's state equals (None: fresh, no cell run)."""
    records: dict[str, RecordLocation] = field(default_factory=dict)
    """Where the value records of that snapshot are stored (the next snapshot
    refers to them instead of storing them again)."""
    host: dict[str, Any] = field(default_factory=dict)
    """Host functions of the cell being run; swapped per cell."""
    on_close: list[Callable[[], None]] = field(default_factory=list)
    """Called once when the pool closes the session (e.g. unpin its files)."""
    tools: dict[str, str] = field(default_factory=dict)
    """Custom tools the guest has stubs for: name -> docstring (fixed at boot)."""
    idle_since: float = 0.0
    """time.monotonic() of its last checkin."""

    def records_stored_in(self, snapshots: SnapshotSaver) -> None:
        """Its state's records are stored in `snapshots` (at `records`): the
        session drops its copies and reads them from there for a restart."""
        self.session.keep_records_elsewhere(snapshots.record_source(lambda: self.records))


@dataclass
class Preparing:
    """A session being made ahead of its cell (`ReplPool.prepare`)."""

    ready: threading.Event = field(default_factory=threading.Event)
    abandoned: bool = False
    """Its cell stopped waiting for it and made its own."""


def same_but_timeout(a: SandboxLimits, b: SandboxLimits) -> bool:
    """Equal but for the cell timeout, which shrinks near a run's deadline
    and which a session reads per cell: the same session serves both."""
    return replace(a, cell_timeout_s=b.cell_timeout_s) == b
