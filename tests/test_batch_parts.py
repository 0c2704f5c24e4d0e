"""A batch of large prompts goes out in parts: each part is sent as soon as
its prompts are hashed (they are stored behind it), up to UPDATES_IN_FLIGHT parts wait for answers at
once, and the answers come back in the order asked (activities/_cell_host.py).
The first three tests are pure logic; the others run a real worker, Temporal,
S3 and WASM, with the sub model scripted through litellm."""

from __future__ import annotations

import asyncio
import re
import threading
import uuid

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.service import RPCError, RPCStatusCode

from activities import _cell_host, temporal_client
from activities.object_store import ObjectStore, S3UnreachableError, blob_ref
from activities._cell_host import BATCH_INLINE_BUDGET, REF_BYTES_PER_PART, UPDATES_IN_FLIGHT, _parts
from tests.fixtures_llm import fake_registry
from tests.run_harness import ROOT, SUB, isolated, repl, request, running_worker, start
from workflows.refs import INLINE_LIMIT_BYTES


def test_parts_cut_prompts_stored_by_ref_and_keep_order():
    big = "x" * (INLINE_LIMIT_BYTES + 1)
    per_part = REF_BYTES_PER_PART // len(big)
    texts = ["small"] + [big] * (2 * per_part + 1) + ["tail"]
    parts = _parts("llm", texts)
    assert [i for indexes, _ in parts for i in indexes] == list(range(len(texts)))
    assert len(parts) == 3
    for indexes, inline in parts:
        assert sum(len(texts[i]) for i, small in zip(indexes, inline) if not small) <= REF_BYTES_PER_PART
    flags = [small for _, inline in parts for small in inline]
    assert flags[0] and flags[-1] and not any(flags[1:-1])


