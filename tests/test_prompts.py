"""Prompt building: profiles, the per-turn user messages, and message merging."""

from __future__ import annotations

import re

import pytest

from workflows.parsing import FinalAnswer, parse_reply
from workflows.prompts import (
    COMPACT_STOP,
    REASON_FINAL_BEFORE_LOOKING,
    REASON_NO_ACTION,
    CellReport,
    ContextMeta,
    final_request_message,
    first_user_message,
    merge_consecutive,
    missing_variable_reason,
    nudge_message,
    stop_sequences,
    system_prompt,
    turn_message,
)
from workflows.refs import ContextRef, manifest_key_for


def full(**kw):
    args = {"can_recurse": True, "sub_models": [], "max_depth_reached": False} | kw
    return system_prompt("full", **args)


# --- system prompts -------------------------------------------------------------------


def test_full_prompt_explains_the_repl_and_every_function_with_its_signature():
    text = full()
    for signature in (
        "llm_query(prompt: str, model: str | None = None) -> str",
        "llm_query_batched(prompts: list[str], model: str | None = None) -> list[str]",
        "rlm_query(question: str, context=None, model: str | None = None) -> str",
        "rlm_query_batched(questions: list[str], contexts: list | None = None",
        "SHOW_VARS()",
        'FINAL_VAR("name")',
    ):
        assert signature in text
    assert "```repl" in text
    assert "a bare expression on the last line shows nothing" in text
    assert "never shown to you" in text
    assert "100,000 characters" in text and "orchestrator" in text
    # The answer forms, each on its own line, as the parser expects them.
    assert re.search(r"^FINAL\(the answer\)$", text, re.MULTILINE)
    assert re.search(r"^FINAL_VAR\(variable_name\)$", text, re.MULTILINE)


def test_full_prompt_examples_parse_as_code_and_carry_no_final():
    parsed = parse_reply(full().split("Examples:", 1)[1].split("When you know", 1)[0])
    assert len(parsed.code_blocks) == 3
    assert all("context" in block for block in parsed.code_blocks)
    assert parsed.final is None


def test_without_recursion_rlm_query_is_not_mentioned():
    text = full(can_recurse=False)
    assert "rlm_query" not in text
    assert "llm_query_batched" in text


def test_at_the_depth_cap_rlm_query_is_said_to_fall_back():
    text = full(max_depth_reached=True)
    assert "fall back to a plain llm_query" in text
    assert "a child RLM with its own REPL" not in text


def test_sub_models_are_listed_with_the_default_first():
    text = full(sub_models=["gpt-5-mini", "local-qwen"])
    assert "`gpt-5-mini`, `local-qwen` (default: `gpt-5-mini`)" in text
    assert "may pass as `model=`" not in full(sub_models=[])


def test_compact_prompt_is_short_and_has_a_regex_then_final_example():
    text = system_prompt("compact", can_recurse=True, sub_models=["m"], max_depth_reached=False)
    assert len(text) < 1500, "a 1.5B model needs a short prompt"
    assert "rlm_query" not in text
    example = text.split("Example:", 1)[1].split("Tips:", 1)[0]
    # The assistant side of the example is what we want the model to produce:
    # it must parse to a regex-and-print cell, and then to a FINAL.
    first_reply = example.split("Assistant:", 1)[1].split("User:", 1)[0]
    cell = parse_reply(first_reply).code_blocks
    assert len(cell) == 1
    assert all(part in cell[0] for part in ("re.findall", "print(", "context"))
    last_reply = "Assistant:" + example.rsplit("Assistant:", 1)[1]
    assert parse_reply(last_reply).final == FinalAnswer("answer", "KX-4471")


def test_compact_stop_fires_right_after_the_example_code():
    assert COMPACT_STOP == ["\nUser:", "\nQuestion:"]
    text = system_prompt("compact", can_recurse=False, sub_models=[], max_depth_reached=False)
    assert "```\nUser: REPL output:" in text
    stops = stop_sequences("compact")
    stops.append("x")
    assert COMPACT_STOP == ["\nUser:", "\nQuestion:"], "stop_sequences must return a copy"
    assert stop_sequences("full") == []


def test_prompts_are_deterministic():
    assert full(sub_models=["a"]) == full(sub_models=["a"])


def test_unknown_profile_is_a_clear_error():
    with pytest.raises(ValueError, match="use 'full' or 'compact'"):
        system_prompt("tiny", can_recurse=True, sub_models=[], max_depth_reached=False)  # type: ignore


