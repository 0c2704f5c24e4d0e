"""A snapshot says which format its guest code wrote (sandbox_wasm.SNAPSHOT_FORMAT,
in the manifest), and a worker refuses one newer than its own code, retryably,
instead of starting the REPL empty and losing the state: what a deploy half
done (old and new workers on one task queue) would otherwise do. Real S3; the
session test runs real workers, Temporal and wasmtime."""

from __future__ import annotations

import asyncio
import json
import struct

import pytest

from activities import run_cell
from activities._snapshot_store import MAGIC, SnapshotFormatError, SnapshotFromNewerWorker, SnapshotStore, decode_manifest
from activities.object_store import ObjectStore
from sandbox_wasm import SNAPSHOT_FORMAT, Snapshot
from sandbox_wasm.guest import rlm_references
from tests.fixtures_llm import fake_registry
from tests.run_harness import ROOT, isolated, repl, running_worker
from tests.session_harness import TIMEOUT_S, ask, asked, close, session_request, start_session

# The kinds of reference each format's snapshots may hold. A new kind is a
# new format: older workers cannot read it.
KINDS_BY_FORMAT = {
    1: {"r", "k", "s", "i", "q", "c", "x", "m", "j"},
    2: {"r", "k", "s", "i", "q", "c", "x", "m", "j"},  # "s" segments of words (separator None)
    3: {"r", "k", "s", "i", "q", "c", "x", "m", "j"},  # "k" records of Counters, OrderedDicts, defaultdicts
    4: {"r", "k", "s", "i", "q", "c", "x", "m", "j"},  # and of sets
}
# The types a container record ("k") names, each format.
CONTAINERS_BY_FORMAT = {
    1: {"l", "d"},
    2: {"l", "d"},
    3: {"l", "d", "c", "o", "f:", "f:int", "f:float", "f:str", "f:bool", "f:list", "f:dict", "f:set", "f:tuple"},
    4: {"l", "d", "c", "o", "f:", "f:int", "f:float", "f:str", "f:bool", "f:list", "f:dict", "f:set", "f:tuple",
        "set", "frozenset"},
}
_LENGTH = struct.Struct("<Q")


def test_a_new_kind_of_reference_needs_a_new_format():
    assert set(rlm_references.BY_REFERENCE) == KINDS_BY_FORMAT[SNAPSHOT_FORMAT], (
        "the guest writes another set of reference kinds: raise rlm_references.FORMAT "
        "(older workers cannot read them) and list its kinds here")
    assert set(rlm_references.CONTAINER_NAMES) == CONTAINERS_BY_FORMAT[SNAPSHOT_FORMAT], (
        "the guest names other container types: raise rlm_references.FORMAT and list them here")


def with_format(raw: bytes, written: object) -> bytes:
    """A manifest's bytes with its header's format replaced (None: removed)."""
    (size,) = _LENGTH.unpack_from(raw, len(MAGIC))
    start = len(MAGIC) + _LENGTH.size
    header = json.loads(raw[start:start + size])
    if written is None:
        header.pop("format")
    else:
        header["format"] = written
    data = json.dumps(header).encode()
    return MAGIC + _LENGTH.pack(len(data)) + data + raw[start + size:]


def test_manifests_carry_the_format_and_newer_ones_are_refused(object_store: ObjectStore):
    store = SnapshotStore(object_store)
    key = "runs/format-a/snapshots/c1.bin"
    digest = "ab" * 20
    store.save(key, Snapshot(data=b"state", saved=["x"], unsaved=[], refs=[digest], new_records={digest: b"v" * 10}), {})
    raw = object_store.get_bytes(key)
    assert json.loads(raw[len(MAGIC) + _LENGTH.size:][:_LENGTH.unpack_from(raw, len(MAGIC))[0]])["format"] == SNAPSHOT_FORMAT
    # Written before the format was (none: 0), or by this code: read.
    for written in (None, 0, SNAPSHOT_FORMAT):
        assert decode_manifest(with_format(raw, written), key)[0] == b"state"
    with pytest.raises(SnapshotFromNewerWorker, match=f"format {SNAPSHOT_FORMAT + 1}; this worker reads formats up to "
                                                    f"{SNAPSHOT_FORMAT}"):
        decode_manifest(with_format(raw, SNAPSHOT_FORMAT + 1), key)
    for forged in ("1", 1.5, [1]):
        with pytest.raises(SnapshotFormatError, match="malformed manifest"):
            decode_manifest(with_format(raw, forged), key)
    header_not_a_dict = MAGIC + _LENGTH.pack(2) + b"[]"
    with pytest.raises(SnapshotFormatError, match="malformed manifest"):
        decode_manifest(header_not_a_dict, key)


def test_a_session_state_from_a_newer_worker_waits_for_one(settings, llm, context_store, object_store, monkeypatch):
    # Q1 saves `total` on one worker. Then its snapshot is marked newer than
    # this code: the next worker's cell is refused and retried (never run on
    # an empty REPL), the model is told why, and the state is still there
    # for the worker that can read it (here: the mark taken off again).
    monkeypatch.setattr(run_cell, "NEWER_SNAPSHOT_RETRY_DELAY", run_cell.timedelta(milliseconds=50))
    ctx = context_store.put_value("numbers: 3 4 5")
    llm.add_rule(asked("first"), repl("total = 12\nprint('total', total)"), model=ROOT)
    llm.add_rule("total 12", "FINAL(12)", model=ROOT)
    llm.add_rule(asked("second"), repl("print('again', total * 2)"), model=ROOT)
    llm.add_rule("again 24", "FINAL(24)", model=ROOT)
    llm.add_rule("written by a newer worker", "FINAL(waiting)", model=ROOT, name="told")
    s = isolated(settings)

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            handle = await start_session(client, s, session_request(ctx))
            first = await asyncio.wait_for(ask(handle, "first?"), TIMEOUT_S)
        # Every state of the session (its questions' and its own records').
        manifests = [k for k in object_store.keys("runs/") if handle.id in k and k.endswith(".bin")]
        saved = {key: object_store.get_bytes(key) for key in manifests}
        for key, raw in saved.items():
            object_store.put_bytes(key, with_format(raw, SNAPSHOT_FORMAT + 1))
        async with running_worker(s, fake_registry(llm)) as client:
            handle = client.get_workflow_handle(handle.id)
            refused = await asyncio.wait_for(ask(handle, "second?"), TIMEOUT_S)
            for key, raw in saved.items():  # the newer worker's code, deployed
                object_store.put_bytes(key, raw)
            second = await asyncio.wait_for(ask(handle, "second?"), TIMEOUT_S)
            await close(handle)
        return first, refused, second, manifests

    first, refused, second, manifests = asyncio.run(go())
    assert first.answer == "12" and first.snapshot_key in manifests
    assert (refused.status, refused.answer) == ("completed", "waiting"), refused.reason
    [told] = [r.last_user_text for r in llm.requests(ROOT) if r.matched_rule.name == "told"]
    assert "the cell could not run" in told and f"snapshot format {SNAPSHOT_FORMAT + 1}" in told, told[-1500:]
    assert (second.status, second.answer) == ("completed", "24"), second.reason
