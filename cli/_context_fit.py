"""Before uploading: would the run's REPL hold this context at all?

A run refuses a context as large as its REPL memory cap before its first
root turn (workflows/request.context_fit_problem); the CLI says so before
uploading gigabytes for nothing."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from activities._context_input import ContextInputError, DocumentStats, file_blocks, named_files, paths_bytes
from workflows.request import context_fit_problem

__all__ = ["CELL_MEMORY_FLAG", "unloadable_context"]

CELL_MEMORY_FLAG = "--cell-memory"
"""The flag of `limits.cell_memory_mb`, named in the CLI's messages."""


def unloadable_context(paths: list[Path], cell_memory_mb: int, total_bytes: int | None = None) -> str | None:
    """Why no REPL capped at `cell_memory_mb` could load these files, or None:
    their text files alone reach the cap (they are stored as they are; other
    formats are converted and may shrink). Checked before uploading gigabytes
    that the run would refuse; what cannot be listed is left to the upload.
    `total_bytes`: `paths_bytes(paths)`, when the caller has it."""
    if (paths_bytes(paths) if total_bytes is None else total_bytes) < cell_memory_mb << 20:
        return None
    from activities.documents import DocumentError, kind_of

    try:
        files = [f for f in named_files(paths) if f.refused is None]
        text_bytes = sum(
            f.size() for f in files if kind_of(f.path, f.identity) == "text" and _reads_as_utf8(f.path, f.identity)
        )
    except (ContextInputError, DocumentError, OSError):
        return None
    return context_fit_problem(text_bytes, cell_memory_mb, CELL_MEMORY_FLAG)


def _reads_as_utf8(path: Path, identity: Any) -> bool:
    """Whether the upload would store the file as text, judged by its first
    block with the upload's own rules (`file_blocks`): a binary file (a NUL
    byte), a UTF-16 one or one that is not UTF-8 is refused by the upload (or
    left out with --skip-unreadable), so it must not count toward the cap
    (nor be blamed on --cell-memory)."""
    with contextlib.closing(file_blocks(path, DocumentStats(), identity)) as blocks:
        try:
            next(blocks, None)
        except ContextInputError:
            return False
    return True
