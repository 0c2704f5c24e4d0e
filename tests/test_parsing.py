"""Reply parsing: the replies quoted in DESIGN.md section 6 and the rules of section 8."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workflows.parsing import (
    _PLACEHOLDERS,
    MAX_CODE_BLOCKS,
    MAX_NOTES,
    MAX_REPLY_CHARS,
    FinalAnswer,
    parse_reply,
)

# --- replies seen from the local 1.5B model (DESIGN.md section 6) -------------------------


def test_mixed_case_final_is_an_answer():
    parsed = parse_reply("Final(ORCHID-8528)")
    assert parsed.final == FinalAnswer("answer", "ORCHID-8528")
    assert parsed.code_blocks == []
    assert not parsed.final_after_code


def test_python_fence_is_run_like_repl():
    reply = (
        "Let me search the context.\n"
        "```python\n"
        "import re\n"
        "print(re.findall(r'code: (\\S+)', context))\n"
        "```"
    )
    parsed = parse_reply(reply)
    assert parsed.code_blocks == ["import re\nprint(re.findall(r'code: (\\S+)', context))"]
    assert parsed.final is None
    assert parsed.notes == []


def test_first_turn_final_before_looking_is_parsed_for_the_workflow_to_judge():
    # The parser reports it; the workflow refuses a FINAL before any cell ran
    # (prompts.REASON_FINAL_BEFORE_LOOKING).
    parsed = parse_reply("FINAL(No secret code is mentioned in the given context.)")
    assert parsed.final == FinalAnswer("answer", "No secret code is mentioned in the given context.")
    assert parsed.code_blocks == []


def test_block_that_invents_its_own_data_is_kept_verbatim_and_gives_no_answer():
    reply = (
        "```repl\n"
        'text = "The secret code is: 1234567890"\n'
        "import re\n"
        "print(re.search(r'secret code is: (\\d+)', text).group(1))\n"
        "```"
    )
    parsed = parse_reply(reply)
    assert len(parsed.code_blocks) == 1
    assert parsed.code_blocks[0].startswith('text = "The secret code is: 1234567890"')
    assert parsed.final is None
    assert not parsed.truncated_at_fake_output


def test_invented_user_turn_is_cut_keeping_the_code_and_dropping_the_invented_final():
    reply = (
        "```repl\n"
        "import re\n"
        "print(re.findall(r'manager is (\\w+ \\w+)', context))\n"
        "```\n"
        "User: REPL output: ['John Smith']\n"
        "Assistant: FINAL(John Smith)"
    )
    parsed = parse_reply(reply)
    assert parsed.code_blocks == ["import re\nprint(re.findall(r'manager is (\\w+ \\w+)', context))"]
    assert parsed.final is None
    assert parsed.truncated_at_fake_output
    assert "User:" not in parsed.text and "John Smith" not in parsed.text
    assert parsed.text.endswith("```")
    assert any("invent" in n for n in parsed.notes)


# --- FINAL: where it counts ------------------------------------------------------------


@pytest.mark.parametrize(
    "reply",
    [
        "I will call FINAL(answer) once I know the code.",
        "Once I know it I will reply FINAL(ORCHID-8528).",
        "The plan: search, then FINAL(x).",
    ],
)
def test_final_inside_a_sentence_is_a_plan_not_an_answer(reply):
    assert parse_reply(reply).final is None


@pytest.mark.parametrize(
    "line, value",
    [
        ("FINAL(42)", "42"),
        ("   FINAL(42)", "42"),
        ("**FINAL(42)**", "42"),
        ("> FINAL(42)", "42"),
        ("`FINAL(42)`", "42"),
        ("- FINAL(42)", "42"),
        ("Assistant: FINAL(42)", "42"),
        ("**Final answer:** FINAL(42)", "42"),
        ("final(42)", "42"),
        ("FINAL(42) — found in document 3.", "42"),
    ],
)
def test_final_at_line_start_after_markdown_or_label(line, value):
    parsed = parse_reply(f"I searched the context.\n{line}\n")
    assert parsed.final == FinalAnswer("answer", value)


def test_final_inside_a_repl_block_is_left_to_the_sandbox():
    parsed = parse_reply("```repl\nanswer = context[:5]\nFINAL(answer)\n```")
    assert parsed.final is None
    assert parsed.code_blocks == ["answer = context[:5]\nFINAL(answer)"]


def test_final_inside_a_plain_fence_is_not_taken_and_the_model_is_told():
    parsed = parse_reply("The answer:\n```\nFINAL(3)\n```")
    assert parsed.final is None
    assert parsed.code_blocks == []
    assert any("FINAL inside a ``` block" in n for n in parsed.notes)


def test_keyword_must_touch_the_paren():
    # "Final (draft) thoughts" is prose, so a space after the keyword is not a FINAL.
    assert parse_reply("Final (draft) thoughts: none yet").final is None


def test_first_acceptable_final_wins():
    parsed = parse_reply("FINAL(answer)\nFINAL(Paris)\nFINAL(London)")
    assert parsed.final == FinalAnswer("answer", "Paris")


# --- FINAL: the value -----------------------------------------------------------------


@pytest.mark.parametrize(
    "reply, value",
    [
        ("FINAL(f(x) = (a+b))", "f(x) = (a+b)"),
        ("FINAL(the total (after tax) is 12 (EUR))", "the total (after tax) is 12 (EUR)"),
        ('FINAL("x")', "x"),
        ("FINAL('x')", "x"),
        ("FINAL(`x`)", "x"),
        ("FINAL(\u201cx\u201d)", "x"),
        ('FINAL("""x""")', "x"),
        ("FINAL('It's fine')", "It's fine"),
        ('FINAL("a" and "b")', '"a" and "b"'),
        ('FINAL("a smiley :) inside")', "a smiley :) inside"),
        ("FINAL(  spaced  )", "spaced"),
        ("FINAL(42", "42"),
        ("FINAL(f(x) = (a+b)", "f(x) = (a+b"),
    ],
)
def test_final_value(reply, value):
    assert parse_reply(reply).final == FinalAnswer("answer", value)


def test_multi_line_final_runs_to_the_matching_paren():
    reply = "FINAL(Three items:\n1. apples (red)\n2. pears)\nThanks for waiting."
    parsed = parse_reply(reply)
    assert parsed.final == FinalAnswer("answer", "Three items:\n1. apples (red)\n2. pears")


@pytest.mark.parametrize(
    "reply", ["FINAL_VAR(result)", "FINAL_VAR('result')", 'final_var("result")', "FINAL_VAR( `result` )"]
)
def test_final_var_gives_the_identifier(reply):
    assert parse_reply(reply).final == FinalAnswer("var", "result")


@pytest.mark.parametrize(
    "reply", ["FINAL_VAR(result[0])", "FINAL_VAR(my result)", "FINAL_VAR(class)", "FINAL_VAR()"]
)
def test_final_var_without_an_identifier_is_refused_with_a_note(reply):
    parsed = parse_reply(reply)
    assert parsed.final is None
    assert any("FINAL_VAR needs a variable name" in n for n in parsed.notes)


def test_final_var_given_a_value_suggests_final():
    # Seen from the 1.5B model after its regex printed the code.
    parsed = parse_reply("FINAL_VAR(LOTUS-2962)")
    assert parsed.final is None
    assert any("reply FINAL(LOTUS-2962)" in n for n in parsed.notes)


@pytest.mark.parametrize("reply", ["FINAL()", "FINAL(  )", 'FINAL("")'])
def test_empty_final_is_refused(reply):
    parsed = parse_reply(reply)
    assert parsed.final is None
    assert any("empty" in n for n in parsed.notes)


@pytest.mark.parametrize("placeholder", ["answer", "your answer", "...", "<answer>"])
def test_placeholder_final_is_refused(placeholder):
    parsed = parse_reply(f"FINAL({placeholder})")
    assert parsed.final is None
    assert any("placeholder" in n for n in parsed.notes)


@given(
    st.recursive(
        st.text(st.characters(blacklist_characters="()\"'`\u201c\u201d\u2018\u2019\r\n"), max_size=20),
        lambda inner: st.builds(lambda a, b, c: f"{a}({b}){c}", inner, inner, inner),
        max_leaves=6,
    ).filter(lambda s: s.strip() and s.strip().lower() not in _PLACEHOLDERS)
)
@settings(max_examples=200, deadline=None)
def test_balanced_answers_round_trip(answer):
    parsed = parse_reply(f"Done.\nFINAL({answer})\n")
    assert parsed.final is not None
    assert parsed.final.value == answer.strip()


@given(st.text(max_size=300))
@settings(max_examples=300, deadline=None)
def test_any_text_parses_without_error_and_deterministically(reply):
    assert parse_reply(reply) == parse_reply(reply)


# --- code and FINAL in one reply ------------------------------------------------------


@pytest.mark.parametrize(
    "reply",
    [
        "```repl\nx = context.count('a')\nprint(x)\n```\nFINAL(7)",
        "FINAL(7)\n```repl\nprint(len(context))\n```",
    ],
)
def test_final_with_code_is_marked_to_be_taken_after_the_code(reply):
    parsed = parse_reply(reply)
    assert parsed.final == FinalAnswer("answer", "7")
    assert parsed.final_after_code
    assert len(parsed.code_blocks) == 1


# --- fences ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tag", ["repl", "python", "py", "python3", "Python", "REPL", "ipython", "{python}", "repl:", "py title"]
)
def test_code_fence_tags_that_run(tag):
    assert parse_reply(f"```{tag}\nprint(1)\n```").code_blocks == ["print(1)"]


@pytest.mark.parametrize("tag", ["", "text", "json", "bash"])
def test_other_fences_do_not_run_and_are_reported(tag):
    parsed = parse_reply(f"Expected:\n```{tag}\nprint(1)\n```")
    assert parsed.code_blocks == []
    assert len(parsed.notes) == 1 and "was not run" in parsed.notes[0]


def test_several_blocks_keep_their_order():
    reply = "```repl\na = 1\n```\nthen\n```python\nb = 2\n```\n```repl\nprint(a + b)\n```"
    assert parse_reply(reply).code_blocks == ["a = 1", "b = 2", "print(a + b)"]


def test_indented_fence_is_dedented():
    reply = "1. Look:\n   ```repl\n   for d in context[:3]:\n       print(len(d))\n   ```"
    assert parse_reply(reply).code_blocks == ["for d in context[:3]:\n    print(len(d))"]


def test_longer_fence_may_contain_triple_backticks():
    reply = '````repl\ns = """```"""\nprint(s)\n````'
    assert parse_reply(reply).code_blocks == ['s = """```"""\nprint(s)']


def test_tilde_fence():
    assert parse_reply("~~~python\nprint(2)\n~~~").code_blocks == ["print(2)"]


def test_empty_code_block_is_skipped():
    parsed = parse_reply("```repl\n\n```")
    assert parsed.code_blocks == []
    assert any("empty" in n for n in parsed.notes)


def test_unclosed_fence_with_complete_code_is_run():
    parsed = parse_reply("```repl\nimport re\nprint(re.findall(r'\\d+', context)[:3])")
    assert parsed.code_blocks == ["import re\nprint(re.findall(r'\\d+', context)[:3])"]
    assert parsed.notes == []


def test_unclosed_fence_cut_mid_statement_is_not_run_and_the_model_is_told():
    parsed = parse_reply("```repl\nchunks = [context[i:i+1000] for i in range(0, len(con")
    assert parsed.code_blocks == []
    assert any("incomplete" in n for n in parsed.notes)


# --- invented turns -------------------------------------------------------------------


def test_invented_output_line_after_code_is_cut():
    reply = "```repl\nprint(len(context))\n```\nREPL output:\n```\n123\n```\nFINAL(123)"
    parsed = parse_reply(reply)
    assert parsed.code_blocks == ["print(len(context))"]
    assert parsed.final is None
    assert parsed.truncated_at_fake_output


def test_invented_output_fence_after_code_is_cut():
    reply = "```repl\nprint(len(context))\n```\n```output\n123\n```\nFINAL(123)"
    parsed = parse_reply(reply)
    assert parsed.final is None and parsed.truncated_at_fake_output


def test_output_label_without_code_in_the_reply_is_prose():
    # Quoting the previous turn's real output is fine when no code ran in this reply.
    parsed = parse_reply("Output: the REPL printed ['KX-4471'].\nFINAL(KX-4471)")
    assert parsed.final == FinalAnswer("answer", "KX-4471")
    assert not parsed.truncated_at_fake_output


def test_human_turn_is_cut_even_without_code():
    parsed = parse_reply("Let me think.\nHuman: what is it?\nFINAL(x)")
    assert parsed.final is None
    assert parsed.text == "Let me think."


def test_user_line_inside_code_is_code():
    parsed = parse_reply('```repl\nprint("""\nUser: hello\n""")\n```')
    assert not parsed.truncated_at_fake_output
    assert parsed.code_blocks == ['print("""\nUser: hello\n""")']


def test_leaked_chat_template_turn_is_cut():
    reply = "```repl\nprint(1)\n```<|im_end|>\n<|im_start|>user\nREPL output: 1<|im_end|>\nFINAL(1)"
    parsed = parse_reply(reply)
    assert parsed.code_blocks == ["print(1)"]
    assert parsed.final is None
    assert parsed.truncated_at_fake_output


def test_trailing_end_token_alone_is_not_a_fake_turn():
    parsed = parse_reply("FINAL(7)<|im_end|>")
    assert parsed.final == FinalAnswer("answer", "7")
    assert not parsed.truncated_at_fake_output


# --- degenerate input -----------------------------------------------------------------


@pytest.mark.parametrize("reply", [None, "", "   \n\t"])
def test_empty_or_missing_reply(reply):
    parsed = parse_reply(reply)
    assert parsed.code_blocks == [] and parsed.final is None and parsed.text == ""
    assert parsed.notes == ["Your reply was empty."]


def test_windows_line_endings():
    parsed = parse_reply("```repl\r\nprint(1)\r\n```\r\nFINAL(1)\r\n")
    assert parsed.code_blocks == ["print(1)"]
    assert parsed.final == FinalAnswer("answer", "1")


def test_non_text_reply_is_a_clear_error():
    with pytest.raises(TypeError, match="message content"):
        parse_reply(b"FINAL(1)")  # type: ignore[arg-type]


def test_plain_prose_reply_has_nothing_to_do():
    parsed = parse_reply("I need to look at the context first.")
    assert parsed == parse_reply("I need to look at the context first.")
    assert parsed.code_blocks == [] and parsed.final is None and parsed.notes == []
    assert parsed.text == "I need to look at the context first."


_FRAGMENTS = st.sampled_from(
    ["```repl", "```python", "```", "````", "~~~", "FINAL(", "Final(", "FINAL_VAR(", ")", "(", '"', "'",
     "User:", "REPL output:", "Output:", "**", "> ", "x = 1", "print(x)", "<|im_end|>", "answer", " ", "\n"]
)


@given(st.lists(_FRAGMENTS, max_size=40).map("".join))
@settings(max_examples=500, deadline=None)
def test_reply_made_of_tricky_fragments_parses_consistently(reply):
    parsed = parse_reply(reply)
    assert parsed.final_after_code == (parsed.final is not None and bool(parsed.code_blocks))
    assert reply.replace("\r\n", "\n").startswith(parsed.text)
    if parsed.final is not None and parsed.final.kind == "var":
        assert parsed.final.value.isidentifier()


# --- the parser never raises, and its work is bounded ---------------------------------


@pytest.mark.parametrize(
    "reply",
    [
        "```repl\n" + "-" * 8000,  # MemoryError from CPython's parser on 3.11
        "```repl\n" + "-" * 8000 + "\n```",
        "```repl\n" + "(" * 8000,
        "```" + "a" * 200_000 + "`",  # quadratic backtracking of the old fence regex
        "FINAL_VAR((\n" * 100_000,
        "FINAL(" + "(" * 500_000,
        "```text\nx\n```\n" * 50_000,
        "```repl\nx = 1\n```\n" * 1000,
    ],
    ids=["unclosed_dashes", "closed_dashes", "unclosed_parens", "long_info_string", "many_final_vars",
         "deep_final", "many_fences", "many_code_blocks"],
)
def test_hostile_reply_shapes_parse_within_bounds(reply):
    parsed = parse_reply(reply)
    assert len(parsed.code_blocks) <= MAX_CODE_BLOCKS
    assert len(parsed.notes) <= MAX_NOTES + 1
    assert len(parsed.text) <= len(reply)


def test_a_reply_past_the_size_bound_is_cut_with_a_note():
    parsed = parse_reply("```repl\nprint(1)\n```\n" + "x" * (MAX_REPLY_CHARS + 10))
    assert parsed.code_blocks == ["print(1)"]
    assert len(parsed.text) <= MAX_REPLY_CHARS
    assert any("only the first" in n for n in parsed.notes)


def test_extra_code_blocks_are_reported_not_run():
    parsed = parse_reply("```repl\nx = 1\n```\n" * (MAX_CODE_BLOCKS + 3))
    assert len(parsed.code_blocks) == MAX_CODE_BLOCKS
    assert any(f"first {MAX_CODE_BLOCKS}" in n for n in parsed.notes)


_HOSTILE_PIECES = st.sampled_from(
    ["```", "```repl", "```python\n", "~~~", "`", "-", "(", ")", "FINAL(", "FINAL_VAR(", '"', "'", "\u201c",
     "User:", "<|im_start|>", "**", "#", " ", "\t", "\n", "x", "\x00", "\\"]
)


@given(st.lists(st.tuples(_HOSTILE_PIECES, st.integers(1, 20_000)), max_size=12))
@settings(max_examples=150, deadline=None)
def test_long_runs_of_hostile_pieces_never_raise(runs):
    # Up to 12 runs of up to 20,000 repeats: replies up to ~2.6 MB; a parser
    # whose work grows faster than linearly would make this test crawl.
    reply = "".join(piece * count for piece, count in runs)
    parsed = parse_reply(reply)
    assert len(parsed.code_blocks) <= MAX_CODE_BLOCKS and len(parsed.notes) <= MAX_NOTES + 1


@given(st.text(max_size=5000))
@settings(max_examples=300, deadline=None)
def test_arbitrary_text_never_raises(reply):
    parsed = parse_reply(reply)
    assert len(parsed.code_blocks) <= MAX_CODE_BLOCKS and len(parsed.notes) <= MAX_NOTES + 1
