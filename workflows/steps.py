"""Inputs and outputs of the steps a run schedules: model check, root turn,
cell, sub-call batch. Shared by `workflows/` and `activities/`; small by
design (large text travels as a `BlobRef`)."""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from workflows.refs import BlobRef, ContextRef, ContextURI


class ModelInfo(BaseModel):
    """What a workflow knows about a model (resolved by the worker and stored
    in history, so: no secrets)."""

    model_config = ConfigDict(frozen=True)

    name: str
    """Configured model name."""
    context_window: int
    """Input window in tokens."""
    max_output_tokens: int
    """Largest reply in tokens; a call's budget reservation is prompt tokens plus this."""
    usd_per_input_token: float
    """0.0 when the price is unknown (calls still count tokens)."""
    usd_per_output_token: float
    """0.0 when the price is unknown."""
    priced: bool = True
    """False when neither the model's configuration nor litellm's price map
    gives both prices: its calls then count $0, so a money cap cannot limit
    them (histories from before this field read as priced)."""
    prompt_profile: Literal["full", "compact"] = "full"
    """System prompt style for this model."""
    stop: list[str] = Field(default_factory=list)
    """Stop sequences sent with every call."""


class ResolveModelsInput(BaseModel):
    names: list[str]
    fields: dict[str, str] = Field(default_factory=dict)
    """The request's field of each name (`models.root`, `models.sub`,
    `models.per_depth.1`), so an unknown model is reported by its field."""
    context: ContextRef | None = None
    """A caller's ContextRef, checked in the same step (one small read: its
    manifest), so a run given a ref that names nothing fails before its first
    turn. Folded into this step rather than a step of its own: a run started
    with a ref then still costs one local step and no new patch."""


class ResolveModelsOutput(BaseModel):
    models: dict[str, ModelInfo]
    context: ContextRef | None = None
    """The stored context's reference, rebuilt from its manifest, when a
    caller's ref was checked (its numbers, not the caller's, reach the prompt)."""
    context_problem: str | None = None
    """Why a caller's ContextRef cannot be used (no such context, a corrupt
    manifest): the run fails with it."""


class IngestContextInput(BaseModel):
    """A caller's context that is not yet stored: inline text, a list of
    texts (both bounded by `MAX_INLINE_CONTEXT_BYTES`), or S3 files."""

    workflow_id: str
    text: str | None = None
    texts: list[str] | None = None
    uri: ContextURI | None = None
    on_unreadable: Literal["fail", "skip"] = "fail"
    """`RunRequest.on_unreadable`: what a file that cannot be converted does."""


class RootTurnInput(BaseModel):
    workflow_id: str
    turn: int
    """1-based; the transcript after this turn is stored under this number."""
    model: str
    append: list[dict[str, str]]
    """Messages to add to the transcript of the previous turn before the call."""
    max_tokens: int
    stop: list[str] = Field(default_factory=list)
    transcript_prev_key: str | None = None
    """Transcript the turn builds on: None on the first turn of a run chain."""
    attempt: int = 1
    """1 for the first attempt; a later one first looks for the record of an
    earlier attempt that finished unseen (workflows/model_attempts.py)."""
    warm_repl: CellInput | None = None
    """The REPL the run's next cell starts from (`code` unused), on each
    run's first turn: the worker makes it while the model answers, so the
    cell finds its context loaded and its snapshot restored. None: nothing
    to prepare (the worker keeps the REPL between a run's cells)."""


class RootTurnOutput(BaseModel):
    reply: str
    prompt_tokens: int
    completion_tokens: int
    usd: float
    transcript_key: str
    usage_estimated: bool = False
    replayed: bool = False
    """Read from an earlier attempt's record: no model call was made now."""
    final_ref: BlobRef | None = None
    """The reply's `FINAL(...)` answer, stored whole when it is longer than a
    result holds inline (ANSWER_INLINE_BYTES): the run's `answer_ref`."""


class CellInput(BaseModel):
    workflow_id: str
    cell_id: str
    """Unique within the workflow (e.g. `t3c1`); prefixes the sub-call ids."""
    code: str
    context: ContextRef
    snapshot_key: str | None
    """REPL state to start from; None = a fresh REPL."""
    timeout_s: float
    memory_mb: int
    output_chars: int
    tools: list[str] = Field(default_factory=list)
    """Custom tools the cell may call (the run's `tools`)."""
    history_key: str | None = None
    """Set once the run's transcript was compacted: `history()` reads it."""


# RootTurnInput.warm_repl names CellInput, defined after it.
RootTurnInput.model_rebuild()


class CellOutput(BaseModel):
    output: str
    """Printed output, capped for the transcript."""
    output_key: str | None = None
    """Full printed output when it was capped."""
    error: str | None = None
    limit: str | None = None
    """Which sandbox limit the cell hit, as a sentence; None if none."""
    restored_names: list[str] = Field(default_factory=list)
    final: str | None = None
    """Answer given by FINAL / FINAL_VAR inside the cell (cut to 64 KB)."""
    final_ref: BlobRef | None = None
    snapshot_key: str | None = None
    unsaved: list[str] = Field(default_factory=list)
    duration_s: float = 0.0
    subcalls: int = 0
    warm: bool = False
    """The cell found its REPL ready on its worker (kept from the run's
    previous cell, or made while the model answered): no boot, context load
    or restore in its time."""


