"""Contexts as files for the sandbox, under a size bound.

A session reads its context from files under `root/<sha256>/`, and reads them
again whenever it restarts after a trap, so a directory is in use as long as
a live session loaded from it. Each user holds a shared `flock` on the
context's lock file for that long; eviction takes the lock exclusively
without waiting, so it only deletes directories no process (this worker or
another sharing the data dir) is using, least recently used first.

Eviction reads the size of every cached context: ~15 ms at 1,000 of them,
~150 ms at 10,000 (measured), which every REPL start used to pay. A cache
now keeps a running total (its last scan plus what it wrote since) and scans
only when that total passes the bound, or RESCAN_S after its last scan
(another process sharing the directory may have written meanwhile); past
the bound it evicts down to LOW_WATERMARK of it, so a full cache scans once
per tenth of the bound written, not at every new context.
"""

from __future__ import annotations

import errno
import fcntl
import math
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from activities._context_copy import MANIFEST_FILE, local_manifest
from activities.context_store import ContextIntegrityError, ContextStore
from activities.object_store import UPLOAD_GRACE_S
from workflows.refs import ContextRef

if TYPE_CHECKING:
    from sandbox_wasm import DocumentSpan

log = structlog.get_logger(__name__)

_CONTEXT_DIR = re.compile(r"[0-9a-f]{64}")
# Hidden directories are contexts being written (by `materialize` here, or by
# `rlm run` copying an upload). One untouched for this long was abandoned by
# a process that died mid-write: it would otherwise stay forever.
STALE_WRITE_S = 3600.0
RESCAN_S = 60.0
LOW_WATERMARK = 0.9
_LOCKS = ".locks"


