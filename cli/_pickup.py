"""Say what to start when no worker picks up a run.

A run whose workflow task stays scheduled (not started) has no worker: none
polls its task queue, or the one that did is gone. The signal comes from the
run itself (`describe`: its pending workflow task), never from the task
queue's poller list, which keeps a gone worker for about a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import TYPE_CHECKING

from activities.settings import Settings

if TYPE_CHECKING:  # the SDK only for the caller that uses it: `rlm result` may read over HTTP
    from temporalio.client import WorkflowHandle

__all__ = ["no_worker_message", "sdk_waiting_task", "watch_pickup"]

_POLL_S = 0.5


def no_worker_message(settings: Settings, workflow_id: str, waited_s: float, *, embedded: bool) -> str:
    """What the user sees, naming what to start for this kind of setup."""
    head = f"no worker has picked up run {workflow_id} for {waited_s:.0f} s"
    if embedded and settings.embedded_worker:
        from cli._worker_service import WorkerFiles

        return (
            f"{head}: the embedded worker for task queue {settings.task_queue} is not serving it; "
            f"run `rlm up` (it restarts the worker) and see {WorkerFiles(settings).log_file}"
        )
    return (
        f"{head}: start one with `rlm worker` (task queue {settings.task_queue}, namespace "
        f"{settings.temporal_namespace}, Temporal at {settings.temporal_address}); the run goes on once one polls"
    )


async def sdk_waiting_task(handle: WorkflowHandle) -> tuple[int, int] | None:
    """The run's workflow task that no worker has started, as a key, else None."""
    from temporalio.api.enums.v1 import PendingWorkflowTaskState

    raw = (await handle.describe()).raw_description
    if not raw.HasField("pending_workflow_task"):
        return None
    task = raw.pending_workflow_task
    if task.state != PendingWorkflowTaskState.PENDING_WORKFLOW_TASK_STATE_SCHEDULED:
        return None
    return task.scheduled_time.seconds * 1_000_000_000 + task.scheduled_time.nanos, task.attempt


async def watch_pickup(
    waiting_task: Callable[[], Awaitable[Hashable | None]], after_s: float, say: Callable[[float], None]
) -> None:
    """Call `say(waited_s)` once for every workflow task left unstarted for
    `after_s` seconds (as this client observed it); runs until cancelled.
    `waiting_task()` names the run's unstarted workflow task, else None."""
    seen: dict[Hashable, float] = {}
    told: set[Hashable] = set()
    while True:
        key = None
        with contextlib.suppress(Exception):  # a transient RPC error must not end the run's command
            key = await waiting_task()
        now = time.monotonic()
        if key is not None:
            first = seen.setdefault(key, now)
            if now - first >= after_s and key not in told:
                told.add(key)
                say(now - first)
        await asyncio.sleep(_POLL_S)
