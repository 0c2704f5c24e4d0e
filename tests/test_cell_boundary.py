"""What leaves a cell for the workflow, and what cell code may do outside its cell.

Real wasmtime guests. `CellFinisher.finish` (what the `run_cell` activity
calls after the cell) runs with the real session and a stand-in store, so
the CellOutput checked is the one the activity returns; it is encoded with
Temporal's pydantic data converter, as the worker does.
"""

from __future__ import annotations

import time

import pytest
from temporalio.contrib.pydantic import pydantic_data_converter

from activities._cell_host import CellHost
from activities._cell_output import FINAL_INLINE_CHARS, CellFinisher
from activities._live_repl import LiveRepl
from sandbox_wasm import ReplSession, SandboxError, SandboxLimits, Snapshot
from sandbox_wasm.session import SnapshotError
from workflows.refs import BlobRef
from workflows.steps import CellOutput

MiB = 1024**2
LIMITS = SandboxLimits(cell_timeout_s=1.0, memory_bytes=256 * MiB, admin_timeout_s=60.0,
                       hang_grace_s=2.0, max_host_calls=50, restore_min_s=2.0)
PREVIOUS = "runs/wf/snapshots/before.bin"


class _Store:
    def __init__(self) -> None:
        self.blobs: list[bytes] = []

    def put_bytes(self, key: str, data: bytes) -> None:
        self.blobs.append(data)

    def put_blob(self, data: bytes) -> BlobRef:
        self.blobs.append(data)
        return BlobRef(key=f"blobs/{len(self.blobs)}", size=len(data), sha256="0" * 64)


class _Snapshots:
    """Keeps the records in memory, where the real store keeps them in S3."""

    def __init__(self) -> None:
        self.records: dict[str, bytes] = {}

    def save(self, key: str, snap: Snapshot, held: dict) -> dict:
        self.records.update(snap.new_records)
        return {digest: digest for digest in snap.refs}

    def record_source(self, live_records: object) -> object:
        return lambda names: {name: self.records[name] for name in names}


class _Cell:
    """A pooled REPL as the activity holds it, with FINAL / FINAL_VAR and a counted `echo`."""

    def __init__(self) -> None:
        self.host = CellHost(None, "wf", "c1", None)  # type: ignore[arg-type]
        self.echoed: list[object] = []
        functions = {"FINAL": self.host.final_answer, "FINAL_VAR": self.host.final_var,
                     "echo": self.echoed.append}
        self.session = ReplSession(limits=LIMITS, host_functions=functions).start()
        self.session.run_cell("marker = 'kept'")
        self.live = LiveRepl(self.session, LIMITS, PREVIOUS)
        self.session.snapshot()
        self.store = _Store()
        self.finisher = CellFinisher(self.store, _Snapshots())

    def run(self, code: str) -> tuple[CellOutput, bool]:
        self.host.final = None
        result = self.session.run_cell(code)
        return self.finisher.finish("wf", "c1", self.live, self.host, result)  # type: ignore[arg-type]


@pytest.fixture
def cell():
    made = _Cell()
    try:
        yield made
    finally:
        made.session.close()


def _through_workflow(out: CellOutput) -> CellOutput:
    """Encode and decode as the worker and the workflow do (raises if it cannot)."""
    converter = pydantic_data_converter.payload_converter
    payloads = converter.to_payloads([out])
    return converter.from_payloads(payloads, [CellOutput])[0]


@pytest.mark.parametrize("code, field, shown", [
    ("raise ValueError('bad \\ud800 text')", "error", "bad \\ud800 text"),
    ("print('\\ud800 printed')", "output", "\\ud800 printed"),
    ("import os\nos.write(1, '\\ud800 raw'.encode('utf-8', 'surrogatepass'))", "output", " raw"),
    ("FINAL('\\ud800')", "final", "\\ud800"),
    ("answer = 'x\\udfff'\nFINAL_VAR('answer')", "final", "x\\udfff"),
    ("globals()['gen\\udc80'] = (i for i in ())", "unsaved", "gen\\udc80"),
])
def test_lone_surrogates_reach_the_workflow_escaped(cell, code, field, shown):
    out, saved = cell.run(code)
    assert saved
    back = _through_workflow(out)
    value = getattr(back, field)
    assert shown in (value if isinstance(value, str) else " ".join(value)), back


