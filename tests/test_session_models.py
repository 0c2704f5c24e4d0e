"""Pure logic of sessions (no servers): request checks that name the field,
the cell that records answers in the REPL, the note the model is given."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from workflows.budget import Caps
from workflows.request import parse_request
from workflows.session_history import session_question
from workflows.session_history import MAX_UNRECORDED_BYTES, history_code, newest_that_fit
from workflows.session_models import SESSION_HISTORY_VAR, AskRequest, QuestionAnswer, SessionRequest


def test_a_start_snapshot_must_be_a_run_snapshot_key():
    base = {"question": "q", "context": "x", "models": {"root": "m"}}
    assert "repl_snapshot_key" in parse_request({**base, "repl_snapshot_key": "../other/secret"})
    ok = parse_request({**base, "repl_snapshot_key": "runs/s~q1/snapshots/t1c1.bin"})
    assert not isinstance(ok, str) and ok.repl_snapshot_key == "runs/s~q1/snapshots/t1c1.bin"


def test_ask_caps_are_checked_against_the_session_caps_and_named():
    with pytest.raises(ValidationError, match="max_dollars"):
        AskRequest(question="q", caps={"max_dollars": 1})
    with pytest.raises(ValueError, match="caps.max_turns"):
        AskRequest(question="q", caps={"max_turns": 0}).caps_over(Caps())
    with pytest.raises(ValueError, match="caps: max_usd"):
        AskRequest(question="q", caps={"max_usd": -1}).caps_over(Caps())
    caps = AskRequest(question="q", caps={"max_usd": 0.5}).caps_over(Caps(max_turns=7, max_calls=9))
    assert (caps.max_usd, caps.max_turns, caps.max_calls) == (0.5, 7, 9)
    with pytest.raises(ValidationError, match="question"):
        AskRequest(question="   ")
    with pytest.raises(ValidationError, match="answer_schema"):
        AskRequest(question="q", answer_schema={"type": 5})
    # A misplaced cap is named, not dropped (the update's validator refuses it).
    misplaced = AskRequest.model_validate({"question": "q", "max_usd": 0.5, "budget": {}})
    assert misplaced.unknown_fields_problem() == (
        "budget: Extra inputs are not permitted; max_usd: Extra inputs are not permitted "
        "(an ask has question, answer_schema, caps)"
    )
    assert AskRequest(question="q", caps={"max_usd": 0.5}).unknown_fields_problem() is None


def test_session_request_fields_are_named():
    with pytest.raises(ValidationError, match="continue_after_questions"):
        SessionRequest(context="x", models={"root": "m"}, continue_after_questions=0)
    with pytest.raises(ValidationError, match="question_caps.max_turns"):
        SessionRequest(context="x", models={"root": "m"}, question_caps={"max_turns": 0})
    with pytest.raises(ValidationError, match="max_usd"):
        SessionRequest(context="x", models={"root": "m"}, caps={"max_usd": -2})


def test_history_cell_appends_and_recovers_a_rebound_name():
    answers = [QuestionAnswer(question="a 'quoted' \"q\"\n", answer=None, status="failed"),
               QuestionAnswer(question="b", answer="x" * 10, status="completed")]
    ns: dict = {}
    exec(history_code(answers[:1]), ns)
    exec(history_code(answers[1:]), ns)
    assert [h["question"] for h in ns[SESSION_HISTORY_VAR]] == ["a 'quoted' \"q\"\n", "b"]
    ns[SESSION_HISTORY_VAR] = "the model's own value"  # rebound: the next answer starts a list
    exec(history_code(answers[1:]), ns)
    assert ns[SESSION_HISTORY_VAR] == [{"question": "b", "answer": "x" * 10, "status": "completed"}]


def test_the_question_tells_the_model_what_the_repl_holds():
    assert "question 1 of a session" in session_question("q?", 1)
    later = session_question("q?", 3)
    assert later.startswith("q?\n\n") and f"`{SESSION_HISTORY_VAR}`" in later and "question 3" in later


def test_history_cell_names_no_builtin_the_model_may_have_rebound():
    answers = [QuestionAnswer(question="a", answer="1", status="completed")]
    ns: dict = {"list": ["x"], "isinstance": None, "globals": "mine", "type": 3}
    exec(history_code(answers), ns)
    exec(history_code(answers), ns)
    assert ns[SESSION_HISTORY_VAR] == [{"question": "a", "answer": "1", "status": "completed"}] * 2


def test_answers_waiting_for_the_history_cell_are_bounded():
    big = [QuestionAnswer(question=f"q{i} " + "\x01" * 60_000, answer="a", status="completed") for i in range(40)]
    kept = newest_that_fit(big)
    assert kept == big[-len(kept):] and 1 < len(kept) < len(big)
    assert len(history_code(kept).encode()) <= MAX_UNRECORDED_BYTES + 500
    huge = [QuestionAnswer(question="q", answer="\x02" * 300_000, status="completed")] * 2
    assert newest_that_fit(huge) == huge[-1:]  # the newest is kept whatever its size
    # Bytes, not characters: CJK text is three bytes a character in the payload.
    wide = [QuestionAnswer(question="\u6f22" * 200_000, answer="a", status="completed")] * 3
    assert len(newest_that_fit(wide)) == 1


def test_an_ask_record_tells_questions_apart_past_the_characters_it_keeps():
    """An ask id sent again is a retry only with the same question; templated
    questions share long beginnings (the record keeps 200 characters)."""
    from workflows.budget import Spend
    from workflows.session_models import RECORDED_QUESTION_CHARS, AskRecord

    template = "Audit the invoices against the purchase orders. " * 10
    first, other = template + "Vendor: Acme.", template + "Vendor: Beta."
    assert first[:RECORDED_QUESTION_CHARS] == other[:RECORDED_QUESTION_CHARS]
    record = AskRecord(number=1, question=AskRecord.cut(first), workflow_id="s/q1", status="completed",
                       spend=Spend(), turns=1, ask_id="k", question_sha256=AskRecord.digest(first))
    assert record.asks(first) and not record.asks(other)
    # Records made before the hash compare what they kept (a session started by older code).
    older = record.model_copy(update={"question_sha256": None})
    assert older.asks(first) and older.asks(other) and not older.asks("Something else.")
    # Any text a caller can send hashes, lone surrogates included.
    assert not record.asks(first + "\ud800")
