"""Many runs at once through one, two and four worker processes.

    python bench/bench_many_runs.py [--runs 100] [--subcalls 20] [--latency 0.5]
                                    [--context-mb 4] [--workers 1,2,4] [--shared-context]

Each run: root turn 1 answers a ```repl``` cell that sends `--subcalls`
sub-calls in one `llm_query_batched` (2,000-character slices spread over the
context); root turn 2 answers FINAL. Every model call (root and sub) is
answered by the scripted server after `--latency` seconds; it runs in its own
process, so its CPU is not the workers'. Contexts are `--context-mb` MB of
text (1M tokens at ~4 characters a token), a different one per run (distinct
chunks in S3, distinct files in each worker's cache, distinct REPL contents),
or one shared context with `--shared-context`; uploaded before the clock
starts.

All runs are started together (one asyncio.gather of `start_workflow`); the
figure is the wall time from the first start to the last result. The ideal
is what the model calls need at the configured concurrency: a run's own
chain of calls (root, one parallel batch, root: 3 x latency, the batch
fitting in the run's `max_concurrency`), or, if longer, all model calls
divided over the calls the workers may have in flight at once. Nothing
caps those below the runs' own caps: a sub-call activity carries a whole
batch of up to `WHOLE_BATCH_CALLS` calls (workflows/call_groups.py), so the
activity slots left beside the run_cell activities (which hold one each
while their batch runs) carry far more calls than the runs ask for. With
the defaults the ideal is the chain, 1.5 s. Target: within 2x of the ideal.

`ideal_one_call_per_slot_s` is the ideal this script reported before
(2026-12-04, eleventh pass and earlier): all calls over the activity slots
as if each slot carried one call, true only before sub-calls were grouped.
It is kept so that older result files compare; the server's peak of calls
in flight (`model_calls_peak_in_flight`) shows which one the runs met.

After each worker count, Temporal's floor for the same runs
(bench_temporal_floor.py's `our-payloads` shape: same workflow shape and
payload sizes, activities that only wait, same server) is measured right
away, so that the machine's drift falls on both: `ratio_to_temporal_floor`.

Workers are `python worker.py` processes (what `rlm worker` runs), each with
its own data dir; peak RSS (VmHWM) and RSS sampled every 0.2 s from /proc.
Activities per worker come from the runs' histories (the identity of every
ActivityTaskStarted event). With one worker, a second phase holds all runs at
root turn 2 (their REPLs idle between cells) and reads the worker's RSS then:
memory per idle run = (RSS with all runs idle - RSS after the warm-up) / runs,
and what parking added = (RSS with all runs idle - RSS just before) / runs
(the first also counts the REPL pool's idle REPLs, bounded, and what the
allocator kept from the burst).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402
from bench_temporal_floor import floor_once  # noqa: E402

from temporalio.api.enums.v1 import EventType, TimeoutType, WorkflowTaskFailedCause  # noqa: E402

from activities.context_store import ContextStore  # noqa: E402
from activities.object_store import ObjectStore  # noqa: E402
from activities.temporal_client import connect  # noqa: E402
from tests.fixtures_llm import FAKE_API_KEY_ENV, FAKE_API_KEY_VALUE, FAKE_MODEL_NAMES, models_json  # noqa: E402
from tests.run_harness import repl, request, start  # noqa: E402
from worker import MAX_ACTIVITIES  # noqa: E402
from workflows.call_groups import WHOLE_BATCH_CALLS  # noqa: E402

MB = 1_000_000
TARGET_RATIO = 2.0
MODEL_CLIENT = "litellm"  # ModelSpec.client of the workers' models (--model-client)
CONCURRENCY = 32  # Caps.max_concurrency of every run (the default)
SLICE_CHARS = 2_000
CELL = (
    "step = len(context) // {n}\n"
    "r = llm_query_batched([f'part {{i}}: ' + context[i * step:i * step + {chars}] for i in range({n})])\n"
    "print(len(r), sum(a == 'ok' for a in r))"
)
_WORDS = "alpha beta gamma delta ledger orchid river stone cloud amber signal harbor meadow copper".split()


# -- scripted model server in its own process ------------------------------------


def _serve(n: int, latency: float, conn) -> None:
    """Root: turn 1 the fan-out cell, turn 2 FINAL (held while the parent says so); sub: "ok"."""
    from tests.fake_llm import FakeLLM

    fake = FakeLLM(api_key=FAKE_API_KEY_VALUE, models=list(FAKE_MODEL_NAMES)).start()
    release = threading.Event()
    release.set()
    fake.add_rule(None, repl(CELL.format(n=n, chars=SLICE_CHARS)), model="fake-root", delay_s=latency, name="turn1")
    fake.add_rule("Turn 2 of", "FINAL(done)", model="fake-root", delay_s=latency, name="turn2", hold=release)
    fake.add_rule(None, "ok", model="fake-sub", delay_s=latency, name="sub")
    conn.send(fake.url)
    while True:
        command = conn.recv()
        if command == "hold":
            release.clear()
        elif command == "release":
            release.set()
        elif command == "counts":
            conn.send({name: fake.count(name) for name in ("turn1", "turn2", "sub")})
        elif command == "peak":
            conn.send(fake.take_peak_in_flight())
        elif command == "stop":
            release.set()
            break
    fake.stop()


class ModelServer:
    def __init__(self, n: int, latency: float) -> None:
        os.environ[FAKE_API_KEY_ENV] = FAKE_API_KEY_VALUE
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(n, latency, child), daemon=True)
        self._proc.start()
        if not self._conn.poll(60):
            raise RuntimeError("the scripted model server did not start")
        self.url: str = self._conn.recv()
        self.pid = self._proc.pid

    def send(self, command: str) -> None:
        self._conn.send(command)

    def counts(self) -> dict[str, int]:
        self._conn.send("counts")
        return self._conn.recv()

    def take_peak_in_flight(self) -> int:
        """Most calls the server held at once since the last time asked."""
        self._conn.send("peak")
        return self._conn.recv()

    def stop(self) -> None:
        with contextlib.suppress(OSError, EOFError):
            self._conn.send("stop")
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()


# -- worker processes ----------------------------------------------------------------


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Workers:
    """`count` worker processes on one task queue, with an RSS sampler."""

    def __init__(self, settings, count: int, model_url: str, tmp: Path) -> None:
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        self.peak_sampled_mb: dict[int, float] = {}
        self._stop = threading.Event()
        for i in range(count):
            data_dir = tmp / f"worker-{settings.task_queue}-{i}"
            data_dir.mkdir(parents=True)
            env = os.environ | settings.to_env() | {
                "RLM_DATA_DIR": str(data_dir), "RLM_MODELS_JSON": models_json(model_url, client=MODEL_CLIENT), "RLM_LOG_JSON": "1",
                "RLM_LOG_LEVEL": "warning",
            }
            log = data_dir / "worker.log"
            ready = data_dir / "ready"
            with log.open("wb") as out:
                self.procs.append(subprocess.Popen(
                    [sys.executable, str(h.ROOT / "worker.py"), "--ready-file", str(ready)],
                    env=env, cwd=h.ROOT, stdout=out, stderr=subprocess.STDOUT,
                ))
            self.logs.append(log)
        deadline = time.monotonic() + 120
        for proc, log in zip(self.procs, self.logs):
            while not (log.parent / "ready").exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"worker {proc.pid} did not start: {log.read_text()[-2000:]}")
                time.sleep(0.05)
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            for pid in self.pids:
                with contextlib.suppress(OSError, ValueError):
                    self.peak_sampled_mb[pid] = max(self.peak_sampled_mb.get(pid, 0.0), _rss_mb(pid))

    def rss_mb(self) -> dict[int, float]:
        return {pid: round(_rss_mb(pid), 1) for pid in self.pids}

    def hwm_mb(self) -> dict[int, float]:
        return {pid: round(h.peak_rss_mb(pid), 1) for pid in self.pids}

    def cpu_s(self) -> dict[int, float]:
        return {pid: h.proc_cpu_s(pid) for pid in self.pids}

    def stop(self) -> None:
        self._stop.set()
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


# -- the runs ------------------------------------------------------------------------


def make_contexts(settings, runs: int, size_mb: int, shared: bool) -> list[Any]:
    store = ContextStore(ObjectStore.from_settings(settings))
    rng = random.Random(13)
    base = " ".join(rng.choice(_WORDS) for _ in range(size_mb * MB // 6))[: size_mb * MB - 40]
    if shared:
        ref = store.put_value(base)
        return [ref] * runs
    # A different first line per run: every context is its own chunk and file.
    return [store.put_value(f"document of run {i:04d}\n" + base) for i in range(runs)]


async def run_all(client, settings, contexts: list[Any], prefix: str) -> tuple[float, list[Any]]:
    begun = time.perf_counter()
    handles = await asyncio.gather(*(
        start(client, settings, request("q?", ctx, caps={"max_concurrency": CONCURRENCY, "max_turns": 4},
                                        limits={"cell_timeout_s": 600, "cell_memory_mb": CELL_MEMORY_MB}),
              workflow_id=f"{prefix}-{i:03d}")
        for i, ctx in enumerate(contexts)
    ))
    results = await asyncio.gather(*(_result(hd) for hd in handles))
    wall = time.perf_counter() - begun
    for result in results:
        assert result.status == "completed" and result.answer == "done", result
    return wall, handles


async def _result(handle):
    """The run's result; an overloaded server's "Workflow is busy" is asked again."""
    from temporalio.service import RPCError, RPCStatusCode

    while True:
        try:
            return await handle.result()
        except RPCError as exc:
            if exc.status != RPCStatusCode.RESOURCE_EXHAUSTED:
                raise
            await asyncio.sleep(0.5)


async def activities_by_worker(handles) -> tuple[Counter, Counter, Counter, Counter, dict[str, Any]]:
    """Activity and workflow tasks started per worker identity, retried
    activity attempts by type and cause, workflow tasks that timed out or
    failed, and where a run's time went, from the histories."""
    acts: Counter = Counter()
    tasks: Counter = Counter()
    retries: Counter = Counter()
    task_problems: Counter = Counter()
    spans: dict[str, list[float]] = {}
    for handle in handles:
        history = await handle.fetch_history()
        types: dict[int, str] = {}
        at: dict[int, float] = {}  # event id -> time, for the events a later one points back to
        first = history.events[0].event_time.ToDatetime().timestamp()
        for e in history.events:
            t = e.event_time.ToDatetime().timestamp()
            at[e.event_id] = t
            if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
                types[e.event_id] = e.activity_task_scheduled_event_attributes.activity_type.name
            elif e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
                a = e.activity_task_started_event_attributes
                acts[a.identity.split("@")[0]] += 1
                spans.setdefault(f"{types.get(a.scheduled_event_id, '?')} queued", []).append(t - at[a.scheduled_event_id])
                if a.attempt > 1:  # the last failure of this activity, as recorded on its start
                    cause = a.last_failure.application_failure_info.type or a.last_failure.message[:60] or "timeout"
                    retries[f"{types.get(a.scheduled_event_id, '?')}: {cause}"] += a.attempt - 1
            elif e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
                a = e.activity_task_completed_event_attributes
                spans.setdefault(f"{types.get(a.scheduled_event_id, '?')} ran", []).append(t - at[a.started_event_id])
            elif e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED:
                w = e.workflow_task_started_event_attributes
                tasks[w.identity.split("@")[0]] += 1
                spans.setdefault("workflow task queued", []).append(t - at[w.scheduled_event_id])
            elif e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED:
                w = e.workflow_task_completed_event_attributes
                spans.setdefault("workflow task ran", []).append(t - at[w.started_event_id])
            elif e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT:
                # A sticky task not picked up in time goes to the shared queue
                # and replays the whole history there: extra work on both sides.
                kind = TimeoutType.Name(e.workflow_task_timed_out_event_attributes.timeout_type)
                task_problems[f"timed out: {kind.removeprefix('TIMEOUT_TYPE_').lower()}"] += 1
            elif e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED:
                cause = WorkflowTaskFailedCause.Name(e.workflow_task_failed_event_attributes.cause)
                task_problems[f"failed: {cause.removeprefix('WORKFLOW_TASK_FAILED_CAUSE_').lower()}"] += 1
        spans.setdefault("run", []).append(history.events[-1].event_time.ToDatetime().timestamp() - first)
    return acts, tasks, retries, task_problems, {name: _spread(values) for name, values in sorted(spans.items())}


