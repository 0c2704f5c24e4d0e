"""A model call from workflow code, paid for attempt by attempt.

A provider may bill an attempt that we never see succeed: it answered after
our timeout, the connection dropped after the request was sent, it returned a
5xx or a reply we could not use. So retries are not left to Temporal (which
would repeat the request without asking the budget): each attempt is its own
activity execution, reserved in the ledger before it starts, and settled from
what the activity reports when it ends:

- success: its usage;
- a failure that may have been billed (the default, and any Temporal timeout,
  e.g. a worker that died mid-call): the usage the provider reported, or else
  the attempt's whole reservation;
- cancelled in flight (the run is ending): the whole reservation;
- a failure the activity marks as refused before any work (429, 401, 400,
  unknown model, missing key; details `{"billable": false}`): nothing.

The decisions come from the run's history, so replays make the same ones.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Protocol, TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, CancelledError

with workflow.unsafe.imports_passed_through():
    from workflows.budget import Ledger, Refusal, Spend, actual, worst_case
    from workflows.result import ModelUsage, Usage
    from workflows.step_common import error_text
    from workflows.steps import ModelInfo

MODEL_CALL_ATTEMPTS = 5
FIRST_RETRY_DELAY = timedelta(seconds=1)
MAX_RETRY_DELAY = timedelta(seconds=60)
# Runs since this patch wait for a retry at most until their wall-time deadline.
RETRY_UNTIL_DEADLINE_PATCH = "retry-wait-ends-at-deadline"
# Each attempt is one activity execution; `paid_model_call` retries.
ONE_ATTEMPT = RetryPolicy(maximum_attempts=1)


class AttemptOutput(Protocol):
    prompt_tokens: int
    completion_tokens: int
    usd: float
    replayed: bool


Out = TypeVar("Out", bound=AttemptOutput)


def attempt_id(call_id: str, attempt: int) -> str:
    """Ledger id of one attempt (the first keeps the call's own id)."""
    return call_id if attempt == 1 else f"{call_id}@{attempt}"


async def paid_model_call(
    ledger: Ledger,
    usage: Usage,
    *,
    call_id: str,
    model: ModelInfo,
    depth: int,
    prompt_tokens: int,
    max_output_tokens: int,
    run_attempt: Callable[[int], Awaitable[Out]],
) -> Out | Refusal:
    """Run `run_attempt(n)` for n = 1, 2, ... until one succeeds, each attempt
    reserved first (`prompt_tokens` is an upper bound, `max_output_tokens`
    the reply cap).

    Returns the output, or the budget's refusal of the next attempt. Raises
    the last ActivityError when a failure is not retryable or the attempts
    are used up (the caller turns it into an error for the model, and ends the
    run when it is a cancellation).
    """
    worst = worst_case(prompt_tokens, max_output_tokens, model.usd_per_input_token, model.usd_per_output_token)
    last: ActivityError | None = None
    for attempt in range(1, MODEL_CALL_ATTEMPTS + 1):
        this_id = attempt_id(call_id, attempt)
        refusal = ledger.reserve(this_id, worst, workflow.now())
        if refusal is not None:
            if last is None:
                return refusal
            note = f" (after {attempt - 1} failed attempt(s); the last: {error_text(last)})"
            return Refusal(cap=refusal.cap, message=refusal.message + note)
        try:
            out = await run_attempt(attempt)
        except asyncio.CancelledError:
            # The run is ending with this attempt in flight (a cancel, the run's
            # end): its request may be out and billed, so it counts whole, as an
            # attempt lost with its worker does; the run's reported spend (which
            # a parent settles its child by) then covers it.
            charged = ledger.charge(this_id)
            _record(usage, model.name, depth, prompt_tokens, max_output_tokens, charged.usd)
            raise
        except ActivityError as exc:
            _count_failure(ledger, usage, this_id, model.name, depth, exc, prompt_tokens, max_output_tokens)
            if attempt == MODEL_CALL_ATTEMPTS or not _retryable(exc):
                raise
            last = exc
            await workflow.sleep(_retry_wait(ledger, exc, attempt))
            continue
        if out.replayed:
            # The record of an earlier attempt that finished unseen (its worker
            # died or it timed out after the call); that attempt was charged.
            ledger.settle(this_id, Spend())
        else:
            ledger.settle(this_id, actual(out.prompt_tokens, out.completion_tokens, out.usd))
            _record(usage, model.name, depth, out.prompt_tokens, out.completion_tokens, out.usd)
        return out
    raise AssertionError("unreachable: the last attempt returns or raises")


def _failure_details(exc: ActivityError) -> dict:
    cause = exc.cause
    if isinstance(cause, ApplicationError) and cause.details and isinstance(cause.details[0], dict):
        return cause.details[0]
    return {}


def _count_failure(
    ledger: Ledger,
    usage: Usage,
    this_id: str,
    model: str,
    depth: int,
    exc: ActivityError,
    prompt_tokens: int,
    max_output_tokens: int,
) -> None:
    details = _failure_details(exc)
    if details.get("billable") is False:
        ledger.release(this_id)
        return
    reported = details.get("usage")
    if isinstance(reported, dict):
        p, c = int(reported.get("prompt_tokens", 0)), int(reported.get("completion_tokens", 0))
        usd = float(reported.get("usd", 0.0))
        ledger.charge(this_id, actual(p, c, usd))
        _record(usage, model, depth, p, c, usd)
        return
    charged = ledger.charge(this_id)
    _record(usage, model, depth, prompt_tokens, max_output_tokens, charged.usd)


def _record(usage: Usage, model: str, depth: int, prompt: int, completion: int, usd: float) -> None:
    usage.record(model, depth, ModelUsage(calls=1, prompt_tokens=prompt, completion_tokens=completion, usd=usd))


def _retryable(exc: ActivityError) -> bool:
    cause = exc.cause
    if isinstance(cause, CancelledError):
        return False
    return not (isinstance(cause, ApplicationError) and cause.non_retryable)


def _retry_wait(ledger: Ledger, exc: ActivityError, attempt: int) -> timedelta:
    """`_retry_delay`, but never past the run's wall-time deadline: there the
    next attempt's reservation is refused (wall time), naming this failure.
    A 429 saying "Retry-After: 100000" overran a 5 s cap by 55 s before."""
    delay = _retry_delay(exc, attempt)
    deadline, now = ledger.deadline, workflow.now()
    if deadline is not None and now + delay > deadline and workflow.patched(RETRY_UNTIL_DEADLINE_PATCH):
        return max(deadline - now, timedelta(milliseconds=1))
    return delay


def _retry_delay(exc: ActivityError, attempt: int) -> timedelta:
    """The provider's Retry-After when it sent one, else exponential backoff."""
    cause = exc.cause
    if isinstance(cause, ApplicationError) and cause.next_retry_delay is not None:
        return min(cause.next_retry_delay, MAX_RETRY_DELAY)
    return min(FIRST_RETRY_DELAY * (2 ** (attempt - 1)), MAX_RETRY_DELAY)
