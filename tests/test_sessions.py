"""Sessions (`RLMSession`): questions over one context whose REPL state
carries from one question to the next. Real Temporal dev server, real S3,
real wasmtime REPLs on a real worker, the scripted model server.
"""

from __future__ import annotations

import asyncio
import threading
import uuid

import pytest
from temporalio.client import WorkflowFailureError, WorkflowUpdateFailedError, WorkflowUpdateStage
from temporalio.service import RPCError

from cli._run_client import RunClient, RunError
from cli._session_client import SessionClient
from tests.fixtures_llm import fake_registry
from tests.run_harness import ROOT, isolated, repl, running_worker, worker_and_pool
from tests.session_harness import TIMEOUT_S, ask, asked, close, first_and_second, session_request, start_session, summary
from workflows.names import SIGNAL_CANCEL, UPDATE_ASK, UPDATE_CLOSE
from workflows.result import RunResult
from workflows.session_models import AskRequest, SessionSummary



def _script_two_questions(llm) -> None:
    """Q1 defines `total`; Q2 reads it and the REPL's `session_history`."""
    llm.add_rule(asked("first"), repl("total = sum(int(x) for x in context.split()[1:])\nprint('total', total)"), model=ROOT)
    llm.add_rule("total 12", "FINAL(12)", model=ROOT)
    llm.add_rule(
        asked("second"),
        repl("print('again', total * 2, len(session_history), session_history[0]['answer'], session_history[0]['question'][:5])"),
        model=ROOT,
    )
    llm.add_rule("again 24 1 12 first", "FINAL(24)", model=ROOT)


def _script_two_questions_first_held(llm) -> tuple[threading.Event, object]:
    """As `_script_two_questions`, the first answer held until the event is set."""
    held = threading.Event()
    _script_two_questions(llm)
    first_rule = llm.add_rule(asked("first"), repl("total = 12\nprint('total', total)"), model=ROOT, hold=held)
    return held, first_rule


def test_second_question_uses_a_variable_of_the_first(settings, llm, context_store):
    ctx = context_store.put_value("numbers: 3 4 5")
    _script_two_questions(llm)
    s = isolated(settings)

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            handle = await start_session(client, s, session_request(ctx))
            first = await asyncio.wait_for(ask(handle, "first?"), TIMEOUT_S)
            second = await asyncio.wait_for(ask(handle, "second?"), TIMEOUT_S)
            state = await summary(handle)
            return handle, first, second, state, await close(handle), await handle.result()

    handle, first, second, state, closed, final = asyncio.run(go())
    assert (first.status, first.answer) == ("completed", "12")
    assert (second.status, second.answer) == ("completed", "24"), second.reason
    assert first.workflow_id == f"{handle.id}/q1" and second.workflow_id == f"{handle.id}/q2"
    # The model was told it is in a session, and what `session_history` holds.
    second_prompt = next(r for r in llm.requests(ROOT) if asked("second")(r)).all_text
    assert "question 2 of a session" in second_prompt and "`session_history`" in second_prompt
    assert state.state == "open" and state.questions == 2
    assert [(a.number, a.status) for a in state.recent] == [(1, "completed"), (2, "completed")]
    # The session's spend is the sum of its questions'.
    # (An attempt that timed out on a busy machine is charged too: at least 4.)
    assert closed.spend.calls == first.spend.calls + second.spend.calls >= 4
    assert closed.state == "closed" and final.state == "closed" and final.questions == 2


def test_worker_restart_between_questions_rebuilds_the_repl(settings, llm, context_store):
    ctx = context_store.put_value("numbers: 3 4 5")
    _script_two_questions(llm)
    s = isolated(settings)

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            handle = await start_session(client, s, session_request(ctx))
            first = await asyncio.wait_for(ask(handle, "first?"), TIMEOUT_S)
        # That worker is gone with its warm REPL; a new one rebuilds it from the snapshot.
        async with running_worker(s, fake_registry(llm)) as client:
            handle = client.get_workflow_handle(handle.id)
            second = await asyncio.wait_for(ask(handle, "second?"), TIMEOUT_S)
            await close(handle)
        return first, second

    first, second = asyncio.run(go())
    assert first.answer == "12"
    assert (second.status, second.answer) == ("completed", "24"), second.reason


