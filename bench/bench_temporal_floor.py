"""What Temporal alone costs for runs of the many-runs shape: the floor under
bench_many_runs.py.

    python bench/bench_temporal_floor.py [--runs 100] [--latency 0.5] [--repeats 2]

A run of bench_many_runs.py is, in Temporal's terms: a workflow that resolves
its models in a local activity, a `root_turn` activity, a `run_cell` activity
that sends one Update to its own workflow, whose handler runs a sub-call
activity, then a second `root_turn`, and 7 search-attribute upserts (the
run's own and the `workflow.patched` markers'). This script runs that shape
with activities that only wait the model latency (no model, no sandbox, no
object storage, no payload larger than a few bytes) on the same dev server
(same flags, `cli/services.py`), one worker in this process configured like
ours (outside the workflow sandbox, 256 activity slots), 100 runs started
together. Its wall time is what Temporal and the SDK need on this machine
before any of the engine's own work; the ideal is the chain, 3 x latency.

Shapes:
- `run`: the shape above (6 workflow tasks, 4 activity tasks, 1 Update).
- `run-no-upserts`: the same without search-attribute upserts.
- `local-turns`: root turns as local activities (a structural option: 2
  activity tasks and 2 workflow tasks fewer per run).
- `our-payloads`: `run` with payloads the size of a bench_many_runs.py run's
  (its history: 47 events, ~107 KB a run, most of it the 20 prompts of
  2,000 characters in the Update and again in the sub-call activity's
  input, the root turns' new messages, small results).

Results: results/temporal_floor.json.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

from temporalio import activity, workflow  # noqa: E402
from temporalio.common import SearchAttributeKey  # noqa: E402
from temporalio.worker import UnsandboxedWorkflowRunner, Worker  # noqa: E402

from activities.temporal_client import connect  # noqa: E402
from worker import MAX_ACTIVITIES  # noqa: E402

SHAPES = ("run", "run-no-upserts", "local-turns", "our-payloads")
# Payload sizes of the `our-payloads` shape, from a bench_many_runs.py history.
_PROMPTS = "p" * 40_000  # the batch's prompts: the Update's argument and the sub-call activity's input
_TURN_MESSAGES = "m" * 5_000  # a root turn's new messages
_RESULT = "r" * 1_200  # an activity's result (~1.2 KB in all, sub-call answers included)
_STATUS = SearchAttributeKey.for_keyword("RlmStatus")
_DEPTH = SearchAttributeKey.for_int("RlmDepth")
_ROOT = SearchAttributeKey.for_keyword("RlmRootRunId")
_TIMEOUT = {"start_to_close_timeout": timedelta(seconds=60)}


@dataclass
class FloorInput:
    shape: str
    latency_s: float


@activity.defn(name="floor_resolve")
async def floor_resolve() -> str:
    return "ok"


@activity.defn(name="floor_turn")
async def floor_turn(latency_s: float, messages: str = "") -> str:
    await asyncio.sleep(latency_s)
    return _RESULT if messages else "reply"


@activity.defn(name="floor_calls")
async def floor_calls(latency_s: float, prompts: str = "") -> list[str]:
    await asyncio.sleep(latency_s)
    return [_RESULT[:60] if prompts else "answer"] * 20  # 20 short answers


class CellActivity:
    def __init__(self, client) -> None:
        self.client = client

    @activity.defn(name="floor_cell")
    async def floor_cell(self, prompts: str = "") -> int:
        # As a cell's host function does: an Update on its own run, waited for.
        handle = self.client.get_workflow_handle(activity.info().workflow_id)
        answers = await handle.execute_update(
            "subcalls", args=[f"{activity.info().activity_id}-1", prompts], result_type=list
        )
        return len(answers)


@workflow.defn(name="FloorRun", sandboxed=False)
class FloorRun:
    def __init__(self) -> None:
        self._shape = ""
        self._latency_s = 0.0

    def _upsert(self, *updates) -> None:
        if self._shape != "run-no-upserts":
            workflow.upsert_search_attributes(list(updates))

    def _patched(self, name: str) -> None:
        # A first `workflow.patched` records a marker and upserts TemporalChangeVersion.
        if self._shape != "run-no-upserts":
            workflow.patched(name)

    async def _turn(self) -> str:
        if self._shape == "local-turns":
            return await workflow.execute_local_activity(floor_turn, self._latency_s, **_TIMEOUT)
        messages = _TURN_MESSAGES if self._shape == "our-payloads" else ""
        return await workflow.execute_activity(floor_turn, args=[self._latency_s, messages], **_TIMEOUT)

    @workflow.run
    async def run(self, request: FloorInput) -> str:
        self._shape, self._latency_s = request.shape, request.latency_s
        self._upsert(_DEPTH.value_set(0), _ROOT.value_set(workflow.info().workflow_id), _STATUS.value_set("running"))
        self._patched("resolve-locally")
        await workflow.execute_local_activity(floor_resolve, **_TIMEOUT)
        await self._turn()
        await workflow.execute_activity("floor_cell", _PROMPTS if self._shape == "our-payloads" else "", **_TIMEOUT)
        await self._turn()
        self._upsert(_STATUS.value_set("completed"))
        return "FINAL"

    @workflow.update(name="subcalls")
    async def subcalls(self, call_id: str, prompts: str = "") -> list[str]:
        for patch in range(4):
            self._patched(f"patch-{patch}")
        return await workflow.execute_activity(floor_calls, args=[self._latency_s, prompts], **_TIMEOUT)


async def one_round(client, task_queue: str, shape: str, runs: int, latency_s: float) -> float:
    started = time.perf_counter()
    handles = await asyncio.gather(*(
        client.start_workflow(FloorRun.run, FloorInput(shape, latency_s), id=f"floor-{uuid.uuid4()}",
                              task_queue=task_queue)
        for _ in range(runs)
    ))  # fmt: skip
    await asyncio.gather(*(handle.result() for handle in handles))
    return time.perf_counter() - started


def floor_worker(client, task_queue: str) -> Worker:
    """A worker for FloorRun, configured like ours (worker.py)."""
    return Worker(
        client, task_queue=task_queue, workflows=[FloorRun],
        activities=[floor_resolve, floor_turn, floor_calls, CellActivity(client).floor_cell],
        workflow_runner=UnsandboxedWorkflowRunner(),
        activity_executor=concurrent.futures.ThreadPoolExecutor(max_workers=MAX_ACTIVITIES),
        max_concurrent_activities=MAX_ACTIVITIES,
    )  # fmt: skip


@contextlib.asynccontextmanager
async def warm_floor_worker(services: h.Services) -> AsyncIterator[Callable[[str, int, float], Awaitable[dict]]]:
    """A FloorRun worker, warmed up; yields `measured(shape, runs, latency_s)`:
    one round's wall time and the CPU of Temporal and of this process."""
    client = await connect(services.settings)
    task_queue = f"floor-{uuid.uuid4()}"

    async def measured(shape: str, runs: int, latency_s: float) -> dict[str, float]:
        t0, c0 = h.proc_cpu_s(services.temporal_pid), time.process_time()
        wall = await one_round(client, task_queue, shape, runs, latency_s)
        return {"wall": wall, "temporal": h.proc_cpu_s(services.temporal_pid) - t0, "ours": time.process_time() - c0}

    async with floor_worker(client, task_queue):
        await one_round(client, task_queue, "run", 5, 0.01)  # warm-up
        yield measured


