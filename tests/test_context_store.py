"""Context store against the session's real S3 server.

Each test stores content with a random marker, so its chunks are its own
(chunks are deduplicated across contexts in the shared bucket).
"""

from __future__ import annotations

import io
import json
import os
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from activities._context_copy import DOCUMENTS_FILE
from activities.context_store import (
    ContextInputError,
    ContextIntegrityError,
    ContextMissingError,
    ContextStore,
)
from activities.object_store import (
    IntegrityError,
    ObjectMissingError,
    ObjectStore,
    S3AuthError,
    S3BucketMissingError,
    S3UnreachableError,
    STORAGE_THREADS,
)
from activities.settings import Settings
from cli._ports import find_free_port
from cli.main import main
from workflows.refs import ContextRef


def _unique(text: str = "") -> str:
    return f"[{uuid.uuid4().hex}] {text}"


def _small_chunks(object_store: ObjectStore) -> ContextStore:
    """7-byte chunks: multi-byte characters and documents straddle chunks."""
    return ContextStore(object_store, chunk_bytes=7)


def test_str_round_trip_across_chunk_boundaries(object_store: ObjectStore) -> None:
    store = _small_chunks(object_store)
    text = _unique("naïve café — 日本語 text 🎉 spans chunks")
    ref = store.put_text(text)
    assert (ref.kind, ref.doc_count, ref.total_chars) == ("str", 1, len(text))
    assert ref.total_bytes == len(text.encode())
    assert ref.doc_chars_head == [len(text)]
    fresh = _small_chunks(object_store)  # no cached manifest
    assert fresh.read_all(ref) == text
    assert fresh.read_document(ref, 0) == text


def test_list_round_trip_with_empty_documents(object_store: ObjectStore, tmp_path: Path) -> None:
    store = _small_chunks(object_store)
    docs = [_unique("first"), "", "ünïcödé second", "", "x" * 20, ""]
    ref = store.put_documents(docs)
    assert (ref.kind, ref.doc_count) == ("list", len(docs))
    assert ref.doc_chars_head == [len(d) for d in docs]
    assert store.read_all(ref) == docs
    assert [store.read_document(ref, i) for i in range(len(docs))] == docs
    spans = store.materialize(ref, tmp_path)
    assert [span.read_bytes().decode("utf-8") for span in spans] == docs
    assert {span.path for span in spans} == {tmp_path / ref.sha256 / DOCUMENTS_FILE}  # one file for all
    # A second call reuses the file instead of writing it again.
    inode = spans[0].path.stat().st_ino
    assert store.materialize(ref, tmp_path) == spans and spans[0].path.stat().st_ino == inode


def test_byte_ranges_match_the_concatenated_stream(object_store: ObjectStore) -> None:
    store = _small_chunks(object_store)
    docs = [_unique("alpha"), "βeta", "gamma-delta"]
    stream = "".join(docs).encode()
    ref = store.put_documents(docs)
    cuts = sorted({0, 1, 6, 7, 8, 13, 14, 15, 20, 21, len(stream) - 1, len(stream)})
    for start in cuts:
        for end in cuts:
            if start <= end:
                assert store.read_range(ref, start, end) == stream[start:end], (start, end)
    with pytest.raises(ContextInputError, match="outside"):
        store.read_range(ref, 0, len(stream) + 1)
    with pytest.raises(ContextInputError, match="document 3 does not exist"):
        store.read_document(ref, 3)


def test_paths_file_files_and_directory(context_store: ContextStore, tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / ".git").mkdir()
    marker = _unique()
    (root / "b.txt").write_text(marker + "bee")
    (root / "a.txt").write_text("ay")
    (root / "sub" / "c.md").write_text("sea")
    (root / ".hidden.txt").write_text("skipped")
    (root / ".git" / "HEAD").write_text("skipped")

    from_dir = context_store.put_paths([root])
    assert from_dir.kind == "list"
    assert context_store.read_all(from_dir) == ["ay", marker + "bee", "sea"]

    single = context_store.put_paths([root / "b.txt"])
    assert single.kind == "str" and context_store.read_all(single) == marker + "bee"

    several = context_store.put_paths([root / "sub" / "c.md", root / "a.txt"])
    assert several.kind == "list" and context_store.read_all(several) == ["sea", "ay"]


