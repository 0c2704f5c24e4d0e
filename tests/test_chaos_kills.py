"""Chaos: the worker is killed (SIGKILL of its process) at each kind of step
boundary of a run tree of depth 2 (tests/chaos/tree.py): during a root turn,
in a cell before and after its sub-calls, during a child's root turn, in a
child's cell, at a continue-as-new. A new worker finishes the run, and each
time:

- the answer is the one of an undisturbed run;
- no model call answered before the kill is made again: only calls in
  flight at the kill may run again (counted and printed; at most the
  requests the engine had not recorded as answered when it was killed);
- the spend is recorded once: every request the provider billed is in the
  run's usage once, plus each attempt whose activity the kill lost (in
  flight, or in a call group not yet sent), which the engine charges at its
  reserved worst case because it cannot know whether it reached the provider.

The undisturbed run and the six kill points run at the same time (module
fixture; each with its own model server, task queue and workers), so the
suite pays for the slowest, not the sum.
"""

from __future__ import annotations

import concurrent.futures
from collections import Counter

import pytest

from tests.chaos import tree as scenario
from tests.chaos.killed_run import KillOutcome, killed_run

pytestmark = pytest.mark.chaos


@pytest.fixture(scope="module")
def outcomes(fake_llm, settings, tmp_path_factory):
    """{kill point or None: Future[KillOutcome]}, all started at once."""
    log_dir = tmp_path_factory.mktemp("chaos-kills")
    points = (None, *scenario.KILL_POINTS)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(points))
    futures = {point: pool.submit(killed_run, point, settings, log_dir) for point in points}
    yield futures
    pool.shutdown(wait=True)


def _key(r) -> tuple[str, str]:
    return r.model, r.all_text


def _spend_matches(out: KillOutcome) -> None:
    used = out.result.usage.total()
    # Never less than the provider billed; above it only by lost attempts never sent.
    assert used.calls >= out.billed.requests + out.abandoned
    assert used.calls - (out.billed.requests + out.abandoned) <= out.lost
    assert used.prompt_tokens + used.completion_tokens >= out.billed.tokens


def test_undisturbed_run_records_its_spend_exactly(outcomes):
    calm = outcomes[None].result()
    assert calm.result.status == "completed", (calm.result.reason, calm.log_tail)
    used = calm.result.usage.total()
    assert (used.calls, used.prompt_tokens, used.completion_tokens) == (
        calm.billed.requests, calm.billed.prompt_tokens, calm.billed.completion_tokens)  # fmt: skip
    assert calm.abandoned == 0


@pytest.mark.parametrize("point", scenario.KILL_POINTS)
def test_worker_killed_at_step_boundary(point, outcomes):
    calm, out = outcomes[None].result(), outcomes[point].result()
    assert out.result.status == "completed", (out.result.reason, out.log_tail)
    assert out.result.answer == calm.result.answer

    # No answered call made again: repeats only of requests the engine had not recorded.
    after_kill = out.requests[len(out.before_kill):]
    repeated = sum((Counter(map(_key, after_kill)) & Counter(map(_key, out.before_kill))).values())
    in_flight = len(out.before_kill) - out.answered_before_kill
    print(f"\n[chaos kill {point}] {out.elapsed_s:.1f} s; calls {len(out.requests)} (undisturbed {len(calm.requests)}); "
          f"in flight at the kill {in_flight}, made again {repeated}, abandoned {out.abandoned}")  # fmt: skip
    assert repeated <= in_flight
    assert len(out.requests) == len(calm.requests) + repeated  # every other call made once, as undisturbed

    # Spend recorded once.
    _spend_matches(out)
    if out.lost == 0:
        used = out.result.usage.total()
        assert (used.prompt_tokens, used.completion_tokens) == (out.billed.prompt_tokens, out.billed.completion_tokens)
