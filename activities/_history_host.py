"""`history()` in the REPL once a run's transcript was compacted: the full
transcript of the compacted turns (workflows/compaction.py), read from
object storage when a cell first asks for it."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from activities.object_store import ObjectStore
from workflows.compaction import HISTORY_FUNCTION

HISTORY_DOC = (
    "history() -> list[dict]: the full transcript of your turns that were compacted out of your "
    "context window, as {'role', 'content'} messages, oldest first."
)


def history_docs(history_key: str | None) -> dict[str, str]:
    """The guest stub's docstring, when the run has a history to show."""
    return {HISTORY_FUNCTION: HISTORY_DOC} if history_key else {}


class HistoryHost:
    def __init__(self, store: ObjectStore, history_key: str | None) -> None:
        self._store = store
        self._key = history_key
        self._messages: list[dict[str, Any]] | None = None

    def functions(self) -> dict[str, Callable[..., Any]]:
        return {HISTORY_FUNCTION: self.history} if self._key else {}

    def history(self) -> list[dict[str, Any]]:
        if self._messages is None:
            self._messages = list(json.loads(self._store.get_bytes(self._key))["messages"])  # type: ignore[arg-type]
        return [dict(m) for m in self._messages]
