"""Long trajectories: a transcript that nears the root model's window is
compacted into the model's own summary (the full history stays readable in
the REPL through `history()`), and a run whose cells keep failing ends at
`caps.max_errors` with its best answer. Real worker, Temporal, S3 and WASM
REPL; the model is the scripted server."""

from __future__ import annotations

import asyncio
import json

from temporalio.api.enums.v1 import EventType

from tests.fixtures_llm import fake_registry
from tests.run_harness import ROOT, isolated, repl, request, run_once, running_worker, start
from workflows.compaction import COMPACTION_REQUEST


def test_max_errors_ends_a_run_that_keeps_failing_with_its_best_answer(settings, context_store, llm):
    ctx = context_store.put_value("abc")
    llm.add_rule(None, repl("partial = 7\nraise ValueError('still broken')"), model=ROOT, name="broken")
    # A cell that works resets the count: turns 1, 3, 4, 5 fail, the third in a row ends the run.
    llm.add_rule("Turn 2 of", repl("print('fine')"), model=ROOT, name="fine")
    llm.add_rule("failed too many times", "FINAL(7 so far)", model=ROOT, name="last")
    s = isolated(settings)

    result = run_once(s, fake_registry(llm), request("q?", ctx, caps={"max_errors": 3}))
    assert result.status == "max_errors", result.reason
    assert result.answer == "7 so far"
    assert "max_errors: 3 cells failed in a row (cap 3)" in result.reason
    assert [llm.count(n) for n in ("broken", "fine", "last")] == [4, 1, 1]
    # The last word is a paid model call like any other (a cold worker's
    # first attempt may time out and be charged too: at least, not exactly).
    assert result.usage.by_model[ROOT].calls >= 6


def test_transcript_near_the_window_is_compacted_and_history_stays_readable(settings, context_store, llm):
    ctx = context_store.put_value("a context")
    llm.add_rule(None, repl('print("out " + "x" * 4000)'), model=ROOT, name="work")
    llm.add_rule(
        lambda r: "were compacted" in r.all_text,
        repl('h = history()\nprint("HIST", len(h), sum("x" * 4000 in m["content"] for m in h), h[-1]["content"])'),
        model=ROOT,
        name="read_history",
    )
    llm.add_rule(lambda r: "HIST" in r.last_user_text, "FINAL(done)", model=ROOT, name="final")
    llm.add_rule(lambda r: COMPACTION_REQUEST in r.last_user_text, "SUMMARY-OF-WORK: printed x", model=ROOT, name="summary")
    s = isolated(settings)

    async def go():
        # Measured: the first prompt is ~930 tokens and each turn adds ~1,060
        # (its 4,000 printed characters); the new output counts ~4,070 by its
        # byte bound. With this window the room before 85% is ~9,790 tokens:
        # transcript + new output pass it before turn 7 (10,320) and not
        # before turn 6 (9,260), ~530 tokens either side.
        async with running_worker(s, fake_registry(llm, context_window=12_722)) as client:
            handle = await start(client, s, request("q?", ctx))
            result = await asyncio.wait_for(handle.result(), 120)
            summaries = [
                json.loads(e.user_metadata.summary.data)
                async for e in handle.fetch_history_events()
                if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
                and e.activity_task_scheduled_event_attributes.activity_type.name == "compact_transcript"
            ]
            return result, summaries

    result, summaries = asyncio.run(go())
    assert result.status == "completed", result.reason
    assert result.answer == "done"
    assert [llm.count(n) for n in ("work", "summary", "read_history", "final")] == [6, 1, 1, 1]
    assert len(summaries) == 1 and summaries[0].startswith("compact · turns 1-6 · root · fake-root")
    # Turn 7 starts over: the system prompt, then the summary with turn 6's output.
    turn7 = [r for r in llm.requests(ROOT) if r.matched_rule.name == "read_history"][0]
    assert [m["role"] for m in turn7.messages] == ["system", "user"]
    opening = turn7.messages[1]["content"]
    assert "Your turns 1 to 6 were compacted" in opening and "SUMMARY-OF-WORK" in opening
    assert opening.count("x" * 4000) == 1  # turn 6's output, not the earlier ones
    # history(): the system prompt, the first question, 6 replies and the 5
    # outputs between them, the request and the summary.
    shown = [r for r in llm.requests(ROOT) if r.matched_rule.name == "final"][0].last_user_text
    assert "HIST 15 5 SUMMARY-OF-WORK: printed x" in shown
    # The summary is a paid model call: 8 turns and the compaction.
    assert result.usage.by_model[ROOT].calls >= 9
