"""A worker whose `run_cell` stops for good at one point of one cell, so a
test can kill -9 it exactly there (no timing guess):

- RLM_TEST_HOLD_CELL: the cell id to stop in (e.g. a session's `q1r`, the
  cell that appends question 1 to `session_history`);
- RLM_TEST_HOLD_AT: `start` (the activity started on this worker, the cell
  has not run) or `stored` (the cell ran and its REPL snapshot is stored,
  the activity not yet reported completed);
- RLM_TEST_HOLD_FILE: written once the worker holds there.

Every other cell, and everything else, runs as in worker.py.

    python -m tests.chaos.held_cell_worker   # settings from RLM_* as worker.py
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from activities._cell_output import CellFinisher
from activities.run_cell import RunCellActivity

CELL = os.environ.get("RLM_TEST_HOLD_CELL", "")
AT = os.environ.get("RLM_TEST_HOLD_AT", "")
MARKER = os.environ.get("RLM_TEST_HOLD_FILE", "")
POINTS = ("start", "stored")


def _hold(cell_id: str) -> None:
    """Tell the test this worker stands at the point, then never go on (the
    cell's heartbeats go on: only the kill ends the attempt)."""
    tmp = Path(MARKER + ".tmp")
    tmp.write_text(cell_id)
    tmp.replace(MARKER)
    threading.Event().wait()


def main() -> None:
    if AT not in POINTS or not CELL or not MARKER:
        raise SystemExit(f"RLM_TEST_HOLD_AT must be one of {POINTS}, with RLM_TEST_HOLD_CELL and RLM_TEST_HOLD_FILE")
    checkout, finish = RunCellActivity._checkout, CellFinisher.finish

    def held_checkout(self, inp, *args):
        if AT == "start" and inp.cell_id == CELL:
            _hold(inp.cell_id)
        return checkout(self, inp, *args)

    def held_finish(self, workflow_id, cell_id, live, host, result):
        out = finish(self, workflow_id, cell_id, live, host, result)
        if AT == "stored" and cell_id == CELL and out[1]:
            _hold(cell_id)
        return out

    RunCellActivity._checkout = held_checkout  # type: ignore[method-assign]
    CellFinisher.finish = held_finish  # type: ignore[method-assign]

    import worker

    worker.main([])


if __name__ == "__main__":
    main()
