"""A context staged for a run that starts before its upload ends
(activities/_context_upload.py): the reference and the worker's copy come
first, nothing reaches the bucket before `release()`, the manifest is stored
after every chunk, and a worker either loads the copy (sharing the cache)
or waits for the manifest (reading the bucket). Real S3 throughout."""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from pathlib import Path

import pytest

from activities._context_cache import ContextFileCache, adopt_local_manifest
from activities._context_copy import MANIFEST_FILE
from activities._context_upload import QUEUED_CHUNKS, StagingStopped, stage_files
from activities.context_store import ContextMissingError, ContextStore
from activities.object_store import ObjectMissingError, ObjectStore, S3UnreachableError


class _Recorded:
    """The real store, with the keys it was asked to store, in order."""

    def __init__(self, store: ObjectStore) -> None:
        self._store = store
        self.put: list[str] = []
        self.opened = 0

    def open(self) -> _Recorded:
        self.opened += 1
        return self

    def exists(self, key: str) -> bool:
        return self._store.exists(key)

    def put_bytes(self, key: str, data: bytes) -> None:
        if key.startswith("contexts/chunks/"):
            time.sleep(0.05)  # slower than the manifest: a manifest sent too early lands first
        self._store.put_bytes(key, data)
        self.put.append(key)  # in the order they were stored


class _Watched:
    """The real store, telling when a read found nothing (so that a test
    releases an upload only once a reader has waited for it)."""

    def __init__(self, store: ObjectStore) -> None:
        self._store = store
        self.missed = threading.Event()

    def __getattr__(self, name: str):
        return getattr(self._store, name)

    def get_bytes(self, key: str) -> bytes:
        return self._watch(self._store.get_bytes, key)

    def get_range(self, key: str, start: int, end: int) -> bytes:
        return self._watch(self._store.get_range, key, start, end)

    def _watch(self, read, *args):
        try:
            return read(*args)
        except ObjectMissingError:
            self.missed.set()
            raise


