"""Checks of what the guest reports: guest code made these values, so they are
checked before the host uses them."""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Any

from ._types import SandboxError

# Guest-reported texts (error, traceback) are cut to this before they are kept.
MAX_REPORT_CHARS = 20_000
_HEX = frozenset("0123456789abcdef")
RECORD_NAME_CHARS = 40  # rlm_stored.record_name: 40 hex digits
_JOINED_NAMES = re.compile(r"[0-9a-f]*")


class SnapshotError(SandboxError):
    """The cell's state could not be saved: its objects failed, looped or were
    too large when pickled. The session goes back to its last snapshot at its
    next use, so the state it runs from is always one that was saved."""


def snapshot_parts(result: dict[str, Any], held: Collection[str]) -> tuple[
        bytes, list[str], dict[str, str], list[str], dict[str, bytes]]:
    """(data, saved, unsaved, refs, records) of a snapshot's result, checked
    against the records the host already `held`; SandboxError if malformed."""
    data, saved, unsaved = result.get("data"), result.get("saved"), result.get("unsaved")
    joined, records = result.get("refs"), result.get("records")
    # Guest-made values: check their types (bytes(n) of an int would allocate n bytes).
    # The record names come as one string of RECORD_NAME_CHARS each (checked in C, not per name).
    if not (isinstance(data, bytes) and isinstance(saved, list) and isinstance(unsaved, dict)
            and isinstance(joined, str) and len(joined) % RECORD_NAME_CHARS == 0
            and _JOINED_NAMES.fullmatch(joined) and isinstance(records, dict)
            and all(isinstance(n, str) for n in saved)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in unsaved.items())
            and all(isinstance(v, bytes) for v in records.values())):
        raise SandboxError("snapshot failed: the guest sent a malformed snapshot")
    refs = sorted(joined[i:i + RECORD_NAME_CHARS] for i in range(0, len(joined), RECORD_NAME_CHARS))
    if not set(records) <= set(refs):
        raise SandboxError("snapshot failed: the guest sent a malformed snapshot")
    missing = [d for d in refs if d not in records and d not in held]
    if missing:
        # The guest claims the host holds a value it never sent.
        raise SandboxError(f"snapshot failed: the guest referred to {len(missing)} value "
                           "record(s) it never sent")
    return data, saved, unsaved, refs, records


def is_record_name(value: Any) -> bool:
    """A record name as the guest makes them (rlm_stored.record_name)."""
    return isinstance(value, str) and len(value) == RECORD_NAME_CHARS and _HEX.issuperset(value)


def report_text(value: Any, limit: int = MAX_REPORT_CHARS) -> str | None:
    """A text the guest reported (error, traceback, repr), as str and bounded."""
    if value is None:
        return None
    text = value if isinstance(value, str) else repr(value)[:limit]
    if len(text) > limit:
        # Keep both ends: a traceback's last lines say what happened.
        half = limit // 2
        text = f"{text[:half]}\n... [{len(text) - limit:,} chars cut] ...\n{text[-half:]}"
    return text
