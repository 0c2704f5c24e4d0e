"""Texts of budget refusals.

The model (or the guest code) reads these, so each one says which cap, its
limit, what is spent and held, what was asked for, and how to adapt.
"""

from __future__ import annotations

from datetime import datetime

# How the model can adapt, per cap.
_ADVICE = {
    "usd": (
        "Use smaller prompts (filter the context with code and send only the "
        "relevant parts), make fewer sub-calls, or give your final answer now."
    ),
    "tokens": (
        "Use smaller prompts (filter the context with code and send only the "
        "relevant parts), make fewer sub-calls, or give your final answer now."
    ),
    "calls": (
        "Make fewer, larger sub-calls (batch several items into one prompt), "
        "or give your final answer now."
    ),
}

_UNITS = {"usd": "USD", "tokens": "tokens", "calls": "model calls"}


def amount(dim: str, value: float) -> str:
    """`value` of money dimension `dim`, written for a reader."""
    if dim == "usd":
        return f"${value:,.4f}"
    return f"{int(value):,} {_UNITS[dim]}"


def money(
    dim: str, *, limit: float, spent: float, held: float, need: float, what: str
) -> str:
    """Refusal of `what` (a call, a child run) under the `dim` cap."""
    left = max(0.0, limit - spent - held)
    return (
        f"Budget refused ({_UNITS[dim]} cap): {what} needs up to {amount(dim, need)}, "
        f"but only {amount(dim, left)} remain of the limit of {amount(dim, limit)} "
        f"(spent {amount(dim, spent)}; held for calls and child runs in flight: "
        f"{amount(dim, held)}). {_ADVICE[dim]}"
    )


def cap_reached(dim: str, *, limit: float, spent: float) -> str:
    """The `dim` cap is already used up."""
    return (
        f"Budget exhausted ({_UNITS[dim]} cap): spent {amount(dim, spent)} of the "
        f"limit of {amount(dim, limit)}. No further model calls are possible; "
        f"give your final answer now."
    )


def child_slice(dim: str, *, limit: float, spent: float, held: float) -> str:
    """A child run would get nothing of `dim`."""
    left = max(0.0, limit - spent - held)
    return (
        f"Budget refused ({_UNITS[dim]} cap): a child run needs a slice of what "
        f"remains, but {amount(dim, left)} remain of the limit of "
        f"{amount(dim, limit)} (spent {amount(dim, spent)}; held for calls and "
        f"child runs in flight: {amount(dim, held)}). "
        f"Use llm_query on a filtered part of the context instead of rlm_query, "
        f"or give your final answer now."
    )


def turns(*, limit: int, used: int) -> str:
    return (
        f"Budget exhausted (turns cap): {used} of {limit} turns used. "
        f"Give your final answer now with FINAL(...)."
    )


def no_turns_to_start() -> str:
    return (
        "Budget too small to start: max_turns is 0, so the run could not take a "
        "single turn. Set max_turns to 1 or more."
    )


def wall_time(*, deadline: datetime, now: datetime) -> str:
    over = (now - deadline).total_seconds()
    return (
        f"Budget exhausted (wall time cap): the run tree's deadline "
        f"{deadline.isoformat()} passed {over:,.1f} s ago. "
        f"Give your final answer now with what you have."
    )


def depth(*, depth: int) -> str:
    return (
        f"Recursion refused (depth cap): this run is at depth {depth}, the deepest "
        f"allowed, so it cannot start child runs. rlm_query here runs as a single "
        f"llm_query on question + context; keep that prompt small."
    )


def start_money(dim: str, *, limit: float, committed: float, need: float) -> str:
    """The first model call of a run does not fit the `dim` cap."""
    return (
        f"Budget too small to start ({_UNITS[dim]} cap): the first model call "
        f"needs up to {amount(dim, need)}, but the limit is {amount(dim, limit)}"
        f" (already committed {amount(dim, committed)}). Raise max_{dim} to at "
        f"least {amount(dim, committed + need)}, or make the first call smaller "
        f"(shorter question, lower max output tokens)."
    )


def tool_calls(*, limit: int, spent: int, held: int) -> str:
    """A custom-tool call past `max_tool_calls` (the run goes on)."""
    return (
        f"Budget refused (tool calls cap): {spent:,} of the limit of {limit:,} tool calls "
        f"are used ({held:,} more in flight), so this tool call was not made. "
        f"Work with the results you have, or give your final answer."
    )
