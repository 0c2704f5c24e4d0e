"""A ContextRef is something a caller writes: it must not reach any object of
the bucket but the context it names (another run's transcript, prompts,
snapshots), nor make the worker download more than the context holds.

The attack these tests close (found by review): store a fake manifest as
inline text, then start a run with a ContextRef whose `manifest_key` points
at that chunk and whose chunk keys point at `runs/...` — the manifest hash
check passed, and the run read another run's objects as its context.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid

import pytest
from pydantic import ValidationError
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import ApplicationError

from activities._context_manifest import Manifest
from activities.context_store import ContextIntegrityError, ContextStore
from activities.object_store import ObjectStore
from tests.fixtures_llm import fake_registry
from tests.run_harness import ROOT, isolated, repl, running_worker, start
from workflows.refs import ContextRef, chunk_key_for, manifest_key_for


def _ref_fields(sha256: str, **changes: object) -> dict:
    fields = {
        "sha256": sha256, "manifest_key": manifest_key_for(sha256), "kind": "str",
        "total_chars": 5, "total_bytes": 5, "doc_count": 1, "doc_chars_head": [5],
    }  # fmt: skip
    return {**fields, **changes}


def _manifest(chunk_key: str, chunk_sha: str, size: int, chunk_offset: int = 0, doc_bytes: int | None = None) -> dict:
    return {
        "format": "durable-rlm/context-manifest/v1", "kind": "str", "chunk_bytes": 4 << 20,
        "total_bytes": size, "total_chars": size,
        "documents": [{"offset": 0, "bytes": size if doc_bytes is None else doc_bytes, "chars": size, "encoding": "utf-8"}],
        "chunks": [{"key": chunk_key, "sha256": chunk_sha, "offset": chunk_offset, "bytes": size}],
    }  # fmt: skip


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"manifest_key": f"contexts/chunks/{'a' * 64}"}, "manifest_key must be 'contexts/manifests/"),
        ({"manifest_key": "runs/victim/outputs/c1.txt"}, "manifest_key must be"),
        ({"sha256": "A" * 64}, "must be a sha256 of 64 lowercase hex digits"),
        ({"sha256": "../../runs/x"}, "must be a sha256 of 64 lowercase hex digits"),
        ({"total_bytes": -1}, "total_bytes"),
    ],
)
def test_a_context_ref_names_only_its_own_manifest(changes, message):
    with pytest.raises(ValidationError, match=message):
        ContextRef(**(_ref_fields("a" * 64) | changes))
    assert ContextRef(**_ref_fields("a" * 64)).manifest_key == f"contexts/manifests/{'a' * 64}.json"


@pytest.mark.parametrize(
    "manifest, message",
    [
        (_manifest("runs/victim/outputs/c1.txt", "b" * 64, 10), "chunk key must be 'contexts/chunks/bbbb"),
        (_manifest("blobs/" + "b" * 64, "b" * 64, 10), "chunk key must be"),
        (_manifest(chunk_key_for("b" * 64), "b" * 64, 10, chunk_offset=3), "does not follow the one before"),
        (_manifest(chunk_key_for("b" * 64), "b" * 64, 10, doc_bytes=11), "outside the 10-byte stream"),
        ({**_manifest(chunk_key_for("b" * 64), "b" * 64, 10), "total_bytes": 20}, "chunks hold 10 bytes"),
    ],
)
def test_a_manifest_read_back_is_checked_like_a_callers_input(manifest, message):
    with pytest.raises(ValidationError, match=message):
        Manifest.model_validate(manifest)
    assert Manifest.model_validate(_manifest(chunk_key_for("b" * 64), "b" * 64, 10)).total_bytes == 10


def test_a_manifest_that_points_outside_the_contexts_is_refused_by_the_reader(object_store: ObjectStore):
    """Someone with write access to the bucket could still plant one: the
    reader refuses it before reading any chunk."""
    victim_key = f"runs/victim-{uuid.uuid4().hex[:8]}/outputs/c1.txt"
    secret = b"the password is hunter2"
    object_store.put_bytes(victim_key, secret)
    data = json.dumps(_manifest(victim_key, hashlib.sha256(secret).hexdigest(), len(secret))).encode()
    sha = hashlib.sha256(data).hexdigest()
    object_store.put_bytes(manifest_key_for(sha), data)
    ref = ContextRef(**_ref_fields(sha, total_bytes=len(secret), total_chars=len(secret)))
    with pytest.raises(ContextIntegrityError, match="is not a context manifest: .*chunk key must be"):
        ContextStore(object_store).read_all(ref)


def test_a_chunk_longer_than_its_manifest_says_is_refused(context_store: ContextStore, object_store: ObjectStore):
    ref = context_store.put_text("x" * 1000 + uuid.uuid4().hex)
    chunk = ContextStore(object_store).manifest(ref).chunks[0]
    object_store.put_bytes(chunk.key, b"y" * (8 << 20))  # replaced behind our back, far longer
    with pytest.raises(ContextIntegrityError, match=f"expected sha256 {chunk.sha256} \\({chunk.bytes} bytes\\), got .* \\({chunk.bytes + 1} bytes\\)"):
        ContextStore(object_store).read_all(ref)


def test_json_runs_with_a_forged_unknown_or_corrupt_context_ref_fail_before_any_model_call(settings, llm, object_store):
    """The attack end to end: a fake manifest stored as inline text, then a
    ref whose manifest_key names that chunk: refused as an invalid request;
    the first run, which only stored the text, reads nothing else. A
    well-formed ref to nothing, or to a manifest that is not what its sha256
    says, fails the run's first step, naming the context, where it used to
    run (and bill) turns whose every cell failed."""
    llm.add_rule(None, repl("FINAL(context)"), model=ROOT)
    victim_key = f"runs/victim-{uuid.uuid4().hex[:8]}/outputs/c1.txt"
    object_store.put_bytes(victim_key, b"the password is hunter2")
    planted = json.dumps(_manifest(victim_key, "c" * 64, 23))
    planted_sha = hashlib.sha256(planted.encode()).hexdigest()
    forged = _ref_fields(planted_sha, manifest_key=chunk_key_for(planted_sha))
    unknown = _ref_fields(hashlib.sha256(uuid.uuid4().bytes).hexdigest())
    corrupt_sha = hashlib.sha256(uuid.uuid4().bytes).hexdigest()
    object_store.put_bytes(manifest_key_for(corrupt_sha), planted.encode())  # stored under another's name
    corrupt = _ref_fields(corrupt_sha)
    s = isolated(settings)

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            stored = await asyncio.wait_for((await start(client, s, {"question": "q", "context": planted, "models": {"root": ROOT}})).result(), 60)
            handle = await start(client, s, {"question": "q", "context": forged, "models": {"root": ROOT}})
            with pytest.raises(WorkflowFailureError) as refused:
                await asyncio.wait_for(handle.result(), 60)
            failed = []
            for ref in (unknown, corrupt):
                handle = await start(client, s, {"question": "q", "context": ref, "models": {"root": ROOT}})
                failed.append(await asyncio.wait_for(handle.result(), 60))
            return stored, refused.value.cause, failed

    stored, refused, (missing, damaged) = asyncio.run(go())
    assert stored.status == "completed" and "hunter2" not in (stored.answer or "")
    assert isinstance(refused, ApplicationError) and refused.type == "InvalidRunRequest", refused
    assert "manifest_key must be" in refused.message, refused.message
    assert missing.status == "failed" and missing.turns == 0, missing
    assert missing.reason.startswith(f"context: context {unknown['sha256'][:16]} not found"), missing.reason
    assert damaged.status == "failed" and damaged.turns == 0, damaged
    assert damaged.reason.startswith("context: ") and corrupt_sha[:16] in damaged.reason, damaged.reason
    assert llm.count() == 1  # the first run's one turn; none for the other three


def test_a_callers_ref_is_replaced_by_the_stored_one(settings, llm, context_store):
    """A ref whose numbers disagree with its manifest (a caller's typo or a
    lie) does not reach the prompt: the run uses the stored context's."""
    ref = context_store.put_documents(["alpha", "beta gamma"])
    lying = ref.model_dump(mode="json") | {"kind": "str", "total_chars": 10**9, "doc_count": 7, "doc_chars_head": [1]}
    llm.add_rule(None, repl("FINAL(str(type(context).__name__) + ' ' + str(len(context)))"), model=ROOT)
    s = isolated(settings)

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            return await asyncio.wait_for((await start(client, s, {"question": "q", "context": lying, "models": {"root": ROOT}})).result(), 60)

    result = asyncio.run(go())
    assert result.status == "completed" and result.answer == "list 2", result
    prompt = llm.requests(model=ROOT)[-1].all_text
    assert "1,000,000,000" not in prompt and "1000000000" not in prompt
