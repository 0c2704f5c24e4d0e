"""Bounds of the value codec on what a payload can make its decoder do.

The host decodes frames written by untrusted guest code: dict keys whose
hashes can be made equal (quadratic dict filling), tiny containers (memory
amplification) and ints past CPython's str conversion limit are refused with
a CodecError, never a bare TypeError or ValueError. Pure codec tests first,
then real wasmtime sessions where guest code forges such frames on fd 0.
"""

from __future__ import annotations

import struct
import sys
import time
import tracemalloc

import pytest

from sandbox_wasm import ReplSession, SandboxLimits
from sandbox_wasm.guest import rlm_codec
from sandbox_wasm.guest.rlm_codec import CodecError, CodecLimit, decode, encode

MiB = 1024**2
P61 = 2**61 - 1  # i * P61 all hash to 0: the colliding keys of the audit


def _payload(value) -> bytes:
    return b"".join(bytes(s) for s in encode(value))


def _blob(tag: bytes, data: bytes) -> bytes:
    return tag + struct.pack("<Q", len(data)) + data


def _colliding_dict(count: int) -> bytes:
    """A dict payload of `count` distinct big-int keys sharing one hash."""
    keys = b"".join(_blob(b"I", str(i * P61).encode()) + b"N" for i in range(1, count + 1))
    return b"d" + struct.pack("<I", count) + keys


def _empty_lists(count: int) -> bytes:
    return b"l" + struct.pack("<I", count) + b"l\0\0\0\0" * count


def _budget(payload_size: int) -> int:
    return rlm_codec._MAX_VALUES + payload_size // rlm_codec._BYTES_PER_VALUE


# -- pure codec -------------------------------------------------------------------

def test_legit_shapes_round_trip():
    values = [
        ["prompt %d " % i + "x" * 10_000 for i in range(1_000)],  # llm_query_batched
        ["item-%d" % i for i in range(100_000)],
        [{"id": i, "name": "n%d" % i, "ok": True} for i in range(20_000)],
        {"a": 1, b"k": 2, 3: 4, -(2**63): 5, 2**63 - 1: 6, 2.5: 7, None: 8, True: 9},
        [10**4300 - 1, -(10**4300 - 1), 2**64, -(2**64)],
    ]
    for value in values:
        assert decode(_payload(value)) == value


def test_colliding_big_int_keys_are_refused_before_any_insert():
    payload = _colliding_dict(80_000)  # took minutes of host CPU
    began = time.process_time()
    with pytest.raises(CodecLimit, match="int dict key beyond 64 bits"):
        decode(payload)
    assert time.process_time() - began < 0.5
    with pytest.raises(CodecLimit, match="beyond 64 bits"):
        encode({i * P61: None for i in range(1, 10)})


def test_many_value_budget_is_the_same_on_both_sides():
    # [None] * n: the largest n the budget allows for its own payload (5 + n bytes).
    most = _budget(0)
    while _budget(5 + most + 1) >= most + 1:
        most = _budget(5 + most)
    assert most <= _budget(5 + most) and most + 1 > _budget(5 + most + 1)
    assert decode(_payload([None] * most)) == [None] * most
    with pytest.raises(CodecLimit, match="values"):
        encode([None] * (most + 1))
    forged = b"l" + struct.pack("<I", most + 1) + b"N" * (most + 1)
    with pytest.raises(CodecLimit, match="more values than its size allows"):
        decode(forged)


def test_empty_containers_are_refused_before_they_are_allocated():
    payload = _empty_lists(3_000_000)  # 15 MB: ~190 MB of lists on the host before
    tracemalloc.start()
    try:
        with pytest.raises(CodecLimit):
            decode(payload)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MiB, peak
    nested = b"l" + struct.pack("<I", 2) + _empty_lists(2_000_000) + _empty_lists(2_000_000)
    with pytest.raises(CodecLimit):
        decode(nested)


def test_containers_as_dict_keys_are_malformed_not_a_type_error():
    for key in (b"d" + struct.pack("<I", 0), b"l" + struct.pack("<I", 0)):
        with pytest.raises(CodecError, match="malformed payload: a list or dict used as a dict key") as info:
            decode(b"d" + struct.pack("<I", 1) + key + b"N")
        assert not isinstance(info.value, CodecLimit)


