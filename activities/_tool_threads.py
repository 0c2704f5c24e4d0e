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
        self._lock = threading.Lock()
        self._taken = 0

    async def run(self, fn: Callable[[], Any]) -> Any:
        """`fn()` on a thread of its own; raises ToolThreadsBusy when `size`
        calls are still running. Daemon threads: a hung call must not keep
        the worker from exiting (a pool's threads are joined at exit)."""
        with self._lock:
            if self._taken >= self.size:
                raise ToolThreadsBusy(
                    f"all {self.size} tool threads of this worker are running earlier calls "
                    "(calls that passed their timeout keep their thread until they return): the tool was not called"
                )
            self._taken += 1
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Any] = loop.create_future()

        def settle(value: Any, error: BaseException | None) -> None:
            if done.cancelled():
                return
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(value)

        def call() -> None:
            value, error = None, None
            try:
                value = fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting call
                error = exc
            finally:
                with self._lock:
                    self._taken -= 1
            try:
                loop.call_soon_threadsafe(settle, value, error)
            except RuntimeError:  # the worker's loop is closed: nobody waits any more
                pass

        try:
            threading.Thread(target=call, name="rlm-tool", daemon=True).start()
        except BaseException:
            with self._lock:
                self._taken -= 1
            raise
        return await done
