"""Who among a run's sub-calls may start now: the concurrency cap, and call
windows past it.

Items are admitted in arrival order, `cap` at a time, as a semaphore would.
An `llm_query` item may also be admitted past the cap, up to `cap` more (its
window), while no child run is open and the budget has room for a window of
calls like it beside full lanes. A window item waits inside its call group
for a lane: the group's activity starts it as soon as one of the group's
calls ends, without a round trip through the workflow, and the model never
sees more than `cap` calls of the run at once (workflows/call_groups.py
counts the lanes). A window's budget is reserved when its item starts, so
windows stop while less than two caps' worth of such calls is left (lanes
and a window may all be admitted in one step, before any of them reserves):
from there items are admitted as without windows.
"""
from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from workflows.budget import Remaining, Spend

# Dimensions a window's reservations count against.
_WINDOW_DIMS = ("usd", "tokens", "calls")


@dataclass
class _Waiter:
    kind: str
    worst: Spend | None
    future: asyncio.Future[bool]


class Admission:
    """Admits the items of one run (see the module docstring)."""

    def __init__(self, cap: int, remaining: Callable[[], Remaining]) -> None:
        self._cap = max(1, cap)
        self._remaining = remaining
        self._waiters: deque[_Waiter] = deque()
        self._in_lanes = 0
        self._in_window = 0
        self._children = 0

    @property
    def waiting(self) -> int:
        """Items not admitted yet."""
        return sum(1 for w in self._waiters if not w.future.done())

    async def enter(self, kind: str, worst: Spend | None) -> bool:
        """Wait for admission; True when admitted past the cap (a window
        item). `worst` is one attempt's reservation (llm items; None: no window)."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiters.append(_Waiter(kind, worst, future))
        self._pump()
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.leave(kind, future.result())  # admitted, then cancelled before it ran
            raise

    def leave(self, kind: str, windowed: bool) -> None:
        if windowed:
            self._in_window -= 1
        else:
            self._in_lanes -= 1
        if kind == "rlm":
            self._children -= 1
        self._pump()

    def _pump(self) -> None:
        """Admit from the head of the line while the head may start."""
        while self._waiters:
            head = self._waiters[0]
            if head.future.done():  # cancelled while waiting
                self._waiters.popleft()
                continue
            if self._in_lanes < self._cap and (head.kind != "rlm" or self._in_window == 0):
                self._in_lanes += 1
                windowed = False
            elif head.kind != "rlm" and self._window_open(head.worst):
                self._in_window += 1
                windowed = True
            else:
                return
            self._waiters.popleft()
            self._children += head.kind == "rlm"
            head.future.set_result(windowed)

    def _window_open(self, worst: Spend | None) -> bool:
        if worst is None or self._children or self._in_window >= self._cap:
            return False
        left = self._remaining()
        return all(
            getattr(left, dim) is None or getattr(left, dim) >= 2 * self._cap * getattr(worst, dim)
            for dim in _WINDOW_DIMS
        )
