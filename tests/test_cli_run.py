"""`rlm run` / `rlm submit` / `rlm result` as a user runs them: a subprocess
with RLM_* settings pointing at the session's servers, the scripted model
server configured through RLM_MODELS_JSON, and the embedded worker that
`rlm run` starts for the test's own task queue (stopped after each test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cli import services
from tests.fixtures_llm import models_json
from tests.run_harness import ROOT, SUB, isolated, repl


def rlm_env(settings, fake_url: str, extra_env: dict | None = None) -> dict[str, str]:
    """A user's environment: these settings, the scripted models, the embedded worker on."""
    env = {**os.environ, **settings.to_env(), "RLM_MODELS_JSON": models_json(fake_url), "RLM_EMBEDDED_WORKER": "true"}
    env |= extra_env or {}
    for name in ("RLM_MODEL", "OPENAI_API_KEY", "OPENAI_API_BASE"):
        env.pop(name, None)
    return env


def _rlm(settings, fake_url: str, *args: str, timeout: float = 120, extra_env: dict | None = None):
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        env=rlm_env(settings, fake_url, extra_env), capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture
def s(settings):
    """The session's services with a task queue of this test's own; its worker is stopped after."""
    own = isolated(settings).model_copy(update={"embedded_worker": True})
    yield own
    services.stop_worker(own)


