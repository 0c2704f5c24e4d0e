"""The durable-rlm worker: the `RLMRun` and `RLMSession` workflows and every activity.

Run it with `python worker.py` or `rlm worker`; start as many as you like on
as many machines, all polling the same task queue. `rlm up` runs one as an
embedded service (`python -m worker --ready-file F --identity D`, see
cli/_worker_service.py).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import gc
import json
import os
import signal
import socket
import sys
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import structlog
from temporalio.client import Client
from temporalio.worker import Interceptor, UnsandboxedWorkflowRunner, Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

from activities._litellm_setup import preload as preload_litellm
from activities._machine_memory import guest_memory_budget, keep_freed_memory
from activities._repl_pool import ReplPool
from activities._tools_registry import ToolRegistrationError, ToolRegistry
from activities.compaction import CompactionActivity
from activities.context_store import ContextStore
from activities.ingest_context import IngestContextActivity
from activities.llm import ModelRegistry, price_unmapped_models
from activities.llm_call import LlmCallActivity
from activities.logging import configure_logging
from activities.object_store import WORKER_BLOB_CACHE_BYTES, ObjectStore
from activities.root_turn import RootTurnActivity
from activities.run_cell import RunCellActivity
from activities.runtime import WorkerRuntime
from activities.settings import Settings, load_settings
from activities.temporal_client import connect
from activities.tool_call import ToolCallActivity
from sandbox_wasm import SandboxUnavailable, check_guest_memory, check_runtime_file
from workflows.request import RunLimits
from workflows.run import RLMRun
from workflows.session import RLMSession

__all__ = ["connect", "build_worker", "run_worker", "main"]

log = structlog.get_logger(__name__)

# Model calls are async; cells run on threads (wasm releases the GIL) and the
# SDK wants a thread for every activity slot (threads start lazily).
MAX_ACTIVITIES = 256
HEARTBEAT_THROTTLE = timedelta(seconds=2)
# New objects before a young garbage collection (Python's default: 700); prepare_garbage_collector.
GC_YOUNG_OBJECTS = 10_000


def build_worker(
    client: Client,
    settings: Settings,
    models: ModelRegistry | None = None,
    *,
    identity: str | None = None,
    tools: ToolRegistry | None = None,
    interceptors: Sequence[Interceptor] = (),
) -> tuple[Worker, ReplPool]:
    """A worker with the workflow and all activities; the caller runs it.
    `identity` (a code digest) is shown in Temporal's poller list; `tools`
    default to the setting `tools` (a bad tool raises ToolRegistrationError);
    `interceptors` wrap its workflows and activities (tracing, metrics)."""
    # Before polling: a first model call must not block the event loop on the import.
    preload_litellm()
    models = models or ModelRegistry.from_env()
    price_unmapped_models(models)  # litellm's price map changes here, not while calls read it
    store = ObjectStore.from_settings(settings, blob_cache_bytes=WORKER_BLOB_CACHE_BYTES)
    store.ensure_bucket()
    runtime = WorkerRuntime(
        settings=settings,
        client=client,
        loop=asyncio.get_running_loop(),
        store=store,
        contexts=ContextStore(store),
        models=models,
        tools=tools if tools is not None else ToolRegistry.from_setting(settings.tools),
        context_cache_dir=settings.context_cache_dir,
    )
    pool = ReplPool(memory_budget=guest_memory_budget(settings.guest_memory_share))
    llm = LlmCallActivity(runtime)
    tool_calls = ToolCallActivity(runtime)
    cells = RunCellActivity(runtime, pool)
    worker = Worker(
        client,
        task_queue=settings.task_queue,
        workflows=[RLMRun, RLMSession],
        activities=[
            llm.resolve_models,
            llm.llm_call,
            llm.llm_calls,
            llm.llm_calls_in_lanes,
            IngestContextActivity(runtime).ingest_context,
            RootTurnActivity(runtime, prepare_repl=cells.prepare).root_turn,
            cells.run_cell,
            tool_calls.resolve_tools,
            tool_calls.tool_call,
            CompactionActivity(runtime).compact_transcript,
        ],
        # Outside Temporal's sandbox unless asked (settings.workflow_sandbox):
        # it re-imports workflows/run.py for each run and enters workflow code
        # through `exec` at every activation and payload; without it 100 runs
        # at once took 13.9 s instead of 19.9 s (bench_many_runs). It checked
        # run.py and session.py only (the rest is passed through);
        # tests/test_workflow_determinism.py reads all of workflows/.
        workflow_runner=SandboxedWorkflowRunner() if settings.workflow_sandbox else UnsandboxedWorkflowRunner(),
        activity_executor=concurrent.futures.ThreadPoolExecutor(max_workers=MAX_ACTIVITIES),
        max_concurrent_activities=MAX_ACTIVITIES,
        # A restarted worker takes over a run's workflow tasks in ~1 s, not 10 s.
        sticky_queue_schedule_to_start_timeout=timedelta(seconds=1),
        # A run's cancel reaches its cells and model calls in the answer to
        # a heartbeat. Sent at most every 8 s (0.8 x their 10 s timeout), it
        # took up to 8 s to stop a cell or close a provider request (billed
        # meanwhile). Every 2 s: each heartbeat is a write on the server, and
        # a worker may run 256 steps at once.
        max_heartbeat_throttle_interval=HEARTBEAT_THROTTLE,
        graceful_shutdown_timeout=timedelta(seconds=5),
        interceptors=interceptors,
        **({"identity": f"{os.getpid()}@{socket.gethostname()} code {identity}"} if identity else {}),
    )
    return worker, pool


def prepare_garbage_collector() -> None:
    """Keep what the worker built before polling (litellm's modules and price
    map, temporalio, pydantic schemas: ~400k objects that never become
    garbage) out of the garbage collector's full collections.

    Each full collection walked them all, holding the GIL for up to 200 ms
    with every model call's reply waiting behind it (bench fan-out, 1,000
    calls: 9 full collections, 1.1 s). Frozen: 5, 65 ms in all; fan-out
    10.0-10.4 s -> 9.4-10.1 s. Garbage from the build is collected first.

    Then young collections wait for GC_YOUNG_OBJECTS new objects instead of
    700: with 100 runs at once a worker spent 1.7-1.9 s in the collector
    (~750 young, ~70 middle and 6 full collections of ~150 ms each), 0.5-0.7 s
    after (25-50 young ones of ~10 ms, no full one); the 100 runs took
    11.5-14.7 s against 13.9-15.4 s, interleaved (bench/README.md)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_OBJECTS, *gc.get_threshold()[1:])


