"""Long faults, each a function that runs one run through it and returns
what happened; tests/test_chaos_outages.py runs them at the same time (each
with its own model server, worker and, for server outages, its own Temporal
and S3), so the suite pays for one minute of outage, not four."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from activities.context_store import ContextStore
from activities.object_store import ObjectStore
from activities.settings import Settings
from tests.chaos.observe import completed_model_calls, recorded_sub_calls, tree, wait_until
from tests.chaos.servers import KillableServices
from tests.chaos.workers import WorkerProcesses
from tests.fake_llm import Billed, FakeLLM, FakeRequest
from tests.fixtures_llm import FAKE_API_KEY_VALUE, FAKE_MODEL_NAMES
from tests.run_harness import ROOT, SUB, isolated, repl, request, start
from worker import connect
from workflows.result import RunResult

OUTAGE_S = 60.0
ITEMS, HELD_FROM = 6, 3  # a cell's batch; items >= HELD_FROM are in flight when the fault starts
RESULT_TIMEOUT_S = 240.0


@dataclass
class Outcome:
    result: RunResult
    requests: list[FakeRequest]
    billed: Billed
    abandoned: int
    elapsed_s: float
    log_tail: str
    notes: dict = field(default_factory=dict)


def fake_server() -> FakeLLM:
    return FakeLLM(api_key=FAKE_API_KEY_VALUE, models=list(FAKE_MODEL_NAMES)).start()


def script_batch(llm: FakeLLM, held: threading.Event) -> str:
    """Turn 1: a cell sums the answers of ITEMS sub-calls; turn 2: FINAL(sum)."""
    expected = str(sum(range(ITEMS)))
    cell = f"r = llm_query_batched([f'item {{i}}' for i in range({ITEMS})])\nprint('total', sum(int(x) for x in r))"
    llm.add_rule("Turn 1 of", repl(cell), model=ROOT, name="turn1")
    llm.add_rule(f"total {expected}", f"FINAL({expected})", model=ROOT, name="final")
    llm.add_rule(None, lambda r: r.last_user_text.split()[-1], model=SUB, name="fast")
    llm.add_rule(
        lambda r: int(r.last_user_text.split()[-1]) >= HELD_FROM,
        lambda r: r.last_user_text.split()[-1],
        model=SUB, name="held", hold=held,
    )  # fmt: skip
    return expected


async def _result(settings: Settings, workflow_id: str) -> RunResult:
    client = await connect(settings)
    handle = client.get_workflow_handle(workflow_id, result_type=RunResult)
    return await asyncio.wait_for(handle.result(), RESULT_TIMEOUT_S)


def server_outage(service: str, data_dir: Path) -> Outcome:
    """`service` ("temporal" or "s3") is killed while a cell waits on
    sub-calls, whose answers arrive during the outage; it comes back after
    OUTAGE_S on the same state; the worker is never restarted."""
    started = time.monotonic()
    services = KillableServices(data_dir).up()
    try:
        with fake_server() as llm:
            held = threading.Event()
            script_batch(llm, held)
            s = isolated(services.settings)
            ctx = ContextStore(ObjectStore.from_settings(s)).put_value("item list")
            with WorkerProcesses(s, llm.url, data_dir / "workers.log") as workers:
                worker = workers.start()

                async def until_waiting() -> tuple[str, int]:
                    client = await connect(s)
                    handle = await start(client, s, request("total?", ctx), workflow_id=f"chaos-{service}-down-{uuid.uuid4().hex[:6]}")
                    await asyncio.to_thread(llm.wait_for_count, ITEMS - HELD_FROM, "held", 120.0)

                    async def answered():
                        return await recorded_sub_calls(s, handle.id) >= HELD_FROM

                    await wait_until("the fast sub-calls to be answered and recorded", answered)
                    return handle.id, completed_model_calls(await tree(client, handle.id))

                workflow_id, answered_before = asyncio.run(until_waiting())
                services.kill(service)
                down_at = time.monotonic()
                held.set()  # the calls in flight finish while the service is down
                llm.wait_idle(30.0)
                time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down_at)))  # the outage itself, not a sync
                worker_alive = worker.poll() is None
                services.restart()
                outage_s = time.monotonic() - down_at
                result = asyncio.run(_result(s, workflow_id))
                return Outcome(
                    result, llm.requests(), llm.billed(), llm.abandoned(), time.monotonic() - started, workers.log_tail(),
                    notes={"outage_s": outage_s, "worker_alive_after_outage": worker_alive, "answered_before": answered_before},
                )  # fmt: skip
    finally:
        services.down()


def provider_fault(kind: str, settings: Settings, data_dir: Path, contexts: ContextStore) -> Outcome:
    """The root model answers 500 (`kind` "500") or never answers within the
    call timeout (`kind` "timeout"), for longer than the retry policy lasts
    (5 attempts; for timeouts about a minute: 5 x 10 s plus 15 s of backoff)."""
    started = time.monotonic()
    with fake_server() as llm:
        stalled = threading.Event()
        if kind == "500":
            llm.add_rule(None, "upstream overloaded", status=500, model=ROOT, name="fault")
        else:
            llm.add_rule(None, "FINAL(never seen)", hold=stalled, model=ROOT, name="fault")
        s = isolated(settings)
        ctx = contexts.put_value("anything")
        # Timeouts: a call gets 12 s (its HTTP timeout is 10 s of it).
        limits = {"model_call_timeout_s": 12.0} if kind == "timeout" else {}
        try:
            with WorkerProcesses(s, llm.url, data_dir / "workers.log") as workers:
                workers.start()

                async def go() -> RunResult:
                    client = await connect(s)
                    handle = await start(client, s, request("q", ctx, limits=limits), workflow_id=f"chaos-provider-{kind}-{uuid.uuid4().hex[:6]}")
                    return await asyncio.wait_for(handle.result(), RESULT_TIMEOUT_S)

                result = asyncio.run(go())
                llm.wait_idle(30.0)
                return Outcome(result, llm.requests(), llm.billed(), llm.abandoned(), time.monotonic() - started, workers.log_tail())
        finally:
            stalled.set()
