"""A run started by workflow type `RLMRun` with JSON alone, as a service in
another language would: through the `temporal` CLI and through plain HTTP
against the Temporal server's HTTP API, with the context as inline text, a
list of texts or an `s3://` URI (ingested by the run's first step into the
chunked store). Bad contexts end the run with the field named. The published
JSON Schema (workflows/schemas/run.schema.json) matches the models.

Real worker, Temporal dev server, S3 server and WASM; models scripted
through litellm."""

from __future__ import annotations

import asyncio
import json
import subprocess
import urllib.request
import uuid
from pathlib import Path

import pytest
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import ApplicationError

from cli.schema_commands import SCHEMA_FILE, schema_text
from tests.fixtures_llm import fake_registry
from tests.run_harness import ROOT, SUB, isolated, repl, running_worker, start
from workflows.names import WORKFLOW_RLM_RUN
from workflows.context_input import MAX_INLINE_CONTEXT_BYTES
from workflows.result import RunResult

REPO = Path(__file__).resolve().parent.parent
TEMPORAL = str(REPO / ".venv" / "bin" / "temporal")


def _answer_with_context(llm) -> None:
    """The root model answers with the context it finds in the REPL."""
    code = "FINAL('DOCS=' + ' | '.join(context) if isinstance(context, list) else 'TEXT=' + context.strip())"
    llm.add_rule(None, repl(code), model=ROOT, name="root")


def _temporal(s, *args: str) -> subprocess.CompletedProcess:
    argv = [TEMPORAL, *args, "--address", s.temporal_address, "--namespace", s.temporal_namespace]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def _http(s, method: str, path: str, body: dict | None = None) -> dict:
    url = f"http://{s.temporal_host}:{s.temporal_http_port}/api/v1/namespaces/{s.temporal_namespace}{path}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=90) as response:
        return json.loads(response.read())


def _http_result(s, workflow_id: str) -> dict:
    """The close event of the run, long-polled as any HTTP client would."""
    query = "waitNewEvent=true&historyEventFilterType=HISTORY_EVENT_FILTER_TYPE_CLOSE_EVENT"
    for _ in range(10):  # a long poll may return an empty page before the run closes
        page = _http(s, "GET", f"/workflows/{workflow_id}/history?{query}")
        events = page.get("history", {}).get("events", [])
        if events:
            assert len(events) == 1, events
            return events[0]
    raise AssertionError(f"run {workflow_id} did not close within 10 long polls")


def test_temporal_cli_starts_a_run_with_inline_text_and_reads_its_result(settings, llm):
    _answer_with_context(llm)
    s = isolated(settings)
    workflow_id = f"json-cli-{uuid.uuid4().hex[:8]}"
    payload = {"question": "What does the text say?", "context": "  the ledger balances  ", "models": {"root": ROOT}}

    async def go():
        async with running_worker(s, fake_registry(llm)):
            start = await asyncio.to_thread(
                _temporal, s, "workflow", "start", "--type", WORKFLOW_RLM_RUN, "--task-queue", s.task_queue,
                "--workflow-id", workflow_id, "--input", json.dumps(payload),
            )  # fmt: skip
            assert start.returncode == 0, start.stdout + start.stderr
            return await asyncio.to_thread(
                _temporal, s, "workflow", "result", "--workflow-id", workflow_id, "--output", "json"
            )

    done = asyncio.run(go())
    assert done.returncode == 0, done.stdout + done.stderr
    out = json.loads(done.stdout)
    result = RunResult.model_validate(out["result"])
    assert result.status == "completed", result
    assert result.answer == "TEXT=the ledger balances"


