"""Side by side with the reference implementation (the `rlms` package on PyPI,
by the RLM paper's authors): the same trajectory, the same scripted model
server, one run of this script.

    python bench/bench_vs_rlms.py [--repeats 2] [--concurrency 32 16]

The trajectory (issue 13): a 40 MB (10M-token) text context; root turn 1 is
one ```repl``` cell that cuts `context` into 200 chunks of 200,000 characters
and calls `llm_query_batched` on them (each sub-call answered after 0.5 s);
root turn 2 gives the final answer. Each system gets the final-answer idiom
its own prompt teaches: `FINAL(...)` for ours, a ```repl``` block setting
`answer["content"]` / `answer["ready"] = True` for rlms 0.1.x (which has no
text FINAL). The turn-2 answer says whether the cell's printed output (count
of sub-calls answered "ok") reached the root model, so a run that skipped
work cannot pass.

- The reference runs in its own venv (created once under --ref-venv, never a
  dependency of this project) as a subprocess: a driver script constructs
  `rlm.RLM` pointed at the scripted server and calls `completion()`. Its
  sub-call concurrency is the LM handler's fixed 16.
- Ours runs as a user would: `rlm run --context FILE` in a subprocess, against
  private Temporal + S3 services; the embedded worker is started by the first
  `rlm run` (that first run is reported apart, as the cold start). Each run
  gets a context file of its own, so the upload is never deduplicated.
- Both start from bytecode: pip compiled the reference when it installed it;
  our editable checkout is compiled by the bench (`--no-compile` leaves it
  as this machine's PYTHONDONTWRITEBYTECODE=1 would: ~50 ms more a start).
- Wall time is measured around each subprocess, start to exit. Also reported:
  the reference's own `completion()` time and our workflow's own duration
  (first to last event of its history), cell time and `llm_call` timings.

The scripted server runs in a separate process (its CPU is not in either
system's process) and answers sub-calls with a fixed-usage body, so it does
not spend CPU counting 40 MB of prompt characters. Figures go to
bench/results/vs_rlms.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

from temporalio.contrib.pydantic import pydantic_data_converter  # noqa: E402

from activities.temporal_client import connect  # noqa: E402
from cli import services  # noqa: E402
from tests.fixtures_llm import FAKE_API_KEY_ENV, FAKE_API_KEY_VALUE, FAKE_MODEL_NAMES, models_json  # noqa: E402
from workflows.names import SUB_CALL_ACTIVITIES  # noqa: E402
from workflows.steps import CellOutput  # noqa: E402

CHUNKS, CHUNK_CHARS, SUB_DELAY_S = 200, 200_000, 0.5
CONTEXT_CHARS = CHUNKS * CHUNK_CHARS  # 40,000,000 characters, ~10M tokens
QUESTION = "Summarise every part of the document."
RLMS_HANDLER_CONCURRENCY = 16  # rlm.core.lm_handler.LMHandler(batch_max_concurrent=16), not configurable via RLM
CELL = (
    f"chunks = [context[i * {CHUNK_CHARS}:(i + 1) * {CHUNK_CHARS}] for i in range({CHUNKS})]\n"
    "answers = llm_query_batched(['Summarise this part:\\n' + c for c in chunks])\n"
    "print('answered', len(answers), sum(a == 'ok' for a in answers))"
)
EXPECTED_OUTPUT = f"answered {CHUNKS} {CHUNKS}"
OURS_TURN = re.compile(r"Turn (\d+) of \d+")
RLMS_TURN = re.compile(r"Turn (\d+)/\d+:")


# -- the scripted model server (same replies for both systems) -------------------


def root_reply(request) -> str:
    """Turn 1: the fan-out cell. Turn 2: the final answer, in the idiom of the
    system asking (told apart by its turn line), saying whether it saw the
    cell's output."""
    text = request.last_user_text
    ours, theirs = OURS_TURN.findall(text), RLMS_TURN.findall(text)
    turn = int((ours or theirs or ["0"])[-1])
    if turn == 1:
        return f"Cut the context and ask about every part.\n```repl\n{CELL}\n```"
    answer = "all-200-ok" if EXPECTED_OUTPUT in request.all_text else "cell-output-missing"
    if theirs:
        return f'```repl\nanswer["content"] = "{answer}"\nanswer["ready"] = True\n```'
    return f"FINAL({answer})"


