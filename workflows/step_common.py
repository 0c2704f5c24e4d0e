"""What every step a run schedules shares: retry policy, timeouts, error
text, cancellation, and how a finished model call is paid for."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, CancelledError, ChildWorkflowError

with workflow.unsafe.imports_passed_through():
    from workflows.budget import Ledger, actual
    from workflows.request import ModelUsage, Usage

MODEL_CALL_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=60),
    maximum_attempts=5,
)
# Model-call activities heartbeat every 2 s; a dead worker is noticed after this.
MODEL_CALL_HEARTBEAT_TIMEOUT = timedelta(seconds=10)
# Rough token count of text, erring high so a reservation covers the real call.
CHARS_PER_TOKEN = 3


def estimate_tokens(chars: int) -> int:
    return chars // CHARS_PER_TOKEN + 16


def settle_model_call(
    ledger: Ledger,
    usage: Usage,
    call_id: str,
    model: str,
    depth: int,
    prompt_tokens: int,
    completion_tokens: int,
    usd: float,
) -> None:
    """Replace the call's reservation by what it used, and count it."""
    ledger.settle(call_id, actual(prompt_tokens, completion_tokens, usd))
    usage.record(
        model,
        depth,
        ModelUsage(calls=1, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, usd=usd),
    )


def raise_if_cancelled(exc: ActivityError | ChildWorkflowError) -> None:
    """A step that failed because this run is being cancelled ends the run,
    it is not an error to report to the model (the SDK turns the cancel of an
    awaited activity or child into an ActivityError / ChildWorkflowError)."""
    if isinstance(exc.cause, CancelledError):
        raise asyncio.CancelledError() from exc


def error_text(exc: BaseException) -> str:
    """The most specific message in a Temporal error chain."""
    inner: BaseException | None = exc
    while isinstance(inner, (ActivityError, ChildWorkflowError)) and inner.cause is not None:
        inner = inner.cause
    return str(inner or exc)
