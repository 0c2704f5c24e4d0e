"""Hostile guest code against the host's memory and time (real wasmtime).

Host-side memory is measured with tracemalloc: it sees every Python
allocation of the host (copies of guest data, decoded text) and none of the
guest's linear memory, so a bound on its peak is a bound on what a guest
made the host allocate.
"""

from __future__ import annotations

import threading
import tracemalloc

import pytest

from sandbox_wasm import CellInterrupted, ReplSession, SandboxLimits

MiB = 1024**2


def _host_peak(fn):
    """(result of fn(), peak bytes the host allocated while it ran)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _keeps_state(session: ReplSession) -> None:
    after = session.run_cell("marker")
    assert after.error is None and after.value_repr == "'kept'", after


@pytest.fixture
def session():
    limits = SandboxLimits(cell_timeout_s=30.0, memory_bytes=256 * MiB, max_host_calls=300)
    with ReplSession(limits=limits, host_functions={"echo": lambda x: x}) as repl:
        repl.run_cell("marker = 'kept'")
        repl.snapshot()
        yield repl


def test_frame_header_claiming_3_gib_is_refused_before_any_allocation(session):
    code = "import os, struct\nos.write(0, struct.pack('<Q', 3 * 1024**3))"
    result, peak = _host_peak(lambda: session.run_cell(code))
    assert peak < 20 * MiB, peak
    assert result.error is not None and "OSError" in result.error and "too large" in result.error.lower()
    assert not result.restarted and result.limit is None
    _keeps_state(session)
    assert session.run_cell("echo('still talking')").value_repr == "'still talking'"


def test_frame_just_over_the_guest_cap_is_refused_too(session):
    # Within the configured max (512 MiB) but more than the guest could hold (256 MiB).
    code = "import os, struct\nos.write(0, struct.pack('<Q', 256 * 1024**2 + 1) + b'x' * 1000)"
    result, peak = _host_peak(lambda: session.run_cell(code))
    assert peak < 20 * MiB and not result.restarted and "OSError" in result.error
    _keeps_state(session)


def test_host_function_arguments_over_the_max_give_a_clear_error():
    limits = SandboxLimits(cell_timeout_s=30.0, memory_bytes=256 * MiB, max_host_call_bytes=MiB)
    with ReplSession(limits=limits, host_functions={"echo": lambda x: x}) as repl:
        repl.run_cell("marker = 'kept'")
        result = repl.run_cell("echo('x' * 3_000_000)")
        assert result.error.startswith("ValueError: echo(): the data is 3.0 MB; at most 1.0 MB")
        assert not result.restarted
        _keeps_state(repl)
        assert repl.run_cell("len(echo('y' * 500_000))").value_repr == "500000"


def test_huge_single_write_to_stdout_is_cut_before_the_host_copies_it():
    limits = SandboxLimits(cell_timeout_s=60.0, memory_bytes=1200 * MiB, output_chars=1000,
                           full_output_chars=100_000)
    with ReplSession(limits=limits) as repl:
        repl.run_cell("marker = 'kept'")
        code = "import os\nblob = b'x' * 10**9\nos.write(1, blob)\ndel blob"
        result, peak = _host_peak(lambda: repl.run_cell(code))
        assert peak < 20 * MiB, peak  # a copy of the write alone would be 1 GB
        assert result.error is None and result.limit.kind == "output"
        assert len(result.full_output) < 101_000 and "full output truncated" in result.full_output
        _keeps_state(repl)


def test_printed_text_past_the_ceiling_is_not_decoded():
    limits = SandboxLimits(cell_timeout_s=60.0, memory_bytes=512 * MiB, output_chars=100,
                           full_output_chars=1000)
    with ReplSession(limits=limits) as repl:
        result, peak = _host_peak(lambda: repl.run_cell("print('\u00e9' * 50_000_000)"))
        assert peak < 20 * MiB, peak
        assert result.full_output.startswith("\u00e9" * 1000)


def test_a_flood_of_host_calls_is_ended_with_a_clear_message(session):
    code = ("marker = 'lost'\nwhile True:\n    try:\n        echo(1)\n"
            "    except BaseException:\n        pass")
    result = session.run_cell(code)
    assert result.limit.kind == "host_calls" and result.limit.limit == 300
    assert "more than 300 host-function calls" in result.error and result.restarted
    _keeps_state(session)


def test_malformed_host_call_messages_are_refused_not_fatal(session):
    code = ("import rlm_api, sys\nch = sys.modules['rlm_channel']\n"
            "c = [o for o in globals().values()]\n"
            "from rlm_channel import Channel\n"
            "r = Channel().request(['call', ['not', 'a', 'name'], 5, {}])\n"
            "r")
    result = session.run_cell(code)
    assert result.error is None and "malformed host-function call" in result.value_repr
    _keeps_state(session)


def _session_with(**host_functions) -> ReplSession:
    limits = SandboxLimits(cell_timeout_s=30.0, memory_bytes=256 * MiB, max_host_calls=300)
    return ReplSession(limits=limits, host_functions=host_functions)


def test_interrupt_stops_a_loop_that_catches_everything():
    started = threading.Event()
    with _session_with(started=lambda: started.set()) as session:
        _interrupt_a_loop(session, started)


def _interrupt_a_loop(session: ReplSession, started: threading.Event) -> None:
    session.run_cell("marker = 'kept'")
    session.snapshot()
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["result"] = session.run_cell(
                "marker = 'lost'\nstarted()\nwhile True:\n    try:\n        sum(range(1000))\n"
                "    except BaseException:\n        pass")
        except CellInterrupted as exc:
            outcome["interrupted"] = str(exc)

    worker = threading.Thread(target=run)
    worker.start()
    assert started.wait(30)
    session.interrupt("the run was cancelled")
    worker.join(20)  # the cell's own time limit is 30 s
    assert not worker.is_alive() and "the run was cancelled" in outcome["interrupted"]
    after = session.run_cell("marker")
    assert after.restarted and after.value_repr == "'kept'"


def test_interrupt_while_the_guest_waits_on_a_host_call():
    release = threading.Event()
    entered = threading.Event()

    def slow() -> int:
        entered.set()
        release.wait(30)
        return 1

    with _session_with(slow=slow) as session:
        session.run_cell("marker = 'kept'")
        session.snapshot()
        _interrupt_a_host_call(session, entered, release)


def _interrupt_a_host_call(session: ReplSession, entered: threading.Event, release: threading.Event) -> None:
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            session.run_cell("while True:\n    try:\n        slow()\n    except BaseException:\n        pass")
        except CellInterrupted as exc:
            outcome["interrupted"] = str(exc)

    worker = threading.Thread(target=run)
    worker.start()
    assert entered.wait(30)
    session.interrupt("cancelled")
    release.set()
    worker.join(20)
    assert not worker.is_alive() and "cancelled" in outcome["interrupted"]
    _keeps_state(session)
