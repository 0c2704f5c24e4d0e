"""Budget ledger: unit tests and the tree-wide cap invariant (hypothesis).

Pure logic: no servers. Time is injected as plain datetimes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from pydantic import ValidationError

from workflows.budget import (
    Caps,
    Ledger,
    LedgerError,
    Refusal,
    Remaining,
    Spend,
    actual,
    equal_share,
    messages_token_bound,
    token_bound,
    worst_case,
)
from workflows._budget_pricing import TOKENS_PER_MESSAGE

T0 = datetime(2025, 6, 1, 12, 0, tzinfo=timezone.utc)
USD_TOLERANCE = 1e-6  # float rounding over a few levels of the tree


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def call(tokens: int = 1000, usd: float = 0.01, calls: int = 1) -> Spend:
    return Spend(usd=usd, tokens=tokens, calls=calls)


# -- pricing ---------------------------------------------------------------------------


def test_worst_case_prices_prompt_and_all_output_tokens() -> None:
    spend = worst_case(prompt_tokens=1000, max_output_tokens=500, usd_in=2e-6, usd_out=8e-6)
    assert (spend.usd, spend.tokens, spend.calls) == (pytest.approx(0.006), 1500, 1)


def test_unknown_price_still_counts_tokens_and_the_call() -> None:
    assert worst_case(100, 50, 0.0, 0.0) == Spend(usd=0.0, tokens=150, calls=1)
    assert actual(100, 7, 0.0) == Spend(usd=0.0, tokens=107, calls=1)


def test_negative_amounts_are_rejected_with_the_field_named() -> None:
    with pytest.raises(LedgerError, match="max_output_tokens must be >= 0"):
        worst_case(10, -1, 0.0, 0.0)
    with pytest.raises(ValidationError, match="usd"):
        Spend(usd=-0.5)
    with pytest.raises(ValidationError, match="max_tokens"):
        Caps(max_tokens=-1)
    with pytest.raises(ValidationError, match="nope"):
        Caps(nope=1)  # type: ignore[call-arg]


def test_token_bound_counts_bytes_so_cjk_and_emoji_are_not_underestimated() -> None:
    cjk = "預算不足" * 250  # 1,000 characters, about 1,000 tokens, 3,000 bytes
    assert token_bound(len(cjk.encode())) == 3_000
    assert token_bound(len("🙂".encode())) == 4  # one character, up to 4 tokens
    messages = [{"role": "system", "content": "abc"}, {"role": "user", "content": cjk}]
    assert messages_token_bound(messages) == 3 + 3_000 + 2 * TOKENS_PER_MESSAGE
    parts = [{"role": "user", "content": [{"type": "text", "text": "ab"}, {"type": "image_url"}]}]
    assert messages_token_bound(parts) == 2 + TOKENS_PER_MESSAGE
    with pytest.raises(LedgerError, match="utf8_bytes >= 0"):
        token_bound(-1)


def test_spend_adds_per_dimension() -> None:
    assert call(10, 0.5, 1) + call(5, 0.25, 2) == Spend(usd=0.75, tokens=15, calls=3)


# -- reserve / settle / release --------------------------------------------------------


def test_reserve_holds_the_worst_case_and_settle_replaces_it_by_actual_use() -> None:
    ledger = Ledger.root(Caps(max_tokens=10_000), T0)
    assert ledger.reserve("c1", call(tokens=4000), at(1)) is None
    assert ledger.reserved().tokens == 4000
    assert ledger.remaining().tokens == 6000
    ledger.settle("c1", actual(1000, 500, 0.003))
    assert ledger.reserved() == Spend()
    assert ledger.spent() == Spend(usd=0.003, tokens=1500, calls=1)
    assert ledger.remaining() == Remaining(usd=None, tokens=8500, calls=None)


def test_reserve_is_idempotent_per_call_id() -> None:
    ledger = Ledger.root(Caps(max_tokens=10_000, max_calls=5), T0)
    assert ledger.reserve("cell1:0", call(tokens=3000), T0) is None
    # A retried cell sends the same call again: held once, not twice.
    assert ledger.reserve("cell1:0", call(tokens=3000), T0) is None
    assert ledger.reserved() == call(tokens=3000)
    ledger.settle("cell1:0", actual(1000, 200, 0.01))
    # Reserving or settling a settled call again changes nothing.
    assert ledger.reserve("cell1:0", call(tokens=3000), T0) is None
    ledger.settle("cell1:0", actual(1000, 200, 0.01))
    assert ledger.reserved() == Spend()
    assert ledger.spent() == Spend(usd=0.01, tokens=1200, calls=1)


def test_release_frees_the_reservation_and_a_released_call_may_be_tried_again() -> None:
    ledger = Ledger.root(Caps(max_calls=1), T0)
    assert ledger.reserve("c", call(), T0) is None
    assert ledger.reserve("other", call(), T0).cap == "calls"
    ledger.release("c")
    ledger.release("c")  # idempotent
    ledger.release("never-reserved")  # cleanup paths may always release
    assert ledger.reserved() == Spend()
    assert ledger.reserve("c", call(), T0) is None
    assert ledger.reserved().calls == 1


def test_settle_above_the_reservation_is_counted_and_recorded_as_overrun() -> None:
    ledger = Ledger.root(Caps(max_tokens=10_000), T0)
    ledger.reserve("c", call(tokens=1000, usd=0.01), T0)
    ledger.settle("c", Spend(usd=0.02, tokens=1300, calls=1))
    assert ledger.spent() == Spend(usd=0.02, tokens=1300, calls=1)
    assert ledger.overrun == Spend(usd=0.01, tokens=300, calls=0)


def test_a_failed_attempt_that_may_have_been_billed_is_charged_its_reservation() -> None:
    ledger = Ledger.root(Caps(max_tokens=10_000), T0)
    assert ledger.reserve("c", call(tokens=4000), T0) is None
    # Timed out after sending: no usage known, so the most it could have cost.
    assert ledger.charge("c") == call(tokens=4000)
    assert ledger.charge("c") == Spend()  # idempotent
    assert ledger.spent() == call(tokens=4000) and ledger.reserved() == Spend()
    # The retry is a new attempt with its own reservation, checked first.
    assert ledger.reserve("c@2", call(tokens=4000), T0) is None
    assert ledger.reserve("c@3", call(tokens=4000), T0).cap == "tokens"
    assert ledger.closed_calls["c"] == "charged"
    assert ledger.reserve("c", call(tokens=4000), T0) is None  # a charged call stays closed
    assert ledger.reserved() == call(tokens=4000)


def test_a_failed_attempt_with_reported_usage_is_charged_that_usage() -> None:
    ledger = Ledger.root(Caps(max_tokens=10_000), T0)
    ledger.reserve("c", call(tokens=4000), T0)
    assert ledger.charge("c", actual(700, 0, 0.001)) == Spend(usd=0.001, tokens=700, calls=1)
    assert ledger.spent().tokens == 700


def test_an_attempt_refused_before_any_work_costs_nothing() -> None:
    ledger = Ledger.root(Caps(max_tokens=10_000, max_calls=3), T0)
    for attempt in range(1, 6):  # a 429 storm: every attempt released
        assert ledger.reserve(f"c@{attempt}", call(tokens=4000), T0) is None
        ledger.release(f"c@{attempt}")
    assert ledger.spent() == Spend() and ledger.reserved() == Spend()
    with pytest.raises(LedgerError, match=r"charge\('c@1'\).*released"):
        ledger.charge("c@1")


def test_settle_without_a_reservation_is_a_caller_error() -> None:
    ledger = Ledger.root(Caps(), T0)
    with pytest.raises(LedgerError, match=r"settle\('ghost'\).*never reserved.*reserve\(\)"):
        ledger.settle("ghost", call())
    ledger.reserve("gone", call(), T0)
    ledger.release("gone")
    with pytest.raises(LedgerError, match="released"):
        ledger.settle("gone", call())


# -- refusals and their messages -------------------------------------------------------


def test_tokens_refusal_says_cap_limit_spent_needed_and_how_to_adapt() -> None:
    ledger = Ledger.root(Caps(max_tokens=10_000), T0)
    ledger.reserve("a", call(tokens=6000), T0)
    ledger.settle("a", call(tokens=6000))
    ledger.reserve("b", call(tokens=1000), T0)
    refusal = ledger.reserve("c", call(tokens=5000), T0)
    assert refusal is not None and refusal.cap == "tokens"
    text = refusal.message
    for part in ("tokens cap", "5,000 tokens", "3,000 tokens remain", "10,000 tokens",
                 "spent 6,000 tokens", "1,000 tokens", "smaller prompts", "fewer sub-calls"):
        assert part in text, (part, text)
    assert "c" not in ledger.open_calls


def test_usd_refusal_names_dollars() -> None:
    ledger = Ledger.root(Caps(max_usd=0.05), T0)
    refusal = ledger.reserve("c", call(usd=0.06), T0)
    assert refusal == Refusal(cap="usd", message=refusal.message)
    assert "$0.0600" in refusal.message and "$0.0500" in refusal.message


def test_calls_refusal_suggests_fewer_larger_calls() -> None:
    ledger = Ledger.root(Caps(max_calls=2), T0)
    assert ledger.reserve("a", call(), T0) is None
    assert ledger.reserve("b", call(), T0) is None
    refusal = ledger.reserve("c", call(), T0)
    assert refusal.cap == "calls"
    assert "2 model calls" in refusal.message and "fewer, larger" in refusal.message


def test_usd_rounding_does_not_refuse_a_call_that_fits_exactly() -> None:
    ledger = Ledger.root(Caps(max_usd=0.3), T0)
    assert ledger.reserve("a", call(usd=0.1), T0) is None
    assert ledger.reserve("b", call(usd=0.2), T0) is None  # 0.1 + 0.2 > 0.3 in floats
    assert ledger.reserve("c", call(usd=0.0), T0).cap == "usd"  # reached: not even free calls


# -- turns, wall time, depth -----------------------------------------------------------


def test_turns_cap_counts_this_runs_turns() -> None:
    ledger = Ledger.root(Caps(max_turns=3), T0)
    assert [ledger.reserve_turn(at(i)) for i in range(3)] == [None, None, None]
    assert ledger.exhausted(at(3)).cap == "turns"
    refusal = ledger.reserve_turn(at(4))
    assert refusal.cap == "turns" and "3 of 3 turns" in refusal.message
    assert "FINAL" in refusal.message
    assert ledger.turns == 3


def test_wall_time_cap_with_injected_times() -> None:
    ledger = Ledger.root(Caps(max_wall_s=60), T0)
    assert ledger.deadline == at(60)
    assert ledger.reserve("a", call(), at(59.9)) is None
    assert ledger.reserve_turn(at(59.9)) is None
    assert ledger.exhausted(at(59.9)) is None
    assert ledger.reserve("b", call(), at(60)).cap == "wall_time"
    assert ledger.reserve_turn(at(61)).cap == "wall_time"
    refusal = ledger.exhausted(at(75))
    assert refusal.cap == "wall_time" and "15.0 s ago" in refusal.message


def test_child_inherits_the_absolute_deadline_of_the_root() -> None:
    root = Ledger.root(Caps(max_wall_s=60), T0)
    caps = root.child_grant("kid", at(30))
    assert caps.deadline == at(60) and caps.max_wall_s is None
    child = Ledger.root(caps, at(30), depth=1)  # starts late: still ends with the root
    assert child.reserve("a", call(), at(59)) is None
    assert child.reserve("b", call(), at(60)).cap == "wall_time"
    assert root.child_grant("late", at(60)).cap == "wall_time"


def test_deadline_and_max_wall_s_together_end_at_the_earlier() -> None:
    ledger = Ledger.root(Caps(max_wall_s=100, deadline=at(40)), T0)
    assert ledger.deadline == at(40)


def test_depth_cap_counts_down_and_refuses_at_zero() -> None:
    root = Ledger.root(Caps(max_depth=2), T0)
    assert root.check_depth() is None
    c1 = root.child_grant("d1", T0)
    assert c1.max_depth == 1
    child = Ledger.root(c1, T0, depth=1)
    c2 = child.child_grant("d2", T0)
    assert c2.max_depth == 0
    grandchild = Ledger.root(c2, T0, depth=2)
    refusal = grandchild.child_grant("d3", T0)
    assert isinstance(refusal, Refusal) and refusal.cap == "depth"
    assert grandchild.check_depth() == refusal
    assert "depth 2" in refusal.message and "llm_query" in refusal.message
    assert grandchild.children == {}


def test_naive_datetimes_are_rejected_with_the_fix() -> None:
    with pytest.raises(ValidationError, match="timezone-aware"):
        Ledger.root(Caps(), datetime(2025, 1, 1))
    ledger = Ledger.root(Caps(), T0)
    with pytest.raises(LedgerError, match="workflow.now"):
        ledger.reserve("a", call(), datetime(2025, 1, 1))


# -- changing caps mid-run -------------------------------------------------------------


def test_raising_a_cap_mid_run_lets_a_refused_reservation_succeed() -> None:
    ledger = Ledger.root(Caps(max_usd=0.10, max_turns=2), T0)
    ledger.reserve("a", call(usd=0.08), T0)
    ledger.settle("a", call(usd=0.08))
    assert ledger.reserve("b", call(usd=0.05), T0).cap == "usd"
    ledger.set_caps(max_usd=0.20, max_turns=5)
    assert ledger.reserve("b", call(usd=0.05), T0) is None
    assert ledger.caps.max_turns == 5


def test_lowering_a_cap_below_spend_refuses_the_next_reservation() -> None:
    ledger = Ledger.root(Caps(max_tokens=10_000), T0)
    ledger.reserve("a", call(tokens=5000), T0)
    ledger.settle("a", call(tokens=5000))
    ledger.set_caps(max_tokens=4000)
    assert ledger.reserve("b", call(tokens=1), T0).cap == "tokens"
    assert ledger.remaining().tokens == 0  # never negative
    assert ledger.exhausted(T0).cap == "tokens"
    ledger.set_caps(max_tokens=None)  # back to unlimited
    assert ledger.reserve("b", call(tokens=1), T0) is None


def test_set_caps_rejects_unknown_names_and_bad_values() -> None:
    ledger = Ledger.root(Caps(), T0)
    with pytest.raises(LedgerError, match=r"unknown cap\(s\) \['max_dollars'\].*max_usd"):
        ledger.set_caps(max_dollars=1.0)
    with pytest.raises(ValidationError, match="max_concurrency"):
        ledger.set_caps(max_concurrency=0)
    assert ledger.caps == Caps()


# -- budget too small to start ---------------------------------------------------------


def test_budget_too_small_to_start_is_refused_before_the_run() -> None:
    first = worst_case(2000, 1000, 1e-6, 4e-6)
    ok = Ledger.root(Caps(max_tokens=3000, max_usd=0.01, max_calls=1), T0)
    assert ok.check_start(est_first_call=first) is None
    small = Ledger.root(Caps(max_tokens=2999), T0)
    refusal = small.check_start(est_first_call=first)
    assert refusal.cap == "tokens"
    assert "too small to start" in refusal.message and "max_tokens" in refusal.message
    assert "3,000 tokens" in refusal.message
    assert Ledger.root(Caps(max_calls=0), T0).check_start(est_first_call=first).cap == "calls"
    assert Ledger.root(Caps(max_turns=0), T0).check_start(est_first_call=first).cap == "turns"
    late = Ledger.root(Caps(deadline=T0), T0)
    assert late.check_start(est_first_call=first, now=T0).cap == "wall_time"


# -- child runs ------------------------------------------------------------------------


def test_child_gets_a_slice_of_what_remains_after_reservations() -> None:
    root = Ledger.root(Caps(max_usd=1.0, max_tokens=10_000, max_calls=10), T0)
    root.reserve("a", call(tokens=2000, usd=0.2), T0)
    caps = root.child_grant("k", T0, share=0.5)
    assert (caps.max_usd, caps.max_tokens, caps.max_calls) == (pytest.approx(0.4), 4000, 4)
    held = root.reserved()
    assert (held.usd, held.tokens, held.calls) == (pytest.approx(0.6), 6000, 5)
    assert root.child_grant("k", T0, share=0.1) == caps  # idempotent per child id
    root.child_settle("k", Spend(usd=0.1, tokens=900, calls=2))
    root.child_settle("k", Spend(usd=0.1, tokens=900, calls=2))  # idempotent
    assert root.spent() == Spend(usd=0.1, tokens=900, calls=2)
    assert root.reserved() == call(tokens=2000, usd=0.2)


def test_children_of_a_batch_share_the_concurrency_cap() -> None:
    root = Ledger.root(Caps(max_concurrency=32), T0)
    caps = [root.child_grant(f"k{i}", T0, share=equal_share(i, 3), parallel=3) for i in range(3)]
    assert [c.max_concurrency for c in caps] == [10, 10, 10]  # 30 <= 32 for the tree
    many = Ledger.root(Caps(max_concurrency=4), T0)
    assert many.child_grant("k", T0, parallel=4).max_concurrency == 1  # never below 1
    assert many.child_grant("alone", T0).max_concurrency == 4
    with pytest.raises(LedgerError, match="parallel must be >= 1"):
        many.child_grant("bad", T0, parallel=0)


def test_unlimited_dimensions_stay_unlimited_for_children() -> None:
    root = Ledger.root(Caps(max_calls=10, max_turns=7, max_concurrency=4), T0)
    caps = root.child_grant("k", T0)
    assert caps.max_usd is None and caps.max_tokens is None and caps.max_calls == 10
    assert (caps.max_turns, caps.max_concurrency) == (7, 4)


def test_equal_shares_give_each_child_of_a_batch_the_same_slice() -> None:
    root = Ledger.root(Caps(max_tokens=9000, max_calls=30), T0)
    grants = [root.child_grant(f"k{i}", T0, share=equal_share(i, 3)) for i in range(3)]
    assert [g.max_tokens for g in grants] == [3000, 3000, 3000]
    assert [g.max_calls for g in grants] == [10, 10, 10]
    assert root.remaining().tokens == 0


def test_failed_child_without_report_counts_its_whole_slice() -> None:
    root = Ledger.root(Caps(max_tokens=1000), T0)
    root.child_grant("k", T0, share=0.25)
    root.child_settle("k", None)
    assert root.spent().tokens == 250


def test_child_grant_refuses_when_nothing_remains_and_on_bad_input() -> None:
    root = Ledger.root(Caps(max_calls=1), T0)
    root.reserve("a", call(), T0)
    refusal = root.child_grant("k", T0)
    assert refusal.cap == "calls" and "child run" in refusal.message
    with pytest.raises(LedgerError, match=r"share must be in \(0, 1\]"):
        root.child_grant("k", T0, share=1.5)
    with pytest.raises(LedgerError, match="no slice was granted"):
        root.child_settle("unknown", Spend())
    with pytest.raises(LedgerError, match="0 <= index < size"):
        equal_share(3, 3)


# -- serialization ---------------------------------------------------------------------


def test_ledger_round_trips_through_json_and_keeps_behaving_the_same() -> None:
    ledger = Ledger.root(Caps(max_usd=1.0, max_tokens=10_000, max_wall_s=60), T0, depth=1)
    ledger.reserve_turn(T0)
    ledger.reserve("open", call(tokens=1000), T0)
    ledger.reserve("done", call(tokens=1000), T0)
    ledger.settle("done", call(tokens=800))
    ledger.child_grant("kid", T0, share=0.5)
    ledger.child_grant("kid2", T0, share=0.1)
    ledger.child_settle("kid2", Spend(tokens=10, calls=1))

    for restored in (
        Ledger.model_validate_json(ledger.model_dump_json()),
        Ledger.model_validate(ledger.model_dump(mode="json")),
        Ledger.model_validate(ledger.model_dump()),
    ):
        assert restored == ledger
        assert restored.deadline == at(60)
        assert restored.remaining() == ledger.remaining()
        # Idempotency survives the trip (continue-as-new, replays).
        assert restored.reserve("open", call(tokens=1000), T0) is None
        assert restored.reserve("done", call(tokens=1000), T0) is None
        assert restored.reserved() == ledger.reserved()


def test_compacted_ledger_forgets_finished_work_but_keeps_totals() -> None:
    ledger = Ledger.root(Caps(max_tokens=10_000), T0)
    for i in range(50):
        ledger.reserve(f"c{i}", call(tokens=100), T0)
        ledger.settle(f"c{i}", call(tokens=50))
    ledger.reserve("open", call(tokens=100), T0)
    ledger.child_grant("done", T0, share=0.1)
    ledger.child_settle("done", Spend(tokens=10))
    ledger.child_grant("running", T0, share=0.1)
    small = ledger.compacted()
    assert small.closed_calls == {} and list(small.children) == ["running"]
    assert (small.spent(), small.reserved()) == (ledger.spent(), ledger.reserved())
    assert len(small.model_dump_json()) < len(ledger.model_dump_json()) / 2
    small.settle("open", call(tokens=100))
    assert "open" in ledger.open_calls  # the original is untouched


# -- the invariant: no interleaving spends past a cap ----------------------------------


def assert_covers(view: Spend, worst: Spend, caps: Caps) -> None:
    """`view` >= `worst` in every dimension that `caps` limits."""
    if caps.max_usd is not None:
        assert worst.usd <= view.usd + USD_TOLERANCE
    if caps.max_tokens is not None:
        assert worst.tokens <= view.tokens
    if caps.max_calls is not None:
        assert worst.calls <= view.calls


@dataclass
class Node:
    """One run of the simulated tree: its ledger and its open calls."""

    ledger: Ledger
    parent: int | None
    child_id: str
    open: dict[str, Spend] = field(default_factory=dict)
    live: bool = True


optional_usd = st.none() | st.floats(0, 2, allow_nan=False)
optional_tokens = st.none() | st.integers(0, 20_000)
optional_calls = st.none() | st.integers(0, 25)
caps_strategy = st.builds(
    Caps,
    max_usd=optional_usd,
    max_tokens=optional_tokens,
    max_calls=optional_calls,
    max_depth=st.integers(0, 3),
)
worst_strategy = st.builds(
    Spend,
    usd=st.floats(0, 0.5, allow_nan=False),
    tokens=st.integers(0, 6000),
    calls=st.integers(1, 2),
)
fraction = st.floats(0, 1, allow_nan=False)


class TreeBudget(RuleBasedStateMachine):
    """Random interleavings of reserve / settle / charge / release / child_grant /
    child_settle / cap raises across a tree of ledgers. Children spend only
    through their own ledgers, settles never exceed reservations, and a
    charged attempt (billed but failed) is billed at most its reservation."""

    def __init__(self) -> None:
        super().__init__()
        self.nodes: list[Node] = []
        self.real = Spend()  # actual use settled anywhere in the tree
        self.ids = 0

    def fresh(self, prefix: str) -> str:
        self.ids += 1
        return f"{prefix}{self.ids}"

    def live(self) -> list[int]:
        return [i for i, n in enumerate(self.nodes) if n.live]

    @initialize(caps=caps_strategy)
    def start_root(self, caps: Caps) -> None:
        self.nodes.append(Node(Ledger.root(caps, T0), None, "root"))

    @rule(data=st.data(), worst=worst_strategy)
    def reserve(self, data: st.DataObject, worst: Spend) -> None:
        node = self.nodes[data.draw(st.sampled_from(self.live()))]
        call_id = self.fresh("c")
        refusal = node.ledger.reserve(call_id, worst, T0)
        if refusal is None:
            node.open[call_id] = worst
        else:
            assert refusal.cap in ("usd", "tokens", "calls")

    @precondition(lambda self: any(n.live and n.open for n in self.nodes))
    @rule(data=st.data(), other=worst_strategy)
    def reserve_again(self, data: st.DataObject, other: Spend) -> None:
        node = data.draw(st.sampled_from([n for n in self.nodes if n.live and n.open]))
        before = node.ledger.reserved()
        call_id = data.draw(st.sampled_from(sorted(node.open)))
        assert node.ledger.reserve(call_id, other, T0) is None
        assert node.ledger.reserved() == before

    @precondition(lambda self: any(n.live and n.open for n in self.nodes))
    @rule(data=st.data(), f_usd=fraction, f_tokens=fraction, f_calls=fraction)
    def settle(self, data: st.DataObject, f_usd: float, f_tokens: float, f_calls: float) -> None:
        node = data.draw(st.sampled_from([n for n in self.nodes if n.live and n.open]))
        call_id = data.draw(st.sampled_from(sorted(node.open)))
        worst = node.open.pop(call_id)
        use = Spend(
            usd=worst.usd * f_usd,
            tokens=int(worst.tokens * f_tokens),
            calls=round(worst.calls * f_calls),
        )
        node.ledger.settle(call_id, use)
        self.real += use

    @precondition(lambda self: any(n.live and n.open for n in self.nodes))
    @rule(data=st.data(), billed=fraction, reported=st.booleans())
    def charge(self, data: st.DataObject, billed: float, reported: bool) -> None:
        # An attempt failed after its request was sent: the provider billed up
        # to its worst case; we learn the amount only if it was reported.
        node = data.draw(st.sampled_from([n for n in self.nodes if n.live and n.open]))
        call_id = data.draw(st.sampled_from(sorted(node.open)))
        worst = node.open.pop(call_id)
        bill = Spend(usd=worst.usd * billed, tokens=int(worst.tokens * billed), calls=worst.calls)
        counted = node.ledger.charge(call_id, bill if reported else None)
        assert_covers(counted, bill, Caps(max_usd=1, max_tokens=1, max_calls=1))
        self.real += bill
        # Its retry is a new attempt, reserved again before it starts.
        retry = call_id + "@2"
        if node.ledger.reserve(retry, worst, T0) is None:
            node.open[retry] = worst

    @precondition(lambda self: any(n.live and n.open for n in self.nodes))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        node = data.draw(st.sampled_from([n for n in self.nodes if n.live and n.open]))
        call_id = data.draw(st.sampled_from(sorted(node.open)))
        del node.open[call_id]
        node.ledger.release(call_id)

    @rule(data=st.data(), share=st.none() | st.floats(0.01, 1))
    def grant_child(self, data: st.DataObject, share: float | None) -> None:
        index = data.draw(st.sampled_from(self.live()))
        parent = self.nodes[index].ledger
        child_id = self.fresh("k")
        caps = parent.child_grant(child_id, T0, share=share)
        if isinstance(caps, Refusal):
            assert caps.cap in ("usd", "tokens", "calls", "depth")
            return
        child = Ledger.root(caps, T0, depth=parent.depth + 1)
        self.nodes.append(Node(child, index, child_id))

    @precondition(lambda self: any(n.live and n.parent is not None for n in self.nodes))
    @rule(data=st.data(), failed=st.booleans())
    def finish_child(self, data: st.DataObject, failed: bool) -> None:
        index = data.draw(
            st.sampled_from([i for i in self.live() if self.nodes[i].parent is not None])
        )
        self.finish(index, failed)

    def finish(self, index: int, failed: bool) -> None:
        """End a run: its children end first, its calls complete at worst case."""
        node = self.nodes[index]
        for i, other in enumerate(self.nodes):
            if other.live and other.parent == index:
                self.finish(i, failed)
        for call_id, worst in sorted(node.open.items()):
            node.ledger.settle(call_id, worst)
            self.real += worst
        node.open.clear()
        node.live = False
        used = None if failed else node.ledger.spent()
        self.nodes[node.parent].ledger.child_settle(node.child_id, used)

    @rule(usd=st.floats(0, 1), tokens=st.integers(0, 5000), calls=st.integers(0, 5))
    def raise_root_caps(self, usd: float, tokens: int, calls: int) -> None:
        caps = self.nodes[0].ledger.caps
        changes = {
            name: getattr(caps, name) + extra
            for name, extra in (("max_usd", usd), ("max_tokens", tokens), ("max_calls", calls))
            if getattr(caps, name) is not None
        }
        self.nodes[0].ledger.set_caps(**changes)

    @invariant()
    def tree_never_passes_a_root_cap(self) -> None:
        # Worst case of the whole tree: settled use plus every call in flight.
        worst = self.real
        for node in self.nodes:
            for held in node.open.values():
                worst += held
        caps = self.nodes[0].ledger.caps
        if caps.max_usd is not None:
            assert worst.usd <= caps.max_usd + USD_TOLERANCE
        if caps.max_tokens is not None:
            assert worst.tokens <= caps.max_tokens
        if caps.max_calls is not None:
            assert worst.calls <= caps.max_calls

    @invariant()
    def root_view_covers_the_whole_tree(self) -> None:
        # In every capped dimension the root's spent + reserved bounds the tree's
        # worst case (unlimited dimensions hold nothing for children).
        root = self.nodes[0].ledger
        view = root.spent() + root.reserved()
        worst = self.real
        for node in self.nodes:
            for held in node.open.values():
                worst += held
        assert_covers(view, worst, root.caps)

    @invariant()
    def every_run_stays_within_its_own_caps(self) -> None:
        for node in self.nodes[1:]:  # the root's caps may only grow here
            if not node.live:
                continue
            ledger, committed = node.ledger, node.ledger.spent() + node.ledger.reserved()
            caps = ledger.caps
            assert caps.max_tokens is None or committed.tokens <= caps.max_tokens
            assert caps.max_calls is None or committed.calls <= caps.max_calls
            assert caps.max_usd is None or committed.usd <= caps.max_usd + USD_TOLERANCE
            assert ledger.overrun == Spend()

    def teardown(self) -> None:
        # Everything ends: the root's books must match the tree when no child failed
        # and over-approximate it otherwise; never under-count.
        if not self.nodes:
            return
        for i, node in enumerate(self.nodes):
            if node.live and node.parent == 0:
                self.finish(i, failed=False)
        root = self.nodes[0]
        for call_id, worst in sorted(root.open.items()):
            root.ledger.settle(call_id, worst)
            self.real += worst
        assert root.ledger.reserved() == Spend()
        assert_covers(root.ledger.spent(), self.real, root.ledger.caps)


TreeBudget.TestCase.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)
test_tree_spend_never_passes_a_cap = TreeBudget.TestCase


@given(
    caps=caps_strategy,
    size=st.integers(1, 12),
)
def test_a_batch_of_equal_shares_never_hands_out_more_than_remains(caps: Caps, size: int) -> None:
    root = Ledger.root(caps, T0)
    before = root.remaining()
    held = Spend()
    for i in range(size):
        granted = root.child_grant(f"k{i}", T0, share=equal_share(i, size))
        if isinstance(granted, Refusal):
            continue
        held += root.children[f"k{i}"].held
    for dim in ("usd", "tokens", "calls"):
        limit = getattr(before, dim)
        if limit is not None:
            assert getattr(held, dim) <= limit + (USD_TOLERANCE if dim == "usd" else 0)
