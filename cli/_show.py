"""`rlm show RUN_ID`: a run as a tree in the terminal.

Turns, their replies, cells with code and output, sub-call batches, child
runs nested, and the spend of every node. Long text is cut; the line under
it says where the whole text is (an object key, or `--json`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["render"]

REPLY_CHARS = 300
OUTPUT_CHARS = 300
CODE_LINES = 8
ITEM_LINES = 5
LINE_CHARS = 160


@dataclass
class Node:
    head: str
    lines: list[str] = field(default_factory=list)
    children: list[Node] = field(default_factory=list)


def _one_line(text: str | None, limit: int) -> str:
    flat = " ".join((text or "").split())
    return flat if len(flat) <= limit else flat[:limit] + f" ... [{len(flat) - limit:,} more chars]"


def _spend(s: dict[str, Any] | None) -> str:
    s = s or {}
    return f"${s.get('usd', 0.0):.4f} · {s.get('tokens', 0):,} tokens · {s.get('calls', 0):,} calls"


def _secs(x: float | None) -> str:
    return f"{x:.2f} s" if x is not None else "running"


def _where(bucket: str, key: str | None) -> str:
    return f"s3://{bucket}/{key}" if key else ""


def _code_lines(code: str) -> list[str]:
    lines = code.splitlines() or [""]
    out = ["code: " + _one_line(lines[0], LINE_CHARS)] + ["      " + line[:LINE_CHARS] for line in lines[1:CODE_LINES]]
    if len(lines) > CODE_LINES:
        out.append(f"      ... [{len(lines) - CODE_LINES} more lines: `rlm show --json`]")
    return out


def _item_node(item: dict[str, Any], bucket: str) -> Node:
    index = item.get("index", 0)
    if item.get("child_id"):
        child = item.get("child")
        if child is not None:
            node = run_node(child, bucket)
            node.head = f"[{index}] child " + node.head
            return node
        return Node(f"[{index}] child {item['child_id']} · {item.get('child_status')} · {_spend(item.get('spend'))}")
    state = "error" if item.get("answer_error") or item.get("error") else item.get("state", "?")
    node = Node(f"[{index}] {item.get('model') or '-'} · {state} · {_spend(item.get('spend'))}")
    node.lines.append("prompt: " + _one_line(item.get("prompt"), LINE_CHARS))
    if item.get("prompt_ref"):
        node.lines.append("  full prompt: " + _where(bucket, item["prompt_ref"]))
    if item.get("answer_error") or item.get("error"):
        node.lines.append("error: " + _one_line(item.get("answer_error") or item.get("error"), LINE_CHARS))
    else:
        node.lines.append("reply: " + _one_line(item.get("reply"), LINE_CHARS))
        if item.get("reply_ref"):
            node.lines.append("  full reply: " + _where(bucket, item["reply_ref"]))
    return node


def _batch_node(batch: dict[str, Any], bucket: str) -> Node:
    call = "llm_query" if batch.get("kind") == "llm" else "rlm_query"
    models = ", ".join(batch.get("models") or []) or "-"
    head = (
        f"{call} batch {batch.get('cell_id')}:{batch.get('seq')} · {batch.get('count', 0)} calls · {models} · "
        f"{batch.get('errors', 0)} errors · {_spend(batch.get('spend'))} · {_secs(batch.get('seconds'))}"
    )
    node = Node(head)
    if batch.get("refused"):
        node.lines.append("refused: " + _one_line(batch["refused"], LINE_CHARS))
    items = batch.get("items") or []
    node.children = [_item_node(i, bucket) for i in items[:ITEM_LINES]]
    if len(items) > ITEM_LINES:
        node.children.append(Node(f"... {len(items) - ITEM_LINES} more calls: `rlm show --json`"))
    return node


def _cell_node(cell: dict[str, Any], bucket: str) -> Node:
    if cell.get("state") in ("scheduled", "running"):
        state = "running"
    elif cell.get("error"):
        state = "error"
    elif cell.get("limit"):
        state = "limit"
    else:
        state = "ok"
    head = f"cell {cell.get('id')} · {state} · {_secs(cell.get('duration_s') or cell.get('seconds'))}"
    if cell.get("spend", {}).get("calls"):
        head += f" · {_spend(cell['spend'])}"
    if cell.get("warm") is False:  # its REPL was booted (and its context loaded) in its time
        head += " · new REPL"
    node = Node(head, _code_lines(cell.get("code") or ""))
    if cell.get("output"):
        node.lines.append("output: " + _one_line(cell["output"], OUTPUT_CHARS))
    if cell.get("output_key"):
        node.lines.append("  full output: " + _where(bucket, cell["output_key"]))
    if cell.get("error"):
        node.lines.append("error: " + _one_line(cell["error"].strip().splitlines()[-1], LINE_CHARS))
    if cell.get("limit"):
        node.lines.append("limit: " + _one_line(cell["limit"], LINE_CHARS))
    if cell.get("final") is not None:
        node.lines.append("FINAL: " + _one_line(cell["final"], LINE_CHARS))
    node.children = [_batch_node(b, bucket) for b in cell.get("batches") or []]
    return node


def _turn_node(turn: dict[str, Any], bucket: str) -> Node:
    tokens = f"{turn.get('prompt_tokens') or 0:,} in / {turn.get('completion_tokens') or 0:,} out"
    head = f"turn {turn['turn']} · {turn.get('model') or '-'} · {tokens} · {_spend(turn.get('spend'))} · {_secs(turn.get('seconds'))}"
    node = Node(head)
    if turn.get("error"):
        node.lines.append("error: " + _one_line(turn["error"], LINE_CHARS))
    elif turn.get("reply") is not None:
        node.lines.append("reply: " + _one_line(turn["reply"], REPLY_CHARS))
        if len(turn["reply"]) > REPLY_CHARS and turn.get("transcript_key"):
            node.lines.append("  full reply: " + _where(bucket, turn["transcript_key"]))
    else:
        node.lines.append("reply: (waiting for the model)")
    node.children = [_cell_node(c, bucket) for c in turn.get("cells") or []]
    return node


def run_node(trace: dict[str, Any], bucket: str) -> Node:
    status = trace.get("status")
    head = f"run {trace['workflow_id']} · {status} · {len(trace.get('turns') or [])} turns · {_spend(trace.get('spend'))}"
    ctx = trace.get("context") or {}
    models = trace.get("models") or {}
    lines = [
        "question: " + _one_line(trace.get("question"), LINE_CHARS),
        f"context: {ctx.get('total_chars') or 0:,} chars in {ctx.get('doc_count') or 0} documents · "
        f"models: root {models.get('root')}, sub {models.get('sub') or models.get('root')}",
    ]
    progress = trace.get("progress")
    if progress:
        lines.append(
            f"now: turn {progress.get('turn')} of {progress.get('max_turns')} · {progress.get('phase')} · "
            f"{progress.get('open_subcalls', 0)} sub-calls open"
        )
    if trace.get("reason"):
        lines.append("reason: " + _one_line(trace["reason"], LINE_CHARS))
    if trace.get("answer") is not None:
        lines.append("answer: " + _one_line(trace["answer"], LINE_CHARS))
    if trace.get("depth", 0) == 0:
        lines.append("temporal ui: " + trace.get("ui", ""))
    return Node(head, lines, [_turn_node(t, bucket) for t in trace.get("turns") or []])


def render(trace: dict[str, Any], bucket: str) -> str:
    """The whole tree as text, one node per line plus its detail lines."""
    out: list[str] = []

    def walk(node: Node, prefix: str, last: bool, root: bool) -> None:
        branch, carry = ("", "") if root else (("└─ ", "   ") if last else ("├─ ", "│  "))
        out.append(prefix + branch + node.head)
        inner = prefix + carry
        bar = "│  " if node.children else "   "
        out.extend(inner + bar + line for line in node.lines)
        for i, child in enumerate(node.children):
            walk(child, inner, i == len(node.children) - 1, False)

    walk(run_node(trace, bucket), "", True, True)
    return "\n".join(out)
