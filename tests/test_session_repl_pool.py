"""What sessions need of a worker's REPL pool (real sessions, no servers):
a run that starts from another workflow's snapshot (a session's next
question) gets the warm REPL that is in exactly that state, and REPLs idle
past a limit are closed, so an idle session holds no guest memory."""

from __future__ import annotations

import time

import pytest

from activities._live_repl import LiveRepl
from activities._repl_pool import ReplPool
from sandbox_wasm import SandboxError, SandboxLimits

MIB = 1024 * 1024
CAP = SandboxLimits(cell_timeout_s=5.0, memory_bytes=128 * MIB)


def _start(live: LiveRepl) -> None:
    live.session.start()


@pytest.fixture
def pool():
    pool = ReplPool(memory_budget=600 * MIB, busy_wait_s=0.2)
    yield pool
    pool.close()


def test_a_run_starting_from_another_workflows_snapshot_takes_its_warm_repl(pool: ReplPool) -> None:
    session, _ = pool.checkout("sess", None, CAP, _start)
    session.session.run_cell("kept = 41")
    session.snapshot_key = "sess/snapshots/q1r.bin"
    pool.checkin("sess", session)
    question, warm = pool.checkout("sess/q2", "sess/snapshots/q1r.bin", CAP, _start)
    assert warm and question is session
    assert question.session.run_cell("print(kept + 1)").output.strip() == "42"
    # Another state is another REPL: nothing warm for a key no REPL is in.
    other, warm = pool.checkout("sess/q3", "sess/snapshots/unknown.bin", CAP, lambda live: None)
    assert not warm and other is not session
    pool.discard(other)
    pool.checkin("sess/q2", question)


def test_repls_idle_past_the_limit_are_closed(pool: ReplPool) -> None:
    a, _ = pool.checkout("run-a", None, CAP, _start)
    b, _ = pool.checkout("run-b", None, CAP, _start)
    pool.checkin("run-a", a)
    pool.checkin("run-b", b)
    assert pool.evict_idle(3600.0) == 0
    a.idle_since -= 7200.0  # as if idle for two hours
    assert pool.evict_idle(3600.0) == 1
    assert pool.held_bytes == 128 * MIB
    with pytest.raises(SandboxError, match="not started"):
        a.session.run_cell("1")
    again, warm = pool.checkout("run-b", None, CAP, _start)
    assert warm and again is b
    pool.checkin("run-b", b)


def test_a_repl_prepared_while_the_model_answers_is_the_one_its_cell_checks_out(pool: ReplPool) -> None:
    """`prepare` (the run's first root turn) makes the REPL its cell will need;
    the cell checks it out warm, also when the run's deadline cut the cell's
    timeout. Nothing is prepared where a REPL in that state is held already,
    or where its cap does not fit as things are."""
    assert pool.prepare("run-p", None, CAP, _start)
    live, warm = pool.checkout("run-p", None, CAP, _start)  # waits for it
    assert warm and live.session.run_cell("print(6 * 7)").output.strip() == "42"
    pool.checkin("run-p", live)
    assert not pool.prepare("run-p", None, CAP, _start)  # held already, idle
    cut = SandboxLimits(cell_timeout_s=1.5, memory_bytes=CAP.memory_bytes)
    again, warm = pool.checkout("run-p", None, cut, _start)
    assert warm and again is live and again.session.limits.cell_timeout_s == 1.5
    big = SandboxLimits(cell_timeout_s=5.0, memory_bytes=500 * MIB)
    assert not pool.prepare("run-q", None, big, _start)  # 128 busy + 500 > 600: busy ones are not waited for
    assert pool.held_bytes == 128 * MIB
    pool.checkin("run-p", again)
    # Idle ones (often of runs that ended) make room, as for the cell's own checkout.
    assert pool.prepare("run-q", None, big, _start)
    made, warm = pool.checkout("run-q", None, big, _start)
    assert warm and pool.held_bytes == 500 * MIB
    pool.checkin("run-q", made)


def test_a_cell_waits_for_the_repl_being_prepared_for_it_instead_of_making_a_second(pool: ReplPool) -> None:
    import threading

    started, release = threading.Event(), threading.Event()

    def slow_start(live: LiveRepl) -> None:  # a large context loading
        live.session.start()
        started.set()
        release.wait(10)

    assert pool.prepare("run-w", None, CAP, slow_start)
    assert not pool.prepare("run-w", None, CAP, slow_start)  # being made
    assert started.wait(10)
    made: list[tuple[LiveRepl, bool]] = []
    checkout = threading.Thread(target=lambda: made.append(pool.checkout("run-w", None, CAP, _start)))
    checkout.start()
    checkout.join(0.3)
    assert checkout.is_alive()  # waiting for the prepared REPL, not booting its own
    release.set()
    checkout.join(10)
    live, warm = made[0]
    assert warm and pool.held_bytes == 128 * MIB
    pool.checkin("run-w", live)


def test_a_prepare_that_fails_or_comes_too_late_leaves_the_cell_its_own_repl(pool: ReplPool, monkeypatch) -> None:
    import threading

    from activities import _repl_pool

    def broken(live: LiveRepl) -> None:
        raise OSError("the context could not be read")

    assert pool.prepare("run-f", None, CAP, broken)
    live, warm = pool.checkout("run-f", None, CAP, _start)  # waits, then makes its own
    assert not warm and live.session.run_cell("print(1)").output.strip() == "1"
    assert pool.held_bytes == 128 * MIB
    pool.checkin("run-f", live)

    # A cell that stops waiting makes its own; the late one is closed, not kept over it.
    monkeypatch.setattr(_repl_pool, "PREPARE_WAIT_S", 0.05)
    release = threading.Event()
    assert pool.prepare("run-l", None, CAP, lambda live: (live.session.start(), release.wait(10)))
    own, warm = pool.checkout("run-l", None, CAP, _start)
    assert not warm
    pool.checkin("run-l", own)
    release.set()
    deadline = time.monotonic() + 10
    while pool.held_bytes != 2 * 128 * MIB:  # polling for an observed fact: the late session closed (run-f's stays)
        assert time.monotonic() < deadline, pool.held_bytes
        time.sleep(0.01)
    again, warm = pool.checkout("run-l", None, CAP, _start)
    assert warm and again is own
    pool.checkin("run-l", again)
