"""What one cell's run in the guest becomes: the `CellResult` the session
returns, built from the guest's report (guest-made values, checked), the
output the host captured and how the command ended."""

from __future__ import annotations

from ._guest_results import report_text
from ._instance import Event
from ._output import cap_output
from ._types import CellResult, LimitHit, SandboxLimits

__all__ = ["TOO_MANY_CALLS", "cell_result"]

TOO_MANY_CALLS = "too many host calls"
"""The payload of a cell stopped for its host-call count."""
_MAX_RESTORED_NAMES = 100


def cell_result(event: Event, text: str, dropped: int, limits: SandboxLimits, duration: float,
                restarted: bool, refusal: str | None = None) -> tuple[CellResult, list[str], str | None]:
    """`(result, notes, stopped)`: the cell's result, notes for its output,
    and why the guest was stopped (None when the cell ended by itself: the
    REPL goes on; else the session restarts it). `refusal`: why the host
    last refused a write of the cell on fd 0."""
    full_output = text
    if dropped:
        full_output += f"\n... [full output truncated: {dropped:,} more chars]"
    output, cut = cap_output(text, dropped, limits.output_chars)
    result = CellResult(output=output, full_output=full_output, error=None, traceback=None,
                        value_repr=None, duration_s=duration, restarted=restarted)
    notes: list[str] = []
    if cut:
        result.limit = LimitHit("output", limits.output_chars,
                                f"output cut to {limits.output_chars:,} chars "
                                f"({cut:,} more chars not shown)")
    if event.kind == "done":
        payload = event.payload
        result.error = report_text(payload.get("error"))
        result.traceback = report_text(payload.get("traceback"))
        result.value_repr = report_text(payload.get("value_repr"), limits.output_chars + 100)
        restored = payload.get("restored")
        result.restored_names = ([str(n)[:100] for n in restored[:_MAX_RESTORED_NAMES]]
                                 if isinstance(restored, list) else [])
        if payload.get("error_type") == "MemoryError":
            result.limit = LimitHit("memory", limits.memory_bytes,
                                    f"the cell ran out of memory (cap {limits.memory_bytes:,} "
                                    "bytes); free large variables or process in chunks")
        if refusal and refusal not in (result.error or "") + text:
            # Raw bytes the cell wrote to fd 0 itself: its OSError has only an errno.
            notes.append(f"the host channel (fd 0) refused a write: {refusal}")
        if result.restored_names:
            notes.append("the cell overwrote protected name(s) "
                          f"{', '.join(result.restored_names)}; they were restored")
        return result, notes, None
    if event.timed_out:
        message = f"the cell ran longer than {limits.cell_timeout_s:g} s and was stopped"
        result.limit = LimitHit("timeout", limits.cell_timeout_s, message)
        result.error = f"TimeoutError: {message}"
    elif event.payload == TOO_MANY_CALLS:
        message = (f"the cell made more than {limits.max_host_calls:,} host-function calls "
                   "and was stopped; batch the work (e.g. llm_query_batched) instead of "
                   "calling in a loop")
        result.limit = LimitHit("host_calls", limits.max_host_calls, message)
        result.error = f"HostCallLimit: {message}"
    else:
        message = str(event.payload)
        result.limit = LimitHit("trap", 0, message)
        result.error = f"SandboxCrash: {message}"
    result.restarted = True
    return result, [message], message
