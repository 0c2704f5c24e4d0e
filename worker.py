"""The durable-rlm worker: the `RLMRun` workflow and every activity.

Run it with `python worker.py` or `rlm worker`; start as many as you like on
as many machines, all polling the same task queue.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import signal
from datetime import timedelta
from pathlib import Path

import structlog
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Worker

from activities._repl_pool import ReplPool
from activities.context_store import ContextStore
from activities.llm import ModelRegistry
from activities.llm_call import LlmCallActivity
from activities.logging import configure_logging
from activities.object_store import ObjectStore
from activities.root_turn import RootTurnActivity
from activities.run_cell import RunCellActivity
from activities.runtime import WorkerRuntime
from activities.settings import Settings, load_settings
from workflows.run import RLMRun

__all__ = ["connect", "build_worker", "run_worker", "main"]

log = structlog.get_logger(__name__)

# Model calls are async; cells run on threads (wasm releases the GIL) and the
# SDK wants a thread for every activity slot (threads start lazily).
MAX_ACTIVITIES = 256


async def connect(settings: Settings) -> Client:
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        data_converter=pydantic_data_converter,
    )


def build_worker(client: Client, settings: Settings, models: ModelRegistry | None = None) -> tuple[Worker, ReplPool]:
    """A worker with the workflow and all activities; the caller runs it."""
    store = ObjectStore.from_settings(settings)
    store.ensure_bucket()
    runtime = WorkerRuntime(
        settings=settings,
        client=client,
        loop=asyncio.get_running_loop(),
        store=store,
        contexts=ContextStore(store),
        models=models or ModelRegistry.from_env(),
        context_cache_dir=Path(settings.data_dir) / "cache" / "contexts",
    )
    pool = ReplPool()
    llm = LlmCallActivity(runtime)
    worker = Worker(
        client,
        task_queue=settings.task_queue,
        workflows=[RLMRun],
        activities=[
            llm.resolve_models,
            llm.llm_call,
            RootTurnActivity(runtime).root_turn,
            RunCellActivity(runtime, pool).run_cell,
        ],
        activity_executor=concurrent.futures.ThreadPoolExecutor(max_workers=MAX_ACTIVITIES),
        max_concurrent_activities=MAX_ACTIVITIES,
        # A restarted worker takes over a run's workflow tasks in ~1 s, not 10 s.
        sticky_queue_schedule_to_start_timeout=timedelta(seconds=1),
        graceful_shutdown_timeout=timedelta(seconds=5),
    )
    return worker, pool


async def run_worker(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Run a worker until `stop` is set (or SIGINT/SIGTERM)."""
    client = await connect(settings)
    worker, pool = build_worker(client, settings)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    log.info("worker.started", task_queue=settings.task_queue, temporal=settings.temporal_address)
    try:
        async with worker:
            await stop.wait()
    finally:
        pool.close()
        log.info("worker.stopped")


def main() -> None:
    configure_logging()
    asyncio.run(run_worker(load_settings()))


if __name__ == "__main__":
    main()
