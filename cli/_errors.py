"""Errors the CLI reports as one line `error: ...` with exit code 1."""

from __future__ import annotations

import sys

from pydantic import ValidationError

from cli._service_spec import LauncherError

__all__ = ["UserError", "describe", "is_expected"]


class UserError(Exception):
    """A mistake the user can fix; the message says how. Commands raise it
    instead of printing and returning 1 themselves."""


# Always loaded by the CLI (pydantic comes with the settings).
_ALWAYS: tuple[type[BaseException], ...] = (UserError, LauncherError, ValidationError)
# (module, class): errors of modules the CLI loads only for some commands.
# Importing them up front would cost every command the S3 client (minio).
_WHEN_LOADED = (
    ("activities.object_store", "StorageError"),
    ("activities._context_input", "ContextInputError"),
)


def is_expected(exc: BaseException) -> bool:
    """A failure shown as one line, not a traceback. A module that was never
    imported cannot have raised its error, so it is looked up only if loaded."""
    if isinstance(exc, _ALWAYS):
        return True
    for module_name, class_name in _WHEN_LOADED:
        module = sys.modules.get(module_name)
        if module is not None and isinstance(exc, getattr(module, class_name)):
            return True
    return False


def describe(exc: BaseException) -> str:
    """One line (or a few, for settings) naming the cause and the fix."""
    if isinstance(exc, ValidationError):
        problems = "; ".join(
            f"RLM_{'_'.join(map(str, e['loc'])).upper()}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        )
        return f"invalid settings: {problems}"
    return str(exc)
