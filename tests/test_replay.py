"""Replay safety: histories of real runs of every shape (and of a session) (tests/histories/*.json,
written by `python -m tests.histories.record`) replay against today's RLMRun
without a non-determinism error, so a change that would break runs in flight
fails here. No servers: the SDK's Replayer runs the workflow code alone.

A change that must alter workflow logic ships behind `workflow.patched` or
Worker Versioning (README: "Changing workflow code safely")."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from temporalio import workflow
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from tests.chaos.observe import activity_runs
from tests.histories.changed_workflow import RLMRunChangedBehindPatch, RLMRunChangedCarelessly
from workflows.run import RLMRun
from workflows.session import RLMSession

HISTORIES = Path(__file__).resolve().parent / "histories"
FILES = sorted(HISTORIES.glob("*.json"))
# One file at least for each shape record.py knows (a file lost is a shape unguarded).
SHAPES = (
    "plain", "resolved_locally", "batched_subcalls", "whole_batch", "windowed", "in_lanes", "children_", "continue_as_new_", "cancel_", "set_caps", "crash_recovery",
    "tools", "max_errors", "compaction", "session_",
)


def load(path: Path) -> WorkflowHistory:
    record = json.loads(path.read_text())
    return WorkflowHistory.from_json(record["workflow_id"], record["history"])


def replay(history: WorkflowHistory, workflow_class: type = RLMRun) -> None:
    # Session histories (RLMSession) replay against today's session workflow.
    replayer = Replayer(workflows=[workflow_class, RLMSession], data_converter=pydantic_data_converter)
    asyncio.run(replayer.replay_workflow(history))


def test_every_shape_has_a_history():
    stems = [p.stem for p in FILES]
    assert all(any(s.startswith(shape) for s in stems) for shape in SHAPES), stems


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_history_replays_against_current_code(path):
    replay(load(path))


def test_a_changed_workflow_fails_replay():
    with pytest.raises(workflow.NondeterminismError):
        replay(load(HISTORIES / "plain.json"), RLMRunChangedCarelessly)


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_the_same_change_behind_workflow_patched_replays(path):
    replay(load(path), RLMRunChangedBehindPatch)


def test_runs_since_the_resolve_locally_patch_resolve_models_without_an_activity_task():
    # The same run before and after the patch: one activity task fewer (and
    # its workflow task), the lookup recorded as a local activity's marker.
    assert activity_runs(load(HISTORIES / "plain.json"), "resolve_models") == (1, 0)
    assert activity_runs(load(HISTORIES / "resolved_locally.json"), "resolve_models") == (0, 1)


def test_runs_since_the_in_lanes_patch_send_groups_with_lanes_under_their_own_name():
    # Same scenario before and after: an older worker never picks these up.
    assert activity_runs(load(HISTORIES / "windowed.json"), "llm_calls") == (2, 0)
    assert activity_runs(load(HISTORIES / "windowed.json"), "llm_calls_in_lanes") == (0, 0)
    assert activity_runs(load(HISTORIES / "in_lanes.json"), "llm_calls") == (0, 0)
    assert activity_runs(load(HISTORIES / "in_lanes.json"), "llm_calls_in_lanes") == (2, 0)


def test_a_run_started_with_an_unknown_field_before_they_were_refused_replays():
    """Runs in flight when unknown request fields began to be refused had
    such a field dropped; they replay as they ran (workflows/run.py,
    UNKNOWN_FIELDS_PATCH), while a new run with one fails at once
    (tests/test_edge_validation.py)."""
    import base64

    record = json.loads((HISTORIES / "plain.json").read_text())
    started = record["history"]["events"][0]["workflowExecutionStartedEventAttributes"]
    payload = started["input"]["payloads"][0]
    request = json.loads(base64.b64decode(payload["data"]))
    request["max_usd"] = 0.5  # beside `caps` instead of under it: once dropped, now refused
    request.setdefault("limits", {})["cell_timeout"] = 5
    payload["data"] = base64.b64encode(json.dumps(request).encode()).decode()
    replay(WorkflowHistory.from_json(record["workflow_id"], record["history"]))


def test_a_session_ask_accepted_with_an_unknown_field_before_they_were_refused_replays():
    """Asks accepted when unknown fields were still dropped replay as they
    ran: the fields are kept on decode (AskRequest allows them) and refused
    only by the update's validator, which a replay does not run."""
    import base64

    record = json.loads((HISTORIES / "session_1.json").read_text())
    accepted = [
        e["workflowExecutionUpdateAcceptedEventAttributes"]["acceptedRequest"]["input"]["args"]["payloads"][0]
        for e in record["history"]["events"]
        if "workflowExecutionUpdateAcceptedEventAttributes" in e
    ]
    assert accepted, "session_1.json has no accepted ask"
    for payload in accepted:
        ask = json.loads(base64.b64decode(payload["data"]))
        ask["max_usd"] = 0.5  # beside `caps` instead of under it: once dropped, now refused
        payload["data"] = base64.b64encode(json.dumps(ask).encode()).decode()
    replay(WorkflowHistory.from_json(record["workflow_id"], record["history"]))