async def run_worker(
    settings: Settings,
    stop: asyncio.Event | None = None,
    *,
    ready_file: Path | None = None,
    identity: str | None = None,
) -> None:
    """Run a worker until `stop` is set (or SIGINT/SIGTERM). Once it polls,
    write `ready_file` ({"pid": ...}) so a launcher knows it is serving.
    Raises SandboxUnavailable when no cell could run here (checked before
    connecting, and by the REPL booted at start: then it stops polling)."""
    check_runtime_file()  # a worker that can run no cell must not take any
    check_guest_memory()  # before polling: found by the REPL booted below, it came after the ready file
    keep_freed_memory()  # large prompts and replies are copied several times: no page faults each time
    client = await connect(settings)
    models = ModelRegistry.from_env()
    worker, pool = build_worker(client, settings, models, identity=identity)
    prepare_garbage_collector()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    unavailable: list[SandboxUnavailable] = []

    def stop_unavailable(exc: SandboxUnavailable) -> None:
        # No cell could run here: stop polling rather than fail every cell
        # given to us (each a paid root turn of its run) while other workers could run them.
        log.error(
            "worker.sandbox_unavailable",
            error=str(exc),
            hint="the worker stops: fix the sandbox runtime (reinstall the project) or the limits that keep "
            "wasmtime from reserving guest memory (ulimit -v), then start it again",
        )
        unavailable.append(exc)
        loop.call_soon_threadsafe(stop.set)

    pool.warm_up(stop_unavailable)  # in the background: polling starts meanwhile
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    log.info(
        "worker.started",
        task_queue=settings.task_queue,
        temporal=settings.temporal_address,
        temporal_gzip=settings.temporal_gzip,  # temporal_grpc_compression, "auto" resolved
        frozen_objects=gc.get_freeze_count(),
        gc_threshold=gc.get_threshold(),
        # How each configured model's calls go out (ModelSpec.client, "auto" resolved).
        models={spec.name: "direct" if spec.sends_direct else "litellm" for spec in models.specs},
    )
    budget_mib, default_cap_mib = pool.memory_budget >> 20, RunLimits().cell_memory_mb
    if budget_mib < default_cap_mib:
        # Told at start, not only by the first run that fails on it.
        log.warning(
            "worker.guest_memory_below_default_repl_cap",
            budget_mib=budget_mib,
            default_cap_mib=default_cap_mib,
            hint="no cell of a run with the default limits.cell_memory_mb can run on this worker (a run "
            "whose cell finds no other worker ends): raise RLM_GUEST_MEMORY_SHARE, give the worker "
            "more memory, or send a smaller cap",
        )
    sweeper = asyncio.create_task(_evict_idle_repls(pool, settings.repl_idle_s))
    try:
        async with worker:
            while not worker.is_running:  # connected and the namespace checked
                await asyncio.sleep(0.01)
            if ready_file is not None:
                _write_ready(ready_file)
            await stop.wait()
    finally:
        sweeper.cancel()
        pool.close()
        if ready_file is not None:
            _remove_ready(ready_file)
        log.info("worker.stopped")
    if unavailable:
        raise unavailable[0]


