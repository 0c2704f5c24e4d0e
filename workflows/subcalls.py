"""Sub-calls made from cell code: `llm_query*` become `llm_call` activities,
`rlm_query*` become child `RLMRun` workflows (workflows/child_run.py).

A cell's host function sends each batch to its own workflow as the
`subcalls` update (DESIGN.md section 3). Here the workflow checks each item
against the budget, runs the items in parallel up to the concurrency cap and
remembers every answer by call id, so a cell retried after a worker crash is
answered from memory instead of calling a model again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from workflows import names
    from workflows.admission import Admission
    from workflows.budget import Ledger, Refusal
    from workflows.request import RunRequest, clip_utf8
    from workflows.result import CHILD_RESULT_BYTES, Usage
    from workflows.step_common import (
        MODEL_CALL_HEARTBEAT_TIMEOUT,
        error_text,
        raise_if_cancelled,
        until_deadline_s,
    )
    from workflows.call_groups import CallGroups
    from workflows.child_run import ChildRuns
    from workflows.subcall_plan import LlmPlan, plan_llm_call, refuse_text
    from workflows.model_attempts import ONE_ATTEMPT, paid_model_call
    from workflows.once_per_key import OncePerKey
    from workflows.steps import (
        MAX_BATCH_ITEMS,
        LlmCallInput,
        LlmCallOutput,
        ModelInfo,
        SubcallAnswer,
        SubcallBatch,
        SubcallItem,
        SubcallReply,
        batch_digest,
    )
    from workflows.summaries import llm_call_summary

# The server keeps at most 2,000 updates per run; leave room for control updates.
MAX_SUBCALL_UPDATES = 1_800

# Sum of inline replies in one update reply stays far below the 2 MiB limit.
REPLY_INLINE_BUDGET = 512 * 1024
# A run's history must stay under the server's limits (51,200 events and
# 50 MB by default; events: `limits.history_events`) until the turn boundary,
# where it continues as new.
# Measured: a one-item update costs 11 events, each further item ~4; an inline
# prompt is stored twice (update, activity input).
HISTORY_BYTES_BUDGET = 40 * 1024 * 1024
EVENTS_PER_UPDATE, EVENTS_PER_ITEM, BYTES_PER_ITEM = 11, 6, 2_048
# Runs since this patch wait for their cancelled calls and children to settle before they report.
SETTLE_BEFORE_RESULT_PATCH = "settle-subcalls-before-result"
SETTLE_WAIT = timedelta(minutes=2)


class SubcallRouter:
    """Runs and remembers the sub-calls of one run."""

    def __init__(
        self,
        *,
        request: RunRequest,
        models: dict[str, ModelInfo],
        ledger: Ledger,
        usage: Usage,
        root_workflow_id: str,
    ) -> None:
        self._req = request
        self._models = models
        self._ledger = ledger
        self._usage = usage
        self.child_runs = ChildRuns(request=request, ledger=ledger, usage=usage, root_workflow_id=root_workflow_id)
        self._once: OncePerKey[SubcallAnswer] = OncePerKey()
        self._sem = asyncio.Semaphore(max(1, request.caps.max_concurrency))
        self._queued = 0
        self._history_promised = 0
        """Items waiting for a concurrency slot."""
        self._admission: Admission | None = None
        """Set for runs that admit calls past the cap into windows; they use it instead of `_sem`."""
        self._windowed: bool | None = None
        self._groups: CallGroups | None = None
        """Set on the first `llm_query` of a run that carries calls in groups."""
        self._grouped: bool | None = None
        self.updates = 0
        self.open_calls = 0
        self.done_calls = 0
        self.closed = False

    # -- entry point (the update handler) ---------------------------------
    def validate(self, batch: SubcallBatch, update_id: str) -> None:
        if self.closed:
            raise ValueError("the run is finishing; no new sub-calls are accepted")
        if self.updates >= MAX_SUBCALL_UPDATES:
            raise ValueError(
                f"this run made {self.updates} sub-call requests, the most one run may make; "
                "use llm_query_batched / rlm_query_batched with many prompts per call"
            )
        if not batch.items:
            raise ValueError("empty batch")
        if len(batch.items) > MAX_BATCH_ITEMS:
            raise ValueError(
                f"a sub-call request holds {len(batch.items):,} prompts, at most {MAX_BATCH_ITEMS:,} "
                "travel in one; send them in several batches"
            )
        # The update id must name what is asked: the server answers a repeated
        # id with its first result without looking at the payload.
        if batch.digest != batch_digest(batch.kind, batch.model, batch.items) or update_id != batch.update_id():
            raise ValueError(
                f"sub-call request {update_id!r} does not match its content: the update id must be "
                "SubcallBatch.update_id() and the digest batch_digest() of the items"
            )
        self._check_history(batch)

    def _check_history(self, batch: SubcallBatch) -> None:
        """Refuse a batch that would push this run's history past the server's
        limits before the turn ends (a cell must finish inside one run)."""
        info = workflow.info()
        events = info.get_current_history_length() + EVENTS_PER_UPDATE + EVENTS_PER_ITEM * len(batch.items)
        promised = info.get_current_history_size() + self._history_promised + history_bytes(batch)
        if events > self._req.limits.history_events or promised > HISTORY_BYTES_BUDGET:
            raise ValueError(
                f"this turn has filled the run's history ({info.get_current_history_length():,} events, "
                f"{info.get_current_history_size():,} bytes); {len(batch.items):,} more sub-calls do not fit. "
                "Save what you have in variables and end this cell: the next turn starts with a fresh history. "
                "Put more text into fewer, larger prompts"
            )

    async def handle(self, batch: SubcallBatch) -> SubcallReply:
        self.updates += 1
        # What accepted updates still running will add: the validator checks
        # the next batch against it, not against the history so far alone.
        promised = history_bytes(batch)
        self._history_promised += promised
        try:
            return await self._handle(batch)
        finally:
            self._history_promised -= promised

    async def _handle(self, batch: SubcallBatch) -> SubcallReply:
        inline_limit = max(256, REPLY_INLINE_BUDGET // len(batch.items))
        waits = []
        for index, (item, digest) in enumerate(zip(batch.items, batch.item_digests())):
            # Named by what it asks, not by its place: a cell re-run after a
            # crash that asks in another order gets each answer it asks for.
            key = f"{batch.cell_id}:{digest[:24]}"
            waits.append(self._once.ask(
                key, lambda item=item, key=key, index=index: self._run_item(batch, item, key, inline_limit, index)
            ))  # fmt: skip
        answers = await asyncio.gather(*waits)
        return SubcallReply(answers=[_bounded(a, inline_limit) for a in answers])

    def cancel_all(self) -> None:
        self.closed = True
        self._once.cancel_running()

    async def settled(self) -> bool:
        """Wait (at most SETTLE_WAIT) for cancelled calls and child runs to
        stop: each settles its spend as it ends, and a result reported
        before leaves it out (a run cancelled with children queued reported
        1 call of 5 billed). False when some are still running."""
        if not self._once.running() or not workflow.patched(SETTLE_BEFORE_RESULT_PATCH):
            return True
        try:
            await workflow.wait_condition(lambda: not self._once.running(), timeout=SETTLE_WAIT)
        except asyncio.TimeoutError:
            return False
        return True

    # -- one item ------------------------------------------------------------
    async def _run_item(
        self, batch: SubcallBatch, item: SubcallItem, call_id: str, inline_limit: int, index: int
    ) -> SubcallAnswer:
        if refused := refuse_text(batch.kind, item):
            return refused
        if self._windows() is not None:
            return await self._run_admitted(batch, item, call_id, inline_limit, index)
        self._queued += 1
        try:
            await self._sem.acquire()
        finally:
            self._queued -= 1  # also when cancelled while waiting
        try:
            with self._open_call():
                # caps.max_depth counts down: what is left below this run.
                if batch.kind == "rlm" and self._ledger.caps.max_depth >= 1:
                    return await self.child_runs.run(batch, item, call_id, index)
                return await self._llm_call(batch, item, call_id, inline_limit, index)
        finally:
            self._sem.release()

    @contextlib.contextmanager
    def _open_call(self) -> Iterator[None]:
        """Counts an admitted item as open while it runs (`progress`)."""
        self.open_calls += 1
        try:
            yield
        finally:
            self.open_calls -= 1
            self.done_calls += 1

    def _windows(self) -> Admission | None:
        """Runs started by this version admit `llm_query` calls past the cap
        into windows (workflows/admission.py); older runs keep the semaphore."""
        if self._windowed is None:
            self._windowed = workflow.patched("llm-call-windows")
            if self._windowed:
                self._admission = Admission(self._req.caps.max_concurrency, self._ledger.remaining)
        return self._admission

    async def _run_admitted(
        self, batch: SubcallBatch, item: SubcallItem, call_id: str, inline_limit: int, index: int
    ) -> SubcallAnswer:
        """An item of a run that admits calls past the cap into windows:
        checked and priced first, then admitted (workflows/admission.py)."""
        admission = self._windows()
        assert admission is not None
        # caps.max_depth counts down: what is left below this run.
        kind = "rlm" if batch.kind == "rlm" and self._ledger.caps.max_depth >= 1 else "llm"
        call = plan_llm_call(self._req, self._models, batch, item) if kind == "llm" else None
        if isinstance(call, SubcallAnswer):
            return call  # refused before it waits for a slot
        windowed = await admission.enter(kind, call.worst if call else None)
        try:
            with self._open_call():
                if call is None:
                    return await self.child_runs.run(batch, item, call_id, index)
                return await self._llm_attempts(call, call_id, inline_limit, index, len(batch.items))
        finally:
            admission.leave(kind, windowed)

    async def _llm_call(
        self, batch: SubcallBatch, item: SubcallItem, call_id: str, inline_limit: int, index: int
    ) -> SubcallAnswer:
        plan = plan_llm_call(self._req, self._models, batch, item)
        if isinstance(plan, SubcallAnswer):
            return plan
        return await self._llm_attempts(plan, call_id, inline_limit, index, len(batch.items))

    async def _llm_attempts(
        self, plan: LlmPlan, call_id: str, inline_limit: int, index: int, count: int
    ) -> SubcallAnswer:
        item = plan.item

        async def attempt(number: int) -> LlmCallOutput:
            call = LlmCallInput(
                workflow_id=workflow.info().workflow_id,
                call_id=call_id,
                model=plan.model,
                prompt=item.text,
                prompt_ref=item.text_ref,
                context=item.context,
                max_tokens=plan.max_out,
                inline_limit=inline_limit,
                attempt=number,
            )
            groups = self._call_groups()
            if groups is not None:
                return await groups.call(call, index + 1, count)
            return await workflow.execute_activity(
                names.ACTIVITY_LLM_CALL,
                call,
                result_type=LlmCallOutput,
                summary=llm_call_summary(index + 1, count, plan.model),
                start_to_close_timeout=timedelta(
                    seconds=until_deadline_s(self._ledger.deadline, self._req.limits.model_call_timeout_s)
                ),
                retry_policy=ONE_ATTEMPT,
                heartbeat_timeout=MODEL_CALL_HEARTBEAT_TIMEOUT,
            )

        try:
            out = await paid_model_call(
                self._ledger, self._usage, call_id=call_id, model=plan.info, depth=self._req.depth + 1,
                prompt_tokens=plan.prompt_tokens, max_output_tokens=plan.max_out, run_attempt=attempt,
            )  # fmt: skip
        except ActivityError as exc:
            raise_if_cancelled(exc)
            return SubcallAnswer(error=f"Error: {error_text(exc)}")
        if isinstance(out, Refusal):
            return SubcallAnswer(error=f"Budget: {out.message}")
        return SubcallAnswer(text=out.text, text_ref=out.text_ref)

    def _call_groups(self) -> CallGroups | None:
        """Runs started by this version carry several calls per activity;
        runs started before it go on with one activity per call."""
        if self._grouped is None:
            self._grouped = workflow.patched("llm-call-groups")
            if self._grouped:
                # Whole-batch groups change the activities a run schedules:
                # runs started before them keep groups of CALLS_PER_ACTIVITY.
                whole = workflow.patched("llm-call-groups-whole-batch")
                if self._admission is not None:
                    admission = self._admission
                    in_lanes = workflow.patched("llm-calls-in-lanes")
                    self._groups = CallGroups(
                        self._req.limits.model_call_timeout_s,
                        lambda: admission.waiting > 0,
                        lanes=self._req.caps.max_concurrency,
                        lanes_activity=names.ACTIVITY_LLM_CALLS_IN_LANES if in_lanes else names.ACTIVITY_LLM_CALLS,
                        deadline=lambda: self._ledger.deadline,
                    )
                else:
                    self._groups = CallGroups(
                        self._req.limits.model_call_timeout_s, (lambda: self._queued > 0) if whole else None,
                        deadline=lambda: self._ledger.deadline,
                    )
        return self._groups

    def progress(self) -> dict[str, Any]:
        children = len(self.child_runs.children)
        return {"open_subcalls": self.open_calls, "done_subcalls": self.done_calls, "children": children}


def _bounded(answer: SubcallAnswer, inline_limit: int) -> SubcallAnswer:
    """The answer as it may travel in the update reply: errors cut, a child's
    long answer left for the cell to read from the child's result."""
    if answer.error is not None:
        return answer.model_copy(update={"error": clip_utf8(answer.error, max(inline_limit, 300))})
    if answer.child_workflow_id is not None:
        fits = answer.text is not None and len(answer.text.encode()) <= inline_limit
        return SubcallAnswer(text=answer.text) if fits else SubcallAnswer(child_workflow_id=answer.child_workflow_id)
    return answer


def history_bytes(batch: SubcallBatch) -> int:
    """The most one update of `batch` adds to the run's history: each inline
    prompt twice (the update, the activity input), each child's result, and
    the inline replies twice (activity results, the update's reply)."""
    per_item = sum(
        len(item.text or "") * 2 + BYTES_PER_ITEM + (CHILD_RESULT_BYTES if batch.kind == "rlm" else 0)
        for item in batch.items
    )
    return per_item + 2 * REPLY_INLINE_BUDGET
