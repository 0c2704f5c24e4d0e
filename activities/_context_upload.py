"""Writing a context: documents streamed into sha256-addressed chunks, each
uploaded on a thread pool, then the manifest.

The context's reference (the manifest's sha256) is known as soon as every
chunk is hashed, before the uploads end. `stage` returns then. `rlm run`
with the embedded worker starts its run at that point, since that worker
loads the context from the copy written beside the upload (`DocumentCopy`,
the manifest beside the documents) and needs nothing from the bucket; a
worker that reads the bucket waits for the manifest (UPLOAD_GRACE_S in
activities/object_store.py). With `hold`, nothing is sent before the run
has started (`StagedContext.release()`): the PUTs (~0.2 s for 40 MB here,
their eight threads taking the GIL from the reading) run beside the workflow
instead of before it, with up to QUEUED_CHUNKS held in memory. The client
waits for the upload before it returns; every other caller waits at once
(`ContextStore.put_*`, in its own thread).

The manifest is uploaded last, after every chunk: a manifest in the bucket
always names chunks that are there.
"""

from __future__ import annotations

import hashlib
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import structlog

from activities._context_copy import DocumentCopy
from activities._context_input import ContextInputError, DocumentStats, NamedFile, named_files
from activities._context_manifest import Manifest, ManifestChunk, ManifestDocument
from activities._context_sources import file_sources
from workflows.refs import ContextRef, SkippedDocument, chunk_key_for

if TYPE_CHECKING:  # imported by whoever opens the store: `rlm run` does it after starting
    from activities.object_store import ObjectStore

__all__ = ["DEFAULT_CHUNK_BYTES", "PARALLEL_TRANSFERS", "OnUnreadable", "Progress", "Source", "StagedContext", "StagingStopped", "stage", "stage_files"]

log = structlog.get_logger(__name__)

DEFAULT_CHUNK_BYTES = 4 << 20
# Chunks in flight at once: keeps the endpoint busy while the next chunk is
# read and hashed.
PARALLEL_TRANSFERS = 8
# Chunks a held upload keeps read but not yet stored (x chunk size: 64 MB):
# a 40 MB context is read, hashed and its run started before any is sent.
QUEUED_CHUNKS = 2 * PARALLEL_TRANSFERS
# A chunk this large is hashed on a thread while the next is read (1 MB: ~0.5 ms).
_HASH_ON_THREAD_BYTES = 1 << 20

OnUnreadable = Literal["fail", "skip"]
Progress = Callable[[int], None]
"""Called with the number of input bytes consumed so far."""
Source = tuple[DocumentStats, Iterator[bytes]] | tuple[DocumentStats, Iterator[bytes], str]
"""One document: its stats (filled while read), its bytes, and its name."""


class StagingStopped(Exception):
    """The caller stopped the staging (`stop`): nothing of it is kept."""


class StagedContext:
    """A context whose reference is known and whose upload may still run."""

    def __init__(self, ref: ContextRef, local: bool, finish: Callable[[], None]) -> None:
        self.ref = ref
        self.local = local
        """The copy under `copy_to` holds this context and its manifest: a
        worker reading that directory loads it without the bucket."""
        self._finish = finish
        self._error: BaseException | None = None
        self._started = False
        self._done = threading.Event()
        self._lock = threading.Lock()

    def release(self) -> None:
        """Finish the upload in the background (sending what `hold` kept
        back). The thread is not a daemon: a client that returns from its
        command, or leaves after one Ctrl-C, joins it before the interpreter
        ends; only a kill (or os._exit) cuts it short."""
        if self._claim():
            threading.Thread(target=self._run, name="ctx-put-finish").start()

    def wait(self) -> ContextRef:
        """The reference once every chunk and the manifest are stored; the
        upload's error otherwise. Unreleased, it finishes in this thread.
        Any number of waits, from any threads."""
        if self._claim():
            self._run()
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self.ref

    @property
    def released(self) -> bool:
        return self._started

    def _claim(self) -> bool:
        """True for the one caller that is to finish the upload."""
        with self._lock:
            first, self._started = not self._started, True
            return first

    def _run(self) -> None:
        try:
            self._finish()
        except BaseException as exc:  # handed to wait()
            self._error = exc
        finally:
            self._done.set()


