"""Input that a caller, a model or guest code can produce never leaves a run
hanging: a request that does not parse fails the run with its field errors,
a bad `set_caps` is refused by the validator, an empty or oversized sub-call
question is an error string, and anything else that goes wrong inside
workflow code ends the run as `failed` with a reason. Real worker, Temporal,
S3 and WASM; models scripted through litellm."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import threading
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from temporalio.client import WorkflowFailureError, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError

from tests.fixtures_llm import fake_registry
from tests.run_harness import ROOT, SUB, isolated, repl, request, run, running_worker, start
from workflows.names import UPDATE_SET_CAPS, WORKFLOW_RLM_RUN


REPO = Path(__file__).resolve().parent.parent


def _question(r) -> str:
    m = re.search(r"Question: (\S+)", r.all_text)
    return m.group(1) if m else ""


async def _failure(client, s, payload) -> ApplicationError:
    """Start RLMRun by type name with a plain JSON value, as another service
    would, and return the failure it ended with."""
    handle = await start(client, s, payload)
    with pytest.raises(WorkflowFailureError) as failed:
        await asyncio.wait_for(handle.result(), 60)
    cause = failed.value.cause
    assert isinstance(cause, ApplicationError), cause
    return cause


def test_requests_that_do_not_parse_fail_with_their_field_errors(settings, context_store, llm):
    ctx = context_store.put_value("abc").model_dump(mode="json")
    good = {"question": "q?", "context": ctx, "models": {"root": ROOT}}
    cases = {
        "context is a list of numbers": ({**good, "context": [1, 2]}, ["context.texts.0:"]),
        "context URI is not s3://": ({**good, "context": {"uri": "https://example.com/a.txt"}}, ["context.uri.uri:"]),
        "context of no known shape": ({**good, "context": 42}, ["context:"]),
        "no turn to answer in": ({**good, "caps": {"max_turns": 0}}, ["caps:", "max_turns"]),
        "blank question and negative caps": (
            {**good, "question": "  ", "caps": {"max_usd": -1, "max_concurrency": 0}},
            ["question:", "caps.max_usd:", "caps.max_concurrency:"],
        ),
        "not an object": (["just", "a", "list"], ["(input):"]),
        "missing fields": ({"question": "q?"}, ["context:", "models:"]),
        "question too long": ({**good, "question": "x" * 70_000}, ["question:"]),
        "output cap past the payload bound": ({**good, "limits": {"output_chars": 10_000_000}}, ["limits.output_chars:"]),
    }
    s = isolated(settings)

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            return {name: await _failure(client, s, payload) for name, (payload, _) in cases.items()}

    failures = asyncio.run(go())
    for name, (_, fields) in cases.items():
        failure = failures[name]
        assert failure.type == "InvalidRunRequest", (name, failure)
        assert failure.message.startswith("invalid RunRequest: "), (name, failure.message)
        for field in fields:
            assert field in failure.message, (name, field, failure.message)
    assert llm.count() == 0


def test_request_from_the_temporal_cli_fails_instead_of_hanging(settings, context_store, llm):
    """A request that does not parse (`context` a list of numbers; a list of
    texts is a valid context since issue 12), started with the Temporal CLI:
    `workflow execute` returns with the reason."""
    s = isolated(settings)
    payload = {"question": "q?", "context": [1, 2], "models": {"root": ROOT}}

    async def go():
        async with running_worker(s, fake_registry(llm)):
            return await asyncio.to_thread(
                subprocess.run,
                [
                    str(REPO / ".venv" / "bin" / "temporal"), "workflow", "execute",
                    "--address", s.temporal_address, "--namespace", s.temporal_namespace,
                    "--type", WORKFLOW_RLM_RUN, "--task-queue", s.task_queue,
                    "--workflow-id", f"cli-{uuid.uuid4().hex[:8]}", "--input", json.dumps(payload),
                ],
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip

    done = asyncio.run(go())
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    assert "invalid RunRequest" in out and "context" in out, out


def test_anything_else_that_goes_wrong_in_workflow_code_ends_the_run_failed(settings, context_store, llm):
    """A value no validator catches (continue-as-new state from a caller, with
    a negative turn number) fails inside the turn loop, where the next turn's
    message is built: the run ends `failed` with the reason."""
    ctx = context_store.put_value("abc").model_dump(mode="json")
    ledger = {"caps": {}, "started_at": "2026-01-01T00:00:00Z"}
    resume = {
        "turn": -5, "cells": 0, "snapshot_key": None, "transcript_key": None,
        "pending": [{"role": "user", "content": "go on"}],
        "prompt_tokens": 0, "usage": {}, "ledger": ledger, "children": [],
    }  # fmt: skip
    payload = {"question": "q?", "context": ctx, "models": {"root": ROOT}, "resume": resume}
    llm.add_rule(None, "Let me think.", model=ROOT, name="root")
    s = isolated(settings)

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            return await asyncio.wait_for((await start(client, s, payload)).result(), 60)

    result = asyncio.run(go())
    assert result.status == "failed"
    assert result.reason.startswith("internal error: ValueError: turn -3 of 20"), result.reason


def test_set_caps_with_a_value_its_model_rejects_is_refused_and_the_run_goes_on(settings, context_store, llm):
    ctx = context_store.put_value("abc")
    release = threading.Event()
    llm.add_rule("Turn 1 of", repl("print(llm_query('wait'))"), model=ROOT)
    llm.add_rule("Turn 2 of", "FINAL(finished)", model=ROOT)
    llm.add_rule(None, "ok", model=SUB, name="held", hold=release)
    s = isolated(settings)

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            handle = await start(client, s, request("q", ctx))
            await asyncio.to_thread(llm.wait_for_count, 1, "held", 60)
            refusals = []
            for changes in ({"max_usd": -1}, {"max_turns": "many"}, {"max_depth": -2, "max_calls": -1}):
                with pytest.raises(WorkflowUpdateFailedError) as refused:
                    await handle.execute_update(UPDATE_SET_CAPS, changes)
                refusals.append(str(refused.value.cause))
            caps = await handle.execute_update(UPDATE_SET_CAPS, {"max_calls": 10})
            release.set()
            return refusals, caps, await asyncio.wait_for(handle.result(), 60)

    try:
        refusals, caps, result = asyncio.run(go())
    finally:
        release.set()
    assert "caps refused: max_usd:" in refusals[0]
    assert "max_turns:" in refusals[1]
    assert "max_depth:" in refusals[2] and "max_calls:" in refusals[2]
    assert caps["max_calls"] == 10 and caps["max_usd"] is None
    assert result.status == "completed" and result.answer == "finished"


def test_empty_and_oversized_questions_are_error_strings_and_children_wait_no_longer_than_the_deadline(
    settings, context_store, llm
):
    ctx = context_store.put_value("abc")
    code = """
