"""A real run worth looking at, for the tests of `rlm show`, `rlm export` and
`rlm ui`: three root turns, a batch of llm_query sub-calls, a cell that
fails, and two child runs (real worker, Temporal, S3; scripted models)."""

from __future__ import annotations

import asyncio
import re
import threading

from activities.context_store import ContextStore
from activities.object_store import ObjectStore
from activities.settings import Settings
from tests.fake_llm import FakeLLM
from tests.fixtures_llm import fake_registry
from tests.run_harness import ROOT, SUB, isolated, put_context, repl, request, running_worker, start
from workflows.result import RunResult

QUESTION = "Q0 how long are the parts?"
FAILING_CODE = "x = undefined_name + 1"


def _question(r) -> str:
    m = re.search(r"Question: (\S+)", r.all_text)
    return m.group(1) if m else ""


def script(llm: FakeLLM, hold_turn3: threading.Event | None = None) -> None:
    """Root: turn 1 = a batch of two llm_query and a failing cell; turn 2 =
    two child runs; turn 3 = FINAL (held until `hold_turn3` is set, if given)."""
    root = lambda n: lambda r: _question(r) == "Q0" and f"Turn {n} of" in r.last_user_text  # noqa: E731
    llm.add_rule(
        root(1),
        repl('parts = llm_query_batched(["say alpha", "say beta"])\nprint("parts", parts)')
        + "\nAnd one more.\n```repl\n" + FAILING_CODE + "\n```\n",
        model=ROOT, name="turn1",
    )  # fmt: skip
    llm.add_rule(
        root(2),
        repl('sizes = rlm_query_batched(["Ca", "Cb"], contexts=["x" * 10, "y" * 20])\nprint("sizes", sizes)'),
        model=ROOT, name="turn2",
    )  # fmt: skip
    llm.add_rule(root(3), "The sizes are known.\nFINAL(sizes 10 and 20)", model=ROOT, name="turn3", hold=hold_turn3)
    llm.add_rule(lambda r: _question(r) in ("Ca", "Cb"), repl("FINAL(len(context))"), model=ROOT, name="child")
    llm.add_rule(None, lambda r: "reply to " + r.last_user_text, model=SUB, name="sub")


def run_scenario(settings: Settings, llm: FakeLLM, object_store: ObjectStore) -> tuple[Settings, RunResult]:
    """The scenario run to its end on a task queue of its own: (its settings, its result)."""
    llm.reset()
    script(llm)
    s = isolated(settings)
    ctx = put_context(ContextStore(object_store), "the root context")

    async def go() -> RunResult:
        async with running_worker(s, fake_registry(llm)) as client:
            handle = await start(client, s, request(QUESTION, ctx, caps={"max_depth": 1}))
            return await asyncio.wait_for(handle.result(), 120)

    result = asyncio.run(go())
    assert result.status == "completed", result.reason
    assert result.answer == "sizes 10 and 20"
    return s, result
