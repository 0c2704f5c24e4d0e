"""Typed answers: with `RunRequest.answer_schema` the model is shown the
schema, its FINAL must be JSON that validates, an invalid answer is sent back
once with the validation error, and `RunResult.answer_value` carries the
parsed value. Real worker, Temporal, S3 and WASM REPL; models scripted
through litellm; the CLI as a subprocess."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid

import pytest
from pydantic import ValidationError
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import ApplicationError

from cli import services
from tests.fixtures_llm import fake_registry
from tests.run_harness import ROOT, SUB, isolated, repl, request, run_once, running_worker
from tests.test_cli_run import rlm_env
from workflows.names import WORKFLOW_RLM_RUN
from workflows.request import RunRequest
from workflows.typed_answer import MAX_SCHEMA_BYTES, parse_answer

INVOICE_SCHEMA = {
    "type": "object",
    "properties": {
        "total": {"type": "number"},
        "currency": {"type": "string", "enum": ["EUR", "USD"]},
    },
    "required": ["total", "currency"],
    "additionalProperties": False,
}
INVOICE = "Invoice 17. Lines: 3 EUR, 4 EUR, 5 EUR."


def _typed(question: str, ctx, schema=INVOICE_SCHEMA, **kw) -> RunRequest:
    return request(question, ctx, **kw).model_copy(update={"answer_schema": schema})


def _look() -> str:
    return repl("import re\nprint(sum(int(x) for x in re.findall(r'(\\d+) EUR', context)))")


def _saw_total(request) -> bool:
    """A turn after the first whose prompt shows the total (12). Not turn 1:
    its prompt names the context file by the path given, which lies under
    pytest's numbered temp dir (`.../pytest-12/...` answered FINAL at turn 1)."""
    return "Turn 1 of" not in request.last_text and "12" in request.last_text


def test_valid_json_answer_is_parsed_and_the_model_sees_the_schema(settings, context_store, llm):
    ctx = context_store.put_value(INVOICE)
    llm.add_rule("Turn 1 of", _look(), model=ROOT)
    llm.add_rule(_saw_total, 'The total is known.\nFINAL({"total": 12, "currency": "EUR"})', model=ROOT, name="final")

    result = run_once(isolated(settings), fake_registry(llm), _typed("Total and currency?", ctx))
    assert result.status == "completed", result.reason
    assert result.answer_value == {"total": 12, "currency": "EUR"}
    assert result.reason is None
    system = llm.requests(ROOT)[0].messages[0]["content"]
    assert "JSON Schema" in system and '"enum": ["EUR", "USD"]' in system


def test_invalid_answer_is_sent_back_once_with_the_error_then_a_valid_one_is_taken(settings, context_store, llm):
    ctx = context_store.put_value(INVOICE)
    llm.add_rule("Turn 1 of", _look(), model=ROOT)
    llm.add_rule(_saw_total, 'FINAL({"total": "twelve", "currency": "EUR"})', model=ROOT, name="invalid")
    # The corrected answer is built in the REPL: FINAL_VAR gives Python's repr of the dict.
    llm.add_rule(
        "was not accepted",
        repl('result = {"total": 12, "currency": "EUR"}\nFINAL_VAR("result")'),
        model=ROOT,
        name="fixed",
    )

    result = run_once(isolated(settings), fake_registry(llm), _typed("Total and currency?", ctx))
    assert result.status == "completed", result.reason
    assert result.answer_value == {"total": 12, "currency": "EUR"}
    assert result.turns == 3
    fixed = [r for r in llm.requests(ROOT) if r.matched_rule and r.matched_rule.name == "fixed"]
    assert len(fixed) == 1
    assert "at $.total: 'twelve' is not of type 'number'" in fixed[0].last_user_text


def test_answer_invalid_twice_completes_with_the_text_and_the_error_named(settings, context_store, llm):
    ctx = context_store.put_value(INVOICE)
    llm.add_rule("Turn 1 of", _look(), model=ROOT)
    llm.add_rule(_saw_total, "FINAL(twelve euros)", model=ROOT, name="prose")
    llm.add_rule("was not accepted", 'FINAL({"total": 12, "currency": "GBP"})', model=ROOT, name="bad")

    result = run_once(isolated(settings), fake_registry(llm), _typed("Total and currency?", ctx))
    assert result.status == "completed", result.reason
    assert result.answer_value is None
    assert result.answer is not None and '"GBP"' in result.answer
    assert result.reason is not None and result.reason.startswith("answer_schema: ")
    assert "at $.currency: 'GBP' is not one of ['EUR', 'USD']" in result.reason
    sent_back = [r for r in llm.requests(ROOT) if "was not accepted" in r.last_user_text]
    assert len(sent_back) == 1 and "it is not JSON" in sent_back[0].last_user_text


def test_the_last_word_after_the_turn_limit_is_validated_too(settings, context_store, llm):
    ctx = context_store.put_value(INVOICE)
    llm.add_rule("Turn 1 of", _look(), model=ROOT)
    llm.add_rule(_saw_total, 'FINAL({"total": 12})', model=ROOT)
    llm.add_rule("reached the turn limit", 'FINAL({"total": 12, "currency": "EUR"})', model=ROOT, name="last")

    result = run_once(isolated(settings), fake_registry(llm), _typed("Total?", ctx, caps={"max_turns": 2}))
    assert result.status == "max_turns", result.reason
    assert result.answer_value == {"total": 12, "currency": "EUR"}
    last = [r for r in llm.requests(ROOT) if r.matched_rule and r.matched_rule.name == "last"]
    assert len(last) == 1 and "'currency' is a required property" in last[0].all_text


