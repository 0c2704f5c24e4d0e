"""Sessions against a hostile (or careless) model and caller: real Temporal
dev server, real S3, real wasmtime REPLs, the scripted model server."""

from __future__ import annotations

import asyncio

import pytest

from temporalio.client import Client, WorkflowUpdateFailedError
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.service import RetryConfig, RPCError

from activities.temporal_client import refused_for_now
from tests.fixtures_llm import fake_registry
from tests.run_harness import ROOT, isolated, repl, running_worker
from tests.session_harness import TIMEOUT_S, ask, asked, close, first_and_second, session_request, start_session
from workflows.result import RunResult



def test_session_history_survives_model_code_that_shadows_builtins(settings, llm, context_store):
    """Model code often names a variable `list` (or `globals`): the cell that
    appends to `session_history` must not depend on those names."""
    ctx = context_store.put_value("numbers: 3 4 5")
    llm.add_rule(asked("first"), repl("list = context.split()\nglobals = 'mine'\nprint('listed', len(list))"), model=ROOT)
    llm.add_rule("listed 4", "FINAL(four)", model=ROOT)
    llm.add_rule(asked("second"), repl("print('history', len(session_history), session_history[0]['answer'])"), model=ROOT)
    llm.add_rule("history 1 four", "FINAL(seen)", model=ROOT)
    s = isolated(settings)

    first, second = first_and_second(s, fake_registry(llm), session_request(ctx, question_caps={"max_turns": 3}))
    assert (first.status, first.answer) == ("completed", "four"), first.reason
    assert (second.status, second.answer) == ("completed", "seen"), second.reason


def test_answers_whose_history_cell_keeps_failing_do_not_end_the_session(settings, llm, context_store):
    """Each answer whose `session_history` cell failed is kept to be appended
    with the next. The cell failed for good once model code rebound `list`,
    and that list grew until the cell's input passed Temporal's payload limit
    (12 questions of 60,000 control characters): every workflow task of the
    session failed from then on (PayloadsTooLarge), every ask timed out."""
    ctx = context_store.put_value("numbers: 3 4 5")
    llm.add_rule(asked("first"), repl("list = 1\nprint('shadowed')"), model=ROOT)
    llm.add_rule("shadowed", "FINAL(ok)", model=ROOT)
    llm.add_rule(asked("big", None), "FINAL(fine)", model=ROOT)
    s = isolated(settings)
    filler = "\x01" * 60_000  # 4 characters each in the cell's code

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            handle = await start_session(client, s, session_request(ctx))
            results = [await asyncio.wait_for(ask(handle, "first?"), TIMEOUT_S)]
            try:
                for i in range(30):
                    results.append(await asyncio.wait_for(ask(handle, f"big {i} {filler}"), TIMEOUT_S))
                await close(handle)
                return results, await handle.result(), None
            except Exception as exc:  # the session ended under us
                return results, None, f"{type(exc).__name__}: {exc} / {getattr(exc, 'cause', None)}"

    results, final, error = asyncio.run(go())
    assert error is None, f"after {len(results)} questions: {error}"
    assert [r.status for r in results] == ["completed"] * 31, [(r.status, r.reason) for r in results][:3]
    assert final.questions == 31


BURST = 60
"""Asks sent at once by the burst tests, 1 MB each in the session's history."""


def test_a_burst_of_large_asks_does_not_end_the_session(settings, llm, context_store):
    """A session continues as new only between questions: asks sent back to
    back all land in one run's history, 1 MB each for questions of 60,000
    control characters. 14 at once were delivered to the worker in one task
    past gRPC's 4 MB (terminated: GrpcMessageTooLarge); 60 passed the history's
    50 MB (terminated: history size exceeds limit). Now asks past the budget are
    refused, to be sent again, and the session goes on. An ask held back
    (refused for now) may have been run all the same (CI counted 39 questions
    for 37 answers): sent again under its id, as our client does, it is
    answered from that run, and no question runs twice."""
    results, resent, ran_anyway, again, closed = _burst_then_resend(settings, llm, context_store)
    refused = [r for r in results if isinstance(r, WorkflowUpdateFailedError)]
    assert all("ask again once they are answered" in str(r.cause) for r in refused), refused[0].cause
    _assert_each_question_run_once(results, resent, ran_anyway, again, closed)


def test_held_back_asks_sent_again_under_their_ids_are_each_run_once(settings, llm, context_store):
    """The burst sent by a client whose own retries stop sooner (2), so that
    most asks are held back, as behind a slow session on CI. The server
    refuses some after handing them to the worker (another ask's refusal
    drops the run's pending updates; the worker's acceptance revives them):
    they run. Sent again under a new id, they ran twice (63 questions for 61
    asks); under their own id, as our client does, each runs once."""
    retry = RetryConfig(max_retries=2, max_elapsed_time_millis=3000)
    results, resent, ran_anyway, again, closed = _burst_then_resend(settings, llm, context_store, retry)
    assert resent, "no ask held back"
    _assert_each_question_run_once(results, resent, ran_anyway, again, closed)