def _spread(values: list[float]) -> dict[str, float]:
    """Median, 90th percentile and sum of some spans, in seconds."""
    ordered = sorted(values)
    return {"n": len(ordered), "median_s": round(ordered[len(ordered) // 2], 3),
            "p90_s": round(ordered[int(len(ordered) * 0.9)], 3), "sum_s": round(sum(ordered), 1)}


def ideal_s(runs: int, n: int, latency: float, workers: int) -> dict[str, float]:
    """What the model calls need at the configured concurrency (module docstring)."""
    waves = -(-n // CONCURRENCY)
    chain = latency * (2 + waves)  # root, ceil(n / cap) batch waves, root
    calls = runs * (n + 2)
    # A run_cell holds an activity slot while its batch runs; every other slot
    # may carry a sub-call activity of up to WHOLE_BATCH_CALLS calls.
    free_slots = workers * MAX_ACTIVITIES - min(runs, workers * MAX_ACTIVITIES // 2)
    in_flight = min(runs * min(n, CONCURRENCY), free_slots * WHOLE_BATCH_CALLS)
    spread_s = calls * latency / in_flight
    one_per_slot_s = max(chain, calls * latency / free_slots)
    return {"chain_s": round(chain, 3), "calls_in_flight_allowed": in_flight, "calls_over_in_flight_s": round(spread_s, 3),
            "ideal_s": round(max(chain, spread_s), 3), "model_calls": calls,
            "ideal_one_call_per_slot_s": round(one_per_slot_s, 3), "activity_slots_beside_cells": free_slots}


async def bench_workers(svc: h.Services, server: ModelServer, contexts, count: int, args, tmp: Path) -> dict[str, Any]:
    settings = svc.settings.model_copy(update={"task_queue": f"many-{count}w-{uuid.uuid4().hex[:6]}"})
    workers = Workers(settings, count, server.url, tmp)
    try:
        client = await connect(settings)
        # Warm-up: one run per worker (module load, first context, imports).
        await run_all(client, settings, contexts[:count], f"{settings.task_queue}-warm")
        rss_before = workers.rss_mb()
        others = {"temporal": svc.temporal_pid, "s3": svc.s3_pid, "model server": server.pid}
        cpu0 = workers.cpu_s() | {k: h.proc_cpu_s(p) for k, p in others.items() if p}
        load0 = [round(x, 2) for x in os.getloadavg()]
        server.take_peak_in_flight()
        wall, handles = await run_all(client, settings, contexts, f"{settings.task_queue}-run")
        peak_in_flight = server.take_peak_in_flight()
        cpu1 = workers.cpu_s() | {k: h.proc_cpu_s(p) for k, p in others.items() if p}
        cpu = {str(k): round(cpu1[k] - v, 1) for k, v in cpu0.items()}
        load1 = [round(x, 2) for x in os.getloadavg()]
        rss_after = workers.rss_mb()
        acts, tasks, retries, task_problems, spans = await activities_by_worker(handles)
        ideal = ideal_s(len(contexts), args.subcalls, args.latency, count)
        row: dict[str, Any] = {
            "workers": count,
            "wall_s": round(wall, 2),
            **ideal,
            "ratio_to_ideal": round(wall / ideal["ideal_s"], 2),
            "ratio_to_ideal_one_call_per_slot": round(wall / ideal["ideal_one_call_per_slot_s"], 2),
            "target_ratio": TARGET_RATIO,
            "model_calls_peak_in_flight": peak_in_flight,
            "activities_per_worker": {str(k): v for k, v in acts.items()},
            "workflow_tasks_per_worker": {str(k): v for k, v in tasks.items()},
            "activity_retries_by_cause": dict(retries.most_common()),
            "workflow_task_timeouts_and_failures": dict(task_problems.most_common()),
            "spans_from_histories": spans,
            "cpu_s_during_runs": cpu,
            "worker_rss_mb_before": {str(k): v for k, v in rss_before.items()},
            "worker_rss_mb_after": {str(k): v for k, v in rss_after.items()},
            "worker_peak_rss_mb_sampled": {str(k): round(v, 1) for k, v in workers.peak_sampled_mb.items()},
            "worker_peak_rss_mb_vmhwm": {str(k): v for k, v in workers.hwm_mb().items()},
            "load_avg_before": load0,
            "load_avg_after": load1,
        }
        print(
            f"{count} worker(s): {len(contexts)} runs in {wall:.1f} s, ideal {ideal['ideal_s']:.2f} s "
            f"(x{row['ratio_to_ideal']}; x{row['ratio_to_ideal_one_call_per_slot']} of the one-call-per-slot "
            f"ideal {ideal['ideal_one_call_per_slot_s']:.2f} s); peak calls in flight {peak_in_flight}; activities per worker {dict(acts)}; retries {dict(retries)}; workflow tasks {dict(task_problems) or 'no timeouts or failures'}; CPU s {cpu}; "
            f"peak RSS MB {row['worker_peak_rss_mb_vmhwm']}; load {load0} -> {load1}"
        )
        print("  spans (median / p90 s): " + "; ".join(
            f"{name} {v['median_s']}/{v['p90_s']}" for name, v in spans.items()))
        if args.floor:
            # Temporal alone, same run shape and payload sizes, same server,
            # right after: what this machine allows before the engine's work.
            floor = await floor_once(svc, "our-payloads", len(contexts), args.latency)
            row["temporal_floor"] = floor | {"shape": "our-payloads (bench_temporal_floor.py)"}
            row["ratio_to_temporal_floor"] = round(wall / floor["wall_s"], 2)
            print(f"  Temporal floor (our payloads, just after): {floor['wall_s']:.1f} s "
                  f"(Temporal CPU {floor['temporal_cpu_s']:.1f} s); ours x{row['ratio_to_temporal_floor']} of it")
        if count == 1 and args.idle_phase:
            row["idle"] = await idle_phase(client, settings, server, workers, contexts, rss_before[workers.pids[0]])
        return row
    finally:
        workers.stop()


async def idle_phase(client, settings, server: ModelServer, workers: Workers, contexts, rss_before: float) -> dict[str, Any]:
    """All runs parked between their two cells: the worker's RSS then, against
    its RSS after the warm-up run (`rss_before`: one idle REPL) and against
    its RSS just before parking (after the burst: the REPL pool already holds
    its idle REPLs, and the allocator what the burst left it). The first
    counts the pool's fill in every run's share; the second is what parking
    the runs added."""
    pid = workers.pids[0]
    rss_before_parking = _rss_mb(pid)
    server.send("hold")
    task = asyncio.create_task(run_all(client, settings, contexts, f"{settings.task_queue}-idle"))
    base = server.counts()["turn2"]
    deadline = time.monotonic() + 600
    while server.counts()["turn2"] - base < len(contexts):
        if time.monotonic() > deadline:
            raise RuntimeError("runs did not all reach root turn 2")
        await asyncio.sleep(0.2)
    rss_idle = _rss_mb(pid)
    server.send("release")
    await task
    rss_after = _rss_mb(pid)
    per_run = (rss_idle - rss_before) / len(contexts)
    added_per_run = (rss_idle - rss_before_parking) / len(contexts)
    out = {
        "runs_parked": len(contexts),
        "worker_rss_mb_after_warmup": round(rss_before, 1),
        "worker_rss_mb_before_parking": round(rss_before_parking, 1),
        "worker_rss_mb_all_idle": round(rss_idle, 1),
        "worker_rss_mb_after_release": round(rss_after, 1),
        "mb_per_idle_run": round(per_run, 2),
        "mb_per_idle_run_added_by_parking": round(added_per_run, 2),
    }
    print(f"idle: {len(contexts)} runs parked at root turn 2: worker RSS {rss_before:.0f} (after warm-up) / "
          f"{rss_before_parking:.0f} (before parking) -> {rss_idle:.0f} MB ({per_run:.2f} / {added_per_run:.2f} MB "
          f"per idle run), {rss_after:.0f} MB after")
    return out


CELL_MEMORY_MB = 2048


def main() -> None:
    global CELL_MEMORY_MB, MODEL_CLIENT
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--subcalls", type=int, default=20)
    parser.add_argument("--latency", type=float, default=0.5, help="seconds before every model reply")
    parser.add_argument("--context-mb", type=int, default=4)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--shared-context", action="store_true", help="one stored context for all runs")
    parser.add_argument("--cell-memory-mb", type=int, default=CELL_MEMORY_MB, help="RunLimits.cell_memory_mb of every run")
    parser.add_argument("--no-idle-phase", dest="idle_phase", action="store_false")
    parser.add_argument("--no-floor", dest="floor", action="store_false",
                        help="skip the Temporal-alone round after each worker count (bench_temporal_floor.py)")
    parser.add_argument("--output", default="many_runs")
    parser.add_argument("--model-client", choices=["litellm", "direct", "auto"], default="litellm",
                        help="ModelSpec.client of the workers' models")
    args = parser.parse_args()
    CELL_MEMORY_MB = args.cell_memory_mb
    MODEL_CLIENT = args.model_client
    load_start = [round(x, 2) for x in os.getloadavg()]
    rows = []
    with tempfile.TemporaryDirectory(prefix="rlm-many-") as tmp, h.private_services() as svc:
        t0 = time.perf_counter()
        contexts = make_contexts(svc.settings, args.runs, args.context_mb, args.shared_context)
        upload_s = time.perf_counter() - t0
        print(f"{args.runs} contexts of {args.context_mb} MB ({'shared' if args.shared_context else 'distinct'}) "
              f"uploaded in {upload_s:.1f} s")
        server = ModelServer(args.subcalls, args.latency)
        try:
            for count in (int(x) for x in args.workers.split(",")):
                rows.append(asyncio.run(bench_workers(svc, server, contexts, count, args, Path(tmp))))
                # Written after every worker count: a later failure keeps what was measured.
                path = h.write_results(args.output, {
                    "runs": args.runs, "subcalls_per_run": args.subcalls, "latency_s": args.latency,
                    "model_client": args.model_client,
                    "context_mb": args.context_mb, "contexts": "shared" if args.shared_context else "distinct",
                    "max_concurrency_per_run": CONCURRENCY, "worker_activity_slots": MAX_ACTIVITIES,
                    "cell_memory_mb": args.cell_memory_mb, "upload_s": round(upload_s, 1),
                    "load_avg_at_start": load_start, "by_workers": rows,
                    "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
                })
        finally:
            server.stop()
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
