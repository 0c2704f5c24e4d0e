"""The `run_cell` activity: one ```repl``` block in the WASM REPL.

Synchronous on purpose: it runs on the worker's thread pool (wasm releases the
GIL), so guest CPU time never blocks the worker's event loop. A ticker thread
heartbeats while the cell runs, so a dead worker is noticed in seconds and the
cell is retried elsewhere from the last snapshot.
"""

from __future__ import annotations

import contextvars
import threading
from datetime import timedelta

import structlog
from temporalio import activity
from temporalio.exceptions import ApplicationError, CancelledError

from activities._cell_host import CellHost
from activities._cell_output import CellFinisher
from activities._context_cache import ContextFileCache
from activities._history_host import HistoryHost, history_docs
from activities._tool_host import ToolHost, tool_docs
from activities._live_repl import CheckoutCancelled, GuestMemoryBusy, GuestMemoryTooLarge, LiveRepl
from activities._repl_pool import ReplPool
from activities._snapshot_store import SnapshotFromNewerWorker, SnapshotStore
from activities.runtime import WorkerRuntime
from sandbox_wasm import CellInterrupted, ContextTooLarge, SandboxLimits
from workflows.names import ACTIVITY_RUN_CELL, CONTEXT_TOO_LARGE, REPL_TOO_LARGE
from workflows.request import context_fit_advice
from workflows.steps import CellInput, CellOutput

log = structlog.get_logger(__name__)

HEARTBEAT_EVERY_S = 1.0
# A fresh REPL over a smaller context starts in ~15 ms: made ahead, it saves
# little, and on a worker other than its cell's it is made for nothing
# (bench_many_runs, 4 MB contexts, two workers: ~1 s more CPU per 100 runs).
# Many documents cost more than their bytes (a file each to open): 4 MB in
# 20,000 documents took 0.6-1.2 s (bench_first_cell --docs), ~40 ms a thousand.
PREPARE_MIN_BYTES = 8 * 1024 * 1024
PREPARE_MIN_DOCS = 1000
BUSY_RETRY_DELAY = timedelta(seconds=5)
TOO_LARGE_RETRY_DELAY = timedelta(seconds=1)
# A state only a newer worker can restore (a deploy half done): retried, so
# that one of those takes the cell; never started empty, which would lose it.
SNAPSHOT_FROM_NEWER_WORKER = SnapshotFromNewerWorker.__name__
NEWER_SNAPSHOT_RETRY_DELAY = timedelta(seconds=5)


