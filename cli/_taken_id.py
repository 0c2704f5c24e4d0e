"""An id sent again: `rlm run/submit --id X` when a run X exists (and
`rlm session start --id X` while session X is open).

A run's id works as an idempotency key. A script or another service that
sends the same run again (it lost the first reply, its scheduler retried it)
gets the run that holds the id, running or ended, with the result it ended
with, instead of a second paid run; Temporal's default would start a new run
once the first completed. Every run that ends by itself (completed, failed,
cancelled, out of budget) completes its workflow, so it keeps its id; only a
workflow that Temporal saw fail, terminated or timed out may be started again
under its id (`ALLOW_DUPLICATE_FAILED_ONLY`). The same id with another
request is refused, naming what differs. A session's id is taken while the
session is open (a closed one's id may open a new session, as before).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from cli._run_by_id import RunError
from cli._temporal_http import TemporalHttp, workflow_type_name
from cli._workflow_kind import kind_of

__all__ = ["REUSE_POLICY_JSON", "Holder", "check_taken", "differences", "holder_http", "holder_sdk", "status_word", "taken_message"]

# The policy as the HTTP API spells it (the SDK: WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY).
REUSE_POLICY_JSON = "WORKFLOW_ID_REUSE_POLICY_ALLOW_DUPLICATE_FAILED_ONLY"


@dataclass
class Holder:
    """The workflow that holds an id: the request its chain was started with
    (its first run's input: a run that continued as new carries its state in
    later inputs), its status and its type."""

    request: Any
    status: str
    workflow_type: str


def check_taken(workflow_id: str, request: BaseModel, holder: Holder, *, what: str) -> str:
    """`running` or `ended` when `holder` is the same `what` (run, session)
    with the same request; a RunError naming what differs otherwise."""
    kind = kind_of(holder.workflow_type)
    fields = differences(holder.request, request) if kind == what else ["workflow type"]
    if fields:
        raise RunError(taken_message(workflow_id, status_word(holder.status), fields, what=what, holder=kind))
    return status_word(holder.status)


def differences(existing: Any, request: BaseModel) -> list[str]:
    """The request fields in which the run holding the id (`existing`: its
    input as JSON) differs from `request`; [] when it is the same request."""
    try:
        theirs = type(request).model_validate(existing).model_dump(mode="json")
    except ValidationError:
        return ["request"]  # not a run this client would send (another program's)
    ours = request.model_dump(mode="json")
    return sorted(name for name in ours.keys() | theirs.keys() if ours.get(name) != theirs.get(name))


def taken_message(workflow_id: str, status: str, fields: list[str], *, what: str = "run", holder: str | None = None) -> str:
    """Why the id cannot be used: its `holder` (a run, a session; `what` by
    default) differs in `fields`."""
    holder = holder or what
    if holder != what:
        return f"{what} id {workflow_id} is taken by a {holder} ({status}): use another --id"
    hint = f" (`rlm result {workflow_id}` gives that run's answer)" if what == "run" else ""
    return f"{what} id {workflow_id} is taken by a {what} ({status}) that differs in {', '.join(fields)}: use another --id{hint}"


def status_word(raw: str) -> str:
    """`running` or `ended`, from the workflow's status as the HTTP API
    (`WORKFLOW_EXECUTION_STATUS_RUNNING`) or the SDK (`RUNNING`) names it:
    how a run ended is its result's to say (`rlm result`), not Temporal's."""
    return "running" if raw.removeprefix("WORKFLOW_EXECUTION_STATUS_") in ("RUNNING", "CONTINUED_AS_NEW") else "ended"


def holder_http(http: TemporalHttp, workflow_id: str) -> Holder:
    """The holder of `workflow_id`, read over the HTTP API (blocking)."""
    described = http.describe(workflow_id)
    info = described.get("workflowExecutionInfo", {})
    request = http.started_input(workflow_id, run_id=info.get("firstRunId") or None)
    return Holder(request, info.get("status", ""), workflow_type_name(described))


async def holder_sdk(client: Any, workflow_id: str) -> Holder:
    """The holder of `workflow_id`, read through the SDK client."""
    from temporalio.service import RPCError

    try:
        described = await client.get_workflow_handle(workflow_id).describe()
        first = described.raw_description.workflow_execution_info.first_run_id or None
        request = None
        async for event in client.get_workflow_handle(workflow_id, run_id=first).fetch_history_events(page_size=1):
            payloads = event.workflow_execution_started_event_attributes.input.payloads
            request = (await client.data_converter.decode(payloads))[0] if payloads else None
            break
    except RPCError as exc:  # deleted or past retention in between
        raise RunError(f"{workflow_id}: the workflow holding the id cannot be read ({exc})") from None
    status = described.status.name if described.status is not None else ""
    return Holder(request, status, described.workflow_type)
