"""Caps, limits and models are checked at the edge, with messages that name
the field (or the flag), however the run is started: a request with an
absurd, negative or mistyped cap fails at once as `InvalidRunRequest`; an
unknown model fails the run's first step (the model registry lives on the
worker) with `models.sub: unknown model ...`; `rlm run` refuses both before
starting anything."""

from __future__ import annotations

import asyncio

import pytest
from temporalio.api.common.v1 import Payload
from temporalio.client import WorkflowFailureError
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import ApplicationError

from tests.fixtures_llm import fake_registry
from tests.run_harness import ROOT, SUB, isolated, running_worker, start
from tests.test_cli_run import _rlm
from workflows.request import not_json_problem, parse_request

GOOD = {"question": "q?", "context": "some text", "models": {"root": ROOT}}


@pytest.mark.parametrize(
    "change, fields",
    [
        ({"caps": {"max_wall_s": 1e300}}, ["caps: ", "caps.max_wall_s is 1e+300"]),
        ({"caps": {"max_depth": 1000, "max_concurrency": 10**6}}, ["caps.max_depth is 1,000", "caps.max_concurrency"]),
        ({"caps": {"max_turns": 10**7}}, ["caps.max_turns is 10,000,000 (at most 10,000)"]),
        ({"caps": {"max_turns": "ten", "max_usd": "lots"}}, ["caps.max_turns: ", "caps.max_usd: "]),
        ({"caps": {"max_turns": 2.5}}, ["caps.max_turns: "]),
        ({"caps": {"max_calls": -1, "max_tokens": -5}}, ["caps.max_calls: ", "caps.max_tokens: "]),
        ({"caps": {"max_usd": float("inf")}}, ["caps.max_usd: "]),
        ({"caps": {"max_turn": 3}}, ["caps.max_turn: Extra inputs are not permitted"]),
        ({"limits": {"cell_timeout_s": 1e300, "model_call_timeout_s": 0}}, ["limits.cell_timeout_s: ", "limits.model_call_timeout_s: "]),
        ({"limits": {"cell_memory_mb": 10**9}}, ["limits.cell_memory_mb: "]),
        ({"models": {"root": ""}}, ["models.root: "]),
        ({"models": {"root": ROOT, "sub": " padded "}}, ["models.sub: "]),
        ({"models": {"root": ROOT, "per_depth": {"0": SUB}}}, ["models.per_depth.0.[key]: "]),
        ({"models": {"root": ROOT, "per_depth": {"1": ""}}}, ["models.per_depth.1: "]),
        ({"on_unreadable": "ignore"}, ["on_unreadable: "]),
        # A misplaced or misspelt field is refused, not dropped: `max_usd` at
        # the top level would otherwise start a run with no money cap.
        ({"max_usd": 0.5}, ["max_usd: Extra inputs are not permitted"]),
        ({"budget": {"max_usd": 0.5}}, ["budget: Extra inputs are not permitted"]),
        ({"limits": {"cell_timeout": 5}}, ["limits.cell_timeout: Extra inputs are not permitted"]),
        ({"models": {"root": ROOT, "sub_model": SUB}}, ["models.sub_model: Extra inputs are not permitted"]),
        # A timeout under a second cannot be met (and under a microsecond is none to Temporal).
        ({"limits": {"model_call_timeout_s": 1e-7, "tool_call_timeout_s": 0.5}}, ["limits.model_call_timeout_s: ", "limits.tool_call_timeout_s: "]),
        ({"limits": {"tool_call_timeout_s": 1e300}}, ["limits.tool_call_timeout_s: Input should be less than or equal to 86400"]),
        # Depth is the tree's to give: a caller starts at 0, a child never past the deepest tree.
        ({"depth": 16}, ["depth is 16: a run started by a caller has depth 0"]),
        ({"depth": 10**30}, ["depth: "]),
        (
            {"depth": 15, "caps": {"max_depth": 2}, "parent": {"parent_workflow_id": "p", "root_workflow_id": "p", "call_id": "c"}},
            ["depth 15 plus caps.max_depth 2 is more than 16 levels"],
        ),
    ],
)
def test_bad_caps_limits_and_model_names_are_named_by_field(change, fields):
    problem = parse_request({**GOOD, **change})
    assert isinstance(problem, str), problem
    for field in fields:
        assert field in problem, (field, problem)