def test_runs_without_a_schema_keep_plain_answers(settings, context_store, llm):
    ctx = context_store.put_value(INVOICE)
    llm.add_rule("Turn 1 of", _look(), model=ROOT)
    llm.add_rule(_saw_total, "FINAL(12 EUR)", model=ROOT)

    result = run_once(isolated(settings), fake_registry(llm), request("Total?", ctx))
    assert result.status == "completed" and result.answer == "12 EUR"
    assert result.answer_value is None and result.reason is None
    assert "JSON Schema" not in llm.requests(ROOT)[0].messages[0]["content"]


def test_invalid_schemas_fail_the_run_at_start_naming_answer_schema(settings, context_store, llm):
    ctx = context_store.put_value("abc").model_dump(mode="json")
    good = {"question": "q?", "context": ctx, "models": {"root": ROOT}}
    cases = {
        "unknown type": {"type": "nope"},
        "bad keyword value": {"properties": {"a": {"minimum": "zero"}}},
        "not an object": ["type", "object"],
        "too large": {"description": "x" * (MAX_SCHEMA_BYTES + 1)},
    }
    s = isolated(settings)

    async def failure(client, schema) -> ApplicationError:
        handle = await client.start_workflow(
            WORKFLOW_RLM_RUN, {**good, "answer_schema": schema}, id=f"raw-{uuid.uuid4().hex[:8]}", task_queue=s.task_queue
        )
        with pytest.raises(WorkflowFailureError) as failed:
            await asyncio.wait_for(handle.result(), 60)
        assert isinstance(failed.value.cause, ApplicationError), failed.value.cause
        return failed.value.cause

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            return {name: await failure(client, schema) for name, schema in cases.items()}

    failures = asyncio.run(go())
    for name, cause in failures.items():
        assert cause.type == "InvalidRunRequest", (name, cause)
        assert cause.message.startswith("invalid RunRequest: answer_schema"), (name, cause.message)
    assert "at $.type:" in failures["unknown type"].message
    assert "over the 65,536-byte limit" in failures["too large"].message
    assert llm.count() == 0
    # The same check at the edge, before anything starts.
    with pytest.raises(ValidationError, match=r"answer_schema\n.*at \$\.properties\.a\.minimum"):
        RunRequest.model_validate({**good, "answer_schema": cases["bad keyword value"]})


@pytest.mark.parametrize(
    ("text", "value", "error"),
    [
        ('{"total": 1, "currency": "USD"}', {"total": 1, "currency": "USD"}, None),
        ('```json\n{"total": 1, "currency": "USD"}\n```', {"total": 1, "currency": "USD"}, None),
        ("{'total': 1.5, 'currency': 'EUR'}", {"total": 1.5, "currency": "EUR"}, None),
        ('{"total": 1}', None, "'currency' is a required property"),
        ("{'total': {1, 2}, 'currency': 'EUR'}", None, "it is not JSON"),
        ("[" * 100_000, None, "it is not JSON"),
    ],
)
def test_parse_answer(text, value, error):
    got, why = parse_answer(text, INVOICE_SCHEMA)
    assert got == value
    assert (why is None) if error is None else (error in why), why


@pytest.fixture
def s(settings):
    """The session's services with a task queue of this test's own; its worker is stopped after."""
    own = isolated(settings).model_copy(update={"embedded_worker": True})
    yield own
    services.stop_worker(own)


def _rlm(settings, fake_url: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`rlm ARGS` as a user runs it, against the session's services and the scripted models."""
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        env=rlm_env(settings, fake_url), capture_output=True, text=True, timeout=timeout,
    )


def test_rlm_run_answer_schema_flag(s, llm, tmp_path):
    doc = tmp_path / "invoice.txt"
    doc.write_text(INVOICE)
    schema = tmp_path / "invoice.schema.json"
    schema.write_text(json.dumps(INVOICE_SCHEMA))
    llm.add_rule("Turn 1 of", _look(), model=ROOT)
    llm.add_rule(_saw_total, 'FINAL({"total": 12, "currency": "EUR"})', model=ROOT)
    args = ["run", "Total and currency?", "--context", str(doc), "--model", ROOT, "--sub-model", SUB]

    proc = _rlm(s, llm.url, *args, "--answer-schema", str(schema))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[0]) == {"total": 12, "currency": "EUR"}
    proc = _rlm(s, llm.url, *args, "--answer-schema", str(schema), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["answer_value"] == {"total": 12, "currency": "EUR"}

    bad = tmp_path / "bad.schema.json"
    bad.write_text('{"type": "nope"}')
    proc = _rlm(s, llm.url, *args, "--answer-schema", str(bad), timeout=60)
    assert proc.returncode == 1, (proc.stdout, proc.stderr[-2000:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--answer-schema" in errors[0] and "at $.type" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
