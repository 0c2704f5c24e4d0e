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

from typing import Any

from pydantic import BaseModel, ValidationError

from cli._workflow_kind import kind_of

__all__ = ["ALREADY_EXISTS", "REUSE_POLICY_JSON", "differences", "holder_sdk", "status_word", "taken_message"]

# The policy as the HTTP API spells it (the SDK: WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY).
REUSE_POLICY_JSON = "WORKFLOW_ID_REUSE_POLICY_ALLOW_DUPLICATE_FAILED_ONLY"
# gRPC ALREADY_EXISTS: a run with the id runs, or completed under this policy.
ALREADY_EXISTS = 6


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


async def holder_sdk(client: Any, workflow_id: str) -> tuple[Any, str, str]:
    """(first input as JSON, status name, workflow type) of the latest run of
    `workflow_id`, read through the SDK client."""
    handle = client.get_workflow_handle(workflow_id)
    described = await handle.describe()
    name = described.status.name if described.status is not None else ""
    async for event in handle.fetch_history_events():
        payloads = event.workflow_execution_started_event_attributes.input.payloads
        return ((await client.data_converter.decode(payloads))[0] if payloads else None), name, described.workflow_type
    return None, name, described.workflow_type
