"""The ledger against what a provider bills, across retries: every sub-call's
first attempt is answered (and billed) after the model-call timeout, so the
engine never sees it and tries again. The scripted server bills like a
provider (tests/fake_llm.py); the run's spend must cover everything billed,
and what was billed must stay under the cap. Real worker, Temporal, S3, WASM."""

from __future__ import annotations

import threading

from tests.fixtures_llm import fake_registry
from tests.run_harness import ROOT, SUB, isolated, repl, request, run_once

PROMPTS = 12
CAP = 12_000


def test_spend_covers_every_billed_attempt_and_billing_stays_under_the_cap(settings, context_store, llm):
    ctx = context_store.put_value("abc")
    seen: set[str] = set()
    lock = threading.Lock()

    def first_attempt(r) -> bool:
        with lock:
            new = r.last_user_text not in seen
            seen.add(r.last_user_text)
            return new

    # CJK prompts: about a token per character, three UTF-8 bytes each.
    code = f"r = llm_query_batched(['預算審計 ' * 40 + str(i) for i in range({PROMPTS})])\nprint('answers', len(r))"
    llm.add_rule("Turn 1 of", repl(code), model=ROOT)
    llm.add_rule("answers", "FINAL(done)", model=ROOT)
    llm.add_rule(None, "ok", model=SUB, name="answered")
    llm.add_rule(lambda r: r.model == SUB and first_attempt(r), "late", model=SUB, delay_s=2.5, name="late")
    s = isolated(settings)
    limits = {"model_call_timeout_s": 1.0, "root_max_output_tokens": 200, "sub_max_output_tokens": 50}

    result = run_once(s, fake_registry(llm), request("q", ctx, caps={"max_tokens": CAP}, limits=limits))
    llm.wait_idle(60)  # late replies are billed too
    billed = llm.billed()
    assert result.status in ("completed", "budget_exhausted"), result.reason
    assert llm.count("late") >= 1  # retries happened
    assert billed.tokens <= CAP
    # Every attempt the provider billed is counted, at its worst case when unseen.
    assert result.spend.tokens >= billed.tokens
    assert result.spend.tokens <= CAP
