"""Scripts and measures for long runs (tests/test_chaos_long_runs.py and
bench/bench_long_runs.py): many turns, many sub-calls, each through
continue-as-new, and the size of every run's history."""

from __future__ import annotations

import asyncio
import re

from temporalio.client import Client, WorkflowHistory

from activities.settings import Settings
from tests.chaos.observe import chain, history_bytes
from tests.fake_llm import FakeLLM
from tests.run_harness import ROOT, SUB, repl, start
from workflows.request import RunRequest
from workflows.result import RunResult

# Temporal server defaults: continue-as-new suggested at 4,096 events / 4 MB,
# a warning at 10,240 events / 10 MB, the run fails at 51,200 / 50 MB.
WARN_EVENTS, WARN_BYTES = 10_240, 10 * 1024 * 1024


def turn_of(r) -> int:
    m = re.search(r"Turn (\d+) of", r.last_user_text)
    return int(m.group(1)) if m else 0


def script_turns(llm: FakeLLM, turns: int) -> str:
    """Turn t < `turns` adds t to the REPL variable `acc`; the last turn answers it."""

    def reply(r) -> str:
        t = turn_of(r)
        if t >= turns:
            return repl("FINAL(acc)")
        return repl(f"acc = globals().get('acc', 0) + {t}\nprint('acc', acc)")

    llm.add_rule(None, reply, model=ROOT)
    return str(sum(range(1, turns)))


def script_subcalls(llm: FakeLLM, turns: int, batch: int) -> str:
    """Turn t <= `turns` sends `batch` sub-calls (prompts 'n <i>', answered i)
    in one llm_query_batched and adds the answers to `acc`; then FINAL(acc)."""

    def reply(r) -> str:
        t = turn_of(r)
        if t > turns:
            return repl("FINAL(acc)")
        return repl(
            f"got = llm_query_batched([f'n {{i}}' for i in range({(t - 1) * batch}, {t * batch})])\n"
            "acc = globals().get('acc', 0) + sum(int(x) for x in got)\nprint('acc', acc)"
        )

    llm.add_rule(None, reply, model=ROOT)
    llm.add_rule(None, lambda r: r.last_user_text.split()[-1], model=SUB)
    return str(sum(range(turns * batch)))


async def run_chain(client: Client, s: Settings, req: RunRequest, workflow_id: str, timeout_s: float = 1800) -> tuple[RunResult, list[WorkflowHistory]]:
    """Run `req` to its result; also the histories of every run of its chain."""
    handle = await start(client, s, req, workflow_id=workflow_id)
    result = await asyncio.wait_for(handle.result(), timeout_s)
    return result, await chain(client, handle.id, handle.first_execution_run_id)


def sizes(histories: list[WorkflowHistory]) -> list[tuple[int, int]]:
    """(events, bytes) of each run."""
    return [(len(h.events), history_bytes(h)) for h in histories]