def test_utf8_bom_is_dropped_and_recorded(context_store: ContextStore, tmp_path: Path) -> None:
    path = tmp_path / "bom.txt"
    text = _unique("with bom")
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    ref = context_store.put_paths([path])
    assert context_store.read_all(ref) == text
    assert context_store.manifest(ref).documents[0].encoding == "utf-8-sig"


def test_same_content_twice_stores_nothing_new(object_store: ObjectStore, tmp_path: Path) -> None:
    store = ContextStore(object_store, chunk_bytes=64 * 1024)
    path = tmp_path / "big.txt"
    path.write_text(os.urandom(180_000).hex())  # 360 KB of unique text: 6 chunks
    before = object_store.count("contexts/")
    first = store.put_paths([path])
    added = object_store.count("contexts/") - before
    assert added == len(store.manifest(first).chunks) + 1  # chunks + manifest

    middle = object_store.count("contexts/")
    second = ContextStore(object_store, chunk_bytes=64 * 1024).put_paths([path])
    assert second == first
    assert object_store.count("contexts/") == middle

    # Same first chunks, different tail: only the changed chunk and a manifest are new.
    path.write_text(path.read_text() + "tail")
    third = store.put_paths([path])
    assert third.sha256 != first.sha256
    assert object_store.count("contexts/") == middle + 2


def test_corrupt_chunk_is_detected_and_named(object_store: ObjectStore) -> None:
    store = _small_chunks(object_store)
    text = _unique("integrity matters here")
    ref = store.put_text(text)
    victim = store.manifest(ref).chunks[1]
    object_store.client.put_object(object_store.bucket, victim.key, io.BytesIO(b"XXXXXXX"), 7)
    fresh = _small_chunks(object_store)
    with pytest.raises(ContextIntegrityError, match=victim.key):
        fresh.read_all(ref)
    with pytest.raises(ContextIntegrityError, match="corrupt"):
        fresh.read_range(ref, 7, 9)
    object_store.client.remove_object(object_store.bucket, victim.key)
    with pytest.raises(ContextIntegrityError, match="missing"):
        fresh.read_all(ref)
    # Uploading the content again restores the missing chunk.
    assert store.put_text(text) == ref
    assert fresh.read_all(ref) == text


def test_corrupt_manifest_and_unknown_context(context_store: ContextStore, object_store: ObjectStore) -> None:
    ref = context_store.put_text(_unique("manifest"))
    object_store.put_bytes(ref.manifest_key, b'{"tampered": true}')
    with pytest.raises(ContextIntegrityError, match="manifest"):
        ContextStore(object_store).read_all(ref)
    unknown = ref.model_copy(update={"sha256": "0" * 64, "manifest_key": "contexts/manifests/nope.json"})
    with pytest.raises(ContextMissingError, match="not found"):
        context_store.read_all(unknown)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"text\x00\x01\x02binary", r"looks binary \(NUL byte at offset 4\)"),
        ("caf\xe9 latin-1".encode("latin-1"), r"not valid UTF-8: byte 0xe9 at offset 3"),
        (b"ok\xe2\x82", r"ends inside a multi-byte character"),
        (b"\xff\xfeh\x00i\x00", r"UTF-16"),
        (b"", r"is empty"),
    ],
    ids=["binary", "latin1", "truncated", "utf16", "empty"],
)
def test_bad_files_are_rejected_with_the_cause(
    context_store: ContextStore, tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "input.txt"
    path.write_bytes(content)
    with pytest.raises(ContextInputError, match=message) as caught:
        context_store.put_paths([path])
    assert str(path) in str(caught.value)


def test_bad_offset_is_exact_beyond_the_first_block(context_store: ContextStore, tmp_path: Path) -> None:
    path = tmp_path / "late.txt"
    prefix = ("é" * 600_000).encode()  # 1.2 MB of 2-byte characters: crosses read blocks
    path.write_bytes(prefix + b"\xff")
    with pytest.raises(ContextInputError, match=f"offset {len(prefix)}"):
        context_store.put_paths([path])


def test_other_bad_inputs(context_store: ContextStore, tmp_path: Path) -> None:
    with pytest.raises(ContextInputError, match="does not exist"):
        context_store.put_paths([tmp_path / "missing.txt"])
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ContextInputError, match="contains no"):
        context_store.put_paths([tmp_path / "empty_dir"])
    with pytest.raises(ContextInputError, match="empty"):
        context_store.put_text("")
    with pytest.raises(ContextInputError, match="empty"):
        context_store.put_documents([])
    with pytest.raises(ContextInputError, match="empty"):
        context_store.put_documents(["", ""])
    with pytest.raises(ContextInputError, match="surrogate"):
        context_store.put_text("bad \ud800 text")