def test_an_idle_sessions_repl_is_evicted_and_rebuilt_from_its_snapshot(settings, llm, context_store):
    ctx = context_store.put_value("numbers: 3 4 5")
    _script_two_questions(llm)
    s = isolated(settings)

    async def go():
        async with worker_and_pool(s, fake_registry(llm)) as (client, pool):
            handle = await start_session(client, s, session_request(ctx))
            first = await asyncio.wait_for(ask(handle, "first?"), TIMEOUT_S)
            held_while_idle = pool.held_bytes  # the warm REPL kept for the next question
            evicted = pool.evict_idle(0.0)  # what the worker does after RLM_REPL_IDLE_S
            held_after = pool.held_bytes
            second = await asyncio.wait_for(ask(handle, "second?"), TIMEOUT_S)
            await close(handle)
            return first, held_while_idle, evicted, held_after, second

    first, held_while_idle, evicted, held_after, second = asyncio.run(go())
    assert first.answer == "12"
    assert held_while_idle > 0 and evicted == 1 and held_after == 0
    assert (second.status, second.answer) == ("completed", "24"), second.reason


def test_continue_as_new_between_questions_keeps_state(settings, llm, context_store):
    ctx = context_store.put_value("numbers: 3 4 5")
    _script_two_questions(llm)
    llm.add_rule(asked("third"), repl("print('third', total, len(session_history), session_history[1]['answer'])"), model=ROOT)
    llm.add_rule("third 12 2 24", "FINAL(36)", model=ROOT)
    s = isolated(settings)

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            handle = await start_session(client, s, session_request(ctx, continue_after_questions=1))
            answers = [await asyncio.wait_for(ask(handle, q), TIMEOUT_S) for q in ("first?", "second?", "third?")]
            state = await summary(handle)
            closed = await close(handle)
            return handle, answers, state, closed, await handle.result()

    handle, answers, state, closed, final = asyncio.run(go())
    assert [a.answer for a in answers] == ["12", "24", "36"], [a.reason for a in answers]
    # A new run of the chain after each question (close may reach the third or the fourth).
    assert state.runs >= 3 and final.runs >= 3
    assert final.questions == 3 and final.spend.calls == sum(a.spend.calls for a in answers) >= 6
    assert [a.number for a in final.recent] == [1, 2, 3]
    assert final.spend == closed.spend


def test_question_and_session_budgets(settings, llm, context_store):
    ctx = context_store.put_value("abc")
    llm.add_rule(None, repl("print('working')"), model=ROOT)  # never answers on its own
    s = isolated(settings)

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            handle = await start_session(
                client, s, session_request(ctx, caps={"max_calls": 3}, question_caps={"max_calls": 2})
            )
            q1 = await asyncio.wait_for(ask(handle, "one"), TIMEOUT_S)  # its own cap: 2 calls
            q2 = await asyncio.wait_for(ask(handle, "two"), TIMEOUT_S)  # what the session has left: 1
            q3 = await asyncio.wait_for(ask(handle, "three"), TIMEOUT_S)  # nothing left: not run
            return q1, q2, q3, await close(handle)

    q1, q2, q3, closed = asyncio.run(go())
    assert q1.status == "budget_exhausted" and q1.spend.calls == 2
    assert q2.status == "budget_exhausted" and q2.spend.calls == 1
    assert q3.status == "budget_exhausted" and q3.turns == 0 and q3.reason.startswith("session budget: ")
    assert closed.spend.calls == 3 and closed.questions == 3


