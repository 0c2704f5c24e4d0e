"""Collects one cell's printed output on the host, with a hard ceiling."""

from __future__ import annotations

import codecs
import threading


class OutputCollector:
    """UTF-8 bytes from the guest's fd 1/2, decoded incrementally.

    Keeps at most `ceiling` characters and counts the rest so the cut can be
    reported. A write is cut BEFORE it is copied out of guest memory and
    decoded: a guest printing 1 GB in one write costs the host at most
    4 x ceiling bytes. Written by the wasm thread, read by the session thread.
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

    def feed(self, data: bytes | memoryview) -> None:
        """Take one write; `data` may be a view of guest memory, valid only
        during this call, so nothing keeps a reference to it."""
        with self._lock:
            room = self._ceiling - self._kept
            if room <= 0:
                self._dropped += len(data)
                return
            # UTF-8 has at most 4 bytes per character, so this many bytes give
            # more characters than there is room for: nothing kept is lost.
            take = min(len(data), 4 * room + 4)
            self._add(self._decoder.decode(bytes(data[:take])))
            # Past the ceiling, bytes are counted, not decoded (= characters for ASCII).
            self._dropped += len(data) - take

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
