"""What a caller sends to a session (`RLMSession`) and gets back.

A session holds one context and one REPL across many questions: each `ask`
is an RLM run of its own (a child `RLMRun`) that starts from the REPL state
the previous question left. These models are the public contract of the
session workflow, like `RunRequest` / `RunResult` for a single run: small,
references and summaries only.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from workflows.budget import Caps, Spend
from workflows.context_input import ContextInput
from workflows.request import (
    MAX_QUESTION_CHARS,
    REQUEST_CAP_BOUNDS,
    caps_past_bounds,
    ModelChoice,
    RunLimits,
    check_answer_schema_field,
    check_question_text,
    check_tool_names,
    validation_errors,
)
from workflows.result import RunStatus, Usage
from workflows.refs import JsonList
from workflows.tool_steps import MAX_TOOLS_PER_RUN

SESSION_HISTORY_VAR = "session_history"
"""The REPL variable that lists a session's earlier questions and answers
(not `history`: that name is the compacted transcript of a run)."""
MAX_RECENT_ASKS = 50
"""Questions listed in a session's summary (all are counted in `questions`)."""
RECORDED_QUESTION_CHARS = 200
"""What a session's summary keeps of each question."""
SESSION_NOTE_CHARS = 400
"""Room kept in a question for the note that tells the model it is in a session."""
MAX_SESSION_QUESTION_CHARS = MAX_QUESTION_CHARS - SESSION_NOTE_CHARS


class SessionCaps(BaseModel):
    """Money caps for the whole session, across all its questions; `None` =
    unlimited. Each question also has caps of its own (`Caps`)."""

    model_config = {"extra": "forbid", "frozen": True}

    max_usd: float | None = Field(None, ge=0, allow_inf_nan=False)
    max_tokens: int | None = Field(None, ge=0)
    max_calls: int | None = Field(None, ge=0)


class SessionRequest(BaseModel):
    """Input of the `RLMSession` workflow."""

    # As RunRequest: a field no model knows is refused, not dropped.
    model_config = {"extra": "forbid"}

    context: ContextInput
    """As `RunRequest.context`: a ContextRef, inline text or texts, or an S3 URI."""
    models: ModelChoice
    caps: SessionCaps = Field(default_factory=SessionCaps)
    """Caps for the whole session (every question and its sub-calls together)."""
    question_caps: Caps = Field(default_factory=Caps)
    """Caps of each question unless its `ask` gives its own; a question's
    money caps are further bounded by what is left of the session's."""
    limits: RunLimits = Field(default_factory=RunLimits)
    tools: JsonList[str] = Field(default_factory=list, max_length=MAX_TOOLS_PER_RUN)
    """As `RunRequest.tools`: the custom tools every question's run may call."""
    continue_after_questions: int = Field(100, ge=1)
    """Questions per run of the session's chain: after this many (or when
    Temporal suggests it) the session continues as new between questions,
    carrying its REPL snapshot, its budget totals and its recent questions."""
    resume: SessionResume | None = None
    """Set only by continue-as-new."""

    _tools_are_names = field_validator("tools")(lambda v: check_tool_names(v))

    @field_validator("question_caps")
    @classmethod
    def _question_caps_allow_a_turn(cls, value: Caps) -> Caps:
        return _allow_a_turn(value, "question_caps")


