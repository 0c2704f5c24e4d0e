"""An id sent again (cli/_taken_id.py): when a request is the same as the
one holding the id, and what the refusal names (pure logic); and a run that
continued as new, through the real servers."""

from __future__ import annotations

import asyncio

from activities.context_store import ContextStore
from cli._taken_id import differences, status_word, taken_message
from tests.fixtures_llm import fake_registry
from tests.run_harness import ROOT, SUB, isolated, put_context, repl, request, running_worker


def test_the_same_request_is_the_same_whatever_the_json_left_out():
    ours = request("How long is it?", "some text")
    assert differences(ours.model_dump(mode="json"), ours) == []
    # A holder started by an older client or another language leaves defaults out.
    sparse = {k: v for k, v in ours.model_dump(mode="json").items() if v is not None}
    assert differences(sparse, ours) == []


def test_what_differs_is_named_and_anything_unreadable_is_another_request():
    ours = request("How long is it?", "some text")
    theirs = request("How short is it?", "some text", caps={"max_usd": 3}).model_dump(mode="json")
    assert differences(theirs, ours) == ["caps", "question"]
    assert differences({"not": "a run request"}, ours) == ["request"]
    assert differences(None, ours) == ["request"]
    message = taken_message("audit-7", "ended", ["caps", "question"])
    assert message.startswith("run id audit-7 is taken by a run (ended) that differs in caps, question: use another --id")
    assert "session" in taken_message("s-1", "running", ["tools"], what="session") and "rlm result" not in taken_message(
        "s-1", "running", ["tools"], what="session"
    )


def test_a_workflow_status_reads_running_or_ended():
    assert [status_word(s) for s in ("WORKFLOW_EXECUTION_STATUS_RUNNING", "RUNNING", "CONTINUED_AS_NEW")] == ["running"] * 3
    assert {status_word(s) for s in ("WORKFLOW_EXECUTION_STATUS_COMPLETED", "TERMINATED", "")} == {"ended"}


def test_an_id_held_by_the_other_kind_says_so():
    assert taken_message("x-1", "running", ["workflow type"], holder="session") == (
        "run id x-1 is taken by a session (running): use another --id"
    )
    assert taken_message("x-2", "ended", ["workflow type"], what="session", holder="run") == (
        "session id x-2 is taken by a run (ended): use another --id"
    )


def test_a_run_that_continued_as_new_is_the_same_run_when_sent_again(settings, object_store, llm):
    """Its latest run's input carries the chain's state (`resume`), so the
    request is compared with the first run's, over the SDK and the HTTP API."""
    from cli._run_client import RunClient
    from cli._temporal_http import TemporalHttp

    llm.add_rule("Turn 1 of", repl("print(llm_query('one'))"), model=ROOT)
    llm.add_rule("Turn 2 of", repl("print(llm_query('two'))"), model=ROOT)
    llm.add_rule("Turn 3 of", "FINAL(done)", model=ROOT)
    llm.add_rule(None, lambda r: r.last_user_text.upper(), model=SUB)
    s = isolated(settings)
    req = request("q", put_context(ContextStore(object_store), "abc"), limits={"continue_after_updates": 1})

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            runner = RunClient(s, client, progress=None)
            workflow_id = "can-again-" + s.task_queue
            assert await runner.start(req, workflow_id) is None
            result = await asyncio.wait_for(client.get_workflow_handle(workflow_id).result(), 120)
            over_http = RunClient(s, None, progress=None, http=TemporalHttp(s))
            return result, await runner.start(req, workflow_id), await over_http.start(req, workflow_id)

    result, by_sdk, by_http = asyncio.run(go())
    assert result["status"] == "completed"  # read without a result type: plain JSON
    assert (by_sdk, by_http) == ("ended", "ended")
