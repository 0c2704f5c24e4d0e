"""A context's documents as one file, in the layout the worker's context
cache reads (`<root>/<context sha256>/documents.utf8`: the documents' UTF-8
bytes back to back, each found by its manifest offset): copied while they
upload (`DocumentCopy`), or written from the stored chunks
(`document_spans`, what `ContextStore.materialize` does).

`rlm run` with the embedded worker uploads a context, and a moment later
the worker downloads it again to load it into the REPL: 40 MB took
0.15-0.6 s of the first cell (bench/bench_vs_rlms.py). Written as the bytes
stream past the upload, the copy costs a page-cache write and no second
read or hash. With its manifest beside the documents (MANIFEST_FILE), the
run can start before the upload ends (activities/_context_upload.py). A
failure to write it drops the copy (the worker then reads S3, and the run
starts once the upload is done), never the upload.

One file, not one per document: a folder of 20,000 documents took 4.5-5.7 s
to copy and as long to write from the chunks, file by file, and 0.45-1 s to
open again at each REPL start. A cache written by an earlier version (a file
per document, `000000.txt`, ...) is still read as it is.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import structlog

if TYPE_CHECKING:
    from activities._context_manifest import Manifest
    from sandbox_wasm import DocumentSpan

log = structlog.get_logger(__name__)

__all__ = ["DOCUMENTS_FILE", "MANIFEST_FILE", "DocumentCopy", "document_spans", "local_manifest"]

# The documents of a context, back to back: the stream its manifest indexes.
DOCUMENTS_FILE = "documents.utf8"
# The manifest, beside the documents of a copy written while uploading: a
# worker sharing this directory loads the context before the upload ends
# (activities/_context_upload.py). Hidden, so never taken for a document.
MANIFEST_FILE = ".manifest.json"


class DocumentCopy:
    """Documents written one after another into one file of a hidden
    directory under `root`, renamed to `root/<sha256>` once the context's
    hash is known."""

    def __init__(self, root: Path) -> None:
        self._root = Path(root)
        self._tmp: Path | None = None
        self._handle: BinaryIO | None = None
        self._written = 0
        self._guard(self._open)

    def write(self, block: bytes) -> None:
        if self._handle is not None:
            self._guard(lambda: self._handle.write(block))  # type: ignore[union-attr]
            self._written += len(block)

    def finish(self, sha256: str, manifest: bytes) -> bool:
        """Put the copy in place as the context `sha256`, with its manifest;
        whether the directory holds the context and its manifest now (it may
        have held the context already: then the manifest is added)."""
        self._guard(self._close_file)
        if self._tmp is None:
            return False
        dest = self._root / sha256
        try:
            _write_atomically(self._tmp / MANIFEST_FILE, manifest)
            if not dest.exists():
                os.rename(self._tmp, dest)
                self._tmp = None
                return True
        except OSError:
            pass  # another writer won the race: theirs is the same bytes
        finally:
            self.discard()
        try:
            if _packed_bytes(dest) != self._written:
                return False  # an earlier version's copy (a file per document): the run waits for the bucket
            if local_manifest(dest) != manifest:
                _write_atomically(dest / MANIFEST_FILE, manifest)
            os.utime(dest)  # recent: the cache evicts least recently used first
            return True
        except OSError:
            return False

    def forget_manifest(self, sha256: str) -> None:
        """Take the manifest out of the copy of `sha256` (its upload failed):
        a worker then reads the bucket, and waits there, rather than run it."""
        try:
            (self._root / sha256 / MANIFEST_FILE).unlink(missing_ok=True)
        except OSError as exc:
            log.warning("context_copy.manifest_kept", sha256=sha256[:16], error=str(exc))

    def discard(self) -> None:
        self._close_file()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def _open(self) -> None:
        self._root.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=".upload-", dir=self._root))
        self._handle = open(self._tmp / DOCUMENTS_FILE, "wb")  # noqa: SIM115 (closed by finish or discard)

    def _close_file(self) -> None:
        if self._handle is not None:
            handle, self._handle = self._handle, None
            handle.close()

    def _guard(self, step) -> None:
        try:
            step()
        except OSError as exc:  # a full or read-only disk: no copy, same upload
            log.warning("context_copy.dropped", root=str(self._root), error=str(exc))
            self.discard()


def document_spans(manifest: Manifest, dest: Path, chunks: Callable[[], Iterable[bytes]]) -> list[DocumentSpan]:
    """The context's documents in a file under `dest` (named by the context's
    sha256), written once from `chunks()` (its verified chunks, in order) and
    put in place atomically; reused when already there."""
    if dest.is_dir():
        spans = _cached_spans(manifest, dest)
        if spans is not None:
            return spans
        # Not what we write (changed by hand?): replace it rather than trust it.
        log.warning("replacing unexpected materialized context", path=str(dest))
        shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name[:16]}-", dir=dest.parent))
    try:
        with open(tmp / DOCUMENTS_FILE, "wb") as handle:
            for data in chunks():
                handle.write(data)
        try:
            os.rename(tmp, dest)
        except OSError:
            # Another process won the race (dest exists, complete): use theirs.
            if not dest.is_dir() or _cached_spans(manifest, dest) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _packed_spans(manifest, dest / DOCUMENTS_FILE)


def _cached_spans(manifest: Manifest, dest: Path) -> list[DocumentSpan] | None:
    """The documents as `dest` holds them, or None when it does not hold
    them whole: one file of the stream's length, or (written by an earlier
    version) a file per document of its length."""
    if _packed_bytes(dest) == manifest.total_bytes:
        return _packed_spans(manifest, dest / DOCUMENTS_FILE)
    names = _document_file_names(len(manifest.documents))
    try:
        if sorted(n for n in os.listdir(dest) if not n.startswith(".")) != names:  # not the manifest, nor its temp
            return None
        new_span = _span_type()
        spans = [new_span(dest / name, 0, doc.bytes) for name, doc in zip(names, manifest.documents, strict=True)]
        if any(os.stat(span.path).st_size != span.size for span in spans):
            return None
    except OSError:
        return None
    return spans


def local_manifest(dest: Path) -> bytes | None:
    """The manifest a copy left beside its documents (unverified), or None."""
    try:
        return (dest / MANIFEST_FILE).read_bytes()
    except OSError:
        return None


def _packed_spans(manifest: Manifest, path: Path) -> list[DocumentSpan]:
    new_span = _span_type()
    return [new_span(path, doc.offset, doc.bytes) for doc in manifest.documents]


def _span_type() -> type[DocumentSpan]:
    # Imported on first use, by the worker: a client that only uploads
    # (`rlm run`, `rlm submit`) never loads the sandbox (tests/test_cli_imports.py).
    from sandbox_wasm import DocumentSpan

    return DocumentSpan


def _packed_bytes(dest: Path) -> int | None:
    """The length of the documents' file under `dest`, None without one."""
    try:
        return os.stat(dest / DOCUMENTS_FILE).st_size
    except OSError:
        return None


def _document_file_names(count: int) -> list[str]:
    """The files of an earlier version's layout, in document order."""
    return [f"{index:06d}.txt" for index in range(count)]


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
