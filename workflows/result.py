"""What an `RLMRun` returns: the answer, how the run ended, and its spend
(in all, by model, by depth) with the tree of child runs below it.

Its own module so the request (workflows/request.py) and the result each
stay one screenful of fields; the JSON Schema of both is published by
`rlm schema` (workflows/schemas/run.schema.json).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from workflows.budget import Spend
from workflows.refs import BlobRef, JsonList, SkippedDocument

__all__ = [
    "ANSWER_INLINE_BYTES", "CHILD_RESULT_BYTES", "MAX_TREE_NODES_INLINE", "ChildSummary", "ModelUsage", "RunResult", "RunStatus", "Usage", "bounded_tree",
]  # fmt: skip

ANSWER_INLINE_BYTES = 64 * 1024
"""UTF-8 bytes of the answer inline in a result; the whole answer is at answer_ref."""
CHILD_RESULT_BYTES = ANSWER_INLINE_BYTES + 160 * 1024
"""Most a child's RunResult adds to its parent's history: the inline answer,
and the tree of up to MAX_TREE_NODES_INLINE runs (200 x ~500 bytes), usage."""

RunStatus = Literal["completed", "budget_exhausted", "max_turns", "max_errors", "cancelled", "failed"]


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
    children: JsonList[ChildSummary] = Field(default_factory=list)
    """Runs below it, as far as the result's tree summary goes (see `bounded_tree`)."""
    runs_below: int = 0
    """Every run in its subtree (itself excluded), listed in `children` or not."""


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


class RunResult(BaseModel):
    """Output of the `RLMRun` workflow."""

    answer: str | None
    """The final answer (cut to 64 KB; the whole answer is at `answer_ref`)."""
    answer_ref: BlobRef | None = None
    answer_value: Any | None = None
    """With `RunRequest.answer_schema`: the answer parsed as JSON, valid
    against the schema. None when no schema was given, or when the answer
    still did not validate after being sent back once; the run is then
    `completed` with the answer text kept and `reason` naming the
    validation error (`answer_schema: ...`)."""
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
    children: JsonList[ChildSummary] = Field(default_factory=list)
    """The tree of child runs, breadth first, cut to `MAX_TREE_NODES_INLINE`
    runs; each child's own result holds its subtree."""
    runs_below: int = 0
    """Every run in the tree below this one, listed in `children` or not."""
    skipped_documents: JsonList[SkippedDocument] = Field(default_factory=list)
    """Files of the context left out as unreadable (`on_unreadable: "skip"`),
    the first 50 with the reason; `skipped_count` counts them all."""
    skipped_count: int = 0
    snapshot_key: str | None = None
    """Object key of the REPL state the run ended in (its last cell's; the
    state it started from if no cell ran): a later run continues from it
    with `repl_snapshot_key`."""


MAX_TREE_NODES_INLINE = 200
"""Child runs listed in a result (a tree of thousands would pass the payload limit)."""


def bounded_tree(children: list[ChildSummary], max_nodes: int = MAX_TREE_NODES_INLINE) -> list[ChildSummary]:
    """A copy of the tree with at most `max_nodes` runs, breadth first, so the
    levels nearest the run are the ones kept; `runs_below` keeps the counts."""
    keep: set[int] = set()
    level, left = list(children), max_nodes
    while level and left > 0:
        taken = level[:left]
        keep.update(id(node) for node in taken)
        left -= len(taken)
        level = [child for node in taken for child in node.children]

    def copy(node: ChildSummary) -> ChildSummary:
        return node.model_copy(update={"children": [copy(c) for c in node.children if id(c) in keep]})

    return [copy(node) for node in children if id(node) in keep]


ChildSummary.model_rebuild()
