"""How long client commands take to start and finish, as a user types them.

Targets (issue 13): `rlm submit`, `rlm result`, `rlm status`, `rlm show`,
`rlm cancel` under 0.5 s wall; `rlm run` adds under 1 s to its workflow's own
time.

Set-up: a private Temporal + S3 pair with the embedded worker running
(`rlm up` state), the scripted model server of the tests configured through
RLM_MODELS_JSON. Every command is a fresh `python -m cli.main` process (what
the `rlm` script runs), timed wall-clock from spawn to exit, `--repeats`
times; figures are medians, with each command's CPU (user + sys) beside them. `rlm run` overhead = its wall time minus the
workflow's own time (start to close, from Temporal).

Besides wall times, each command is run once more through a wrapper that
reports which heavy modules (litellm, openai, wasmtime, ...) its handler left
in sys.modules, and the import time of the command's modules is taken from
`python -X importtime` (cumulative microseconds of the top-level imports).

    python bench/bench_cli_start.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from activities.temporal_client import connect  # noqa: E402
from bench._harness import spread, write_results  # noqa: E402
from cli import services  # noqa: E402
from tests.fake_llm import FakeLLM  # noqa: E402
from tests.fixtures_llm import FAKE_API_KEY_ENV, FAKE_API_KEY_VALUE, FAKE_MODEL_NAMES, models_json  # noqa: E402

TARGET_CLIENT_S = 0.5
TARGET_RUN_OVERHEAD_S = 1.0
CLIENT_COMMANDS = ("status", "submit", "result", "show", "cancel")
# Modules a client command must never load (seconds of CPU, or worker-only).
HEAVY_MODULES = ("litellm", "openai", "wasmtime", "sandbox_wasm", "boto3", "tiktoken")
# What each command imports before its handler does anything.
COMMAND_IMPORTS = {
    "help": "cli.main",
    "status": "cli.main, cli.services",
    "submit/run": "cli.main, cli._run_client",
    "result/cancel": "cli.main, cli.run_commands, cli._run_by_id",
    "show": "cli.main, cli._trace, cli._show",
}
# Runs the real `rlm` entry (minus its final os._exit) and reports what stayed loaded.
_MODULES_PROBE = (
    "import json, sys\nfrom cli import main as m\ntry:\n    code = m._run(sys.argv[1:])\nexcept SystemExit as exc:\n    code = exc.code or 0\n"
    f"sys.stderr.write('MODULES ' + json.dumps([n for n in {HEAVY_MODULES!r} if n in sys.modules]) + '\\n'); "
    "sys.stderr.flush(); import os; os._exit(code)\n"
)


# CPU seconds (user + sys) of each finished command, by name: less sensitive
# than wall time to the other users of this shared machine.
CPU: dict[str, list[float]] = {}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _timed(env: dict[str, str], *args: str, ok: tuple[int, ...] = (0,)) -> tuple[float, str]:
    cpu = _children_cpu()
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cli.main", *args], env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - started
    CPU.setdefault(args[0], []).append(_children_cpu() - cpu)
    if proc.returncode not in ok:
        raise RuntimeError(f"rlm {' '.join(args)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return wall, proc.stdout.strip()


def _heavy_modules(env: dict[str, str], *args: str) -> list[str]:
    """Heavy modules left in sys.modules after `rlm <args>` ran its handler."""
    proc = subprocess.run([sys.executable, "-c", _MODULES_PROBE, *args], env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"rlm {' '.join(args)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    line = next(l for l in proc.stderr.splitlines() if l.startswith("MODULES "))
    return json.loads(line.removeprefix("MODULES "))


def _import_s(modules: str) -> float:
    """Wall seconds of `import <modules>` per -X importtime (top-level cumulative)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {modules}"], capture_output=True, text=True, cwd=ROOT, check=True)
    total_us = 0
    for line in proc.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and not parts[2].startswith("  ") and parts[1].strip().isdigit():
            total_us += int(parts[1])
    return total_us / 1e6