def test_per_question_caps_given_with_the_ask(settings, llm, context_store):
    ctx = context_store.put_value("abc")
    llm.add_rule(None, repl("print('working')"), model=ROOT)
    s = isolated(settings)

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            handle = await start_session(client, s, session_request(ctx, question_caps={"max_calls": 5}))
            limited = await asyncio.wait_for(ask(handle, "one", max_calls=1), TIMEOUT_S)
            with pytest.raises(WorkflowUpdateFailedError) as bad:
                await ask(handle, "two", max_turns=0)
            with pytest.raises(WorkflowUpdateFailedError) as unknown:
                await handle.execute_update(
                    UPDATE_ASK, {"question": "x", "caps": {"max_dollars": 1}}, result_type=RunResult
                )
            # A caller in another language putting the cap beside `caps`: refused, not an uncapped ask.
            with pytest.raises(WorkflowUpdateFailedError) as misplaced:
                await handle.execute_update(UPDATE_ASK, {"question": "x", "max_calls": 1}, result_type=RunResult)
            await close(handle)
            return limited, bad.value, unknown.value, misplaced.value

    limited, bad, unknown, misplaced = asyncio.run(go())
    assert limited.status == "budget_exhausted" and limited.spend.calls == 1
    assert "max_turns" in str(bad.cause)
    assert "max_dollars" in str(unknown.cause)
    assert "max_calls: Extra inputs are not permitted" in str(misplaced.cause), misplaced.cause


def test_a_concurrent_ask_waits_for_the_running_one(settings, llm, context_store):
    ctx = context_store.put_value("numbers: 3 4 5")
    held, first_rule = _script_two_questions_first_held(llm)
    s = isolated(settings)

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            handle = await start_session(client, s, session_request(ctx))
            one = asyncio.ensure_future(ask(handle, "first?"))
            await asyncio.to_thread(llm.wait_for_count, 1, first_rule, TIMEOUT_S)
            # Accepted while the first runs: it waits its turn, no model call yet.
            two = await handle.start_update(
                UPDATE_ASK, AskRequest(question="second?"), result_type=RunResult,
                wait_for_stage=WorkflowUpdateStage.ACCEPTED,
            )
            assert not any(asked("second", None)(r) for r in llm.requests(ROOT))
            assert (await summary(handle)).questions == 1
            held.set()
            results = await asyncio.wait_for(asyncio.gather(one, two.result()), TIMEOUT_S)
            await close(handle)
            return results

    try:
        first, second = asyncio.run(go())
    finally:
        held.set()
    assert first.answer == "12" and first.workflow_id.endswith("/q1")
    assert second.answer == "24" and second.workflow_id.endswith("/q2"), second.reason


def test_close_waits_for_the_running_ask_and_refuses_later_ones(settings, llm, context_store):
    ctx = context_store.put_value("numbers: 3 4 5")
    held, first_rule = _script_two_questions_first_held(llm)
    s = isolated(settings)

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            handle = await start_session(client, s, session_request(ctx))
            one = asyncio.ensure_future(ask(handle, "first?"))
            await asyncio.to_thread(llm.wait_for_count, 1, first_rule, TIMEOUT_S)
            closing = await handle.start_update(
                UPDATE_CLOSE, result_type=SessionSummary, wait_for_stage=WorkflowUpdateStage.ACCEPTED
            )
            with pytest.raises(WorkflowUpdateFailedError) as refused:
                await ask(handle, "second?")
            held.set()
            first = await asyncio.wait_for(one, TIMEOUT_S)
            closed = await asyncio.wait_for(closing.result(), TIMEOUT_S)
            final = await handle.result()
            with pytest.raises(RPCError):  # the session has ended
                await ask(handle, "third?")
            with pytest.raises(RunError) as later:  # our client says how
                await SessionClient(RunClient(s, client, progress=None)).ask(handle.id, "fourth?")
            return first, refused.value, closed, final, later.value

    try:
        first, refused, closed, final, later = asyncio.run(go())
    finally:
        held.set()
    assert first.answer == "12"
    assert "is closed" in str(refused.cause)
    assert "is not open: it was closed; start a new session" in str(later), later
    assert closed.state == "closed" and closed.questions == 1
    assert final.state == "closed" and final.questions == 1