def test_unreachable_endpoint_fails_fast_with_fix(settings: Settings) -> None:
    dead = settings.model_copy(update={"s3_endpoint": f"127.0.0.1:{find_free_port()}"})
    with pytest.raises(S3UnreachableError, match="unreachable.*rlm up.*RLM_S3_ENDPOINT"):
        ContextStore(ObjectStore.from_settings(dead)).put_text("x")


def test_bad_credentials_missing_credentials_and_missing_bucket(settings: Settings, tmp_path: Path) -> None:
    wrong = settings.model_copy(update={"s3_access_key": "nobody", "s3_secret_key": "wrong-secret"})
    with pytest.raises(S3AuthError, match="rejected the credentials"):
        ContextStore(ObjectStore.from_settings(wrong)).put_text(_unique())
    none = settings.model_copy(update={"data_dir": tmp_path, "s3_access_key": None, "s3_secret_key": None})
    with pytest.raises(S3AuthError, match="rlm up"):
        ObjectStore.from_settings(none)
    no_bucket = settings.model_copy(update={"s3_bucket": "no-such-bucket"})
    with pytest.raises(S3BucketMissingError, match="RLM_S3_BUCKET"):
        ContextStore(ObjectStore.from_settings(no_bucket)).put_text(_unique())


def test_blob_round_trip_dedup_and_integrity(object_store: ObjectStore) -> None:
    data = _unique("blob").encode()
    ref = object_store.put_blob(data, prefix="test-blobs")
    assert object_store.put_blob(data, prefix="test-blobs") == ref
    assert object_store.get_blob(ref) == data
    object_store.put_bytes(ref.key, b"tampered")
    with pytest.raises(IntegrityError, match=ref.key):
        object_store.get_blob(ref)