def test_long_final_with_a_surrogate_is_stored(cell):
    out, saved = cell.run(f"FINAL('\\ud800' + 'a' * {FINAL_INLINE_CHARS})")
    assert saved and out.final_ref is not None and out.final_ref.size == FINAL_INLINE_CHARS + 6
    assert cell.store.blobs[-1].startswith(b"\\ud800aaa")
    assert _through_workflow(out).final.startswith("\\ud800a")


def test_snapshot_that_loops_is_a_cell_error_bounded_by_the_cell_timeout(cell):
    code = ("class Forever:\n    def __reduce__(self):\n        while True: pass\n"
            "x = Forever()\nlost = 1")
    began = time.monotonic()
    out, saved = cell.run(code)
    took = time.monotonic() - began
    assert not saved and took < LIMITS.cell_timeout_s + LIMITS.hang_grace_s + 2, took
    assert out.error.startswith("SnapshotError: the REPL state could not be saved: ")
    assert out.snapshot_key == PREVIOUS  # the run goes on from the state before the cell
    _through_workflow(out)
    after = cell.session.run_cell("marker, 'lost' in globals()")
    assert after.value_repr == "('kept', False)", after


def test_host_calls_are_refused_while_the_state_is_saved(cell):
    code = ("class Chatty:\n    def __reduce__(self):\n"
            "        for i in range(5000):\n            echo(i)\n        return (int, ())\n"
            "x = Chatty()\ny = 2")
    out, saved = cell.run(code)
    assert saved and cell.echoed == []
    assert out.unsaved == ["x"] and out.error is None
    snapshot = cell.session.snapshot()
    assert "cannot be called during snapshot" in snapshot.unsaved_reasons["x"]
    assert "y" in snapshot.saved


def test_host_calls_are_refused_while_the_state_is_restored(cell):
    # Pickled as a call of the protected `echo`: restoring it would call the host.
    cell.session.run_cell("class Calls:\n    def __reduce__(self):\n        return (echo, (1,))\n"
                          "x = Calls()")
    snapshot = cell.session.snapshot()
    assert snapshot.saved == ["Calls", "marker", "x"]
    with pytest.raises(SandboxError, match="cannot be called during restore"):
        cell.session.restore(snapshot.data, dict(snapshot.new_records))
    assert cell.echoed == []


def test_a_restore_that_loops_is_bounded(cell):
    # Unpickling runs the object's own code: it had the admin commands' 60 s
    # here (120 s by default); now the cell's limit, at least restore_min_s.
    cell.session.run_cell("class Slow:\n    def __setstate__(self, state):\n        while True: pass\n"
                          "x = Slow()\nx.a = 1")
    snapshot = cell.session.snapshot()
    began = time.monotonic()
    with pytest.raises(SandboxError):
        cell.session.restore(snapshot.data, dict(snapshot.new_records))
    took = time.monotonic() - began
    assert took < max(LIMITS.cell_timeout_s, LIMITS.restore_min_s) + LIMITS.hang_grace_s + 2, took


def test_a_forged_done_kills_the_guest(cell):
    forged = cell.session.run_cell(
        "from rlm_channel import Channel\n"
        "command = Channel().request(['done', {'error': None, 'value_repr': \"'forged'\"}])\n"
        "hijacked = command[0]")
    assert forged.restarted and forged.limit.kind == "trap", forged
    assert "protocol" in forged.error and forged.value_repr is None
    after = cell.session.run_cell("marker, 'hijacked' in globals()")
    assert after.value_repr == "('kept', False)", after


def test_a_done_with_the_right_number_still_cannot_take_the_next_command(cell):
    # The command number is no secret (the driver's frame holds it), but code
    # that answers for the driver is then answered itself: its late result
    # does not match the next command, and that command fails cleanly.
    code = ("import sys\nfrom rlm_channel import Channel\nframe = sys._getframe()\n"
            "while frame.f_code.co_name != '_serve':\n    frame = frame.f_back\n"
            "seq = frame.f_locals['seq']\n"
            "command = Channel().request(['done', {'error': None, 'seq': seq}])\n"
            "hijacked = command[0]")
    out, saved = cell.run(code)
    assert not saved and "SnapshotError" in out.error and "protocol" in out.error, out
    assert cell.echoed == []
    after = cell.session.run_cell("marker, 'hijacked' in globals()")
    assert after.value_repr == "('kept', False)", after
