"""Short texts that make a run readable in the Temporal UI.

Each activity and child workflow gets a one-line summary (the SDK's
`summary=`), a run gets a static summary and details when it starts, and the
workflow's current details show its progress as Markdown. Everything here is
a pure function of values the workflow already holds: deterministic (no
clock, no I/O) and bounded in size, so a long question or a huge cell never
bloats the history.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from workflows.request import RunRequest

__all__ = [
    "MAX_DETAILS_CHARS",
    "MAX_SUMMARY_CHARS",
    "cell_summary",
    "child_run_summary",
    "clip",
    "compaction_summary",
    "human_count",
    "llm_call_summary",
    "llm_calls_summary",
    "progress_details",
    "root_turn_summary",
    "run_static_details",
    "run_static_summary",
    "tool_call_summary",
]

# A summary is one line in the UI's timeline; details are a small Markdown card.
MAX_SUMMARY_CHARS = 200
MAX_DETAILS_CHARS = 2000
SEP = " · "


def clip(text: str, limit: int) -> str:
    """`text` on one line, at most `limit` characters ("..." marks a cut)."""
    flat = " ".join(text.split())
    if len(flat) <= limit:
        return flat
    return flat[: max(0, limit - 4)].rstrip() + " ..."


def human_count(n: float) -> str:
    """12345 -> "12.3K", 2_500_000 -> "2.5M"; small numbers as they are."""
    n = float(n)
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            value = f"{n / size:.1f}".removesuffix(".0")
            return value + unit
    return f"{int(n)}" if n == int(n) else f"{n:.1f}"


def _usd(x: float) -> str:
    return f"${x:.4f}" if x < 1 else f"${x:,.2f}"


def root_turn_summary(turn: int, model: str, prompt_tokens: int) -> str:
    """`turn 3 · root · gpt-4.1 · 12.3K tokens in` (the tokens the call sends)."""
    text = SEP.join([f"turn {turn}", "root", model, f"{human_count(prompt_tokens)} tokens in"])
    return clip(text, MAX_SUMMARY_CHARS)


def cell_summary(cell_id: str, code: str) -> str:
    """`cell t3c1 · chunks = [context[i:i+200000] ...`: the first line of code
    that does something (comments and blank lines skipped)."""
    first = next(
        (line.strip() for line in code.splitlines() if line.strip() and not line.strip().startswith("#")),
        "(no code)",
    )
    more = len([line for line in code.splitlines() if line.strip()]) > 1
    head = f"cell {cell_id}{SEP}"
    room = MAX_SUMMARY_CHARS - len(head)
    line = clip(first, room)
    if more and not line.endswith(" ...") and len(line) + 4 <= room:
        line += " ..."
    return head + line


def llm_call_summary(index: int, count: int, model: str) -> str:
    """`llm_query 17/200 · gpt-4.1-mini` (1-based index within its batch)."""
    where = "llm_query" if count == 1 else f"llm_query {index}/{count}"
    return clip(f"{where}{SEP}{model}", MAX_SUMMARY_CHARS)


def llm_calls_summary(places: list[tuple[int, int]], models: list[str]) -> str:
    """A group of calls in one activity: `llm_query x8: 1-8/200 · gpt-4.1-mini`
    (1-based places within their batches; runs of places shown as ranges)."""
    parts: list[str] = []
    for index, count in places:
        last = parts[-1] if parts else ""
        head, _, tail = last.rpartition("-") if "-" in last else ("", "", last)
        prev = tail.split("/")[0]
        if last and tail.endswith(f"/{count}") and prev.isdigit() and int(prev) == index - 1:
            parts[-1] = f"{head or last.split('/')[0]}-{index}/{count}"
        else:
            parts.append(f"{index}/{count}")
    where = f"llm_query x{len(places)}: " + ", ".join(parts)
    return clip(where + SEP + ", ".join(dict.fromkeys(models)), MAX_SUMMARY_CHARS)


def compaction_summary(turns: int, model: str, prompt_tokens: int) -> str:
    """`compact · turns 1-7 · root · gpt-4.1 · 98.2K tokens in`."""
    text = SEP.join(["compact", f"turns 1-{turns}", "root", model, f"{human_count(prompt_tokens)} tokens in"])
    return clip(text, MAX_SUMMARY_CHARS)


def tool_call_summary(name: str, args_json: str) -> str:
    """`tool ledger_lookup · {"id": 3}`."""
    return clip(f"tool {name}{SEP}{args_json}", MAX_SUMMARY_CHARS)


def child_run_summary(question: str, depth: int, index: int = 1, count: int = 1) -> str:
    """A child run reads as its question: `rlm_query d1 2/3 · Which vendor ...`."""
    where = f"rlm_query d{depth}" + (f" {index}/{count}" if count > 1 else "")
    return where + SEP + clip(question, MAX_SUMMARY_CHARS - len(where) - len(SEP))


def _context_text(req: RunRequest) -> str:
    ctx = req.context
    docs = "1 document" if ctx.doc_count == 1 else f"{ctx.doc_count:,} documents"
    return f"{human_count(ctx.total_chars)} chars in {docs} ({human_count(ctx.total_bytes)} bytes)"


def _models_text(req: RunRequest) -> str:
    models = req.models
    text = f"root {models.root}, sub {models.sub_model()}"
    for depth, name in sorted(models.per_depth.items()):
        text += f", depth {depth} {name}"
    return text


def _caps_text(caps: Any) -> str:
    parts = [f"{caps.max_turns} turns"]
    if caps.max_usd is not None:
        parts.append(_usd(caps.max_usd))
    if caps.max_tokens is not None:
        parts.append(f"{human_count(caps.max_tokens)} tokens")
    if caps.max_calls is not None:
        parts.append(f"{caps.max_calls:,} calls")
    if caps.max_wall_s is not None:
        parts.append(f"{caps.max_wall_s:g} s")
    parts.append(f"depth {caps.max_depth}")
    parts.append(f"concurrency {caps.max_concurrency}")
    return ", ".join(parts)


def run_static_summary(req: RunRequest) -> str:
    """One line for the run list: depth, question, context size, root model."""
    where = "RLM" if req.depth == 0 else f"RLM d{req.depth}"
    tail = f"{SEP}{human_count(req.context.total_chars)} chars{SEP}{req.models.root_at(req.depth)}"
    return where + SEP + clip(req.question, MAX_SUMMARY_CHARS - len(where) - len(SEP) - len(tail)) + tail


def run_static_details(req: RunRequest) -> str:
    """Markdown card: question, context size and documents, models, caps."""
    lines = [
        f"**Question:** {clip(req.question, 600)}",
        f"**Context:** {_context_text(req)}, sha256 `{req.context.sha256[:12]}`",
        f"**Models:** {_models_text(req)}",
        f"**Caps:** {_caps_text(req.caps)}",
    ]
    if req.parent is not None:
        lines.append(f"**Parent:** `{clip(req.parent.parent_workflow_id, 200)}` call `{req.parent.call_id[:80]}`")
    return _bounded("\n\n".join(lines))


def _spend_line(spent: Mapping[str, Any], caps: Mapping[str, Any]) -> str:
    """`$0.0123 of $1.00, 45.6K tokens, 7 of 100 calls` (no "of" without a cap)."""
    usd, cap_usd = spent.get("usd", 0.0), caps.get("max_usd")
    parts = [_usd(usd) + (f" of {_usd(cap_usd)}" if cap_usd is not None else "")]
    for key, unit in (("tokens", "tokens"), ("calls", "calls")):
        value, cap = spent.get(key, 0), caps.get(f"max_{key}")
        parts.append(human_count(value) + (f" of {human_count(cap)}" if cap is not None else "") + f" {unit}")
    return ", ".join(parts)


def progress_details(
    *,
    turn: int,
    max_turns: int,
    phase: str,
    spent: Mapping[str, Any],
    caps: Mapping[str, Any],
    open_subcalls: int = 0,
    done_subcalls: int = 0,
    children: int = 0,
) -> str:
    """Markdown for the workflow's current details while it runs.

    `spent` and `caps` are `Spend` / `Caps` as dicts (`model_dump()`)."""
    lines = [
        f"**Turn** {turn} of {max_turns} · {clip(phase, 80)}",
        f"**Spend** {_spend_line(spent, caps)}",
        f"**Sub-calls** {open_subcalls:,} open, {done_subcalls:,} done · **child runs** {children:,}",
    ]
    return _bounded("\n\n".join(lines))


def _bounded(text: str) -> str:
    return text if len(text) <= MAX_DETAILS_CHARS else text[: MAX_DETAILS_CHARS - 4] + " ..."