async def _workflow_s(settings, workflow_id: str) -> float:
    client = await connect(settings)
    desc = await client.get_workflow_handle(workflow_id).describe()
    return (desc.close_time - desc.start_time).total_seconds()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    load_start = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory() as tmp, FakeLLM(api_key=FAKE_API_KEY_VALUE, models=list(FAKE_MODEL_NAMES)) as llm:
        settings = services.private_settings(Path(tmp) / "data", embedded_worker=True)
        env = {**os.environ, **settings.to_env(), "RLM_MODELS_JSON": models_json(llm.url), FAKE_API_KEY_ENV: FAKE_API_KEY_VALUE}
        env.pop("RLM_MODEL", None)
        os.environ.update({k: env[k] for k in ("RLM_MODELS_JSON", FAKE_API_KEY_ENV)})  # the worker `up` starts
        doc = Path(tmp) / "doc.txt"
        doc.write_text("the answer is 42\n" * 100)
        held = threading.Event()
        llm.add_rule("Turn 1 of", "```repl\nprint(context[:16])\n```", model="fake-root")
        llm.add_rule("the answer is", "FINAL(42)", model="fake-root")
        llm.add_rule("HOLD", "FINAL(held)", model="fake-root", hold=held)
        run_args = ["--context", str(doc), "--model", "fake-root"]
        t0 = time.perf_counter()
        services.up(settings)
        print(f"services and worker up in {time.perf_counter() - t0:.1f} s")
        try:
            figures: dict[str, list[float]] = {k: [] for k in ("python_bare", "help", "status", "submit", "result", "show", "cancel", "run_wall", "run_workflow", "run_overhead")}
            bare = [sys.executable, "-c", "pass"]
            for i in range(args.repeats):
                started = time.perf_counter()
                subprocess.run(bare, check=True)
                figures["python_bare"].append(time.perf_counter() - started)
                figures["help"].append(_timed(env, "--help")[0])
                figures["status"].append(_timed(env, "status")[0])
                wall, run_id = _timed(env, "submit", "q", *run_args, "--id", f"bench-submit-{i}")
                figures["submit"].append(wall)
                figures["result"].append(_timed(env, "result", run_id)[0])  # waits for the answer
                figures["result"][-1] = _timed(env, "result", run_id)[0]  # a finished run: start cost only
                figures["show"].append(_timed(env, "show", run_id)[0])
                _, held_id = _timed(env, "submit", "HOLD", *run_args, "--id", f"bench-held-{i}")
                figures["cancel"].append(_timed(env, "cancel", held_id)[0])
                wall, _ = _timed(env, "run", "q", *run_args, "--id", f"bench-run-{i}")
                workflow = asyncio.run(_workflow_s(settings, f"bench-run-{i}"))
                figures["run_wall"].append(wall)
                figures["run_workflow"].append(workflow)
                figures["run_overhead"].append(wall - workflow)
                print(
                    f"#{i}: status {figures['status'][-1]:.3f} submit {figures['submit'][-1]:.3f} result {figures['result'][-1]:.3f} "
                    f"show {figures['show'][-1]:.3f} "
                    f"cancel {figures['cancel'][-1]:.3f} run {wall:.3f} (workflow {workflow:.3f})"
                )
            _timed(env, "submit", "HOLD", *run_args, "--id", "bench-probe-held")  # still running when cancelled
            heavy = {
                "help": _heavy_modules(env, "--help"),
                "status": _heavy_modules(env, "status"),
                "submit": _heavy_modules(env, "submit", "q", *run_args, "--id", "bench-probe"),
                "result": _heavy_modules(env, "result", "bench-probe"),
                "show": _heavy_modules(env, "show", "bench-probe"),
                "cancel": _heavy_modules(env, "cancel", "bench-probe-held"),
                "run": _heavy_modules(env, "run", "q", *run_args, "--id", "bench-probe-run"),
            }
            held.set()
        finally:
            held.set()
            services.down(settings)
    summary = {name: spread(values) for name, values in figures.items()}
    targets = {
        f"{name}_under_{TARGET_CLIENT_S}s": summary[name]["median"] < TARGET_CLIENT_S
        for name in CLIENT_COMMANDS
    } | {f"run_overhead_under_{TARGET_RUN_OVERHEAD_S}s": summary["run_overhead"]["median"] < TARGET_RUN_OVERHEAD_S}
    for name, values in summary.items():
        print(f"{name:<14} median {values['median']:.3f} s  (min {values['min']:.3f}, max {values['max']:.3f})")
    import_s = {name: round(min(_import_s(mods) for _ in range(3)), 3) for name, mods in COMMAND_IMPORTS.items()}
    cpu_s = {name: spread(values) for name, values in CPU.items()}
    for name, values in cpu_s.items():
        print(f"cpu {name:<10} median {values['median']:.3f} s  (min {values['min']:.3f}, max {values['max']:.3f})")
    print("heavy modules loaded by each command:", heavy)
    print("import seconds (best of 3):", import_s)
    print("targets met:", targets)
    path = write_results(
        "cli_start",
        {"repeats": args.repeats, "load_avg_at_start": load_start, "seconds": summary, "targets_met": targets,
         "cpu_seconds_by_command": cpu_s,
         "heavy_modules_loaded": heavy, "import_s_best_of_3": import_s, "command_imports": COMMAND_IMPORTS,
         "load_avg_at_end": [round(x, 2) for x in os.getloadavg()]},
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
