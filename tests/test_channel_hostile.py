"""Stray bytes on the guest's channel (fd 0) from cell code (real wasmtime).

Cell code can write anything to fd 0: a piece of a frame header, a header
and part of its body, garbage. None of it may be taken for the start of the
next real message (a host call, the cell's own result): the host drops it,
the cell gets an error that says why, and the REPL goes on without a restart.
"""

from __future__ import annotations

import tracemalloc

import pytest

from sandbox_wasm import ReplSession, SandboxLimits

MiB = 1024**2
LIMITS = SandboxLimits(cell_timeout_s=10.0, memory_bytes=256 * MiB, max_host_call_bytes=64 * MiB,
                       hang_grace_s=2.0, restore_min_s=2.0)


@pytest.fixture(scope="module")
def session():
    with ReplSession(limits=LIMITS, host_functions={"echo": lambda x: x}) as repl:
        repl.run_cell("marker = 'kept'")
        repl.snapshot()
        yield repl


def _cell(code: str) -> str:
    # `fresh` is set by the cell itself: still there afterwards means no restart.
    return "import os, struct\nfresh = 'this cell'\n" + code


def _still_fine(repl: ReplSession) -> None:
    after = repl.run_cell("marker, fresh, echo('ok')")
    assert after.error is None and after.value_repr == "('kept', 'this cell', 'ok')", after
    assert not after.restarted and "[sandbox:" not in after.output, after.output


def test_a_piece_of_a_header_is_refused_by_the_write_itself(session):
    result = session.run_cell(_cell("os.write(0, b'\\x01\\x02')"))
    assert result.error == "OSError: [Errno 9] Bad message" and not result.restarted, result
    # The errno alone says nothing: the reason is in the cell's output.
    assert "[sandbox: the host channel (fd 0) refused a write:" in result.output
    assert "2 of a frame header's 8 bytes" in result.output, result.output
    _still_fine(session)


@pytest.mark.parametrize("announced", [20, 1000, 40 * MiB])
def test_a_header_without_its_body_does_not_swallow_the_cells_result(session, announced):
    code = _cell(f"os.write(0, struct.pack('<Q', {announced}) + b'l')\nprint('after')\n'value'")
    result = session.run_cell(code)
    assert not result.restarted and result.limit is None, result
    assert result.output.startswith("after\n"), result.output
    assert result.error.startswith("ChannelRefused: 9 bytes written to fd 0"), result.error
    assert f"a frame header announcing {announced:,} bytes, then 1 of them" in result.error
    _still_fine(session)


def test_half_a_frame_then_a_host_call(session):
    code = _cell("os.write(0, struct.pack('<Q', 1000) + b'l' + b'x' * 10)\n"
                 "try:\n    echo('swallowed?')\nexcept Exception as exc:\n"
                 "    print(type(exc).__name__ + ': ' + str(exc))\n"
                 "echo('again')")
    result = session.run_cell(code)
    assert result.error is None and result.value_repr == "'again'" and not result.restarted, result
    assert result.output.startswith("HostCallError: echo(): 19 bytes written to fd 0"), result.output
    assert "the call was not made" in result.output
    _still_fine(session)


def test_garbage_too_short_for_a_frame(session):
    result = session.run_cell(_cell("os.write(0, b'\\x01\\x02garbage')"))
    # Its first 8 bytes read as a header announcing ~7.4e18 bytes.
    assert result.error == "OSError: [Errno 35] Message too large" and not result.restarted
    assert "exceeds the 67.1 MB limit of one message" in result.output, result.output
    _still_fine(session)


def test_a_stray_body_is_dropped_at_the_end_of_the_cell(session):
    code = _cell("os.write(0, struct.pack('<Q', 60 * 1024**2) + b'l' + b'x' * (30 * 1024**2))")
    tracemalloc.start()
    try:
        result = session.run_cell(code)
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert result.error.startswith("ChannelRefused: ") and not result.restarted, result
    assert held < 5 * MiB, held  # the host kept none of the 30 MB once the cell ended
    _still_fine(session)


def test_host_refusals_reach_the_guest_with_their_reason(session):
    # Past the guest's own checks (which refuse these first with a clear error):
    # what the host says must still reach the code that sent the message.
    over_size = session.run_cell(_cell(
        "from rlm_channel import Channel\n"
        "Channel().request(['call', 'echo', ['x' * (70 * 1024**2)], {}])"))
    assert over_size.error.startswith("FrameTooLarge: the host refused a message of 73.4 MB: "
                                      "a frame of 73.4 MB exceeds the 67.1 MB limit"), over_size.error
    too_many = session.run_cell(_cell(
        "import rlm_codec\ncheck = rlm_codec._check_value_count\n"
        "rlm_codec._check_value_count = lambda count, size: None\n"
        "try:\n    echo([None] * 2_200_000)\nfinally:\n    rlm_codec._check_value_count = check"))
    assert too_many.error.startswith("HostCallError: echo(): the host refused the message: "
                                     "payload holds more values than its size allows"), too_many.error
    assert not over_size.restarted and not too_many.restarted
    _still_fine(session)


def test_a_raw_refused_frame_names_its_reason(session):
    code = _cell("body = b'l' + struct.pack('<I', 3_000_000)\n"
                 "os.write(0, struct.pack('<Q', len(body)) + body)")
    result = session.run_cell(code)
    assert result.error == "OSError: [Errno 9] Bad message" and not result.restarted
    assert "refused a write: the host refused the message: payload holds more values" in result.output
    _still_fine(session)
