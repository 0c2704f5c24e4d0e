"""Hostile-input benchmark (issue 10): what a caller, a model or guest code can
send, run through the real engine, with the worker as a separate process.

    python bench/bench_hostile.py [empty maxturns crash budget frame rawctx] [--crash-n 300] 2>hostile.log

For each case: the worker's peak RSS (VmHWM of `python -m worker`), the time
until the run (or the request) ends, tokens the scripted model server billed
vs the tokens cap, and mismatches (replies or answers that are wrong).

- empty: a cell calls `rlm_query("")` (the tree must end, not hang).
- maxturns: a request with `caps.max_turns=0` sent raw by type name.
- crash: `--crash-n` prompts built from a `set`, `llm_query_batched`, the
  worker SIGKILLed mid-batch and a new one started: replies that do not
  belong to their prompt (must be 0) and completed calls made again.
- budget: every sub-call's first attempt answered after the model-call
  timeout (so it is retried), prompts of CJK text, `caps.max_tokens` set:
  billed tokens vs the cap (must be <= cap).
- frame: guest code writes an 8-byte host-call frame header claiming 3 GiB
  to fd 0: worker peak RSS (must stay far below 3 GiB) and the cell error.
- rawctx: a request started by type name whose `context` does not parse
  (a list of numbers; a list of texts became a valid context with issue 12)
  (a raw dict payload): time until the run fails, and its reason.

Figures go to bench/results/hostile.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

from temporalio.client import Client, WorkflowFailureError  # noqa: E402
from temporalio.contrib.pydantic import pydantic_data_converter  # noqa: E402

from activities.context_store import ContextStore
from activities._call_records import recorded_calls  # noqa: E402
from activities.object_store import ObjectStore  # noqa: E402
from tests.fake_llm import FakeLLM  # noqa: E402
from tests.fixtures_llm import models_json  # noqa: E402
from tests.run_harness import ROOT, SUB, repl, request, start  # noqa: E402
from worker import connect  # noqa: E402
from workflows.names import WORKFLOW_RLM_RUN  # noqa: E402
from workflows.result import RunResult
from workflows.steps import CellOutput  # noqa: E402

CASES = ("empty", "maxturns", "crash", "budget", "frame", "rawctx")
RUN_TIMEOUT_S = 180.0


class WorkerProcess:
    """`python -m worker` for one task queue, with the scripted models."""

    def __init__(self, settings, fake_url: str, log_path: Path) -> None:
        self.ready = log_path.with_suffix(f".{uuid.uuid4().hex[:6]}.ready")
        env = os.environ | settings.to_env() | {"RLM_MODELS_JSON": models_json(fake_url), "RLM_LOG_JSON": "1"}
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "--ready-file", str(self.ready)],
            cwd=h.ROOT, env=env, stdout=self._log, stderr=self._log, start_new_session=True,
        )  # fmt: skip

    async def until_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.ready.exists():  # the worker writes it once it polls
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start (exit {self.proc.poll()}); see {self._log.name}")
            await asyncio.sleep(0.05)

    def peak_rss_mb(self) -> float:
        return round(h.peak_rss_mb(self.proc.pid), 1)

    def kill(self) -> float:
        """SIGKILL; returns the peak RSS read just before."""
        peak = self.peak_rss_mb()
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        return peak

    def stop(self) -> float | None:
        peak = self.peak_rss_mb() if self.proc.poll() is None else None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()
        return peak


class Bench:
    def __init__(self, svc: h.Services, fake: FakeLLM, tmp: Path) -> None:
        self.svc, self.fake, self.tmp = svc, fake, tmp
        self.contexts = ContextStore(ObjectStore.from_settings(svc.settings))
        self.log = tmp / "workers.log"

    def settings(self):
        return self.svc.settings.model_copy(update={"task_queue": f"hostile-{uuid.uuid4().hex[:8]}"})

    async def worker(self, settings) -> WorkerProcess:
        w = WorkerProcess(settings, self.fake.url, self.log)
        await w.until_ready()
        return w

    def bill(self, cap: int | None = None) -> dict[str, Any]:
        self.fake.wait_idle(120)  # late replies are billed too
        b = self.fake.billed()
        return {"billed_tokens": b.tokens, "billed_requests": b.requests, "tokens_cap": cap}

    async def raw_failure(self, client: Client, settings, payload: Any) -> tuple[float, str]:
        """Start RLMRun by type name with a plain JSON value; (seconds to the end, reason)."""
        begun = time.perf_counter()
        handle = await client.start_workflow(WORKFLOW_RLM_RUN, payload, id=f"raw-{uuid.uuid4().hex[:8]}", task_queue=settings.task_queue)
        try:
            result = await asyncio.wait_for(handle.result(), RUN_TIMEOUT_S)
            return time.perf_counter() - begun, f"did not fail: {result!r}"[:300]
        except WorkflowFailureError as failed:
            cause = failed.cause
            return time.perf_counter() - begun, f"{type(cause).__name__}: {getattr(cause, 'message', cause)}"

    # -- cases --------------------------------------------------------------

    async def case_empty(self) -> dict[str, Any]:
        self.fake.reset()
        self.fake.add_rule("Turn 1 of", repl("print('empty =>', rlm_query(''))"), model=ROOT)
        self.fake.add_rule("empty =>", "FINAL(done)", model=ROOT, name="saw")
        s = self.settings()
        w = await self.worker(s)
        try:
            client = await connect(s)
            begun = time.perf_counter()
            handle = await start(client, s, request("top", self.contexts.put_value("abc"), caps={"max_depth": 1, "max_wall_s": 600}))
            result = await asyncio.wait_for(handle.result(), RUN_TIMEOUT_S)
            took = time.perf_counter() - begun
        finally:
            peak = w.stop()
        shown = [r.last_user_text for r in self.fake.requests(ROOT) if r.matched_rule and r.matched_rule.name == "saw"]
        line = next((ln for ln in (shown[0] if shown else "").splitlines() if "empty =>" in ln), "")
        ok = result.status == "completed" and "Error: the rlm_query question is empty" in line
        return {
            "case": "rlm_query('') in a cell", "status": result.status, "time_to_end_s": round(took, 2),
            "worker_peak_rss_mb": peak, "mismatches": 0 if ok else 1, "children": len(result.children),
            "detail": line.strip()[:200],
        } | self.bill()  # fmt: skip

    async def case_maxturns(self) -> dict[str, Any]:
        self.fake.reset()
        s = self.settings()
        w = await self.worker(s)
        try:
            client = await connect(s)
            ctx = self.contexts.put_value("abc").model_dump(mode="json")
            took, reason = await self.raw_failure(client, s, {"question": "q?", "context": ctx, "models": {"root": ROOT}, "caps": {"max_turns": 0}})
        finally:
            peak = w.stop()
        ok = "invalid RunRequest" in reason and "max_turns" in reason
        return {
            "case": "caps.max_turns=0 sent raw", "status": "failed", "time_to_end_s": round(took, 2),
            "worker_peak_rss_mb": peak, "mismatches": 0 if ok else 1, "detail": reason[:300],
        } | self.bill()  # fmt: skip

    async def case_crash(self, n: int) -> dict[str, Any]:
        held_from = n // 2  # items >= this wait at the model server until after the kill
        self.fake.reset()
        held = threading.Event()
        cell = (
            f"prompts = list({{f'item {{i}}' for i in range({n})}})\n"
            "r = llm_query_batched(prompts)\n"
            "bad = sum(a != p.split()[-1] for p, a in zip(prompts, r))\n"
            "print('mismatched', bad, 'of', len(prompts))"
        )
        self.fake.add_rule("Turn 1 of", repl(cell), model=ROOT, name="turn1")
        self.fake.add_rule("mismatched", "FINAL(done)", model=ROOT, name="saw")
        self.fake.add_rule(None, lambda r: r.last_user_text.split()[-1], model=SUB, name="fast")
        self.fake.add_rule(
            lambda r: int(r.last_user_text.split()[-1]) >= held_from, lambda r: r.last_user_text.split()[-1],
            model=SUB, name="held", hold=held,
        )  # fmt: skip
        s = self.settings()
        first = await self.worker(s)
        second = None
        try:
            client = await connect(s)
            begun = time.perf_counter()
            # Every held call in flight at once, as with a wide provider quota.
            req = request("q", self.contexts.put_value("items"), caps={"max_concurrency": n}, limits={"cell_timeout_s": 120})
            handle = await start(client, s, req, workflow_id=f"hostile-crash-{uuid.uuid4().hex[:8]}")
            await asyncio.to_thread(self.fake.wait_for_count, n - held_from, "held", 120.0)
            # Every answered call has its record (calls travel in groups that
            # end only with their last call, so count recorded calls, not
            # activities; a group's object holds several).
            while recorded_calls(self.contexts.store, handle.id) < held_from:
                await asyncio.sleep(0.1)  # waiting for an observed fact
            first_peak = first.kill()
            killed_at = time.perf_counter() - begun
            done_before = {r.last_user_text for r in self.fake.requests(SUB) if r.matched_rule and r.matched_rule.name == "fast"}
            held.set()
            second = await self.worker(s)
            result = await asyncio.wait_for(client.get_workflow_handle(handle.id, result_type=RunResult).result(), RUN_TIMEOUT_S)
            took = time.perf_counter() - begun
        finally:
            held.set()
            first.stop()
            second_peak = second.stop() if second else None
        shown = [r.last_user_text for r in self.fake.requests(ROOT) if r.matched_rule and r.matched_rule.name == "saw"]
        m = re.search(r"mismatched (\d+) of (\d+)", shown[-1] if shown else "")
        mismatched = int(m.group(1)) if m else n
        prompts = [r.last_user_text for r in self.fake.requests(SUB)]
        repeated = sum(prompts.count(p) - 1 for p in done_before)
        return {
            "case": f"{n} prompts from a set, worker SIGKILLed mid-batch", "status": result.status,
            "time_to_end_s": round(took, 2), "killed_after_s": round(killed_at, 2),
            "worker_peak_rss_mb": max(first_peak, second_peak or 0.0),
            "worker_peak_rss_mb_each": [first_peak, second_peak], "mismatches": mismatched,
            "prompts": n, "completed_before_kill": len(done_before), "completed_calls_made_again": repeated,
            "sub_requests_received": len(prompts),
            "cell_ran": self.fake.count("turn1"), "detail": (m.group(0) if m else "no cell output seen"),
        } | self.bill()  # fmt: skip

    async def case_budget(self, n: int, cap: int, timeout_s: float, delay_s: float) -> dict[str, Any]:
        self.fake.reset()
        seen: set[str] = set()
        lock = threading.Lock()

        def first_attempt(r) -> bool:
            with lock:
                new = r.last_user_text not in seen
                seen.add(r.last_user_text)
                return new

        cell = (
            f"prompts = [f'{{i}}: ' + '漢字' * 150 for i in range({n})]\n"
            "r = llm_query_batched(prompts)\n"
            "ok = sum(a == p.split(':')[0] for p, a in zip(prompts, r))\n"
            "budget = sum(a.startswith('Budget') for a in r)\n"
            "errors = sum(a.startswith('Error') for a in r)\n"
            "print('answers ok', ok, 'budget refusals', budget, 'errors', errors, 'wrong', len(r) - ok - budget - errors)"
        )
        self.fake.add_rule("Turn 1 of", repl(cell), model=ROOT)
        self.fake.add_rule("answers ok", "FINAL(done)", model=ROOT, name="saw")
        self.fake.add_rule(None, lambda r: r.last_user_text.split(":")[0], model=SUB, name="fast")
        self.fake.add_rule(first_attempt, lambda r: r.last_user_text.split(":")[0], model=SUB, name="late", delay_s=delay_s)
        s = self.settings()
        w = await self.worker(s)
        try:
            client = await connect(s)
            begun = time.perf_counter()
            req = request(
                "q", self.contexts.put_value("budget"), caps={"max_tokens": cap, "max_concurrency": 16},
                limits={"model_call_timeout_s": timeout_s, "sub_max_output_tokens": 20, "root_max_output_tokens": 200},
            )  # fmt: skip
            handle = await start(client, s, req)
            result = await asyncio.wait_for(handle.result(), RUN_TIMEOUT_S)
            took = time.perf_counter() - begun
            # The cell's output from the history: the root may be refused its next turn.
            outputs = h.activity_results(await handle.fetch_history(), pydantic_data_converter, "run_cell", CellOutput)
        finally:
            peak = w.stop()
        bill = self.bill(cap)
        m = re.search(r"answers ok (\d+) budget refusals (\d+) errors (\d+) wrong (\d+)", outputs[0].output if outputs else "")
        return {
            "case": f"{n} sub-calls, each first attempt late (timeout {timeout_s} s, reply after {delay_s} s)",
            "status": result.status, "reason": (result.reason or "")[:200], "time_to_end_s": round(took, 2),
            "worker_peak_rss_mb": peak, "mismatches": int(m.group(4)) if m else None,
            "late_attempts": self.fake.count("late"), "retried_attempts": self.fake.count("fast"),
            "ledger_tokens": result.spend.tokens, "over_cap": bill["billed_tokens"] > cap,
            "detail": m.group(0) if m else "no cell output seen",
        } | bill  # fmt: skip

    async def case_frame(self) -> dict[str, Any]:
        self.fake.reset()
        code = "import os, struct\nos.write(0, struct.pack('<Q', 3 * 1024**3))"
        self.fake.add_rule("Turn 1 of", repl(code), model=ROOT)
        self.fake.add_rule("Turn 2 of", "FINAL(done)", model=ROOT, name="saw")
        s = self.settings()
        w = await self.worker(s)
        try:
            idle = w.peak_rss_mb()
            client = await connect(s)
            begun = time.perf_counter()
            req = request("q", self.contexts.put_value("abc"), limits={"cell_memory_mb": 256})
            result = await asyncio.wait_for((await start(client, s, req)).result(), RUN_TIMEOUT_S)
            took = time.perf_counter() - begun
        finally:
            peak = w.stop()
        shown = [r.last_user_text for r in self.fake.requests(ROOT) if r.matched_rule and r.matched_rule.name == "saw"]
        text = shown[0] if shown else ""
        at = text.find("Error")
        error = " ".join(text[at : at + 600].split("Question:")[0].split()) if at >= 0 else ""
        ok = result.status == "completed" and "too large" in error.lower()
        return {
            "case": "guest writes a frame header claiming 3 GiB to fd 0", "status": result.status,
            "time_to_end_s": round(took, 2), "worker_peak_rss_mb": peak, "worker_rss_mb_when_ready": idle,
            "mismatches": 0 if ok else 1, "detail": error.strip()[:300],
        } | self.bill()  # fmt: skip

    async def case_rawctx(self) -> dict[str, Any]:
        self.fake.reset()
        s = self.settings()
        w = await self.worker(s)
        try:
            client = await connect(s)
            # A list of texts is a valid context since issue 12; a list of numbers is not.
            payload = {"question": "q?", "context": [1, 2], "models": {"root": ROOT}}
            took, reason = await self.raw_failure(client, s, payload)
        finally:
            peak = w.stop()
        ok = "invalid RunRequest" in reason and "context" in reason
        return {
            "case": "raw request, context = list of numbers", "status": "failed", "time_to_end_s": round(took, 2),
            "worker_peak_rss_mb": peak, "mismatches": 0 if ok else 1, "detail": reason[:300],
        } | self.bill()  # fmt: skip


def _line(name: str, row: dict[str, Any]) -> str:
    cap = f"/{row['tokens_cap']}" if row.get("tokens_cap") else ""
    return (
        f"{name:9s} {row['status']:16s} end {row['time_to_end_s']:7.2f} s  worker peak RSS {row['worker_peak_rss_mb']} MB  "
        f"billed {row['billed_tokens']}{cap} tokens  mismatches {row['mismatches']}  | {row['detail']}"
    )


async def amain(args: argparse.Namespace, svc: h.Services, tmp: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with h.fake_llm_in_process() as fake:
        bench = Bench(svc, fake, tmp)
        runs = {
            "empty": bench.case_empty,
            "maxturns": bench.case_maxturns,
            "crash": lambda: bench.case_crash(args.crash_n),
            "budget": lambda: bench.case_budget(args.budget_n, args.budget_cap, args.timeout_s, args.delay_s),
            "frame": bench.case_frame,
            "rawctx": bench.case_rawctx,
        }
        for name in args.which:
            try:
                out[name] = await runs[name]()
            except Exception as exc:  # noqa: BLE001 - one broken case must not hide the others' figures
                out[name] = {"status": "bench error", "error": f"{type(exc).__name__}: {exc}"[:500]}
                print(f"{name:9s} BENCH ERROR {out[name]['error']}", flush=True)
                continue
            print(_line(name, out[name]), flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", nargs="*", help=f"some of: {' '.join(CASES)} (default all)")
    parser.add_argument("--crash-n", type=int, default=300, help="prompts in the crash case")
    parser.add_argument("--budget-n", type=int, default=40)
    parser.add_argument("--budget-cap", type=int, default=30_000, help="caps.max_tokens of the budget case")
    parser.add_argument("--timeout-s", type=float, default=1.0, help="limits.model_call_timeout_s of the budget case")
    parser.add_argument("--delay-s", type=float, default=2.5, help="when the late first attempts are answered")
    args = parser.parse_args()
    args.which = args.which or list(CASES)
    if unknown := set(args.which) - set(CASES):
        parser.error(f"unknown case(s) {sorted(unknown)}; choose from {' '.join(CASES)}")
    with h.private_services() as svc:
        print(f"services up in {svc.startup_s:.2f} s", flush=True)
        out = asyncio.run(amain(args, svc, Path(svc.settings.data_dir).parent))
    path = h.RESULTS_DIR / "hostile.json"
    previous = json.loads(path.read_text()).get("cases", {}) if path.exists() else {}
    cases = {k: v for k, v in previous.items() if k in CASES} | out
    written = h.write_results("hostile", {"worker": "separate process (python -m worker)", "cases": cases})
    print(f"wrote {written}")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # sdk-python#300: a Temporal client process can abort at exit


if __name__ == "__main__":
    main()