def test_rlm_run_prints_answer_status_spend_and_ui_link(s, llm, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("alpha beta gamma\n" * 1000)
    llm.add_rule("Turn 1 of", repl("print(len(context.split()))"), model=ROOT)
    llm.add_rule("3000", "FINAL(3000 words)", model=ROOT)
    proc = _rlm(s, llm.url, "run", "How many words?", "--context", str(doc), "--model", ROOT, "--sub-model", SUB)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[0] == "3000 words"
    assert "status: completed" in proc.stderr
    assert "fake-root: 2 calls" in proc.stderr
    assert f"{s.temporal_ui_url}/namespaces/{s.temporal_namespace}/workflows/rlm-" in proc.stderr
    assert "no worker" not in proc.stderr


def test_rlm_run_json_and_caps(s, llm, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("x")
    llm.add_rule(None, repl("print(1)"), model=ROOT)
    proc = _rlm(s, llm.url, "run", "q", "--context", str(doc), "--model", ROOT, "--max-calls", "2", "--json")
    assert proc.returncode == 3, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["status"] == "budget_exhausted" and result["spend"]["calls"] <= 2


def test_rlm_run_bad_inputs_give_one_line_errors(s, llm, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\x00\xff\xfe" * 100)
    doc = tmp_path / "doc.txt"
    doc.write_text("text")
    cases = [
        (["--context", str(doc), "--model", "no-such-model-xyz"], "no-such-model-xyz"),
        (["--context", str(empty), "--model", ROOT], "empty"),
        (["--context", str(binary), "--model", ROOT], "blob.bin"),
        (["--context", str(tmp_path / "missing.txt"), "--model", ROOT], "missing.txt"),
        (["--context", str(doc), "--model", ROOT, "--max-tokens", "10"], "too small to start"),
        (["--context", str(doc), "--model", ROOT, "--id", "two\nlines"], "--id: 1 to 200"),
        # The question, before the upload (it said "invalid settings: RLM_QUESTION").
        ([" ", "--context", str(doc), "--model", ROOT], "the question is blank"),
        (["q" * 70_000, "--context", str(doc), "--model", ROOT], "at most 65,536"),
        (["--context", str(doc), "--model", ROOT, "--id", "y" * 1200], "(1200 characters)"),
    ]
    for args, expected in cases:
        if args[0].startswith("--"):
            args = ["q", *args]  # the question, unless the case is about it
        proc = _rlm(s, llm.url, "run", *args, timeout=60)
        assert proc.returncode == 1, (args, proc.stdout, proc.stderr[-2000:])
        lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and expected in lines[0], (args, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr
    proc = _rlm(
        s, llm.url, "run", "q", "--context", str(doc), "--model", "openai/gpt-4o-mini",
        timeout=60,
    )
    assert proc.returncode == 1 and "OPENAI_API_KEY" in proc.stderr
    assert llm.count() == 0


def test_the_repl_memory_cap_is_a_flag_and_a_context_it_cannot_hold_is_not_uploaded(s, llm, tmp_path):
    """`--cell-memory` sets the run's REPL cap (a 3 GB log needs 4096). A
    text context that reaches the cap is refused before it is uploaded: the
    run would have refused it after the upload (minutes for gigabytes)."""
    import asyncio

    from activities.object_store import ObjectStore
    from activities.temporal_client import connect
    from workflows.refs import CONTEXT_CHUNK_PREFIX

    big = tmp_path / "big.log"
    big.write_bytes(b"line of a log\n" * 1_500_000)  # 21 MB
    store = ObjectStore.from_settings(s)
    chunks_before = store.count(CONTEXT_CHUNK_PREFIX)
    for args, expected in (
        (["--cell-memory", "16"], "the context (21.0 MB) does not fit in the REPL's memory cap of 16 MiB: raise "
                                  "--cell-memory (at most 4096) or give it a smaller context"),
        (["--cell-memory", "8"], "--cell-memory: the REPL's memory cap must be 16 to 4096 MiB"),
        (["--cell-memory", "8192"], "got 8192"),
    ):
        proc = _rlm(s, llm.url, "run", "q", "--context", str(big), "--model", ROOT, *args, timeout=60)
        assert proc.returncode == 1, (args, proc.stderr[-2000:])
        assert proc.stderr.startswith("error: ") and expected in proc.stderr, (args, proc.stderr[-2000:])
    assert store.count(CONTEXT_CHUNK_PREFIX) == chunks_before
    assert llm.count() == 0

    llm.add_rule(None, "FINAL(fine)", model=ROOT)
    proc = _rlm(s, llm.url, "submit", "q", "--context", str(big), "--model", ROOT, "--cell-memory", "64",
                "--id", "cli-cell-memory-64")
    assert proc.returncode == 0, proc.stderr[-2000:]

    async def started_with() -> dict:
        client = await connect(s)
        history = await client.get_workflow_handle("cli-cell-memory-64").fetch_history()
        start = history.events[0].workflow_execution_started_event_attributes
        return json.loads(start.input.payloads[0].data)

    assert asyncio.run(started_with())["limits"]["cell_memory_mb"] == 64


def test_files_the_upload_would_not_store_as_text_do_not_count_against_the_repl_cap(tmp_path):
    """A recording beside the notes (`--skip-unreadable` leaves it out) or a
    UTF-16 export (refused by the upload, which says why) were counted as
    text: the run was refused with "raise --cell-memory"."""
    import os

    from cli._context_fit import unloadable_context

    case = tmp_path / "case"
    case.mkdir()
    (case / "notes.txt").write_text("the notes of the case\n")
    (case / "call.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVE" + os.urandom(20 << 20))
    export = tmp_path / "export.txt"
    export.write_bytes(b"\xff\xfe" + "x".encode("utf-16-le") * (10 << 20))
    assert unloadable_context([case], 16) is None
    assert unloadable_context([export], 16) is None
    text = tmp_path / "log.txt"
    text.write_bytes(b"a line\n" * (3 << 20))
    assert unloadable_context([text], 16).startswith("the context (22.0 MB) does not fit")


def test_the_context_folder_is_sized_once_before_its_upload(tmp_path, monkeypatch):
    """The size check and the progress line share one sum (a folder of 20,000
    files took ~0.25 s per walk); links, folders and missing paths count 0."""
    from activities import _context_input
    from cli import _run_checks

    folder = tmp_path / "case"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("x" * 10)
    (folder / "sub" / "b.txt").write_text("y" * 5)
    (folder / "link").symlink_to(folder / "sub")
    walks = []
    monkeypatch.setattr(_run_checks, "paths_bytes", lambda paths: walks.append(paths) or _context_input.paths_bytes(paths))
    monkeypatch.setattr(_run_checks, "check_models", lambda *a, **k: None)
    opts = _run_checks.RunOptions("q?", [folder, tmp_path / "missing"], model="fake-root", sub_model="fake-sub")
    checked, _ = _run_checks.checked_options(opts)
    assert checked.context_bytes == 15 and len(walks) == 1


def test_submit_then_result(s, llm, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("abc")
    llm.add_rule("Turn 1 of", repl("print(context)"), model=ROOT)
    llm.add_rule("abc", "FINAL(abc)", model=ROOT)
    submitted = _rlm(s, llm.url, "submit", "q", "--context", str(doc), "--model", ROOT, "--id", "cli-submit-1")
    assert submitted.returncode == 0, submitted.stderr[-2000:]
    assert submitted.stdout.strip() == "cli-submit-1"
    # submit started the embedded worker without waiting for it; result waits for the answer.
    result = _rlm(s, llm.url, "result", "cli-submit-1", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["answer"] == "abc"


def test_a_run_id_sent_again_gets_its_run_not_a_second_paid_one(s, llm, tmp_path):
    """A run's id is an idempotency key: a script whose `rlm submit --id X`
    is retried gets run X (running or ended, with its result) instead of a
    second paid run (Temporal starts a new run under a completed run's id by
    default); the same id with another request is refused, naming what differs."""
    doc = tmp_path / "doc.txt"
    doc.write_text("abc")
    llm.add_rule("Turn 1 of", repl("print(context)"), model=ROOT, delay_s=6, name="root")
    llm.add_rule("abc", "FINAL(done)", model=ROOT)
    args = ["--context", str(doc), "--model", ROOT]

    first = _rlm(s, llm.url, "submit", "q", *args, "--id", "cli-again-1")
    again = _rlm(s, llm.url, "submit", "q", *args, "--id", "cli-again-1")
    assert (first.returncode, again.returncode) == (0, 0), again.stderr[-2000:]
    assert again.stdout.strip() == "cli-again-1" and "run cli-again-1 was started already (" in again.stderr
    other = _rlm(s, llm.url, "submit", "another question", *args, "--id", "cli-again-1")
    assert other.returncode == 1 and "run id cli-again-1 is taken by a run" in other.stderr
    assert "differs in question: use another --id" in other.stderr, other.stderr[-2000:]
    capped = _rlm(s, llm.url, "submit", "q", *args, "--max-usd", "3", "--id", "cli-again-1")
    assert capped.returncode == 1 and "differs in caps" in capped.stderr, capped.stderr[-2000:]
    assert json.loads(_rlm(s, llm.url, "result", "cli-again-1", "--json").stdout)["answer"] == "done"
    rerun = _rlm(s, llm.url, "run", "q", *args, "--id", "cli-again-1")  # ended: its answer, not a new run
    assert rerun.returncode == 0 and rerun.stdout.strip().splitlines()[0] == "done", rerun.stderr[-2000:]
    assert "was started already (ended): not started again" in rerun.stderr
    assert llm.count("root") == 1

    # A cancelled run ended too: sent again, it gives its own outcome.
    assert _rlm(s, llm.url, "submit", "q", *args, "--id", "cli-again-2").returncode == 0
    assert _rlm(s, llm.url, "cancel", "cli-again-2").returncode == 0
    assert json.loads(_rlm(s, llm.url, "result", "cli-again-2", "--json").stdout)["status"] == "cancelled"
    calls = llm.count("root")
    retried = _rlm(s, llm.url, "run", "q", *args, "--id", "cli-again-2", "--json")
    assert retried.returncode == 3 and json.loads(retried.stdout)["status"] == "cancelled", retried.stderr[-2000:]
    assert llm.count("root") == calls


def test_default_model_choice(monkeypatch):
    """--model, else RLM_MODEL, else a hosted model whose key is set, else the local model."""
    from cli import _local_model
    from cli._run_checks import RunError, choose_models

    for key in ("RLM_MODEL", "RLM_SUB_MODEL", "OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(_local_model, "installed", lambda: False)
    try:
        choose_models(None, None, None)
        raise AssertionError("no model and nothing installed must be an error")
    except RunError as exc:
        assert "--model" in str(exc) and "[local]" in str(exc)
    monkeypatch.setattr(_local_model, "installed", lambda: True)
    assert choose_models(None, None, None) == ("local", None)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "k")
    assert choose_models(None, None, None) == ("claude-sonnet-4-5", "claude-haiku-4-5")
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    assert choose_models(None, "cheap", None) == ("gpt-4.1", "cheap")
    monkeypatch.setenv("RLM_MODEL", "mine")
    assert choose_models(None, None, None) == ("mine", None)
    assert choose_models("explicit", None, None) == ("explicit", None)


def test_a_money_cap_over_a_model_with_no_price_is_refused(llm, monkeypatch):
    """A model with no price counts $0, so --max-usd could not stop its calls:
    `rlm run` / `submit` refuse before starting, naming the model and the fix
    (a free model is priced 0); tokens or calls may still be capped."""
    from cli._run_by_id import RunError
    from cli._run_checks import check_models
    from workflows.budget import Caps

    def refusal(caps: Caps, **prices: object) -> str | None:
        monkeypatch.setenv("RLM_MODELS_JSON", models_json(llm.url, **prices))
        try:
            check_models(ROOT, SUB, caps)
        except RunError as exc:
            return str(exc)
        return None

    unpriced = {"usd_per_input_token": None, "usd_per_output_token": None}
    message = refusal(Caps(max_usd=1.0), **unpriced)
    assert message is not None and message.startswith(f"--max-usd: cannot limit model '{ROOT}', '{SUB}'"), message
    assert "usd_per_input_token" in message and "RLM_MODELS_JSON" in message
    assert refusal(Caps(max_usd=1.0)) is None  # priced
    assert refusal(Caps(max_usd=1.0), usd_per_input_token=0.0, usd_per_output_token=0.0) is None  # free, said so
    assert refusal(Caps(max_usd=1.0), usd_per_output_token=None) is not None  # half a price is none
    assert refusal(Caps(max_tokens=10_000), **unpriced) is None  # no money cap to miss


def test_ctrl_c_while_rlm_run_waits_leaves_the_run_going_and_says_so(s, llm, tmp_path):
    """Ctrl-C while `rlm run` waits for the answer stops the command, not the
    run (it is durable): the command says so and how to read or cancel it,
    and exits at once (it said only "interrupted", after sitting ~20 s until
    its long poll for the run's end returned)."""
    import signal
    import threading

    from activities.temporal_client import connect
    from temporalio.client import WorkflowExecutionStatus

    held = threading.Event()
    rule = llm.add_rule("Turn 1 of", repl("print(1)"), model=ROOT, hold=held)
    doc = tmp_path / "doc.txt"
    doc.write_text("abc")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "run", "q", "--context", str(doc), "--model", ROOT, "--id", "cli-ctrl-c-1"],
        env=rlm_env(s, llm.url), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        llm.wait_for_count(1, rule, 120)  # the run is under way: its first turn waits on the model
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=15)  # the old exit took ~20 s
    finally:
        held.set()
        proc.kill()

    async def status():
        client = await connect(s)
        handle = client.get_workflow_handle("cli-ctrl-c-1")
        found = (await handle.describe()).status
        await handle.cancel()
        return found

    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    assert "run cli-ctrl-c-1 goes on" in err and "rlm result cli-ctrl-c-1" in err and "rlm cancel cli-ctrl-c-1" in err, err[-2000:]
    import asyncio

    assert asyncio.run(status()) == WorkflowExecutionStatus.RUNNING
