"""What identifies a sub-call batch is what it asks: a cell re-run after a
crash that asks the same prompts in another order gets, for each prompt, that
prompt's recorded reply, and no completed call is made again.

Temporal answers an update id it has seen with the first result without
looking at the payload (DESIGN.md section 9), so the test sends the updates a
re-run cell would send, directly, against a real run whose own cell is held
open at a sub-call."""

from __future__ import annotations

import asyncio
import threading

import pytest
from temporalio.client import WorkflowUpdateFailedError

from tests.fixtures_llm import fake_registry
from tests.run_harness import ROOT, SUB, isolated, repl, request, running_worker, start
from workflows.names import UPDATE_SUBCALLS
from workflows.steps import SubcallBatch, SubcallItem, SubcallReply, batch_digest, item_digest

PROMPTS = [f"prompt {i}" for i in range(12)]


def _batch(cell: str, seq: int, prompts: list[str]) -> SubcallBatch:
    items = [SubcallItem(text=p, text_chars=len(p)) for p in prompts]
    return SubcallBatch(cell_id=cell, seq=seq, kind="llm", items=items, digest=batch_digest("llm", None, items))


async def _send(handle, batch: SubcallBatch, update_id: str | None = None) -> list[str]:
    reply: SubcallReply = await handle.execute_update(
        UPDATE_SUBCALLS, batch, id=update_id or batch.update_id(), result_type=SubcallReply
    )
    return [a.text or a.error or "" for a in reply.answers]


def test_reordered_rerun_gets_each_prompts_own_reply_without_new_calls(settings, context_store, llm):
    ctx = context_store.put_value("abc")
    gate = threading.Event()
    llm.add_rule("Turn 1 of", repl("print(llm_query('gate'))"), model=ROOT)
    llm.add_rule("Turn 2 of", "FINAL(done)", model=ROOT)
    llm.add_rule(lambda r: r.last_user_text == "gate", "open", model=SUB, name="gate", hold=gate)
    llm.add_rule(lambda r: r.last_user_text.startswith("prompt"), lambda r: "re: " + r.last_user_text, model=SUB, name="echo")
    s = isolated(settings)

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            handle = await start(client, s, request("q", ctx))
            await asyncio.to_thread(llm.wait_for_count, 1, "gate", 60)
            first = await _send(handle, _batch("probe", 1, PROMPTS))
            # The re-run cell asks the same prompts in another order, under the
            # same cell and batch number: a new id, each reply its own prompt's.
            shuffled = PROMPTS[5:] + PROMPTS[:5][::-1]
            second = await _send(handle, _batch("probe", 1, shuffled))
            calls_after_rerun = llm.count("echo")
            # The same batch again: the recorded answers, no model call.
            again = await _send(handle, _batch("probe", 1, PROMPTS))
            # A second ask of one prompt in the same cell is a call of its own.
            twice = _batch("probe", 2, [PROMPTS[0]])
            twice.items[0].occurrence = 1
            twice.digest = batch_digest("llm", None, twice.items)
            repeat = await _send(handle, twice)
            # An id that does not name its content is refused by the validator.
            with pytest.raises(WorkflowUpdateFailedError) as forged:
                await _send(handle, _batch("probe", 3, shuffled), update_id="probe:3:" + "0" * 32)
            gate.set()
            result = await asyncio.wait_for(handle.result(), 60)
            return first, shuffled, second, calls_after_rerun, again, repeat, str(forged.value.cause), result

    try:
        first, shuffled, second, calls_after_rerun, again, repeat, forged, result = asyncio.run(go())
    finally:
        gate.set()
    assert first == [f"re: {p}" for p in PROMPTS]
    assert second == [f"re: {p}" for p in shuffled]
    assert again == first
    assert calls_after_rerun == len(PROMPTS)  # the re-run repeated no call
    assert repeat == ["re: prompt 0"] and llm.count("echo") == len(PROMPTS) + 1
    assert "does not match its content" in forged
    assert result.status == "completed"


def test_item_identity_is_its_content_not_its_transport_or_place():
    inline = SubcallItem(text="hello", text_chars=5)
    from workflows.refs import BlobRef
    import hashlib

    ref = SubcallItem(
        text_ref=BlobRef(key="blobs/x", size=5, sha256=hashlib.sha256(b"hello").hexdigest()), text_chars=5
    )
    assert item_digest("llm", None, inline) == item_digest("llm", None, ref)
    assert item_digest("llm", None, inline) != item_digest("rlm", None, inline)
    assert item_digest("llm", None, inline) != item_digest("llm", "other-model", inline)
    assert item_digest("llm", None, inline) != item_digest("llm", None, inline.model_copy(update={"occurrence": 1}))
    a, b = _batch("c", 1, ["x", "y"]), _batch("c", 1, ["y", "x"])
    assert a.update_id() != b.update_id() and a.update_id().startswith("c:1:")
