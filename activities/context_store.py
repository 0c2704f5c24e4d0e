"""Contexts in object storage: sha256-addressed chunks plus a manifest.

All documents of a context form one UTF-8 byte stream, cut into fixed-size
chunks; each chunk is stored under its sha256 (so identical content is stored
once, across contexts) and verified on every read. The manifest records where
each document starts; its own sha256 is the context's identity.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import structlog
from pydantic import ValidationError

from activities._context_copy import document_spans
from activities._context_input import ContextInputError, DocumentStats, NamedFile, text_blocks
from activities._context_manifest import Manifest, ManifestChunk
from activities._context_upload import (
    DEFAULT_CHUNK_BYTES,
    PARALLEL_TRANSFERS,
    OnUnreadable,
    Progress,
    Source,
    stage,
    stage_files,
)
from activities.object_store import (
    IntegrityError,
    ObjectMissingError,
    ObjectStore,
    StorageError,
    wait_for_object,
)
from workflows.refs import ContextRef, manifest_key_for
from workflows.request import validation_errors

__all__ = [
    "ContextInputError",
    "ContextIntegrityError",
    "ContextMissingError",
    "ContextStore",
    "DEFAULT_CHUNK_BYTES",
]

if TYPE_CHECKING:
    from sandbox_wasm import DocumentSpan

log = structlog.get_logger(__name__)

# Manifests kept in memory (least recently used dropped): by count, and by
# documents + chunks, since one manifest may list millions of documents.
MANIFEST_CACHE_ENTRIES = 256
MANIFEST_CACHE_ITEMS = 1_000_000


class ContextIntegrityError(IntegrityError):
    """A stored chunk or manifest does not match its sha256."""


class ContextMissingError(StorageError):
    """No context with this reference exists in the bucket."""


class ContextStore:
    """Put contexts into object storage and read them back, verified."""

    def __init__(self, store: ObjectStore, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        if chunk_bytes <= 0:
            raise ValueError("chunk_bytes must be positive")
        self.store = store
        self.chunk_bytes = chunk_bytes
        self._manifests: OrderedDict[str, Manifest] = OrderedDict()
        self._manifest_items = 0
        self._manifests_lock = threading.Lock()

    # ---- writing -------------------------------------------------------

    def put_text(self, text: str) -> ContextRef:
        """One document, read back as a `str`."""
        if not isinstance(text, str):
            raise ContextInputError(f"context text must be str, got {type(text).__name__}")
        stats = DocumentStats()
        ref = self._put("str", [(stats, text_blocks(text, stats, label="context text"))])
        return ref

    def put_documents(self, docs: list[str]) -> ContextRef:
        """Several documents, read back as a `list[str]`."""
        if not isinstance(docs, list) or not all(isinstance(d, str) for d in docs):
            raise ContextInputError("documents must be a list of str")
        if not docs:
            raise ContextInputError("the document list is empty: give at least one document")
        sources = []
        for i, doc in enumerate(docs):
            stats = DocumentStats()
            sources.append((stats, text_blocks(doc, stats, label=f"document {i}")))
        return self._put("list", sources)

    def put_value(self, value: str | list[str]) -> ContextRef:
        """`put_text` for a str, `put_documents` for a list."""
        if isinstance(value, str):
            return self.put_text(value)
        return self.put_documents(value)

    def put_paths(
        self,
        paths: list[Path],
        *,
        progress: Progress | None = None,
        on_unreadable: OnUnreadable = "fail",
        copy_to: Path | None = None,
    ) -> ContextRef:
        """One file: a `str` context. Several files or a directory: a
        `list[str]`, one document per file in sorted order, named by its
        path under the directory. PDF, DOCX, XLSX, PPTX, HTML and EML files
        are converted to text (activities/documents); other files are
        stored as they are and must be UTF-8 text. `copy_to`: also write the
        documents there as `materialize` would (a worker's context cache on
        this machine), from the bytes uploaded."""
        return stage_files(lambda: self.store, self.chunk_bytes, paths, remember=self._remember, progress=progress,
                           on_unreadable=on_unreadable, copy_to=copy_to).wait()  # fmt: skip

    def put_files(
        self,
        files: list[NamedFile],
        *,
        kind: Literal["str", "list"],
        progress: Progress | None = None,
        on_unreadable: OnUnreadable = "fail",
        label: str = "context",
        tick: Callable[[], None] | None = None,
    ) -> ContextRef:
        """`files` as named documents (`tick` is called often while a file
        converts, e.g. to heartbeat). A file that cannot be read as text
        stops with the reason, or with `on_unreadable="skip"` is left out
        and listed in the manifest's `skipped` (the rest must hold text)."""
        return stage_files(lambda: self.store, self.chunk_bytes, files=files, kind=kind, remember=self._remember,
                           progress=progress, on_unreadable=on_unreadable, label=label, tick=tick).wait()  # fmt: skip

    def _put(self, kind: str, sources: Iterable[Source]) -> ContextRef:
        return stage(lambda: self.store, self.chunk_bytes, kind, sources, remember=self._remember).wait()

    # ---- reading -------------------------------------------------------

    def manifest(self, ref: ContextRef, *, grace_s: float = 0.0) -> Manifest:
        """The verified manifest of `ref` (cached: manifests never change).
        `grace_s`: how long a missing manifest is waited for (UPLOAD_GRACE_S:
        the run may have started before its upload ended)."""
        with self._manifests_lock:
            cached = self._manifests.get(ref.sha256)
            if cached is not None:
                self._manifests.move_to_end(ref.sha256)
                return cached
        key = manifest_key_for(ref.sha256)  # never another key a reference names
        try:
            data = wait_for_object(lambda: self.store.get_bytes(key), grace_s)
        except ObjectMissingError:
            raise ContextMissingError(
                f"context {ref.sha256[:16]} not found: no manifest {key!r} in bucket "
                f"{self.store.bucket!r} on {self.store.endpoint}; upload it with `rlm context put`"
            ) from None
        return self.adopt_manifest(ref.sha256, data, key)

    def has_manifest(self, sha256: str) -> bool:
        """The manifest of the context `sha256` is cached in memory."""
        with self._manifests_lock:
            return sha256 in self._manifests

    def adopt_manifest(self, sha256: str, data: bytes, source: str) -> Manifest:
        """The manifest of the context `sha256` from `data` read elsewhere
        (`source`, for errors: a bucket key, or a copy on this machine),
        verified against that sha256 and cached as if read from the bucket."""
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256:
            raise ContextIntegrityError(f"manifest {source!r} is corrupt: sha256 {digest} != {sha256}")
        try:
            manifest = Manifest.model_validate_json(data)
        except ValidationError as exc:
            raise ContextIntegrityError(f"manifest {source!r} is not a context manifest: {validation_errors(exc, 3)}") from None
        self._remember(sha256, manifest)
        return manifest

    @property
    def cached_manifests(self) -> int:
        """How many manifests are cached in memory now."""
        return len(self._manifests)

    def _remember(self, sha256: str, manifest: Manifest) -> None:
        items = len(manifest.documents) + len(manifest.chunks)
        with self._manifests_lock:
            old = self._manifests.pop(sha256, None)
            if old is not None:
                self._manifest_items -= len(old.documents) + len(old.chunks)
            self._manifests[sha256] = manifest
            self._manifest_items += items
            while len(self._manifests) > 1 and (
                len(self._manifests) > MANIFEST_CACHE_ENTRIES or self._manifest_items > MANIFEST_CACHE_ITEMS
            ):
                _, dropped = self._manifests.popitem(last=False)
                self._manifest_items -= len(dropped.documents) + len(dropped.chunks)

    def ref_for(self, sha256: str, *, grace_s: float = 0.0) -> ContextRef:
        """Rebuild the reference of a stored context from its sha256."""
        probe = ContextRef(
            sha256=sha256,
            manifest_key=manifest_key_for(sha256),
            kind="str",
            total_chars=0,
            total_bytes=0,
            doc_count=0,
            doc_chars_head=[],
        )
        ref, _ = self.manifest(probe, grace_s=grace_s).to_ref()
        return ref

    def _fetch_chunk(self, ref: ContextRef, chunk: ManifestChunk, grace_s: float = 0.0) -> bytes:
        try:
            # One byte past the chunk's length shows an object too long
            # without downloading all of it.
            data = wait_for_object(lambda: self.store.get_range(chunk.key, 0, chunk.bytes + 1), grace_s)
        except ObjectMissingError:
            raise ContextIntegrityError(
                f"chunk {chunk.key!r} of context {ref.sha256[:16]} is missing from bucket "
                f"{self.store.bucket!r}; upload the context again"
            ) from None
        digest = hashlib.sha256(data).hexdigest()
        if digest != chunk.sha256 or len(data) != chunk.bytes:
            raise ContextIntegrityError(
                f"chunk {chunk.key!r} of context {ref.sha256[:16]} is corrupt: expected sha256 "
                f"{chunk.sha256} ({chunk.bytes} bytes), got {digest} ({len(data)} bytes); "
                "upload the context again"
            )
        return data

    def _iter_chunks(self, ref: ContextRef, chunks: list[ManifestChunk], grace_s: float = 0.0) -> Iterator[bytes]:
        """Verified chunk bytes in order, fetched ahead in parallel."""
        if len(chunks) == 1:
            yield self._fetch_chunk(ref, chunks[0], grace_s)
            return
        with ThreadPoolExecutor(PARALLEL_TRANSFERS, thread_name_prefix="ctx-get") as executor:
            ahead: deque[Future[bytes]] = deque()
            todo = iter(chunks)
            try:
                for chunk in todo:
                    ahead.append(executor.submit(self._fetch_chunk, ref, chunk, grace_s))
                    if len(ahead) >= PARALLEL_TRANSFERS:
                        yield ahead.popleft().result()
                while ahead:
                    yield ahead.popleft().result()
            finally:
                for future in ahead:
                    future.cancel()

    def read_range(self, ref: ContextRef, start: int, end: int) -> bytes:
        """Bytes [start, end) of the concatenated UTF-8 stream of all documents."""
        manifest = self.manifest(ref)
        if not 0 <= start <= end <= manifest.total_bytes:
            raise ContextInputError(
                f"byte range [{start}, {end}) is outside context {ref.sha256[:16]} "
                f"of {manifest.total_bytes} bytes"
            )
        chunks = manifest.chunks_for(start, end)
        out = bytearray()
        for chunk, data in zip(chunks, self._iter_chunks(ref, chunks), strict=True):
            lo = max(start - chunk.offset, 0)
            hi = min(end - chunk.offset, chunk.bytes)
            out += data[lo:hi]
        return bytes(out)

    def read_document(self, ref: ContextRef, index: int) -> str:
        """Document `index` (0 for a `str` context)."""
        manifest = self.manifest(ref)
        if not 0 <= index < len(manifest.documents):
            raise ContextInputError(
                f"document {index} does not exist: context {ref.sha256[:16]} has "
                f"{len(manifest.documents)} document(s)"
            )
        doc = manifest.documents[index]
        return self.read_range(ref, doc.offset, doc.offset + doc.bytes).decode("utf-8")

    def read_all(self, ref: ContextRef) -> str | list[str]:
        """The whole context: a `str` or a `list[str]`, as it was put."""
        manifest = self.manifest(ref)
        stream = bytearray()
        for data in self._iter_chunks(ref, manifest.chunks):
            stream += data
        view = memoryview(stream)
        docs = [str(view[d.offset : d.offset + d.bytes], "utf-8") for d in manifest.documents]
        return docs[0] if manifest.kind == "str" else docs

    def materialize(self, ref: ContextRef, dest_root: Path, *, grace_s: float = 0.0) -> list[DocumentSpan]:
        """Write the documents as one UTF-8 file under dest_root/<sha256>/
        (once, atomically; reused when present) and return where each is in
        it, in document order. This is how the sandbox gets the context."""
        manifest = self.manifest(ref, grace_s=grace_s)
        return document_spans(
            manifest, Path(dest_root) / ref.sha256, lambda: self._iter_chunks(ref, manifest.chunks, grace_s)
        )
