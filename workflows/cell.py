"""One REPL cell as a durable step: the `run_cell` activity and its options,
and what the root model sees of a cell afterwards (`cell_report`).

A turn runs the cells of the root model's reply (workflows/turn.py); a session
appends its answers to the REPL's `session_history` with one
(workflows/session.py). Both start the activity here, so its timeouts and
retries are set in one place. The cell itself runs on a worker
(activities/run_cell.py), in the WASM REPL (sandbox_wasm/).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from workflows import names
    from workflows.prompts import CellReport
    from workflows.request import MAX_OUTPUT_CHARS
    from workflows.steps import CellInput, CellOutput

__all__ = ["REPL_TOO_LARGE_PATCH", "TURN_OUTPUT_CHARS", "cell_report", "cell_start_to_close", "execute_cell", "no_cell_can_run"]

# Printed output of all cells of one turn together: it travels inline in the
# next root turn's activity input (payloads fail above 2 MiB, 4 bytes a char).
TURN_OUTPUT_CHARS = MAX_OUTPUT_CHARS

# run_cell heartbeats every second; a dead worker is noticed after this.
CELL_HEARTBEAT_TIMEOUT = timedelta(seconds=10)
CELL_RETRY = RetryPolicy(initial_interval=timedelta(milliseconds=200), maximum_attempts=4)
# Sub-calls inside a cell may take long (children are whole runs), but never
# past the tree's deadline: guest time plus this much to finish and report.
CELL_START_TO_CLOSE = timedelta(hours=6)
CELL_DEADLINE_GRACE = timedelta(minutes=5)


def cell_start_to_close(deadline: datetime | None, cell_timeout_s: float) -> timedelta:
    """How long a cell may take: six hours, or until the tree's deadline plus
    the guest's own time and a grace to report (at least a second)."""
    if deadline is None:
        return CELL_START_TO_CLOSE
    left = deadline - workflow.now() + timedelta(seconds=cell_timeout_s) + CELL_DEADLINE_GRACE
    return max(timedelta(seconds=1), min(left, CELL_START_TO_CLOSE))


async def execute_cell(
    cell: CellInput, *, summary: str, start_to_close: timedelta, wait_until_stopped: bool
) -> CellOutput:
    """Run one cell on a worker; raises ActivityError once its retries are spent.

    `wait_until_stopped`: a cancellation returns only once the cell has really
    stopped (the worker traps the guest on the heartbeat that brings it; a dead
    worker is noticed by the heartbeat timeout). A run's cells wait, so a
    cancelled run leaves no guest running; the session's history cell does not.
    """
    return await workflow.execute_activity(
        names.ACTIVITY_RUN_CELL,
        cell,
        result_type=CellOutput,
        summary=summary,
        start_to_close_timeout=start_to_close,
        heartbeat_timeout=CELL_HEARTBEAT_TIMEOUT,
        retry_policy=CELL_RETRY,
        cancellation_type=(
            workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED
            if wait_until_stopped
            else workflow.ActivityCancellationType.TRY_CANCEL
        ),
    )


# Runs started since this patch end when a cell's REPL cannot be made (its
# cap past the worker's memory budget, or a context that does not fit in
# it); older ones replay as they ran (each later cell failed the same way
# while the run spent its turns).
REPL_TOO_LARGE_PATCH = "end-run-when-the-repl-cannot-fit"


def no_cell_can_run(exc: ActivityError) -> bool:
    """The cell failed because no REPL with the run's memory cap can be made:
    the cap exceeds this worker's whole guest memory budget, or the context
    does not fit in it. Every later cell would fail the same way, whatever
    code the model writes."""
    cause = exc.cause
    return isinstance(cause, ApplicationError) and cause.type in (names.REPL_TOO_LARGE, names.CONTEXT_TOO_LARGE)


def cell_report(code: str, cell: CellOutput, room: int) -> CellReport:
    """What the model sees of a cell; `room` is what is left of the turn's output."""
    preview = code if len(code) <= 400 else code[:400] + " ..."
    output, limit = cell.output, cell.limit
    if len(output) > max(room, 0):
        output = output[: max(room, 0)]
        cut = f"the cells of one turn show at most {TURN_OUTPUT_CHARS:,} characters of output together"
        limit = f"{limit}; {cut}" if limit else cut
    return CellReport(
        code_preview=preview,
        output=output,
        error=cell.error,
        limit=limit,
        restored_names=list(cell.restored_names),
    )
