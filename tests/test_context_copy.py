"""A context copied to a worker's cache while it uploads (`copy_to`): the
bytes `materialize` would write, found there without reading S3, and never
a reason for an upload to fail or leave files behind."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from activities._context_copy import DOCUMENTS_FILE, MANIFEST_FILE
from activities.context_store import ContextInputError, ContextStore, IntegrityError
from activities.object_store import ObjectStore
from sandbox_wasm import DocumentSpan


def _corpus(root: Path) -> Path:
    """A directory of documents the upload transforms: a BOM dropped, HTML
    converted to text, a multi-byte text over several chunks."""
    root.mkdir()
    marker = uuid.uuid4().hex
    (root / "a.txt").write_bytes(b"\xef\xbb\xbf" + f"bom first {marker}".encode())
    (root / "b.html").write_text(f"<html><body><h1>Title {marker}</h1><p>para</p></body></html>")
    (root / "c.txt").write_text(f"{marker} ünïcode € line\n" * 400)
    return root


def _files(directory: Path) -> dict[str, bytes]:
    """The documents' file (not the manifest a copy keeps beside it)."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name != MANIFEST_FILE}


def test_the_copy_is_what_materialize_writes_and_is_used_without_s3(
    object_store: ObjectStore, tmp_path: Path
) -> None:
    store = ContextStore(object_store, chunk_bytes=1000)  # documents straddle chunks
    cache = tmp_path / "cache"
    ref = store.put_paths([_corpus(tmp_path / "corpus")], copy_to=cache)

    fetched = ContextStore(object_store).materialize(ref, tmp_path / "fetched")
    copied = cache / ref.sha256
    assert _files(copied) == _files(fetched[0].path.parent) == {DOCUMENTS_FILE: _files(copied)[DOCUMENTS_FILE]}
    assert [span.read_bytes().decode() for span in fetched] == store.read_all(ref)
    assert sorted(os.listdir(cache)) == [ref.sha256]  # nothing half-written beside it

    # With every chunk in S3 corrupted, only a read of S3 can fail.
    for chunk in store.manifest(ref).chunks:
        object_store.put_bytes(chunk.key, b"tampered")
    assert ContextStore(object_store).materialize(ref, cache) == [
        DocumentSpan(copied / DOCUMENTS_FILE, span.offset, span.size) for span in fetched
    ]
    with pytest.raises(IntegrityError):
        ContextStore(object_store).materialize(ref, tmp_path / "elsewhere")


def test_a_context_already_in_the_cache_keeps_its_files(object_store: ObjectStore, tmp_path: Path) -> None:
    store = ContextStore(object_store)
    path = tmp_path / "one.txt"
    path.write_text(f"same text {uuid.uuid4().hex}")
    cache = tmp_path / "cache"
    first = store.put_paths([path], copy_to=cache)
    kept = cache / first.sha256 / DOCUMENTS_FILE
    before = kept.stat().st_ino
    second = store.put_paths([path], copy_to=cache)
    assert second == first
    assert sorted(os.listdir(cache)) == [first.sha256]
    assert kept.stat().st_ino == before


def test_a_cache_written_file_by_file_is_read_as_it_is(object_store: ObjectStore, tmp_path: Path) -> None:
    """An earlier version wrote a file per document (`000000.txt`, ...): a
    worker's cache from before an upgrade is used, not written again; one
    with a document cut short is replaced."""
    store = ContextStore(object_store)
    ref = store.put_documents(["first document", "", "third ünïcode"])
    old = tmp_path / "cache" / ref.sha256
    old.mkdir(parents=True)
    for index, text in enumerate(["first document", "", "third ünïcode"]):
        (old / f"{index:06d}.txt").write_text(text)
    inodes = [p.stat().st_ino for p in sorted(old.iterdir())]
    spans = store.materialize(ref, tmp_path / "cache")
    assert [span.path.name for span in spans] == ["000000.txt", "000001.txt", "000002.txt"]
    assert [span.read_bytes().decode() for span in spans] == ["first document", "", "third ünïcode"]
    assert [p.stat().st_ino for p in sorted(old.iterdir())] == inodes

    (old / "000002.txt").write_text("third")  # shorter than its manifest says: not trusted
    spans = store.materialize(ref, tmp_path / "cache")
    assert sorted(os.listdir(old)) == [DOCUMENTS_FILE]
    assert [span.read_bytes().decode() for span in spans] == ["first document", "", "third ünïcode"]


def test_a_copy_that_cannot_be_written_leaves_the_upload_whole(object_store: ObjectStore, tmp_path: Path) -> None:
    store = ContextStore(object_store)
    path = tmp_path / "doc.txt"
    text = f"uploaded anyway {uuid.uuid4().hex}"
    path.write_text(text)
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("in the way")
    ref = store.put_paths([path], copy_to=not_a_dir / "cache")
    assert store.read_all(ref) == text
    assert not_a_dir.read_text() == "in the way"


def test_a_failed_upload_leaves_no_copy(object_store: ObjectStore, tmp_path: Path) -> None:
    store = ContextStore(object_store)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "good.txt").write_text("fine")
    (corpus / "bad.txt").write_bytes(b"\xff\xfe not utf-8 \x00\x01")
    cache = tmp_path / "cache"
    with pytest.raises(ContextInputError):
        store.put_paths([corpus], copy_to=cache)
    assert os.listdir(cache) == []
