"""Value models of the budget ledger: amounts, caps, refusals, child slices,
and the comparisons against a cap (with the USD slack).

Public through `workflows.budget`; kept apart so the ledger module holds only
the accounting rules.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MONEY = ("usd", "tokens", "calls")

# Slack on USD comparisons so that float rounding (0.1 + 0.2 > 0.3) never
# refuses a call that fits exactly; a nano-dollar per run is immaterial.
USD_SLACK = 1e-9


class LedgerError(ValueError):
    """The ledger was used wrongly (a bug in the caller, not a budget refusal)."""


def require_aware(value: datetime | None, name: str) -> None:
    if value is not None and value.utcoffset() is None:
        raise LedgerError(
            f"{name} must be a timezone-aware datetime (got {value!r}); "
            f"pass workflow.now() or datetime.now(timezone.utc)"
        )


class Spend(BaseModel):
    """An amount of use: dollars, tokens and model calls."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    usd: float = Field(0.0, ge=0, allow_inf_nan=False)
    """Dollars (0 for models with no known price; tokens still count)."""
    tokens: int = Field(0, ge=0)
    """Prompt plus completion tokens."""
    calls: int = Field(0, ge=0)
    """Model calls (root turns and sub-calls)."""
    tool_calls: int = Field(0, ge=0)
    """Calls of custom tools (`RunRequest.tools`); not model calls."""

    def __add__(self, other: Spend) -> Spend:
        return Spend(
            usd=self.usd + other.usd,
            tokens=self.tokens + other.tokens,
            calls=self.calls + other.calls,
            tool_calls=self.tool_calls + other.tool_calls,
        )


class Remaining(BaseModel):
    """What is left under each money cap; `None` = unlimited, never negative."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    usd: float | None
    tokens: int | None
    calls: int | None
    tool_calls: int | None = None


class Caps(BaseModel):
    """Limits of a run; `None` = unlimited. A child's caps are its slice of the parent's."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_usd: float | None = Field(None, ge=0, allow_inf_nan=False)
    """Dollars for the whole tree below (and including) this run."""
    max_tokens: int | None = Field(None, ge=0)
    """Prompt plus completion tokens for the whole tree."""
    max_calls: int | None = Field(None, ge=0)
    """Model calls (root turns and sub-calls) for the whole tree."""
    max_turns: int = Field(20, ge=0)
    """Root turns of this run (not tree-wide; each child has its own)."""
    max_wall_s: float | None = Field(None, gt=0, allow_inf_nan=False)
    """Wall time in seconds, measured from this run's `started_at`. Set it on the
    root; children get `deadline` instead (the root's absolute deadline)."""
    deadline: datetime | None = None
    """Absolute end of the tree's wall time (timezone-aware). `child_grant` sets
    it to the parent's deadline. When both this and `max_wall_s` are set, the
    earlier end wins."""
    max_depth: int = Field(2, ge=0)
    """Levels of recursion allowed below this run (the root is depth 0). A child
    gets its parent's value minus one; at 0, rlm_query falls back to llm_query."""
    max_tool_calls: int | None = Field(None, ge=0)
    """Calls of custom tools for the whole tree; a call past it is refused
    (the guest gets an error string), the run goes on."""
    max_errors: int | None = Field(None, ge=1)
    """Cells that may fail in a row (an exception or a limit hit) before the
    run ends with status `max_errors` and its best answer so far; per run."""
    max_concurrency: int = Field(32, ge=1)
    """Sub-calls that run at once in this run and the child runs below it: a
    batch of child runs shares it (see `Ledger.child_grant`)."""

    @field_validator("deadline")
    @classmethod
    def _deadline_aware(cls, value: datetime | None) -> datetime | None:
        require_aware(value, "Caps.deadline")
        return value


class Refusal(BaseModel):
    """Why a reservation (or the run) cannot go on; `message` is for the model."""

    model_config = ConfigDict(frozen=True)

    cap: Literal["usd", "tokens", "calls", "turns", "wall_time", "depth", "tool_calls", "errors"]
    message: str


class ChildSlice(BaseModel):
    """A slice of this run's budget given to a child run."""

    model_config = ConfigDict(frozen=True)

    held: Spend
    """Reserved in the parent while the child runs (0 in unlimited dimensions)."""
    caps: Caps
    """The caps given to the child."""
    used: Spend | None = None
    """What the child reported; `None` while it runs."""


def reached(dim: str, have: float, cap: float) -> bool:
    """Is the cap used up (nothing more, not even a free call, fits)?"""
    slack = USD_SLACK if dim == "usd" else 0
    return have >= cap - slack


def fits(dim: str, have: float, need: float, cap: float) -> bool:
    """Does `need` fit on top of `have` under `cap`?"""
    slack = USD_SLACK if dim == "usd" else 0
    return not reached(dim, have, cap) and have + need <= cap + slack


def excess(use: Spend, usd: float | None, tokens: int | None, calls: int | None) -> Spend:
    """How far `use` went past the given bounds (None = no bound)."""
    return Spend(
        usd=0.0 if usd is None else max(0.0, use.usd - usd),
        tokens=0 if tokens is None else max(0, use.tokens - tokens),
        calls=0 if calls is None else max(0, use.calls - calls),
    )
