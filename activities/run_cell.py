"""The `run_cell` activity: one ```repl``` block in the WASM REPL.

Synchronous on purpose: it runs on the worker's thread pool (wasm releases the
GIL), so guest CPU time never blocks the worker's event loop. A ticker thread
heartbeats while the cell runs, so a dead worker is noticed in seconds and the
cell is retried elsewhere from the last snapshot.
"""

from __future__ import annotations

import contextvars
import threading
import time
from datetime import timedelta

import structlog
from temporalio import activity
from temporalio.exceptions import ApplicationError, CancelledError

from activities._cell_host import CellHost, valid_text
from activities._context_cache import ContextFileCache
from activities._history_host import HistoryHost, history_docs
from activities._tool_host import ToolHost, tool_docs
from activities._repl_pool import GuestMemoryBusy, GuestMemoryTooLarge, LiveRepl, ReplPool
from activities._snapshot_store import SnapshotStore
from activities.runtime import WorkerRuntime, run_key
from sandbox_wasm import CellInterrupted, CellResult, SandboxLimits
from sandbox_wasm.session import SnapshotError
from workflows.names import ACTIVITY_RUN_CELL
from workflows.steps import CellInput, CellOutput

log = structlog.get_logger(__name__)

HEARTBEAT_EVERY_S = 1.0
FINAL_INLINE_CHARS = 64 * 1024
BUSY_RETRY_DELAY = timedelta(seconds=5)


