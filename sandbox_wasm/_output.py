"""Collects one cell's printed output on the host, with a hard ceiling."""

from __future__ import annotations

import codecs
import threading


class OutputCollector:
    """UTF-8 bytes from the guest's fd 1/2, decoded incrementally.

    Keeps at most `ceiling` characters; counts the rest so the cut can be
    reported. Written by the wasm thread, read by the session thread.
    """

    def __init__(self, ceiling: int):
        self._ceiling = ceiling
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
            self._parts: list[str] = []
            self._kept = 0
            self._dropped = 0

    def feed(self, data: bytes) -> None:
        text = self._decoder.decode(data)
        with self._lock:
            self._add(text)

    def _add(self, text: str) -> None:
        room = self._ceiling - self._kept
        if len(text) <= room:
            self._parts.append(text)
            self._kept += len(text)
        else:
            if room > 0:
                self._parts.append(text[:room])
                self._kept += room
            self._dropped += len(text) - max(room, 0)

    def take(self) -> tuple[str, int]:
        """Return (kept text, number of characters dropped past the ceiling)."""
        with self._lock:
            self._add(self._decoder.decode(b"", final=True))
            text = "".join(self._parts)
            self._parts = [text]
            return text, self._dropped


def cap_output(text: str, dropped: int, limit: int) -> tuple[str, int]:
    """Cut `text` to `limit` characters; returns (shown text, characters cut)."""
    cut = max(0, len(text) - limit) + dropped
    if not cut:
        return text, 0
    shown = text[:limit]
    return f"{shown}\n... [output truncated: {cut:,} more chars]", cut
