"""The runs whose histories are checked in: one real run of every shape the
workflow takes (see record.py). Each shape drives a run against a real worker
and returns the histories to keep, as (file stem, WorkflowHistory) pairs.

Models are scripted (tests/fake_llm.py) so the same code paths run every
time; contexts are tiny and answers short so each history stays small.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from temporalio.client import Client, WorkflowHistory

from activities.context_store import ContextStore
from activities._call_records import recorded_calls
from activities.settings import Settings
from tests.fake_llm import FakeLLM
from tests.fixtures_llm import fake_registry
from tests.run_harness import (
    ROOT,
    SUB,
    isolated,
    repl,
    request,
    running_worker,
    start,
    start_worker_process,
)
from tests.session_harness import ask, asked, close, session_request, start_session
from worker import connect
from workflows.names import QUERY_PROGRESS, SIGNAL_CANCEL, UPDATE_SET_CAPS

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 120.0

Recorded = list[tuple[str, WorkflowHistory]]


@dataclass
class Lab:
    """What every shape uses: the services, the scripted model server, contexts."""

    settings: Settings
    llm: FakeLLM
    contexts: ContextStore
    logs: Path


def _question(r) -> str:
    m = re.search(r"Question: (\S+)", r.all_text)
    return m.group(1) if m else ""


def _child_ids(history: WorkflowHistory) -> list[str]:
    return [
        e.start_child_workflow_execution_initiated_event_attributes.workflow_id
        for e in history.events
        if e.HasField("start_child_workflow_execution_initiated_event_attributes")
    ]


async def _in_process(lab: Lab, body: Callable[[Client, Settings], Awaitable[Recorded]]) -> Recorded:
    s = isolated(lab.settings)
    async with running_worker(s, fake_registry(lab.llm)) as client:
        return await body(client, s)


async def plain(lab: Lab) -> Recorded:
    """One cell, then FINAL in the next turn's text."""
    ctx = lab.contexts.put_value("numbers: 3 4 5")
    lab.llm.add_rule("Turn 1 of", repl("total = sum(int(x) for x in context.split()[1:])\nprint('total', total)"), model=ROOT)
    lab.llm.add_rule("total 12", "FINAL(12)", model=ROOT)

    async def body(client: Client, s: Settings) -> Recorded:
        handle = await start(client, s, request("sum?", ctx), workflow_id="replay-plain")
        await asyncio.wait_for(handle.result(), TIMEOUT_S)
        return [("plain", await handle.fetch_history())]

    return await _in_process(lab, body)


async def resolved_locally(lab: Lab) -> Recorded:
    """`plain` as runs started since the "resolve-locally" patch record it:
    the models are resolved by a local activity (a marker, no activity task)."""
    return [("resolved_locally", history) for _, history in await plain(lab)]


async def batched_subcalls(lab: Lab) -> Recorded:
    """A cell that sends three llm_query calls in one batch, then FINAL."""
    ctx = lab.contexts.put_value("abc")
    lab.llm.add_rule("Turn 1 of", repl("print('got', llm_query_batched(['a', 'b', 'c']))"), model=ROOT)
    lab.llm.add_rule("got ", "FINAL(ABC)", model=ROOT)
    lab.llm.add_rule(None, lambda r: r.last_user_text.upper(), model=SUB)

    async def body(client: Client, s: Settings) -> Recorded:
        handle = await start(client, s, request("q", ctx), workflow_id="replay-batched-subcalls")
        await asyncio.wait_for(handle.result(), TIMEOUT_S)
        return [("batched_subcalls", await handle.fetch_history())]

    return await _in_process(lab, body)


async def whole_batch(lab: Lab) -> Recorded:
    """A batch of twelve llm_query calls that fits the run's concurrency: one
    `llm_calls` activity since whole-batch groups (two before them)."""
    return await _twelve_calls(lab, "whole_batch", "twelve", caps=None, delay_s=0.0)


async def windowed(lab: Lab) -> Recorded:
    """Twelve llm_query calls behind a concurrency of 4: calls past the cap
    travel in windows, waiting inside their group for a lane (call windows)."""
    return await _twelve_calls(lab, "windowed", "twelve behind four", caps={"max_concurrency": 4}, delay_s=0.05)


async def in_lanes(lab: Lab) -> Recorded:
    """`windowed` as runs started since the "llm-calls-in-lanes" patch record
    it: groups with lanes are `llm_calls_in_lanes` activities."""
    return await _twelve_calls(lab, "in_lanes", "twelve in lanes", caps={"max_concurrency": 4}, delay_s=0.05)


