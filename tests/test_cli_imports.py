"""Client commands (`rlm --help`, `status`, `submit`, `result`, `show`,
`cancel`, `run`, `session start|ask|show|close`, `chat`) never load the worker's heavy modules: litellm and openai
cost seconds of CPU to import, wasmtime and the sandbox belong to the worker.
Only `show` and the session commands (updates go through the SDK) load the
Temporal SDK client (~0.35 s of CPU): the others talk to Temporal's HTTP API; and no command loads pydantic-settings.

Each command runs for real, as a subprocess against the session's services,
through the `rlm` entry point; afterwards the process reports which of the
forbidden modules are in sys.modules. A behavioural check; the start times
themselves are measured by bench/bench_cli_start.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

from cli import services
from tests.fixtures_llm import models_json
from tests.run_harness import ROOT, isolated, repl

FORBIDDEN = ("litellm", "openai", "wasmtime", "sandbox_wasm", "boto3", "tiktoken")
# Commands other than `show` talk to the Temporal HTTP API: not even the SDK
# client (most of a command's start), nor pydantic-settings anywhere.
SDK_CLIENT = "temporalio.client"
# The S3 client (~0.4 s of CPU to import) only where a command uploads or reads objects.
S3_CLIENT = "minio"
_REPORTED = (*FORBIDDEN, SDK_CLIENT, S3_CLIENT, "pydantic_settings")

# The `rlm` entry point without its final os._exit, then a report of what stayed loaded.
_PROBE = f"""
import json, os, sys
from cli import main
try:
    code = main._run(sys.argv[1:])
except SystemExit as exc:
    code = exc.code or 0
loaded = [name for name in {_REPORTED!r} if name in sys.modules]
sys.stderr.write("LOADED " + json.dumps(loaded) + "\\n")
sys.stderr.flush()
os._exit(code)
"""


def _loaded_by(
    settings, fake_url: str, *args: str, ok: tuple[int, ...] = (0,), sdk_ok: bool = False, s3_ok: bool = True,
    stdin: str | None = None,
) -> list[str]:
    """Run `rlm <args>` (with `stdin` as its input); return the forbidden
    modules it loaded (with `sdk_ok`, the Temporal SDK client is allowed)."""
    env = {**os.environ, **settings.to_env(), "RLM_MODELS_JSON": models_json(fake_url), "RLM_EMBEDDED_WORKER": "true"}
    for name in ("RLM_MODEL", "OPENAI_API_KEY", "OPENAI_API_BASE"):
        env.pop(name, None)
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, *args], env=env, capture_output=True, text=True, timeout=120, input=stdin
    )
    assert proc.returncode in ok, f"rlm {' '.join(args)} exited {proc.returncode}: {proc.stderr[-3000:]}"
    line = next((l for l in proc.stderr.splitlines() if l.startswith("LOADED ")), None)
    assert line is not None, proc.stderr[-3000:]
    loaded = json.loads(line.removeprefix("LOADED "))
    return [name for name in loaded if not (sdk_ok and name == SDK_CLIENT) and not (s3_ok and name == S3_CLIENT)]


@pytest.fixture
def s(settings):
    """The session's services with a task queue of this test's own; its worker is stopped after."""
    own = isolated(settings).model_copy(update={"embedded_worker": True})
    yield own
    services.stop_worker(own)


def test_help_and_status_load_none_of_the_worker_modules(s, llm):
    assert _loaded_by(s, llm.url, "--help", s3_ok=False) == []
    # Exit code 1: this test's worker is not started yet, which `status` reports.
    assert _loaded_by(s, llm.url, "status", ok=(0, 1), s3_ok=False) == []


def test_run_commands_load_none_of_the_worker_modules(s, llm, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("the answer is 42\n" * 50)
    held = threading.Event()
    llm.add_rule("Turn 1 of", repl("print(context[:16])"), model=ROOT)
    llm.add_rule("the answer is", "FINAL(42)", model=ROOT)
    llm.add_rule("HOLD", "FINAL(held)", model=ROOT, hold=held)  # newest rule wins: this one for HOLD
    run_args = ("--context", str(doc), "--model", ROOT)
    try:
        assert _loaded_by(s, llm.url, "submit", "q", *run_args, "--id", "imports-submit") == []
        assert _loaded_by(s, llm.url, "result", "imports-submit") == []
        assert _loaded_by(s, llm.url, "show", "imports-submit", sdk_ok=True) == []
        assert _loaded_by(s, llm.url, "run", "q", *run_args, "--id", "imports-run") == []
        assert _loaded_by(s, llm.url, "submit", "HOLD", *run_args, "--id", "imports-held") == []
        assert _loaded_by(s, llm.url, "cancel", "imports-held") == []
    finally:
        held.set()


def test_session_commands_load_none_of_the_worker_modules(s, llm, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("the answer is 42\n" * 50)
    llm.add_rule("Turn 1 of", repl("print(context[:16])"), model=ROOT)
    llm.add_rule("the answer is", "FINAL(42)", model=ROOT)
    start = ("--context", str(doc), "--model", ROOT)
    assert _loaded_by(s, llm.url, "session", "start", *start, "--id", "imports-session", sdk_ok=True) == []
    assert _loaded_by(s, llm.url, "session", "ask", "imports-session", "q", sdk_ok=True) == []
    assert _loaded_by(s, llm.url, "session", "show", "imports-session", sdk_ok=True) == []
    assert _loaded_by(s, llm.url, "session", "close", "imports-session", sdk_ok=True) == []
    assert _loaded_by(s, llm.url, "chat", *start, stdin="q\n", sdk_ok=True) == []


def test_a_failing_command_still_reports_one_line_without_loading_them(s, llm, tmp_path):
    # An expected error of a module loaded on demand (the context reader) is
    # still shown as one line: `error: ...`, exit code 1, no traceback.
    missing = tmp_path / "missing.txt"
    env = {**os.environ, **s.to_env(), "RLM_MODELS_JSON": models_json(llm.url)}
    proc = subprocess.run(
        [sys.executable, "-m", "cli.main", "submit", "q", "--context", str(missing), "--model", ROOT],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in proc.stderr
