"""Child runs: each `rlm_query` item of a batch becomes a child `RLMRun`
workflow with a slice of this run's budget (workflows/budget.py), and the
tree of runs below this one is summarised for its result.

workflows/subcalls.py admits the item (concurrency, budget checks of the
batch) and calls `ChildRuns.run`; a child's whole run, its own cells,
sub-calls and children included, is one await here.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ChildWorkflowError

with workflow.unsafe.imports_passed_through():
    from pydantic import ValidationError

    from workflows import names
    from workflows.budget import Ledger, Spend, equal_share
    from workflows.request import ModelChoice, ParentLink, RunRequest, validation_errors
    from workflows.result import ChildSummary, RunResult, Usage, bounded_tree
    from workflows.step_common import error_text, raise_if_cancelled
    from workflows.steps import SubcallAnswer, SubcallBatch, SubcallItem
    from workflows.subcall_plan import pick_model
    from workflows.summaries import child_run_summary, run_static_details

# A parent waits for a child at most this long (the parent's cell gives up then).
CHILD_MAX_WAIT = timedelta(hours=6)
# Time a child gets past the tree's deadline to ask for its last answer and report.
CHILD_DEADLINE_GRACE = timedelta(minutes=5)


class ChildRuns:
    """Starts the child runs of one run and keeps the tree they report."""

    def __init__(self, *, request: RunRequest, ledger: Ledger, usage: Usage, root_workflow_id: str) -> None:
        self._req = request
        self._ledger = ledger
        self._usage = usage
        self._root_id = root_workflow_id
        self.children: list[ChildSummary] = []
        """One summary per child run started, in the order they ended."""
        self.runs_below = 0
        """Runs in the tree below this one (`children` is the summary of it)."""

    async def run(self, batch: SubcallBatch, item: SubcallItem, call_id: str, index: int) -> SubcallAnswer:
        """The child's answer, or the error the cell reads in its place."""
        model = pick_model(self._req, batch, "rlm")
        if isinstance(model, SubcallAnswer):
            return model
        info = workflow.info()
        depth = self._req.depth + 1
        # Readable and deterministic: parent id, depth, cell and what it asks.
        child_id = f"{info.workflow_id}/d{depth}-{call_id.replace(':', '-')}"
        # Siblings of one batch share what remains equally (they run in parallel).
        count = len(batch.items)
        grant = self._ledger.child_grant(
            child_id, workflow.now(), share=equal_share(index, count),
            # The batch's children run at once and share this run's concurrency.
            parallel=min(count, self._ledger.caps.max_concurrency),
        )  # fmt: skip
        if not hasattr(grant, "max_turns"):
            return SubcallAnswer(error=f"Budget: {grant.message}")  # type: ignore[union-attr]
        try:
            # A model the batch names is the child's root model at its depth.
            named = model if batch.model is not None else None
            request = self._request(item, grant, named, depth, call_id)  # type: ignore[arg-type]
        except ValidationError as exc:
            # Nothing started: the slice goes back (a run being stopped has no
            # turns left to give; a forged depth has no model to name).
            self._ledger.child_settle(child_id, Spend())
            return SubcallAnswer(error=f"Error: child run not started: {validation_errors(exc)}")
        try:
            result: RunResult = await workflow.execute_child_workflow(
                names.WORKFLOW_RLM_RUN,
                request,
                id=child_id,
                result_type=RunResult,
                task_queue=info.task_queue,
                parent_close_policy=workflow.ParentClosePolicy.REQUEST_CANCEL,
                static_summary=child_run_summary(request.question, depth, index + 1, count),
                static_details=run_static_details(request),
                # Never wait past the tree's deadline (plus time to report).
                execution_timeout=self._wait(grant.deadline),  # type: ignore[union-attr]
            )
        except ChildWorkflowError as exc:
            # It reported nothing: count its whole slice, the most it could spend.
            self._ledger.child_settle(child_id, None)
            raise_if_cancelled(exc)
            self.children.append(
                ChildSummary(workflow_id=child_id, question=request.question[:200], status="failed", spend=Spend())
            )
            self.runs_below += 1
            return SubcallAnswer(error=f"Error: child run failed: {error_text(exc)}")
        self._ledger.child_settle(child_id, result.spend)
        self._usage.merge(result.usage)
        self.children.append(
            ChildSummary(
                workflow_id=child_id,
                question=request.question[:200],
                status=result.status,
                spend=result.spend,
                children=bounded_tree(result.children),
                runs_below=result.runs_below,
            )
        )
        self.runs_below += 1 + result.runs_below
        if result.answer is None and result.answer_ref is None:
            return SubcallAnswer(error=f"Error: child run ended {result.status}: {result.reason}")
        if result.answer_ref is not None:
            return SubcallAnswer(text_ref=result.answer_ref)
        # Too long for this reply: the cell reads it from the child's result.
        return SubcallAnswer(text=result.answer, child_workflow_id=child_id)

    def _request(self, item: SubcallItem, grant: Any, model: str | None, depth: int, call_id: str) -> RunRequest:
        """The child's request, validated as the child will validate it."""
        models = self._req.models
        if model is not None:
            models = ModelChoice.model_validate({**models.model_dump(), "per_depth": {**models.per_depth, depth: model}})
        info = workflow.info()
        return RunRequest(
            question=item.text or "",
            context=item.context or self._req.context,
            models=models,
            caps=grant,
            limits=self._req.limits,
            tools=self._req.tools,
            depth=depth,
            parent=ParentLink(parent_workflow_id=info.workflow_id, root_workflow_id=self._root_id, call_id=call_id),
        )

    def _wait(self, deadline: Any) -> timedelta:
        if deadline is None:
            return CHILD_MAX_WAIT
        left = deadline - workflow.now() + CHILD_DEADLINE_GRACE
        return max(timedelta(seconds=1), min(left, CHILD_MAX_WAIT))
