"""A WASM Python REPL for model-written code (knows nothing of Temporal).

CPython compiled to WASI runs under wasmtime; the guest calls host functions
synchronously through a shadowed fd, and every cell runs under time, memory
and output limits. See `ReplSession`.
"""

from ._types import (
    CellInterrupted,
    CellResult,
    ContextTooLarge,
    DocumentSpan,
    LimitHit,
    SandboxError,
    SandboxLimits,
    SandboxUnavailable,
    Snapshot,
    ToolError,
)
from ._runtime import check_guest_memory, verified_wasm_path as check_runtime_file
from ._saved_state import RecordSource, RecordsUnavailable
from .guest.rlm_references import FORMAT as SNAPSHOT_FORMAT  # what this code's snapshots can hold, as a number
from .session import ReplSession

__all__ = ["CellInterrupted", "CellResult", "ContextTooLarge", "DocumentSpan", "LimitHit", "RecordSource", "RecordsUnavailable", "ReplSession",
           "SNAPSHOT_FORMAT", "SandboxError", "SandboxLimits", "SandboxUnavailable", "Snapshot", "ToolError", "check_guest_memory",
           "check_runtime_file"]
