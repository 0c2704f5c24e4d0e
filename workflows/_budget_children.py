"""How a child run's caps are cut from what its parent has left.

Part of the budget ledger (`workflows.budget.Ledger.child_grant`); pure.
"""

from __future__ import annotations

from datetime import datetime

from workflows import _budget_messages as msg
from workflows._budget_models import MONEY, USD_SLACK, Caps, ChildSlice, Refusal, Remaining, Spend


def child_slice(
    caps: Caps,
    left: Remaining,
    spent: Spend,
    in_flight: Spend,
    *,
    fraction: float,
    parallel: int,
    deadline: datetime | None,
) -> ChildSlice | Refusal:
    """`fraction` of what is `left` under the parent's `caps`, as a child's caps.

    Unlimited dimensions stay unlimited; a limited one whose slice is empty
    refuses (the child could not make a single call). The child's caps carry
    the tree's absolute deadline and `max_depth - 1`; the turns cap is copied;
    its concurrency cap is the parent's divided by the `parallel` children
    running at once (at least 1), so the tree keeps the parent's cap.
    """
    held = Spend(
        usd=0.0 if left.usd is None else left.usd * fraction,
        tokens=0 if left.tokens is None else int(left.tokens * fraction),
        calls=0 if left.calls is None else int(left.calls * fraction),
        # No refusal below when this is 0: a child may do without tools.
        tool_calls=0 if left.tool_calls is None else int(left.tool_calls * fraction),
    )
    for dim in MONEY:
        cap = getattr(caps, f"max_{dim}")
        slack = USD_SLACK if dim == "usd" else 0
        if cap is not None and getattr(held, dim) <= slack:
            text = msg.child_slice(dim, limit=cap, spent=getattr(spent, dim), held=getattr(in_flight, dim))
            return Refusal(cap=dim, message=text)
    limited = [d for d in MONEY if getattr(caps, f"max_{d}") is not None]
    child_caps = Caps.model_validate(
        {
            **caps.model_dump(),
            **{f"max_{d}": getattr(held, d) for d in limited},
            **({} if caps.max_tool_calls is None else {"max_tool_calls": held.tool_calls}),
            "max_wall_s": None,
            "deadline": deadline,
            "max_depth": caps.max_depth - 1,
            "max_concurrency": max(1, caps.max_concurrency // parallel),
        }
    )
    return ChildSlice(held=held, caps=child_caps)