def sub_reply(request) -> dict:
    # A fixed usage: the server does not count 40 MB of characters (its CPU
    # would compete with whichever system is being measured).
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 50_000, "completion_tokens": 1, "total_tokens": 50_001},
    }


def _serve(conn) -> None:
    from tests.fake_llm import FakeLLM

    fake = FakeLLM(api_key=FAKE_API_KEY_VALUE, models=list(FAKE_MODEL_NAMES)).start()
    fake.add_rule(None, root_reply, model="fake-root", name="root")
    fake.add_rule(None, sub_reply, model="fake-sub", delay_s=SUB_DELAY_S, name="sub")
    conn.send(fake.url)
    while conn.recv() == "count":
        conn.send({"root": fake.count("root"), "sub": fake.count("sub"), "all": fake.count()})
    fake.stop()


@contextlib.contextmanager
def scripted_server():
    """The server in its own process; yields (url, counts())."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve, args=(child,), daemon=True)
    proc.start()

    def counts() -> dict[str, int]:
        parent.send("count")
        return parent.recv()

    try:
        if not parent.poll(60):
            raise RuntimeError("the scripted model server did not start")
        yield parent.recv(), counts
    finally:
        with contextlib.suppress(OSError, EOFError, BrokenPipeError):
            parent.send("stop")
        proc.join(10)
        if proc.is_alive():
            proc.kill()


# -- contexts ----------------------------------------------------------------------


def base_text() -> str:
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda omicron".split()
    lines, size, i = [], 0, 0
    while size < CONTEXT_CHARS:
        line = f"{i:07d} " + " ".join(words[(i + k) % len(words)] for k in range(9)) + "\n"
        lines.append(line)
        size += len(line)
        i += 1
    return "".join(lines)


def write_context(directory: Path, base: str, tag: str) -> Path:
    """A file of its own: a distinct first line shifts every stored chunk, so
    nothing is deduplicated against an earlier run."""
    path = directory / f"context-{tag}.txt"
    path.write_text(f"document {tag} {uuid.uuid4().hex}\n" + base)
    return path


# -- the reference -----------------------------------------------------------------


def latest_rlms_version(python: Path) -> str:
    proc = subprocess.run([str(python), "-m", "pip", "index", "versions", "rlms"], capture_output=True, text=True)
    found = re.search(r"^rlms \(([^)]+)\)", proc.stdout, re.M)
    if not found:
        raise RuntimeError(f"cannot find rlms on the package index: {proc.stdout[-500:]} {proc.stderr[-500:]}")
    return found.group(1)


def reference_venv(venv: Path) -> tuple[Path, str]:
    """A venv holding the newest `rlms`, created or upgraded when needed."""
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    wanted = latest_rlms_version(python)
    probe = [str(python), "-c", "import importlib.metadata as m; print(m.version('rlms'))"]
    have = subprocess.run(probe, capture_output=True, text=True).stdout.strip()
    if have != wanted:
        print(f"installing rlms=={wanted} into {venv}")
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"rlms=={wanted}"], check=True)
    return python, wanted


DRIVER = textwrap.dedent(
    """
    import json, sys, time
    t0 = time.perf_counter()
    from rlm import RLM
    imported = time.perf_counter()
    url, key, path, question = sys.argv[1:5]
    with open(path) as f:
        context = f.read()
    read = time.perf_counter()
    model = lambda name: {"model_name": name, "base_url": url, "api_key": key}
    rlm = RLM(backend="openai", backend_kwargs=model("fake-root"), other_backends=["openai"],
              other_backend_kwargs=[model("fake-sub")], environment="local", max_depth=1, max_iterations=30)
    result = rlm.completion(context, root_prompt=question)
    done = time.perf_counter()
    print(json.dumps({"answer": result.response, "import_s": imported - t0, "read_s": read - imported,
                      "completion_s": done - read, "execution_time_s": result.execution_time}))
    """
)


def run_reference(python: Path, driver: Path, url: str, context: Path) -> dict[str, Any]:
    begun = time.perf_counter()
    proc = subprocess.run(
        [str(python), str(driver), url, FAKE_API_KEY_VALUE, str(context), QUESTION],
        capture_output=True, text=True, timeout=900, env={k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"},
    )
    wall = time.perf_counter() - begun
    if proc.returncode != 0:
        raise RuntimeError(f"rlms driver failed ({proc.returncode}): {proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"wall_s": round(wall, 3), "loadavg_after": [round(x, 2) for x in os.getloadavg()]} | {k: (round(v, 3) if isinstance(v, float) else v) for k, v in out.items()}


# -- ours --------------------------------------------------------------------------


MODEL_CLIENT = "litellm"  # ModelSpec.client of our models (--model-client)


def our_env(settings, url: str) -> dict[str, str]:
    env = {**os.environ, **settings.to_env(), "RLM_MODELS_JSON": models_json(url, client=MODEL_CLIENT),
           "RLM_EMBEDDED_WORKER": "true"}
    env[FAKE_API_KEY_ENV] = FAKE_API_KEY_VALUE
    for name in ("RLM_MODEL", "RLM_SUB_MODEL", "OPENAI_API_KEY", "OPENAI_API_BASE"):
        env.pop(name, None)
    return env


def run_ours(settings, url: str, context: Path, concurrency: int) -> dict[str, Any]:
    workflow_id = f"rlm-bench-{uuid.uuid4().hex[:10]}"
    rlm = Path(sys.executable).parent / "rlm"
    args = [str(rlm), "run", QUESTION, "--context", str(context), "--model", "fake-root", "--sub-model", "fake-sub",
            "--max-concurrency", str(concurrency), "--cell-timeout", "600", "--id", workflow_id, "--json"]
    begun = time.perf_counter()
    proc = subprocess.run(args, env=our_env(settings, url), capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - begun
    if proc.returncode != 0:
        raise RuntimeError(f"rlm run failed ({proc.returncode}): {proc.stderr[-3000:]}")
    result = json.loads(proc.stdout)
    row = {"wall_s": round(wall, 3), "answer": result["answer"], "status": result["status"], "turns": result["turns"],
           "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
    return row | asyncio.run(_from_history(settings, workflow_id))


async def _from_history(settings, workflow_id: str) -> dict[str, Any]:
    client = await connect(settings)
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    acts, tasks, total = h.history_timeline(history)
    cells = [a for a in acts if a.kind == "run_cell"]
    # One activity per call (llm_call) or per group of calls (llm_calls).
    calls = [a for a in acts if a.kind in SUB_CALL_ACTIVITIES]
    outputs = h.activity_results(history, pydantic_data_converter, "run_cell", CellOutput)
    first = min(c.scheduled for c in calls) if calls else float("nan")
    return {
        "workflow_s": round(total, 3),
        "cell_s": round(cells[0].run_s, 3),
        "cell_output": outputs[0].output.strip(),
        "cell_start_to_first_llm_call_s": round(first - cells[0].started, 3),
        "cell_after_last_llm_call_s": round(cells[0].closed - max(c.closed for c in calls), 3) if calls else None,
        "llm_calls": len(calls),
        "llm_calls_span_s": round(max(c.closed for c in calls) - first, 3) if calls else None,
        "llm_call_mean_queue_ms": round(1000 * statistics.mean(c.queue_s for c in calls), 1) if calls else None,
        "llm_call_mean_run_ms": round(1000 * statistics.mean(c.run_s for c in calls), 1) if calls else None,
        "activities": {k: sum(1 for a in acts if a.kind == k) for k in sorted({a.kind for a in acts})},
        "workflow_tasks": len(tasks),
    }


# -- the comparison ----------------------------------------------------------------


def check(system: str, row: dict[str, Any], counts_before: dict[str, int], counts_after: dict[str, int]) -> None:
    subs = counts_after["sub"] - counts_before["sub"]
    roots = counts_after["root"] - counts_before["root"]
    row["model_calls"] = {"root": roots, "sub": subs}
    if row["answer"] != "all-200-ok" or subs != CHUNKS or roots != 2:
        raise RuntimeError(f"{system} did not follow the trajectory: {row}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[32, 16])
    parser.add_argument("--ref-venv", type=Path, default=Path(tempfile.gettempdir()) / "rlm-bench-rlms-venv")
    parser.add_argument("--model-client", choices=["litellm", "direct", "auto"], default="litellm",
                        help="ModelSpec.client of our models")
    parser.add_argument("--output", default="vs_rlms", help="results file name (bench/results/<name>.json)")
    parser.add_argument("--no-compile", action="store_true",
                        help="leave our modules without bytecode (an editable install where PYTHONDONTWRITEBYTECODE=1)")
    args = parser.parse_args()
    global MODEL_CLIENT
    MODEL_CLIENT = args.model_client

    ref_python, version = reference_venv(args.ref_venv)
    print(f"reference: rlms {version} in {args.ref_venv}")
    # Both sides start from bytecode, as a pip install of either would.
    bytecode = {"compiled": False} if args.no_compile else h.compile_our_modules()
    base = base_text()
    rows: dict[str, list[dict[str, Any]]] = {"rlms": []} | {f"ours_c{c}": [] for c in args.concurrency}
    with tempfile.TemporaryDirectory(prefix="rlm-vs-rlms-") as tmp, h.private_services() as svc, scripted_server() as (url, counts):
        tmp_path = Path(tmp)
        driver = tmp_path / "rlms_driver.py"
        driver.write_text(DRIVER)
        settings = svc.settings.model_copy(update={"embedded_worker": True})
        try:
            before = counts()
            cold = run_ours(settings, url, write_context(tmp_path, base, "cold"), args.concurrency[0])
            check("ours (cold)", cold, before, counts())
            print(f"ours, first run (starts the worker), c={args.concurrency[0]}: {cold['wall_s']:.2f} s wall")
            for i in range(args.repeats):
                before = counts()
                row = run_reference(ref_python, driver, url, write_context(tmp_path, base, f"ref{i}"))
                check("rlms", row, before, counts())
                rows["rlms"].append(row)
                print(f"rlms run {i + 1}: {row['wall_s']:.2f} s wall (completion() {row['completion_s']:.2f} s)")
                for c in args.concurrency:
                    before = counts()
                    row = run_ours(settings, url, write_context(tmp_path, base, f"ours{c}-{i}"), c)
                    check("ours", row, before, counts())
                    rows[f"ours_c{c}"].append(row)
                    print(f"ours c={c} run {i + 1}: {row['wall_s']:.2f} s wall (workflow {row['workflow_s']:.2f} s, "
                          f"cell {row['cell_s']:.2f} s)")
        finally:
            services.stop_worker(settings)

    ref_wall = h.spread([r["wall_s"] for r in rows["rlms"]])
    summary: dict[str, Any] = {"rlms": {"wall_s": ref_wall, "completion_s": h.spread([r["completion_s"] for r in rows["rlms"]])}}
    print(f"\n{'system':<28}{'wall s (median)':>16}{'own time s':>12}{'ratio to rlms':>15}")
    print(f"{'rlms ' + version + ' (16 in flight)':<28}{ref_wall['median']:>16.2f}"
          f"{summary['rlms']['completion_s']['median']:>12.2f}{1.0:>15.2f}")
    for c in args.concurrency:
        mine = rows[f"ours_c{c}"]
        wall = h.spread([r["wall_s"] for r in mine])
        own = h.spread([r["workflow_s"] for r in mine])
        ratio = round(wall["median"] / ref_wall["median"], 2)
        summary[f"ours_c{c}"] = {"wall_s": wall, "workflow_s": own, "cell_s": h.spread([r["cell_s"] for r in mine]),
                                 "ratio_wall_to_rlms": ratio}
        print(f"{f'rlm run --max-concurrency {c}':<28}{wall['median']:>16.2f}{own['median']:>12.2f}{ratio:>15.2f}")
    print("(own time: rlms completion(); ours: the workflow's history, first to last event)")
    path = h.write_results(args.output, {
        "model_client": MODEL_CLIENT,
        "trajectory": {"context_chars": CONTEXT_CHARS, "sub_calls": CHUNKS, "chunk_chars": CHUNK_CHARS,
                       "sub_delay_s": SUB_DELAY_S, "root_turns": 2},
        "reference": {"package": "rlms", "version": version, "sub_call_concurrency": RLMS_HANDLER_CONCURRENCY,
                      "environment": "local"},
        "target_ratio": 0.5,
        "our_bytecode": bytecode,
        "summary": summary,
        "ours_cold_first_run": cold,
        "runs": rows,
    })
    print(f"results: {path}")


if __name__ == "__main__":
    main()
