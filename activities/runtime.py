"""What every activity of a worker shares, built once when the worker starts."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, TypeVar

from temporalio import activity
from temporalio.client import Client
from temporalio.exceptions import ApplicationError

from activities.context_store import ContextStore
from activities.llm import ModelRegistry
from activities.object_store import STORAGE_THREADS, ObjectMissingError, ObjectStore, StorageError
from activities.settings import Settings
from activities._tool_threads import ToolThreads
from activities._tools_registry import ToolRegistry

T = TypeVar("T")


@dataclass
class WorkerRuntime:
    """Connections and caches owned by one worker process."""

    settings: Settings
    """Addresses, bucket and data dir."""
    client: Client
    """The worker's Temporal client: cells send their sub-call updates with it."""
    loop: asyncio.AbstractEventLoop
    """The worker's event loop; threads of sync activities submit coroutines to it."""
    store: ObjectStore
    contexts: ContextStore
    models: ModelRegistry
    context_cache_dir: Path
    """Where contexts are written as files for the sandbox to read."""
    tools: ToolRegistry = field(default_factory=ToolRegistry)
    """Custom tools registered on this worker (`--tools`, RLM_TOOLS)."""
    io_pool: concurrent.futures.ThreadPoolExecutor = field(
        default_factory=lambda: concurrent.futures.ThreadPoolExecutor(STORAGE_THREADS, thread_name_prefix="rlm-io")
    )
    """Threads for blocking object-storage calls of async activities: sized for
    a full batch of parallel sub-calls (asyncio's default pool has cores + 4)."""
    tool_threads: ToolThreads = field(default_factory=ToolThreads)
    """Threads of the sync custom tools, apart from `io_pool` (a hung tool keeps its thread)."""

    async def io(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking storage call off the event loop."""
        return await self.loop.run_in_executor(self.io_pool, fn, *args)

    async def recorded(self, key: str) -> Any | None:
        """The record a previous attempt of this activity left under `key`.

        Only a retry can find one, so a first attempt skips the request.
        """
        if activity.info().attempt == 1:
            return None
        return await self.io(self.get_json, key)

    async def read_before_call(self, key: str) -> Any | None:
        """`get_json(key)` for a model-call activity before it sends its request."""
        return await self.before_call(self.get_json, key)

    async def before_call(self, fn: Callable[..., T], *args: Any) -> T:
        """A storage read of a model-call activity before it sends its
        request. Storage that fails here fails the attempt as not billable:
        nothing was sent, and the workflow charges an attempt's worst case
        unless told so (seen with S3 down: every retry was charged)."""
        try:
            return await self.io(fn, *args)
        except StorageError as exc:
            raise ApplicationError(str(exc), {"billable": False}, type=type(exc).__name__) from exc

    def get_json(self, key: str) -> Any | None:
        try:
            return json.loads(self.store.get_bytes(key))
        except ObjectMissingError:
            return None

    def put_json(self, key: str, value: Any) -> None:
        # backslashreplace: a lone surrogate (only ever inside a string) is
        # written as its JSON escape, so the record reads back the same.
        self.store.put_bytes(key, json.dumps(value, ensure_ascii=False).encode("utf-8", "backslashreplace"))


def run_key(workflow_id: str, *parts: str) -> str:
    """Object key of a run's artifact: `runs/<workflow id>/<parts...>`."""
    return "/".join(["runs", workflow_id.replace("/", "~"), *parts])


# Model calls heartbeat so a worker that dies mid-call is noticed in seconds
# (the heartbeat timeout), not after the whole start-to-close timeout.
MODEL_CALL_HEARTBEAT_S = 2.0


async def heartbeating(awaitable: Awaitable[T]) -> T:
    """Await `awaitable` while heartbeating the current activity."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=MODEL_CALL_HEARTBEAT_S)
            if done:
                return task.result()
            activity.heartbeat()
    except asyncio.CancelledError:
        # The activity was cancelled (its run was): asyncio.wait leaves the
        # awaited task running, so cancel it too, closing the provider request
        # instead of leaving it to run (and bill) for minutes.
        task.cancel()
        raise


def call_timeout_s() -> float:
    """HTTP timeout of a model call: what the activity's own timeout leaves."""
    timeout = activity.info().start_to_close_timeout
    return max(10.0, timeout.total_seconds() - 5.0) if timeout else 120.0
