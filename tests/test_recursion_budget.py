"""Child runs at any depth, tiered models, and budget caps over the whole tree:
real worker, Temporal, S3 and WASM; models scripted through litellm."""

from __future__ import annotations

import asyncio
import re
import threading

import pytest

from tests.fixtures_llm import fake_registry
from tests.run_harness import ROOT, SUB, isolated, repl, request, run, run_once, running_worker, start
from workflows.names import QUERY_PROGRESS, SIGNAL_CANCEL, UPDATE_SET_CAPS


def _question(r) -> str:
    m = re.search(r"Question: (\S+)", r.all_text)
    return m.group(1) if m else ""


def _script_levels(llm, deepest: int) -> None:
    """Level k asks level k+1 with rlm_query and wraps its answer; the deepest
    level answers from its own context."""
    for k in range(deepest):
        llm.add_rule(
            lambda r, k=k: _question(r) == f"L{k}" and "Turn 1 of" in r.last_user_text,
            repl(f'print("got", rlm_query("L{k + 1}", context="ctx-{k + 1}"))'),
            model=ROOT,
            name=f"ask{k}",
        )
        llm.add_rule(
            lambda r, k=k: _question(r) == f"L{k}" and "got " in r.last_user_text,
            lambda r, k=k: "FINAL(L%d(%s))" % (k, r.last_user_text.split("got ", 1)[1].split()[0]),
            model=ROOT,
            name=f"wrap{k}",
        )
    llm.add_rule(lambda r: _question(r) == f"L{deepest}", repl("FINAL(context.upper())"), model=ROOT, name="leaf")


def _depths(children, depth=1):
    out = []
    for c in children:
        out.append(depth)
        out.extend(_depths(c.children, depth + 1))
    return out


def test_depth_three_tree(settings, context_store, llm):
    ctx = context_store.put_value("root context")
    _script_levels(llm, deepest=3)
    s = isolated(settings)

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            result = await run(client, s, request("L0", ctx, caps={"max_depth": 3}))
            # The whole tree is listed by its root id (search attributes), as in the UI.
            query = f"RlmRootRunId = '{result.workflow_id}' AND RlmStatus = 'completed'"
            for _ in range(100):  # visibility is eventually consistent: poll for the observed state
                tree = [w.id async for w in client.list_workflows(query)]
                if len(tree) == 4:
                    break
                await asyncio.sleep(0.1)
            return result, tree

    result, tree = asyncio.run(go())
    assert len(tree) == 4
    assert result.status == "completed", result.reason
    assert result.answer == "L0(L1(L2(CTX-3)))"
    assert _depths(result.children) == [1, 2, 3]
    child = result.children[0]
    assert child.workflow_id.startswith(f"{result.workflow_id}/d1-")
    assert child.children[0].workflow_id.startswith(f"{child.workflow_id}/d2-")
    assert sorted(result.usage.by_depth) == [0, 1, 2, 3]
    # Each level's spend is inside its parent's; the root reports the tree.
    assert result.spend.calls == llm.count() == 7


def test_depth_cap_falls_back_to_llm_query(settings, context_store, llm):
    ctx = context_store.put_value("root context")
    llm.add_rule("Turn 1 of", repl('print("got", rlm_query("What colour?", context="the sky is teal"))'), model=ROOT)
    llm.add_rule("got ", "FINAL(done)", model=ROOT)
    llm.add_rule(None, "teal", model=SUB, name="sub")
    s = isolated(settings)

    result = run_once(s, fake_registry(llm), request("q", ctx, caps={"max_depth": 0}))
    assert result.status == "completed"
    assert result.children == []
    [sub] = llm.requests(SUB)
    assert "What colour?" in sub.last_user_text and "the sky is teal" in sub.last_user_text


