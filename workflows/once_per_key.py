"""Steps that run once per key in a run, however often a cell asks for them.

A cell re-run after a crash asks again for what it asked before (the same
sub-call, the same tool call, named by what is asked). The first ask starts
the step; an ask while it runs waits for the same task; an ask after it
succeeded is answered from memory, so no model or tool is called twice. A
step that failed or was cancelled is forgotten: the next ask starts it anew.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

__all__ = ["OncePerKey"]

T = TypeVar("T")


class OncePerKey(Generic[T]):
    """The running and finished steps of one run, by key."""

    def __init__(self) -> None:
        self._answers: dict[str, T] = {}
        self._running: dict[str, asyncio.Task[T]] = {}

    def ask(self, key: str, start: Callable[[], Awaitable[T]]) -> Awaitable[T]:
        """The step's answer: remembered, in flight, or started now by `start()`."""
        if key in self._answers:
            return _answered(self._answers[key])
        task = self._running.get(key)
        if task is None:
            task = asyncio.ensure_future(start())
            self._running[key] = task
            task.add_done_callback(lambda t, k=key: self._finished(k, t))
        return task

    def running(self) -> int:
        """Steps started and not yet ended (a cancelled one runs until it stops)."""
        return len(self._running)

    def cancel_running(self) -> None:
        for task in list(self._running.values()):
            task.cancel()

    def _finished(self, key: str, task: asyncio.Task[T]) -> None:
        self._running.pop(key, None)
        if not task.cancelled() and task.exception() is None:
            self._answers[key] = task.result()


async def _answered(answer: T) -> T:
    # A coroutine that returns at once: awaiting it does not yield to the
    # event loop, so a remembered answer adds no step to the workflow.
    return answer