def test_plain_http_starts_a_run_over_s3_files_and_reads_its_result(settings, object_store, llm):
    _answer_with_context(llm)
    prefix = f"inbox-{uuid.uuid4().hex[:8]}/"
    object_store.put_bytes(prefix + "b.txt", "second invoice: 20 EUR".encode())
    object_store.put_bytes(prefix + "a.txt", "first invoice: 10 EUR".encode())
    uri = f"s3://{object_store.bucket}/{prefix}"
    s = isolated(settings)
    workflow_id = f"json-http-{uuid.uuid4().hex[:8]}"
    # `tools: []`: the HTTP API stores an empty array as null; the run must take it as empty.
    request = {"question": "List the invoices.", "context": {"uri": uri}, "models": {"root": ROOT}, "tools": []}
    body = {  # the workflow id is in the URL
        "workflowType": {"name": WORKFLOW_RLM_RUN},
        "taskQueue": {"name": s.task_queue},
        "input": [request],
    }

    async def go():
        async with running_worker(s, fake_registry(llm)):
            started = await asyncio.to_thread(_http, s, "POST", f"/workflows/{workflow_id}", body)
            assert started.get("runId"), started
            return await asyncio.to_thread(_http_result, s, workflow_id)

    close = asyncio.run(go())
    assert close["eventType"] == "EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED", close
    payloads = close["workflowExecutionCompletedEventAttributes"]["result"]
    result = RunResult.model_validate(payloads[0])
    assert result.status == "completed", result
    assert result.answer == "DOCS=first invoice: 10 EUR | second invoice: 20 EUR"


def test_bad_contexts_end_the_run_with_the_field_named(settings, object_store, llm):
    """Too large inline text fails the request (it never reaches a worker's
    activity); a missing object, an empty file and a binary file end the run
    `failed` with `context.uri` and the object named; no model is called."""
    empty, binary = f"bad-{uuid.uuid4().hex[:8]}/empty.txt", f"bad-{uuid.uuid4().hex[:8]}/scan.pdf"
    object_store.put_bytes(empty, b"")
    object_store.put_bytes(binary, b"%PDF-1.7\n\x00\x01\x02binary")
    bucket = object_store.bucket
    cases = {
        "missing": f"s3://{bucket}/no-such-{uuid.uuid4().hex[:8]}.txt",
        "no bucket": "s3://no-such-bucket-here/x.txt",
        "empty": f"s3://{bucket}/{empty}",
        "binary": f"s3://{bucket}/{binary}",
        "empty prefix": f"s3://{bucket}/nothing-{uuid.uuid4().hex[:8]}/",
        # Other runs' snapshots, prompts and transcripts are not a caller's to read.
        "engine runs": f"s3://{bucket}/runs/",
        "engine blob": f"s3://{bucket}/blobs/{'0' * 64}",
        "engine prefix": f"s3://{bucket}/cont",
    }
    too_large = "x" * (MAX_INLINE_CONTEXT_BYTES + 1)
    s = isolated(settings)

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            handle = await start(client, s, {"question": "q?", "context": too_large, "models": {"root": ROOT}})
            with pytest.raises(WorkflowFailureError) as failed:
                await asyncio.wait_for(handle.result(), 60)
            handles = {
                name: await start(client, s, {"question": "q?", "context": {"uri": uri}, "models": {"root": ROOT}})
                for name, uri in cases.items()
            }
            results = {name: await asyncio.wait_for(h.result(), 60) for name, h in handles.items()}
            return failed.value.cause, results

    cause, results = asyncio.run(go())
    assert isinstance(cause, ApplicationError) and cause.type == "InvalidRunRequest", cause
    assert cause.message.startswith("invalid RunRequest: context"), cause.message
    assert "inline limit" in cause.message and "s3://" in cause.message, cause.message
    for name, result in results.items():
        assert result.status == "failed", (name, result)
        assert result.reason.startswith("context.uri: "), (name, result.reason)
    assert cases["missing"] in results["missing"].reason and "not found" in results["missing"].reason
    assert "no-such-bucket-here" in results["no bucket"].reason
    assert f"s3://{bucket}/{empty}" in results["empty"].reason and "empty" in results["empty"].reason
    # A .pdf is converted (issue 12): this one is named with why it cannot be.
    assert f"s3://{bucket}/{binary} cannot be converted to text: not a readable PDF" in results["binary"].reason
    assert "no objects" in results["empty prefix"].reason
    for name in ("engine runs", "engine blob"):
        assert "is the engine's own storage" in results[name].reason, (name, results[name].reason)
    assert "not found" in results["engine prefix"].reason  # a key, not a prefix: no object has it
    assert llm.count() == 0


