"""A context's documents as spans of files: checked before a load, read as
the sources the guest's load copies from (one open per file, however many
documents it holds)."""

from __future__ import annotations

import stat
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from ._hostcall import FileSource, SharedFile
from ._types import DocumentSpan


def context_spans(documents: Sequence[Path | str | DocumentSpan], kind: str) -> list[DocumentSpan]:
    """Each document as a span of a regular file (a path: the whole file),
    checked to lie inside its file; ValueError says which does not."""
    if kind not in ("str", "list"):
        raise ValueError(f"kind must be 'str' or 'list', got {kind!r}")
    if kind == "str" and len(documents) != 1:
        raise ValueError(f"kind 'str' needs exactly one document, got {len(documents)}")
    sizes: dict[str, int] = {}  # each file's size, one stat per file
    spans = []
    last: Path | None = None  # a packed context's spans share one Path: skip hashing it 20,000 times
    for document in documents:
        span = document if isinstance(document, DocumentSpan) else None
        given = span.path if span is not None else document
        path = given if isinstance(given, Path) else Path(given)
        if path is not last:
            key = str(path)
            size = sizes.get(key)
            if size is None:
                try:
                    info = path.stat()
                except OSError:
                    info = None
                if info is None or not stat.S_ISREG(info.st_mode):
                    raise ValueError(f"context file {path} does not exist or is not a regular file")
                size = sizes[key] = info.st_size
            last = path
        if span is None:
            spans.append(DocumentSpan(path, 0, size))
            continue
        if span.offset < 0 or span.size < 0 or span.offset + span.size > size:
            raise ValueError(f"a context document of {span.size:,} bytes at offset {span.offset:,} "
                             f"does not lie inside {path} ({size:,} bytes)")
        spans.append(span if span.path is path else DocumentSpan(path, span.offset, span.size))
    # Each directory resolved once: a realpath per file was ~0.5 s of a
    # REPL start over a context of 20,000 documents.
    if len({parent.resolve() for parent in {Path(key).parent for key in sizes}}) > 1:
        raise ValueError("all context files must be in one directory")
    return spans


def file_sources(spans: Sequence[DocumentSpan]) -> list[FileSource]:
    """The sources of the documents' bytes, in order: documents that follow
    each other in one file are read as one range (the guest cuts them by
    their sizes), and each file is opened once."""
    ranges: list[list] = []  # [path, offset, size]
    for span in spans:
        if ranges and ranges[-1][0] is span.path and ranges[-1][1] + ranges[-1][2] == span.offset:
            ranges[-1][2] += span.size
        else:
            ranges.append([span.path, span.offset, span.size])
    # Keyed by the path's text: hashing a Path object costs ~2 us in Python.
    readers = Counter(str(path) for path, _, _ in ranges)
    files: dict[str, SharedFile] = {}
    sources = []
    for path, offset, size in ranges:
        key = str(path)
        file = files.get(key)
        if file is None:  # the caller's Path, not one parsed again from its text
            file = files[key] = SharedFile(path, readers[key])
        sources.append(FileSource(file, offset, size))
    return sources
