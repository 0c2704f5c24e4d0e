"""What every step a run schedules shares: timeouts, error text,
cancellation. (Model calls are retried and paid for in
workflows/model_attempts.py.)"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.exceptions import ActivityError, CancelledError, ChildWorkflowError, FailureError

with workflow.unsafe.imports_passed_through():
    from workflows.request import clip_noting_length

# Model-call activities heartbeat every 2 s; a dead worker is noticed after this.
MODEL_CALL_HEARTBEAT_TIMEOUT = timedelta(seconds=10)
# Longest error text that travels in a payload (update reply, result reason,
# a prompt): a child's or a provider's message may be of any length.
ERROR_CHARS = 4_000


def until_deadline_s(deadline: datetime | None, seconds: float) -> float:
    """`seconds`, or the time left to the run's wall-time deadline when that
    is shorter (at least 1 s). Caps are checked before a step starts; a step
    started just before the deadline ran past it by its whole timeout (a
    looping cell 30 s past a 3 s cap, a slow sub-call 20 s)."""
    if deadline is None:
        return seconds
    return max(1.0, min(seconds, (deadline - workflow.now()).total_seconds()))


def is_cancellation(exc: FailureError) -> bool:
    """The step failed because this run is being cancelled: the SDK turns the
    cancel of an awaited activity or child into an ActivityError /
    ChildWorkflowError caused by a CancelledError (a local activity's into
    the CancelledError itself)."""
    return isinstance(exc, CancelledError) or isinstance(exc.cause, CancelledError)


def raise_if_cancelled(exc: FailureError, patch: str | None = None) -> None:
    """A step that failed because this run is being cancelled ends the run,
    it is not an error to report to the model. `patch`: where this check came
    later than the step, the patch that gates it (histories from before it
    replay as they ran)."""
    if is_cancellation(exc) and (patch is None or workflow.patched(patch)):
        raise asyncio.CancelledError() from exc


def error_text(exc: BaseException) -> str:
    """The most specific message in a Temporal error chain, cut to ERROR_CHARS."""
    inner: BaseException | None = exc
    while isinstance(inner, (ActivityError, ChildWorkflowError)) and inner.cause is not None:
        inner = inner.cause
    return clip_noting_length(str(inner or exc) or type(inner or exc).__name__, ERROR_CHARS)