def test_batch_of_children_runs_in_parallel_and_keeps_order(settings, context_store, llm):
    ctx = context_store.put_value("root context")
    release = threading.Event()
    llm.add_rule(
        "Turn 1 of",
        repl('print("got", rlm_query_batched(["Ca", "Cb", "Cc"], contexts=["x", "yy", "zzz"]))'),
        model=ROOT,
    )
    llm.add_rule(lambda r: "got " in r.last_user_text, lambda r: "FINAL(%s)" % r.last_user_text.split("got ", 1)[1].split("\n")[0], model=ROOT)
    # Children answer only once all three are waiting: a serial batch would hang here.
    llm.add_rule(lambda r: _question(r).startswith("C"), repl("FINAL(len(context))"), model=ROOT, name="child", hold=release)
    s = isolated(settings)

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            handle = await start(client, s, request("q", ctx, caps={"max_depth": 1}))
            await asyncio.to_thread(llm.wait_for_count, 3, "child", 60)
            release.set()
            return await asyncio.wait_for(handle.result(), 60)

    try:
        result = asyncio.run(go())
    finally:
        release.set()
    assert result.answer == "['1', '2', '3']"
    assert len(result.children) == 3


def test_unknown_model_name_in_guest_is_an_error_string(settings, context_store, llm):
    ctx = context_store.put_value("abc")
    llm.add_rule("Turn 1 of", repl('print(llm_query("hi", model="gpt-imaginary"))'), model=ROOT)
    llm.add_rule("not configured", "FINAL(refused)", model=ROOT, name="saw")
    s = isolated(settings)

    result = run_once(s, fake_registry(llm), request("q", ctx))
    assert result.answer == "refused" and llm.count("saw") == 1
    assert llm.requests(SUB) == []


def _spend_script(llm, prompts: int) -> None:
    llm.add_rule(None, repl(f"print(llm_query_batched(['p%d' % i for i in range({prompts})]))"), model=ROOT, name="root")
    llm.add_rule(None, "ok", model=SUB, name="sub")


def test_calls_cap_holds_for_the_tree(settings, context_store, llm):
    ctx = context_store.put_value("abc")
    _spend_script(llm, prompts=5)
    s = isolated(settings)

    result = run_once(s, fake_registry(llm), request("q", ctx, caps={"max_calls": 4, "max_concurrency": 1}))
    assert result.status == "budget_exhausted"
    assert "calls" in (result.reason or "")
    # Root turn 1 and three sub-calls fit; two items and root turn 2 were refused.
    assert result.spend.calls == 4 == llm.count()
    assert llm.count("sub") == 3


def test_refused_subcall_is_an_explanation_for_the_code(settings, context_store, llm):
    ctx = context_store.put_value("abc")
    llm.add_rule(None, repl("r = llm_query_batched(['p%d' % i for i in range(5)])\nFINAL(r[-1])"), model=ROOT)
    llm.add_rule(None, "ok", model=SUB, name="sub")
    s = isolated(settings)

    result = run_once(s, fake_registry(llm), request("q", ctx, caps={"max_calls": 4, "max_concurrency": 1}))
    assert result.status == "completed"
    assert result.answer.startswith("Budget:") and "calls" in result.answer
    assert llm.count("sub") == 3 and result.spend.calls == 4


def test_usd_and_token_caps_hold(settings, context_store, llm):
    ctx = context_store.put_value("abc")
    _spend_script(llm, prompts=20)
    s = isolated(settings)

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            usd = await run(client, s, request("q", ctx, caps={"max_usd": 0.02}))
            tokens = await run(client, s, request("q", ctx, caps={"max_tokens": 12_000}))
            return usd, tokens

    usd, tokens = asyncio.run(go())
    assert usd.status == "budget_exhausted" and usd.spend.usd <= 0.02
    assert "usd" in (usd.reason or "").lower() or "$" in (usd.reason or "")
    assert tokens.status == "budget_exhausted" and tokens.spend.tokens <= 12_000
    assert "token" in (tokens.reason or "").lower()