class RunCellActivity:
    def __init__(self, runtime: WorkerRuntime, pool: ReplPool) -> None:
        self._rt = runtime
        self._pool = pool
        self._snapshots = SnapshotStore(runtime.store)
        self._finisher = CellFinisher(runtime.store, self._snapshots)
        self._files = ContextFileCache(
            runtime.context_cache_dir, runtime.settings.context_cache_max_bytes, runtime.contexts
        )

    @activity.defn(name=ACTIVITY_RUN_CELL)
    def run_cell(self, inp: CellInput) -> CellOutput:
        limits = _limits(inp)
        stop = threading.Event()
        running: list[LiveRepl] = []  # the session to interrupt if the run is cancelled
        cancelled = threading.Event()  # a checkout waiting for memory or its REPL stops waiting
        ticker = threading.Thread(
            target=_heartbeat, args=(contextvars.copy_context(), stop, running, cancelled), daemon=True
        )
        ticker.start()
        try:
            live, warm = self._checkout(inp, limits, cancelled)
            host = CellHost(self._rt, inp.workflow_id, inp.cell_id, inp.context)
            tools = ToolHost(host, self._rt.tools, inp.cell_id, inp.tools)
            live.host.clear()
            live.host.update(host.functions())
            live.host.update(tools.functions())
            live.host.update(HistoryHost(self._rt.store, inp.history_key).functions())
            running.append(live)
            try:
                result = live.session.run_cell(inp.code)
                if host.worker_stopping:
                    # A deploy stopped this worker while the cell waited on sub-calls:
                    # not the code's error. Retried on another worker from the
                    # pre-cell snapshot (its sub-calls are answered from the run's memory).
                    raise ApplicationError(
                        "the worker shut down while the cell waited on sub-calls; it runs again on another worker",
                        type="WorkerShutdown",
                    )
                out, saved = self._finisher.finish(inp.workflow_id, inp.cell_id, live, host, result)
                out.warm = warm
            except BaseException as exc:
                self._pool.discard(live)
                if isinstance(exc, CellInterrupted) and activity.is_cancelled():
                    # Reported as a cancellation, which the run waits for.
                    raise CancelledError("the run was cancelled: the cell was stopped") from None
                if isinstance(exc, ContextTooLarge):  # reloading it after a restart
                    raise _context_too_large(exc, limits) from None
                raise
            if saved:
                self._pool.checkin(inp.workflow_id, live)
            else:  # its state is not the one stored: the next cell restores that one
                self._pool.discard(live)
        finally:
            stop.set()
        log.info(
            "run_cell.done",
            workflow_id=inp.workflow_id,
            cell_id=inp.cell_id,
            warm=warm,
            duration_s=round(result.duration_s, 4),
            subcalls=host.subcalls,
            tool_calls=tools.calls,
            error=result.error,
        )
        return out

    def prepare(self, inp: CellInput) -> None:
        """Make the REPL of the run's next cell (`inp` without its code) in the
        background, while the run's model answers: its boot, context load and
        snapshot restore are then done when the cell comes (ReplPool.prepare)."""
        small = inp.context.total_bytes < PREPARE_MIN_BYTES and inp.context.doc_count < PREPARE_MIN_DOCS
        if inp.snapshot_key is None and small:
            return
        self._pool.prepare(
            inp.workflow_id, inp.snapshot_key, _limits(inp), lambda s: self._start(s, inp, attempt=1), self._tools(inp)
        )

    def _checkout(self, inp: CellInput, limits: SandboxLimits, cancelled: threading.Event) -> tuple[LiveRepl, bool]:
        attempt = activity.info().attempt
        try:
            return self._pool.checkout(
                inp.workflow_id, inp.snapshot_key, limits, lambda s: self._start(s, inp, attempt), self._tools(inp),
                cancelled,
            )  # fmt: skip
        except CheckoutCancelled as exc:
            raise CancelledError(f"the run was cancelled: {exc}") from None
        except GuestMemoryBusy as exc:
            # Busy guests free memory soon (or another worker has room): retried.
            raise ApplicationError(str(exc), type="GuestMemoryBusy", next_retry_delay=BUSY_RETRY_DELAY) from None
        except GuestMemoryTooLarge as exc:
            # This worker's budget: another worker may hold the cap, so retried;
            # a run whose retries all fail ends (workflows/cell.py no_cell_can_run).
            raise ApplicationError(str(exc), type=REPL_TOO_LARGE, next_retry_delay=TOO_LARGE_RETRY_DELAY) from None
        except ContextTooLarge as exc:
            raise _context_too_large(exc, limits) from None
        except SnapshotFromNewerWorker as exc:
            log.warning("run_cell.snapshot_from_newer_worker", workflow_id=inp.workflow_id, error=str(exc))
            raise ApplicationError(str(exc), type=SNAPSHOT_FROM_NEWER_WORKER,
                                   next_retry_delay=NEWER_SNAPSHOT_RETRY_DELAY) from None

    def _tools(self, inp: CellInput) -> dict[str, str]:
        """Host functions besides the standard ones the cell's REPL has stubs for."""
        return tool_docs(self._rt.tools, inp.tools) | history_docs(inp.history_key)

    def _start(self, live: LiveRepl, inp: CellInput, attempt: int) -> None:
        documents, release = self._files.acquire(inp.context)
        live.on_close.append(release)  # the files stay while the session may reload them
        live.session.start()
        live.session.load_context(documents, inp.context.kind)
        if inp.snapshot_key is not None:
            stored = self._snapshots.load(inp.snapshot_key)
            if attempt == 1:
                # A first failure may be this worker's (load, a trap): retried.
                live.session.restore(stored.state, stored.records)
            elif not live.session.restore_or_start_empty(stored.state, stored.records):
                # A state that cannot be restored (its own code fails on load,
                # it needs more memory than the guest has) would fail every
                # retry and every later cell: this cell starts empty, its
                # output saying so, and its snapshot replaces that state.
                live.snapshot_key = None
                return
            live.records = stored.locations
            live.records_stored_in(self._snapshots)
        live.snapshot_key = inp.snapshot_key


def _context_too_large(exc: ContextTooLarge, limits: SandboxLimits) -> ApplicationError:
    """Deterministic for the context and the cap: not retried, and the run ends."""
    advice = context_fit_advice(limits.memory_bytes >> 20)
    return ApplicationError(f"{exc}: {advice}", type=CONTEXT_TOO_LARGE, non_retryable=True)


def _limits(inp: CellInput) -> SandboxLimits:
    return SandboxLimits(cell_timeout_s=inp.timeout_s, memory_bytes=inp.memory_mb * 1024 * 1024, output_chars=inp.output_chars)


def _heartbeat(
    ctx: contextvars.Context, stop: threading.Event, running: list[LiveRepl], cancelled: threading.Event
) -> None:
    """Heartbeat every second; when the server answers that the activity was
    cancelled (its run was), stop a checkout that waits (`cancelled`) and
    trap the guest once there is one: interrupt() cannot be caught by guest
    code, and the cell's thread is free at once."""
    while not stop.wait(HEARTBEAT_EVERY_S):
        try:
            ctx.run(activity.heartbeat)
            is_cancelled = ctx.run(activity.is_cancelled)
        except Exception:  # the activity is ending; nothing to report to
            return
        if is_cancelled:
            cancelled.set()
            if running:
                running[0].session.interrupt("the run was cancelled")
                return
