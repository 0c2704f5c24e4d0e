"""Inputs and outputs of the steps a run schedules: model check, root turn,
cell, sub-call batch. Shared by `workflows/` and `activities/`; small by
design (large text travels as a `BlobRef`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from workflows.refs import BlobRef, ContextRef


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
    prompt_profile: Literal["full", "compact"] = "full"
    """System prompt style for this model."""
    stop: list[str] = Field(default_factory=list)
    """Stop sequences sent with every call."""


class ResolveModelsInput(BaseModel):
    names: list[str]


class ResolveModelsOutput(BaseModel):
    models: dict[str, ModelInfo]


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


class RootTurnOutput(BaseModel):
    reply: str
    prompt_tokens: int
    completion_tokens: int
    usd: float
    transcript_key: str
    usage_estimated: bool = False


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


class SubcallItem(BaseModel):
    """One `llm_query` prompt or one `rlm_query` question."""

    text: str | None = None
    text_ref: BlobRef | None = None
    text_chars: int
    context: ContextRef | None = None
    """rlm_query only: the child's context (None = the parent's)."""


class SubcallBatch(BaseModel):
    """Sent by a cell to its workflow as the `subcalls` update."""

    cell_id: str
    seq: int
    kind: Literal["llm", "rlm"]
    model: str | None = None
    items: list[SubcallItem]
    digest: str
    """Hash of the batch's content: a retried cell sending different prompts
    under the same ids is detected and not answered from memory."""


class SubcallAnswer(BaseModel):
    text: str | None = None
    text_ref: BlobRef | None = None
    error: str | None = None


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


class LlmCallOutput(BaseModel):
    text: str | None = None
    text_ref: BlobRef | None = None
    prompt_tokens: int
    completion_tokens: int
    usd: float
