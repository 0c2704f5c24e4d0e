"""End-to-end runs: real worker, Temporal dev server, S3 server and WASM REPL;
the models are the scripted server reached through litellm."""

from __future__ import annotations

import asyncio
import random
import re

import pytest
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer, UnsandboxedWorkflowRunner
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

from tests.fixtures_llm import fake_registry
from tests.run_harness import ROOT, SUB, isolated, repl, request, run, run_once, running_worker, start, worker_and_pool
from worker import build_worker, connect
from workflows.result import RunResult
from workflows.run import RLMRun

NEEDLE = "ORCHID-8528"


def haystack(chars: int, needle_at: float, seed: int = 7) -> str:
    rng = random.Random(seed)
    words = ["alpha", "ledger", "invoice", "river", "copper", "audit", "stone", "vendor", "quarter"]
    lines, size = [], 0
    while size < chars:
        line = " ".join(rng.choice(words) for _ in range(12))
        lines.append(line)
        size += len(line) + 1
    lines.insert(int(len(lines) * needle_at), f"The secret code is {NEEDLE}.")
    return "\n".join(lines)


def test_needle_in_multi_mb_context_with_batched_subcalls(settings, context_store, llm):
    text = haystack(3_000_000, needle_at=0.71)
    ctx = context_store.put_value(text)
    chunk = 400_000
    n_chunks = -(-len(text) // chunk)
    llm.add_rule(
        "Turn 1 of",
        repl(
            f"""
chunks = [context[i:i + {chunk}] for i in range(0, len(context), {chunk})]
answers = llm_query_batched([f"Find the secret code. Reply NONE if absent.\\n{{c}}" for c in chunks])
found = [a for a in answers if a != "NONE"]
print(len(chunks), found)
"""
        ),
        model=ROOT,
        name="turn1",
    )
    llm.add_rule(lambda r: NEEDLE in r.last_user_text, f"The code is found.\nFINAL({NEEDLE})", model=ROOT, name="final")
    llm.add_rule(None, lambda r: NEEDLE if NEEDLE in r.last_user_text else "NONE", model=SUB, name="sub")
    s = isolated(settings)

    async def go():
        async with running_worker(s, fake_registry(llm, context_window=1_000_000)) as client:
            handle = await start(client, s, request("What is the secret code?", ctx))
            result = await asyncio.wait_for(handle.result(), 120)
            history = await handle.fetch_history()
            return result, history

    result, history = asyncio.run(go())
    assert result.status == "completed", result.reason
    assert result.answer == NEEDLE
    assert result.turns == 2
    assert llm.count("sub") == n_chunks
    assert result.usage.by_model[SUB].calls == n_chunks
    assert result.usage.by_model[ROOT].calls == 2
    assert result.spend.calls == n_chunks + 2
    assert result.spend.usd > 0
    # The REPL output that reached the root model holds exactly one hit.
    second = [r for r in llm.requests(ROOT) if r.matched_rule and r.matched_rule.name == "final"][0]
    assert f"{n_chunks} ['{NEEDLE}']" in second.last_user_text
    # The context itself never reached the root model.
    assert all("alpha ledger" not in r.all_text and len(r.all_text) < 50_000 for r in llm.requests(ROOT))
    # Replaying the recorded history with today's code raises no non-determinism.
    asyncio.run(_replay(history))


async def _replay(history: WorkflowHistory) -> None:
    replayer = Replayer(workflows=[RLMRun], data_converter=pydantic_data_converter)
    await replayer.replay_workflow(history)


@pytest.mark.parametrize("sandbox", [True, False])
def test_workflows_run_in_the_sandbox_when_asked_and_outside_it_by_default(settings, context_store, llm, sandbox):
    """settings.workflow_sandbox picks the runner; a run with sub-calls ends
    the same way in both (its workflow code passes the sandbox's checks)."""
    ctx = context_store.put_value("alpha beta gamma")
    llm.add_rule("Turn 1 of", repl("parts = llm_query_batched(context.split())\nFINAL(' '.join(parts))"), model=ROOT)
    llm.add_rule(None, lambda r: r.last_user_text.upper(), model=SUB, name="sub")
    s = isolated(settings).model_copy(update={"workflow_sandbox": sandbox} if sandbox else {})

    async def go() -> tuple[object, RunResult]:
        worker, pool = build_worker(await connect(s), s, models=fake_registry(llm))
        try:
            async with worker:
                return worker.config()["workflow_runner"], await run(worker.client, s, request("upper?", ctx))
        finally:
            pool.close()

    runner, result = asyncio.run(go())
    assert isinstance(runner, SandboxedWorkflowRunner if sandbox else UnsandboxedWorkflowRunner)
    assert result.status == "completed", result.reason
    assert result.answer == "ALPHA BETA GAMMA"
    assert llm.count("sub") == 3


@pytest.mark.parametrize("compression", ["gzip", "none"])
def test_runs_complete_with_and_without_grpc_compression(settings, context_store, llm, compression):
    """The worker and the client on either setting of the connection to
    Temporal (the tests' loopback server gets "none" from "auto")."""
    ctx = context_store.put_value("alpha beta")
    llm.add_rule("Turn 1 of", repl("parts = llm_query_batched(context.split())\nFINAL('+'.join(parts))"), model=ROOT)
    llm.add_rule(None, lambda r: r.last_user_text[::-1], model=SUB)
    s = isolated(settings).model_copy(update={"temporal_grpc_compression": compression})
    assert s.temporal_gzip is (compression == "gzip")

    result = run_once(s, fake_registry(llm), request("reversed?", ctx))
    assert result.status == "completed", result.reason
    assert result.answer == "ahpla+ateb"


@pytest.mark.parametrize("where", ["code", "text"])
def test_final_var(settings, context_store, llm, where):
    ctx = context_store.put_value("numbers: 3 4 5")
    if where == "code":
        llm.add_rule("Turn 1 of", repl('total = sum(int(x) for x in context.split()[1:])\nFINAL_VAR("total")'), model=ROOT)
    else:
        llm.add_rule("Turn 1 of", repl("total = sum(int(x) for x in context.split()[1:])\nprint('computed')"), model=ROOT)
        llm.add_rule("computed", "The variable holds it.\nFINAL_VAR(total)", model=ROOT)
    s = isolated(settings)

    result = run_once(s, fake_registry(llm), request("sum?", ctx))
    assert result.status == "completed", result.reason
    assert result.answer == "12"


def test_final_in_code_ends_after_cell_and_final_in_plan_is_ignored(settings, context_store, llm):
    ctx = context_store.put_value("the answer is blue")
    llm.add_rule(
        "Turn 1 of",
        "I will call FINAL(answer) once I know.\n" + repl("word = context.split()[-1]\nprint(word)\nFINAL(word.upper())"),
        model=ROOT,
    )
    s = isolated(settings)

    result = run_once(s, fake_registry(llm), request("colour?", ctx))
    assert result.answer == "BLUE"
    assert result.turns == 1


def test_malformed_replies_get_a_nudge(settings, context_store, llm):
    ctx = context_store.put_value("some text")
    llm.add_rule("Turn 1 of", None, model=ROOT, name="null")  # content: null
    llm.add_rule(lambda r: "reply was empty" in r.last_user_text and "Turn 2 of" in r.last_user_text,
                 "I am thinking about it.", model=ROOT, name="prose")
    # An answer before any code ran is questioned once, then taken.
    llm.add_rule(re.compile(r"Turn [34] of"), "FINAL(done)", model=ROOT, name="final")
    s = isolated(settings)

    result = run_once(s, fake_registry(llm), request("q?", ctx))
    assert result.status == "completed"
    assert result.answer == "done"
    assert [llm.count(n) for n in ("null", "prose", "final")] == [1, 1, 2]
    assert result.turns == 4


def test_max_turns_asks_once_for_a_final_answer(settings, context_store, llm):
    ctx = context_store.put_value("abc")
    llm.add_rule(None, repl("print(len(context))"), model=ROOT, name="loop")
    llm.add_rule(re.compile(r"turn limit"), "FINAL(best guess)", model=ROOT, name="last")
    s = isolated(settings)

    result = run_once(s, fake_registry(llm), request("q?", ctx, caps={"max_turns": 2}))
    assert result.status == "max_turns"
    assert result.answer == "best guess"
    assert llm.count("loop") == 2 and llm.count("last") == 1
    # The final request is a user message, never an assistant one.
    last = [r for r in llm.requests(ROOT)][-1]
    assert last.messages[-1]["role"] == "user"


def test_cell_timeout_is_reported_and_repl_goes_on(settings, context_store, llm):
    ctx = context_store.put_value("abc")
    # Two cells: the state of the first survives the second being stopped.
    llm.add_rule("Turn 1 of", repl("kept = 41") + repl("while True:\n    pass"), model=ROOT)
    llm.add_rule("Turn 2 of", repl("print(kept + 1)"), model=ROOT)
    llm.add_rule(lambda r: "42" in r.last_user_text and "Turn 3 of" in r.last_user_text, "FINAL(42)", model=ROOT, name="ok")
    s = isolated(settings)

    result = run_once(s, fake_registry(llm), request("q?", ctx, limits={"cell_timeout_s": 1.0}))
    assert result.answer == "42", result
    turn2 = [r for r in llm.requests(ROOT) if "Turn 2 of" in r.last_user_text][0]
    assert "time" in turn2.last_user_text.lower()


def test_a_saved_state_that_cannot_be_restored_does_not_stop_the_run(settings, context_store, llm):
    # A value whose unpickling raises saves fine; when a later cell's state
    # cannot be saved (its pickling loops), the worker drops that REPL and
    # the next cell restores the last saved state, which fails every time:
    # each retry and every later cell failed, and FINAL never ran. Now the
    # cell starts with an empty REPL and is told so.
    ctx = context_store.put_value("abc")
    poison = "class P:\n    def __reduce__(self):\n        return (int, ('not a number',))\np = P()\nkept = 41"
    stuck = "class L:\n    def __reduce__(self):\n        while True:\n            pass\nl = L()"
    llm.add_rule("Turn 1 of", repl(poison), model=ROOT)
    llm.add_rule("Turn 2 of", repl(stuck), model=ROOT)
    llm.add_rule("Turn 3 of", repl("print('context', len(context), 'kept' in globals())"), model=ROOT)
    llm.add_rule(lambda r: "Turn 4 of" in r.last_user_text, "FINAL(done)", model=ROOT, name="end")
    result = run_once(isolated(settings), fake_registry(llm), request("q?", ctx, limits={"cell_timeout_s": 2.0}))
    assert result.status == "completed" and result.answer == "done", result
    [seen] = [r.last_user_text for r in llm.requests(ROOT) if r.matched_rule.name == "end"]
    assert "context 3 False" in seen and "the saved state could not be restored" in seen, seen[-1500:]


def test_model_errors(settings, context_store, llm):
    """A sub-call error is a string for that item; a root-model auth error ends the run clearly."""
    ctx = context_store.put_value("abc")
    llm.add_rule("Turn 1 of", repl('print(llm_query_batched(["good", "bad"]))'), model=ROOT)
    llm.add_rule(lambda r: "Error" in r.last_user_text, "FINAL(saw error)", model=ROOT, name="final")
    llm.add_rule("good", "fine", model=SUB)
    llm.add_rule("bad", "this request is malformed", status=400, model=SUB)
    s = isolated(settings)

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            first = await run(client, s, request("q?", ctx))
            shown = [r.last_user_text for r in llm.requests(ROOT)][-1]
            llm.reset()
            llm.add_rule(None, "key revoked", status=401, model=ROOT)
            second = await run(client, s, request("q?", ctx))
            return first, second, shown

    first, second, shown = asyncio.run(go())
    assert first.answer == "saw error"
    assert "'fine'" in shown and "Error" in shown and "malformed" in shown
    assert second.status == "failed"
    assert "fake-root" in (second.reason or "")


def test_unknown_model_fails_before_any_call(settings, context_store, llm):
    ctx = context_store.put_value("abc")
    s = isolated(settings)
    from workflows.request import ModelChoice

    result = run_once(s, fake_registry(llm), request("q?", ctx, models=ModelChoice(root="no-such-model-xyz")))
    assert result.status == "failed"
    assert "no-such-model-xyz" in (result.reason or "")
    assert llm.count() == 0


def test_missing_api_key_fails_the_run_before_any_call(settings, context_store, llm, monkeypatch):
    # Checked when the run resolves its models (a local activity since the
    # "resolve-locally" patch): the run ends `failed` naming the variable.
    monkeypatch.delenv("RLM_TEST_ABSENT_KEY", raising=False)
    ctx = context_store.put_value("abc")
    s = isolated(settings)
    result = run_once(s, fake_registry(llm, api_key_env="RLM_TEST_ABSENT_KEY"), request("q?", ctx))
    assert result.status == "failed"
    assert "RLM_TEST_ABSENT_KEY" in (result.reason or "")
    assert llm.count() == 0


def test_continue_as_new_keeps_repl_state_transcript_and_spend(settings, context_store, llm):
    ctx = context_store.put_value("abc")
    llm.add_rule("Turn 1 of", repl("kept = llm_query('one')\nprint('first', kept)"), model=ROOT, name="t1")
    llm.add_rule("Turn 2 of", repl("print('second', kept + llm_query('two'))"), model=ROOT, name="t2")
    llm.add_rule("Turn 3 of", "FINAL(chained)", model=ROOT, name="t3")
    llm.add_rule(None, lambda r: r.last_user_text.upper(), model=SUB)
    s = isolated(settings)

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            handle = await start(client, s, request("q", ctx, limits={"continue_after_updates": 1}))
            return handle.first_execution_run_id, await asyncio.wait_for(handle.result(), 120)

    first_run_id, result = asyncio.run(go())
    assert result.status == "completed" and result.answer == "chained"
    assert result.run_id != first_run_id  # the chain went on in new runs
    assert result.turns == 3 and result.spend.calls == 5
    assert result.usage.by_model[ROOT].calls == 3 and result.usage.by_model[SUB].calls == 2
    third = [r for r in llm.requests(ROOT) if r.matched_rule.name == "t3"][0]
    assert "second ONETWO" in third.last_user_text
    # The transcript carried over: the third turn's prompt holds the first turn's output.
    assert "first ONE" in third.all_text


@pytest.mark.parametrize(
    "value",
    [
        "x" * 9_000_000,  # over PREPARE_MIN_BYTES: worth making ahead
        [f"doc {i}" for i in range(1000)],  # few bytes in PREPARE_MIN_DOCS documents: a file each to load
    ],
    ids=["large", "many-documents"],
)
def test_the_first_cell_finds_its_repl_made_while_the_model_answered(settings, context_store, llm, value):
    """The run's first root turn asks its worker to make the REPL (boot,
    context load) while the model answers; the first cell checks it out warm,
    and the next cell keeps it."""
    from temporalio.api.enums.v1 import EventType

    from workflows.steps import CellOutput

    ctx = context_store.put_value(value)
    llm.add_rule("Turn 1 of", repl("print(len(context))"), model=ROOT, delay_s=0.5)
    llm.add_rule("Turn 2 of", repl("print('again')"), model=ROOT)
    llm.add_rule("again", f"FINAL({len(value)})", model=ROOT)
    s = isolated(settings)

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            handle = await start(client, s, request("How long?", ctx))
            result = await asyncio.wait_for(handle.result(), 120)
            return result, await handle.fetch_history()

    result, history = asyncio.run(go())
    assert (result.status, result.answer) == ("completed", str(len(value))), result.reason
    cells = [
        pydantic_data_converter.payload_converter.from_payloads(e.activity_task_completed_event_attributes.result.payloads, [CellOutput])[0]
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED and e.activity_task_completed_event_attributes.result.payloads
        and b"duration_s" in e.activity_task_completed_event_attributes.result.payloads[0].data
    ]
    assert [c.output.strip() for c in cells] == [str(len(value)), "again"]
    assert [c.warm for c in cells] == [True, True]


def test_a_repl_that_cannot_be_made_ahead_never_fails_the_root_turn(settings, context_store, llm):
    """The REPL made while the model answers is a head start only: whatever
    stops it (limits the sandbox refused, before runs with such limits were
    refused at their start) surfaces in a cell, not as a failed root model
    call. The failure is injected: no request a run accepts provokes it now."""
    ctx = context_store.put_value("x" * 9_000_000)  # over PREPARE_MIN_BYTES
    llm.add_rule(None, "FINAL(fine)", model=ROOT, name="root")
    s = isolated(settings)
    tried: list[str] = []

    def cannot_prepare(workflow_id, *args, **kwargs):
        tried.append(workflow_id)
        raise ValueError("memory_bytes must be between 16 MiB and 4 GiB (wasm32), got 8589934592")

    async def go() -> RunResult:
        async with worker_and_pool(s, fake_registry(llm)) as (client, pool):
            pool.prepare = cannot_prepare
            return await run(client, s, request("How long?", ctx))

    result = asyncio.run(go())
    assert len(tried) == 1, tried
    assert "root model call failed" not in (result.reason or ""), result.reason
    assert (result.status, result.answer) == ("completed", "fine"), result.reason


def test_a_run_whose_repl_cannot_fit_the_worker_ends_at_its_first_cell(settings, context_store, llm):
    """A worker whose whole guest memory budget is below the run's REPL cap
    (a small pod: half of 3 GiB under the default 2 GiB cap) can run none of
    its cells, whatever code the model writes. The run used to spend every
    turn, each a paid root call, on cells that could not run; it ends at the
    first, saying what to change."""
    ctx = context_store.put_value("x" * 1000)
    llm.add_rule(None, repl("print(len(context))"), model=ROOT, name="root")
    small = isolated(settings).model_copy(update={"guest_memory_share": 1e-6})  # ~24 KB on this machine
    result = run_once(small, fake_registry(llm), request("How long?", ctx, limits={"cell_memory_mb": 16}))
    assert result.status == "failed", result
    assert result.reason.startswith(
        "the cell could not run: GuestMemoryTooLarge: the REPL memory cap of 16 MiB exceeds this worker's whole "
        "guest memory budget of 0 MiB; lower the run's limits.cell_memory_mb or raise RLM_GUEST_MEMORY_SHARE"
    ), result.reason
    assert llm.count("root") == 1  # one root turn, its one cell, the end


@pytest.mark.parametrize(
    ("size", "root_calls", "reason"),
    [
        # Past the cap by size: said before any model call (it used to end at
        # the first cell, after a paid root turn; before that, after every turn,
        # each cell loading 40 MB four times).
        (40_000_000, 0, "the context (40.0 MB) does not fit in the REPL's memory cap of 32 MiB: raise the run's "
                        "limits.cell_memory_mb (at most 4096) or give it a smaller context"),
        # Under it by size, but the guest runs out of memory loading it (the
        # interpreter needs room too): the first cell says so and the run ends.
        (30_000_000, 1, "the cell could not run: ContextTooLarge: the context (30.0 MB) does not fit in the REPL's "
                        "memory cap of 32 MiB (loading it ran out of memory): raise the run's limits.cell_memory_mb "
                        "(at most 4096) or give it a smaller context"),
    ],
)
def test_a_run_whose_context_does_not_fit_its_repl_ends_before_spending_its_turns(
    settings, context_store, llm, size, root_calls, reason
):
    ctx = context_store.put_value("x" * size)
    llm.add_rule(None, repl("print(len(context))"), model=ROOT, name="root")
    result = run_once(isolated(settings), fake_registry(llm), request("How long?", ctx, limits={"cell_memory_mb": 32}))
    assert (result.status, result.reason) == ("failed", reason), result
    assert llm.count("root") == root_calls
