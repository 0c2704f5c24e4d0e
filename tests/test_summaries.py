"""Summaries for the Temporal UI: readable, deterministic, bounded (pure logic)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from workflows.budget import Caps
from workflows.refs import ContextRef, manifest_key_for
from workflows.request import ModelChoice, ParentLink, RunRequest
from workflows.summaries import (
    MAX_DETAILS_CHARS,
    MAX_SUMMARY_CHARS,
    cell_summary,
    child_run_summary,
    clip,
    human_count,
    llm_call_summary,
    progress_details,
    root_turn_summary,
    run_static_details,
    run_static_summary,
)


def _request(question: str = "Which vendor was paid twice in March?", **kw) -> RunRequest:
    ctx = ContextRef(
        sha256="ab" * 32, manifest_key=manifest_key_for("ab" * 32), kind="list", total_chars=40_000_000, total_bytes=40_100_000,
        doc_count=12, doc_chars_head=[1] * 12,
    )
    return RunRequest(
        question=question,
        context=ctx,
        models=ModelChoice(root="gpt-4.1", sub="gpt-4.1-mini", per_depth={1: "gpt-4.1-mini"}),
        caps=Caps(max_usd=2.5, max_tokens=3_000_000, max_turns=12, max_depth=1),
        **kw,
    )


def test_examples_read_as_in_the_issue():
    assert root_turn_summary(3, "gpt-4.1", 12_345) == "turn 3 · root · gpt-4.1 · 12.3K tokens in"
    code = "# split\nchunks = [context[i:i+200000] for i in range(0, len(context), 200000)]\nprint(len(chunks))"
    assert cell_summary("t3c1", code).startswith("cell t3c1 · chunks = [context[i:i+200000] for i")
    assert cell_summary("t3c1", code).endswith(" ...")
    assert cell_summary("t1c2", "print(1)") == "cell t1c2 · print(1)"
    assert cell_summary("t1c1", "# only a comment\n") == "cell t1c1 · (no code)"
    assert llm_call_summary(17, 200, "gpt-4.1-mini") == "llm_query 17/200 · gpt-4.1-mini"
    assert llm_call_summary(1, 1, "gpt-4.1-mini") == "llm_query · gpt-4.1-mini"
    assert child_run_summary("What colour is\nthe sky?", 1) == "rlm_query d1 · What colour is the sky?"
    assert child_run_summary("Cb", 2, 2, 3) == "rlm_query d2 2/3 · Cb"


def test_human_count():
    assert [human_count(n) for n in (0, 999, 1000, 12_345, 2_500_000, 3e9)] == ["0", "999", "1K", "12.3K", "2.5M", "3B"]


def test_static_summary_and_details_name_question_context_models_caps():
    req = _request()
    line = run_static_summary(req)
    assert line == "RLM · Which vendor was paid twice in March? · 40M chars · gpt-4.1"
    details = run_static_details(req)
    assert "**Question:** Which vendor was paid twice in March?" in details
    assert "40M chars in 12 documents" in details
    assert "root gpt-4.1, sub gpt-4.1-mini, depth 1 gpt-4.1-mini" in details
    assert "12 turns, $2.50, 3M tokens" in details and "depth 1" in details
    child = _request("sub question", depth=1, parent=ParentLink(parent_workflow_id="p", root_workflow_id="p", call_id="t1c1:1:0"))
    assert run_static_summary(child).startswith("RLM d1 · sub question")
    assert "**Parent:** `p` call `t1c1:1:0`" in run_static_details(child)


def test_progress_details_show_turn_phase_spend_against_caps_and_open_calls():
    text = progress_details(
        turn=3, max_turns=20, phase="cell t3c1",
        spent={"usd": 0.0123, "tokens": 45_600, "calls": 7},
        caps=Caps(max_usd=1.0, max_calls=100).model_dump(mode="json"),
        open_subcalls=32, done_subcalls=168, children=2,
    )  # fmt: skip
    assert text.splitlines()[0] == "**Turn** 3 of 20 · cell t3c1"
    assert "**Spend** $0.0123 of $1.00, 45.6K tokens, 7 of 100 calls" in text
    assert "**Sub-calls** 32 open, 168 done · **child runs** 2" in text


@given(st.text(min_size=0, max_size=5000))
def test_every_summary_is_bounded_and_one_line(text):
    for s in (
        cell_summary("t1c1", text),
        child_run_summary(text, 3, 5, 9),
        root_turn_summary(1, text, 10**12),
        llm_call_summary(1, 2, text),
        clip(text, 50),
    ):
        assert len(s) <= MAX_SUMMARY_CHARS and "\n" not in s
    req = _request(text if text.strip() else "q")
    assert len(run_static_summary(req)) <= MAX_SUMMARY_CHARS
    assert len(run_static_details(req)) <= MAX_DETAILS_CHARS
    assert len(progress_details(turn=1, max_turns=2, phase=text, spent={}, caps={})) <= MAX_DETAILS_CHARS


def test_same_input_same_text():
    req = _request()
    assert run_static_details(req) == run_static_details(_request())