class AskRequest(BaseModel):
    """Input of the `ask` update."""

    # Unknown fields are kept, not dropped, so that the update's validator can
    # refuse them (`unknown_fields_problem`): a `max_usd` beside `caps` would
    # otherwise ask with no money cap of its own. Refusing them while decoding
    # instead would also break the replay of asks accepted before.
    model_config = ConfigDict(extra="allow")

    question: str = Field(min_length=1, max_length=MAX_SESSION_QUESTION_CHARS)
    answer_schema: dict[str, Any] | None = None
    """As `RunRequest.answer_schema`, for this question: the answer must be
    JSON valid against it (`RunResult.answer_value`)."""
    caps: dict[str, Any] = Field(default_factory=dict)
    """Caps of this question that differ from the session's `question_caps`
    (e.g. `{"max_usd": 0.05}`); its money caps are still bounded by what
    is left of the session's."""

    _question_has_text = field_validator("question")(lambda v: check_question_text(v))
    _answer_schema_is_a_schema = field_validator("answer_schema")(lambda v: check_answer_schema_field(v))

    @field_validator("caps")
    @classmethod
    def _caps_are_known(cls, value: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(value) - set(Caps.model_fields))
        if unknown:
            raise ValueError(f"unknown caps {unknown}; known: {sorted(Caps.model_fields)}")
        return value

    def unknown_fields_problem(self) -> str | None:
        """The fields of this ask no model knows, named, or None."""
        if not self.model_extra:
            return None
        return "; ".join(f"{name}: Extra inputs are not permitted" for name in sorted(self.model_extra)) + (
            f" (an ask has {', '.join(type(self).model_fields)})"
        )

    def caps_over(self, base: Caps) -> Caps:
        """This question's caps: `base` with the changes in `caps` (ValueError
        naming the field when they do not make valid caps)."""
        try:
            caps = Caps.model_validate({**base.model_dump(), **self.caps})
        except ValidationError as exc:
            raise ValueError("caps: " + validation_errors(exc)) from None
        # The question runs as a RunRequest: caps past its bounds (given here or
        # in the session's question_caps) would fail it after it was accepted.
        too_large = caps_past_bounds(caps, self.caps.keys(), prefix="caps.") + caps_past_bounds(
            caps, REQUEST_CAP_BOUNDS.keys() - self.caps.keys(), prefix="the session's question_caps."
        )
        if too_large:
            raise ValueError("; ".join(too_large))
        return _allow_a_turn(caps, "caps")


def _allow_a_turn(caps: Caps, field: str) -> Caps:
    if caps.max_turns < 1:
        raise ValueError(f"{field}.max_turns must be at least 1 (a question needs a turn to answer)")
    return caps


class QuestionAnswer(BaseModel):
    """One answered question, as the REPL's `session_history` holds it."""

    question: str
    answer: str | None
    status: RunStatus


class AskRecord(BaseModel):
    """One question of the session, in its summary."""

    number: int
    """1-based, over the whole session (continue-as-new included)."""
    question: str
    """Cut to RECORDED_QUESTION_CHARS characters."""
    workflow_id: str
    """The question's own run (`<session id>/q<number>`)."""
    status: RunStatus
    spend: Spend
    turns: int
    ask_id: str | None = None
    """The `ask` update's id. Temporal answers an update sent again under its
    id only within one run of the session: sent again after the session
    continued as new, it is refused by this record, not run a second time."""
    question_sha256: str | None = None
    """sha256 of the whole question (None in records made before it, which
    compare the cut `question`): templated questions often share far more
    than RECORDED_QUESTION_CHARS characters before they differ."""

    @classmethod
    def cut(cls, question: str) -> str:
        return question[:RECORDED_QUESTION_CHARS]

    @staticmethod
    def digest(question: str) -> str:
        return hashlib.sha256(question.encode("utf-8", "surrogatepass")).hexdigest()

    def asks(self, question: str) -> bool:
        """`question` is this record's: an id sent again with another question
        is a caller's mistake, not a retry."""
        if self.question_sha256 is not None:
            return self.question_sha256 == self.digest(question)
        return self.question == self.cut(question)


class SessionResume(BaseModel):
    """State carried across continue-as-new (always between questions)."""

    asked: int
    snapshot_key: str | None
    unrecorded: list[QuestionAnswer]
    """Answers not yet appended to the REPL's `session_history` (its cell failed)."""
    ledger: dict
    usage: Usage
    recent: list[AskRecord]
    opened_at: datetime
    runs: int
    """Runs of the chain before this one."""


class SessionSummary(BaseModel):
    """Result of `close`, of the workflow, and of the `session` query."""

    session_id: str
    state: Literal["open", "closed"]
    questions: int
    spend: Spend
    """Total over every question of the session."""
    caps: SessionCaps
    usage: Usage
    recent: list[AskRecord] = Field(default_factory=list)
    """The last `MAX_RECENT_ASKS` questions."""
    snapshot_key: str | None = None
    """The REPL state a next question would start from."""
    opened_at: datetime
    runs: int = 1
    """Runs of the session's continue-as-new chain so far, this one included."""


SessionRequest.model_rebuild()
