"""What a running run's `set_caps` update may change (workflows/run.py).

The validator refuses a change before it is accepted, so the handler never
fails after it: a value the request itself would refuse (a cap past
the request's bounds overflows the deadline's arithmetic), a concurrency the
run's lanes were sized by when it started, and, on a child run, any raise of
a cap its slice of the tree's budget bounds (its parent reserved only that
slice, so a raise there would let the tree spend past the root's caps).
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from workflows.budget import Caps, money_cap_problem
from workflows.request import caps_past_bounds, validation_errors

# Caps that bound the whole tree below a run: a child's are its grant.
TREE_CAPS = ("max_usd", "max_tokens", "max_calls", "max_tool_calls", "max_wall_s", "deadline", "max_depth")


def caps_change_problem(
    current: Caps, changes: dict[str, Any], *, root_workflow_id: str | None, unpriced: list[str] | None = None
) -> str | None:
    """Why `changes` may not be applied to a run with caps `current`, or None.
    `root_workflow_id`: set for a child run (where to raise caps instead);
    `unpriced`: the run's models with no known price (a money cap cannot bind them)."""
    unknown = set(changes) - set(Caps.model_fields)
    if unknown:
        return f"unknown caps {sorted(unknown)}; known: {sorted(Caps.model_fields)}"
    try:
        new = Caps.model_validate({**current.model_dump(), **changes})
    except ValidationError as exc:
        return f"caps refused: {validation_errors(exc)}"
    if too_large := caps_past_bounds(new, changes):
        return "caps refused: " + "; ".join(too_large)
    if "max_usd" in changes and (unbound := money_cap_problem(new.max_usd, unpriced or [])):
        return "caps refused: " + unbound
    if new.max_concurrency != current.max_concurrency:
        return (
            f"caps refused: max_concurrency is fixed when a run starts (this one runs {current.max_concurrency} "
            "sub-calls at once); start a new run to change it"
        )
    if root_workflow_id is not None:
        raised = [name for name in TREE_CAPS if _raised(getattr(current, name), getattr(new, name))]
        if raised:
            return (
                f"caps refused: {', '.join(raised)} of a child run may only be lowered (its caps are its share "
                f"of the tree's budget); raise them on the root run {root_workflow_id}"
            )
    return None


def _raised(old: Any, new: Any) -> bool:
    """None is no limit: from a value to None is a raise."""
    return old is not None and (new is None or new > old)
