"""A session's question as the session sees it: the caps its run gets (its
own, money caps bounded by what the session has left) and the result of a
question whose run did not start or did not report. Workflow code."""

from __future__ import annotations

from typing import Any

from temporalio import workflow

from workflows.budget import Caps, Ledger, Refusal, Spend
from workflows.request import REQUEST_CAP_BOUNDS, clip_noting_length
from workflows.result import RunResult, Usage
from workflows.session_models import AskRecord, AskRequest
from workflows.step_common import ERROR_CHARS


def question_caps(ask: AskRequest, defaults: Caps, ledger: Ledger, child_id: str) -> Caps | Refusal:
    """The caps of the run `child_id` answering `ask` (its own over the
    session's `question_caps`), its money caps bounded by what `ledger` has
    left, which it reserves; or why the session cannot grant it a run."""
    mine = ask.caps_over(defaults)
    grant = ledger.child_grant(child_id, workflow.now())
    if isinstance(grant, Refusal):
        return grant
    bounded: dict[str, Any] = {}
    for dim in ("usd", "tokens", "calls"):
        own, left = getattr(mine, f"max_{dim}"), getattr(grant, f"max_{dim}")
        cap = left if own is None else own if left is None else min(own, left)
        # A session's money caps are not bounded as a run's are: a question
        # gets at most what a run may have (more is no limit anyway).
        bound = REQUEST_CAP_BOUNDS[f"max_{dim}"]
        bounded[f"max_{dim}"] = None if cap is None else min(cap, type(cap)(bound))
    return mine.model_copy(update=bounded)


def not_run(workflow_id: str, reason: str, status: str = "budget_exhausted") -> RunResult:
    """The result of a question whose run did not start or did not report."""
    return RunResult(
        answer=None,
        status=status,  # type: ignore[arg-type]
        reason=clip_noting_length(reason, ERROR_CHARS),
        turns=0,
        spend=Spend(),
        usage=Usage(),
        workflow_id=workflow_id,
        run_id="",
        root_workflow_id=workflow.info().workflow_id,
        depth=0,
    )


def ask_id_reused(ask_id: str, done: AskRecord) -> str:
    """Why an ask sent under the id of another question is refused: answering
    it with that question's result would be silently wrong."""
    return (
        f"ask id {ask_id} was used for another question (question {done.number}: {done.question[:80]!r}): "
        "send this one under a new id"
    )