async def _twelve_calls(lab: Lab, name: str, context: str, *, caps: dict | None, delay_s: float) -> Recorded:
    """One cell asks twelve echo calls in one batch, then FINAL(12)."""
    ctx = lab.contexts.put_value(context)
    lab.llm.add_rule("Turn 1 of", repl("r = llm_query_batched([str(i) for i in range(12)])\nprint('got', len(r))"), model=ROOT)
    lab.llm.add_rule("got ", "FINAL(12)", model=ROOT)
    lab.llm.add_rule(None, lambda r: r.last_user_text, model=SUB, delay_s=delay_s)

    async def body(client: Client, s: Settings) -> Recorded:
        handle = await start(client, s, request("q", ctx, caps=caps), workflow_id="replay-" + name.replace("_", "-"))
        await asyncio.wait_for(handle.result(), TIMEOUT_S)
        return [(name, await handle.fetch_history())]

    return await _in_process(lab, body)


async def children(lab: Lab) -> Recorded:
    """rlm_query_batched starts two child runs at depth 1; parent and one child kept."""
    ctx = lab.contexts.put_value("root context")
    lab.llm.add_rule(
        lambda r: _question(r) == "top" and "Turn 1 of" in r.last_user_text,
        repl('print("got", rlm_query_batched(["Ca", "Cb"], contexts=["x", "yy"]))'),
        model=ROOT,
    )
    lab.llm.add_rule(lambda r: _question(r) == "top" and "got " in r.last_user_text, "FINAL(done)", model=ROOT)
    lab.llm.add_rule(lambda r: _question(r).startswith("C"), repl("FINAL(len(context))"), model=ROOT)

    async def body(client: Client, s: Settings) -> Recorded:
        handle = await start(client, s, request("top", ctx, caps={"max_depth": 1}), workflow_id="replay-children")
        await asyncio.wait_for(handle.result(), TIMEOUT_S)
        parent = await handle.fetch_history()
        child = await client.get_workflow_handle(sorted(_child_ids(parent))[0]).fetch_history()
        return [("children_parent", parent), ("children_child", child)]

    return await _in_process(lab, body)


async def continue_as_new(lab: Lab) -> Recorded:
    """Continue-as-new after every sub-call update: three runs in the chain."""
    ctx = lab.contexts.put_value("abc")
    lab.llm.add_rule("Turn 1 of", repl("kept = llm_query('one')\nprint('first', kept)"), model=ROOT)
    lab.llm.add_rule("Turn 2 of", repl("print('second', kept + llm_query('two'))"), model=ROOT)
    lab.llm.add_rule("Turn 3 of", "FINAL(chained)", model=ROOT)
    lab.llm.add_rule(None, lambda r: r.last_user_text.upper(), model=SUB)

    async def body(client: Client, s: Settings) -> Recorded:
        req = request("q", ctx, limits={"continue_after_updates": 1})
        handle = await start(client, s, req, workflow_id="replay-continue-as-new")
        await asyncio.wait_for(handle.result(), TIMEOUT_S)
        return await _chain(client, handle.id, handle.first_execution_run_id, "continue_as_new")

    return await _in_process(lab, body)


async def _chain(client: Client, workflow_id: str, run_id: str | None, stem: str) -> Recorded:
    """The history of every run of a continue-as-new chain, as `<stem>_1`, `<stem>_2`, ..."""
    out: Recorded = []
    while run_id:
        history = await client.get_workflow_handle(workflow_id, run_id=run_id).fetch_history()
        out.append((f"{stem}_{len(out) + 1}", history))
        last = history.events[-1]
        run_id = (
            last.workflow_execution_continued_as_new_event_attributes.new_execution_run_id
            if last.HasField("workflow_execution_continued_as_new_event_attributes")
            else None
        )
    return out