def test_wall_time_cap(settings, context_store, llm):
    ctx = context_store.put_value("abc")
    llm.add_rule(None, repl("print(llm_query('slow'))"), model=ROOT, name="root")
    llm.add_rule(None, "late", model=SUB, delay_s=2.5)
    s = isolated(settings)

    result = run_once(s, fake_registry(llm), request("q", ctx, caps={"max_wall_s": 2.0}))
    assert result.status == "budget_exhausted"
    assert "wall" in (result.reason or "").lower() or "time" in (result.reason or "").lower()
    assert llm.count("root") == 1


@pytest.mark.parametrize("step", ["cell", "sub-call"])
def test_a_step_started_before_the_deadline_ends_at_it(settings, context_store, llm, step):
    """Caps are checked before a step starts; a looping cell (timeout 60 s)
    or a slow sub-call ran past a 3 s cap by its whole timeout (found by
    review). Each step's timeout is now the time left, when that is shorter."""
    code = "x = 0\nwhile True:\n    x += 1" if step == "cell" else "print(llm_query('slow'))"
    llm.add_rule(None, repl(code), model=ROOT, name="root")
    llm.add_rule(None, "late", model=SUB, delay_s=60)
    limits = {"cell_timeout_s": 60.0, "model_call_timeout_s": 60.0}
    result = run_once(isolated(settings), fake_registry(llm), request("q", context_store.put_value("abc"), caps={"max_wall_s": 3.0}, limits=limits))
    assert result.status == "budget_exhausted" and "wall time" in result.reason, result
    late = float(re.search(r"passed ([0-9.]+) s ago", result.reason).group(1))
    assert late < 10, result.reason  # not the step's 60 s
    assert llm.count("root") == 1


def test_budget_too_small_to_start(settings, context_store, llm):
    ctx = context_store.put_value("abc")
    s = isolated(settings)

    result = run_once(s, fake_registry(llm), request("q", ctx, caps={"max_tokens": 50}))
    assert result.status == "budget_exhausted"
    assert "too small to start" in (result.reason or "")
    assert llm.count() == 0


def test_raise_cap_mid_run_lets_it_finish_and_progress_is_visible(settings, context_store, llm):
    ctx = context_store.put_value("abc")
    release = threading.Event()
    llm.add_rule("Turn 1 of", repl("print(llm_query('wait'))"), model=ROOT)
    llm.add_rule("Turn 2 of", repl("print(2)"), model=ROOT)
    llm.add_rule("Turn 3 of", "FINAL(finished)", model=ROOT)
    llm.add_rule(None, "ok", model=SUB, name="held", hold=release)
    s = isolated(settings)

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            handle = await start(client, s, request("q", ctx, caps={"max_calls": 3}))
            await asyncio.to_thread(llm.wait_for_count, 1, "held", 60)
            progress = await handle.query(QUERY_PROGRESS)
            caps = await handle.execute_update(UPDATE_SET_CAPS, {"max_calls": 10})
            release.set()
            return progress, caps, await asyncio.wait_for(handle.result(), 60)

    try:
        progress, caps, result = asyncio.run(go())
    finally:
        release.set()
    assert progress["turn"] == 1 and progress["open_subcalls"] == 1
    assert progress["caps"]["max_calls"] == 3 and caps["max_calls"] == 10
    assert result.status == "completed" and result.answer == "finished"
    assert result.spend.calls == 4


def test_cancel_mid_run_cancels_the_subtree(settings, context_store, llm):
    ctx = context_store.put_value("abc")
    release = threading.Event()
    llm.add_rule(lambda r: _question(r) == "top", repl('print(rlm_query("deep", context="x"))'), model=ROOT)
    llm.add_rule(lambda r: _question(r) == "deep", repl("print(llm_query('wait'))"), model=ROOT)
    llm.add_rule(None, "ok", model=SUB, name="held", hold=release)
    s = isolated(settings)

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            handle = await start(client, s, request("top", ctx, caps={"max_depth": 1}))
            await asyncio.to_thread(llm.wait_for_count, 1, "held", 60)
            await handle.signal(SIGNAL_CANCEL, "user stop")
            result = await asyncio.wait_for(handle.result(), 60)
            child_id = next(
                e.start_child_workflow_execution_initiated_event_attributes.workflow_id
                for e in (await handle.fetch_history()).events
                if e.HasField("start_child_workflow_execution_initiated_event_attributes")
            )
            child = await asyncio.wait_for(client.get_workflow_handle(child_id).result(), 60)
            return result, child

    try:
        result, child = asyncio.run(go())
    finally:
        release.set()
    assert result.status == "cancelled" and result.reason == "user stop"
    assert child["status"] == "cancelled"