def _burst_then_resend(settings, llm, context_store, retry: RetryConfig | None = None):
    """BURST asks at once (by a client with `retry`, if given), one more ask,
    then each held back sent again one at a time under its id, as `rlm
    session ask` does: (burst results, held back index -> result, those the
    session had run all the same, the one more answer, the session's summary)."""
    from cli._run_client import RunClient
    from cli._session_client import SessionClient
    from tests.session_harness import summary

    ctx = context_store.put_value("numbers: 3 4 5")
    llm.add_rule(asked("big", None), "FINAL(fine)", model=ROOT)
    s = isolated(settings)
    filler = "\x01" * 60_000  # 6 bytes each as JSON
    ids = [f"burst-{i}" for i in range(BURST)]

    def question(i: int) -> str:
        return f"big {i} {filler}"

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            handle = await start_session(client, s, session_request(ctx, continue_after_questions=5))
            sender = handle
            if retry is not None:
                impatient = await Client.connect(
                    s.temporal_address, namespace=s.temporal_namespace, data_converter=pydantic_data_converter, retry_config=retry
                )
                sender = impatient.get_workflow_handle(handle.id)
            asks = [asyncio.ensure_future(ask(sender, question(i), ask_id=ids[i])) for i in range(BURST)]
            results = await asyncio.wait_for(asyncio.gather(*asks, return_exceptions=True), 900)
            held = [i for i, r in enumerate(results) if isinstance(r, RPCError) and refused_for_now(r)]
            # Answered after every ask the session took before it (asks are
            # served in order), also those revived after their refusal.
            again = await asyncio.wait_for(ask(handle, f"big again {filler}"), TIMEOUT_S)
            # Those the session has a record of (run all the same) go first: the
            # others' fresh runs could push a record past its last 50 questions.
            recorded = {r.ask_id for r in (await summary(handle)).recent}
            sessions = SessionClient(RunClient(s, client, progress=None))
            resent = {}
            for i in sorted(held, key=lambda i: ids[i] not in recorded):
                resent[i] = await asyncio.wait_for(sessions.ask(handle.id, question(i), ask_id=ids[i]), TIMEOUT_S)
            ran_anyway = sorted(i for i in held if ids[i] in recorded)
            return results, resent, ran_anyway, again, await close(handle)

    return asyncio.run(go())


def _assert_each_question_run_once(results, resent, ran_anyway, again, closed) -> None:
    refused = [r for r in results if isinstance(r, WorkflowUpdateFailedError)]
    # Refused for now (the in-flight update payload limit, past the client's
    # own retries; or aborted as the server dropped its pending updates): the
    # CLI sends those again (activities/temporal_client.until_admitted). Such a
    # refusal can be the last reply to an ask the server had handed the worker
    # already, whose acceptance revives it (refused_for_now): it runs.
    held_back = [r for r in results if isinstance(r, RPCError) and refused_for_now(r)]
    answered = [r for r in results if isinstance(r, RunResult)]
    assert len(refused) + len(held_back) + len(answered) == BURST, [
        r for r in results if isinstance(r, BaseException) and r not in held_back
    ][:1]
    assert answered and all(r.status == "completed" for r in answered)
    assert all(r.status == "completed" for r in resent.values()), [(i, r.status, r.reason) for i, r in resent.items()]
    assert again.status == "completed"
    # Each ask answered by one question's run, and each question run once: the
    # held back asks the session had run already are answered from that run.
    runs = [r.workflow_id for r in [*answered, *resent.values(), again]]
    assert closed.questions == len(answered) + len(held_back) + 1, (closed.questions, len(answered), len(held_back), ran_anyway)
    assert sorted(runs) == sorted(f"{closed.session_id}/q{n}" for n in range(1, closed.questions + 1)), ran_anyway


