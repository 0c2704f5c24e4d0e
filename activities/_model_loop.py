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

litellm's `acompletion` prepares each request in `run_in_executor` (its sync
`completion()`, which for an async call builds the request and returns the
coroutine that sends it). For a provider whose preparation does no I/O (a
static API key: OpenAI and compatible servers, Anthropic) the hop to a pool
thread and back costs more than it saves; a call made under
`inline_setup()` prepares its request on the loop's own thread instead.
Only that first executor job runs inline: later ones (aiohttp's DNS lookup,
which can block for seconds) go to the pool. Providers that may fetch
credentials while preparing (Bedrock, Vertex, Azure AD) keep the pool for
everything, so a slow token endpoint never stalls the loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable, Coroutine, Iterator
from contextvars import ContextVar
from typing import Any, TypeVar

__all__ = ["inline_setup", "on_model_loop"]

T = TypeVar("T")

_inline: ContextVar[bool] = ContextVar("rlm_model_call_inline_setup", default=False)


class _SetupExecutor(concurrent.futures.ThreadPoolExecutor):
    """The model loop's default executor: a pool, except for the first job
    of a call marked `inline_setup()`, which it runs at once on the calling
    thread (the loop's), returning a completed future."""

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        if not _inline.get():
            return super().submit(fn, *args, **kwargs)
        # `run_in_executor` calls this from the task itself, so this clears the
        # mark in the task's own context: its next jobs go to the pool.
        _inline.set(False)
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - delivered through the future, as the pool would
            future.set_exception(exc)
        else:
            future.set_result(result)
        return future


@contextlib.contextmanager
def inline_setup() -> Iterator[None]:
    """The first executor job this task starts (litellm's request
    preparation) runs on the model loop's thread; see the module docstring."""
    token = _inline.set(True)
    try:
        yield
    finally:
        _inline.reset(token)

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def _model_loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.new_event_loop()
            loop.set_default_executor(_SetupExecutor(thread_name_prefix="rlm-model-setup"))
            threading.Thread(target=loop.run_forever, name="rlm-model-calls", daemon=True).start()
            _loop = loop
        return _loop


async def on_model_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Await `coro` run on the model-call loop; cancelling the caller cancels it there."""
    loop = _model_loop()
    if asyncio.get_running_loop() is loop:
        return await coro
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))
