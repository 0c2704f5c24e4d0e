"""Ids a user gives on the command line (`--id` of a run or session,
`--ask-id`): checked before anything is uploaded or started.

Temporal takes almost any string up to 1,000 characters, but an id is
printed for scripts to read back (`id=$(rlm submit ...)`): a newline split it
in two, and one past Temporal's limit failed after the context's upload (a
traceback for a session). A session's questions and a run's children append
to the id, hence the lower bound here.
"""

from __future__ import annotations

import argparse

from activities.terminal_text import printable
from cli._errors import UserError

__all__ = ["MAX_ID_CHARS", "checked_id", "existing_id"]

MAX_ID_CHARS = 200


def checked_id(value: str, flag: str) -> str:
    """`value` if it is 1 to MAX_ID_CHARS printable characters without
    whitespace, else a UserError naming `flag`."""
    if 0 < len(value) <= MAX_ID_CHARS and value.isprintable() and not any(c.isspace() for c in value):
        return value
    shown = printable(value[:80]) + ("..." if len(value) > 80 else "")
    raise UserError(
        f"{flag}: 1 to {MAX_ID_CHARS} printable characters without spaces, got {shown!r} ({len(value)} characters)"
    )


# Temporal's own limit: an id read back (a run or session started by any
# client) may be anything up to it.
_TEMPORAL_ID_CHARS = 1000


def existing_id(value: str) -> str:
    """argparse type of an id that names a run or session already there
    (`rlm result ID`, `rlm session ask ID`): any id Temporal takes, so an
    empty one is refused here instead of reaching the server as a broken
    request (a traceback)."""
    if value.strip() and len(value) <= _TEMPORAL_ID_CHARS and value.isprintable():
        return value
    raise argparse.ArgumentTypeError(
        f"not an id: {printable(value[:80])!r} (1 to {_TEMPORAL_ID_CHARS} printable characters)"
    )
