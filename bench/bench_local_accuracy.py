"""Answer accuracy of the embedded local model: as an RLM vs asked directly.

    python bench/bench_local_accuracy.py [--sizes 8k,64k,1m,10m] [--kinds needle,count]
        [--rlm-seeds 2] [--direct-seeds 1] [--direct-sizes 8k,64k] [--budget-min 60] [--resume]

Tasks are the generated needle and counting documents of `rlm demo`
(cli/_demo.py `make_task`, ~4 characters per token). For each (kind, size):

- rlm: a whole RLM run through the real engine (Temporal dev server, S3
  server, WASM REPL, worker in this process) with the local model as root
  and sub model; caps as `rlm run` gives the local model (max_concurrency 1,
  model_call_timeout_s 900), `--max-turns` root turns, `--run-wall-s` wall cap.
- direct: one chat call to the same model, the document cut (at a line
  boundary) to what fits its window: n_ctx minus the question, the prompt
  template and the max output tokens, counted with the server's tokenizer.
  For sizes not in `--direct-sizes` the cut prompt is the same ~15K tokens
  as at 64K, so no call is made when the answer cannot be in the window
  (needle after the cut, or some counted lines after it): the row is scored
  wrong and marked `analytic`; a call is made only if the answer lies inside.

The local model server is started from a temp data dir on a free port (the
weights are joined there once, or `--data-dir` reuses a dir that has them),
with `--logits_all false` added unless `--server-as-deployed` (see
`_without_all_logits`: as deployed, a full-window prompt ran it out of memory).
Every finished row is printed and written at once to
bench/results/local_accuracy.json and the table local_accuracy.md, so a
partial run leaves a table; `--resume` keeps earlier rows and skips them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

from activities._model_registry import ModelRegistry, ModelSpec  # noqa: E402
from activities.context_store import ContextStore  # noqa: E402
from activities.llm import complete  # noqa: E402
from workflows.names import SUB_CALL_ACTIVITIES  # noqa: E402
from activities.local_model import CONTEXT_WINDOW, LOCAL_MODEL_NAME, SERVED_MODEL_ID, local_model_spec  # noqa: E402
from activities.logging import configure_logging  # noqa: E402
from activities.object_store import ObjectStore  # noqa: E402
from cli import _local_model  # noqa: E402
from cli._demo import CHARS_PER_TOKEN, is_correct, make_task  # noqa: E402
from cli._ports import find_free_port  # noqa: E402
from tests.run_harness import start  # noqa: E402
from workflows.budget import Caps  # noqa: E402
from workflows.request import ModelChoice, RunLimits, RunRequest  # noqa: E402

NAME = "local_accuracy"
TABLE = h.RESULTS_DIR / f"{NAME}.md"
SIZES = {"8k": 8_000, "64k": 64_000, "1m": 1_000_000, "10m": 10_000_000}
DIRECT_MAX_OUTPUT = 64
DIRECT_SYSTEM = "You answer questions about a document. Reply with the answer only, in a few words."
TEMPLATE_TOKENS = 32
"""Chat-template tokens around the two messages (Qwen's im_start/im_end
markers and role names take ~12; the rest is margin)."""
SNIPPET = 700


def direct_messages(document: str, question: str) -> list[dict[str, str]]:
    user = f"Document:\n{document}\n\nQuestion: {question}\nAnswer with the answer only."
    return [{"role": "system", "content": DIRECT_SYSTEM}, {"role": "user", "content": user}]


def count_tokens(url: str, text: str) -> int:
    body = json.dumps({"input": text, "model": SERVED_MODEL_ID}).encode()
    req = urllib.request.Request(f"{url.removesuffix('/v1')}/extras/tokenize/count", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return int(json.load(resp)["count"])


def cut_to_window(url: str, text: str, question: str) -> tuple[str, int]:
    """The longest prefix of `text` (whole lines) whose direct prompt fits
    n_ctx with DIRECT_MAX_OUTPUT tokens left; and that prompt's token count."""
    frame = sum(count_tokens(url, m["content"]) for m in direct_messages("", question))
    room = CONTEXT_WINDOW - DIRECT_MAX_OUTPUT - TEMPLATE_TOKENS - frame
    probe = text[: room * 6]
    chars = len(probe) if count_tokens(url, probe) <= room else int(room * len(probe) / count_tokens(url, probe))
    while True:
        cut = text[:chars]
        if len(cut) < len(text):
            cut = cut[: cut.rfind("\n") + 1] if "\n" in cut else cut
        tokens = count_tokens(url, cut)
        if tokens <= room:
            return cut, tokens + frame + TEMPLATE_TOKENS
        chars = int(chars * room / tokens * 0.995)


