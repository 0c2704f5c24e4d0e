"""Limits, the escape corpus and concurrent sessions (real wasmtime)."""

from __future__ import annotations

import threading
import time

import pytest

from sandbox_wasm import ReplSession, SandboxLimits

LIMITS = SandboxLimits(cell_timeout_s=2.0, memory_bytes=256 * 1024**2, output_chars=1_000,
                       full_output_chars=100_000)


@pytest.fixture(scope="module")
def repl(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ctx")
    (directory / "doc.txt").write_text("the context document", encoding="utf-8")
    with ReplSession(limits=LIMITS, host_functions={"echo": lambda x: x}) as session:
        session.load_context([directory / "doc.txt"], "str")
        session.run_cell("marker = 'kept'")
        session.snapshot()
        yield session


def assert_healthy(session):
    after = session.run_cell("marker, context[:3], echo('ok')")
    assert after.error is None, after.error
    assert after.value_repr == "('kept', 'the', 'ok')"


def test_timeout_stops_the_cell_and_restores_the_snapshot(repl):
    began = time.monotonic()
    result = repl.run_cell("marker = 'lost'\nwhile True:\n    pass")
    assert time.monotonic() - began < 2.0 + 3.0  # deadline + restart, never a hang
    assert result.limit.kind == "timeout" and result.limit.limit == 2.0
    assert result.restarted and result.error.startswith("TimeoutError")
    assert "longer than 2 s" in result.output and "restored from the last snapshot" in result.output
    assert_healthy(repl)


def test_output_before_a_timeout_is_kept(repl):
    result = repl.run_cell("import sys\nprint('progress')\nsys.stdout.flush()\nwhile True: pass")
    assert result.output.startswith("progress\n") and result.limit.kind == "timeout"
    assert_healthy(repl)


def test_time_in_host_calls_does_not_count():
    def slow(x):
        time.sleep(0.4)  # the behaviour under test: host time is excluded from the deadline
        return x

    limits = SandboxLimits(cell_timeout_s=1.0)
    with ReplSession(limits=limits, host_functions={"slow": slow}) as session:
        result = session.run_cell("[slow(i) for i in range(4)]")
        assert result.error is None and result.limit is None
        assert result.value_repr == "[0, 1, 2, 3]" and result.duration_s >= 1.6


def test_the_clock_sleeps_while_guests_wait_and_deadlines_still_hold():
    from sandbox_wasm._runtime import get_runtime

    ticker = get_runtime().ticker
    limits = SandboxLimits(cell_timeout_s=1.0)
    seen = []
    # Other tests' guests of this process may still be running (a hung one is
    # left to its thread): count relative to them.
    with ReplSession(limits=limits, host_functions={"probe": lambda: seen.append(ticker.running_guests)}) as session:
        others = ticker.running_guests
        session.run_cell("probe()")
        assert seen == [others]  # waiting on the host: this guest needs no ticks
        assert ticker.running_guests == others  # idle between cells too
        began = time.monotonic()
        result = session.run_cell("probe()\nwhile True:\n    pass")
        assert result.limit is not None and result.limit.kind == "timeout"
        assert time.monotonic() - began < 1.0 + 3.0
    assert ticker.running_guests == others


def test_memory_cap_gives_memory_error_and_the_repl_survives():
    limits = SandboxLimits(cell_timeout_s=20.0, memory_bytes=64 * 1024**2)
    with ReplSession(limits=limits) as session:
        session.run_cell("kept = 'yes'")
        result = session.run_cell("def grow():\n    chunks = []\n    while True:\n"
                                  "        chunks.append(bytearray(10**6))\ngrow()")
        assert result.error == "MemoryError" and not result.restarted
        assert result.limit.kind == "memory" and result.limit.limit == 64 * 1024**2
        single = session.run_cell("x = bytearray(10**9)")
        assert single.error == "MemoryError"
        assert session.run_cell("kept, len(bytearray(10**7))").value_repr == "('yes', 10000000)"


def test_output_limit(repl):
    result = repl.run_cell("for i in range(5000):\n    print(i)")
    assert result.limit.kind == "output" and result.limit.limit == 1_000
    assert len(result.output) < 1_100 and "more chars]" in result.output
    assert result.full_output.endswith("4999\n")


def test_trap_is_reported_and_recovered(repl):
    result = repl.run_cell("import os\nos._exit(1)")
    assert result.limit.kind == "trap" and result.restarted
    assert_healthy(repl)


def test_sleep_cannot_outlive_the_timeout(repl):
    began = time.monotonic()
    result = repl.run_cell("import time\ntime.sleep(10**6)")
    assert time.monotonic() - began < 0.5
    assert result.error.startswith("TimeoutError") and "time.sleep" in result.error
    assert not result.restarted
    short = repl.run_cell("import time\ntime.sleep(0.05)\n'slept'")
    assert short.value_repr == "'slept'"
    assert_healthy(repl)


def test_blocking_poll_is_cut_at_the_deadline(repl):
    began = time.monotonic()
    repl.run_cell("import select\nselect.select([], [], [], 10**6)")
    assert time.monotonic() - began < 2.0 + 3.0
    assert_healthy(repl)


ESCAPES = {
    "read_passwd": ("open('/etc/passwd').read()", "FileNotFoundError"),
    "traversal": ("open('/rlm/guest/../../../etc/passwd').read()", "PermissionError"),
    "list_root": ("import os\nos.listdir('/')", "FileNotFoundError"),
    "write_lib_dir": ("open('/rlm/guest/evil.py', 'w').write('x')", "PermissionError"),
    "write_cwd": ("open('evil.txt', 'w').write('x')", "Error"),
    "socket": ("import socket\nsocket.socket().connect(('127.0.0.1', 80))", "OSError"),
    "subprocess": ("import subprocess\nsubprocess.run(['ls'])", "OSError"),
    "os_system": ("import os\nos.system('ls')", "AttributeError"),
    "thread": ("import threading\nthreading.Thread(target=print).start()", "RuntimeError"),
    "environ": ("import os\nassert dict(os.environ) == {}, os.environ\nraise KeyError('none')",
                "KeyError"),
    "ctypes": ("import ctypes", "ModuleNotFoundError"),
    "deep_recursion": ("def down(n):\n    return down(n + 1)\ndown(0)", "RecursionError"),
    "huge_string": ("'x' * 10**9", "MemoryError"),
    "stdin": ("input()", "EOFError"),
}


@pytest.mark.parametrize("name", sorted(ESCAPES))
def test_escape_attempt_fails_inside_the_guest(repl, name):
    code, expected = ESCAPES[name]
    result = repl.run_cell(code)
    assert result.error is not None and expected in result.error, (name, result.error)
    assert not result.restarted
    assert_healthy(repl)


@pytest.mark.parametrize("code", [
    "while True:\n    pass",
    "import re\nre.match(r'(a+)+$', 'a' * 64 + 'b')",
    "import sys\nsys.setrecursionlimit(10**7)\ndef down(n):\n    return down(n + 1)\ndown(0)",
], ids=["infinite_loop", "catastrophic_regex", "unbounded_recursion"])
def test_runaway_code_ends_the_cell_cleanly(repl, code):
    result = repl.run_cell(code)
    assert result.limit is not None and result.limit.kind in ("timeout", "memory", "trap")
    assert result.error is not None
    assert_healthy(repl)


def test_forged_channel_bytes_kill_only_the_instance(repl):
    result = repl.run_cell("import os\nos.write(0, b'\\x05\\x00\\x00\\x00\\x00\\x00\\x00\\x00junk!')")
    assert result.restarted and result.limit.kind == "trap"
    assert_healthy(repl)


def test_huge_output_is_capped(repl):
    result = repl.run_cell("print('z' * 10**7)")
    assert result.limit.kind == "output"
    assert len(result.full_output) < 101_000 and "full output truncated" in result.full_output
    assert_healthy(repl)


def test_sessions_run_concurrently_in_threads():
    results: dict[int, object] = {}
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            limits = SandboxLimits(cell_timeout_s=30.0)
            with ReplSession(limits=limits, host_functions={"tag": lambda: index}) as session:
                session.run_cell(f"mine = {index}")
                loop = session.run_cell("total = 0\nfor i in range(100_000):\n    total += i\n"
                                        "(mine, tag(), total)")
                results[index] = loop.value_repr
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    expected = sum(range(100_000))
    assert results == {i: f"({i}, {i}, {expected})" for i in range(3)}


class Cancelled(BaseException):
    """Stands in for an activity cancellation raised inside a host function."""


def test_base_exception_in_host_function_propagates_and_session_recovers():
    def cancel():
        raise Cancelled("activity cancelled")

    with ReplSession(limits=LIMITS, host_functions={"cancel": cancel}) as session:
        session.run_cell("saved = 1")
        session.snapshot()
        with pytest.raises(Cancelled):
            session.run_cell("cancel()")
        after = session.run_cell("saved + 1")
        assert after.restarted and after.value_repr == "2"
        assert "interrupted on the host side" in after.output


def test_closed_sessions_give_their_memory_back():
    def rss_mb() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * 4096 // 2**20

    def one_session() -> None:
        with ReplSession(limits=LIMITS) as session:
            assert session.run_cell("block = bytearray(60 * 10**6)\nlen(block)").error is None

    one_session()  # warm-up: module, engine and allocator pools
    before = rss_mb()
    for _ in range(5):
        one_session()
    assert rss_mb() - before < 150  # 5 x 60 MB would be 300 MB if stores leaked


def test_closing_a_session_runs_no_guest_code():
    """A closed guest stops without interpreter shutdown: exit hooks a cell
    registered never run (they would run outside any cell's time limit and
    accounting; one waiting on a host function used to keep its guest thread
    alive after close), and closing costs no finalization of the guest's heap."""
    def guest_threads() -> int:
        return sum(t.name == "sandbox-guest" for t in threading.enumerate())

    calls = []
    before = guest_threads()
    with ReplSession(limits=LIMITS, host_functions={"echo": calls.append}) as session:
        cell = session.run_cell("import atexit\natexit.register(echo, 'at exit')\necho('in cell')")
        assert cell.error is None, cell.error
        assert guest_threads() == before + 1
    assert guest_threads() == before
    assert calls == ["in cell"]


def test_a_context_larger_than_the_memory_cap_is_refused_as_such(tmp_path):
    """Loading a context the guest's cap cannot hold is not a sandbox failure
    to retry: it is ContextTooLarge, naming the sizes (the engine ends the
    run on it, activities/run_cell.py); a cap that holds it loads it."""
    from sandbox_wasm import ContextTooLarge

    path = tmp_path / "context.txt"
    path.write_text("x" * 40_000_000)
    small = tmp_path / "small" / "context.txt"
    small.parent.mkdir()
    small.write_text("x" * 20_000_000)
    with ReplSession(SandboxLimits(memory_bytes=32 * 1024**2)) as session:
        # Larger than the cap: refused by its size, nothing loaded.
        with pytest.raises(ContextTooLarge, match=r"^the context \(40\.0 MB\) does not fit in the REPL's memory cap of 32 MiB$"):
            session.load_context([path], "str")
        # Under the cap, but not with the interpreter beside it: the guest runs out of memory.
        with pytest.raises(ContextTooLarge, match=r"^the context \(20\.0 MB\) does not fit .* 32 MiB \(loading it ran out of memory\)$"):
            session.load_context([small], "str")
    with ReplSession(SandboxLimits(memory_bytes=256 * 1024**2)) as session:
        session.load_context([path], "str")
        assert session.run_cell("print(len(context))").output.strip() == "40000000"


def test_a_context_document_past_what_a_32_bit_guest_can_hold_is_refused_by_its_size(tmp_path, monkeypatch):
    """A 3 GB document failed inside the guest with OverflowError (one object
    of a wasm32 guest stays under 2 GiB), a sandbox failure retried like any
    other; it is refused by its size now, before anything is read. (The size
    limit is lowered here rather than writing a 2 GB file.)"""
    import sandbox_wasm.session as session_module
    from sandbox_wasm import ContextTooLarge

    monkeypatch.setattr(session_module, "MAX_DOCUMENT_BYTES", 1_000_000)
    path = tmp_path / "context.txt"
    path.write_text("x" * 1_500_000)
    with ReplSession(SandboxLimits(memory_bytes=4096 * 1024**2)) as session:
        with pytest.raises(ContextTooLarge, match=r"^a context document of 1\.5 MB is larger than a 32-bit WebAssembly guest can hold \(1\.0 MB at most\)$"):
            session.load_context([path], "str")