def test_unknown_model_names_are_reported_by_their_field(llm):
    registry = fake_registry(llm)
    ok = {"models.root": ROOT, "models.sub": SUB, "models.per_depth.1": "gpt-4o-mini"}
    assert registry.unknown_fields(ok) is None
    text = registry.unknown_fields({"models.root": ROOT, "models.sub": "nope-model", "models.per_depth.2": "nah"})
    assert text.startswith("models.sub: unknown model 'nope-model'; models.per_depth.2: unknown model 'nah'; known: ")
    assert ROOT in text and SUB in text


def test_json_runs_with_unknown_models_or_absurd_caps_fail_at_once(settings, llm):
    s = isolated(settings)
    unknown = {**GOOD, "models": {"root": ROOT, "sub": "nope-model", "per_depth": {"1": ROOT}}}
    absurd = {**GOOD, "caps": {"max_wall_s": 1e300, "max_depth": -1}, "limits": {"cell_timeout_s": "soon"}}

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            result = await asyncio.wait_for((await start(client, s, unknown)).result(), 60)
            handle = await start(client, s, absurd)
            with pytest.raises(WorkflowFailureError) as failed:
                await asyncio.wait_for(handle.result(), 60)
            return result, failed.value.cause

    result, cause = asyncio.run(go())
    assert result.status == "failed" and result.turns == 0, result
    assert result.reason.startswith("models.sub: unknown model 'nope-model'; known: "), result.reason
    assert isinstance(cause, ApplicationError) and cause.type == "InvalidRunRequest", cause
    for field in ("caps.max_depth: ", "limits.cell_timeout_s: "):
        assert field in cause.message, cause.message
    assert llm.count() == 0


@pytest.fixture
def s(settings):
    return isolated(settings)