async def floor_once(services: h.Services, shape: str, runs: int, latency_s: float) -> dict[str, float]:
    """One round of `shape` on its own warmed-up worker (bench_many_runs.py
    measures the floor right after its own runs with this)."""
    async with warm_floor_worker(services) as measured:
        m = await measured(shape, runs, latency_s)
    return {"wall_s": round(m["wall"], 2), "temporal_cpu_s": round(m["temporal"], 2),
            "worker_and_client_cpu_s": round(m["ours"], 2)}


async def measure(services: h.Services, args) -> dict:
    measured: dict[str, dict[str, list[float]]] = {shape: {"wall": [], "temporal": [], "ours": []} for shape in SHAPES}
    async with warm_floor_worker(services) as round_of:
        # Shapes interleaved, so that the machine's drift falls on all of them.
        for _ in range(args.repeats):
            for shape in SHAPES:
                for name, value in (await round_of(shape, args.runs, args.latency)).items():
                    measured[shape][name].append(value)
    ideal = 3 * args.latency
    results: dict[str, dict] = {}
    for shape, m in measured.items():
        results[shape] = {
            "wall_s": h.spread(m["wall"], 2),
            "ratio_to_ideal": round(min(m["wall"]) / ideal, 2),
            "temporal_cpu_s": h.spread(m["temporal"], 2),
            "worker_and_client_cpu_s": h.spread(m["ours"], 2),
            "cpu_ms_per_run": round(1000 * (min(m["temporal"]) + min(m["ours"])) / args.runs, 1),
        }
        print(f"{shape}: {args.runs} runs in {', '.join(f'{w:.2f}' for w in m['wall'])} s (ideal {ideal:.2f} s); "
              f"CPU s temporal {', '.join(f'{c:.2f}' for c in m['temporal'])}, worker+client "
              f"{', '.join(f'{c:.2f}' for c in m['ours'])}")  # fmt: skip
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--latency", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output", default="temporal_floor")
    args = parser.parse_args()
    with h.private_services() as services:
        shapes = asyncio.run(measure(services, args))
    path = h.write_results(args.output, {
        "runs": args.runs, "latency_s": args.latency, "ideal_s": 3 * args.latency, "target_ratio": 2.0,
        "shapes": shapes,
    })  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