def test_an_ask_sent_again_under_its_id_after_the_session_continued_as_new_is_not_run_again(settings, llm, context_store):
    """A caller that lost the reply to its ask (its process or connection
    died) sends it again under the same update id. Temporal answers that
    from the first within one run of the session only: once the session had
    continued as new, the question ran a second time (billed twice, and in
    `session_history` twice). Now it is refused, naming the run that answered."""
    from cli._run_client import RunClient
    from cli._session_client import SessionClient
    from tests.session_harness import summary
    from workflows.names import ASK_ANSWERED_ALREADY, UPDATE_ASK
    from workflows.session_models import AskRequest

    ctx = context_store.put_value("numbers: 3 4 5")
    llm.add_rule(asked("first", None), "FINAL(one)", model=ROOT, name="first")
    llm.add_rule(asked("second", None), repl("print('history holds', len(session_history))"), model=ROOT)
    llm.add_rule("history holds ", lambda r: f"FINAL({r.last_user_text.split('history holds ')[1].split()[0]})", model=ROOT)
    s = isolated(settings)
    first_ask = AskRequest(question="first?")

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            handle = await start_session(client, s, session_request(ctx, continue_after_questions=1))
            first = await asyncio.wait_for(
                handle.execute_update(UPDATE_ASK, first_ask, id="ask-first", result_type=RunResult), TIMEOUT_S
            )
            while (await summary(handle)).runs < 2:  # the session continued as new after its question
                await asyncio.sleep(0.1)  # polling for an observed fact, not a fixed wait
            try:
                again = await asyncio.wait_for(
                    handle.execute_update(UPDATE_ASK, first_ask, id="ask-first", result_type=RunResult), TIMEOUT_S
                )
            except WorkflowUpdateFailedError as exc:
                again = exc
            # Our client reads the answering run's result instead: the retry is transparent.
            sessions = SessionClient(RunClient(s, client, progress=None))
            by_client = await asyncio.wait_for(sessions.ask(handle.id, "first?", ask_id="ask-first"), TIMEOUT_S)
            second = await asyncio.wait_for(ask(handle, "second?"), TIMEOUT_S)
            return first, again, by_client, second, await close(handle)

    first, again, by_client, second, closed = asyncio.run(go())
    assert (first.status, first.answer) == ("completed", "one"), first.reason
    assert isinstance(again, WorkflowUpdateFailedError), again
    assert "was answered already, as question 1" in str(again.cause) and f"{closed.session_id}/q1" in str(again.cause)
    assert again.cause.type == ASK_ANSWERED_ALREADY and list(again.cause.details) == [f"{closed.session_id}/q1"]
    assert (by_client.answer, by_client.workflow_id) == ("one", f"{closed.session_id}/q1"), by_client
    assert llm.count("first") == first.turns  # no model call for it since
    assert second.answer == "1", second.reason  # session_history holds the first question once
    assert closed.questions == 2


def test_an_ask_id_reused_for_another_question_is_refused_not_answered_with_the_first(settings, llm, context_store):
    """An ask id is an idempotency key: sent again with *another* question
    (a script that reuses its key by mistake), Temporal would answer it with
    the first question's result within one run of the session, and the
    session's record would after it continued as new. Both are refused,
    naming the question the id was used for; nothing is asked twice."""
    from cli._run_client import RunClient, RunError
    from cli._session_client import SessionClient
    from tests.session_harness import summary

    ctx = context_store.put_value("numbers: 3 4 5")
    llm.add_rule(asked("first", None), "FINAL(one)", model=ROOT, name="first")
    llm.add_rule(asked("other", None), "FINAL(other)", model=ROOT, name="other")
    s = isolated(settings)
    # A templated question: the same 300 characters, then another vendor.
    template = "first? " + "Audit every invoice of the quarter against the purchase order. " * 5
    templated = template + "Vendor: Acme."

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            sessions = SessionClient(RunClient(s, client, progress=None))
            handle = await start_session(client, s, session_request(ctx, continue_after_questions=2))
            first = await asyncio.wait_for(sessions.ask(handle.id, "first?", ask_id="key-1"), TIMEOUT_S)
            with pytest.raises(RunError) as same_run:  # within the run: Temporal's dedup would answer it
                await asyncio.wait_for(sessions.ask(handle.id, "other: a different question", ask_id="key-1"), TIMEOUT_S)
            templ = await asyncio.wait_for(sessions.ask(handle.id, templated, ask_id="key-t"), TIMEOUT_S)
            again = await asyncio.wait_for(sessions.ask(handle.id, "first?", ask_id="key-1"), TIMEOUT_S)  # a true retry
            fill = await asyncio.wait_for(sessions.ask(handle.id, "other: to fill the run", ask_id="key-2"), TIMEOUT_S)
            while (await summary(handle)).runs < 2:  # the session continued as new
                await asyncio.sleep(0.1)  # polling for an observed fact, not a fixed wait
            with pytest.raises(RunError) as next_run:  # after it: the session's record refuses it
                await asyncio.wait_for(sessions.ask(handle.id, "other: a different question", ask_id="key-1"), TIMEOUT_S)
            # The same template for another vendor: differs only past the 200
            # characters the record keeps of the question.
            with pytest.raises(RunError) as templated_run:
                await asyncio.wait_for(sessions.ask(handle.id, template + "Vendor: Beta.", ask_id="key-t"), TIMEOUT_S)
            return first, again, fill, templ, same_run.value, next_run.value, templated_run.value, await summary(handle)

    first, again, fill, templ, same_run, next_run, templated_run, state = asyncio.run(go())
    assert first.answer == "one" and (again.answer, again.workflow_id) == ("one", first.workflow_id)
    for refused in (same_run, next_run):
        assert "ask id key-1 was used for another question (question 1: 'first?')" in str(refused), refused
    assert "ask id key-t was used for another question (question 2: 'first? Audit every" in str(templated_run)
    assert llm.count("first") == first.turns + templ.turns and llm.count("other") == fill.turns  # nothing asked twice
    assert state.questions == 3
