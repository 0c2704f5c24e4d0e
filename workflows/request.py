"""What a caller sends to start an RLM run and what it gets back.

These models are the public contract of the `RLMRun` workflow: any Temporal
client (any SDK) starts a run with a `RunRequest` as JSON and reads a
`RunResult`. They carry references and summaries only: no secrets, no large
text.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from workflows.budget import Caps, Spend
from workflows.refs import BlobRef, ContextRef

RunStatus = Literal["completed", "budget_exhausted", "max_turns", "cancelled", "failed"]


class ModelChoice(BaseModel):
    """Which configured model plays which part of the run tree."""

    root: str
    """Model that writes the REPL code at depth 0."""
    sub: str | None = None
    """Model for `llm_query` sub-calls; defaults to `root`."""
    per_depth: dict[int, str] = Field(default_factory=dict)
    """Root model of child runs at a given depth (1, 2, ...); defaults to `root`."""

    def sub_model(self) -> str:
        return self.sub or self.root

    def root_at(self, depth: int) -> str:
        return self.per_depth.get(depth, self.root)

    def allowed(self) -> list[str]:
        """Names that guest code may pick with `model=`."""
        names = [self.root, self.sub_model(), *self.per_depth.values()]
        return list(dict.fromkeys(names))


class RunLimits(BaseModel):
    """Per-step limits: how long and how large one step may be."""

    cell_timeout_s: float = 120.0
    """Guest CPU/wall time for one cell; time waiting on sub-calls does not count."""
    cell_memory_mb: int = 2048
    """Linear-memory cap of the WASM REPL."""
    output_chars: int = 20_000
    """Printed output of one cell kept in the transcript (the rest is stored)."""
    root_max_output_tokens: int | None = None
    """Cap on one root reply; None = the model's own maximum (at most 8192)."""
    sub_max_output_tokens: int | None = None
    """Cap on one sub-call reply; None = the model's own maximum (at most 4096)."""
    model_call_timeout_s: float = 300.0
    """Start-to-close timeout of one model call activity."""
    continue_after_updates: int = 1_000
    """Start a fresh run of the chain (continue-as-new) at the next turn
    boundary once this many sub-call updates were made (the server keeps at
    most 2,000 per run); also done when Temporal suggests it (history size)."""


class ParentLink(BaseModel):
    """Set on child runs: where they sit in the tree."""

    parent_workflow_id: str
    root_workflow_id: str
    call_id: str


class RunRequest(BaseModel):
    """Input of the `RLMRun` workflow."""

    question: str
    context: ContextRef
    models: ModelChoice
    caps: Caps = Field(default_factory=Caps)
    limits: RunLimits = Field(default_factory=RunLimits)
    depth: int = 0
    """0 for a run started by a caller; children are parent depth + 1."""
    parent: ParentLink | None = None
    resume: ResumeState | None = None
    """Set only by continue-as-new: the state carried into the next run."""


class ModelUsage(BaseModel):
    """Usage of one model (or one depth) summed over calls."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usd: float = 0.0

    def add(self, other: ModelUsage) -> None:
        self.calls += other.calls
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.usd += other.usd


class ChildSummary(BaseModel):
    """One child run in the result tree."""

    workflow_id: str
    question: str
    """The child's question, cut to 200 characters."""
    status: RunStatus
    spend: Spend
    children: list[ChildSummary] = Field(default_factory=list)


class Usage(BaseModel):
    """Spend of a run and its subtree, broken down."""

    by_model: dict[str, ModelUsage] = Field(default_factory=dict)
    by_depth: dict[int, ModelUsage] = Field(default_factory=dict)

    def record(self, model: str, depth: int, usage: ModelUsage) -> None:
        self.by_model.setdefault(model, ModelUsage()).add(usage)
        self.by_depth.setdefault(depth, ModelUsage()).add(usage)

    def merge(self, other: Usage) -> None:
        for name, u in other.by_model.items():
            self.by_model.setdefault(name, ModelUsage()).add(u)
        for depth, u in other.by_depth.items():
            self.by_depth.setdefault(depth, ModelUsage()).add(u)

    def total(self) -> ModelUsage:
        out = ModelUsage()
        for u in self.by_model.values():
            out.add(u)
        return out


class ResumeState(BaseModel):
    """State carried across continue-as-new at a turn boundary (a cell never
    spans two runs of the chain, so no sub-call is in flight)."""

    turn: int
    cells: int
    snapshot_key: str | None
    transcript_key: str | None
    pending: list[dict[str, str]]
    """Messages the next root turn appends to the transcript."""
    prompt_tokens: int
    usage: Usage
    ledger: dict
    children: list[ChildSummary]
    warned_unseen: bool = False


class RunResult(BaseModel):
    """Output of the `RLMRun` workflow."""

    answer: str | None
    """The final answer (cut to 64 KB; the whole answer is at `answer_ref`)."""
    answer_ref: BlobRef | None = None
    status: RunStatus
    reason: str | None = None
    """Why the run ended other than `completed`: the cap hit, the error."""
    turns: int
    spend: Spend
    """Total spend of this run and its subtree."""
    usage: Usage
    workflow_id: str
    run_id: str
    root_workflow_id: str
    depth: int
    transcript_key: str | None = None
    """Object key of the root model's transcript (the trajectory)."""
    children: list[ChildSummary] = Field(default_factory=list)


RunRequest.model_rebuild()