def test_a_whole_bucket_context_leaves_out_the_engines_own_objects():
    from activities.ingest_context import _engine_key, _visible
    from workflows.refs import ContextURI

    keys = ["invoices/a.txt", "runs/wf/snapshots/t1c1.bin", "blobs/ab", "contexts/chunks/cd", "runsheet.txt"]
    assert _visible(keys, ContextURI(uri="s3://rlm/"), skip_engine=True) == ["invoices/a.txt", "runsheet.txt"]
    assert _visible(keys, ContextURI(uri="s3://other/")) == sorted(keys, key=lambda k: k.split("/"))
    assert _engine_key("runs/") and _engine_key("contexts/chunks/x") and _engine_key("blobs/")
    assert not _engine_key("") and not _engine_key("runsheet.txt") and not _engine_key("run")


def test_a_list_of_texts_becomes_the_context_rlm_context_put_would_store(settings, context_store, llm):
    """A list of texts becomes the same ContextRef `rlm context put` would
    make (same chunks, same manifest): the run reads it as a `list[str]`."""
    _answer_with_context(llm)
    docs = ["alpha", "beta"]
    expected = context_store.put_value(docs)
    s = isolated(settings)

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            handle = await start(client, s, {"question": "q?", "context": docs, "models": {"root": ROOT}})
            result = await asyncio.wait_for(handle.result(), 60)
            history = await handle.fetch_history()
            return result, history

    result, history = asyncio.run(go())
    assert result.status == "completed" and result.answer == "DOCS=alpha | beta", result
    scheduled = [
        e.activity_task_completed_event_attributes.result.payloads[0].data
        for e in history.events
        if e.HasField("activity_task_completed_event_attributes")
    ]
    assert any(json.loads(data).get("sha256") == expected.sha256 for data in scheduled), scheduled


def test_continue_as_new_carries_the_ingested_ref_not_the_text(settings, llm):
    """After continue-as-new the next run of the chain starts from a
    ContextRef (no second ingest) and its REPL still reads the same text."""
    llm.add_rule("Turn 1 of", repl("print(llm_query('one'))"), model=ROOT, name="t1")
    llm.add_rule("Turn 2 of", repl("FINAL('TEXT=' + context.strip())"), model=ROOT, name="t2")
    llm.add_rule(None, "ok", model=SUB)
    s = isolated(settings)
    payload = {
        "question": "q?",
        "context": "chained text",
        "models": {"root": ROOT, "sub": SUB},
        "limits": {"continue_after_updates": 1},
    }

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            handle = await start(client, s, payload)
            result = await asyncio.wait_for(handle.result(), 120)
            latest = client.get_workflow_handle(handle.id)  # the last run of the chain
            return handle.first_execution_run_id, result, await latest.fetch_history()

    first_run_id, result, history = asyncio.run(go())
    assert result.status == "completed" and result.answer == "TEXT=chained text", result
    assert result.run_id != first_run_id
    started = history.events[0].workflow_execution_started_event_attributes
    carried = json.loads(started.input.payloads[0].data)["context"]
    assert isinstance(carried, dict) and len(carried["sha256"]) == 64, carried
    types = [e.activity_task_scheduled_event_attributes.activity_type.name for e in history.events
             if e.HasField("activity_task_scheduled_event_attributes")]  # fmt: skip
    assert "ingest_context" not in types, types


def test_checked_in_json_schema_matches_the_models():
    fresh = schema_text()
    assert SCHEMA_FILE.read_text() == fresh, (
        f"{SCHEMA_FILE.relative_to(REPO)} is out of date with RunRequest/RunResult: refresh it with "
        f"`rlm schema > {SCHEMA_FILE.relative_to(REPO)}` and commit it"
    )
    schema = json.loads(fresh)
    context = schema["$defs"]["RunRequest"]["properties"]["context"]
    kinds = {alt.get("$ref", alt.get("type")) for alt in context["oneOf"]}
    assert kinds == {"#/$defs/ContextRef", "#/$defs/ContextURI", "string", "array"}, kinds
    # A caller reading the schema is told the REPL memory caps a run takes,
    # not the decoder's wider bounds (kept for runs started before).
    memory = schema["$defs"]["RunLimits"]["properties"]["cell_memory_mb"]
    assert (memory["minimum"], memory["maximum"]) == (16, 4096), memory
