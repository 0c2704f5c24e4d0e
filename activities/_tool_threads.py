"""Threads for the custom tools that are plain (sync) functions.

Python cannot stop a thread: a tool that hangs past its call's timeout keeps
its thread until it returns, if ever. On the pool every S3 read and write of
the worker uses, 64 such calls stopped every run of the worker, tools or not
(found by review). Tools get threads of their own, a bounded number, and a
call that finds them all taken fails at once, saying why, instead of queueing
behind calls that may never end.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["TOOL_THREADS", "ToolThreads", "ToolThreadsBusy"]

TOOL_THREADS = 16
"""Sync tool calls one worker runs at once (calls past their timeout included)."""


class ToolThreadsBusy(RuntimeError):
    """Every tool thread is taken: the call was not started."""


class ToolThreads:
    def __init__(self, size: int = TOOL_THREADS) -> None:
        self.size = size
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=size, thread_name_prefix="rlm-tool")
        self._lock = threading.Lock()
        self._taken = 0

    @property
    def taken(self) -> int:
        """Threads running a call now (a call that timed out holds one until it returns)."""
        return self._taken

    async def run(self, fn: Callable[[], Any]) -> Any:
        """`fn()` on a tool thread; raises ToolThreadsBusy when none is free."""
        with self._lock:
            if self._taken >= self.size:
                raise ToolThreadsBusy(
                    f"all {self.size} tool threads of this worker are running earlier calls "
                    "(calls that passed their timeout keep their thread until they return): the tool was not called"
                )
            self._taken += 1

        try:
            future = self._pool.submit(fn)
        except BaseException:
            self._release(None)
            raise
        # Released when the call ends, or when it is cancelled before it started.
        future.add_done_callback(self._release)
        return await asyncio.wrap_future(future)

    def _release(self, _future: concurrent.futures.Future | None) -> None:
        with self._lock:
            self._taken -= 1
