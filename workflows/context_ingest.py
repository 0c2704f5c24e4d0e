"""The first step of a run (or a session) not given a ContextRef: store its
context (JSON text, texts or an S3 URI) in the chunked store; and how such a
step's failure reads to the caller."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, FailureError

with workflow.unsafe.imports_passed_through():
    from workflows import names
    from workflows.refs import ContextRef, ContextURI
    from workflows.step_common import error_text
    from workflows.steps import IngestContextInput


def failure_message(exc: FailureError) -> str:
    """Why a step failed, as its activity said it (the message names the
    field: `context.uri: ...`). A local activity's failure arrives as itself
    (an ApplicationError, a timeout), an activity's wrapped in an ActivityError."""
    cause = exc.cause if isinstance(exc, ActivityError) else exc
    return cause.message if isinstance(cause, ApplicationError) else error_text(exc)


async def ingest_context(context: Any, on_unreadable: str = "fail") -> ContextRef:
    """Store a context given as JSON (text, texts, S3 URI) in the chunked
    store: the first step of a run (and of a session) not given a ContextRef."""
    workflow_id = workflow.info().workflow_id
    if isinstance(context, ContextURI):
        inp = IngestContextInput(workflow_id=workflow_id, uri=context, on_unreadable=on_unreadable)
        what = context.uri
    elif isinstance(context, str):
        inp, what = IngestContextInput(workflow_id=workflow_id, text=context), "inline text"
    else:
        inp, what = IngestContextInput(workflow_id=workflow_id, texts=list(context)), "inline texts"
    return await workflow.execute_activity(
        names.ACTIVITY_INGEST_CONTEXT,
        inp,
        result_type=ContextRef,
        summary=f"ingest context · {what}"[:200],
        start_to_close_timeout=timedelta(hours=1),
        heartbeat_timeout=timedelta(seconds=30),
        # The activity marks a caller's mistake non-retryable; an S3 hiccup is retried.
        retry_policy=RetryPolicy(maximum_attempts=3),
    )
