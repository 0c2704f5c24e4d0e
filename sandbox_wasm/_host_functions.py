"""The host functions a session offers its guest: which names may be
registered, and how one call from guest code is answered."""

from __future__ import annotations

import keyword
from collections.abc import Callable, Mapping
from typing import Any

import structlog

from ._types import ToolError

log = structlog.get_logger(__name__)

HostFunction = Callable[..., Any]


def checked_host_functions(functions: Mapping[str, HostFunction]) -> dict[str, HostFunction]:
    """The functions to register, each name a public identifier the guest does not define itself."""
    out = dict(functions)
    for name, fn in out.items():
        if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name) or name.startswith("_"):
            raise ValueError(f"host function name {name!r} must be a public Python identifier")
        if name == "SHOW_VARS":
            raise ValueError("SHOW_VARS is provided by the guest; do not register it")
        if not callable(fn):
            raise TypeError(f"host function {name!r} is not callable: {fn!r}")
    return out


def call_host(functions: Mapping[str, HostFunction], name: Any, args: Any, kwargs: Any) -> list[Any]:
    """The reply to one call: ["ok", value] or ["err", message(, error type)]."""
    # The call's shape comes from guest code: check it before using it.
    if not (isinstance(name, str) and isinstance(args, list) and isinstance(kwargs, dict)
            and all(isinstance(k, str) for k in kwargs)):
        return ["err", "malformed host-function call (name must be a str, arguments a "
                       "list, keyword arguments a dict with str keys)"]
    fn = functions.get(name)
    if fn is None:
        return ["err", f"{name[:100]}() is not available: the host registered no such function"]
    try:
        return ["ok", fn(*args, **kwargs)]
    except ToolError as exc:
        return ["err", str(exc), "ToolError"]
    except Exception as exc:
        log.info("sandbox_host_function_failed", name=name, error=repr(exc)[:500])
        return ["err", f"{name}() failed on the host: {type(exc).__name__}: {exc}"]