def test_rlm_run_refuses_unknown_models_and_bad_caps_before_starting(s, llm, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("text")
    cases = [
        (["--model", "no-such-model-xyz"], "--model: unknown model 'no-such-model-xyz'; known: "),
        (["--model", ROOT, "--sub-model", "nah-xyz"], "--sub-model: unknown model 'nah-xyz'"),
        (["--model", ROOT, "--max-usd", "-1"], "--max-usd: Input should be greater than or equal to 0"),
        (["--model", ROOT, "--max-turns", "0"], "--max-turns: must be at least 1"),
        (["--model", ROOT, "--max-concurrency", "0"], "--max-concurrency: "),
        (["--model", ROOT, "--cell-timeout", "0"], "--cell-timeout: must be at least 1 and at most 86400 seconds"),
        (["--model", ROOT, "--cell-timeout", "0.2"], "--cell-timeout: must be at least 1 and at most 86400 seconds"),
    ]
    for args, expected in cases:
        proc = _rlm(s, llm.url, "run", "q", "--context", str(doc), *args, timeout=60)
        assert proc.returncode == 1, (args, proc.stdout, proc.stderr[-2000:])
        lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and expected in lines[0], (args, proc.stderr[-2000:])
    assert llm.count() == 0


def test_a_json_run_with_a_misplaced_cap_fails_naming_it_and_calls_no_model(settings, llm):
    """A caller in another language who puts `max_usd` beside `caps` instead
    of under it gets the run refused, not a run without a money cap."""
    s = isolated(settings)
    misplaced = {**GOOD, "max_usd": 0.5, "limits": {"cell_timeout": 5}}

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            handle = await start(client, s, misplaced)
            with pytest.raises(WorkflowFailureError) as failed:
                await asyncio.wait_for(handle.result(), 60)
            return failed.value.cause

    cause = asyncio.run(go())
    assert isinstance(cause, ApplicationError) and cause.type == "InvalidRunRequest", cause
    assert "max_usd: Extra inputs are not permitted" in cause.message, cause.message
    assert "limits.cell_timeout: Extra inputs are not permitted" in cause.message, cause.message
    assert llm.count() == 0


def test_unknown_fields_are_told_apart_from_other_mistakes():
    """Runs started before unknown fields were refused replay with them left
    out (workflows/run.py); any other mistake still makes the request invalid."""
    from workflows.request import RunRequest, without_unknown_fields

    kept = without_unknown_fields(RunRequest, {**GOOD, "max_usd": 0.5, "limits": {"cell_timeout": 5, "output_chars": 500}})
    assert kept is not None
    request, refusal = kept
    assert request.limits.output_chars == 500 and request.caps.max_usd is None
    assert "max_usd: Extra inputs are not permitted" in refusal and "limits.cell_timeout" in refusal
    assert without_unknown_fields(RunRequest, {**GOOD, "max_usd": 0.5, "question": ""}) is None
    assert without_unknown_fields(RunRequest, GOOD) is None


def test_a_json_run_with_a_money_cap_over_an_unpriced_model_fails_at_once(settings, llm):
    """A caller in another language can name a model the worker has no price
    for: its calls would count $0 and `max_usd` would not bind. The run's
    first step refuses it, before any model call; without the money cap the
    same models run."""
    s = isolated(settings)
    registry = fake_registry(llm, usd_per_input_token=None, usd_per_output_token=None)
    capped = {**GOOD, "models": {"root": ROOT, "sub": SUB}, "caps": {"max_usd": 0.5}}

    async def go():
        async with running_worker(s, registry) as client:
            return await asyncio.wait_for((await start(client, s, capped)).result(), 60)

    result = asyncio.run(go())
    assert result.status == "failed" and result.turns == 0, result
    assert result.reason.startswith(f"caps.max_usd: cannot limit model '{ROOT}', '{SUB}'"), result.reason
    assert llm.count() == 0


def test_a_lone_surrogate_escape_in_a_json_start_is_named_as_such():
    """Another language's client can send `"\\ud800"`: valid JSON syntax, no
    Unicode text. The strict decoder's "unexpected end of hex escape" sent a
    caller looking for a syntax error."""
    for data, expected in [
        (b'{"question": "a\\ud800b", "context": "x"}', "a string holds a lone UTF-16 surrogate escape"),
        (b'{"question": "a\\udc00b", "context": "x"}', "a string holds a lone UTF-16 surrogate escape"),
        (b'{"question": "a", "context": ', "the input is not JSON (ValidationError"),
        (b"[" * 300 + b"]" * 300, "the input is not JSON (ValidationError"),  # deeper than the decoder goes
    ]:
        payload = Payload(metadata={"encoding": b"json/plain"}, data=data)
        with pytest.raises(Exception) as decoding:
            pydantic_data_converter.payload_converter.from_payload(payload)
        problem = not_json_problem("RunRequest", decoding.value)
        assert problem.startswith("invalid RunRequest: ") and expected in problem, problem


def test_the_repl_memory_range_is_the_sandboxs():
    """A cap outside what the sandbox takes made every cell fail (its limits
    refused, attempt after attempt) while the run spent its turns; the range
    a run is refused outside of is exactly the sandbox's."""
    from sandbox_wasm import SandboxLimits
    from workflows.request import CELL_MEMORY_MB_RANGE, cell_memory_problem

    low, high = CELL_MEMORY_MB_RANGE
    for mb in (low, 2048, high):
        assert cell_memory_problem(mb) is None
        SandboxLimits(memory_bytes=mb * 1024**2)  # accepted
    for mb in (1, low - 1, high + 1, 8192):
        problem = cell_memory_problem(mb)
        assert problem == (
            f"limits.cell_memory_mb: the REPL's memory cap must be 16 to 4096 MiB (a 32-bit WebAssembly guest), got {mb}"
        )
        with pytest.raises(ValueError, match="memory_bytes must be between"):
            SandboxLimits(memory_bytes=mb * 1024**2)


def test_a_run_refuses_by_size_exactly_the_contexts_the_sandbox_refuses_by_size(tmp_path):
    """The run's check at its start and the sandbox's own refusal are one
    rule: a context of the cap's size or more. Past it the sandbox reads
    nothing; below it, it tries (and may run out of memory loading it)."""
    from sandbox_wasm import ContextTooLarge, ReplSession, SandboxLimits
    from workflows.request import context_fit_problem

    cap_mb = 16
    at_cap, below = tmp_path / "at_cap.txt", tmp_path / "below.txt"
    at_cap.write_bytes(b"x" * (cap_mb << 20))
    below.write_bytes(b"x" * ((cap_mb << 20) - 1))
    assert context_fit_problem(cap_mb << 20, cap_mb) is not None
    assert context_fit_problem((cap_mb << 20) - 1, cap_mb) is None
    with ReplSession(limits=SandboxLimits(memory_bytes=cap_mb << 20)) as session:
        with pytest.raises(ContextTooLarge) as refused:
            session.load_context([at_cap], "str")
        assert "ran out of memory" not in str(refused.value)  # refused by its size, nothing read
    with ReplSession(limits=SandboxLimits(memory_bytes=cap_mb << 20)) as session:
        with pytest.raises(ContextTooLarge, match=r"\(loading it ran out of memory\)"):
            session.load_context([below], "str")


def test_a_run_or_session_with_a_repl_memory_cap_no_sandbox_takes_fails_at_once(settings, llm, context_store):
    """A caller in another language may send `cell_memory_mb: 8192` (the
    request decodes up to 64 GiB, for runs started before the range was
    enforced): the run is refused before its first model call, not after 20
    paid turns of cells that could not run. A session likewise, at its start."""
    from tests.session_harness import session_request, start_session
    from workflows.request import RunLimits

    s = isolated(settings)
    ctx = context_store.put_value("some text")

    async def go():
        causes = []
        async with running_worker(s, fake_registry(llm)) as client:
            for mb in (8192, 8):
                handle = await start(client, s, {**GOOD, "limits": {"cell_memory_mb": mb}})
                with pytest.raises(WorkflowFailureError) as failed:
                    await asyncio.wait_for(handle.result(), 60)
                causes.append(failed.value.cause)
            session = await start_session(client, s, session_request(ctx).model_copy(update={"limits": RunLimits(cell_memory_mb=8192)}))
            with pytest.raises(WorkflowFailureError) as failed:
                await asyncio.wait_for(session.result(), 60)
            causes.append(failed.value.cause)
        return causes

    big, small, session = asyncio.run(go())
    for cause, what, mb in ((big, "RunRequest", 8192), (small, "RunRequest", 8), (session, "SessionRequest", 8192)):
        assert isinstance(cause, ApplicationError) and cause.type == f"Invalid{what}", cause
        assert cause.message == (
            f"invalid {what}: limits.cell_memory_mb: the REPL's memory cap must be 16 to 4096 MiB "
            f"(a 32-bit WebAssembly guest), got {mb}"
        ), cause.message
    assert llm.count() == 0


def test_a_run_or_session_whose_context_cannot_fit_its_repl_ends_before_any_model_call(settings, llm, context_store):
    """40 MB under a 32 MiB REPL cap can never be loaded: a run ended at its
    first cell, after a paid root turn, and a session took every question
    that far. Both end now when they start; a question asked of the session
    is told why (or, once the session has ended, refused by Temporal)."""
    from temporalio.client import WorkflowUpdateFailedError
    from temporalio.service import RPCError

    from tests.session_harness import ask, session_request, start_session
    from workflows.request import RunLimits

    s = isolated(settings)
    ctx = context_store.put_value("x" * 40_000_000)
    llm.add_rule(None, "FINAL(never)", name="any")
    why = (
        "the context (40.0 MB) does not fit in the REPL's memory cap of 32 MiB: raise the run's "
        "limits.cell_memory_mb (at most 4096) or give it a smaller context"
    )

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            handle = await start(client, s, {**GOOD, "context": ctx.model_dump(mode="json"), "limits": {"cell_memory_mb": 32}})
            result = await asyncio.wait_for(handle.result(), 60)
            session = await start_session(client, s, session_request(ctx).model_copy(update={"limits": RunLimits(cell_memory_mb=32)}))
            # Refused by the session, or by Temporal once the session has ended.
            with pytest.raises((WorkflowUpdateFailedError, RPCError)) as asked:
                await asyncio.wait_for(ask(session, "How long?"), 60)
            with pytest.raises(WorkflowFailureError) as failed:
                await asyncio.wait_for(session.result(), 60)
            return result, asked.value, failed.value.cause

    result, asked, cause = asyncio.run(go())
    assert (result.status, result.reason) == ("failed", why), result
    assert isinstance(cause, ApplicationError) and (cause.type, cause.message) == ("InvalidContext", why), cause
    if isinstance(asked, WorkflowUpdateFailedError):
        assert why in str(asked.cause), asked.cause
    else:
        assert "closing workflow" in str(asked) or "already completed" in str(asked), asked
    assert llm.count() == 0
