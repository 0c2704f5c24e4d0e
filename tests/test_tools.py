"""Custom tools: registered on the worker, named by the run, called from cell
code as Python functions; each call is a `tool_call` activity, capped by
`max_tool_calls`, answered from the run's record after a crash. Real worker,
Temporal dev server, S3 and WASM REPL; the model is the scripted server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

import pytest
from pydantic import ValidationError
from temporalio.api.enums.v1 import EventType

from activities._tool_threads import TOOL_THREADS
from activities._tools_registry import ToolRegistrationError, ToolRegistry
from tests import sample_tools
from tests.fixtures_llm import fake_registry
from tests.run_harness import (
    REPO,
    ROOT,
    SUB,
    completed_activities,
    isolated,
    repl,
    request,
    running_worker,
    start,
    start_worker_process,
)
from worker import connect
from workflows.request import RunRequest
from workflows.result import RunResult

TOOLS = "tests.sample_tools:TOOLS"


@pytest.fixture
def calls_file(tmp_path, monkeypatch):
    """Where the sample tools (in this process or a worker's) record their calls."""
    path = tmp_path / "tool-calls.jsonl"
    monkeypatch.setenv(sample_tools.CALLS_FILE_ENV, str(path))
    return str(path)


def with_tools(settings):
    return isolated(settings).model_copy(update={"tools": TOOLS})


def tool_request(question, ctx, tools, **kw):
    return request(question, ctx, **kw).model_copy(update={"tools": tools})


async def _summaries(handle, activity_type: str) -> list[str]:
    out = []
    async for event in handle.fetch_history_events():
        if (
            event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
            and event.activity_task_scheduled_event_attributes.activity_type.name == activity_type
        ):
            out.append(json.loads(event.user_metadata.summary.data))
    return out


def run_with_tools(s, llm, req):
    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            handle = await start(client, s, req)
            result = await asyncio.wait_for(handle.result(), 120)
            return result, await _summaries(handle, "tool_call")

    return asyncio.run(go())


# -- registration (no servers) ------------------------------------------------
def ledger_lookup_like(id: int) -> dict:
    """A documented tool with a JSON signature."""
    return {"id": id}


def test_registry_derives_a_json_schema_and_refuses_what_json_cannot_carry():
    registry = ToolRegistry.from_setting(TOOLS)
    assert registry.names() == ["audit_flag", "ledger_lookup", "vendor_registry"]
    spec = registry.get("vendor_registry").spec
    assert spec.signature == "(name: str, country: str = 'US') -> list[str]"
    assert spec.parameters["properties"]["name"]["type"] == "string"
    assert spec.parameters["required"] == ["name"]
    assert "Registered vendors" in spec.description
    assert registry.get("ledger_lookup").bind((3,), {}) == '{"id":3}'
    with pytest.raises(TypeError, match="ledger_lookup"):
        registry.get("ledger_lookup").bind(("three",), {})
    # Arguments and results are JSON of at most MAX_TOOL_JSON_BYTES.
    vendors = registry.get("vendor_registry")
    with pytest.raises(ValueError, match="arguments are 70,0.. bytes as JSON"):
        vendors.bind(("x" * 70_000,), {})
    with pytest.raises(ValueError, match=r"result of vendor_registry\(\) is .* bytes as JSON"):
        vendors.result_json(["x" * 70_000])
    with pytest.raises(ValueError, match="not JSON"):
        vendors.result_json([object()])

    def no_hint(x):
        """Doc."""

    def star(*ids: int) -> int:
        """Doc."""

    def no_doc(x: int) -> int:
        return x

    for fn, words in [(no_hint, "parameter 'x' has no type hint"), (star, r"'ids' is \*args"), (no_doc, "no docstring")]:
        with pytest.raises(ToolRegistrationError, match=words) as info:
            ToolRegistry.from_functions([fn])
        assert repr(fn.__name__) in str(info.value)
    # A name a cell already has: a tool `print` made every print a tool call.
    for name in ("print", "len", "document", "document_names"):
        with pytest.raises(ToolRegistrationError, match=f"tool '{name}': a cell already has '{name}'"):
            ToolRegistry.from_functions({name: ledger_lookup_like})
    with pytest.raises(ToolRegistrationError, match=r"tool 'takes_opaque': parameter 'thing' \(Opaque\) is not JSON"):
        ToolRegistry.from_setting("tests.sample_tools:BAD_TOOLS")


def test_worker_refuses_a_tool_whose_signature_is_not_json_at_start():
    proc = subprocess.run(
        [sys.executable, "worker.py", "--tools", "tests.sample_tools:BAD_TOOLS"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "takes_opaque" in proc.stderr and "not JSON" in proc.stderr


def test_request_names_a_bad_tool_name(context_store):
    ctx = context_store.put_value("x")
    for tools, words in [(["context"], "tools[0]"), (["ledger_lookup", "ledger_lookup"], "tools[1]"), (["a-b"], "tools[0]")]:
        with pytest.raises(ValidationError, match=words.replace("[", r"\[")):
            RunRequest.model_validate({**request("q?", ctx).model_dump(), "tools": tools})


# -- runs -------------------------------------------------------------------------
def test_tool_call_is_a_durable_step_and_the_model_sees_the_tools(settings, context_store, llm, calls_file):
    ctx = context_store.put_value("invoice 3 is disputed")
    # The cell overwrites the tool's name: it is restored after the cell, like llm_query.
    llm.add_rule(
        "Turn 1 of", repl('entry = ledger_lookup(3)\nprint(entry["vendor"], entry["amount"])\nledger_lookup = None'), model=ROOT
    )
    llm.add_rule(
        lambda r: "Acme 120.5" in r.last_user_text,
        repl('print(ledger_lookup(id=1)["vendor"], entry["id"], call_tool("vendor_registry", name="acme"))'),
        model=ROOT,
    )
    llm.add_rule(lambda r: "Globex 3 ['Acme']" in r.last_user_text, "FINAL(Acme)", model=ROOT, name="final")
    s = with_tools(settings)

    req = tool_request("Who is the vendor?", ctx, ["ledger_lookup", "vendor_registry"])
    result, summaries = run_with_tools(s, llm, req)
    assert result.status == "completed", result.reason
    assert result.answer == "Acme"
    assert result.spend.tool_calls == 3
    assert sample_tools.calls(calls_file) == [
        {"tool": "ledger_lookup", "args": {"id": 3}},
        {"tool": "ledger_lookup", "args": {"id": 1}},
        {"tool": "vendor_registry", "args": {"name": "acme", "country": "US"}},
    ]
    assert summaries == [
        'tool ledger_lookup · {"id":3}', 'tool ledger_lookup · {"id":1}', 'tool vendor_registry · {"name":"acme"}'
    ]
    system = llm.requests(ROOT)[0].messages[0]["content"]
    assert "ledger_lookup(id: int) -> dict" in system and "Look up a ledger entry" in system
    assert "audit_flag" not in system  # registered, but not this run's
    turn2 = [r for r in llm.requests(ROOT) if "Acme 120.5" in r.last_user_text][0].last_user_text
    assert "your code reassigned ledger_lookup; the REPL restored" in turn2


def test_unknown_and_disallowed_tools_give_error_strings(settings, context_store, llm, calls_file):
    ctx = context_store.put_value("x")
    llm.add_rule(
        "Turn 1 of",
        repl('print("A:", call_tool("no_such_tool", 1))\nprint("B:", call_tool("vendor_registry", name="Acme"))'),
        model=ROOT,
    )
    llm.add_rule(lambda r: "A: Error" in r.last_user_text, "FINAL(done)", model=ROOT, name="final")
    s = with_tools(settings)

    result, summaries = run_with_tools(s, llm, tool_request("q?", ctx, ["ledger_lookup"]))
    assert result.status == "completed", result.reason
    shown = [r for r in llm.requests(ROOT) if r.matched_rule and r.matched_rule.name == "final"][0].last_user_text
    assert "A: Error: 'no_such_tool' is not a tool of this run; its tools: ledger_lookup" in shown
    assert "B: Error: 'vendor_registry' is not allowed in this run" in shown
    assert summaries == [] and sample_tools.calls(calls_file) == []


def test_run_naming_an_unregistered_tool_fails_at_once(settings, context_store, llm):
    ctx = context_store.put_value("x")
    s = with_tools(settings)

    result, _ = run_with_tools(s, llm, tool_request("q?", ctx, ["ledger_lookup", "wire_money"]))
    assert result.status == "failed"
    assert "tools[1]" in result.reason and "wire_money" in result.reason
    assert result.turns == 0 and llm.requests() == []


def test_a_raising_tool_raises_tool_error_in_the_guest(settings, context_store, llm, calls_file):
    ctx = context_store.put_value("x")
    llm.add_rule(
        "Turn 1 of",
        repl(
            'try:\n    audit_flag(3, "duplicate")\nexcept ToolError as e:\n    print("caught", type(e).__name__, e)\n'
            "print(isinstance(ToolError('x'), HostCallError))"
        ),
        model=ROOT,
    )
    llm.add_rule(lambda r: "caught ToolError" in r.last_user_text, "FINAL(down)", model=ROOT, name="final")
    s = with_tools(settings)

    result, summaries = run_with_tools(s, llm, tool_request("q?", ctx, ["audit_flag"]))
    assert result.status == "completed", result.reason
    shown = [r for r in llm.requests(ROOT) if r.matched_rule and r.matched_rule.name == "final"][0].last_user_text
    assert "caught ToolError audit_flag(): RuntimeError: audit service unavailable, entry 3 not flagged" in shown
    assert "True" in shown
    # The tool's own exception is its answer: it was called once, not retried.
    assert len(sample_tools.calls(calls_file)) == 1 and len(summaries) == 1


def test_a_hung_tool_is_answered_at_its_timeout_and_keeps_to_its_own_threads(settings, context_store, llm, calls_file):
    """A sync tool that never returns: each call is answered with a
    TimeoutError at its timeout and not called again; once every tool thread
    holds a hung call, the next fails at once; the worker's other work goes
    on. On the worker's storage threads, 64 hung calls failed every run of
    the worker, and each timed-out call was retried (run again) twice."""
    code = (
        "seen = []\n"
        f"for i in range({TOOL_THREADS + 2}):\n"
        "    try:\n        hung_export(i)\n"
        "    except ToolError as e:\n        seen.append(str(e).split(':')[1].strip())\n"
        "print('SEEN', seen)"
    )
    llm.add_rule("Turn 1 of", repl(code), model=ROOT)
    llm.add_rule(lambda r: "SEEN" in r.last_user_text, "FINAL(done)", model=ROOT, name="final")
    llm.add_rule("second run", repl("print('still serving')"), model=ROOT)
    llm.add_rule("still serving", "FINAL(served)", model=ROOT)
    s = isolated(settings).model_copy(update={"tools": "tests.sample_tools:HUNG_TOOLS"})
    hung = tool_request("q?", context_store.put_value("x"), ["hung_export"], limits={"tool_call_timeout_s": 1, "cell_timeout_s": 120})

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            try:
                first = await asyncio.wait_for((await start(client, s, hung)).result(), 180)
                # Every tool thread still holds a hung call here.
                second = await asyncio.wait_for((await start(client, s, request("second run", context_store.put_value("y")))).result(), 60)
            finally:
                sample_tools.HUNG_RELEASE.set()
            return first, second

    first, second = asyncio.run(go())
    assert first.status == "completed" and second.status == "completed" and second.answer == "served", (first, second)
    shown = [r for r in llm.requests(ROOT) if r.matched_rule and r.matched_rule.name == "final"][0].last_user_text
    assert f"SEEN {['TimeoutError'] * TOOL_THREADS + ['ToolThreadsBusy'] * 2}" in shown, shown[-800:]
    assert len(sample_tools.calls(calls_file, "hung_export")) == TOOL_THREADS  # each once: none retried


def test_a_tool_error_naming_a_file_that_is_not_utf8_is_its_answer(settings, context_store, llm, calls_file):
    # The surrogate in its message failed the record's write: the activity failed and the tool ran three times.
    llm.add_rule("Turn 1 of", repl("try:\n    archive_path(7)\nexcept ToolError as e:\n    print('caught', e)"), model=ROOT)
    llm.add_rule(lambda r: "caught" in r.last_user_text, "FINAL(done)", model=ROOT, name="final")
    s = isolated(settings).model_copy(update={"tools": "tests.sample_tools:HUNG_TOOLS"})
    result, _ = run_with_tools(s, llm, tool_request("q?", context_store.put_value("x"), ["archive_path"]))
    assert result.status == "completed", result.reason
    shown = [r for r in llm.requests(ROOT) if r.matched_rule and r.matched_rule.name == "final"][0].last_user_text
    assert "caught archive_path(): LookupError: no file /archive/caf\ufffd-7.pdf" in shown, shown[-500:]
    assert len(sample_tools.calls(calls_file, "archive_path")) == 1


def test_max_tool_calls_refuses_before_calling(settings, context_store, llm, calls_file):
    ctx = context_store.put_value("x")
    llm.add_rule("Turn 1 of", repl("for i in (1, 3, 1):\n    print(ledger_lookup(i))"), model=ROOT)
    llm.add_rule(lambda r: "Budget" in r.last_user_text, "FINAL(capped)", model=ROOT, name="final")
    s = with_tools(settings)

    result, summaries = run_with_tools(s, llm, tool_request("q?", ctx, ["ledger_lookup"], caps={"max_tool_calls": 2}))
    assert result.status == "completed", result.reason
    shown = [r for r in llm.requests(ROOT) if r.matched_rule and r.matched_rule.name == "final"][0].last_user_text
    assert "Globex" in shown and "Acme" in shown
    assert "Budget refused (tool calls cap): 2 of the limit of 2 tool calls" in shown
    assert len(sample_tools.calls(calls_file)) == 2 and len(summaries) == 2
    assert result.spend.tool_calls == 2


def test_worker_killed_after_a_tool_call_does_not_call_it_again(settings, context_store, llm, calls_file, tmp_path):
    ctx = context_store.put_value("x")
    held = __import__("threading").Event()
    llm.add_rule(
        "Turn 1 of", repl('e = ledger_lookup(3)\nprint(llm_query("vendor is " + e["vendor"]))'), model=ROOT, name="turn1"
    )
    llm.add_rule("vendor is Acme", "ACME-OK", model=SUB, name="held", hold=held)
    llm.add_rule(lambda r: "ACME-OK" in r.last_user_text, "FINAL(Acme)", model=ROOT, name="final")
    s = with_tools(settings)
    log_path = tmp_path / "workers.log"
    first = start_worker_process(s, llm.url, log_path)
    second = None
    try:

        async def until_killed():
            client = await connect(s)
            handle = await start(client, s, tool_request("vendor?", ctx, ["ledger_lookup"]))
            await asyncio.to_thread(llm.wait_for_count, 1, "held", 90.0)
            assert completed_activities(await handle.fetch_history(), "tool_call") == 1
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(10)
            return handle.id

        workflow_id = asyncio.run(until_killed())
        held.set()
        second = start_worker_process(s, llm.url, log_path)

        async def finish():
            client = await connect(s)
            handle = client.get_workflow_handle(workflow_id, result_type=RunResult)
            return await asyncio.wait_for(handle.result(), 120), await handle.fetch_history()

        result, history = asyncio.run(finish())
    finally:
        held.set()
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(20)
    assert result.status == "completed", (result.reason, log_path.read_text()[-3000:])
    assert result.answer == "Acme"
    assert sample_tools.calls(calls_file) == [{"tool": "ledger_lookup", "args": {"id": 3}}]
    assert completed_activities(history, "tool_call") == 1
    assert llm.count("turn1") == 1


def test_ledger_caps_tool_calls_for_the_whole_tree():
    from datetime import datetime, timezone

    from workflows.budget import Caps, Ledger, Spend

    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    ledger = Ledger.root(Caps(max_tool_calls=5, max_calls=10), now)
    assert ledger.reserve_tool_call("c1:tool:a", now) is None
    assert ledger.reserve_tool_call("c1:tool:a", now) is None  # idempotent: still one held
    assert ledger.reserved().tool_calls == 1
    ledger.settle("c1:tool:a", Spend(tool_calls=1))
    # A child gets a slice of what remains (4 of 5, half each for two siblings).
    grant = ledger.child_grant("child-1", now, share=0.5)
    assert grant.max_tool_calls == 2
    ledger.child_settle("child-1", Spend(calls=1, tool_calls=2))
    assert ledger.spent().tool_calls == 3
    assert ledger.reserve_tool_call("c2:tool:b", now) is None
    assert ledger.reserve_tool_call("c2:tool:c", now) is None
    refusal = ledger.reserve_tool_call("c2:tool:d", now)
    assert refusal is not None and refusal.cap == "tool_calls"
    assert "tool calls cap" in refusal.message
    # Tool calls are not model calls: the run itself is not exhausted.
    assert ledger.exhausted(now) is None
    # With no tool cap, a child's slice is unlimited too.
    assert Ledger.root(Caps(), now).child_grant("c", now).max_tool_calls is None


def test_rlm_run_flags_name_tools_and_caps():
    import argparse

    from cli.run_commands import _options, _run_arguments

    parser = argparse.ArgumentParser()
    _run_arguments(parser)
    args = parser.parse_args(
        ["q?", "--context", "f.txt", "--tool", "ledger_lookup", "--tool", "vendor_registry",
         "--max-tool-calls", "7", "--max-errors", "3"]
    )  # fmt: skip
    options = _options(args)
    assert options.tools == ["ledger_lookup", "vendor_registry"]
    assert options.caps["max_tool_calls"] == 7 and options.caps["max_errors"] == 3


def test_embedded_worker_gets_the_tools_setting(tmp_path):
    """`rlm up` / `rlm run` start their worker with the settings as RLM_*
    variables: RLM_TOOLS reaches it, and changing it restarts it (identity)."""
    from cli._worker_service import identity
    from tests.fixtures_services import isolated_settings

    plain = isolated_settings(tmp_path)
    with_tools_ = plain.model_copy(update={"tools": TOOLS})
    assert with_tools_.to_env()["RLM_TOOLS"] == TOOLS
    assert identity(plain, {}) != identity(with_tools_, {})


def test_child_runs_get_the_tools_under_the_tree_wide_cap(settings, context_store, llm, calls_file):
    import re

    def question(r):
        m = re.search(r"Question: (\S+)", r.all_text)
        return m.group(1) if m else ""

    ctx = context_store.put_value("x")
    llm.add_rule(
        lambda r: question(r) == "top" and "Turn 1 of" in r.last_user_text,
        repl('print("child says", rlm_query("Cq", context="c"), ledger_lookup(3)["vendor"])'),
        model=ROOT,
    )
    llm.add_rule(lambda r: question(r) == "Cq", repl('FINAL(ledger_lookup(1)["vendor"])'), model=ROOT)
    llm.add_rule(lambda r: "child says Globex Acme" in r.last_user_text, "FINAL(ok)", model=ROOT, name="final")
    s = with_tools(settings)

    req = tool_request("top", ctx, ["ledger_lookup"], caps={"max_depth": 1, "max_tool_calls": 2})
    result, summaries = run_with_tools(s, llm, req)
    assert result.status == "completed", result.reason
    assert result.spend.tool_calls == 2  # the child's call is counted in the tree's spend
    assert [c["args"] for c in sample_tools.calls(calls_file)] == [{"id": 1}, {"id": 3}]
    assert summaries == ['tool ledger_lookup · {"id":3}']  # the parent's own; the child's is in its history
