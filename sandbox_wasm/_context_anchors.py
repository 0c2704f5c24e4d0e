"""Anchor index of the context documents, computed natively for the guest.

The guest recognises values that are slices of the context through an
anchor index (see guest/rlm_anchors.py). Building it for 100 MB takes ~1-2 s
inside the guest and ~0.1-0.3 s here, so the host scans its own copy of the
documents (in a background thread) and sends the offsets with the next
snapshot of an instance. Results are kept for a few documents, keyed by
file, offset, size and mtime: every REPL of a run (and every run over the
same cached context) loads the same documents.

The scan starts only once a snapshot stored a large value by content (one
the guest could not place without the index): most cells make no large
values, and chunks cut in order are found without it. Scanning every context
on load cost 10% of a worker's CPU with 100 runs at once over 4 MB contexts
(bench/bench_many_runs.py), and it holds the GIL.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import structlog

from ._types import DocumentSpan
from .guest.rlm_anchors import MIN_INDEXED_DOC, anchor_index, pack_index

log = structlog.get_logger(__name__)
_KEEP = 8
_cache: OrderedDict[tuple[str, int, int, int], Any] = OrderedDict()
_lock = threading.Lock()
_scanner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlm-anchors")


class ContextIndex:
    """The index of one session's context, and whether its guest has it."""

    def __init__(self) -> None:
        self._spans: list[DocumentSpan] = []
        self._future: Future[list[Any]] | None = None
        self.sent = False

    def use(self, spans: list[DocumentSpan]) -> None:
        """The session loaded these documents as its context: scanned later,
        on demand, unless an earlier REPL of this worker already scanned them."""
        self._spans = spans
        self._future = None
        self.sent = False
        scanned = _scanned(spans)
        if scanned is not None:  # the next snapshot sends it at no cost
            self._future = Future()
            self._future.set_result(scanned)

    def build(self) -> None:
        """Start scanning the context in the background, once."""
        if self._future is None and self._spans:
            self._future = context_anchors(self._spans)

    def wait(self, timeout_s: float | None) -> bool:
        self.build()
        try:
            return self._future is not None and self._future.result(timeout_s) is not None
        except Exception:
            return False

    def unsent(self) -> list[Any] | None:
        """The index if it is ready and this instance lacks it. Never waits:
        until it arrives, slices the guest cannot place are stored by content,
        which is only bigger, never wrong."""
        if self.sent or self._future is None or not self._future.done():
            return None
        self.sent = True
        try:
            return self._future.result()
        except Exception as exc:
            log.warning("sandbox_context_index_failed", error=repr(exc)[:300])
            return None


def context_anchors(spans: list[DocumentSpan]) -> Future[list[Any]]:
    """The packed anchor index (rlm_anchors.pack_index) or None for each
    document, computed in the background."""
    return _scanner.submit(lambda: [_anchors(span, key) for span, key in zip(spans, _keys(spans), strict=True)])


def _keys(spans: list[DocumentSpan]) -> list[tuple[str, int, int, int]]:
    """Each document's cache key: its file's path in its directory resolved
    (each directory once: a realpath per file cost ~0.5 s for 20,000
    documents), its offset and size there, and the file's mtime."""
    parents: dict[Path, Path] = {}
    keys = []
    last: Path | None = None  # a packed context's spans share one Path: looked up once
    for span in spans:
        path = span.path
        if path is not last:
            parent = parents.get(path.parent)
            if parent is None:
                parent = parents[path.parent] = path.parent.resolve()
            name, mtime, last = str(parent / path.name), path.stat().st_mtime_ns, path
        keys.append((name, span.offset, span.size, mtime))
    return keys


def _scanned(spans: list[DocumentSpan]) -> list[Any] | None:
    """What `context_anchors` would give for `spans`, if every one is cached."""
    if len(spans) > _KEEP:  # never all in the cache: no need to look
        return None
    try:
        keys = _keys(spans)
    except OSError:
        return None
    with _lock:
        if not all(key in _cache for key in keys):
            return None
        return [_cache[key] for key in keys]


def _anchors(span: DocumentSpan, key: tuple[str, int, int, int]) -> Any:
    with _lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    # A document of fewer bytes than that has fewer characters: no index.
    small = span.size < MIN_INDEXED_DOC
    entry = None if small else pack_index(anchor_index(span.read_bytes().decode("utf-8")))
    with _lock:
        _cache[key] = entry
        while len(_cache) > _KEEP:
            _cache.popitem(last=False)
    return entry
