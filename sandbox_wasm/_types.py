"""Public value types of the sandbox: limits, cell results, snapshots, errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal


class SandboxError(RuntimeError):
    """The sandbox itself failed (bad runtime file, boot failure, bad input).

    Errors raised by the model's code never surface as this: they come back in
    `CellResult.error`.
    """


class ContextTooLarge(SandboxError):
    """The context does not fit in the guest's memory cap: loading it ran out
    of memory. Deterministic for a context and a cap; only a larger cap (or a
    smaller context) helps."""


class SandboxUnavailable(SandboxError):
    """No guest can start in this process: the CPython WASI file is missing or
    not the pinned one, or wasmtime cannot instantiate a guest (e.g. an
    address-space limit below the ~4 GiB a guest reserves). A guest that
    instantiates but fails to boot stays a SandboxError. Nothing a cell's
    code did: every cell here fails the same way until the host is fixed."""


class ToolError(Exception):
    """Raised by a host function to have the guest raise `ToolError` with this
    message as it is (other exceptions reach the guest as `HostCallError`)."""


class CellInterrupted(SandboxError):
    """`ReplSession.interrupt()` stopped the running command (e.g. the cell was
    cancelled). The instance is gone; the session boots a new one, from the
    last snapshot, when it is used again."""


@dataclass(frozen=True)
class DocumentSpan:
    """One context document as bytes of a file: `size` bytes from `offset`.
    The documents of a worker's cached context share one file
    (activities/_context_copy.py); a file of its own is the span from 0."""

    path: Path
    offset: int
    size: int

    def read_bytes(self) -> bytes:
        with open(self.path, "rb") as handle:  # buffered: read() goes on until `size` or the end
            handle.seek(self.offset)
            data = handle.read(self.size)
        if len(data) != self.size:
            raise OSError(f"context file {self.path} holds {len(data):,} of the {self.size:,} bytes "
                          f"of a document at offset {self.offset:,}")
        return data


@dataclass(frozen=True)
class SandboxLimits:
    """Per-session limits; every cell runs under all of them."""

    cell_timeout_s: float = 60.0
    """Wall-clock seconds a cell may run, not counting time spent waiting on host
    functions. Exceeding it kills the instance; the session restores the last
    snapshot by itself and reports `LimitHit(kind="timeout")`."""
    memory_bytes: int = 2 * 1024**3
    """Cap on the guest's linear memory (max 4 GiB). An allocation past it raises
    `MemoryError` inside the guest and the REPL goes on."""
    output_chars: int = 20_000
    """Characters of printed output kept in `CellResult.output`; the rest is cut
    and a marker says how much."""
    full_output_chars: int = 16 * 1024**2
    """Hard ceiling of `CellResult.full_output`, which protects the host's memory."""
    admin_timeout_s: float = 120.0
    """Wall-clock seconds allowed for load_context, snapshot and restore."""
    restore_min_s: float = 30.0
    """A snapshot runs the cell's own code (`__reduce__`) and gets the cell's
    limit; a restore (`__setstate__`) gets at least this long (at most
    `admin_timeout_s`): one cut short costs the whole state, which then falls
    back to an empty REPL, and a cell's limit may be cut to 1 s near the
    run's deadline (30 MB of values took 2.2 s to restore)."""
    hang_grace_s: float = 5.0
    """Extra seconds the host waits past a deadline before it abandons an instance
    stuck in a blocking system call that the deadline cannot interrupt."""
    max_host_call_bytes: int = 512 * 1024**2
    """Largest message the guest may send to the host in one call (arguments of
    a host function, a snapshot). A frame announcing more than this, or more
    than `memory_bytes`, is refused before the host allocates anything; the
    guest gets a clear exception and the REPL goes on."""
    max_host_calls: int = 2_000
    """Host-function calls one cell may make. Time spent in host calls does not
    count against `cell_timeout_s`, so this ends a cell that floods the host
    with calls (the instance is stopped and the last snapshot restored)."""

    def __post_init__(self) -> None:
        if not self.cell_timeout_s > 0:
            raise ValueError(f"cell_timeout_s must be > 0, got {self.cell_timeout_s}")
        if not 16 * 1024**2 <= self.memory_bytes <= 4 * 1024**3:
            raise ValueError(
                f"memory_bytes must be between 16 MiB and 4 GiB (wasm32), got {self.memory_bytes}")
        if self.output_chars < 0 or self.full_output_chars < self.output_chars:
            raise ValueError("need 0 <= output_chars <= full_output_chars")
        if not self.admin_timeout_s > 0 or self.hang_grace_s < 0 or not self.restore_min_s > 0:
            raise ValueError("admin_timeout_s and restore_min_s must be > 0 and hang_grace_s >= 0")
        if self.max_host_call_bytes < 1024**2 or self.max_host_calls < 1:
            raise ValueError("need max_host_call_bytes >= 1 MiB and max_host_calls >= 1")

    @property
    def max_frame_bytes(self) -> int:
        """Largest host-call frame accepted: no more than the guest could hold."""
        return min(self.max_host_call_bytes, self.memory_bytes)


@dataclass(frozen=True)
class LimitHit:
    """A limit that stopped or shortened a cell."""

    kind: Literal["timeout", "memory", "output", "host_calls", "trap"]
    """Which limit: `timeout` (cell_timeout_s), `memory` (memory_bytes, MemoryError
    in the guest), `output` (output_chars, output was cut), `host_calls`
    (max_host_calls) or `trap` (the instance died for another reason, e.g.
    stack exhaustion or os._exit)."""
    limit: float | int
    """The configured value of that limit (0 for `trap`)."""
    message: str
    """Human-readable explanation, suitable for showing to the model."""


@dataclass
class CellResult:
    """What one cell did."""

    output: str
    """stdout and stderr as printed, capped at `output_chars` with a marker."""
    full_output: str
    """The uncapped output (up to `full_output_chars`), for storage."""
    error: str | None
    """`"ExcType: message"` if the cell raised, else None."""
    traceback: str | None
    """Formatted traceback of that exception, starting in the cell's code."""
    value_repr: str | None
    """repr() of the cell's last expression if it is not None (capped)."""
    duration_s: float
    """Wall-clock duration of the cell as seen by the host."""
    limit: LimitHit | None = None
    """The limit that was hit, if any."""
    restored_names: list[str] = field(default_factory=list)
    """Protected names the cell overwrote or deleted, now restored."""
    restarted: bool = False
    """The instance died (trap) and the session restored the last snapshot."""


@dataclass
class Snapshot:
    """Serialized user state of a REPL (pickled in the guest).

    Large str/bytes values are not inside `data`: a value equal to a slice of
    the context is a (document, start, end) reference, any other is a record
    named by a fingerprint the guest computed (crc32, hash, length). `ReplSession.restore` needs `data`
    plus the bytes of every record in `refs`. Record names come from guest
    code, so keep records where only this REPL's run can refer to them."""

    data: bytes
    """Opaque bytes for `ReplSession.restore`; `context` is not inside."""
    saved: list[str]
    """Names of the variables stored."""
    unsaved: list[str]
    """Names that could not be pickled (not stored, never silently)."""
    unsaved_reasons: dict[str, str] = field(default_factory=dict)
    """For each unsaved name, why it could not be pickled."""
    refs: list[str] = field(default_factory=list)
    """Names of all the records `data` refers to."""
    new_records: dict[str, bytes] = field(default_factory=dict)
    """The records among `refs` that this session's previous snapshot or restore
    did not have (the others are unchanged values)."""
    unchanged: bool = False
    """True when the state equals that of the session's previous snapshot or restore."""
