"""What `set_caps` may change in a running run (workflows/caps_update.py):
pure logic, no servers. The end-to-end refusal of a bad `set_caps` is in
tests/test_hostile_requests.py."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from workflows.budget import Caps
from workflows.caps_update import caps_change_problem

ROOT_CAPS = Caps(max_usd=1.0, max_tokens=100_000, max_calls=50, max_turns=10, max_depth=2, max_concurrency=8)
CHILD_CAPS = Caps(
    max_usd=0.5, max_tokens=50_000, max_calls=20, max_turns=10, max_depth=1, max_concurrency=8,
    deadline=datetime(2030, 1, 1, tzinfo=timezone.utc),
)  # fmt: skip


@pytest.mark.parametrize(
    "changes",
    [{"max_usd": 0.5}, {"max_usd": 5.0, "max_turns": 0}, {"max_tokens": None}, {"max_wall_s": 3600.0}, {"max_depth": 16}],
)
def test_a_root_run_may_raise_or_lower_its_caps_within_the_request_bounds(changes):
    assert caps_change_problem(ROOT_CAPS, changes, root_workflow_id=None) is None


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"max_wall_s": 1e12}, "max_wall_s is 1,000,000,000,000.0 (at most 3.16224e+07)"),
        ({"max_depth": 100}, "max_depth is 100 (at most 16)"),
        ({"max_turns": 10**7}, "max_turns is 10,000,000 (at most 10,000)"),
        ({"max_usd": -1}, "caps refused: max_usd: "),
        ({"max_dollars": 1}, "unknown caps ['max_dollars']"),
        ({"max_concurrency": 64}, "max_concurrency is fixed when a run starts (this one runs 8"),
    ],
)
def test_a_change_the_run_could_not_apply_is_refused_with_the_cap_named(changes, expected):
    problem = caps_change_problem(ROOT_CAPS, changes, root_workflow_id=None)
    assert problem is not None and expected in problem, problem


@pytest.mark.parametrize(
    "changes, raised",
    [
        ({"max_usd": 100.0}, "max_usd"),
        ({"max_tokens": None}, "max_tokens"),
        ({"max_calls": 21}, "max_calls"),
        ({"deadline": datetime(2031, 1, 1, tzinfo=timezone.utc)}, "deadline"),
        ({"deadline": None}, "deadline"),
        ({"max_depth": 2}, "max_depth"),
    ],
)
def test_a_child_run_may_not_raise_what_its_slice_of_the_tree_bounds(changes, raised):
    """Its parent reserved only the slice: a raise would let the tree spend
    past the root's caps."""
    problem = caps_change_problem(CHILD_CAPS, changes, root_workflow_id="rlm-root")
    assert problem is not None and f"{raised} of a child run may only be lowered" in problem, problem
    assert "raise them on the root run rlm-root" in problem


def test_a_child_run_may_lower_its_caps_and_change_its_own_turns():
    earlier = CHILD_CAPS.deadline - timedelta(hours=1)
    changes = {"max_usd": 0.1, "max_calls": 5, "deadline": earlier, "max_turns": 30, "max_errors": 3}
    assert caps_change_problem(CHILD_CAPS, changes, root_workflow_id="rlm-root") is None


def test_a_money_cap_is_refused_over_a_model_with_no_known_price():
    """Its calls count $0, so the cap would not bind: setting one is refused,
    naming the model; other caps, or lifting the money cap, stay allowed."""
    uncapped = ROOT_CAPS.model_copy(update={"max_usd": None})
    problem = caps_change_problem(uncapped, {"max_usd": 0.5}, root_workflow_id=None, unpriced=["free-ish"])
    assert problem is not None and "caps.max_usd: cannot limit model 'free-ish'" in problem, problem
    assert "usd_per_input_token" in problem
    assert caps_change_problem(uncapped, {"max_tokens": 10}, root_workflow_id=None, unpriced=["free-ish"]) is None
    assert caps_change_problem(ROOT_CAPS, {"max_usd": None}, root_workflow_id=None, unpriced=["free-ish"]) is None
    assert caps_change_problem(uncapped, {"max_usd": 0.5}, root_workflow_id=None, unpriced=[]) is None
