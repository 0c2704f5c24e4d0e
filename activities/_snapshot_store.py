"""REPL snapshots in object storage: a small manifest per cell, values once.

A `Snapshot` is a small state pickle plus records (large str/bytes values,
named by a fingerprint of their content). Records new since the session's previous snapshot go into
one pack object per snapshot, written first; the manifest (state pickle plus
where each record it needs lives) is written last, so a manifest that exists
never points at a missing pack, whatever moment a worker dies at. Packs are
named with a random suffix and never overwritten: a retried cell writes its
own pack, and the manifest a previous attempt may have left stays valid.

Record names are computed by guest code, which may lie; every key
lives under the run's own prefix, so a lie can only spoil that run's state.

Manifest layout: MAGIC, 8-byte little-endian length of a JSON header
({"format": n, "packs": [key, ...], "records": {digest: [pack index, offset,
length]}}), the JSON, then the state pickle. An object without MAGIC is a
snapshot written before records existed: the whole state, with no records.
`format` is what the guest code that wrote the state can put in it
(sandbox_wasm.SNAPSHOT_FORMAT; 0 when absent, as before it was written): a
snapshot of a higher format than this code's is refused (`SnapshotFromNewerWorker`)
rather than restored by a guest that would not know its kinds of values.
"""

from __future__ import annotations

import json
import struct
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from activities.object_store import ObjectStore
from sandbox_wasm import SNAPSHOT_FORMAT, RecordSource, Snapshot

MAGIC = b"RLMSNAPM"
_LENGTH = struct.Struct("<Q")
# Ranged reads of one pack run in parallel, a few at a time.
_FETCH_THREADS = 8


class SnapshotFormatError(ValueError):
    """A snapshot object that is not a manifest this code can read."""


class SnapshotFromNewerWorker(SnapshotFormatError):
    """A snapshot written by newer code than this worker's: another worker
    (running that code) can restore it; this one would lose what it holds."""


@dataclass(frozen=True)
class RecordLocation:
    key: str
    offset: int
    length: int


@dataclass
class StoredSnapshot:
    """A snapshot read back: what `ReplSession.restore` needs, plus where the
    records live (so the next save can refer to them without copying)."""

    state: bytes
    records: dict[str, bytes]
    locations: dict[str, RecordLocation]


class SnapshotSaver(Protocol):
    """What a cell's end needs of the store: save a snapshot (returning where
    each record of it is) and read records back (`SnapshotStore`)."""

    def save(self, key: str, snap: Snapshot, held: dict[str, RecordLocation]) -> dict[str, RecordLocation]: ...

    def record_source(self, live_records: Callable[[], dict[str, RecordLocation]]) -> RecordSource: ...


class SnapshotStore:
    def __init__(self, store: ObjectStore) -> None:
        self._store = store

    def save(
        self, key: str, snap: Snapshot, held: dict[str, RecordLocation]
    ) -> dict[str, RecordLocation]:
        """Write the new records, then the manifest under `key` (a key of the
        run's own). `held` locates the records the session already had.
        Returns the locations of every record the snapshot refers to."""
        locations: dict[str, RecordLocation] = {}
        # A record the session holds already (the guest made the same
        # content anew: a dict rebuilt each cell) is named, not written again.
        fresh = [(d, snap.new_records[d]) for d in snap.refs if d in snap.new_records and d not in held]
        if fresh:
            pack = f"{key.removesuffix('.bin')}-{uuid.uuid4().hex[:12]}.pack"
            offset = 0
            for digest, data in fresh:
                locations[digest] = RecordLocation(pack, offset, len(data))
                offset += len(data)
            self._store.put_segments(pack, [data for _, data in fresh])
        for digest in snap.refs:
            if digest not in locations:
                where = held.get(digest)
                if where is None:  # the session checks this; a second guard costs nothing
                    raise SnapshotFormatError(f"snapshot refers to record {digest} that was never stored")
                locations[digest] = where
        self._store.put_segments(key, encode_manifest(snap.data, locations))
        return locations

    def record_source(self, live_records: Callable[[], dict[str, RecordLocation]]) -> RecordSource:
        """What a live session reads its dropped records back from (a
        restart after a trap): where `live_records()` says they are stored."""

        def read(names: list[str]) -> dict[str, bytes]:
            where = live_records()
            return self.fetch_records({d: where[d] for d in names})

        return read

    def load(self, key: str) -> StoredSnapshot:
        raw = self._store.get_bytes(key)
        state, locations = decode_manifest(raw, key)
        return StoredSnapshot(state=state, records=self.fetch_records(locations), locations=locations)

    def fetch_records(self, locations: dict[str, RecordLocation]) -> dict[str, bytes]:
        """Read the records: per pack, one ranged read spanning the records needed."""
        by_pack: dict[str, list[tuple[str, RecordLocation]]] = {}
        for digest, where in locations.items():
            by_pack.setdefault(where.key, []).append((digest, where))
        if not by_pack:
            return {}

        def read(items: list[tuple[str, RecordLocation]]) -> dict[str, bytes]:
            start = min(w.offset for _, w in items)
            end = max(w.offset + w.length for _, w in items)
            data = memoryview(self._store.get_range(items[0][1].key, start, end - start))
            if len(data) < end - start:
                raise SnapshotFormatError(f"snapshot pack {items[0][1].key!r} is shorter than its manifest says")
            return {d: bytes(data[w.offset - start:w.offset - start + w.length]) for d, w in items}

        records: dict[str, bytes] = {}
        with ThreadPoolExecutor(min(_FETCH_THREADS, len(by_pack))) as pool:
            for part in pool.map(read, by_pack.values()):
                records.update(part)
        return records


def encode_manifest(state: bytes, locations: dict[str, RecordLocation]) -> list[bytes]:
    packs: dict[str, int] = {}
    table = {}
    for digest, where in locations.items():
        index = packs.setdefault(where.key, len(packs))
        table[digest] = [index, where.offset, where.length]
    header = json.dumps({"format": SNAPSHOT_FORMAT, "packs": list(packs), "records": table},
                        separators=(",", ":")).encode()
    return [MAGIC, _LENGTH.pack(len(header)), header, state]


def decode_manifest(raw: bytes, key: str) -> tuple[bytes, dict[str, RecordLocation]]:
    if not raw.startswith(MAGIC):
        return raw, {}  # written before records existed
    try:
        (size,) = _LENGTH.unpack_from(raw, len(MAGIC))
        start = len(MAGIC) + _LENGTH.size
        header = json.loads(raw[start:start + size])
        written = header.get("format", 0)
        if type(written) is not int:
            raise TypeError(f"format {written!r} is not a number")
        packs = header["packs"]
        locations = {
            digest: RecordLocation(packs[index], int(offset), int(length))
            for digest, (index, offset, length) in header["records"].items()
        }
    except (struct.error, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise SnapshotFormatError(f"snapshot {key!r} has a malformed manifest: {exc}") from None
    if written > SNAPSHOT_FORMAT:
        raise SnapshotFromNewerWorker(
            f"the REPL's saved state ({key}) was written by a newer worker (snapshot format {written}; this "
            f"worker reads formats up to {SNAPSHOT_FORMAT}): the cell is retried for a worker running that code "
            "to take it; deploy it on every worker of this task queue")
    return raw[start + size:], locations