def test_worker_blob_cache_answers_reads_of_recent_blobs_and_stays_bounded(object_store: ObjectStore) -> None:
    """A worker's store keeps the blobs it recently stored or read (its cells'
    prompts, read back by its sub-call activities) up to a byte budget; what
    falls out is read from S3 again, checked against its sha256."""
    budget = 64 * 1024
    cached = ObjectStore(object_store.client, object_store.bucket, endpoint=object_store.endpoint, blob_cache_bytes=budget)
    def blob(tag: str, size: int = 4096) -> bytes:
        return _unique(tag).encode().ljust(size, b".")

    first = blob("first")
    ref = cached.put_blob(first, prefix="test-blobs")
    object_store.put_bytes(ref.key, b"tampered")
    assert cached.get_blob(ref) == first  # no request: the copy stored a moment ago
    # A ref naming the same key with another hash is not answered from the copy.
    with pytest.raises(IntegrityError, match=ref.key):
        cached.get_blob(ref.model_copy(update={"sha256": "0" * 64}))
    for i in range(20):  # 80 KB more: the first blob falls out
        cached.put_blob(blob(f"filler {i}"), prefix="test-blobs")
    with pytest.raises(IntegrityError, match=ref.key):
        cached.get_blob(ref)
    # A blob larger than an eighth of the budget is never kept.
    large = blob("large", budget // 8 + 1)
    large_ref = cached.put_blob(large, prefix="test-blobs")
    object_store.put_bytes(large_ref.key, b"tampered")
    with pytest.raises(IntegrityError, match=large_ref.key):
        cached.get_blob(large_ref)


class _HeldUploads(ObjectStore):
    """A worker's store whose uploads wait for `release` (or fail with `fail`)."""

    def __init__(self, store: ObjectStore) -> None:
        super().__init__(store.client, store.bucket, endpoint=store.endpoint, blob_cache_bytes=1 << 20)
        self.release = threading.Event()
        self.fail: Exception | None = None

    def put_bytes(self, key: str, data: bytes) -> None:
        assert self.release.wait(30)
        if self.fail is not None:
            raise self.fail
        super().put_bytes(key, data)


def test_a_blob_stored_behind_is_read_here_at_once_and_waited_for_elsewhere(object_store: ObjectStore) -> None:
    """`put_blob_behind` gives the reference before the upload ends: the
    process that stores it reads it from memory meanwhile; another process
    finds nothing yet, or waits for it with a grace; once stored, it is in the
    bucket, checked by its sha256 like any blob."""
    worker = _HeldUploads(object_store)
    data = _unique("prompt").encode() * 100
    with ThreadPoolExecutor(2) as pool:
        ref, upload = worker.put_blob_behind(data, pool)
        assert not upload.done() and not object_store.exists(ref.key)
        assert worker.cached_blob(ref) == data and worker.get_blob(ref) == data
        # A ref naming the same key with another hash is not answered from memory.
        assert worker.cached_blob(ref.model_copy(update={"sha256": "0" * 64})) is None
        with pytest.raises(ObjectMissingError):
            object_store.get_blob(ref)  # another process, no grace: not there yet
        elsewhere = pool.submit(object_store.get_blob, ref, grace_s=30)
        worker.release.set()
        assert upload.result(30) == ref
        assert elsewhere.result(30) == data
    assert object_store.exists(ref.key)


def test_a_blob_whose_upload_failed_is_not_read_from_memory_any_more(object_store: ObjectStore) -> None:
    worker = _HeldUploads(object_store)
    worker.fail = S3UnreachableError("the S3 server went away")
    data = _unique("lost").encode()
    with ThreadPoolExecutor(1) as pool:
        ref, upload = worker.put_blob_behind(data, pool)
        assert worker.cached_blob(ref) == data
        worker.release.set()
        with pytest.raises(S3UnreachableError):
            upload.result(30)
    assert worker.cached_blob(ref) is None
    with pytest.raises(ObjectMissingError):
        worker.get_blob(ref)


def test_every_storage_thread_keeps_its_connection(settings: Settings, caplog) -> None:
    """As many requests at once as a worker has storage threads (a batch's
    prompt uploads) reuse their connections: none is opened and dropped for
    want of room in the pool."""
    store = ObjectStore.from_settings(settings)
    start = threading.Barrier(STORAGE_THREADS)
    prefix = _unique("pool")

    def put(index: int) -> None:
        start.wait(30)
        store.put_bytes(f"test/{prefix}/{index}", os.urandom(256 * 1024))

    with caplog.at_level("WARNING", logger="urllib3.connectionpool"):
        for _round in range(2):
            with ThreadPoolExecutor(STORAGE_THREADS) as pool:
                list(pool.map(put, range(STORAGE_THREADS)))
    assert not [r for r in caplog.records if "pool is full" in r.getMessage()]


def test_streamed_multi_chunk_file_materializes_byte_exact(
    context_store: ContextStore, tmp_path: Path
) -> None:
    path = tmp_path / "large.txt"
    line = "ascii line, then ünïcode €, then more\n"
    path.write_text(_unique() + line * 250_000)  # ~10 MB: 3 default-size chunks
    ref = context_store.put_paths([path])
    assert len(context_store.manifest(ref).chunks) == 3
    (out,) = context_store.materialize(ref, tmp_path / "ctx")
    assert out.read_bytes() == path.read_bytes()


def test_cli_context_put_and_get(settings: Settings, tmp_path: Path, monkeypatch, capsys) -> None:
    for key, value in settings.to_env().items():
        monkeypatch.setenv(key, value)
    path = tmp_path / "doc.txt"
    text = _unique("via the command line")
    path.write_text(text)
    assert main(["context", "put", str(path)]) == 0
    printed = capsys.readouterr().out
    ref = ContextRef.model_validate_json(printed)
    assert ref.kind == "str" and ref.total_chars == len(text)

    monkeypatch.setattr("sys.stdin", io.StringIO(printed))
    assert main(["context", "get", "-"]) == 0
    assert capsys.readouterr().out == text
    assert main(["context", "get", ref.sha256, "--doc", "0"]) == 0
    assert capsys.readouterr().out == text

    assert main(["context", "put", str(tmp_path / "nope.txt")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: file") and "does not exist" in err and "Traceback" not in err
    assert json.loads(ref.model_dump_json())["sha256"] == ref.sha256
