"""Errors the CLI reports as one line `error: ...` with exit code 1."""

from __future__ import annotations

from pydantic import ValidationError

from activities._context_input import ContextInputError
from activities.object_store import StorageError
from cli._service_spec import LauncherError

__all__ = ["EXPECTED_ERRORS", "UserError", "describe"]


class UserError(Exception):
    """A mistake the user can fix; the message says how. Commands raise it
    instead of printing and returning 1 themselves."""


EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    UserError,
    LauncherError,
    StorageError,
    ContextInputError,
    ValidationError,
)


def describe(exc: BaseException) -> str:
    """One line (or a few, for settings) naming the cause and the fix."""
    if isinstance(exc, ValidationError):
        problems = "; ".join(
            f"RLM_{'_'.join(map(str, e['loc'])).upper()}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        )
        return f"invalid settings: {problems}"
    return str(exc)
