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
    long_output = repl('print("out " + "x" * 3000)')
    llm.add_rule(None, long_output, model=ROOT, name="work")
    llm.add_rule(
        lambda r: "were compacted" in r.all_text,
        repl('h = history()\nprint("HIST", len(h), sum("x" * 3000 in m["content"] for m in h), h[-1]["content"])'),
        model=ROOT,
        name="read_history",
    )
    llm.add_rule(lambda r: "HIST" in r.last_user_text, "FINAL(done)", model=ROOT, name="final")
    llm.add_rule(lambda r: COMPACTION_REQUEST in r.last_user_text, "SUMMARY-OF-WORK: printed x twice", model=ROOT, name="summary")
    s = isolated(settings)

    async def go():
        # Each turn's 3,000 printed characters count 3,000+ tokens by the byte
        # bound: with this window the transcript passes 85% before turn 3, not before turn 2.
        async with running_worker(s, fake_registry(llm, context_window=7_000)) as client:
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
    assert [llm.count(n) for n in ("work", "summary", "read_history", "final")] == [2, 1, 1, 1]
    assert len(summaries) == 1 and summaries[0].startswith("compact · turns 1-2 · root · fake-root")
    # Turn 3 starts over: the system prompt, then the summary with turn 2's output.
    turn3 = [r for r in llm.requests(ROOT) if r.matched_rule.name == "read_history"][0]
    assert [m["role"] for m in turn3.messages] == ["system", "user"]
    opening = turn3.messages[1]["content"]
    assert "Your turns 1 to 2 were compacted" in opening and "SUMMARY-OF-WORK" in opening
    assert opening.count("x" * 3000) == 1  # turn 2's output, not turn 1's
    # history(): system, turn 1 (user, assistant), turn 2, the request and the summary.
    shown = [r for r in llm.requests(ROOT) if r.matched_rule.name == "final"][0].last_user_text
    assert "HIST 7 1 SUMMARY-OF-WORK: printed x twice" in shown
    # The summary is a paid model call: 4 turns and the compaction.
    assert result.usage.by_model[ROOT].calls >= 5