def answer_in_window(kind: str, text: str, cut: str) -> bool:
    if kind == "needle":
        return "The secret code is" in cut
    return cut.count("ALERT: sensor fault reported.") == text.count("ALERT: sensor fault reported.")


# -- the two ways of asking ------------------------------------------------------


async def ask_direct(spec: ModelSpec, url: str, kind: str, text: str, question: str, expected: str, run_model: bool) -> dict[str, Any]:
    cut, prompt_est = await asyncio.to_thread(cut_to_window, url, text, question)
    inside = answer_in_window(kind, text, cut)
    row: dict[str, Any] = {"cut_chars": len(cut), "cut_fraction": round(len(cut) / len(text), 4), "answer_in_window": inside}
    if kind == "count":
        row["alerts_in_window"] = cut.count("ALERT: sensor fault reported.")
    if not run_model and not inside:
        return row | {"analytic": True, "correct": False, "answer": None, "wall_s": None, "tokens": None, "prompt_tokens": prompt_est}
    begun = time.perf_counter()
    reply = await complete(spec, direct_messages(cut, question), max_tokens=DIRECT_MAX_OUTPUT, timeout_s=1800)
    return row | {
        "analytic": False,
        "answer": reply.text.strip()[:SNIPPET],
        "correct": is_correct(kind, reply.text.strip(), expected),
        "wall_s": round(time.perf_counter() - begun, 1),
        "tokens": reply.prompt_tokens + reply.completion_tokens,
        "prompt_tokens": reply.prompt_tokens,
        "finish_reason": reply.finish_reason,
    }


def transcript(store: ObjectStore, key: str | None) -> list[dict[str, str]]:
    """The root model's messages after the system prompt, each cut short."""
    if not key:
        return []
    try:
        messages = json.loads(store.get_bytes(key))["messages"]
    except Exception as exc:  # a missing transcript must not lose the row
        return [{"role": "error", "content": f"transcript unreadable: {exc}"}]
    return [{"role": m["role"], "content": m["content"][:SNIPPET]} for m in messages if m["role"] != "system"]


async def ask_rlm(client, settings, store: ObjectStore, args, text: str, question: str, kind: str, expected: str) -> dict[str, Any]:
    begun = time.perf_counter()
    ref = await asyncio.to_thread(ContextStore(store).put_text, text)
    upload_s = time.perf_counter() - begun
    req = RunRequest(
        question=question,
        context=ref,
        models=ModelChoice(root=LOCAL_MODEL_NAME),
        caps=Caps(max_concurrency=1, max_turns=args.max_turns, max_wall_s=args.run_wall_s),
        limits=RunLimits(cell_timeout_s=120.0, model_call_timeout_s=900.0),
    )
    handle = await start(client, settings, req, workflow_id=f"bench-local-{uuid.uuid4().hex[:10]}")
    try:
        result = await asyncio.wait_for(handle.result(), args.run_wall_s + 900)
    except TimeoutError:
        await handle.terminate("benchmark time limit")
        return {"status": "terminated", "correct": False, "answer": None, "wall_s": round(time.perf_counter() - begun, 1)}
    acts, _tasks, _total = h.history_timeline(await handle.fetch_history())
    model_s = sum(a.run_s for a in acts if a.kind in ("root_turn", *SUB_CALL_ACTIVITIES))
    return {
        "status": result.status,
        "reason": result.reason,
        "answer": (result.answer or "")[:SNIPPET] if result.answer is not None else None,
        "correct": is_correct(kind, result.answer, expected),
        "wall_s": round(time.perf_counter() - begun, 1),
        "upload_s": round(upload_s, 1),
        "model_s": round(model_s, 1),
        "turns": result.turns,
        "tokens": result.spend.tokens,
        "calls": result.spend.calls,
        "sub_calls": sum(1 for a in acts if a.kind in SUB_CALL_ACTIVITIES),  # concurrency 1: one call per activity
        "transcript": transcript(store, result.transcript_key),
    }


# -- results ---------------------------------------------------------------------