def test_ints_past_the_digit_limit_are_refused_on_both_sides():
    with pytest.raises(CodecLimit, match="more than 4,300 digits"):
        encode(10**4300)
    old = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)  # what guest code can do to its own interpreter
    try:
        for value in (10**4300, -(10**4300), 10**5000):
            with pytest.raises(CodecLimit, match="more than 4,300 digits"):
                encode(value)
        huge = str(10**5000).encode()
    finally:
        sys.set_int_max_str_digits(old)
    with pytest.raises(CodecLimit, match="int of more than 4,300 digits"):
        decode(_blob(b"I", huge))
    with pytest.raises(CodecError, match="malformed payload"):
        decode(_blob(b"I", b"9" * 4301))  # no encoder writes this: over the host's int() limit
    with pytest.raises(CodecError, match="malformed payload"):
        decode(_blob(b"I", b"12x"))


# -- real wasmtime sessions --------------------------------------------------------

def _forge(payload_expr: str) -> str:
    """Cell code writing a raw frame on fd 0 (what the host's channel decodes)."""
    return ("import os, struct\n"
            f"body = {payload_expr}\n"
            "os.write(0, struct.pack('<Q', len(body)) + body)\n")


@pytest.fixture(scope="module")
def session():
    limits = SandboxLimits(cell_timeout_s=20.0, memory_bytes=512 * MiB, hang_grace_s=2.0)
    with ReplSession(limits=limits, host_functions={"echo": lambda x: x}) as repl:
        repl.run_cell("marker = 'kept'")
        repl.snapshot()
        yield repl


def _keeps_state(repl: ReplSession) -> None:
    after = repl.run_cell("marker, echo('ok')")
    assert after.error is None and after.value_repr == "('kept', 'ok')", after


def test_the_guest_runs_this_codec(session):
    # Guest modules are compiled into a cache keyed by their sources' hash.
    result = session.run_cell("import rlm_codec\n"
                              "rlm_codec._MAX_VALUES, rlm_codec._BYTES_PER_VALUE, "
                              "rlm_codec._MAX_INT_DIGITS, hasattr(rlm_codec, 'CodecLimit')")
    assert result.value_repr == repr((rlm_codec._MAX_VALUES, rlm_codec._BYTES_PER_VALUE,
                                      rlm_codec._MAX_INT_DIGITS, True))


def test_forged_colliding_keys_are_refused_at_once(session):
    p = "2**61 - 1"
    body = ("b'd' + struct.pack('<I', 80000) + b''.join("
            f"b'I' + struct.pack('<Q', len(d)) + d + b'N' for d in (str(i * {p}).encode() "
            "for i in range(1, 80001)))")
    began = time.process_time()
    result = session.run_cell(_forge(body))
    assert time.process_time() - began < 2.0  # host CPU (the guest's runs on its thread too)
    assert result.error == "OSError: [Errno 9] Bad message" and not result.restarted
    _keeps_state(session)


def test_forged_empty_lists_cost_the_host_no_more_than_the_frame(session):
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        result = session.run_cell(_forge("b'l' + struct.pack('<I', 3_000_000) + "
                                         "b'l\\x00\\x00\\x00\\x00' * 3_000_000"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.error == "OSError: [Errno 9] Bad message" and not result.restarted
    assert peak < 15 * MiB + 20 * MiB, peak  # the 15 MB frame buffered; not ~190 MB of lists
    _keeps_state(session)


def test_guest_code_gets_a_clear_error_naming_the_call(session):
    cases = {
        "echo({i * (2**61 - 1): None for i in range(1, 100)})": "beyond 64 bits",
        "echo(10**5000)": "more than 4,300 digits",
        "import sys\nsys.set_int_max_str_digits(0)\necho(10**5000)": "more than 4,300 digits",
        "echo([None] * 2_200_000)": "values",
    }
    for code, words in cases.items():
        result = session.run_cell(code)
        # A limit on a value of an accepted type reads as one (ValueError, as for an oversized frame).
        assert result.error.startswith("ValueError: echo(): ") and words in result.error, result.error
        assert not result.restarted
    _keeps_state(session)


def test_container_dict_key_is_a_protocol_violation_not_a_type_error(session):
    result = session.run_cell(_forge("b'd' + struct.pack('<I', 1) + b'd' + struct.pack('<I', 0) + b'N'"))
    assert result.restarted and result.limit.kind == "trap"
    assert "malformed payload: a list or dict used as a dict key" in result.error
    assert "unhashable" not in result.error
    _keeps_state(session)


def test_legit_large_messages_still_pass(session):
    result = session.run_cell(
        "a = echo(['p%d ' % i + 'x' * 40_000 for i in range(1_000)])\n"
        "b = echo(['item-%d' % i for i in range(100_000)])\n"
        "c = echo({'rows': [{'id': i, 'v': [i, str(i)]} for i in range(50_000)]})\n"
        "len(a), len(b), len(c['rows']), echo(10**4300 - 1) == 10**4300 - 1")
    assert result.error is None and result.value_repr == "(1000, 100000, 50000, True)", result