def stage_files(
    open_store: Callable[[], ObjectStore],
    chunk_bytes: int,
    paths: list[Path] | None = None,
    *,
    files: list[NamedFile] | None = None,
    kind: Literal["str", "list"] | None = None,
    remember: Callable[[str, Manifest], None] | None = None,
    progress: Progress | None = None,
    on_unreadable: OnUnreadable = "fail",
    label: str | None = None,
    tick: Callable[[], None] | None = None,
    copy_to: Path | None = None,
    hold: bool = False,
    stop: threading.Event | None = None,
) -> StagedContext:
    """`paths` (one file: a `str` context; several, or a directory: a
    `list[str]`), or `files` of the given `kind`, staged (see `stage`)."""
    if on_unreadable not in ("fail", "skip"):
        raise ContextInputError(f"on_unreadable must be 'fail' or 'skip', got {on_unreadable!r}")
    if files is None:
        paths = [Path(p) for p in paths or []]
        files = named_files(paths)
        kind = "str" if len(paths) == 1 and len(files) == 1 and paths[0].is_file() else "list"
        label = label or ", ".join(map(str, paths))
    assert kind is not None
    if kind == "str" and files and files[0].size() == 0:
        raise ContextInputError(f"file {files[0].shown} is empty: a context needs some text")
    skipped: list[SkippedDocument] = []
    sources = file_sources(files, skip=on_unreadable == "skip", skipped=skipped, tick=tick)
    copy = DocumentCopy(copy_to) if copy_to is not None else None
    return stage(open_store, chunk_bytes, kind, sources, remember=remember, progress=progress,
                 label=label or "context", skipped=skipped, copy=copy, hold=hold, stop=stop)  # fmt: skip


def stage(
    open_store: Callable[[], ObjectStore],
    chunk_bytes: int,
    kind: str,
    sources: Iterable[Source],
    *,
    remember: Callable[[str, Manifest], None] | None = None,
    progress: Progress | None = None,
    label: str = "context",
    skipped: list[SkippedDocument] | None = None,
    copy: DocumentCopy | None = None,
    hold: bool = False,
    stop: threading.Event | None = None,
) -> StagedContext:
    """Read, hash and upload every document; return once the reference is
    known and the copy (if any) is in place, the last uploads still to wait
    for (`wait()`, or `release()` to finish them in the background). `hold`:
    send nothing (nor call `open_store`) until then, unless more than
    QUEUED_CHUNKS are read. `remember(sha256, manifest)` is called once the
    manifest is stored. `stop` set (the client was interrupted): the reading
    ends at the next block with StagingStopped, the copy discarded."""
    uploader = _Uploader(open_store, hold)
    try:
        manifest = _read(uploader, chunk_bytes, kind, sources, progress, label, skipped, copy, stop)
    except BaseException:
        uploader.abandon()
        if copy is not None:
            copy.discard()
        raise
    ref, data = manifest.to_ref()
    local = copy.finish(ref.sha256, data) if copy is not None else False

    def finish() -> None:
        try:
            uploader.finish(ref.manifest_key, data)
        except BaseException:
            if local:  # no worker may start on a copy whose context the bucket lacks
                copy.forget_manifest(ref.sha256)  # type: ignore[union-attr]
            raise
        if remember is not None:
            remember(ref.sha256, manifest)
        log.info("context stored", sha256=ref.sha256[:16], kind=kind, bytes=ref.total_bytes, docs=ref.doc_count,
                 chunks=len(manifest.chunks), new_objects=uploader.new_objects)  # fmt: skip

    return StagedContext(ref, local, finish)


class _Uploader:
    """The chunks' uploads: held back until released, then on a pool."""

    def __init__(self, open_store: Callable[[], ObjectStore], hold: bool) -> None:
        self._open_store = open_store
        self._store: ObjectStore | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._held: list[tuple[str, bytes]] | None = [] if hold else None
        self._queue = QUEUED_CHUNKS if hold else PARALLEL_TRANSFERS
        self._uploads: deque[Future[None]] = deque()
        self.new_objects = 0  # a race between threads only skews a log figure

    def add(self, key: str, data: bytes) -> None:
        if self._held is not None and len(self._held) < QUEUED_CHUNKS:
            self._held.append((key, data))
            return
        self._send_held()
        # Held back, the queue may grow to QUEUED_CHUNKS; sent at once (every
        # worker-side put), it stays at what the pool works on.
        while len(self._uploads) >= self._queue:
            self._uploads.popleft().result()
        self._uploads.append(self._executor.submit(self._store_chunk, key, data))  # type: ignore[union-attr]

    def finish(self, manifest_key: str, manifest: bytes) -> None:
        """Every chunk stored, then the manifest."""
        try:
            self._send_held()
            while self._uploads:
                self._uploads.popleft().result()
            store = self._opened()
            if not store.exists(manifest_key):
                store.put_bytes(manifest_key, manifest)
                self.new_objects += 1
        finally:
            self.abandon()

    def abandon(self) -> None:
        for future in self._uploads:
            future.cancel()
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def _send_held(self) -> None:
        if self._executor is None:
            self._opened()
            self._executor = ThreadPoolExecutor(PARALLEL_TRANSFERS, thread_name_prefix="ctx-put")
        held, self._held = self._held or [], None
        for key, data in held:
            self._uploads.append(self._executor.submit(self._store_chunk, key, data))

    def _opened(self) -> ObjectStore:
        if self._store is None:
            self._store = self._open_store()
        return self._store

    def _store_chunk(self, key: str, data: bytes) -> None:
        store = self._opened()
        if not store.exists(key):
            store.put_bytes(key, data)
            self.new_objects += 1