def test_tree_spend_stays_under_cap_and_per_depth_models(settings, context_store, llm):
    """Four children, each spending in a loop: the whole tree stays under the
    calls cap, and children use the model configured for depth 1."""
    from workflows.request import ModelChoice

    ctx = context_store.put_value("abc")
    llm.add_rule(
        lambda r: _question(r) == "top" and "Turn 1 of" in r.last_user_text,
        repl('print(rlm_query_batched(["w0", "w1", "w2", "w3"], contexts=["a", "b", "c", "d"]))'),
        model=ROOT,
    )
    llm.add_rule(lambda r: _question(r) == "top" and "Turn 2 of" in r.last_user_text, "FINAL(tree done)", model=ROOT)
    # Children (on fake-sub, the depth-1 model) keep calling the sub model.
    llm.add_rule(lambda r: _question(r).startswith("w"), repl("print(llm_query_batched(['x'] * 3))"), model=SUB, name="child-root")
    llm.add_rule(lambda r: "x" == r.last_user_text, "y", model=SUB, name="leaf")
    s = isolated(settings)
    cap = 14

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            models = ModelChoice(root=ROOT, sub=SUB, per_depth={1: SUB})
            return await run(client, s, request("top", ctx, caps={"max_depth": 1, "max_calls": cap}, models=models))

    result = asyncio.run(go())
    assert len(result.children) == 4, [r.last_user_text[-600:] for r in llm.requests(ROOT)]
    assert result.spend.calls <= cap
    assert llm.count() == result.spend.calls  # every call the server saw was accounted for
    assert llm.count("child-root") >= 4 and all(r.model == SUB for r in llm.requests() if _question(r).startswith("w"))
    assert result.usage.by_depth[1].calls >= 4


def test_a_child_that_cannot_start_gives_its_slice_back_and_the_cell_an_error_string(settings, context_store, llm):
    """A run stopped with set_caps(max_turns=0) while its cell runs has no
    turn to give a child: the child is not started, its slice of the budget
    goes back, and the cell reads why (as for any sub-call error)."""
    ctx = context_store.put_value("abc")
    release = threading.Event()
    cell = 'print(llm_query("wait"))\nanswer = rlm_query("deep", context="x")\nllm_query("echo " + answer)'
    llm.add_rule("Turn 1 of", repl(cell), model=ROOT)
    llm.add_rule("wait", "ok", model=SUB, name="held", hold=release)
    llm.add_rule("echo ", "echoed", model=SUB, name="echo")
    s = isolated(settings)

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            handle = await start(client, s, request("top", ctx, caps={"max_depth": 1, "max_usd": 1.0}))
            await asyncio.to_thread(llm.wait_for_count, 1, "held", 60)
            await handle.execute_update(UPDATE_SET_CAPS, {"max_turns": 0})
            release.set()
            return await asyncio.wait_for(handle.result(), 60)

    try:
        result = asyncio.run(go())
    finally:
        release.set()
    assert result.status != "failed", result.reason
    assert result.children == []
    [echo] = [r for r in llm.requests(SUB) if "echo " in r.last_user_text]
    assert "Error: child run not started: caps: " in echo.last_user_text, echo.last_user_text
    assert "max_turns must be at least 1" in echo.last_user_text
    # Nothing of the child's $1 slice is counted: only the calls the model server saw.
    assert result.spend.calls == llm.count(), (result.spend, llm.count())
    assert result.spend.usd < 0.01, result.spend
    assert not [r for r in llm.requests(ROOT) if _question(r) == "deep"]