async def session(lab: Lab) -> Recorded:
    """A session: question 1 defines a variable, the session continues as new,
    question 2 reads it (its run started from the REPL snapshot), close."""
    ctx = lab.contexts.put_value("numbers: 3 4 5")
    lab.llm.add_rule(asked("first"), repl("total = 12\nprint('total', total)"), model=ROOT)
    lab.llm.add_rule("total 12", "FINAL(12)", model=ROOT)
    lab.llm.add_rule(asked("second"), repl("print('again', total * 2, len(session_history))"), model=ROOT)
    lab.llm.add_rule("again 24 1", "FINAL(24)", model=ROOT)

    async def body(client: Client, s: Settings) -> Recorded:
        req = session_request(ctx, continue_after_questions=1)
        handle = await start_session(client, s, req, session_id="replay-session")
        await asyncio.wait_for(ask(handle, "first?"), TIMEOUT_S)
        second = await asyncio.wait_for(ask(handle, "second?"), TIMEOUT_S)
        await close(handle)
        await asyncio.wait_for(handle.result(), TIMEOUT_S)
        question = await client.get_workflow_handle(second.workflow_id).fetch_history()
        return await _chain(client, handle.id, handle.first_execution_run_id, "session") + [("session_question", question)]

    return await _in_process(lab, body)


async def cancel(lab: Lab) -> Recorded:
    """The cancel signal arrives while a child waits on a sub-call; both runs kept."""
    ctx = lab.contexts.put_value("abc")
    release = threading.Event()
    lab.llm.add_rule(lambda r: _question(r) == "top", repl('print(rlm_query("deep", context="x"))'), model=ROOT)
    lab.llm.add_rule(lambda r: _question(r) == "deep", repl("print(llm_query('wait'))"), model=ROOT)
    lab.llm.add_rule(None, "ok", model=SUB, name="held", hold=release)

    async def body(client: Client, s: Settings) -> Recorded:
        handle = await start(client, s, request("top", ctx, caps={"max_depth": 1}), workflow_id="replay-cancel")
        await asyncio.to_thread(lab.llm.wait_for_count, 1, "held", TIMEOUT_S)
        await handle.signal(SIGNAL_CANCEL, "user stop")
        await asyncio.wait_for(handle.result(), TIMEOUT_S)
        parent = await handle.fetch_history()
        child_handle = client.get_workflow_handle(_child_ids(parent)[0])
        await asyncio.wait_for(child_handle.result(), TIMEOUT_S)
        return [("cancel_parent", parent), ("cancel_child", await child_handle.fetch_history())]

    try:
        return await _in_process(lab, body)
    finally:
        release.set()


async def set_caps(lab: Lab) -> Recorded:
    """A calls cap raised by the set_caps update while a sub-call is in flight."""
    ctx = lab.contexts.put_value("abc")
    release = threading.Event()
    lab.llm.add_rule("Turn 1 of", repl("print(llm_query('wait'))"), model=ROOT)
    lab.llm.add_rule("Turn 2 of", repl("print(2)"), model=ROOT)
    lab.llm.add_rule("Turn 3 of", "FINAL(finished)", model=ROOT)
    lab.llm.add_rule(None, "ok", model=SUB, name="held", hold=release)

    async def body(client: Client, s: Settings) -> Recorded:
        handle = await start(client, s, request("q", ctx, caps={"max_calls": 3}), workflow_id="replay-set-caps")
        await asyncio.to_thread(lab.llm.wait_for_count, 1, "held", TIMEOUT_S)
        await handle.query(QUERY_PROGRESS)
        await handle.execute_update(UPDATE_SET_CAPS, {"max_calls": 10})
        release.set()
        result = await asyncio.wait_for(handle.result(), TIMEOUT_S)
        if result.status != "completed":
            raise RuntimeError(f"set_caps run ended {result.status}: {result.reason}")
        return [("set_caps", await handle.fetch_history())]

    try:
        return await _in_process(lab, body)
    finally:
        release.set()


CRASH_ITEMS = 6
CRASH_HELD_FROM = 3  # items >= this wait at the model server until after the kill


