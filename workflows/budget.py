"""Budget ledger: caps that hold for a whole tree of RLM runs.

Pure, deterministic code that runs inside workflows: no I/O, no clock, no
randomness; the current time is always passed in (`workflow.now()`).

How the tree stays under its caps. Each run has one `Ledger`. Before a model
call the run reserves the call's worst case (prompt tokens + max output
tokens, priced); the reservation is refused unless spent + reserved + worst
case fits every cap. After the call it settles to the actual use. Each
attempt of a call is reserved on its own, before it starts; an attempt that
failed after its request may have reached the provider (a timeout, a dropped
connection, a 5xx, a malformed reply) is charged: what the provider reported,
or else its whole reservation (`charge`); one refused before any work (429,
401, 400) is released and costs nothing. A child run
gets a slice of what remains; the slice stays reserved in the parent until
the child reports what it used (`child_settle`), and the child's own ledger
enforces the slice as its caps. So at every moment, for each cap,
spent + in flight over the whole tree <= cap (tests/test_budget.py checks this
with hypothesis over random interleavings).

Money dimensions are `usd`, `tokens` and `calls`; `None` means unlimited in
`Caps` and in `Remaining`. Turns are per run; wall time is one absolute
deadline for the tree; depth counts down: a child's `max_depth` is what is
left below it.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from typing import Literal

from pydantic import BaseModel, Field, field_validator

from workflows import _budget_messages as msg
from workflows._budget_children import child_slice
from workflows._budget_models import (
    MONEY,
    Caps,
    ChildSlice,
    LedgerError,
    Refusal,
    Remaining,
    Spend,
    excess,
    fits,
    reached,
    require_aware,
)
from workflows._budget_pricing import (
    MAX_BELIEVABLE_TOKENS,
    actual,
    equal_share,
    messages_token_bound,
    money_cap_problem,
    token_bound,
    worst_case,
)

__all__ = [
    "Caps",
    "Spend",
    "Remaining",
    "Refusal",
    "ChildSlice",
    "Ledger",
    "LedgerError",
    "worst_case",
    "actual",
    "equal_share",
    "token_bound",
    "MAX_BELIEVABLE_TOKENS",
    "messages_token_bound",
    "money_cap_problem",
]


class Ledger(BaseModel):
    """One run's budget: its caps, what it spent, and what it holds in flight.

    Serializes with `model_dump` / `model_validate` (workflow state, Temporal
    payloads, continue-as-new).
    """

    caps: Caps
    depth: int = Field(0, ge=0)
    """Depth of this run in the tree (root = 0); for reports and model choice.
    The depth cap itself is `caps.max_depth`, which counts down."""
    started_at: datetime
    """When this run started; `caps.max_wall_s` is measured from here."""
    turns: int = 0
    """Root turns taken by this run."""
    settled: Spend = Spend()
    """Actual use of finished calls plus what finished children reported."""
    overrun: Spend = Spend()
    """How far actual use went past reservations (over-reported usage); it is
    already counted in `settled`, kept here to be reported."""
    open_calls: dict[str, Spend] = Field(default_factory=dict)
    """Reservations of calls in flight, by call id."""
    closed_calls: dict[str, Literal["settled", "charged", "released"]] = Field(
        default_factory=dict
    )
    """Calls that finished, by call id (makes reserve/settle idempotent):
    settled with their use, charged after a failure that may have been billed,
    or released after one that cost nothing."""
    children: dict[str, ChildSlice] = Field(default_factory=dict)
    """Slices granted to child runs, by child id."""

    @field_validator("started_at")
    @classmethod
    def _started_aware(cls, value: datetime) -> datetime:
        require_aware(value, "started_at")
        return value

    @classmethod
    def root(cls, caps: Caps, started_at: datetime, *, depth: int = 0) -> Ledger:
        """The ledger of a run that starts now with `caps`.

        A child run passes the caps from its parent's `child_grant` and its own
        depth (parent's depth + 1).
        """
        return cls(caps=caps, started_at=started_at, depth=depth)

    # -- reading -----------------------------------------------------------

    @property
    def deadline(self) -> datetime | None:
        """Absolute end of wall time for this run, or None."""
        ends = [self.caps.deadline] if self.caps.deadline else []
        if self.caps.max_wall_s is not None:
            ends.append(self.started_at + timedelta(seconds=self.caps.max_wall_s))
        return min(ends) if ends else None

    def spent(self) -> Spend:
        """Actual use so far: settled calls and finished children."""
        return self.settled

    def reserved(self) -> Spend:
        """Held in flight: open call reservations and slices of running children."""
        # Plain sums, not Spend additions: this runs before every call of a
        # batch of possibly a thousand, so it must stay cheap.
        held = list(self.open_calls.values())
        held += [child.held for child in self.children.values() if child.used is None]
        return Spend(
            usd=math.fsum(h.usd for h in held),
            tokens=sum(h.tokens for h in held),
            calls=sum(h.calls for h in held),
            tool_calls=sum(h.tool_calls for h in held),
        )

    def remaining(self) -> Remaining:
        """Cap minus spent minus reserved, per money dimension (0 at least)."""
        committed = self.spent() + self.reserved()
        left: dict[str, float | int | None] = {}
        for dim in MONEY:
            cap = getattr(self.caps, f"max_{dim}")
            left[dim] = None if cap is None else max(0, cap - getattr(committed, dim))
        tool_cap = self.caps.max_tool_calls
        left["tool_calls"] = None if tool_cap is None else max(0, tool_cap - committed.tool_calls)
        return Remaining(**left)

    def exhausted(self, now: datetime) -> Refusal | None:
        """The first cap already hit (ends the run as `budget_exhausted`), or None."""
        if refusal := self._wall_refusal(now):
            return refusal
        for dim in MONEY:
            cap = getattr(self.caps, f"max_{dim}")
            spent = getattr(self.settled, dim)
            if cap is not None and reached(dim, spent, cap):
                return Refusal(cap=dim, message=msg.cap_reached(dim, limit=cap, spent=spent))
        if self.turns >= self.caps.max_turns:
            return self._turns_refusal()
        return None

    def check_depth(self) -> Refusal | None:
        """Refusal if this run may not start child runs (rlm_query -> llm_query)."""
        if self.caps.max_depth <= 0:
            return Refusal(cap="depth", message=msg.depth(depth=self.depth))
        return None

    def check_start(
        self, *, est_first_call: Spend, now: datetime | None = None
    ) -> Refusal | None:
        """Refusal if the run cannot even make its first call (reject before start)."""
        if self.caps.max_turns < 1:
            return Refusal(cap="turns", message=msg.no_turns_to_start())
        if now is not None and (refusal := self._wall_refusal(now)):
            return refusal
        committed = self.spent() + self.reserved()
        for dim in MONEY:
            cap = getattr(self.caps, f"max_{dim}")
            have, need = getattr(committed, dim), getattr(est_first_call, dim)
            if cap is not None and not fits(dim, have, need, cap):
                text = msg.start_money(dim, limit=cap, committed=have, need=need)
                return Refusal(cap=dim, message=text)
        return None

    # -- model calls -------------------------------------------------------

    def reserve(self, call_id: str, worst_case: Spend, now: datetime) -> Refusal | None:
        """Hold `worst_case` for a model call, or refuse it.

        Idempotent per call_id: a call already open keeps its first reservation;
        a call already settled returns None and holds nothing (its use is
        counted; answer it from the remembered result, do not call the model).
        A released call may be reserved again (a new attempt).
        """
        if call_id in self.open_calls or self.closed_calls.get(call_id) in ("settled", "charged"):
            return None
        if refusal := self._wall_refusal(now):
            return refusal
        if refusal := self._money_refusal(worst_case, "this model call"):
            return refusal
        self.closed_calls.pop(call_id, None)
        self.open_calls[call_id] = worst_case
        return None

    def settle(self, call_id: str, actual: Spend) -> None:
        """Replace the call's reservation by its actual use (idempotent).

        Use above the reservation (a model over-reporting) is counted in full
        and recorded in `overrun`.
        """
        self._close(call_id, actual, "settled")

    def charge(self, call_id: str, reported: Spend | None = None) -> Spend:
        """Count an attempt that failed but may have been billed (idempotent).

        A timeout, a connection dropped after the request was sent, a 5xx or a
        malformed reply: the provider may have done (and billed) the work. It
        costs `reported` (the usage the provider sent, if any), else its whole
        reservation, the most it could have cost. Returns what was counted.
        """
        if self.closed_calls.get(call_id) in ("settled", "charged"):
            return Spend()
        use = reported if reported is not None else self.open_calls.get(call_id, Spend())
        self._close(call_id, use, "charged")
        return use

    def release(self, call_id: str) -> None:
        """Drop the reservation of a call that failed before any use (refused
        before the provider did any work: 429, 401, 400, a bad request).

        A no-op for a call that is not open (already released or settled, or
        whose reservation was refused), so cleanup paths may always call it.
        """
        if self.open_calls.pop(call_id, None) is not None:
            self.closed_calls[call_id] = "released"

    def reserve_tool_call(self, call_id: str, now: datetime) -> Refusal | None:
        """Hold one custom-tool call under `max_tool_calls`, or refuse it.

        Idempotent per call_id like `reserve`; finish it with `settle(call_id,
        Spend(tool_calls=1))`. Money caps do not apply: a tool is not a model.
        """
        if call_id in self.open_calls or self.closed_calls.get(call_id) in ("settled", "charged"):
            return None
        if refusal := self._wall_refusal(now):
            return refusal
        cap = self.caps.max_tool_calls
        spent, held = self.spent().tool_calls, self.reserved().tool_calls
        if cap is not None and spent + held + 1 > cap:
            return Refusal(cap="tool_calls", message=msg.tool_calls(limit=cap, spent=spent, held=held))
        self.closed_calls.pop(call_id, None)
        self.open_calls[call_id] = Spend(tool_calls=1)
        return None

    # -- turns ---------------------------------------------------------------

    def reserve_turn(self, now: datetime) -> Refusal | None:
        """Count one root turn of this run, or refuse (turns cap, wall time).

        The turn's model call is reserved separately with `reserve`.
        """
        if refusal := self._wall_refusal(now):
            return refusal
        if self.turns >= self.caps.max_turns:
            return self._turns_refusal()
        self.turns += 1
        return None

    # -- child runs --------------------------------------------------------

    def child_grant(
        self, child_id: str, now: datetime, *, share: float | None = None, parallel: int = 1
    ) -> Caps | Refusal:
        """Give a child run `share` (default: all) of what remains, as its caps
        (cut by `_budget_children.child_slice`).

        The slice stays reserved here until `child_settle`. For a batch of n
        children granted one after another, pass `share=equal_share(i, n)` to
        give each the same slice; `parallel` children run at once (a batch of
        n under this run's concurrency cap c: min(n, c)). Idempotent per
        child_id.
        """
        if child_id in self.children:
            return self.children[child_id].caps
        if share is not None and not 0 < share <= 1:
            raise LedgerError(f"child_grant share must be in (0, 1], got {share!r}")
        if parallel < 1:
            raise LedgerError(f"child_grant parallel must be >= 1, got {parallel!r}")
        fraction = 1.0 if share is None else share
        if refusal := self.check_depth():
            return refusal
        if refusal := self._wall_refusal(now):
            return refusal
        granted = child_slice(
            self.caps,
            self.remaining(),
            self.spent(),
            self.reserved(),
            fraction=fraction,
            parallel=parallel,
            deadline=self.deadline,
        )
        if isinstance(granted, Refusal):
            return granted
        self.children[child_id] = granted
        return granted.caps

    def child_settle(self, child_id: str, used: Spend | None) -> None:
        """Replace the child's slice by what it used (idempotent).

        `used=None` (the child failed without reporting) counts the whole slice,
        the most it could have spent. Use above the slice is counted in full
        and recorded in `overrun`.
        """
        child = self.children.get(child_id)
        if child is None:
            raise LedgerError(
                f"child_settle({child_id!r}): no slice was granted to this child; "
                f"call child_grant() before starting a child run"
            )
        if child.used is not None:
            return
        used = child.held if used is None else used
        self.children[child_id] = child.model_copy(update={"used": used})
        self.settled += used
        self.overrun += excess(
            used, child.caps.max_usd, child.caps.max_tokens, child.caps.max_calls
        )

    # -- steering ------------------------------------------------------------

    def set_caps(self, **changes: object) -> None:
        """Raise or lower caps mid-run (from an Update).

        Lowering below what is spent makes the next reservation refuse and
        `exhausted` report the cap; children already running keep their slices.
        """
        unknown = sorted(set(changes) - set(Caps.model_fields))
        if unknown:
            raise LedgerError(
                f"set_caps: unknown cap(s) {unknown}; known caps are {sorted(Caps.model_fields)}"
            )
        self.caps = Caps.model_validate({**self.caps.model_dump(), **changes})

    def compacted(self) -> Ledger:
        """A copy for continue-as-new that forgets finished calls and children.

        Totals are kept; only the ids that made reserve/settle idempotent for
        finished work are dropped (about 20 bytes per call, which would
        otherwise grow the payload without bound). The next run must not reuse
        those ids, which holds when ids include the run's cell numbers.
        """
        return self.model_copy(
            update={
                "open_calls": dict(self.open_calls),
                "closed_calls": {},
                "children": {k: c for k, c in self.children.items() if c.used is None},
            }
        )

    # -- internals -------------------------------------------------------------

    def _close(self, call_id: str, use: Spend, state: Literal["settled", "charged"]) -> None:
        if self.closed_calls.get(call_id) in ("settled", "charged"):
            return
        held = self.open_calls.pop(call_id, None)
        if held is None:
            was = self.closed_calls.get(call_id, "never reserved")
            verb = "settle" if state == "settled" else "charge"
            raise LedgerError(
                f"{verb}({call_id!r}): this call has no open reservation ({was}); "
                f"reserve() a call before calling the model and settle or charge it once"
            )
        self.settled += use
        self.overrun += excess(use, held.usd, held.tokens, held.calls)
        self.closed_calls[call_id] = state

    def _turns_refusal(self) -> Refusal:
        return Refusal(cap="turns", message=msg.turns(limit=self.caps.max_turns, used=self.turns))

    def _wall_refusal(self, now: datetime) -> Refusal | None:
        require_aware(now, "now")
        deadline = self.deadline
        if deadline is not None and now >= deadline:
            return Refusal(cap="wall_time", message=msg.wall_time(deadline=deadline, now=now))
        return None

    def _money_refusal(self, need: Spend, what: str) -> Refusal | None:
        spent, held = self.spent(), self.reserved()
        for dim in MONEY:
            cap = getattr(self.caps, f"max_{dim}")
            have = getattr(spent, dim) + getattr(held, dim)
            if cap is not None and not fits(dim, have, getattr(need, dim), cap):
                text = msg.money(
                    dim,
                    limit=cap,
                    spent=getattr(spent, dim),
                    held=getattr(held, dim),
                    need=getattr(need, dim),
                    what=what,
                )
                return Refusal(cap=dim, message=text)
        return None

