"""Cancelling a session (its `cancel` signal, or Temporal's cancel: the UI's
Cancel) stops the question it is answering, whenever the cancel lands, and
answers that question's ask `cancelled`. Real worker, Temporal, S3 and WASM;
models scripted through litellm."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator

import pytest
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import CancelledError
from temporalio.service import RPCError, RPCStatusCode

from activities.temporal_client import connect
from tests.fixtures_llm import fake_registry
from tests.run_harness import ROOT, isolated, repl, running_worker
from tests.session_harness import TIMEOUT_S, ask, asked, session_request, start_session
from tests.session_start_race import QuestionStartOutlastsCancel
from worker import build_worker
from workflows.names import SIGNAL_CANCEL
from workflows.result import RunResult


def test_a_session_cancelled_by_temporal_answers_the_question_it_was_answering(settings, llm, context_store):
    """A Temporal cancel of a session (the UI's Cancel) while it answers a
    question: as the `cancel` signal does, the question's run is cancelled
    and the ask answered `cancelled`; then the session ends cancelled. The
    session ended at once: the ask failed (the workflow completed before
    the update) and the question's run went on until Temporal cancelled it."""
    held = threading.Event()
    rule = llm.add_rule(asked("first"), repl("print(1)"), model=ROOT, hold=held)
    s = isolated(settings)

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            handle = await start_session(client, s, session_request(context_store.put_value("abc")))
            one = asyncio.ensure_future(ask(handle, "first?"))
            await asyncio.to_thread(llm.wait_for_count, 1, rule, TIMEOUT_S)
            await handle.cancel()
            first = await asyncio.wait_for(one, TIMEOUT_S)
            with pytest.raises(WorkflowFailureError) as ended:
                await asyncio.wait_for(handle.result(), TIMEOUT_S)
            return first, ended.value

    try:
        first, ended = asyncio.run(go())
    finally:
        held.set()
    assert first.status == "cancelled" and first.workflow_id.endswith("/q1"), first
    assert isinstance(ended.cause, CancelledError), ended.cause



@contextlib.asynccontextmanager
async def _question_starts_outlast_cancels(s, llm) -> AsyncIterator[Client]:
    """A real worker whose sessions get their question's run only once their
    cancel came (tests/session_start_race.py)."""
    client = await connect(s)
    worker, pool = build_worker(client, s, models=fake_registry(llm), interceptors=[QuestionStartOutlastsCancel()])
    try:
        async with worker:
            yield client
    finally:
        pool.close()

def test_a_session_cancelled_while_its_question_run_starts_cancels_that_run(settings, llm, context_store):
    """A cancel that lands while the question's run is being started finds
    no run to signal (an interceptor makes that window last until the cancel
    came): the run is cancelled once started, and the ask answered
    `cancelled`. It ran to its end, paid, while the session waited for it."""
    held = threading.Event()
    rule = llm.add_rule(asked("first"), repl("print(1)"), model=ROOT, hold=held)
    s = isolated(settings)

    async def go():
        async with _question_starts_outlast_cancels(s, llm) as client:
            handle = await start_session(client, s, session_request(context_store.put_value("abc")))
            one = asyncio.ensure_future(ask(handle, "first?"))
            await asyncio.to_thread(llm.wait_for_count, 1, rule, TIMEOUT_S)
            await handle.signal(SIGNAL_CANCEL, "user stop")
            # Its held model call is closed: the run was cancelled, not left to finish.
            await asyncio.to_thread(llm.wait_abandoned, 1, 60)
            return await asyncio.wait_for(one, TIMEOUT_S)

    try:
        first = asyncio.run(go())
    finally:
        held.set()
    assert first.status == "cancelled" and first.reason == "user stop", first


def test_a_session_cancelled_while_a_question_run_starts_that_ends_at_once_answers_its_ask(settings, llm, context_store):
    """As above, but the question's run ended before the session's cancel
    could reach it (here its budget is too small to start: it ends in its
    first step). Nothing is left to cancel: the ask is answered with that
    run's result. It failed: the undeliverable cancel was raised to the ask."""
    s = isolated(settings)

    async def go():
        async with _question_starts_outlast_cancels(s, llm) as client:
            handle = await start_session(client, s, session_request(context_store.put_value("abc")))
            one = asyncio.ensure_future(ask(handle, "first?", max_tokens=10))
            run = client.get_workflow_handle(f"{handle.id}/q1", result_type=RunResult)
            ended = await asyncio.wait_for(_once_it_exists(run.result), TIMEOUT_S)
            await handle.signal(SIGNAL_CANCEL, "user stop")
            return ended, await asyncio.wait_for(one, TIMEOUT_S)

    ended, first = asyncio.run(go())
    assert ended.status == "budget_exhausted", ended
    assert first == ended
    assert llm.count() == 0


async def _once_it_exists(call):
    """`call()` again while the workflow it reads has not been started yet."""
    while True:
        try:
            return await call()
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:
                raise
        await asyncio.sleep(0.2)  # polling for an observed fact (the run exists), not a fixed wait


def test_a_close_that_a_temporal_cancel_overtakes_returns_the_summary(settings, llm, context_store):
    """`rlm session close` waits for the question being answered; a Temporal
    cancel (the UI's Cancel) landing meanwhile cancels that question and
    ends the session cancelled. The close still returns the session's
    summary (its update did); it said "ended without a summary". A close
    sent after such an end says the session was cancelled."""
    from cli._run_client import RunError

    held = threading.Event()
    rule = llm.add_rule(asked("first"), repl("print(1)"), model=ROOT, hold=held)
    s = isolated(settings)

    async def go():
        async with _a_session_and_its_client(s, llm, context_store) as (handle, sessions):
            one, closing = await _asked_and_closing(handle, sessions, lambda: ask(handle, "first?"), llm, rule)
            await handle.cancel()
            first = await asyncio.wait_for(one, TIMEOUT_S)
            closed = await asyncio.wait_for(closing, TIMEOUT_S)
            with pytest.raises(RunError) as again:
                await sessions.close(handle.id)
            return first, closed, again.value

    try:
        first, closed, again = asyncio.run(go())
    finally:
        held.set()
    assert first.status == "cancelled", first
    assert closed.state == "closed" and closed.questions == 1, closed
    assert "was cancelled" in str(again), again


def test_an_ask_and_a_close_cut_off_by_a_terminate_say_the_session_was_terminated(settings, llm, context_store):
    """An ask answering and a close waiting for it when the session is
    terminated (`temporal workflow terminate`, or the server past a limit):
    our client says the session was terminated and why, as it does for an
    ask sent after that end (it said "the Workflow completed before the
    Update completed")."""
    from cli._run_client import RunError

    held = threading.Event()
    rule = llm.add_rule(asked("first"), repl("print(1)"), model=ROOT, hold=held)
    s = isolated(settings)

    async def go():
        async with _a_session_and_its_client(s, llm, context_store) as (handle, sessions):
            one, closing = await _asked_and_closing(handle, sessions, lambda: sessions.ask(handle.id, "first?"), llm, rule)
            await handle.terminate(reason="operator stop")
            errors = []
            for waiting in (one, closing):
                with pytest.raises(RunError) as cut:
                    await asyncio.wait_for(waiting, TIMEOUT_S)
                errors.append(str(cut.value))
            return errors

    try:
        asked_error, close_error = asyncio.run(go())
    finally:
        held.set()
    assert "terminated: operator stop" in asked_error, asked_error
    assert "terminated: operator stop" in close_error, close_error


@contextlib.asynccontextmanager
async def _a_session_and_its_client(s, llm, context_store):
    """A real worker and a session on it: (its handle, our SessionClient)."""
    from cli._run_client import RunClient
    from cli._session_client import SessionClient

    async with running_worker(s, fake_registry(llm)) as client:
        handle = await start_session(client, s, session_request(context_store.put_value("abc")))
        yield handle, SessionClient(RunClient(s, client, progress=None))


async def _asked_and_closing(handle, sessions, asking, llm, rule):
    """A question asked (its model call held by `rule`) and a close accepted
    behind it: (the ask, the close) as tasks."""
    from tests.session_harness import summary

    one = asyncio.ensure_future(asking())
    await asyncio.to_thread(llm.wait_for_count, 1, rule, TIMEOUT_S)
    closing = asyncio.ensure_future(sessions.close(handle.id))
    while (await summary(handle)).state != "closed":  # the close was accepted
        await asyncio.sleep(0.05)  # polling for an observed fact, not a fixed wait
    return one, closing