class RunCellActivity:
    def __init__(self, runtime: WorkerRuntime, pool: ReplPool) -> None:
        self._rt = runtime
        self._pool = pool
        self._snapshots = SnapshotStore(runtime.store)
        self._files = ContextFileCache(
            runtime.context_cache_dir, runtime.settings.context_cache_max_bytes, runtime.contexts
        )

    @activity.defn(name=ACTIVITY_RUN_CELL)
    def run_cell(self, inp: CellInput) -> CellOutput:
        limits = SandboxLimits(
            cell_timeout_s=inp.timeout_s,
            memory_bytes=inp.memory_mb * 1024 * 1024,
            output_chars=inp.output_chars,
        )
        stop = threading.Event()
        running: list[LiveRepl] = []  # the session to interrupt if the run is cancelled
        ticker = threading.Thread(
            target=_heartbeat, args=(contextvars.copy_context(), stop, running), daemon=True
        )
        ticker.start()
        try:
            live, warm = self._checkout(inp, limits)
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
                out, saved = self._finish(inp, live, host, result)
            except BaseException as exc:
                self._pool.discard(live)
                if isinstance(exc, CellInterrupted) and activity.is_cancelled():
                    # Reported as a cancellation, which the run waits for.
                    raise CancelledError("the run was cancelled: the cell was stopped") from None
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

    def _checkout(self, inp: CellInput, limits: SandboxLimits) -> tuple[LiveRepl, bool]:
        try:
            return self._pool.checkout(
                inp.workflow_id, inp.snapshot_key, limits, lambda s: self._start(s, inp),
                tools=tool_docs(self._rt.tools, inp.tools) | history_docs(inp.history_key),
            )  # fmt: skip
        except GuestMemoryBusy as exc:
            # Busy guests free memory soon (or another worker has room): retried.
            raise ApplicationError(str(exc), type="GuestMemoryBusy", next_retry_delay=BUSY_RETRY_DELAY) from None
        except GuestMemoryTooLarge as exc:
            raise ApplicationError(str(exc), type="GuestMemoryTooLarge", non_retryable=True) from None

    def _start(self, live: LiveRepl, inp: CellInput) -> None:
        paths, release = self._files.acquire(inp.context)
        live.on_close.append(release)  # the files stay while the session may reload them
        live.session.start()
        live.session.load_context(paths, inp.context.kind)
        if inp.snapshot_key is not None:
            stored = self._snapshots.load(inp.snapshot_key)
            live.session.restore(stored.state, stored.records)
            live.records = stored.locations
        live.snapshot_key = inp.snapshot_key

    def _finish(self, inp: CellInput, live: LiveRepl, host: CellHost, result: CellResult) -> tuple[CellOutput, bool]:
        """The cell's output, and whether its state was saved."""
        began = time.perf_counter()
        try:
            snapshot = live.session.snapshot()
        except SnapshotError as exc:
            # The cell's own objects (a __reduce__ that loops or fails, a state
            # too large to send): the model's error to fix, not the worker's,
            # so not a failure to retry. The run keeps the state before the cell.
            return self._unsaved(inp, live, host, result, str(exc)), False
        if snapshot.unchanged and live.snapshot_key is not None:
            # The cell changed no variable: the state is still the one this
            # session was restored from or saved last, already stored.
            snapshot_key = live.snapshot_key
        else:
            snapshot_key = run_key(inp.workflow_id, "snapshots", f"{inp.cell_id}.bin")
            live.records = self._snapshots.save(snapshot_key, snapshot, live.records)
        live.snapshot_key = snapshot_key
        log.debug(
            "run_cell.snapshot",
            cell_id=inp.cell_id,
            seconds=round(time.perf_counter() - began, 4),
            unchanged=snapshot.unchanged,
            state_bytes=len(snapshot.data),
            new_record_bytes=sum(len(v) for v in snapshot.new_records.values()),
        )
        out = self._output(inp, host, result)
        if snapshot.unsaved:
            out.output += (
                "\n[note: these variables cannot be saved and will be lost if the REPL restarts: "
                + ", ".join(snapshot.unsaved)
                + "]"
            )
        out.snapshot_key, out.unsaved = snapshot_key, list(snapshot.unsaved)
        return _for_workflow(out), True

    def _unsaved(self, inp: CellInput, live: LiveRepl, host: CellHost, result: CellResult, reason: str) -> CellOutput:
        log.info("run_cell.snapshot_failed", workflow_id=inp.workflow_id, cell_id=inp.cell_id, reason=reason[:500])
        out = self._output(inp, host, result)
        message = (
            f"SnapshotError: the REPL state could not be saved: {reason}; the variables are back "
            "to what they were before this cell. Keep objects that loop, call host functions or "
            "take long when pickled (e.g. in __reduce__) out of the REPL's variables."
        )
        out.error = f"{out.error}\n\n{message}" if out.error else message
        out.snapshot_key = live.snapshot_key
        return _for_workflow(out)

    def _output(self, inp: CellInput, host: CellHost, result: CellResult) -> CellOutput:
        output_key = None
        if len(result.full_output) > len(result.output):
            output_key = run_key(inp.workflow_id, "outputs", f"{inp.cell_id}.txt")
            self._rt.store.put_bytes(output_key, valid_text(result.full_output).encode())
        final, final_ref = host.final, None
        if final is not None and len(final) > FINAL_INLINE_CHARS:
            final_ref = self._rt.store.put_blob(final.encode())  # valid already (CellHost.final_answer)
            final = final[:FINAL_INLINE_CHARS]
        error = result.error
        if result.traceback and error:
            error = result.traceback.strip()[-4000:]
        return CellOutput(
            output=result.output,
            output_key=output_key,
            error=error,
            limit=result.limit.message if result.limit else None,
            restored_names=list(result.restored_names),
            final=final,
            final_ref=final_ref,
            duration_s=result.duration_s,
            subcalls=host.subcalls,
        )


def _for_workflow(out: CellOutput) -> CellOutput:
    """Every text of the output as valid UTF-8: the one place all the texts
    the cell made (output, error, final answer, variable names) pass on
    their way to the workflow, whose data converter cannot encode a lone
    surrogate (the activity would fail, and fail again when retried)."""
    update: dict[str, object] = {}
    for name, value in out:
        if isinstance(value, str):
            update[name] = valid_text(value)
        elif isinstance(value, list):
            update[name] = [valid_text(v) if isinstance(v, str) else v for v in value]
    return out.model_copy(update=update)


def _heartbeat(ctx: contextvars.Context, stop: threading.Event, running: list[LiveRepl]) -> None:
    """Heartbeat every second; when the server answers that the activity was
    cancelled (its run was), trap the guest: interrupt() cannot be caught by
    guest code, and the cell's thread is free at once."""
    while not stop.wait(HEARTBEAT_EVERY_S):
        try:
            ctx.run(activity.heartbeat)
            cancelled = ctx.run(activity.is_cancelled)
        except Exception:  # the activity is ending; nothing to report to
            return
        if cancelled and running:
            running[0].session.interrupt("the run was cancelled")
            return
