"""The one way every process (worker, CLI, tests) connects to Temporal, and
sends a run an update the server may refuse for now.

Kept apart from worker.py so client commands connect without importing the
worker's activities (litellm alone costs seconds of CPU to import).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.service import GrpcCompression, RPCError, RPCStatusCode

from activities.settings import Settings

__all__ = ["connect", "refused_for_now", "until_admitted"]

# Waits between sends of an update the server refused for now (until_admitted).
ADMIT_RETRY_FIRST_S, ADMIT_RETRY_MAX_S = 0.5, 5.0


async def connect(settings: Settings) -> Client:
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        data_converter=pydantic_data_converter,
        grpc_compression=GrpcCompression.GZIP if settings.temporal_gzip else GrpcCompression.NONE,
    )


async def until_admitted(send: Callable[[], Awaitable[Any]], give_up_after_s: float | None = None) -> Any:
    """`send()` again while the server refuses it for now (`refused_for_now`). The
    server admits a run's updates only up to a payload size until its
    workflow task accepts them (`history.maxInFlightUpdatePayloads`, 2 MiB
    here: more in one task passed gRPC's 4 MB and got the workflow
    terminated), and the client's own retries give up after ~10 s, e.g.
    behind a slow task. A refusal does not prove the update was not taken
    (see `refused_for_now`): it is sent again under the same update id, so
    that it is never run twice. Ends when its caller cancels it (a cell's
    `_result` does when the cell ends) or `give_up_after_s` has passed
    (the last refusal is raised then)."""
    delay = ADMIT_RETRY_FIRST_S
    loop = asyncio.get_running_loop()
    deadline = None if give_up_after_s is None else loop.time() + give_up_after_s
    while True:
        try:
            return await send()
        except RPCError as exc:
            if not refused_for_now(exc) or (deadline is not None and loop.time() >= deadline):
                raise
        await asyncio.sleep(delay)
        delay = min(delay * 2, ADMIT_RETRY_MAX_S)


def refused_for_now(exc: RPCError) -> bool:
    """An update the run has not taken as far as this reply knows, which it
    may take if sent again: RESOURCE_EXHAUSTED (past its in-flight update
    payload limit; or the run continuing as new), or UNAVAILABLE "workflow
    update was aborted" (the server dropped the run's pending updates, as it
    does whenever a request on the run fails, e.g. another update's
    RESOURCE_EXHAUSTED). Either may be the last reply to an update already
    handed to the worker in a workflow task: the task's acceptance revives
    it, and it runs (a burst of session asks: tests/test_session_hostile.py).
    So send it again under the same update id only, never under a new one."""
    return exc.status == RPCStatusCode.RESOURCE_EXHAUSTED or "update was aborted" in exc.message