def test_inline_text_context_and_a_bad_request(settings, llm):
    _script_two_questions(llm)
    s = isolated(settings)

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            # Inline text is stored by the session's first step, once for every question.
            good = await client.start_workflow(
                "RLMSession",
                {"context": "numbers: 3 4 5", "models": {"root": ROOT}, "limits": {"cell_timeout_s": 20}},
                id=f"test-session-inline-{uuid.uuid4().hex[:8]}", task_queue=s.task_queue,
            )
            first = await asyncio.wait_for(ask(good, "first?"), TIMEOUT_S)
            await close(good)
            # A request that does not validate ends the session at once, the field named.
            bad = await client.start_workflow(
                "RLMSession", {"context": "x", "models": {"root": ROOT}, "continue_after_questions": 0},
                id=f"test-session-bad-{uuid.uuid4().hex[:8]}", task_queue=s.task_queue,
            )
            with pytest.raises(WorkflowFailureError) as failed:
                await asyncio.wait_for(bad.result(), TIMEOUT_S)
            return first, failed.value

    first, failed = asyncio.run(go())
    assert (first.status, first.answer) == ("completed", "12"), first.reason
    assert "continue_after_questions" in str(failed.cause)


# 60 signals: those handled after the question's run finished find no run to
# signal; the session still ends closed with its summary (it used to fail,
# and its result with it).
@pytest.mark.parametrize("signals", [1, 60])
def test_cancel_ends_the_session_and_the_question_it_answers(settings, llm, context_store, signals):
    ctx = context_store.put_value("numbers: 3 4 5")
    held = threading.Event()
    rule = llm.add_rule(asked("first"), repl("print(1)"), model=ROOT, hold=held)
    s = isolated(settings)

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            handle = await start_session(client, s, session_request(ctx))
            one = asyncio.ensure_future(ask(handle, "first?"))
            await asyncio.to_thread(llm.wait_for_count, 1, rule, TIMEOUT_S)
            for i in range(signals):
                try:
                    await handle.signal(SIGNAL_CANCEL, "stop now")
                except RPCError:  # a later one: the session has ended (closed, or failed: checked below)
                    if i == 0:
                        raise
                    break
            first = await asyncio.wait_for(one, TIMEOUT_S)
            return first, await asyncio.wait_for(handle.result(), TIMEOUT_S)

    try:
        first, final = asyncio.run(go())
    finally:
        held.set()
    assert first.status == "cancelled" and first.workflow_id.endswith("/q1")
    assert final.state == "closed" and final.questions == 1 and final.recent[0].status == "cancelled"


def test_a_question_whose_run_is_terminated_counts_its_caps_and_the_session_goes_on(settings, llm, context_store):
    ctx = context_store.put_value("numbers: 3 4 5")
    held = threading.Event()
    llm.add_rule(asked("second"), repl("print('second', len(session_history))"), model=ROOT)
    llm.add_rule("second 1", "FINAL(on)", model=ROOT)
    rule = llm.add_rule(asked("first"), repl("print(1)"), model=ROOT, hold=held)
    s = isolated(settings)

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            handle = await start_session(
                client, s, session_request(ctx, caps={"max_calls": 20}, question_caps={"max_calls": 5})
            )
            one = asyncio.ensure_future(ask(handle, "first?"))
            await asyncio.to_thread(llm.wait_for_count, 1, rule, TIMEOUT_S)
            await client.get_workflow_handle(f"{handle.id}/q1").terminate("operator")
            first = await asyncio.wait_for(one, TIMEOUT_S)
            held.set()
            second = await asyncio.wait_for(ask(handle, "second?"), TIMEOUT_S)
            return first, second, await close(handle)

    try:
        first, second, closed = asyncio.run(go())
    finally:
        held.set()
    assert first.status == "failed" and "terminated" in first.reason.lower()
    assert (second.status, second.answer) == ("completed", "on"), second.reason
    # The terminated question reported nothing: its cap (5 calls) is counted, not the session's 20.
    assert closed.spend.calls == 5 + second.spend.calls