async def _evict_idle_repls(pool: ReplPool, max_idle_s: float) -> None:
    """Close REPLs idle past `max_idle_s`: an idle session holds no guest memory."""
    while True:
        await asyncio.sleep(min(60.0, max_idle_s / 4))
        try:
            await asyncio.to_thread(pool.evict_idle, max_idle_s)
        except Exception:  # never let the sweeper die with the worker running
            log.exception("worker.evict_idle_failed")


def _write_ready(path: Path) -> None:
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"pid": os.getpid()}))
    os.replace(tmp, path)


def _remove_ready(path: Path) -> None:
    """Remove the readiness file if it is still ours (a successor may own it)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="worker", description="durable-rlm worker (settings from RLM_* variables)")
    parser.add_argument("--ready-file", type=Path, default=None, help="write {\"pid\": ...} here once polling")
    parser.add_argument("--identity", default=None, help="code and settings digest, shown in the poller list")
    parser.add_argument(
        "--tools", default=None, metavar="package.module:NAME[,...]",
        help="custom tools cells may call (a list or dict of functions); overrides RLM_TOOLS",
    )  # fmt: skip
    args = parser.parse_args(argv)
    configure_logging()
    settings = load_settings(**({"tools": args.tools} if args.tools else {}))
    try:
        ToolRegistry.from_setting(settings.tools)  # refuse a bad tool before connecting
    except ToolRegistrationError as exc:
        parser.exit(2, f"worker: {exc}\n")
    try:
        asyncio.run(run_worker(settings, ready_file=args.ready_file, identity=args.identity))
    except SandboxUnavailable as exc:
        sys.stderr.write(f"worker: no sandbox can start here: {exc}\n")
        sys.stderr.flush()
        # Not sys.exit: past a started Temporal runtime, the interpreter's
        # finalization can abort (SIGABRT) and hide this exit code.
        os._exit(3)


if __name__ == "__main__":
    main()