# --- first message --------------------------------------------------------------------


def test_first_message_for_one_document():
    meta = ContextMeta("str", 1_234_567, 1, [1_234_567])
    text = first_user_message("What is the secret code?", meta, turn=1, max_turns=8)
    assert "a str of 1,234,567 characters" in text
    assert "Question: What is the secret code?" in text
    assert "Turn 1 of 8" in text
    assert "do not answer yet" in text


def test_first_message_for_many_documents_lists_the_first_lengths_only():
    meta = ContextMeta("list", 5_050, 100, list(range(1, 101)))
    text = first_user_message("How many?", meta, turn=1, max_turns=3)
    assert "a list of 100 str documents, 5,050 characters" in text
    assert "Lengths of the first 20 documents: 1, 2," in text
    assert ", 20." in text and "21" not in text.split("Lengths", 1)[1].split(".")[0]


def test_first_message_with_all_lengths_known():
    meta = ContextMeta("list", 30, 2, [10, 20])
    text = first_user_message("Q", meta, turn=1, max_turns=3)
    assert "Document lengths: 10, 20." in text


def test_first_message_after_continue_as_new_does_not_claim_a_first_look():
    meta = ContextMeta("str", 10, 1, [10])
    text = first_user_message("Q", meta, turn=4, max_turns=9)
    assert "Turn 4 of 9" in text and "do not answer yet" not in text


def test_context_meta_from_ref():
    ref = ContextRef(
        sha256="ab" * 32, manifest_key=manifest_key_for("ab" * 32), kind="list",
        total_chars=300, total_bytes=300, doc_count=3, doc_chars_head=[100, 100, 100],
    )
    assert ContextMeta.from_ref(ref) == ContextMeta("list", 300, 3, [100, 100, 100])


@pytest.mark.parametrize(
    "args, match",
    [(("dict", 1, 1, []), "kind"), (("str", -1, 1, []), ">= 0"), (("list", 3, 1, [-3]), ">= 0")],
)
def test_context_meta_rejects_bad_values(args, match):
    with pytest.raises(ValueError, match=match):
        ContextMeta(*args)


@pytest.mark.parametrize("turn, max_turns", [(0, 5), (6, 5), (1, 0)])
def test_turn_out_of_range_is_a_clear_error(turn, max_turns):
    with pytest.raises(ValueError, match="out of range"):
        first_user_message("Q", ContextMeta("str", 1, 1, [1]), turn=turn, max_turns=max_turns)


def test_empty_question_is_a_clear_error():
    with pytest.raises(ValueError, match="question is empty"):
        first_user_message("  ", ContextMeta("str", 1, 1, [1]), turn=1, max_turns=2)


# --- turn messages --------------------------------------------------------------------


def test_turn_message_merges_output_and_the_turn_prompt():
    cells = [CellReport("print(m)", "['KX-4471']\n", None, None, [])]
    text = turn_message(cells, turn=2, max_turns=6, question="What is the code?")
    assert text.startswith("REPL output:\n['KX-4471']\n\n")
    assert "Question: What is the code?" in text
    assert "Turn 2 of 6" in text and "FINAL(answer)" in text


def test_a_cell_that_printed_nothing_says_so():
    cells = [CellReport("len(context)", "", None, None, [])]
    text = turn_message(cells, turn=2, max_turns=6, question="Q")
    assert "printed nothing" in text and "a bare expression shows nothing" in text


def test_several_cells_with_error_limit_and_restored_names():
    cells = [
        CellReport("x = 1\nprint(x)", "1", None, None, []),
        CellReport("llm_query = None", "", None, None, ["llm_query"]),
        CellReport("foo()", "partial\n", "NameError: name 'foo' is not defined", None, []),
        CellReport("print(context)", "a" * 50, None, "output truncated to 50 of 900 characters", []),
    ]
    text = turn_message(cells, turn=3, max_turns=6, question="Q", note="FINAL(7) waited for the code.")
    assert "REPL output of cell 1 of 4 (`x = 1 …`):\n1" in text
    assert "(your code reassigned llm_query; the REPL restored the built-in version)" in text
    assert "partial\nError:\nNameError: name 'foo' is not defined" in text
    assert "(limit reached: output truncated to 50 of 900 characters)" in text
    assert "Note: FINAL(7) waited for the code." in text
    # An erroring cell with no output is not called silent.
    assert text.count("printed nothing") == 1


