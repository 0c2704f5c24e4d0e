"""The one place litellm is imported: offline, quiet, without retries of its
own, and only when first used.

Import `litellm` from here (`from activities._litellm_setup import litellm`),
never directly, so these settings always apply before its first use.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import warnings
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
    return module


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

__all__ = ["litellm", "litellm_exceptions", "preload"]
