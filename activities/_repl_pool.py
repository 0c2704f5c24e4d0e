"""Live REPL sessions kept on a worker between the cells of a run.

A run's next cell is warm when this worker still holds the session whose state
is the snapshot the cell starts from; otherwise a fresh session loads the
context and restores that snapshot from object storage (any worker can).

The pool also keeps the worker alive whatever guests do: the caps of all
live sessions stay within a memory budget (activities/_guest_memory.py), for
which the pool closes its least recently used idle sessions.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import OrderedDict
from typing import Any, Callable

import structlog

from activities._cell_host import CELL_HOST_NAMES, INSTANT_HOST_NAMES
from activities._guest_memory import MIB, EvictOneLocked, GuestMemory
from activities._live_repl import CANCEL_POLL_S, CheckoutCancelled, LiveRepl, Preparing, same_but_timeout
from activities._machine_memory import machine_memory_bytes
from sandbox_wasm import ReplSession, SandboxLimits, SandboxUnavailable

log = structlog.get_logger(__name__)

__all__ = ["ReplPool"]

BUSY_WAIT_S = 30.0
WARM_UP_MEMORY_BYTES = 64 * MIB  # a guest's boot needs ~10 MiB
# A checkout waits this long at most for the session `prepare` is making for
# its run (a 400 MB context loads in ~1 s), then makes its own.
PREPARE_WAIT_S = 60.0
# Sessions made ahead at once: they compete with cells for CPU, and one asked
# for while this many are made is skipped, not queued (a queued one could
# start after its cell and be made for nothing).
MAX_PREPARING = 2


class ReplPool:
    """At most `size` live sessions whose caps sum to at most `memory_budget`
    bytes; least recently used idle sessions are closed first."""

    def __init__(self, size: int = 8, *, memory_budget: int | None = None,
                 busy_wait_s: float = BUSY_WAIT_S) -> None:
        self._size = size
        self._lock = threading.Lock()
        """Guards the idle and preparing sessions and, shared, the memory's accounts."""
        budget = memory_budget if memory_budget is not None else machine_memory_bytes() // 2
        self._memory = GuestMemory(budget, self._lock, busy_wait_s)
        self._idle: OrderedDict[str, LiveRepl] = OrderedDict()
        self._preparing: dict[str, Preparing] = {}
        """Sessions being made ahead of their cell (`prepare`), by workflow id."""

    @property
    def memory_budget(self) -> int:
        return self._memory.budget

    @property
    def waiting_checkouts(self) -> int:
        """Checkouts waiting for guest memory."""
        return self._memory.waiting

    @property
    def returning_guests(self) -> int:
        """Guests back from a host call waiting to hold their whole cap again."""
        return self._memory.resuming

    @property
    def held_bytes(self) -> int:
        """Guest memory held: the caps of all live sessions, idle and checked
        out, less what guests waiting in host functions gave back."""
        return self._memory.held

    @property
    def idle_record_bytes(self) -> int:
        """Bytes of large REPL values the idle sessions hold on the host, beside
        their guests (0 while every state's records are in object storage)."""
        with self._lock:
            return sum(live.session.held_record_bytes for live in self._idle.values())

    def checkout(
        self,
        workflow_id: str,
        snapshot_key: str | None,
        limits: SandboxLimits,
        start: Callable[[LiveRepl], None],
        tools: dict[str, str] | None = None,
        cancel: threading.Event | None = None,
    ) -> tuple[LiveRepl, bool]:
        """A session in the state `snapshot_key`; True when it was warm.
        `tools` (name -> docstring) are host functions besides the standard
        ones (custom tools, `history`). Raises GuestMemoryTooLarge / GuestMemoryBusy when the cap does not fit,
        CheckoutCancelled when `cancel` is set while it waits (for memory, for the session being made)."""
        tools = dict(tools or {})
        cap = limits.memory_bytes
        self._memory.check_cap(cap)
        with self._lock:
            preparing = self._preparing.get(workflow_id)
        if preparing is not None:
            # `abandoned` is set under the lock the maker reads it under, so a
            # session is either checked in before the mark or closed after it.
            try:
                if not _wait_unless_cancelled(preparing.ready, PREPARE_WAIT_S, cancel):
                    with self._lock:
                        preparing.abandoned = True  # made too late: this cell makes its own
            except CheckoutCancelled:
                with self._lock:
                    preparing.abandoned = True  # no cell of the run will take it
                raise
        stale = None
        with self._lock:
            live = self._idle.pop(workflow_id, None)
            if snapshot_key is not None and (live is None or live.snapshot_key != snapshot_key):
                # A run that starts from another workflow's snapshot (a session's
                # next question) takes the REPL that is in exactly that state.
                other = self._idle_in_state_locked(snapshot_key)
                if other is not None:
                    stale, live = live, self._idle.pop(other)
        if stale is not None:
            self._close([stale])
        if live is not None and live.snapshot_key == snapshot_key and same_but_timeout(live.limits, limits) and live.tools == tools:
            # A cell's timeout shrinks near the run's deadline; the session reads it per cell.
            live.limits = live.session.limits = limits
            return live, True
        if live is not None:
            self._close([live])
        self._reserve(cap, cancel)
        return self._make(cap, limits, start, tools), False

    def prepare(
        self,
        workflow_id: str,
        snapshot_key: str | None,
        limits: SandboxLimits,
        start: Callable[[LiveRepl], None],
        tools: dict[str, str] | None = None,
    ) -> bool:
        """Start making, on a thread of its own, the session a run's next cell
        will check out (while the run's model answers); True if started. It
        takes memory as that checkout would, closing the least recently used
        idle sessions (often of runs that have ended), never waiting for busy
        ones. Not when this worker holds a session in that state, a cell waits
        for memory, MAX_PREPARING are being made, or idle sessions cannot make
        room. A checkout for the run waits for it; a failure is logged, and
        the cell makes its own session."""
        tools = dict(tools or {})
        cap = limits.memory_bytes
        evicted: list[LiveRepl] = []
        with self._lock:
            held = self._idle.get(workflow_id)
            if (
                (held is not None and held.snapshot_key == snapshot_key)
                or (snapshot_key is not None and self._idle_in_state_locked(snapshot_key) is not None)
                or workflow_id in self._preparing
                or len(self._preparing) >= MAX_PREPARING
                or not self._memory.reserve_now_locked(cap, self._idle.values(), self._evictor(evicted))
            ):
                return False
            self._preparing[workflow_id] = preparing = Preparing()
        for live in evicted:  # closed outside the lock; their caps were given back above
            self._finish(live)

        def make() -> None:
            try:
                live = self._make(cap, limits, start, tools)
            except Exception:  # noqa: BLE001 - the cell makes its own session and reports what fails there
                log.warning("repl_pool.prepare_failed", workflow_id=workflow_id, exc_info=True)
                self._prepared(workflow_id, preparing)
                return
            with self._lock:  # a cell that gave up waiting made its own, maybe newer
                kept = not preparing.abandoned and workflow_id not in self._idle
            if kept:
                self.checkin(workflow_id, live)
            else:
                self._close([live])
            self._prepared(workflow_id, preparing)  # idle by now, where the waiting checkout looks

        try:
            threading.Thread(target=make, name="repl-prepare", daemon=True).start()
        except RuntimeError:  # no thread to be had: give the reservation back
            self._memory.release(cap)
            self._prepared(workflow_id, preparing)
            return False
        return True

    def _idle_in_state_locked(self, snapshot_key: str) -> str | None:
        """The run whose idle session is in the state `snapshot_key` (a
        session's next question starts from its last one's), or None."""
        return next((k for k, v in self._idle.items() if v.snapshot_key == snapshot_key), None)

    def _prepared(self, workflow_id: str, preparing: Preparing) -> None:
        with self._lock:
            self._preparing.pop(workflow_id, None)
        preparing.ready.set()

    def _make(self, cap: int, limits: SandboxLimits, start: Callable[[LiveRepl], None], tools: dict[str, str]) -> LiveRepl:
        """A started session holding `cap` (reserved by the caller)."""
        host: dict[str, Any] = {}
        made: list[LiveRepl] = []  # the session's LiveRepl, once made
        # The session calls whichever host functions the current cell installed.
        functions = {name: self._forward(made, host, name, lend=name not in INSTANT_HOST_NAMES)
                     for name in CELL_HOST_NAMES}
        functions.update({name: self._forward(made, host, name, doc) for name, doc in tools.items()})
        try:
            session = ReplSession(limits=limits, host_functions=functions)
        except BaseException:
            self._memory.release(cap)
            raise
        live = LiveRepl(session=session, limits=limits, snapshot_key=None, host=host, tools=tools)
        made.append(live)
        self._memory.assign(live, cap)  # the reservation now belongs to this session
        try:
            start(live)
        except BaseException:
            self._close([live])  # a half-started session is freed, never kept
            raise
        return live

    def checkin(self, workflow_id: str, live: LiveRepl) -> None:
        evicted: list[LiveRepl] = []
        live.idle_since = time.monotonic()
        with self._lock:
            old = self._idle.pop(workflow_id, None)
            if old is not None and old is not live:
                evicted.append(old)
            self._idle[workflow_id] = live
            while len(self._idle) > self._size:
                evicted.append(self._idle.popitem(last=False)[1])
            # A checked-in session is idle: a waiting checkout may close it.
            self._memory.wake_waiters_locked()
        self._close(evicted)

    def evict_idle(self, max_idle_s: float) -> int:
        """Close the sessions idle for more than `max_idle_s` seconds (an idle
        run or session holds no guest memory for long); how many were closed."""
        cutoff = time.monotonic() - max_idle_s
        with self._lock:
            old = [key for key, live in self._idle.items() if live.idle_since < cutoff]
            lives = [self._idle.pop(key) for key in old]
        self._close(lives)
        if lives:
            log.info("repl_pool.evicted_idle", sessions=len(lives), max_idle_s=max_idle_s)
        return len(lives)

    def discard(self, live: LiveRepl) -> None:
        self._close([live])

    @staticmethod
    def warm_up(on_unavailable: Callable[[SandboxUnavailable], None] | None = None) -> threading.Thread:
        """Boot and close one REPL in the background, so the first cell finds
        the sandbox's module loaded (compiled on a worker's first start: ~4.4 s)
        and its boot image taken (~0.16 s). Its small cap is not counted in
        the budget for those moments. `on_unavailable` is called (on that
        thread) if no guest can start here at all."""
        thread = threading.Thread(target=_warm_up, args=(on_unavailable,), name="repl-warm-up", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        with self._lock:
            lives, self._idle = list(self._idle.values()), OrderedDict()
        self._close(lives)

    # -- making room ---------------------------------------------------------------
    def _reserve(self, cap: int, cancel: threading.Event | None = None) -> None:
        """Count `cap` as held (GuestMemory.reserve), closing the idle
        sessions it evicts for room, even when it then refuses."""
        evicted: list[LiveRepl] = []
        try:
            held = self._memory.reserve(cap, self._evictor(evicted), cancel)
        finally:
            # Closed outside the lock; their caps were already given back.
            for live in evicted:
                self._finish(live)
        if evicted:
            log.info("repl_pool.evicted_for_memory", sessions=len(evicted), held_mib=held // MIB,
                     budget_mib=self._memory.budget // MIB)

    def _evictor(self, evicted: list[LiveRepl]) -> EvictOneLocked:
        return functools.partial(self._evict_idle_locked, evicted)

    def _evict_idle_locked(self, evicted: list[LiveRepl]) -> LiveRepl | None:
        """Take the least recently used idle session out, into `evicted` (the
        memory gives its cap back; the caller closes it outside the lock), or
        None when no session is idle."""
        if not self._idle:
            return None
        live = self._idle.popitem(last=False)[1]
        evicted.append(live)
        return live

    # -- host calls --------------------------------------------------------------
    def _forward(self, made: list[LiveRepl], host: dict[str, Any], name: str,
                 doc: str | None = None, *, lend: bool = True) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if not lend:
                return host[name](*args, **kwargs)
            evicted: list[LiveRepl] = []  # to take the lent part back
            try:
                with self._memory.lent(made[0], self._evictor(evicted)):
                    return host[name](*args, **kwargs)
            finally:
                for victim in evicted:
                    self._finish(victim)

        call.__name__ = name
        call.__doc__ = doc
        return call

    def _close(self, lives: list[LiveRepl]) -> None:
        self._memory.release_sessions(lives)
        for live in lives:
            self._finish(live)

    @staticmethod
    def _finish(live: LiveRepl) -> None:
        try:
            live.session.close()
        finally:
            callbacks, live.on_close = live.on_close, []
            for callback in callbacks:
                callback()


def _wait_unless_cancelled(event: threading.Event, timeout: float, cancel: threading.Event | None) -> bool:
    """`event.wait(timeout)`, given up (CheckoutCancelled) once `cancel` is set."""
    if cancel is None:
        return event.wait(timeout)
    deadline = time.monotonic() + timeout
    while not event.wait(max(0.0, min(CANCEL_POLL_S, deadline - time.monotonic()))):
        if cancel.is_set():
            raise CheckoutCancelled("the cell was cancelled while its REPL was being made")
        if time.monotonic() >= deadline:
            return False
    return True


def _warm_up(on_unavailable: Callable[[SandboxUnavailable], None] | None) -> None:
    try:
        with ReplSession(limits=SandboxLimits(memory_bytes=WARM_UP_MEMORY_BYTES)).start():
            pass
    except SandboxUnavailable as exc:
        if on_unavailable is None:
            log.error("repl_pool.sandbox_unavailable", error=str(exc))
        else:
            on_unavailable(exc)
    except Exception:  # the first cell boots as it would have; say why this did not
        log.exception("repl_pool.warm_up_failed")