def cell_summary(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "-"
    right = sum(r["correct"] for r in rows)
    timed = [r["wall_s"] for r in rows if r.get("wall_s") is not None]
    tokens = [r["tokens"] for r in rows if r.get("tokens") is not None]
    text = f"{right}/{len(rows)}"
    if all(r.get("analytic") for r in rows):
        return text + " (analytic: answer not in window)"
    if timed:
        text += f", {statistics.median(timed):.0f} s"
    if tokens:
        text += f", {statistics.median(tokens):,.0f} tok"
    if any(r.get("analytic") for r in rows):
        text += f" ({sum(bool(r.get('analytic')) for r in rows)} analytic)"
    return text


def write(rows: list[dict[str, Any]], config: dict[str, Any]) -> None:
    h.write_results(NAME, {"config": config, "rows": rows})
    lines = [
        "# Local model accuracy: RLM vs direct call",
        "",
        f"Qwen2.5-Coder-1.5B-Instruct Q4_K_M, llama.cpp server, 1 thread, n_ctx {CONTEXT_WINDOW}; "
        f"written by bench/bench_local_accuracy.py ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}).",
        "Each cell: right/runs, median wall time, median tokens (prompt + output, all calls of the run).",
        "Direct = one call with the document cut to the window (~15K tokens of it); "
        "'analytic' = not called because the answer lies outside the cut, scored wrong.",
        "The server as deployed keeps all logits (llama_cpp.server's logits_all=True): a ~15K-token "
        "direct call got it OOM-killed at 22 GB, so rows marked `--logits_all false` ran without them.",
        "",
        "| task | size (tokens) | RLM | direct |",
        "|---|---|---|---|",
    ]
    for kind in config["kinds"]:
        for size in config["sizes"]:
            cells = [cell_summary([r for r in rows if (r["mode"], r["kind"], r["size"]) == (m, kind, size)]) for m in ("rlm", "direct")]
            lines.append(f"| {kind} | {size} | {cells[0]} | {cells[1]} |")
    lines += ["", "Per run:", "", "| mode | task | size | seed | expected | answer | right | wall s | tokens | notes |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        answer = (r.get("answer") or "").replace("\n", " ").replace("|", "/")[:60]
        notes = []
        if r["mode"] == "rlm":
            notes.append(f"{r.get('status')}, {r.get('turns')} turns, {r.get('sub_calls', 0)} sub-calls")
        else:
            notes.append(f"cut {r.get('cut_fraction', 0):.1%} of doc, answer in window: {r.get('answer_in_window')}")
            if r.get("analytic"):
                notes.append("analytic")
        notes.append("server as deployed (logits_all)" if r.get("server_logits_all") else "server --logits_all false")
        lines.append(
            f"| {r['mode']} | {r['kind']} | {r['size']} | {r['seed']} | {r['expected']} | {answer} | "
            f"{'yes' if r['correct'] else 'no'} | {r.get('wall_s') if r.get('wall_s') is not None else '-'} | "
            f"{r.get('tokens') if r.get('tokens') is not None else '-'} | {'; '.join(notes)} |"
        )
    TABLE.write_text("\n".join(lines) + "\n")


# -- driver ------------------------------------------------------------------------


def plan(args) -> list[tuple[str, str, str, int]]:
    """All RLM runs first (minutes each), then the direct calls (a full window
    takes ~5-10 min here), so a run cut short by --budget-min still has a
    complete RLM table."""
    jobs = []
    for mode, seeds in (("rlm", args.rlm_seeds), ("direct", args.direct_seeds)):
        for size in args.sizes:
            for kind in args.kinds:
                jobs += [(mode, kind, size, seed) for seed in range(1, seeds + 1)]
    return jobs


async def run_all(args, svc: h.Services, url: str, port: int) -> None:
    settings = svc.settings.model_copy(update={"task_queue": f"bench-local-{uuid.uuid4().hex[:8]}"})
    spec = ModelSpec(**local_model_spec(port))
    store = ObjectStore.from_settings(settings)
    store.ensure_bucket()
    config = {k: v for k, v in vars(args).items() if k not in ("data_dir",)} | {
        "context_window": CONTEXT_WINDOW, "direct_max_output_tokens": DIRECT_MAX_OUTPUT, "chars_per_token": CHARS_PER_TOKEN,
    }  # fmt: skip
    rows: list[dict[str, Any]] = []
    if args.resume and (h.RESULTS_DIR / f"{NAME}.json").exists():
        rows = json.loads((h.RESULTS_DIR / f"{NAME}.json").read_text()).get("rows", [])
    done = {(r["mode"], r["kind"], r["size"], r["seed"]) for r in rows}
    deadline = time.monotonic() + args.budget_min * 60
    async with h.running_worker(settings, ModelRegistry([spec])) as (client, _pool):
        for mode, kind, size, seed in plan(args):
            if (mode, kind, size, seed) in done:
                continue
            if time.monotonic() > deadline:
                print(f"time budget of {args.budget_min} min used up: skipping {mode} {kind} {size} seed {seed}", flush=True)
                continue
            text, question, expected = make_task(kind, seed, SIZES[size] * CHARS_PER_TOKEN)
            base = {"mode": mode, "kind": kind, "size": size, "seed": seed, "expected": expected, "doc_chars": len(text),
                    "server_logits_all": args.server_as_deployed}
            if mode == "rlm":
                row = base | await ask_rlm(client, settings, store, args, text, question, kind, expected)
            else:
                row = base | await ask_direct(spec, url, kind, text, question, expected, size in args.direct_sizes)
            del text
            rows.append(row)
            write(rows, config)
            print(
                f"{mode:6} {kind:6} {size:>4} seed {seed}: {'RIGHT' if row['correct'] else 'wrong'} "
                f"(expected {expected}, answer {str(row.get('answer'))[:60]!r}) wall {row.get('wall_s')} s, "
                f"tokens {row.get('tokens')}" + (" [analytic]" if row.get("analytic") else ""),
                flush=True,
            )
    write(rows, config)
    print(TABLE.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    def listed(allowed):
        return lambda text: [x for x in text.split(",") if x and _check(x, allowed)]

    parser.add_argument("--sizes", type=listed(SIZES), default=list(SIZES), help="of 8k,64k,1m,10m")
    parser.add_argument("--kinds", type=listed(("needle", "count")), default=["needle", "count"])
    parser.add_argument("--rlm-seeds", type=int, default=2, help="RLM runs per (task, size): seeds 1..N")
    parser.add_argument("--direct-seeds", type=int, default=1, help="direct calls per (task, size): seeds 1..N")
    parser.add_argument("--direct-sizes", type=listed(SIZES), default=["8k", "64k"],
                        help="sizes where the direct call is always made (else only if the answer is in the window)")
    parser.add_argument("--max-turns", type=int, default=6)
    parser.add_argument("--run-wall-s", type=float, default=600.0, help="wall-time cap of one RLM run")
    parser.add_argument("--budget-min", type=float, default=60.0, help="start no new run after this many minutes")
    parser.add_argument("--resume", action="store_true", help="keep rows of the last results file, skip those runs")
    parser.add_argument("--data-dir", type=Path, default=None, help="local model data dir (weights joined there once)")
    parser.add_argument("--server-as-deployed", action="store_true",
                        help="run the server exactly as `rlm up` does, keeping all logits (~10 GB at n_ctx 16K; OOM on long prompts)")
    args = parser.parse_args()
    configure_logging()
    if not args.server_as_deployed:
        _without_all_logits()
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    with tempfile.TemporaryDirectory(prefix="rlm-local-acc-") as tmp:
        data_dir = args.data_dir or Path(tmp) / "local"
        port = find_free_port()
        info = _local_model.start(data_dir, port)
        print(f"local model server pid {info.pid} at {info.url} (ready in {info.startup_s:.0f} s)", flush=True)
        try:
            with h.private_services() as svc:
                asyncio.run(run_all(args, svc, info.url, port))
        finally:
            _local_model.stop(data_dir)


def _without_all_logits() -> None:
    """llama_cpp.server defaults to logits_all=True: it keeps n_ctx x vocab
    float32 logits (16,384 x 151,936 x 4 B = 10 GB) and copies the filled rows
    into every prompt-cache entry, uncounted by --cache_size. A ~15K-token
    direct call got the server OOM-killed at 22 GB RSS on this 24 GB machine.
    Nothing here needs per-token logits, so the flag is added from outside
    (the engine's command line is not edited by a benchmark)."""
    as_deployed = _local_model.server_argv

    def server_argv(*args, **kwargs) -> list[str]:
        argv = as_deployed(*args, **kwargs)
        return argv if "--logits_all" in argv else [*argv, "--logits_all", "false"]

    _local_model.server_argv = server_argv


def _check(value: str, allowed) -> bool:
    if value not in allowed:
        raise argparse.ArgumentTypeError(f"unknown value {value!r}: use some of {','.join(allowed)}")
    return True


if __name__ == "__main__":
    main()
