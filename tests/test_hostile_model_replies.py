"""A broken or hostile model server, through both model clients (litellm's
and the direct one): replies no run can keep as they are become something it
can, billed once; a call's surprise stays that call's; a provider's wait
never outlasts the run's wall-time cap. Each case was reproduced by review
first. Real worker, Temporal, S3 and WASM; the server is the scripted one.
"""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from tests.fixtures_llm import fake_registry
from tests.run_harness import ROOT, SUB, isolated, repl, request, running_worker, start
from workflows.budget import MAX_BELIEVABLE_TOKENS

CLIENTS = ["litellm", "direct"]


def _body(content, usage: dict | None = None) -> dict:
    return {
        "id": "x", "object": "chat.completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": usage or {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }  # fmt: skip


def _run(settings, llm, req: dict, client: str, timeout: float = 120):
    s = isolated(settings)

    async def go():
        async with running_worker(s, fake_registry(llm, client=client)) as c:
            started = time.monotonic()
            result = await asyncio.wait_for((await start(c, s, req)).result(), timeout)
            return result, time.monotonic() - started

    return asyncio.run(go())


@pytest.mark.parametrize("client", CLIENTS)
def test_a_lone_surrogate_in_a_root_reply_is_replaced_not_retried(settings, context_store, llm, client):
    # It failed the transcript's S3 write five times (each attempt charged), then the run.
    llm.add_rule("Turn 1 of", _body("I think\ud800\n" + repl("print(len(context))")), model=ROOT, name="bad")
    llm.add_rule("Turn 2 of", "FINAL(one)", model=ROOT)
    result, _ = _run(settings, llm, request("q?", context_store.put_value("x")), client)
    assert result.status == "completed" and result.answer == "one", result
    assert llm.count("bad") == 1 and result.usage.by_model[ROOT].calls == 2


@pytest.mark.parametrize("client", CLIENTS)
def test_one_bad_reply_in_a_batch_does_not_fail_the_others(settings, context_store, llm, client):
    code = 'r = llm_query_batched(["p1", "p2", "p3", "p4"])\nprint("GOT", r)'
    llm.add_rule("Turn 1 of", repl(code), model=ROOT)
    llm.add_rule(lambda r: r.last_text.startswith("p"), "fine", model=SUB, name="fine")
    llm.add_rule("p3", _body("bad\udfffreply"), model=SUB, name="bad")
    llm.add_rule(lambda r: "GOT" in r.last_user_text, "FINAL(done)", model=ROOT, name="final")
    result, _ = _run(settings, llm, request("q?", context_store.put_value("x")), client)
    assert result.status == "completed", result
    seen = llm.requests(ROOT)[-1].last_user_text
    assert "GOT ['fine', 'fine', 'bad\ufffdreply', 'fine']" in seen, seen[-600:]
    assert llm.count("bad") == 1 and llm.count("fine") == 3


@pytest.mark.parametrize("client", CLIENTS)
def test_a_lone_surrogate_in_a_providers_error_stays_that_calls_error(settings, context_store, llm, client):
    # In the failure's message it made the group's result unserialisable: every call of the batch failed.
    code = 'r = llm_query_batched(["p1", "p2"])\nprint("GOT", r[0], "|", r[1])'
    llm.add_rule("Turn 1 of", repl(code), model=ROOT)
    llm.add_rule(lambda r: r.last_text.startswith("p"), "fine", model=SUB, name="fine")
    llm.add_rule("p2", {"error": {"message": "no such file caf\udce9.txt", "type": "invalid_request_error"}}, status=400, model=SUB, name="bad")
    llm.add_rule(lambda r: "GOT" in r.last_user_text, "FINAL(done)", model=ROOT)
    result, _ = _run(settings, llm, request("q?", context_store.put_value("x")), client)
    assert result.status == "completed", result
    seen = llm.requests(ROOT)[-1].last_user_text
    assert "GOT fine | Error: ModelBadRequest" in seen and "caf\ufffd.txt" in seen, seen[-600:]


def test_usage_counts_no_model_could_use_are_estimated(settings, context_store, llm):
    # 1.7e308 overflowed the run's totals (the workflow failed with no
    # result); NaN, infinity or text failed each attempt (five, each charged).
    cases = [
        {"prompt_tokens": 1.7e308, "completion_tokens": 1.7e308, "total_tokens": 1},
        {"prompt_tokens": float("nan"), "completion_tokens": float("inf"), "total_tokens": 1},
        {"prompt_tokens": "ten", "completion_tokens": [], "total_tokens": None},
    ]
    code = 'print("GOT", llm_query("p1"), llm_query("p2"), llm_query("p3"))'
    llm.add_rule("Turn 1 of", _body(repl(code), usage=cases[0]), model=ROOT, name="root")
    for index, usage in enumerate(cases, 1):
        llm.add_rule(f"p{index}", _body(f"a{index}", usage=usage), model=SUB, name=f"sub{index}")
    llm.add_rule(lambda r: "GOT" in r.last_user_text, _body("FINAL(done)", usage=cases[1]), model=ROOT, name="final")
    result, _ = _run(settings, llm, request("q?", context_store.put_value("x"), caps={"max_usd": 1.0}), "direct")
    assert result.status == "completed" and result.answer == "done", result
    assert "GOT a1 a2 a3" in llm.requests(ROOT)[-1].last_user_text
    assert [llm.count(n) for n in ("root", "sub1", "sub2", "sub3", "final")] == [1, 1, 1, 1, 1]
    assert 0 < result.spend.tokens < 10 * MAX_BELIEVABLE_TOKENS and math.isfinite(result.spend.usd)


def test_content_as_a_list_of_parts_is_read_as_its_text(settings, context_store, llm):
    parts = [{"type": "text", "text": "```repl\nprint("}, {"type": "image_url", "image_url": {}}, {"type": "text", "text": "'joined')\n```"}]
    llm.add_rule("Turn 1 of", _body(parts), model=ROOT, name="parts")
    llm.add_rule(lambda r: "joined" in r.last_user_text, "FINAL(joined)", model=ROOT)
    result, _ = _run(settings, llm, request("q?", context_store.put_value("x")), "direct")
    assert result.status == "completed" and result.answer == "joined", result
    assert llm.count("parts") == 1


@pytest.mark.parametrize("client", CLIENTS)
def test_a_root_reply_past_the_payload_limit_is_clipped_and_billed_once(settings, context_store, llm, client):
    # Returned whole, 5 MB failed every attempt with PayloadsTooLarge (five charged), then the run.
    big = repl("print('read')") + "\n" + "y" * (5 << 20)
    usage = {"prompt_tokens": 10, "completion_tokens": 1000, "total_tokens": 1010}
    llm.add_rule("Turn 1 of", _body(big, usage=usage), model=ROOT, name="big")
    llm.add_rule(lambda r: "read" in r.last_user_text, "FINAL(clipped)", model=ROOT)
    result, _ = _run(settings, llm, request("q?", context_store.put_value("x"), caps={"max_usd": 5.0}), client, timeout=240)
    assert result.status == "completed" and result.answer == "clipped", result
    assert llm.count("big") == 1 and result.usage.by_model[ROOT].calls == 2
    assert f"[the worker kept the first 999,800 of this reply's {len(big):,} characters]" in llm.requests(ROOT)[-1].all_text


@pytest.mark.parametrize("who", ["root", "sub"])
def test_a_retry_after_past_the_wall_time_cap_ends_the_run_at_the_cap(settings, context_store, llm, who):
    # It slept the whole delay (capped at 60 s) past a 5 s cap.
    if who == "sub":
        llm.add_rule("Turn 1 of", repl('print("GOT", llm_query("p1"))'), model=ROOT)
        llm.add_rule(lambda r: "GOT" in r.last_user_text, "FINAL(done)", model=ROOT)
    llm.add_rule(None, "slow down", status=429, headers={"Retry-After": "100000"}, model=SUB if who == "sub" else ROOT, name="429")
    result, seconds = _run(settings, llm, request("q?", context_store.put_value("x"), caps={"max_wall_s": 5}), "direct")
    assert seconds < 40, seconds  # the cap (5 s) and a turn, not the provider's wait (60 s)
    if who == "root":
        assert result.status == "budget_exhausted" and "wall" in result.reason and "429" in result.reason, result
    else:  # the cell got the call's failure at the deadline; the run went on to answer
        assert result.status in ("completed", "budget_exhausted"), result
    assert llm.count("429") == 1