answers = {
    "empty": rlm_query(""),
    "long": rlm_query("x" * 70_000),
    "blank_prompt": llm_query("   "),
    "batch": rlm_query_batched(["", "fine?"], contexts=["c1", "c2"]),
}
for name, value in answers.items():
    print(name, "=>", value)
"""
    llm.add_rule(lambda r: _question(r) == "top" and "Turn 1 of" in r.last_user_text, repl(code), model=ROOT)
    llm.add_rule(lambda r: _question(r) == "top" and "=>" in r.last_user_text, "FINAL(done)", model=ROOT, name="saw")
    llm.add_rule(lambda r: _question(r) == "fine?", repl("FINAL('yes ' + context)"), model=ROOT, name="child")
    s = isolated(settings)

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            result = await run(client, s, request("top", ctx, caps={"max_depth": 1, "max_wall_s": 600}))
            [child] = result.children
            desc = await client.get_workflow_handle(child.workflow_id).describe()
            timeout = desc.raw_description.execution_config.workflow_execution_timeout.ToTimedelta()
            return result, timeout

    result, child_timeout = asyncio.run(go())
    assert result.status == "completed", result.reason
    shown = [r for r in llm.requests(ROOT) if r.matched_rule.name == "saw"][0].last_user_text
    assert "empty => Error: the rlm_query question is empty" in shown
    assert "long => Error: the rlm_query question has 70,000 characters, at most 65,536" in shown
    assert "blank_prompt => Error: the llm_query prompt is empty" in shown
    assert "batch => ['Error: the rlm_query question is empty; ask something', 'yes c2']" in shown
    assert llm.count("child") == 1 and len(result.children) == 1 and result.runs_below == 1
    assert llm.requests(SUB) == []
    # The parent waits for its child no longer than the tree's wall time allows.
    assert timedelta(seconds=1) <= child_timeout <= timedelta(seconds=600 + 300)