def _read(
    uploader: _Uploader,
    chunk_bytes: int,
    kind: str,
    sources: Iterable[Source],
    progress: Progress | None,
    label: str,
    skipped: list[SkippedDocument] | None,
    copy: DocumentCopy | None,
    stop: threading.Event | None,
) -> Manifest:
    documents: list[ManifestDocument] = []
    chunks: list[ManifestChunk] = []
    cutter = _ChunkCutter(chunk_bytes)
    offset = 0  # bytes of the stream handed to chunks so far

    def hashed(sha256: str, data: bytes) -> None:
        nonlocal offset
        chunks.append(ManifestChunk(key=chunk_key_for(sha256), sha256=sha256, offset=offset, bytes=len(data)))
        offset += len(data)
        uploader.add(chunks[-1].key, data)

    stream_bytes = 0
    with _ChunkHashes(hashed) as hashes:
        for source in sources:
            stats, blocks = source[0], source[1]
            name = source[2] if len(source) > 2 else None
            start = stream_bytes
            for block in blocks:
                if stop is not None and stop.is_set():
                    raise StagingStopped(f"reading {label} was stopped after {stream_bytes:,} bytes")
                if copy is not None:
                    copy.write(block)
                stream_bytes += len(block)
                for data in cutter.cut(block):
                    hashes.add(data)
                if progress is not None:
                    progress(stream_bytes)
            documents.append(
                ManifestDocument(offset=start, bytes=stats.bytes, chars=stats.chars, encoding=stats.encoding, name=name)
            )
        if cutter.held:
            hashes.add(cutter.take())
        hashes.drain()
    if skipped and not documents:
        raise ContextInputError(
            f"no readable file in {label}: all {len(skipped)} were skipped "
            f"(first: {skipped[0].name}: {skipped[0].reason})"
        )
    if stream_bytes == 0:
        raise ContextInputError(f"{label} is empty: a context needs some text")
    return Manifest(
        kind=kind,  # type: ignore[arg-type]
        chunk_bytes=chunk_bytes,
        total_bytes=offset,
        total_chars=sum(d.chars for d in documents),
        documents=documents,
        chunks=chunks,
        skipped=list(skipped or []),
    )


class _ChunkHashes:
    """Each chunk hashed on a thread while the next one is read (hashlib lets
    go of the GIL: 40 MB take ~22 ms of sha256, which the reading, checking
    and copying of the next chunk now overlap), then handed on in order.

    Hashed here, not on the upload pool: the reference must not wait for an
    upload to free a thread. At most one chunk waits for its hash; a small
    one (a worker's sub-call context) is hashed at once, without a thread."""

    def __init__(self, hashed: Callable[[str, bytes], None]) -> None:
        self._hashed = hashed
        self._pool: ThreadPoolExecutor | None = None
        self._waiting: deque[tuple[Future[str], bytes]] = deque()

    def add(self, data: bytes) -> None:
        if len(data) < _HASH_ON_THREAD_BYTES:
            self.drain()  # the chunks before it go first
            self._hashed(_sha256_hex(data), data)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="ctx-hash")
        self._waiting.append((self._pool.submit(_sha256_hex, data), data))
        while len(self._waiting) > 1:
            self._hand_on()

    def drain(self) -> None:
        while self._waiting:
            self._hand_on()

    def _hand_on(self) -> None:
        future, data = self._waiting.popleft()
        self._hashed(future.result(), data)

    def __enter__(self) -> _ChunkHashes:
        return self

    def __exit__(self, *exc: object) -> None:
        for future, _data in self._waiting:
            future.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _ChunkCutter:
    """Cuts a stream of blocks into chunks of `size` bytes, copying each byte
    once (into its chunk): 40 MB through a bytearray buffer cost ~40 ms."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.held = 0
        self._parts: list[memoryview] = []

    def cut(self, block: bytes) -> Iterator[bytes]:
        """The chunks `block` completes."""
        view = memoryview(block)
        while view:
            take = min(self.size - self.held, len(view))
            self._parts.append(view[:take])
            self.held += take
            view = view[take:]
            if self.held == self.size:
                yield self.take()

    def take(self) -> bytes:
        """The bytes held, as one chunk."""
        data = b"".join(self._parts)
        self._parts, self.held = [], 0
        return data