class ContextFileCache:
    """Materialised contexts, at most `max_bytes` of those not in use."""

    def __init__(self, root: Path, max_bytes: int, contexts: ContextStore) -> None:
        self._root = Path(root)
        self._max_bytes = max_bytes
        self._contexts = contexts
        self._scan_lock = threading.Lock()  # one scan at a time in this process
        self._total_lock = threading.Lock()
        self._total: int | None = None  # bytes on disk: the last scan's, plus what this cache wrote since
        self._scanned_at = -math.inf

    def acquire(self, ref: ContextRef) -> tuple[list[DocumentSpan], Callable[[], None]]:
        """The context's documents, kept on disk until the returned release is called."""
        if not _CONTEXT_DIR.fullmatch(ref.sha256):  # it names a file: never a path
            raise ValueError(f"context sha256 {ref.sha256[:80]!r} is not 64 lowercase hex digits")
        locks = self._root / _LOCKS
        locks.mkdir(parents=True, exist_ok=True)
        fd = _lock(locks / ref.sha256, fcntl.LOCK_SH)
        assert fd is not None  # a blocking lock always ends held
        try:
            written = not (self._root / ref.sha256).is_dir()
            spans = self._materialize(ref)
            os.utime(self._root / ref.sha256)  # recency, for eviction
        except BaseException:
            os.close(fd)
            raise
        release = _once(lambda: os.close(fd))
        try:
            self._evict_if_due(ref.total_bytes if written else 0)
        except OSError as exc:  # a full cache must not fail the cell
            log.warning("context_cache.evict_failed", error=str(exc))
        return spans, release

    def _materialize(self, ref: ContextRef) -> list[DocumentSpan]:
        adopt_local_manifest(self._contexts, self._root, ref.sha256)
        try:
            return self._contexts.materialize(ref, self._root, grace_s=UPLOAD_GRACE_S)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
        # The disk filled before the cache reached max_bytes: make room from
        # contexts no one uses, then try once more.
        log.warning("context_cache.disk_full", root=str(self._root), needed=ref.total_bytes)
        self.evict(max_bytes=0)
        try:
            return self._contexts.materialize(ref, self._root, grace_s=UPLOAD_GRACE_S)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            raise OSError(
                errno.ENOSPC,
                f"no space left on the disk of the worker's context cache {self._root} for a context of "
                f"{ref.total_bytes:,} bytes (unused contexts already deleted): free space on that disk "
                "or give the worker a larger data dir (RLM_DATA_DIR)",
            ) from None

    def _evict_if_due(self, added_bytes: int) -> None:
        with self._total_lock:
            if self._total is not None:
                self._total += added_bytes
        with self._scan_lock:  # a scan that ran while this waited may have made this one needless
            with self._total_lock:
                due = (self._total is None or self._total > self._max_bytes
                       or time.monotonic() - self._scanned_at > RESCAN_S)
            if due:
                self._evict(self._max_bytes)

    def evict(self, max_bytes: int | None = None) -> int:
        """Scan the cache now and, if its total passes `max_bytes` (default:
        the cache's bound), delete unused contexts, least recently used first,
        down to LOW_WATERMARK of it; returns the bytes on disk afterwards."""
        with self._scan_lock:
            return self._evict(self._max_bytes if max_bytes is None else max_bytes)

    def _evict(self, max_bytes: int) -> int:
        (self._root / _LOCKS).mkdir(parents=True, exist_ok=True)
        entries = []
        for entry in os.scandir(self._root):
            if not entry.is_dir(follow_symlinks=False):
                continue
            if _CONTEXT_DIR.fullmatch(entry.name):
                entries.append((entry.stat().st_mtime, entry.name, _dir_bytes(entry.path)))
            elif entry.name.startswith(".") and entry.name != _LOCKS and _abandoned(entry.path):
                shutil.rmtree(entry.path, ignore_errors=True)
                log.info("context_cache.abandoned_write_removed", name=entry.name)
        total = sum(size for _, _, size in entries)
        target = int(max_bytes * LOW_WATERMARK) if total > max_bytes else total
        for _, name, size in sorted(entries):
            if total <= target:
                break
            lock_path = self._root / _LOCKS / name
            fd = _lock(lock_path, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if fd is None:
                continue  # in use (here or in another process)
            try:
                shutil.rmtree(self._root / name, ignore_errors=True)
                lock_path.unlink(missing_ok=True)
            finally:
                os.close(fd)
            total -= size
            log.info("context_cache.evicted", sha256=name[:16], bytes=size)
        with self._total_lock:
            self._total, self._scanned_at = total, time.monotonic()
        return total


def adopt_local_manifest(contexts: ContextStore, root: Path, sha256: str) -> None:
    """A copy written by `rlm run` on this machine carries its manifest
    (activities/_context_upload.py): read from there, the context loads,
    and its reference checks, while its upload may still run."""
    if not _CONTEXT_DIR.fullmatch(sha256) or contexts.has_manifest(sha256):  # a path never; a known one not again
        return
    path = Path(root) / sha256
    data = local_manifest(path)
    if data is None:
        return
    try:
        contexts.adopt_manifest(sha256, data, str(path / MANIFEST_FILE))
    except ContextIntegrityError as exc:  # not what the copy wrote: the bucket's is read instead
        log.warning("context_cache.local_manifest_ignored", sha256=sha256[:16], error=str(exc))


def _lock(path: Path, operation: int) -> int | None:
    """An fd holding `operation` on the lock file now at `path`; None when a
    non-blocking lock is taken by someone else."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, operation)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            return fd
        # An evictor unlinked this file while we waited: lock the new one.
        os.close(fd)


def _abandoned(path: str) -> bool:
    """No write to the directory or its files for STALE_WRITE_S."""
    try:
        newest = max([os.stat(path).st_mtime] + [e.stat(follow_symlinks=False).st_mtime for e in os.scandir(path)])
    except OSError:  # gone meanwhile (renamed into place, or removed)
        return False
    return time.time() - newest > STALE_WRITE_S


def _dir_bytes(path: str) -> int:
    total = 0
    for entry in os.scandir(path):
        try:
            total += entry.stat(follow_symlinks=False).st_size
        except FileNotFoundError:
            pass
    return total


def _once(fn: Callable[[], None]) -> Callable[[], None]:
    lock = threading.Lock()
    done = [False]

    def call() -> None:
        with lock:
            if done[0]:
                return
            done[0] = True
        fn()

    return call