async def crash_recovery(lab: Lab) -> Recorded:
    """kill -9 of the worker while a cell waits on half of its sub-calls; a new worker finishes."""
    ctx = lab.contexts.put_value("item list")
    expected = sum(range(CRASH_ITEMS))
    held = threading.Event()
    lab.llm.add_rule(
        "Turn 1 of",
        repl(f"r = llm_query_batched([f'item {{i}}' for i in range({CRASH_ITEMS})])\nprint('total', sum(int(x) for x in r))"),
        model=ROOT,
    )
    lab.llm.add_rule(f"total {expected}", f"FINAL({expected})", model=ROOT)
    lab.llm.add_rule(None, lambda r: r.last_user_text.split()[-1], model=SUB)
    lab.llm.add_rule(
        lambda r: int(r.last_user_text.split()[-1]) >= CRASH_HELD_FROM,
        lambda r: r.last_user_text.split()[-1],
        model=SUB,
        name="held",
        hold=held,
    )
    s = isolated(lab.settings)
    workers = [start_worker_process(s, lab.llm.url, lab.logs)]
    try:
        client = await connect(s)
        # All items in flight at once (a group gives its slots back when it ends).
        req = request("total?", ctx, caps={"max_concurrency": CRASH_ITEMS})
        handle = await start(client, s, req, workflow_id="replay-crash-recovery")
        await asyncio.to_thread(lab.llm.wait_for_count, CRASH_ITEMS - CRASH_HELD_FROM, "held", TIMEOUT_S)
        # Each answered call's record (calls travel in groups: count records, not activities).
        while recorded_calls(lab.contexts.store, handle.id) < CRASH_HELD_FROM:
            await asyncio.sleep(0.1)  # polling storage for an observed fact, not a fixed wait
        os.killpg(workers[0].pid, signal.SIGKILL)
        workers[0].wait(10)
        held.set()
        workers.append(start_worker_process(s, lab.llm.url, lab.logs))
        result = await asyncio.wait_for(handle.result(), TIMEOUT_S)
        if result.answer != str(expected):
            raise RuntimeError(f"crash run answered {result.answer!r} ({result.status}: {result.reason})")
        return [("crash_recovery", await handle.fetch_history())]
    finally:
        held.set()
        for proc in workers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(20)


async def tools(lab: Lab) -> Recorded:
    """A cell calls a custom tool twice; the second call is past max_tool_calls."""
    ctx = lab.contexts.put_value("invoice 3")
    lab.llm.add_rule("Turn 1 of", repl("print(ledger_lookup(3)['vendor'], ledger_lookup(1))"), model=ROOT)
    lab.llm.add_rule("Acme", "FINAL(Acme)", model=ROOT)
    req = request("vendor?", ctx, caps={"max_tool_calls": 1}).model_copy(update={"tools": ["ledger_lookup"]})
    s = isolated(lab.settings).model_copy(update={"tools": "tests.sample_tools:TOOLS"})
    async with running_worker(s, fake_registry(lab.llm)) as client:
        handle = await start(client, s, req, workflow_id="replay-tools")
        await asyncio.wait_for(handle.result(), TIMEOUT_S)
        return [("tools", await handle.fetch_history())]


async def max_errors(lab: Lab) -> Recorded:
    """Two failing cells in a row end the run (caps.max_errors) after one last word."""
    ctx = lab.contexts.put_value("abc")
    lab.llm.add_rule(None, repl("raise ValueError('broken')"), model=ROOT)
    lab.llm.add_rule("failed too many times", "FINAL(best)", model=ROOT)

    async def body(client: Client, s: Settings) -> Recorded:
        handle = await start(client, s, request("q", ctx, caps={"max_errors": 2}), workflow_id="replay-max-errors")
        await asyncio.wait_for(handle.result(), TIMEOUT_S)
        return [("max_errors", await handle.fetch_history())]

    return await _in_process(lab, body)


async def compaction(lab: Lab) -> Recorded:
    """A transcript near a small window is compacted before turn 7 (as in
    test_long_trajectories.py); a cell reads history()."""
    ctx = lab.contexts.put_value("abc")
    lab.llm.add_rule(None, repl('print("out " + "x" * 4000)'), model=ROOT)
    lab.llm.add_rule(lambda r: "were compacted" in r.all_text, repl("print('HIST', len(history()))"), model=ROOT)
    lab.llm.add_rule(lambda r: "HIST" in r.last_user_text, "FINAL(done)", model=ROOT)
    lab.llm.add_rule(lambda r: "about to be compacted" in r.last_user_text, "SUMMARY", model=ROOT)
    s = isolated(lab.settings)
    async with running_worker(s, fake_registry(lab.llm, context_window=12_722)) as client:
        handle = await start(client, s, request("q", ctx), workflow_id="replay-compaction")
        await asyncio.wait_for(handle.result(), TIMEOUT_S)
        return [("compaction", await handle.fetch_history())]


SHAPES: dict[str, Callable[[Lab], Awaitable[Recorded]]] = {
    "plain": plain,
    "resolved_locally": resolved_locally,
    "batched_subcalls": batched_subcalls,
    "whole_batch": whole_batch,
    "windowed": windowed,
    "in_lanes": in_lanes,
    "children": children,
    "continue_as_new": continue_as_new,
    "cancel": cancel,
    "set_caps": set_caps,
    "crash_recovery": crash_recovery,
    "tools": tools,
    "max_errors": max_errors,
    "compaction": compaction,
    "session": session,
}
