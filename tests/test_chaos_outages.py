"""Chaos: long outages and a hostile provider.

- Temporal down 60 s and S3 down 60 s (each on its own servers, killed -9
  and restarted on the same state) while a cell waits on sub-calls whose
  answers arrive during the outage. Temporal down: the run finishes with
  the right answer, no model call is made twice, the worker rides it out.
  S3 down: longer than model-call steps retry, so the run fails with a
  reason naming the S3 endpoint; no call is made twice, none over-charged.
- The provider answering 500, or never answering in time, for a minute:
  longer than the retry policy, so the run fails, promptly, with a reason
  that names the model and the fault; every attempt is charged once.
- A 429 storm with Retry-After: every retry waits at least what the
  provider asked, nothing refused is charged, the run completes.

The four one-minute faults run at the same time (module fixture), so they
cost about 1.5 minutes together; the tests then read their outcomes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections import Counter, defaultdict

import pytest

from tests.chaos import outages
from tests.fixtures_llm import fake_registry
from tests.run_harness import ROOT, SUB, isolated, repl, request, run, running_worker

pytestmark = pytest.mark.chaos


@pytest.fixture(scope="module")
def long_faults(fake_llm, settings, object_store, tmp_path_factory):
    """Start the four one-minute faults at once; {name: Future[Outcome]}."""
    from activities.context_store import ContextStore

    contexts = ContextStore(object_store)
    jobs = {
        "temporal_down": lambda: outages.server_outage("temporal", tmp_path_factory.mktemp("temporal-down")),
        "s3_down": lambda: outages.server_outage("s3", tmp_path_factory.mktemp("s3-down")),
        "provider_500": lambda: outages.provider_fault("500", settings, tmp_path_factory.mktemp("p500"), contexts),
        "provider_timeout": lambda: outages.provider_fault("timeout", settings, tmp_path_factory.mktemp("ptimeout"), contexts),
    }
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(jobs))
    futures = {name: pool.submit(job) for name, job in jobs.items()}
    yield futures
    pool.shutdown(wait=True)


def _report(name: str, out: outages.Outcome) -> None:
    print(f"\n[chaos {name}] {out.elapsed_s:.1f} s; status {out.result.status}; requests {len(out.requests)}; "
          f"billed {out.billed.requests}; abandoned {out.abandoned}; {out.notes}; reason {out.result.reason!r}")  # fmt: skip


def test_temporal_down_for_a_minute_is_survived(long_faults):
    out = long_faults["temporal_down"].result()
    _report("temporal down", out)
    assert out.notes["outage_s"] >= outages.OUTAGE_S
    assert out.result.status == "completed", (out.result.reason, out.log_tail)
    assert out.result.answer == str(sum(range(outages.ITEMS)))
    assert out.notes["worker_alive_after_outage"], out.log_tail
    sub_prompts = Counter(r.last_user_text for r in out.requests if r.model == SUB)
    # Every item asked once: the answers that came during the outage were kept.
    assert sub_prompts == Counter(f"item {i}" for i in range(outages.ITEMS)), sub_prompts
    used = out.result.usage.total()
    assert used.calls == out.billed.requests + out.abandoned


def test_s3_down_for_a_minute_fails_the_run_naming_s3(long_faults):
    """Model-call steps retry for about 15 s (workflows/model_attempts.py): a
    minute without object storage outlasts them. The run fails saying so;
    attempts that failed reading storage, before any request, cost nothing."""
    out = long_faults["s3_down"].result()
    _report("s3 down", out)
    assert out.notes["outage_s"] >= outages.OUTAGE_S
    assert out.result.status == "failed", out.log_tail
    assert "S3 endpoint" in (out.result.reason or "") and "unreachable" in out.result.reason, out.result.reason
    assert out.notes["worker_alive_after_outage"], out.log_tail
    sub_prompts = Counter(r.last_user_text for r in out.requests if r.model == SUB)
    assert max(sub_prompts.values()) == 1, sub_prompts  # no item asked twice
    used = out.result.usage.total()
    assert used.calls == out.billed.requests + out.abandoned


@pytest.mark.parametrize("kind", ["500", "timeout"])
def test_provider_failing_for_a_minute_fails_the_run_naming_the_fault(kind, long_faults):
    out = long_faults[f"provider_{kind}"].result()
    _report(f"provider {kind}", out)
    assert out.result.status == "failed"
    reason = out.result.reason or ""
    assert "root model call failed" in reason and "fake-root" in reason, reason
    assert ("HTTP 500" in reason) if kind == "500" else ("Timeout" in reason), reason
    attempts = [r for r in out.requests if r.model == ROOT]
    assert len(attempts) == 5  # MODEL_CALL_ATTEMPTS
    # Each attempt charged once: billed ones by their usage, abandoned ones by their reservation.
    used = out.result.usage.total()
    assert used.calls == out.billed.requests + out.abandoned == len(attempts)


RETRY_AFTER_S = 3  # above the policy's own first backoffs (1 s, 2 s): honoured, not coincidence
STORM_ITEMS = 12
REFUSALS_PER_ITEM = 2


def test_429_storm_honours_retry_after(settings, llm, context_store):
    refused: dict[str, int] = defaultdict(int)
    lock = threading.Lock()

    def storm(r) -> bool:
        with lock:
            refused[r.last_user_text] += 1
            return refused[r.last_user_text] <= REFUSALS_PER_ITEM

    expected = sum(range(STORM_ITEMS))
    llm.add_rule("Turn 1 of", repl(f"r = llm_query_batched([f'n {{i}}' for i in range({STORM_ITEMS})])\nprint('total', sum(int(x) for x in r))"), model=ROOT)
    llm.add_rule(f"total {expected}", f"FINAL({expected})", model=ROOT)
    llm.add_rule(None, lambda r: r.last_user_text.split()[-1], model=SUB, name="ok")
    llm.add_rule(storm, "slow down", status=429, headers={"Retry-After": str(RETRY_AFTER_S)}, model=SUB, name="429")
    s = isolated(settings)
    started = time.monotonic()

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            return await run(client, s, request("q", context_store.put_value("n")), timeout_s=120)

    result = asyncio.run(go())
    print(f"\n[chaos 429 storm] {time.monotonic() - started:.1f} s")
    assert result.status == "completed", result.reason
    assert result.answer == str(expected)
    by_prompt: dict[str, list[float]] = defaultdict(list)
    for r in llm.requests(SUB):
        by_prompt[r.last_user_text].append(r.received_at)
    assert len(by_prompt) == STORM_ITEMS
    for prompt, times in by_prompt.items():
        assert len(times) == REFUSALS_PER_ITEM + 1, (prompt, len(times))
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert min(gaps) >= RETRY_AFTER_S - 0.05, (prompt, gaps)
    # Refused requests are neither billed nor charged.
    assert llm.count("429") == STORM_ITEMS * REFUSALS_PER_ITEM
    used, billed = result.usage.total(), llm.billed()
    assert used.calls == billed.requests == STORM_ITEMS + 2
    assert used.prompt_tokens + used.completion_tokens == billed.tokens
