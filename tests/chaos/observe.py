"""What a chaos test reads from Temporal: every run of a run tree (children
and continue-as-new chains included), the model calls they completed, and
conditions to wait on. Waits poll an observed state, never a fixed time."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from temporalio.api.enums.v1 import EventType, PendingActivityState
from temporalio.client import Client, WorkflowHistory

from activities.object_store import ObjectStore
from activities._call_records import recorded_calls
from activities.settings import Settings
from workflows.names import CALL_GROUP_ACTIVITIES, SUB_CALL_ACTIVITIES

T = TypeVar("T")
POLL_S = 0.1
# Activities that carry model calls (`llm_calls`: a group of several).
MODEL_ACTIVITIES = ("root_turn", *SUB_CALL_ACTIVITIES)
_ENDED = {
    EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED: "completed",
    EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED: "lost",
    EventType.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT: "lost",
    EventType.EVENT_TYPE_ACTIVITY_TASK_CANCELED: "lost",
}


async def wait_until(what: str, probe: Callable[[], Awaitable[T | None]], timeout_s: float = 120.0) -> T:
    """Poll `probe` until it returns a truthy value; TimeoutError names `what`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f} s for {what}")
        await asyncio.sleep(POLL_S)  # the next look at an observed state


async def recorded_sub_calls(settings: Settings, workflow_id: str) -> int:
    """Sub-calls of one run whose reply the engine has recorded in object
    storage (activities/_call_records.py): answered and durable, whether or
    not the activity (a call group) carrying them has completed yet."""
    store = ObjectStore.from_settings(settings)
    return await asyncio.to_thread(recorded_calls, store, workflow_id)


def continued_to(history: WorkflowHistory) -> str | None:
    """The run id this run continued as, or None."""
    last = history.events[-1] if history.events else None
    if last is not None and last.HasField("workflow_execution_continued_as_new_event_attributes"):
        return last.workflow_execution_continued_as_new_event_attributes.new_execution_run_id
    return None


async def chain(client: Client, workflow_id: str, first_run_id: str | None = None) -> list[WorkflowHistory]:
    """Histories of every run of one workflow id, oldest first."""
    if first_run_id is None:
        first_run_id = (await client.get_workflow_handle(workflow_id).describe()).raw_description.workflow_execution_info.first_run_id
    out: list[WorkflowHistory] = []
    run_id: str | None = first_run_id
    while run_id:
        history = await client.get_workflow_handle(workflow_id, run_id=run_id).fetch_history()
        out.append(history)
        run_id = continued_to(history)
    return out


def started_children(history: WorkflowHistory) -> list[tuple[str, str]]:
    """(workflow id, first run id) of each child this run started."""
    return [
        (e.child_workflow_execution_started_event_attributes.workflow_execution.workflow_id,
         e.child_workflow_execution_started_event_attributes.workflow_execution.run_id)
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_STARTED
    ]  # fmt: skip


async def tree(client: Client, root_id: str) -> dict[str, list[WorkflowHistory]]:
    """{workflow id: its chain of histories} for the root and every run below."""
    out: dict[str, list[WorkflowHistory]] = {}
    todo: list[tuple[str, str | None]] = [(root_id, None)]
    while todo:
        workflow_id, run_id = todo.pop()
        if workflow_id in out:
            continue
        out[workflow_id] = await chain(client, workflow_id, run_id)
        todo += [child for history in out[workflow_id] for child in started_children(history)]
    return out


def _model_calls(history: WorkflowHistory, ending: str) -> int:
    """Model calls carried by this run's model-call activities that ended
    `ending` ("completed", or "lost": failed, timed out, cancelled); an
    `llm_calls` activity counts each call of its group."""
    calls: dict[int, int] = {}
    total = 0
    for e in history.events:
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            attrs = e.activity_task_scheduled_event_attributes
            if attrs.activity_type.name in MODEL_ACTIVITIES:
                group = attrs.activity_type.name in CALL_GROUP_ACTIVITIES
                calls[e.event_id] = len(json.loads(attrs.input.payloads[0].data)["calls"]) if group else 1
        elif _ENDED.get(e.event_type) == ending:
            which = e.WhichOneof("attributes")
            total += calls.get(getattr(e, which).scheduled_event_id, 0)
    return total


def completed_model_calls(histories: dict[str, list[WorkflowHistory]]) -> int:
    """Model calls (root turns, sub-calls) whose activity completed in the tree."""
    return sum(_model_calls(h, "completed") for runs in histories.values() for h in runs)


def lost_model_calls(histories: dict[str, list[WorkflowHistory]]) -> int:
    """Model calls whose activity failed, timed out or was cancelled: the
    engine cannot know whether such an attempt reached the provider, so it
    charges it (tests bound the spend with this)."""
    return sum(_model_calls(h, "lost") for runs in histories.values() for h in runs)


def count_events(history: WorkflowHistory, event_type: int) -> int:
    return sum(1 for e in history.events if e.event_type == event_type)


async def pending_started(client: Client, workflow_id: str, activity_type: str) -> bool:
    """Is an activity of `activity_type` of the current run started on a worker now?"""
    desc = await client.get_workflow_handle(workflow_id).describe()
    return any(
        p.activity_type.name == activity_type and p.state == PendingActivityState.PENDING_ACTIVITY_STATE_STARTED
        for p in desc.raw_description.pending_activities
    )


def activity_runs(history: WorkflowHistory, name: str) -> tuple[int, int]:
    """How often a run ran activity `name`: (as activity tasks, as local activities)."""
    tasks = local = 0
    for e in history.events:
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            tasks += e.activity_task_scheduled_event_attributes.activity_type.name == name
        elif e.event_type == EventType.EVENT_TYPE_MARKER_RECORDED:
            marker = e.marker_recorded_event_attributes
            if marker.marker_name == "core_local_activity" and "data" in marker.details:
                local += json.loads(marker.details["data"].payloads[0].data).get("activity_type") == name
    return tasks, local


def history_bytes(history: WorkflowHistory) -> int:
    """Size of a run's history as the server stores it (protobuf bytes)."""
    return sum(e.ByteSize() for e in history.events)
