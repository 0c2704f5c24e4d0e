"""The guest memory a worker's live REPL sessions hold (activities/_repl_pool.py).

Every session may grow its linear memory up to its cap, so the caps of all
live sessions (idle and checked out) together stay within a memory budget. A
new session first makes room by closing idle ones; when busy ones hold the
budget it waits a bounded time, then refuses (the cell is retried, maybe on
another worker).

A guest waiting in a host function (its sub-calls, most of a cell's time)
cannot grow: only its own code grows its memory. Meanwhile it holds only
what it has grown to, and the rest of its cap goes back to the budget for
other sessions; it takes that back before it runs again, ahead of any new
session. With caps of 2 GiB and a 12 GiB budget, six cells ran at once and
100 runs queued for memory while their guests waited on the model.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Callable

import structlog

from activities._live_repl import CANCEL_POLL_S, CheckoutCancelled, GuestMemoryBusy, GuestMemoryTooLarge, LiveRepl

log = structlog.get_logger(__name__)

__all__ = ["EvictOneLocked", "GuestMemory", "MIB"]

MIB = 1024 * 1024

EvictOneLocked = Callable[[], "LiveRepl | None"]
"""The pool's least recently used idle session, taken out of the pool (the
caller closes it outside the lock), or None when no session is idle."""


class GuestMemory:
    """The caps of live sessions counted against `budget` bytes.

    It shares the pool's lock: making room closes the pool's idle sessions
    (`evict_one_locked`) while holding it. Methods named `..._locked` expect
    the caller to hold it; the others take it."""

    def __init__(self, budget: int, lock: threading.Lock, busy_wait_s: float) -> None:
        self._budget = budget
        self._busy_wait_s = busy_wait_s
        self._released = threading.Condition(lock)
        self._caps: dict[int, int] = {}  # id(live) -> its cap, for every live session
        self._lent: dict[int, int] = {}  # id(live) -> the part of its cap given back during a host call
        self._held = 0
        self._waiting: deque[object] = deque()
        """Cells waiting for guest memory, first come first served."""
        self._resuming = 0
        """Guests back from a host call waiting to take back their cap."""

    @property
    def budget(self) -> int:
        return self._budget

    @property
    def held(self) -> int:
        """The caps of all live sessions, idle and checked out, less what
        guests waiting in host functions gave back."""
        with self._released:
            return self._held

    @property
    def waiting(self) -> int:
        """Checkouts waiting for guest memory."""
        with self._released:
            return len(self._waiting)

    @property
    def resuming(self) -> int:
        """Guests back from a host call waiting to hold their whole cap again."""
        with self._released:
            return self._resuming

    def check_cap(self, cap: int) -> None:
        """Raises GuestMemoryTooLarge when `cap` exceeds the whole budget."""
        if cap > self._budget:
            raise GuestMemoryTooLarge(
                f"the REPL memory cap of {cap // MIB} MiB exceeds this worker's whole guest memory "
                f"budget of {self._budget // MIB} MiB; lower the run's limits.cell_memory_mb or raise "
                "RLM_GUEST_MEMORY_SHARE (the share of the machine's memory guests may hold)"
            )

    def reserve(self, cap: int, evict_one_locked: EvictOneLocked, cancel: threading.Event | None = None) -> int:
        """Count `cap` as held, closing idle sessions or waiting for busy ones;
        the bytes held then. Raises GuestMemoryBusy past the bounded wait,
        CheckoutCancelled once `cancel` is set (a cancelled run's cell must
        not wait 30 s for memory it will not use).

        Waiters are served in arrival order. Woken all at once, the waiters
        used to race for the memory a finished cell gave back: with 100 runs
        at once some lost every race until their 30 s ran out, and their
        cells were retried 5 s later (5-34 `GuestMemoryBusy` retries per
        bench_many_runs run, 40-56 s in all)."""
        deadline = time.monotonic() + self._busy_wait_s
        turn = object()
        with self._released:
            self._waiting.append(turn)
            try:
                while self._waiting[0] is not turn or self._resuming or self._held + cap > self._budget:
                    # Before making room: a cancelled cell must not close other runs' idle REPLs.
                    if cancel is not None and cancel.is_set():
                        raise CheckoutCancelled("the cell was cancelled while it waited for guest memory")
                    if self._waiting[0] is turn and not self._resuming and self._evict_locked(evict_one_locked):
                        continue
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise GuestMemoryBusy(
                            f"this worker's guests already hold {self._held // MIB} MiB of its "
                            f"{self._budget // MIB} MiB guest memory budget and a new REPL needs "
                            f"{cap // MIB} MiB more; the cell is retried"
                        )
                    self._released.wait(left if cancel is None else min(left, CANCEL_POLL_S))
                self._held += cap
                return self._held
            finally:
                self._waiting.remove(turn)
                self._released.notify_all()  # the next in line may fit now

    def reserve_now_locked(self, cap: int, idle: Iterable[LiveRepl], evict_one_locked: EvictOneLocked) -> bool:
        """Count `cap` as held if closing the `idle` sessions can make room,
        closing as few as needed and never waiting; True if held. Not while a
        checkout waits for memory or a guest takes its cap back: they go first."""
        if self._waiting or self._resuming or self._held - sum(self._caps.get(id(v), 0) for v in idle) + cap > self._budget:
            return False
        while self._held + cap > self._budget and self._evict_locked(evict_one_locked):
            pass
        self._held += cap
        return True

    def assign(self, live: LiveRepl, cap: int) -> None:
        """The reservation of `cap` now belongs to the session `live`."""
        with self._released:
            self._caps[id(live)] = cap

    def release(self, cap: int) -> None:
        """Give back a reservation no session was made for."""
        with self._released:
            self._held -= cap
            self._released.notify_all()

    def release_sessions(self, lives: list[LiveRepl]) -> None:
        """Give back the caps of sessions being closed (less what they lent)."""
        with self._released:
            for live in lives:
                self._held -= self._caps.pop(id(live), 0) - self._lent.pop(id(live), 0)
            if lives:
                self._released.notify_all()

    def wake_waiters_locked(self) -> None:
        """Memory may be had now (e.g. an idle session a waiter may close)."""
        self._released.notify_all()

    @contextlib.contextmanager
    def lent(self, live: LiveRepl, evict_one_locked: EvictOneLocked) -> Iterator[None]:
        """During a host call: give back the part of the session's cap its
        guest has not grown to, and take it back before the guest runs again."""
        spare = max(0, live.limits.memory_bytes - live.session.guest_memory_bytes)
        with self._released:
            if spare and id(live) in self._caps and id(live) not in self._lent:
                self._held -= spare
                self._lent[id(live)] = spare
                self._released.notify_all()
            else:
                spare = 0
        try:
            yield
        finally:
            if spare:
                self._take_back(live, evict_one_locked)

    def _take_back(self, live: LiveRepl, evict_one_locked: EvictOneLocked) -> None:
        """Hold a returning guest's whole cap again. Returning guests go before
        new sessions and close idle ones, so the guest that entered a host
        call last always fits: no guest has grown since it gave memory back.
        The wait is bounded all the same; past it the guest runs anyway (the
        budget is overrun by what it takes back, and logged) rather than fail
        a cell whose sub-calls are done."""
        deadline = time.monotonic() + self._busy_wait_s
        with self._released:
            self._resuming += 1
            try:
                spare = self._lent.get(id(live), 0)
                while spare and self._held + spare > self._budget:
                    if self._evict_locked(evict_one_locked):
                        continue
                    left = deadline - time.monotonic()
                    if left <= 0:
                        log.warning("repl_pool.over_budget", held_mib=self._held // MIB,
                                    budget_mib=self._budget // MIB, taken_back_mib=spare // MIB)
                        break
                    self._released.wait(left)
                if id(live) in self._caps:
                    self._held += self._lent.pop(id(live), 0)
            finally:
                self._resuming -= 1
                self._released.notify_all()

    def _evict_locked(self, evict_one_locked: EvictOneLocked) -> bool:
        """Close the pool's least recently used idle session, giving its cap
        back (the pool closes it outside the lock); False when none is idle."""
        live = evict_one_locked()
        if live is None:
            return False
        self._held -= self._caps.pop(id(live), 0)
        return True
