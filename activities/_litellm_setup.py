"""The one place litellm is imported: offline, quiet, without retries of its
own, and only when first used.

Import `litellm` from here (`from activities._litellm_setup import litellm`),
never directly, so these settings always apply before its first use.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import warnings
from collections.abc import Iterator
from contextvars import ContextVar
from types import ModuleType

# Without this litellm downloads its price list at import time (no internet on
# workers, and prices must not change under a running budget).
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
# Telemetry / feedback banners are noise in a worker's log.
os.environ.setdefault("LITELLM_LOG", "ERROR")



@functools.cache
def _loaded() -> ModuleType:
    """Import litellm once and apply the settings below before anyone uses it."""
    module = importlib.import_module("litellm")
    # No "Give Feedback / Get Help" banners printed on every exception.
    module.suppress_debug_info = True
    module.set_verbose = False
    # Token counting must never fetch a tokenizer from the internet; tiktoken's
    # bundled encodings are close enough for estimates and budget reservations.
    module.disable_hf_tokenizer_download = True
    # Prompts may hold user data: keep them out of litellm's own logging hooks.
    module.turn_off_message_logging = True
    # litellm's pydantic models emit one UserWarning per TypedDict on first use.
    warnings.filterwarnings("ignore", message=r".*ReadOnly.* qualifier", category=UserWarning)
    for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy", "httpx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # Models with `"client": "direct"` are sent by our handler (imported here:
    # it needs litellm, and this module must stay cheap to import).
    from activities._direct_openai import register

    register(module)
    return module


# litellm's logging registries; a call with all of them empty logs to no one.
_CALLBACK_LISTS = (
    "callbacks",
    "input_callback",
    "success_callback",
    "failure_callback",
    "service_callback",
    "_async_input_callback",
    "_async_success_callback",
    "_async_failure_callback",
)


def callbacks_registered() -> bool:
    """Whether anyone registered a litellm logging callback (an operator's own
    logging); the worker registers none."""
    module = _loaded()
    return any(getattr(module, name, None) for name in _CALLBACK_LISTS)


@functools.cache
def _internal_call_flag() -> ContextVar[bool] | None:
    """litellm's "internal sub-call" flag (`litellm._internal_context`), or
    None in a litellm without it: then calls simply keep their logging."""
    try:
        from litellm._internal_context import is_internal_call
    except ImportError:
        return None
    return is_internal_call if isinstance(is_internal_call, ContextVar) else None


@contextlib.contextmanager
def unlogged_call() -> Iterator[None]:
    """Run one litellm call without its logging pipeline, when nothing would
    receive the log: no callback of any kind is registered (the worker
    registers none).

    litellm builds a standard logging payload for every reply (copies and
    redacts the messages, prices the reply again, schedules success hooks,
    and a thread-pool task for sync ones) even with no callback to hand it
    to: ~0.7 of its ~4.8 ms of CPU per call (bench: 2,000 calls at 32 in
    flight), on the thread every model call of the worker shares. Its
    "internal sub-call" flag skips exactly that pipeline (and litellm's own
    proxy budget hooks, which we do not use); the request, the reply, its
    `_hidden_params` price and exception mapping are unchanged. With a
    callback registered (an operator's own logging), calls are logged as before.
    """
    flag = _internal_call_flag()
    if flag is None or callbacks_registered():
        yield
        return
    token = flag.set(True)
    try:
        yield
    finally:
        flag.reset(token)


def preload() -> None:
    """Import litellm now. Workers call this before they poll: imported on
    first use, inside an async activity, it blocks the worker's event loop
    for seconds (3.7 s of CPU, far more on a busy machine), long enough for
    every activity of the worker to miss its heartbeat timeout and be
    retried (seen in tests/test_chaos_kills.py: a calm run charged a root
    turn twice)."""
    _loaded()


class _LazyModule:
    """A module imported on first attribute access: importing litellm costs
    seconds of CPU, which client commands (that import the model registry to
    check a run's models) must never pay."""

    def __init__(self, submodule: str | None = None) -> None:
        object.__setattr__(self, "_submodule", submodule)

    def _target(self) -> ModuleType:
        module = _loaded()
        return getattr(module, self._submodule) if self._submodule else module

    def __getattr__(self, name: str) -> object:
        return getattr(self._target(), name)

    def __setattr__(self, name: str, value: object) -> None:
        setattr(self._target(), name, value)


litellm = _LazyModule()
litellm_exceptions = _LazyModule("exceptions")

__all__ = ["callbacks_registered", "litellm", "litellm_exceptions", "preload", "unlogged_call"]
