"""Custom-tool call overhead: one cell calls a trivial tool N times in a row
(each call a `tool_call` update and activity), and, for comparison, makes N
sequential `llm_query` calls to an instant scripted model. Real worker (in
this process), Temporal dev server, S3 and WASM REPL.

    python bench/bench_tools.py [--calls 20] [--repeats 3]

Figures (seconds per call, measured inside the guest) go to bench/results/tools.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

from activities.context_store import ContextStore  # noqa: E402
from activities.object_store import ObjectStore  # noqa: E402
from tests.run_harness import repl, request, start  # noqa: E402

TOOLS = "tests.sample_tools:TOOLS"


def cell(kind: str, calls: int) -> str:
    call = "ledger_lookup(3)" if kind == "tool" else 'llm_query("ping")'
    return repl(
        f"import time\nt = time.time()\nfor _ in range({calls}):\n    {call}\n"
        f"print('PER_CALL', (time.time() - t) / {calls})"
    )


async def one_run(services: h.Services, llm, kind: str, calls: int) -> float:
    llm.reset()
    llm.add_rule("Turn 1 of", cell(kind, calls), model="fake-root")
    llm.add_rule("PER_CALL", "FINAL(done)", model="fake-root")
    llm.add_rule(None, "pong", model="fake-sub")
    settings = services.settings.model_copy(update={"task_queue": f"bench-{uuid.uuid4().hex[:8]}", "tools": TOOLS})
    ctx = ContextStore(ObjectStore.from_settings(settings)).put_value("x")
    req = request("q", ctx).model_copy(update={"tools": ["ledger_lookup"] if kind == "tool" else []})
    async with h.running_worker(settings, h.registry(llm)) as (client, _pool):
        handle = await start(client, settings, req)
        result = await asyncio.wait_for(handle.result(), 300)
    assert result.status == "completed", result.reason
    shown = [r.last_user_text for r in llm.requests("fake-root") if "PER_CALL" in r.last_user_text][0]
    return float(re.search(r"PER_CALL ([0-9.e-]+)", shown).group(1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    out: dict[str, object] = {"calls_per_cell": args.calls}
    with h.private_services() as services, h.fake_llm_in_process() as llm:
        for kind in ("tool", "llm_query"):
            per_call = [asyncio.run(one_run(services, llm, kind, args.calls)) for _ in range(args.repeats)]
            out[f"{kind}_s_per_call"] = h.spread(per_call, 4)
            print(kind, out[f"{kind}_s_per_call"], "load", [round(x, 2) for x in os.getloadavg()])
    out["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(h.write_results("tools", out))
    sys.stdout.flush()
    os._exit(0)  # a process that used a Temporal client can abort at exit (sdk-python#300)


if __name__ == "__main__":
    main()