class SubcallItem(BaseModel):
    """One `llm_query` prompt or one `rlm_query` question."""

    text: str | None = None
    text_ref: BlobRef | None = None
    text_chars: int = Field(ge=0)
    context: ContextRef | None = None
    """rlm_query only: the child's context (None = the parent's)."""
    occurrence: int = Field(0, ge=0)
    """How many times the cell asked this same item before (same kind, model,
    text and context): two equal questions of one cell are two calls."""

    def text_sha256(self) -> str:
        """Hash of the text, the same whether it travels inline or by ref."""
        if self.text_ref is not None:
            return self.text_ref.sha256
        return hashlib.sha256((self.text or "").encode()).hexdigest()


MAX_BATCH_ITEMS = 1_000
"""Items in one `subcalls` update; a cell's host splits larger batches (each
item costs a few hundred bytes of update payload and reply)."""


def item_digest(kind: str, model: str | None, item: SubcallItem) -> str:
    """What one sub-call asks: an item asked again (a cell re-run after a
    crash, in any order) has the same digest and gets the recorded answer."""
    what = [kind, model, item.text_sha256(), item.context.sha256 if item.context else None, item.occurrence]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()


class SubcallBatch(BaseModel):
    """Sent by a cell to its workflow as the `subcalls` update."""

    cell_id: str = Field(min_length=1, max_length=64)
    seq: int = Field(ge=1)
    kind: Literal["llm", "rlm"]
    model: str | None = None
    items: list[SubcallItem]
    digest: str
    """`batch_digest` of the items: part of the update id, because Temporal
    answers an update id it has seen with the first result whatever the
    payload (DESIGN.md section 9)."""

    def item_digests(self) -> list[str]:
        return [item_digest(self.kind, self.model, item) for item in self.items]

    def update_id(self) -> str:
        """The update id that names exactly this batch of this cell."""
        return f"{self.cell_id}:{self.seq}:{self.digest[:32]}"


def batch_digest(kind: str, model: str | None, items: list[SubcallItem]) -> str:
    return hashlib.sha256("".join(item_digest(kind, model, i) for i in items).encode()).hexdigest()


class SubcallAnswer(BaseModel):
    text: str | None = None
    text_ref: BlobRef | None = None
    error: str | None = None
    child_workflow_id: str | None = None
    """Set instead of `text` when a child run's answer is too long to travel
    inline in this reply: read it from the child's result."""


class SubcallReply(BaseModel):
    answers: list[SubcallAnswer]


class LlmCallInput(BaseModel):
    workflow_id: str
    call_id: str
    model: str
    prompt: str | None = None
    prompt_ref: BlobRef | None = None
    context: ContextRef | None = None
    """Appended to the prompt (rlm_query at the depth cap)."""
    max_tokens: int
    inline_limit: int
    """Replies longer than this come back as a BlobRef."""
    attempt: int = 1
    """As in `RootTurnInput.attempt`."""
    earlier_groups: list[str] = Field(default_factory=list)
    """Records of the `llm_calls` groups that carried earlier attempts of this
    call and ended without reporting it (their activity failed as a whole):
    the call may have completed there (activities/_call_records.py)."""


class LlmCallOutput(BaseModel):
    text: str | None = None
    text_ref: BlobRef | None = None
    prompt_tokens: int
    completion_tokens: int
    usd: float
    replayed: bool = False
    """As in `RootTurnOutput.replayed`."""


class LlmCallFailure(BaseModel):
    """One call of an `llm_calls` group that failed: the ApplicationError the
    single-call activity would have raised, as data."""

    message: str
    type: str | None = None
    non_retryable: bool = False
    retry_after_s: float | None = None
    details: dict = Field(default_factory=dict)
    """As `to_application_error` gives them: billable, usage, model, status_code."""


class LlmCallResult(BaseModel):
    call_id: str
    output: LlmCallOutput | None = None
    failure: LlmCallFailure | None = None


class LlmCallsInput(BaseModel):
    """Several `llm_query` attempts carried by one activity (workflows/call_groups.py)."""

    calls: list[LlmCallInput]
    call_timeout_s: float
    """Each call's own deadline inside the group (the run's model_call_timeout_s)."""
    records: str | None = None
    """Name under which the group records its calls' replies, several to an
    object; None: one object per call (what workflows before it ask)."""
    lanes: int | None = None
    """How many of the calls may be in flight at once; each call's own
    deadline starts when it does. None: all at once."""


class LlmCallsOutput(BaseModel):
    results: list[LlmCallResult]
    """One per call, in the order of `LlmCallsInput.calls`."""