def _text(tmp_path: Path, chars: int) -> tuple[Path, str]:
    marker = uuid.uuid4().hex
    text = "".join(f"{marker} {i} ünïcode line\n" for i in range(chars // 40 + 1))[:chars]  # no chunk repeats
    path = tmp_path / "doc.txt"
    path.write_text(text, encoding="utf-8")
    return path, text


def test_a_held_upload_sends_nothing_until_released_and_a_worker_loads_the_copy_meanwhile(
    object_store: ObjectStore, tmp_path: Path
) -> None:
    path, text = _text(tmp_path, 9_000)
    cache = tmp_path / "cache"
    recorded = _Recorded(object_store)
    staged = stage_files(recorded.open, 1000, [path], copy_to=cache, hold=True)
    ref = staged.ref
    assert staged.local and not staged.released
    assert recorded.opened == 0 and recorded.put == []
    assert not object_store.exists(ref.manifest_key)
    assert (cache / ref.sha256 / MANIFEST_FILE).is_file()

    # A worker sharing the cache: the reference checks and the context loads
    # from the copy, with nothing in the bucket.
    worker = ContextStore(object_store)
    adopt_local_manifest(worker, cache, ref.sha256)
    assert worker.ref_for(ref.sha256) == ref
    paths, release = ContextFileCache(cache, 1 << 30, ContextStore(object_store)).acquire(ref)
    try:
        assert [p.read_bytes().decode("utf-8") for p in paths] == [text]
    finally:
        release()
    with pytest.raises(ContextMissingError):  # a worker reading the bucket finds nothing yet
        ContextStore(object_store).manifest(ref)

    assert staged.wait() == ref
    assert recorded.opened == 1
    chunks = ContextStore(object_store).manifest(ref).chunks
    assert len(chunks) == 10
    assert recorded.put[-1] == ref.manifest_key  # after every chunk
    assert sorted(recorded.put[:-1]) == sorted(c.key for c in chunks)
    assert ContextStore(object_store).read_all(ref) == text


def test_a_held_upload_longer_than_its_queue_starts_sending_while_it_reads(
    object_store: ObjectStore, tmp_path: Path
) -> None:
    path, text = _text(tmp_path, 100 * (QUEUED_CHUNKS + 5))
    recorded = _Recorded(object_store)
    staged = stage_files(recorded.open, 100, [path], copy_to=tmp_path / "cache", hold=True)
    assert recorded.opened == 1  # memory stays bounded: the queue overflowed
    assert len(recorded.put) >= 1
    staged.wait()
    assert ContextStore(object_store).read_all(staged.ref) == text


def test_a_worker_reading_the_bucket_waits_for_a_manifest_still_uploading(
    object_store: ObjectStore, tmp_path: Path
) -> None:
    path, text = _text(tmp_path, 5_000)
    staged = stage_files(lambda: object_store, 1000, [path], copy_to=tmp_path / "cache", hold=True)
    found: list[object] = []
    watched = _Watched(object_store)
    reader = threading.Thread(target=lambda: found.append(ContextStore(watched).manifest(staged.ref, grace_s=60)))  # type: ignore[arg-type]
    reader.start()
    assert watched.missed.wait(30)  # it looked, found nothing, and waits
    staged.wait()
    reader.join(60)
    assert not reader.is_alive()
    assert found and found[0] == ContextStore(object_store).manifest(staged.ref)

    never = staged.ref.model_copy(update={"sha256": "f" * 64})
    with pytest.raises(ContextMissingError, match="not found"):
        ContextStore(object_store).manifest(never, grace_s=0.5)


def test_a_copy_whose_manifest_was_altered_is_not_believed(object_store: ObjectStore, tmp_path: Path) -> None:
    path, text = _text(tmp_path, 3_000)
    cache = tmp_path / "cache"
    ref = ContextStore(object_store).put_paths([path], copy_to=cache)
    (cache / ref.sha256 / MANIFEST_FILE).write_text('{"kind": "str", "chunks": []}')
    worker = ContextStore(object_store)
    adopt_local_manifest(worker, cache, ref.sha256)  # logged and ignored
    assert worker.cached_manifests == 0
    assert worker.ref_for(ref.sha256) == ref  # read from the bucket


def test_a_held_upload_that_cannot_reach_the_bucket_says_why_on_wait(tmp_path: Path) -> None:
    path, _ = _text(tmp_path, 2_000)

    def unreachable() -> ObjectStore:
        raise S3UnreachableError("S3 endpoint 127.0.0.1:9 is unreachable")

    cache = tmp_path / "cache"
    staged = stage_files(unreachable, 1000, [path], copy_to=cache, hold=True)
    assert staged.local
    with pytest.raises(S3UnreachableError, match="unreachable"):
        staged.wait()
    # No worker may start on that copy now: it would read the bucket, and wait there.
    assert not (cache / staged.ref.sha256 / MANIFEST_FILE).exists()


def test_a_copy_evicted_after_its_manifest_was_read_is_loaded_from_the_upload(
    object_store: ObjectStore, tmp_path: Path
) -> None:
    """The check of the run's reference read the copy's manifest; the copy
    is evicted (an unused context, a full disk) before the cell loads it; the
    chunks are still uploading. The cell waits for them instead of failing."""
    path, text = _text(tmp_path, 5_000)
    cache = tmp_path / "cache"
    staged = stage_files(lambda: object_store, 1000, [path], copy_to=cache, hold=True)
    watched = _Watched(object_store)
    worker = ContextStore(watched)  # type: ignore[arg-type]
    adopt_local_manifest(worker, cache, staged.ref.sha256)
    files = ContextFileCache(cache, 0, worker)
    files.evict()
    assert not (cache / staged.ref.sha256).exists()
    loaded: list[str] = []

    def load() -> None:
        paths, release = files.acquire(staged.ref)
        loaded.extend(p.read_bytes().decode("utf-8") for p in paths)
        release()

    loader = threading.Thread(target=load)
    loader.start()
    assert watched.missed.wait(30)  # a chunk was not there yet
    staged.wait()
    loader.join(60)
    assert loaded == [text]


def test_an_upload_waited_for_again_from_another_thread_returns(object_store: ObjectStore, tmp_path: Path) -> None:
    """`rlm run` waits once before starting (no copy for a worker here) and
    again after: the second wait, from another thread, must not hang."""
    path, text = _text(tmp_path, 3_000)
    staged = stage_files(lambda: object_store, 1000, [path], copy_to=tmp_path / "cache", hold=True)
    assert staged.wait() == staged.ref
    staged.release()  # already finished: nothing to start
    again = threading.Thread(target=staged.wait)
    again.start()
    again.join(30)
    assert not again.is_alive()
    assert ContextStore(object_store).read_all(staged.ref) == text


def test_a_stopped_staging_ends_at_its_next_block_and_keeps_nothing(object_store: ObjectStore, tmp_path: Path) -> None:
    """Ctrl-C while `rlm run` reads a large context sets `stop`: the reading
    ends at the next block instead of reading (and uploading) the rest."""
    path, _ = _text(tmp_path, 3 * 1024 * 1024)  # several read blocks
    cache = tmp_path / "cache"
    stop = threading.Event()
    read: list[int] = []

    def progress(consumed: int) -> None:
        read.append(consumed)
        stop.set()  # as the CLI does when its task is cancelled

    with pytest.raises(StagingStopped, match="stopped after"):
        stage_files(lambda: object_store, 1 << 20, [path], copy_to=cache, progress=progress, stop=stop)
    assert len(read) == 1 and read[0] < path.stat().st_size
    assert [p.name for p in cache.iterdir()] == []  # no copy, half-written or whole


def test_chunks_hashed_on_a_thread_keep_their_order_offsets_and_hashes(object_store: ObjectStore, tmp_path: Path) -> None:
    """Chunks of 1 MB and more are hashed on a thread while the next one is
    read: the manifest still lists every chunk in stream order, at its
    offset, under the sha256 of its own bytes, and the context reads back
    byte for byte. A failure while a chunk is hashing leaves no thread behind."""
    path, text = _text(tmp_path, 5 * 1024 * 1024 + 12345)  # 5 whole chunks of 1 MB and a short one
    data = path.read_bytes()
    upload = stage_files(lambda: object_store, 1 << 20, [path])
    ref = upload.wait()
    manifest = ContextStore(object_store).manifest(ref)
    assert [c.offset for c in manifest.chunks] == list(range(0, len(data), 1 << 20))
    for chunk in manifest.chunks:
        piece = data[chunk.offset : chunk.offset + chunk.bytes]
        assert chunk.bytes == len(piece) and chunk.sha256 == hashlib.sha256(piece).hexdigest()
        assert object_store.get_bytes(chunk.key) == piece
    assert ContextStore(object_store).read_all(ref) == text

    before = {t.name for t in threading.enumerate()}
    with pytest.raises(S3UnreachableError):
        stage_files(_unreachable, 1 << 20, [path])  # uploads at once: fails on the first chunk
    assert not {t.name for t in threading.enumerate()} - before


def _unreachable() -> ObjectStore:
    raise S3UnreachableError("the S3 server went away")
