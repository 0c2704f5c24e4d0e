"""`llm_query` attempts carried several to an activity (`llm_calls`).

Each sub-call costs the engine a fixed price per activity (schedule, dispatch,
start, completion, a workflow task to read it), which on a small machine was
most of the CPU of a large fan-out (bench/README.md, "fanout"). So the
attempts that become ready in one workflow step (their budget reserved,
their concurrency slot taken) are sent together, up to `CALLS_PER_ACTIVITY`
per activity, and each caller gets its own call's outcome back:

- a call that succeeded: its `LlmCallOutput`, as the single-call activity
  would return it;
- a call that failed: an `ActivityError` whose cause is the ApplicationError
  the single-call activity would have raised (same type, retryability,
  Retry-After, billing details), so `paid_model_call` charges and retries it
  the same way;
- the whole activity failed (timeout, worker lost, cancelled): that
  `ActivityError` for every call of the group.

Durability is per call, not per group: the activity records each call's
reply in object storage as soon as it arrives (activities/_call_records.py),
so a group cut short by a crash is retried call by call, and a call that had
completed is answered from its record, never sent again. A group names where
its records go; a retried call is told the groups that carried its earlier
attempts without reporting it, which is where its record may be.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from workflows import names
    from workflows.model_attempts import ONE_ATTEMPT
    from workflows.step_common import MODEL_CALL_HEARTBEAT_TIMEOUT, until_deadline_s
    from workflows.steps import LlmCallFailure, LlmCallInput, LlmCallOutput, LlmCallsInput, LlmCallsOutput
    from workflows.summaries import llm_calls_summary

# Measured (bench/README.md, "fanout"): 8 calls per activity cut the engine's
# CPU per sub-call by most of the per-activity share while a group still
# finishes with its calls (at concurrency 32, four groups are in flight).
CALLS_PER_ACTIVITY = 8
# A batch that fits in the run's concurrency (nothing queued behind the cap)
# goes as one group of up to this many: its calls all run at once anyway,
# and the batch answers when its last call does, so splitting it only adds
# activities and workflow tasks (bench_many_runs: 20 calls a run, 3 -> 1).
# A larger fan-out keeps groups of CALLS_PER_ACTIVITY, which finish and
# give back their slots independently.
WHOLE_BATCH_CALLS = 32
# With lanes (runs that admit calls into windows, workflows/admission.py), a
# group carries up to this many calls per lane: each lane starts its next call
# inside the activity as soon as its last one ends.
CALLS_PER_LANE = 2
# Inline prompts of one group, and replies it may bring back inline, stay far
# below the 2 MiB payload limit (longer replies come back as blob refs).
GROUP_INLINE_BUDGET = 512 * 1024
GROUP_REPLY_BUDGET = 1024 * 1024
# Time a group gets beyond its calls' own deadline: reading prompts, writing records.
GROUP_TIMEOUT_MARGIN = timedelta(seconds=30)


@dataclass
class _Call:
    inp: LlmCallInput
    place: tuple[int, int]
    future: asyncio.Future[LlmCallOutput]


@dataclass
class _Group:
    calls: list[_Call]
    records: str
    """Where the activity records replies: unique per group, since a call's
    attempt is carried once."""
    lanes: int | None = None
    """Calls in flight at once inside the activity (None: all)."""
    task: asyncio.Task[None] | None = None
    cancelled: set[int] = field(default_factory=set)


class CallGroups:
    """Sends the attempts of one run's `llm_query` calls in groups."""

    def __init__(
        self,
        call_timeout_s: float,
        more_queued: Callable[[], bool] | None = None,
        *,
        lanes: int | None = None,
        lanes_activity: str = names.ACTIVITY_LLM_CALLS,
        deadline: Callable[[], datetime | None] = lambda: None,
    ) -> None:
        """`more_queued` says whether calls of the run wait for a concurrency
        slot; None keeps every group at CALLS_PER_ACTIVITY (runs started
        before whole-batch groups). `lanes` is how many calls of the run may
        be in flight at once: set, groups carry up to CALLS_PER_LANE calls per
        lane and calls wait here for a lane; None (runs started before call
        windows), each call's concurrency slot is its lane. `lanes_activity`
        is the activity that carries groups with lanes (runs started before
        its own name keep `llm_calls`). `deadline`: the run's wall-time
        deadline, which no group's calls run past."""
        self._call_timeout_s = call_timeout_s
        self._deadline = deadline
        self._more_queued = more_queued
        self._free = lanes
        self._lanes_activity = lanes_activity
        self._waiting: list[_Call] = []
        self._flushing = False
        self._unreported: dict[str, list[str]] = {}
        """call id -> records of the groups that ended without reporting it."""

    async def call(self, inp: LlmCallInput, index: int, count: int) -> LlmCallOutput:
        """One attempt (its budget already reserved); raises ActivityError as
        `workflow.execute_activity` would for a single-call activity."""
        future: asyncio.Future[LlmCallOutput] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Call(inp, (index, count), future))
        if not self._flushing:
            self._flushing = True
            asyncio.ensure_future(self._flush())
        return await future

    async def _flush(self) -> None:
        # Conditions are checked only once nothing else is ready: every call
        # that becomes ready in this workflow step has joined `_waiting` by then.
        await workflow.wait_condition(lambda: True)
        waiting, self._waiting, self._flushing = self._waiting, [], False
        ready = [c for c in waiting if not c.future.done()]
        whole = self._more_queued is not None and not self._more_queued() and len(ready) <= WHOLE_BATCH_CALLS
        if self._free is None:
            groups = [(calls, None) for calls in _split(ready, len(ready) if whole else CALLS_PER_ACTIVITY)]
        else:
            groups, self._waiting = self._with_lanes(ready, whole)
        for calls, lanes in groups:
            first = calls[0].inp
            group = _Group(calls, f"{first.call_id}-a{first.attempt}", lanes)
            for position, one in enumerate(calls):
                one.future.add_done_callback(lambda f, g=group, p=position: _on_done(g, p, f))
            group.task = asyncio.ensure_future(self._run(group))

    def _with_lanes(self, ready: list[_Call], whole: bool) -> tuple[list[tuple[list[_Call], int]], list[_Call]]:
        """Groups of the ready calls that the free lanes can carry, each with
        its lanes; and the calls left to wait for lanes. Calls that fit the
        free lanes get one each (as without lanes); only the calls past them
        queue behind a lane, up to CALLS_PER_LANE calls per lane."""
        assert self._free is not None
        if whole and len(ready) <= self._free:
            self._free -= len(ready)
            return [(ready, len(ready))], []
        groups: list[tuple[list[_Call], int]] = []
        position = 0
        while position < len(ready) and self._free > 0:
            left = len(ready) - position
            lanes = min(CALLS_PER_ACTIVITY, self._free, left)
            past_lanes = left - min(self._free, left)  # calls that must queue behind a lane
            take = lanes + min(past_lanes, lanes * (CALLS_PER_LANE - 1))
            calls = _split(ready[position : position + take], take)[0]  # within the inline budget
            lanes = min(lanes, len(calls))
            self._free -= lanes
            groups.append((calls, lanes))
            position += len(calls)
        return groups, ready[position:]

    def _lanes_back(self, lanes: int | None) -> None:
        if self._free is None or lanes is None:
            return
        self._free += lanes
        if self._waiting and not self._flushing:
            self._flushing = True
            asyncio.ensure_future(self._flush())

    async def _run(self, group: _Group) -> None:
        try:
            await self._run_group(group)
        finally:
            self._lanes_back(group.lanes)

    async def _run_group(self, group: _Group) -> None:
        calls = group.calls
        reply_limit = max(256, GROUP_REPLY_BUDGET // len(calls))
        inputs = [
            c.inp.model_copy(
                update={
                    "inline_limit": min(c.inp.inline_limit, reply_limit),
                    "earlier_groups": list(self._unreported.get(c.inp.call_id, ())),
                }
            )
            for c in calls
        ]
        # A lane runs its calls one after another.
        rounds = -(-len(calls) // group.lanes) if group.lanes else 1
        call_timeout_s = until_deadline_s(self._deadline(), self._call_timeout_s)
        try:
            out: LlmCallsOutput = await workflow.execute_activity(
                names.ACTIVITY_LLM_CALLS if group.lanes is None else self._lanes_activity,
                LlmCallsInput(
                    calls=inputs, call_timeout_s=call_timeout_s, records=group.records, lanes=group.lanes
                ),
                result_type=LlmCallsOutput,
                summary=llm_calls_summary([c.place for c in calls], [c.inp.model for c in calls]),
                start_to_close_timeout=timedelta(seconds=call_timeout_s * rounds) + GROUP_TIMEOUT_MARGIN,
                retry_policy=ONE_ATTEMPT,
                heartbeat_timeout=MODEL_CALL_HEARTBEAT_TIMEOUT,
            )
        except ActivityError as exc:
            for one in calls:
                # Its reply may have been recorded before the activity was lost.
                self._unreported.setdefault(one.inp.call_id, []).append(group.records)
                if not one.future.done():
                    one.future.set_exception(exc)
            return
        except asyncio.CancelledError:
            for one in calls:
                if not one.future.done():
                    one.future.cancel()
            raise
        for one, result in zip(calls, out.results):
            if one.future.done():
                continue
            if result.output is not None:
                one.future.set_result(result.output)
            else:
                one.future.set_exception(_call_error(result.failure, one.inp.call_id))


def _on_done(group: _Group, position: int, future: asyncio.Future) -> None:
    """A caller that was cancelled (its run is ending) gives up its call; the
    activity is cancelled once no caller of the group is left."""
    if not future.cancelled():
        return
    group.cancelled.add(position)
    if len(group.cancelled) == len(group.calls) and group.task is not None:
        group.task.cancel()


def _split(calls: list[_Call], per_group: int) -> list[list[_Call]]:
    groups: list[list[_Call]] = []
    inline = 0
    for one in calls:
        size = len((one.inp.prompt or "").encode())
        if not groups or len(groups[-1]) >= per_group or inline + size > GROUP_INLINE_BUDGET:
            groups.append([])
            inline = 0
        groups[-1].append(one)
        inline += size
    return groups


def _call_error(failure: LlmCallFailure | None, call_id: str) -> ActivityError:
    """The error a single-call activity would have failed with."""
    failure = failure or LlmCallFailure(message=f"call {call_id}: no result reported", type="MissingResult")
    delay = timedelta(seconds=failure.retry_after_s) if failure.retry_after_s is not None else None
    cause = ApplicationError(
        failure.message, failure.details, type=failure.type, non_retryable=failure.non_retryable, next_retry_delay=delay
    )
    error = ActivityError(
        "Activity task failed",
        scheduled_event_id=0,
        started_event_id=0,
        identity="",
        activity_type=names.ACTIVITY_LLM_CALLS,
        activity_id=call_id,
        retry_state=None,
    )
    error.__cause__ = cause
    return error
