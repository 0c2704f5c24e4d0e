"""A WASM Python REPL for model-written code (knows nothing of Temporal).

CPython compiled to WASI runs under wasmtime; the guest calls host functions
synchronously through a shadowed fd, and every cell runs under time, memory
and output limits. See `ReplSession`.
"""

from ._types import CellInterrupted, CellResult, ContextTooLarge, LimitHit, SandboxError, SandboxLimits, Snapshot, ToolError
from ._saved_state import RecordSource, RecordsUnavailable
from .session import ReplSession

__all__ = ["CellInterrupted", "CellResult", "ContextTooLarge", "LimitHit", "RecordSource", "RecordsUnavailable", "ReplSession", "SandboxError",
           "SandboxLimits", "Snapshot", "ToolError"]
