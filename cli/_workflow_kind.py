"""What a workflow id names (a run, a session, another workflow), and the
one-line error for a command given the other kind: `rlm result` on a
session waited for it to close, `rlm session show` on a run printed a
traceback, `rlm session close` on a run said "invalid settings"."""

from __future__ import annotations

from workflows.names import WORKFLOW_RLM_RUN, WORKFLOW_RLM_SESSION

__all__ = ["kind_of", "not_a"]

_KINDS = {WORKFLOW_RLM_RUN: "run", WORKFLOW_RLM_SESSION: "session"}
_HINTS = {
    "run": "`rlm result {id}` waits for its answer, `rlm show {id}` shows it",
    "session": "`rlm session show {id}` shows it, `rlm session close {id}` ends it with its summary",
}


def kind_of(workflow_type: str) -> str:
    """`run`, `session`, or the workflow type itself."""
    return _KINDS.get(workflow_type, workflow_type)


def not_a(workflow_id: str, workflow_type: str, wanted: str) -> str | None:
    """None when `workflow_type` is the `wanted` kind, else why the command does not apply."""
    kind = kind_of(workflow_type)
    if kind == wanted:
        return None
    if kind not in _HINTS:
        return f"{workflow_id} is a {workflow_type or 'different'} workflow, not a {wanted}"
    return f"{workflow_id} is a {kind}, not a {wanted}: " + _HINTS[kind].format(id=workflow_id)
