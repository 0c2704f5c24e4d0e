"""Admission of a run's sub-calls (workflows/admission.py): the cap, windows
past it for llm_query calls, children never beside a window, windows closed
when the budget is short, and waiters that give up. Pure logic, no servers."""

from __future__ import annotations

import asyncio

from workflows.admission import Admission
from workflows.budget import Remaining, Spend

ONE_CALL = Spend(usd=0.01, tokens=100, calls=1)
UNLIMITED = Remaining(usd=None, tokens=None, calls=None)


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def _enter(admission: Admission, kind: str, worst: Spend | None = ONE_CALL) -> asyncio.Task[bool]:
    return asyncio.ensure_future(admission.enter(kind, worst))


def test_items_past_the_cap_wait_and_llm_calls_fill_a_window_first():
    async def scenario():
        admission = Admission(2, lambda: UNLIMITED)
        tasks = [_enter(admission, "llm") for _ in range(6)]
        await _settle()
        assert [t.result() for t in tasks[:4]] == [False, False, True, True]  # two lanes, then two windowed
        assert not any(t.done() for t in tasks[4:]) and admission.waiting == 2
        admission.leave("llm", windowed=False)
        await _settle()
        assert tasks[4].result() is False and not tasks[5].done()  # in arrival order
        admission.leave("llm", windowed=True)
        await _settle()
        assert tasks[5].result() is True and admission.waiting == 0

    asyncio.run(scenario())


def test_a_child_never_runs_beside_a_window_nor_opens_one():
    async def scenario():
        admission = Admission(2, lambda: UNLIMITED)
        calls = [_enter(admission, "llm") for _ in range(3)]
        await _settle()
        child = _enter(admission, "rlm", None)
        admission.leave("llm", windowed=False)
        await _settle()
        # A lane is free, but a windowed call is in flight: the child waits.
        assert [c.result() for c in calls] == [False, False, True] and not child.done()
        admission.leave("llm", windowed=True)
        await _settle()
        assert child.result() is False
        admission.leave("llm", windowed=False)  # the child and no call hold lanes
        # While the child runs, a call past the cap waits for a lane instead of a window.
        more = [_enter(admission, "llm") for _ in range(2)]
        await _settle()
        assert more[0].result() is False and not more[1].done()
        admission.leave("rlm", windowed=False)
        await _settle()
        assert more[1].result() is False

    asyncio.run(scenario())


def test_windows_close_while_less_than_two_caps_of_calls_is_left():
    async def scenario():
        left = {"calls": 4}
        admission = Admission(2, lambda: Remaining(usd=None, tokens=None, calls=left["calls"]))
        tasks = [_enter(admission, "llm") for _ in range(5)]
        await _settle()
        # Room for 4 calls: two lanes and a window of two.
        assert [t.done() for t in tasks] == [True, True, True, True, False]
        left["calls"] = 3  # reservations and settled calls leave less than two caps' worth
        admission.leave("llm", windowed=True)
        await _settle()
        assert not tasks[4].done()  # no window: it waits for a lane
        admission.leave("llm", windowed=False)
        await _settle()
        assert tasks[4].result() is False

    asyncio.run(scenario())


def test_a_waiter_that_gives_up_loses_nothing_and_holds_nothing():
    async def scenario():
        admission = Admission(1, lambda: UNLIMITED)
        first = _enter(admission, "rlm", None)
        await _settle()
        gone, after = _enter(admission, "rlm", None), _enter(admission, "llm")
        await _settle()
        gone.cancel()
        await _settle()
        assert admission.waiting == 1
        admission.leave("rlm", windowed=False)
        await _settle()
        assert first.result() is False and after.result() is False

    asyncio.run(scenario())
