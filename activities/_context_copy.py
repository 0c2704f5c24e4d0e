"""A context's documents as files, in the layout the worker's context cache
reads (`<root>/<context sha256>/000000.txt`, ...): copied while they upload
(`DocumentCopy`), or written from the stored chunks (`document_files`, what
`ContextStore.materialize` does).

`rlm run` with the embedded worker uploads a context, and a moment later
the worker downloads it again to load it into the REPL: 40 MB took
0.15-0.6 s of the first cell (bench/bench_vs_rlms.py). Written as the bytes
stream past the upload, the copy costs a page-cache write and no second
read or hash. With its manifest beside the documents (MANIFEST_FILE), the
run can start before the upload ends (activities/_context_upload.py). A
failure to write it drops the copy (the worker then reads S3, and the run
starts once the upload is done), never the upload.
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

log = structlog.get_logger(__name__)

__all__ = ["MANIFEST_FILE", "DocumentCopy", "document_file_names", "document_files", "local_manifest"]

# The manifest, beside the documents of a copy written while uploading: a
# worker sharing this directory loads the context before the upload ends
# (activities/_context_upload.py). Hidden, so never taken for a document.
MANIFEST_FILE = ".manifest.json"


def document_file_name(index: int) -> str:
    """The file of document `index` under `<root>/<context sha256>/`."""
    return f"{index:06d}.txt"


def document_file_names(count: int) -> list[str]:
    """The files of all documents, in order."""
    return [document_file_name(i) for i in range(count)]


class DocumentCopy:
    """Documents written one after another into a hidden directory under
    `root`, renamed to `root/<sha256>` once the context's hash is known."""

    def __init__(self, root: Path) -> None:
        self._root = Path(root)
        self._tmp: Path | None = None
        self._handle: BinaryIO | None = None
        self._count = 0
        self._guard(self._open_dir)

    def start_document(self) -> None:
        self._guard(self._next_file)

    def write(self, block: bytes) -> None:
        if self._handle is not None:
            self._guard(lambda: self._handle.write(block))  # type: ignore[union-attr]

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
            if _documents_in(dest) != document_file_names(self._count):
                return False
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

    def _open_dir(self) -> None:
        self._root.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=".upload-", dir=self._root))

    def _next_file(self) -> None:
        self._close_file()
        if self._tmp is not None:
            self._handle = open(self._tmp / document_file_name(self._count), "wb")  # noqa: SIM115
            self._count += 1

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


def document_files(manifest: Manifest, dest: Path, chunks: Callable[[], Iterable[bytes]]) -> list[Path]:
    """The context's documents as files under `dest` (named by the context's
    sha256), written once from `chunks()` (its verified chunks, in order) and
    put in place atomically; reused when already there."""
    names = document_file_names(len(manifest.documents))
    if dest.is_dir() and _documents_in(dest) == names:
        return [dest / name for name in names]
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        # Not what we write (changed by hand?): replace it rather than trust it.
        log.warning("replacing unexpected materialized context", path=str(dest))
        shutil.rmtree(dest, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name[:16]}-", dir=dest.parent))
    try:
        _write_documents(manifest, chunks(), [tmp / name for name in names])
        try:
            os.rename(tmp, dest)
        except OSError:
            # Another process won the race (dest exists, complete): use theirs.
            if not (dest.is_dir() and _documents_in(dest) == names):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [dest / name for name in names]


def local_manifest(dest: Path) -> bytes | None:
    """The manifest a copy left beside its documents (unverified), or None."""
    try:
        return (dest / MANIFEST_FILE).read_bytes()
    except OSError:
        return None


def _documents_in(dest: Path) -> list[str]:
    return sorted(name for name in os.listdir(dest) if not name.startswith("."))  # not the manifest, nor its temp


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_documents(manifest: Manifest, chunks: Iterable[bytes], paths: list[Path]) -> None:
    """Cut the stream of chunks into the documents' files (a document may
    span chunks; a chunk may hold several documents, or end inside one)."""
    docs = iter(zip(manifest.documents, paths, strict=True))
    position = 0  # stream offset of the next byte to write
    current = next(docs, None)
    handle = open(current[1], "wb") if current else None  # noqa: SIM115
    try:
        for chunk, data in zip(manifest.chunks, chunks, strict=True):
            view = memoryview(data)
            while current is not None:
                doc = current[0]
                doc_end = doc.offset + doc.bytes
                take_end = min(doc_end, chunk.offset + chunk.bytes)
                handle.write(view[position - chunk.offset : take_end - chunk.offset])
                position = take_end
                if position < doc_end:
                    break  # the document continues in the next chunk
                handle.close()
                current = next(docs, None)
                handle = open(current[1], "wb") if current else None  # noqa: SIM115
        # Empty trailing documents get their (empty) files too.
        while current is not None:
            handle.close()
            current = next(docs, None)
            handle = open(current[1], "wb") if current else None  # noqa: SIM115
    finally:
        if handle is not None:
            handle.close()