def test_per_turn_messages_do_not_offer_final_var():
    # Measured with the 1.5B model: when turn messages offered FINAL_VAR it replied
    # FINAL_VAR(LOTUS-2962) with the value and never finished (1/10 solved, 10/10 without).
    texts = [
        turn_message([], turn=2, max_turns=5, question="Q"),
        turn_message([], turn=5, max_turns=5, question="Q"),
        nudge_message(turn=2, max_turns=5, reason=REASON_NO_ACTION),
        final_request_message(reason="max_turns"),
        first_user_message("Q", ContextMeta("str", 1, 1, [1]), turn=1, max_turns=5),
    ]
    assert not any("FINAL_VAR" in t for t in texts)


def test_last_turn_asks_for_the_answer():
    text = turn_message([], turn=5, max_turns=5, question="Q")
    assert "this is the last turn" in text and "REPL output" not in text


def test_nudge_and_its_reasons():
    text = nudge_message(turn=2, max_turns=4, reason=REASON_NO_ACTION)
    assert text.startswith(REASON_NO_ACTION) and "Turn 2 of 4" in text
    assert "not accepted" in REASON_FINAL_BEFORE_LOOKING
    assert "FINAL_VAR(total)" in missing_variable_reason("total")
    assert "SHOW_VARS()" in missing_variable_reason("total")
    with pytest.raises(ValueError, match="needs a reason"):
        nudge_message(turn=2, max_turns=4, reason=" ")


@pytest.mark.parametrize(
    "reason, words", [("max_turns", "turn limit"), ("budget", "budget"), ("max_errors", "failed too many times")]
)
def test_final_request(reason, words):
    text = final_request_message(reason=reason)
    assert words in text and "FINAL(answer)" in text


def test_final_request_unknown_reason():
    with pytest.raises(ValueError, match=r"\['budget', 'max_errors', 'max_turns'\]"):
        final_request_message(reason="tired")  # type: ignore[arg-type]


# --- merging --------------------------------------------------------------------------


def test_merge_consecutive_joins_same_role_runs_without_touching_the_input():
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "REPL output:\n1"},
        {"role": "user", "content": "Turn 2 of 5."},
        {"role": "assistant", "content": None},
        {"role": "assistant", "content": "FINAL(1)"},
        {"role": "user", "content": final_request_message(reason="max_turns")},
    ]
    before = [dict(m) for m in messages]
    merged = merge_consecutive(messages)
    assert messages == before
    assert [m["role"] for m in merged] == ["system", "user", "assistant", "user"]
    assert merged[1]["content"] == "REPL output:\n1\n\nTurn 2 of 5."
    assert merged[2]["content"] == "FINAL(1)"


def test_merge_keeps_tool_messages_apart_and_extra_keys():
    messages = [
        {"role": "tool", "content": "a", "tool_call_id": "1"},
        {"role": "tool", "content": "b", "tool_call_id": "2"},
        {"role": "user", "content": "x", "name": "u"},
    ]
    merged = merge_consecutive(messages)
    assert [m.get("tool_call_id") for m in merged[:2]] == ["1", "2"]
    assert merged[2] == {"role": "user", "content": "x", "name": "u"}


def test_merge_rejects_bad_messages():
    with pytest.raises(ValueError, match="no 'role'"):
        merge_consecutive([{"content": "x"}])
    with pytest.raises(TypeError, match="text messages only"):
        merge_consecutive([{"role": "user", "content": [{"type": "text", "text": "x"}]}])


def test_a_whole_conversation_alternates_roles():
    meta = ContextMeta("str", 100, 1, [100])
    reply = parse_reply("```repl\nprint(context[:10])\n```\nUser: REPL output: x\nAssistant: FINAL(x)")
    system = system_prompt("compact", can_recurse=False, sub_models=[], max_depth_reached=False)
    cells = [CellReport("print(context[:10])", "0123456789", None, None, [])]
    messages = [
        {"role": "system", "content": system},
        {"role": "user", "content": first_user_message("Q", meta, turn=1, max_turns=3)},
        {"role": "assistant", "content": reply.text},
        {"role": "user", "content": turn_message(cells, turn=2, max_turns=3, question="Q")},
    ]
    roles = [m["role"] for m in merge_consecutive(messages)]
    assert all(a != b for a, b in zip(roles, roles[1:]))
    assert "FINAL(x)" not in messages[2]["content"]
