"""Bounds on converting one file, so a hostile file costs a bounded amount
of time and memory and is refused with the reason instead.

Office files are zip archives: a few KB can declare gigabytes of XML (a zip
bomb). The declared sizes are checked before any part is parsed; Python's
zipfile never reads past a member's declared size, so the check holds.
"""

from __future__ import annotations

import time
import zipfile
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "MAX_ARCHIVE_EXPANDED_BYTES",
    "MAX_ARCHIVE_MEMBERS",
    "MAX_COMPRESSION_RATIO",
    "MAX_CONVERTED_FILE_BYTES",
    "MAX_DOCUMENT_CHARS",
    "MAX_DOCUMENT_SECONDS",
    "Budget",
    "DocumentError",
    "check_archive",
]

MAX_ARCHIVE_EXPANDED_BYTES = 256 << 20
"""Uncompressed bytes an Office file (a zip) may declare in all."""
MAX_ARCHIVE_MEMBERS = 20_000
MAX_COMPRESSION_RATIO = 200
"""Beyond this ratio a member larger than 1 MiB is taken for a zip bomb
(real Office XML compresses 5-20x)."""
_RATIO_MIN_BYTES = 1 << 20
MAX_CONVERTED_FILE_BYTES = 512 << 20
"""A file to convert (PDF, DOCX, ...): the converter works within 2 GiB of
address space, and the file is first copied to its scratch directory."""
MAX_DOCUMENT_CHARS = 64 << 20
"""Converted text of one file; a larger one should be split by the caller."""
MAX_DOCUMENT_SECONDS = 120.0
"""Time one file's conversion may take, checked between pages, rows, slides
(and enforced from outside by `_isolated.ConverterProcess`, a little later)."""


class DocumentError(ValueError):
    """A file cannot be converted to text; the message says why (without the
    file's name: the caller names it)."""


class Budget:
    """Characters and time left for one file's conversion."""

    def __init__(
        self,
        *,
        max_chars: int = MAX_DOCUMENT_CHARS,
        max_seconds: float = MAX_DOCUMENT_SECONDS,
        tick: Callable[[], None] | None = None,
    ) -> None:
        self.max_chars = max_chars
        self.max_seconds = max_seconds
        self.chars = 0
        self._deadline = time.monotonic() + max_seconds
        # Called at every check: an activity heartbeats through it while a large file converts.
        self._tick = tick

    def take(self, text: str) -> str:
        """Count `text` against the budget; raise once it is spent."""
        self.chars += len(text)
        if self.chars > self.max_chars:
            raise DocumentError(
                f"its text is over {self.max_chars:,} characters: split the file into smaller ones"
            )
        self.check_time()
        return text

    def check_time(self) -> None:
        if self._tick is not None:
            self._tick()
        if time.monotonic() > self._deadline:
            raise DocumentError(f"converting it took over {self.max_seconds:g} s: split or simplify the file")


def check_archive(path: Path, what: str) -> None:
    """Refuse a zip container that is not one, or would expand too far."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except zipfile.BadZipFile as exc:
        raise DocumentError(f"not a readable {what} file (bad zip container: {exc})") from None
    if len(members) > MAX_ARCHIVE_MEMBERS:
        raise DocumentError(f"its zip container holds {len(members):,} parts (over {MAX_ARCHIVE_MEMBERS:,})")
    expanded = sum(m.file_size for m in members)
    if expanded > MAX_ARCHIVE_EXPANDED_BYTES:
        raise DocumentError(
            f"its zip container expands to {expanded:,} bytes (over {MAX_ARCHIVE_EXPANDED_BYTES:,}): "
            "a zip bomb or a file too large to convert"
        )
    for m in members:
        if m.file_size > _RATIO_MIN_BYTES and m.file_size > MAX_COMPRESSION_RATIO * max(m.compress_size, 1):
            raise DocumentError(
                f"part {m.filename!r} expands {m.file_size // max(m.compress_size, 1):,}x "
                f"({m.compress_size:,} -> {m.file_size:,} bytes): a zip bomb"
            )
