"""Sub-calls made from cell code: `llm_query*` become `llm_call` activities,
`rlm_query*` become child `RLMRun` workflows.

A cell's host function sends each batch to its own workflow as the
`subcalls` update (DESIGN.md section 3). Here the workflow checks each item
against the budget, runs the items in parallel up to the concurrency cap and
remembers every answer by call id, so a cell retried after a worker crash is
answered from memory instead of calling a model again.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError, ChildWorkflowError

with workflow.unsafe.imports_passed_through():
    from workflows import names
    from workflows.budget import Ledger, Spend, equal_share, worst_case
    from workflows.request import ChildSummary, ParentLink, RunRequest, RunResult, Usage
    from workflows.step_common import (
        MODEL_CALL_HEARTBEAT_TIMEOUT,
        MODEL_CALL_RETRY,
        error_text,
        estimate_tokens,
        raise_if_cancelled,
        settle_model_call,
    )
    from workflows.steps import (
        LlmCallInput,
        LlmCallOutput,
        ModelInfo,
        SubcallAnswer,
        SubcallBatch,
        SubcallItem,
        SubcallReply,
    )

# The server keeps at most 2,000 updates per run; leave room for control updates.
MAX_SUBCALL_UPDATES = 1_800

# Sum of inline replies in one update reply stays far below the 2 MiB limit.
REPLY_INLINE_BUDGET = 512 * 1024


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
        self._root_id = root_workflow_id
        self._memo: dict[str, SubcallAnswer] = {}
        self._inflight: dict[str, asyncio.Task[SubcallAnswer]] = {}
        self._sem = asyncio.Semaphore(max(1, request.caps.max_concurrency))
        self.children: list[ChildSummary] = []
        self.updates = 0
        self.open_calls = 0
        self.done_calls = 0
        self.closed = False

    # -- entry point (the update handler) ---------------------------------
    def validate(self, batch: SubcallBatch) -> None:
        if self.closed:
            raise ValueError("the run is finishing; no new sub-calls are accepted")
        if self.updates >= MAX_SUBCALL_UPDATES:
            raise ValueError(
                f"this run made {self.updates} sub-call requests, the most one run may make; "
                "use llm_query_batched / rlm_query_batched with many prompts per call"
            )
        if not batch.items:
            raise ValueError("empty batch")

    async def handle(self, batch: SubcallBatch) -> SubcallReply:
        self.updates += 1
        inline_limit = max(256, REPLY_INLINE_BUDGET // len(batch.items))
        waits = []
        for index, item in enumerate(batch.items):
            call_id = f"{batch.cell_id}:{batch.seq}:{index}"
            # A retried cell that asks something else under an old id is a new call.
            key = f"{call_id}#{batch.digest[:16]}"
            if key in self._memo:
                waits.append(_done(self._memo[key]))
                continue
            task = self._inflight.get(key)
            if task is None:
                task = asyncio.ensure_future(self._run_item(batch, item, key, inline_limit))
                self._inflight[key] = task
                task.add_done_callback(lambda t, k=key: self._remember(k, t))
            waits.append(task)
        answers = await asyncio.gather(*waits)
        return SubcallReply(answers=list(answers))

    def _remember(self, key: str, task: asyncio.Task[SubcallAnswer]) -> None:
        self._inflight.pop(key, None)
        if not task.cancelled() and task.exception() is None:
            self._memo[key] = task.result()

    def cancel_all(self) -> None:
        self.closed = True
        for task in list(self._inflight.values()):
            task.cancel()

    # -- one item ------------------------------------------------------------
    async def _run_item(
        self, batch: SubcallBatch, item: SubcallItem, call_id: str, inline_limit: int
    ) -> SubcallAnswer:
        async with self._sem:
            self.open_calls += 1
            try:
                # caps.max_depth counts down: what is left below this run.
                if batch.kind == "rlm" and self._ledger.caps.max_depth >= 1:
                    return await self._child_run(batch, item, call_id)
                return await self._llm_call(batch, item, call_id, inline_limit)
            finally:
                self.open_calls -= 1
                self.done_calls += 1

    def _pick_model(self, batch: SubcallBatch, kind: str) -> str | SubcallAnswer:
        allowed = self._req.models.allowed()
        if batch.model is None:
            if kind == "rlm":
                return self._req.models.root_at(self._req.depth + 1)
            return self._req.models.sub_model()
        if batch.model not in allowed:
            return SubcallAnswer(
                error=f"Error: model {batch.model!r} is not configured for this run; "
                f"choose one of {allowed} or omit model="
            )
        return batch.model

    async def _llm_call(
        self, batch: SubcallBatch, item: SubcallItem, call_id: str, inline_limit: int
    ) -> SubcallAnswer:
        model = self._pick_model(batch, "llm")
        if isinstance(model, SubcallAnswer):
            return model
        info = self._models[model]
        max_out = min(info.max_output_tokens, self._req.limits.sub_max_output_tokens or 4096)
        chars = item.text_chars + (item.context.total_chars if item.context else 0)
        if batch.kind == "rlm" and item.context is None:
            # At the depth cap a child falls back to a plain call over the same context.
            item = item.model_copy(update={"context": self._req.context})
            chars += self._req.context.total_chars
        prompt_tokens = estimate_tokens(chars)
        if prompt_tokens + max_out > info.context_window:
            return SubcallAnswer(
                error=f"Error: this prompt is about {prompt_tokens:,} tokens, more than model "
                f"{model!r} takes ({info.context_window:,} tokens with {max_out:,} for the "
                "reply); split it into smaller chunks"
            )
        refusal = self._ledger.reserve(
            call_id,
            worst_case(prompt_tokens, max_out, info.usd_per_input_token, info.usd_per_output_token),
            workflow.now(),
        )
        if refusal is not None:
            return SubcallAnswer(error=f"Budget: {refusal.message}")
        try:
            out: LlmCallOutput = await workflow.execute_activity(
                names.ACTIVITY_LLM_CALL,
                LlmCallInput(
                    workflow_id=workflow.info().workflow_id,
                    call_id=call_id,
                    model=model,
                    prompt=item.text,
                    prompt_ref=item.text_ref,
                    context=item.context,
                    max_tokens=max_out,
                    inline_limit=inline_limit,
                ),
                result_type=LlmCallOutput,
                start_to_close_timeout=timedelta(seconds=self._req.limits.model_call_timeout_s),
                retry_policy=MODEL_CALL_RETRY,
                heartbeat_timeout=MODEL_CALL_HEARTBEAT_TIMEOUT,
            )
        except ActivityError as exc:
            self._ledger.release(call_id)
            raise_if_cancelled(exc)
            return SubcallAnswer(error=f"Error: {error_text(exc)}")
        settle_model_call(
            self._ledger, self._usage, call_id, model, self._req.depth + 1,
            out.prompt_tokens, out.completion_tokens, out.usd,
        )  # fmt: skip
        return SubcallAnswer(text=out.text, text_ref=out.text_ref)

    async def _child_run(self, batch: SubcallBatch, item: SubcallItem, call_id: str) -> SubcallAnswer:
        model = self._pick_model(batch, "rlm")
        if isinstance(model, SubcallAnswer):
            return model
        info = workflow.info()
        depth = self._req.depth + 1
        # Readable and deterministic: parent id, depth, cell, batch and index.
        child_id = f"{info.workflow_id}/d{depth}-{call_id.split('#')[0].replace(':', '-')}"
        # Siblings of one batch share what remains equally (they run in parallel).
        index, count = int(call_id.split("#")[0].rsplit(":", 1)[1]), len(batch.items)
        grant = self._ledger.child_grant(child_id, workflow.now(), share=equal_share(index, count))
        if not hasattr(grant, "max_turns"):
            return SubcallAnswer(error=f"Budget: {grant.message}")  # type: ignore[union-attr]
        models = self._req.models
        if batch.model is not None:
            models = models.model_copy(update={"per_depth": {**models.per_depth, depth: model}})
        request = RunRequest(
            question=item.text or "",
            context=item.context or self._req.context,
            models=models,
            caps=grant,  # type: ignore[arg-type]
            limits=self._req.limits,
            depth=depth,
            parent=ParentLink(
                parent_workflow_id=info.workflow_id, root_workflow_id=self._root_id, call_id=call_id
            ),
        )
        try:
            result: RunResult = await workflow.execute_child_workflow(
                names.WORKFLOW_RLM_RUN,
                request,
                id=child_id,
                result_type=RunResult,
                task_queue=info.task_queue,
                parent_close_policy=workflow.ParentClosePolicy.REQUEST_CANCEL,
            )
        except ChildWorkflowError as exc:
            # It reported nothing: count its whole slice, the most it could spend.
            self._ledger.child_settle(child_id, None)
            raise_if_cancelled(exc)
            self.children.append(
                ChildSummary(workflow_id=child_id, question=request.question[:200], status="failed", spend=Spend())
            )
            return SubcallAnswer(error=f"Error: child run failed: {error_text(exc)}")
        self._ledger.child_settle(child_id, result.spend)
        self._usage.merge(result.usage)
        self.children.append(
            ChildSummary(
                workflow_id=child_id,
                question=request.question[:200],
                status=result.status,
                spend=result.spend,
                children=result.children,
            )
        )
        if result.answer is None and result.answer_ref is None:
            return SubcallAnswer(error=f"Error: child run ended {result.status}: {result.reason}")
        return SubcallAnswer(text=result.answer if result.answer_ref is None else None, text_ref=result.answer_ref)

    def progress(self) -> dict[str, Any]:
        return {"open_subcalls": self.open_calls, "done_subcalls": self.done_calls, "children": len(self.children)}


async def _done(answer: SubcallAnswer) -> SubcallAnswer:
    return answer
