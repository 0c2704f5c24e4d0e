"""Snapshots in object storage (real S3): values once, manifest last."""

from __future__ import annotations

import pytest

from activities._snapshot_store import SnapshotFormatError, SnapshotStore, decode_manifest
from activities.object_store import ObjectStore, StorageError
from sandbox_wasm import ReplSession, SandboxLimits, Snapshot

LIMITS = SandboxLimits(cell_timeout_s=20.0, memory_bytes=256 * 1024**2)


def names(n: int) -> list[str]:
    return [f"{i:040x}" for i in range(n)]


def test_new_records_go_to_one_pack_and_old_ones_are_referenced(object_store: ObjectStore):
    snapshots = SnapshotStore(object_store)
    prefix = "runs/store-a/snapshots"
    a, b, c = names(3)
    first = Snapshot(data=b"state-1", saved=["x"], unsaved=[], refs=[a, b],
                     new_records={a: b"A" * 5000, b: b"B" * 7000})
    held = snapshots.save(f"{prefix}/c1.bin", first, {})
    assert object_store.count(prefix) == 2  # one pack, one manifest
    second = Snapshot(data=b"state-2", saved=["x"], unsaved=[], refs=[b, c], new_records={c: b"C" * 10})
    held = snapshots.save(f"{prefix}/c2.bin", second, held)
    assert object_store.count(prefix) == 4
    loaded = snapshots.load(f"{prefix}/c2.bin")
    assert loaded.state == b"state-2"
    assert loaded.records == {b: b"B" * 7000, c: b"C" * 10}
    assert loaded.locations == held and held[b].key.endswith(".pack") and held[b].key.startswith(f"{prefix}/c1-")
    # A snapshot without new records writes only its manifest.
    third = Snapshot(data=b"state-3", saved=[], unsaved=[], refs=[c], new_records={})
    snapshots.save(f"{prefix}/c3.bin", third, held)
    assert object_store.count(prefix) == 5
    assert snapshots.load(f"{prefix}/c3.bin").records == {c: b"C" * 10}
    # Nor does one whose "new" records the session holds already (the same content made anew).
    fourth = Snapshot(data=b"state-4", saved=[], unsaved=[], refs=[b, c], new_records={b: b"B" * 7000})
    assert snapshots.save(f"{prefix}/c4.bin", fourth, held) == {b: held[b], c: held[c]}
    assert object_store.count(prefix) == 6
    assert snapshots.load(f"{prefix}/c4.bin").records == {b: b"B" * 7000, c: b"C" * 10}


class FailingPacks:
    """An object store whose pack uploads fail (a worker dying mid-save)."""

    def __init__(self, store: ObjectStore) -> None:
        self._store = store

    def put_segments(self, key: str, segments: list[bytes]) -> None:
        if key.endswith(".pack"):
            raise StorageError("injected: the worker died during the pack upload")
        self._store.put_segments(key, segments)


def test_a_failed_pack_upload_leaves_no_manifest(object_store: ObjectStore):
    key = "runs/store-b/snapshots/c1.bin"
    snap = Snapshot(data=b"s", saved=[], unsaved=[], refs=names(1), new_records={names(1)[0]: b"v" * 100})
    with pytest.raises(StorageError, match="injected"):
        SnapshotStore(FailingPacks(object_store)).save(key, snap, {})
    assert not object_store.exists(key)


def test_a_reference_to_an_unstored_record_is_refused(object_store: ObjectStore):
    snap = Snapshot(data=b"s", saved=[], unsaved=[], refs=names(1), new_records={})
    with pytest.raises(SnapshotFormatError, match="never stored"):
        SnapshotStore(object_store).save("runs/store-c/snapshots/c1.bin", snap, {})
    assert not object_store.exists("runs/store-c/snapshots/c1.bin")


def test_old_whole_pickle_snapshots_and_bad_manifests(object_store: ObjectStore):
    object_store.put_bytes("runs/store-d/snapshots/old.bin", b"RLMSNAP1rest")
    old = SnapshotStore(object_store).load("runs/store-d/snapshots/old.bin")
    assert old.state == b"RLMSNAP1rest" and old.records == {}
    with pytest.raises(SnapshotFormatError, match="malformed manifest"):
        decode_manifest(b"RLMSNAPM" + b"\xff" * 8, "k")


def test_a_session_round_trip_through_storage(object_store: ObjectStore, tmp_path):
    doc = tmp_path / "d.txt"
    doc.write_text("".join(f"line {i} of the report, item {i * 7 % 1000}\n" for i in range(20_000)))
    snapshots = SnapshotStore(object_store)
    with ReplSession(limits=LIMITS).start() as session:
        session.load_context([doc], "str")
        assert session.wait_context_index(60)
        session.run_cell("part = context[1000:90_000]\nmade = 'q' * 100_000\nsmall = 1")
        held = snapshots.save("runs/store-e/snapshots/c1.bin", session.snapshot(), {})
        session.run_cell("small = 2")
        held = snapshots.save("runs/store-e/snapshots/c2.bin", session.snapshot(), held)
    assert len(held) == 1  # only `made`: `part` is a slice of the context
    with ReplSession(limits=LIMITS).start() as fresh:
        fresh.load_context([doc], "str")
        stored = snapshots.load("runs/store-e/snapshots/c2.bin")
        fresh.restore(stored.state, stored.records)
        check = fresh.run_cell("part == context[1000:90_000], len(made), small")
        assert check.value_repr == "(True, 100000, 2)"


def test_a_retried_cell_restores_the_pre_cell_snapshot_on_a_fresh_instance(object_store: ObjectStore, tmp_path):
    """Attempt 1 saves its pack and manifest, then its worker dies before the
    result is recorded; attempt 2 starts from the pre-cell manifest on a new
    instance and overwrites the cell's manifest with a valid one of its own."""
    doc = tmp_path / "d.txt"
    doc.write_text("".join(f"entry {i}: value {i * 13 % 997}\n" for i in range(10_000)))
    snapshots = SnapshotStore(object_store)
    pre, cell = "runs/store-f/snapshots/c1.bin", "runs/store-f/snapshots/c2.bin"
    with ReplSession(limits=LIMITS).start() as first:
        first.load_context([doc], "str")
        first.run_cell("kept = 'k' * 20_000\nlog = []")
        held = snapshots.save(pre, first.snapshot(), {})
        first.run_cell("log.append('attempt ' + 'x' * 9000)\nlost = 'l' * 30_000")
        snapshots.save(cell, first.snapshot(), held)
    with ReplSession(limits=LIMITS).start() as retry:
        retry.load_context([doc], "str")
        stored = snapshots.load(pre)
        retry.restore(stored.state, stored.records)
        assert retry.run_cell("len(log), 'lost' in globals()").value_repr == "(0, False)"
        retry.run_cell("log.append('attempt ' + 'y' * 9000)")
        snapshots.save(cell, retry.snapshot(), stored.locations)
    with ReplSession(limits=LIMITS).start() as later:
        later.load_context([doc], "str")
        stored = snapshots.load(cell)
        later.restore(stored.state, stored.records)
        check = later.run_cell("len(log), log[0][8], len(kept), 'lost' in globals()")
        assert check.value_repr == "(1, 'y', 20000, False)"