def test_a_question_with_an_answer_schema(settings, llm, context_store):
    ctx = context_store.put_value("numbers: 3 4 5")
    _script_two_questions(llm)
    llm.add_rule("total 12", 'FINAL({"total": 12})', model=ROOT)
    schema = {"type": "object", "properties": {"total": {"type": "integer"}}, "required": ["total"]}
    s = isolated(settings)

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            handle = await start_session(client, s, session_request(ctx))
            typed = await handle.execute_update(
                UPDATE_ASK, AskRequest(question="first?", answer_schema=schema), result_type=RunResult
            )
            await close(handle)
            return typed

    typed = asyncio.run(go())
    assert typed.status == "completed" and typed.answer_value == {"total": 12}, typed.reason


def test_every_question_of_a_session_may_call_the_sessions_tools(settings, llm, context_store):
    ctx = context_store.put_value("ledger ids 3 and 1")
    llm.add_rule(asked("first"), repl("v = ledger_lookup(3)['vendor']\nprint('vendor', v)"), model=ROOT)
    llm.add_rule("vendor Acme", "FINAL(Acme)", model=ROOT)
    llm.add_rule(asked("second"), repl("print('both', v, ledger_lookup(id=1)['vendor'])"), model=ROOT)
    llm.add_rule("both Acme Globex", "FINAL(Acme and Globex)", model=ROOT)
    s = isolated(settings).model_copy(update={"tools": "tests.sample_tools:TOOLS"})

    first, second = first_and_second(s, fake_registry(llm), session_request(ctx, tools=["ledger_lookup"]))
    assert (first.status, first.answer) == ("completed", "Acme"), first.reason
    assert (second.status, second.answer) == ("completed", "Acme and Globex"), second.reason
    # Each question's model was shown the tool (the session passes it to every run).
    prompts = [r.all_text for r in llm.requests(ROOT) if asked("first")(r) or asked("second")(r)]
    assert prompts and all("ledger_lookup(id: int) -> dict" in p for p in prompts)


def test_an_ask_past_a_runs_cap_bounds_is_refused_and_holds_no_budget(settings, llm, context_store):
    """A question runs as a RunRequest: caps past its bounds used to pass the
    ask's validator, then fail inside the update after the session's whole
    remaining budget was held for it, so that every later question was
    refused as over budget. A session's money cap past a run's bound (no
    limit in practice) is given to each question at the bound."""
    ctx = context_store.put_value("abc")
    llm.add_rule(None, "FINAL(ok)", model=ROOT)
    s = isolated(settings)

    async def raw_ask(handle, body):
        return await asyncio.wait_for(handle.execute_update(UPDATE_ASK, body, result_type=RunResult), TIMEOUT_S)

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            capped = await start_session(client, s, session_request(ctx, caps={"max_usd": 1.0, "max_calls": 50}))
            with pytest.raises(WorkflowUpdateFailedError) as past:
                await raw_ask(capped, {"question": "bad?", "caps": {"max_turns": 20_000}})
            after = await asyncio.wait_for(ask(capped, "good?"), TIMEOUT_S)
            await close(capped)
            deep = await start_session(client, s, session_request(ctx, question_caps={"max_depth": 17}))
            with pytest.raises(WorkflowUpdateFailedError) as too_deep:
                await raw_ask(deep, {"question": "q?"})
            allowed = await raw_ask(deep, {"question": "q?", "caps": {"max_depth": 2}})
            await close(deep)
            rich = await start_session(client, s, session_request(ctx, caps={"max_usd": 2_000_000.0}))
            one, two = await raw_ask(rich, {"question": "one?"}), await raw_ask(rich, {"question": "two?"})
            return past.value, after, too_deep.value, allowed, one, two, await close(rich)

    past, after, too_deep, allowed, one, two, rich = asyncio.run(go())
    assert "caps.max_turns is 20,000 (at most 10,000)" in str(past.cause), past.cause
    assert after.status == "completed", after.reason
    assert "the session's question_caps.max_depth is 17 (at most 16)" in str(too_deep.cause), too_deep.cause
    assert allowed.status == "completed", allowed.reason
    assert (one.status, two.status) == ("completed", "completed"), (one.reason, two.reason)
    assert rich.questions == 2
