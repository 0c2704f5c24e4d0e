"""What a finished cell hands back to its run: the REPL state saved (or the
reason it could not be), long output and a long final answer stored, every
text made valid for the workflow."""

from __future__ import annotations

import time
from typing import Protocol

import structlog

from activities._cell_host import CellHost, valid_text
from activities._live_repl import LiveRepl
from activities._snapshot_store import SnapshotSaver
from activities.runtime import run_key
from sandbox_wasm import CellResult, Snapshot
from sandbox_wasm.session import SnapshotError
from workflows.refs import BlobRef
from workflows.steps import CellOutput

log = structlog.get_logger(__name__)

FINAL_INLINE_CHARS = 64 * 1024
"""A final answer longer than this goes to the object store; the output keeps its start."""


class OutputStore(Protocol):
    """The object store calls a cell's output needs."""

    def put_bytes(self, key: str, data: bytes) -> None: ...
    def put_blob(self, data: bytes) -> BlobRef: ...


class CellFinisher:
    """Turns a cell's result into its `CellOutput` after saving the REPL state."""

    def __init__(self, store: OutputStore, snapshots: SnapshotSaver) -> None:
        self._store = store
        self._snapshots = snapshots

    def finish(
        self, workflow_id: str, cell_id: str, live: LiveRepl, host: CellHost, result: CellResult
    ) -> tuple[CellOutput, bool]:
        """The cell's output, and whether its state was saved."""
        began = time.perf_counter()
        try:
            snapshot = live.session.snapshot()
        except SnapshotError as exc:
            # The cell's own objects (a __reduce__ that loops or fails, a state
            # too large to send): the model's error to fix, not the worker's,
            # so not a failure to retry. The run keeps the state before the cell.
            return self._unsaved(workflow_id, cell_id, live, host, result, str(exc)), False
        if snapshot.unchanged and live.snapshot_key is not None:
            # The cell changed no variable: the state is still the one this
            # session was restored from or saved last, already stored.
            snapshot_key = live.snapshot_key
        else:
            snapshot_key = run_key(workflow_id, "snapshots", f"{cell_id}.bin")
            live.records = self._snapshots.save(snapshot_key, snapshot, live.records)
        # Stored: the session need not hold its own copy of the large values.
        live.records_stored_in(self._snapshots)
        live.snapshot_key = snapshot_key
        log.debug(
            "run_cell.snapshot",
            cell_id=cell_id,
            seconds=round(time.perf_counter() - began, 4),
            unchanged=snapshot.unchanged,
            state_bytes=len(snapshot.data),
            new_record_bytes=sum(len(v) for v in snapshot.new_records.values()),
        )
        out = self._output(workflow_id, cell_id, host, result)
        if snapshot.unsaved:
            reasons = snapshot.unsaved_reasons or {}
            named = (f"{name} ({reason[:200]})" if (reason := str(reasons.get(name) or "")) else name
                     for name in snapshot.unsaved)
            out.output += (
                "\n[note: these variables cannot be saved and will be lost if the REPL restarts: "
                + "; ".join(named)
                + "]"
            )
        out.snapshot_key, out.unsaved = snapshot_key, list(snapshot.unsaved)
        return _for_workflow(out), True

    def _unsaved(
        self, workflow_id: str, cell_id: str, live: LiveRepl, host: CellHost, result: CellResult, reason: str
    ) -> CellOutput:
        log.info("run_cell.snapshot_failed", workflow_id=workflow_id, cell_id=cell_id, reason=reason[:500])
        out = self._output(workflow_id, cell_id, host, result)
        message = (
            f"SnapshotError: the REPL state could not be saved: {reason}; the variables are back "
            "to what they were before this cell. Keep objects that loop, call host functions or "
            "take long when pickled (e.g. in __reduce__) out of the REPL's variables."
        )
        out.error = f"{out.error}\n\n{message}" if out.error else message
        out.snapshot_key = live.snapshot_key
        return _for_workflow(out)

    def _output(self, workflow_id: str, cell_id: str, host: CellHost, result: CellResult) -> CellOutput:
        output_key = None
        if len(result.full_output) > len(result.output):
            output_key = run_key(workflow_id, "outputs", f"{cell_id}.txt")
            self._store.put_bytes(output_key, valid_text(result.full_output).encode())
        final, final_ref = host.final, None
        if final is not None and len(final) > FINAL_INLINE_CHARS:
            final_ref = self._store.put_blob(final.encode())  # valid already (CellHost.final_answer)
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


__all__ = ["FINAL_INLINE_CHARS", "CellFinisher"]