def test_inline_budget_is_the_whole_batch_s_not_each_part_s():
    """Cutting a batch into parts must not let more text travel inline (into
    the run's history) than one batch could before."""
    medium = "m" * (INLINE_LIMIT_BYTES // 2)
    big = "b" * (REF_BYTES_PER_PART - 1)
    texts = [medium, big, big, big, medium] * (BATCH_INLINE_BUDGET // len(medium))
    parts = _parts("llm", texts)
    assert len(parts) > 1
    inline_bytes = sum(len(texts[i]) for indexes, inline in parts for i, small in zip(indexes, inline) if small)
    assert inline_bytes <= BATCH_INLINE_BUDGET


def test_rlm_questions_are_never_cut_by_reference_bytes():
    parts = _parts("rlm", ["q" * 1000] * 50)
    assert len(parts) == 1 and all(parts[0][1])


def test_an_update_refused_for_now_is_sent_again_until_admitted(monkeypatch):
    """The server refuses a run's updates past its in-flight payload limit
    (RESOURCE_EXHAUSTED) until a workflow task accepts the earlier ones; the
    client's own retries stop after ~10 s, which failed the part's sub-calls.
    Other errors are not retried."""
    monkeypatch.setattr(temporal_client, "ADMIT_RETRY_FIRST_S", 0.001)
    sent: list[int] = []

    async def send():
        sent.append(1)
        if len(sent) < 4:
            raise RPCError("in-flight update payloads", RPCStatusCode.RESOURCE_EXHAUSTED, b"")
        return "answers"

    assert asyncio.run(temporal_client.until_admitted(send)) == "answers" and len(sent) == 4

    async def refused():
        raise RPCError("no such workflow", RPCStatusCode.NOT_FOUND, b"")

    with pytest.raises(RPCError, match="no such workflow"):
        asyncio.run(temporal_client.until_admitted(refused))
    sent.clear()
    aborted = [RPCError("workflow update was aborted", RPCStatusCode.UNAVAILABLE, b"")]

    async def aborted_once():
        if aborted:
            raise aborted.pop()
        return "taken when sent again"

    assert asyncio.run(temporal_client.until_admitted(aborted_once)) == "taken when sent again"
    with pytest.raises(RPCError, match="in-flight"):  # a caller's bound
        asyncio.run(temporal_client.until_admitted(send, give_up_after_s=0.0))
    assert len(sent) == 1


def _tag(request) -> str:
    m = re.search(r"<T(\d+)>", request.last_user_text)
    return f"T{m.group(1)}" if m else "?"


@pytest.mark.parametrize("part_bytes", [REF_BYTES_PER_PART, 200_001], ids=["two-parts", "one-prompt-per-part"])
def test_prompts_past_a_part_are_answered_in_order_by_several_updates(settings, context_store, llm, monkeypatch, part_bytes):
    """30 prompts of 200 KB (6 MB stored by ref): in two parts, or in 30 parts
    of one prompt (more than the 10 in-flight updates Temporal documents per
    workflow, so the host holds parts back). Every sub-call reaches the model once,
    the cell gets each answer at its own index, and the run's history shows
    one update per part."""
    monkeypatch.setattr(_cell_host, "REF_BYTES_PER_PART", part_bytes)
    assert UPDATES_IN_FLIGHT < 10
    n, size = 30, 200_000
    ctx = context_store.put_value("abc")
    code = f"""
prompts = [f"<T{{i}}>" + chr(97 + i % 26) * {size} for i in range({n})]
answers = llm_query_batched(prompts)
print("in order", sum(a == f"T{{i}}" for i, a in enumerate(answers)), len(answers))
"""
    llm.add_rule("Turn 1 of", repl(code), model=ROOT)
    llm.add_rule(f"in order {n} {n}", "FINAL(ok)", model=ROOT, name="saw")
    llm.add_rule(None, _tag, model=SUB, name="sub")
    s = isolated(settings)

    async def main():
        async with running_worker(s, fake_registry(llm)) as client:
            handle = await start(client, s, request("parts", ctx))
            result = await asyncio.wait_for(handle.result(), 240)
            history = await handle.fetch_history()
            return result, history

    result, history = asyncio.run(main())
    assert result.status == "completed" and result.answer == "ok", result.reason
    assert llm.count("sub") == n
    assert sorted(_tag(r) for r in llm.requests(SUB)) == sorted(f"T{i}" for i in range(n))
    accepted = [e for e in history.events if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED]
    assert len(accepted) == -(-n * size // part_bytes)


@pytest.mark.parametrize("upload", ["stored", "failed"])
def test_sub_calls_start_before_their_prompts_are_stored(settings, context_store, object_store, llm, monkeypatch, upload):
    """Long prompts are stored behind their update: every sub-call reaches the
    model while no prompt has reached the bucket (the worker reads them from
    memory), and the batch returns only once they are stored, so a completed
    cell leaves every prompt in the bucket. An upload that fails after the
    answers came is the cell's error, said as such."""
    n, size, marker = 6, 200_000, uuid.uuid4().hex  # blobs are shared by content: this test's own
    release = threading.Event()
    put_bytes = ObjectStore.put_bytes

    def held(self, key, data):
        if key.startswith("blobs/") and len(data) >= size:
            assert release.wait(60)
            if upload == "failed":
                raise S3UnreachableError("the S3 server went away")
        put_bytes(self, key, data)

    monkeypatch.setattr(ObjectStore, "put_bytes", held)
    ctx = context_store.put_value("abc")
    code = f"""
prompts = [f"<T{{i}}>{marker}" + chr(97 + i) * {size} for i in range({n})]
try:
    answers = llm_query_batched(prompts)
    print("answered", sum(a == f"T{{i}}" for i, a in enumerate(answers)))
except RuntimeError as exc:
    print("refused:", exc)
"""
    llm.add_rule("Turn 1 of", repl(code), model=ROOT)
    llm.add_rule(f"answered {n}", "FINAL(stored)", model=ROOT)
    llm.add_rule("could not be stored", "FINAL(told)", model=ROOT)
    llm.add_rule(None, _tag, model=SUB, name="sub")
    s = isolated(settings)
    reached: list[int] = []

    def release_once_all_asked() -> None:
        try:
            reached.append(llm.wait_for_count(n, "sub", timeout_s=60))
        finally:
            release.set()

    async def main():
        async with running_worker(s, fake_registry(llm)) as client:
            handle = await start(client, s, request("stored behind", ctx))
            releaser = threading.Thread(target=release_once_all_asked, daemon=True)
            releaser.start()
            result = await asyncio.wait_for(handle.result(), 240)
            releaser.join(60)
            return result

    result = asyncio.run(main())
    assert reached == [n]  # every sub-call was sent while no prompt was stored
    assert llm.count("sub") == n
    prompts = [f"<T{i}>{marker}".encode() + bytes([97 + i]) * size for i in range(n)]
    stored = [object_store.exists(blob_ref(p).key) for p in prompts]
    if upload == "stored":
        assert result.answer == "stored", result.reason
        assert all(stored)
    else:
        assert result.answer == "told", result.reason
        assert not any(stored)
