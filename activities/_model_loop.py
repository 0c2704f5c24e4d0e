"""Model calls run on an event loop of their own, in a thread of their own.

litellm does seconds of CPU work inside the event loop that awaits it: its
import, and on each failed call several scans of the provider's error text
(secret redaction: ~0.4 s per 100 KB error here). On the worker's own loop
that starves every other activity's heartbeat: a cell waiting on 30 refused
sub-calls missed its 10 s heartbeat timeout and was retried
(tests/test_payload_bounds.py). On a loop in another thread, Python's GIL
switching (every 5 ms) keeps the worker's loop answering while litellm works.

All litellm calls go to the one loop, so the HTTP clients litellm caches
stay bound to a loop that lives as long as the process.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["on_model_loop"]

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def _model_loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="rlm-model-calls", daemon=True).start()
            _loop = loop
        return _loop


async def on_model_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Await `coro` run on the model-call loop; cancelling the caller cancels it there."""
    loop = _model_loop()
    if asyncio.get_running_loop() is loop:
        return await coro
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))
