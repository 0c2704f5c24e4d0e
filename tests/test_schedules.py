"""`rlm schedule` as a user runs it: a subprocess against the session's
Temporal dev server and S3 server, the scripted models through
RLM_MODELS_JSON, and the embedded worker that `create` starts for the test's
own task queue (stopped after each test).

A schedule with a far-future cron is triggered by hand; each triggered run
reads the files under its s3:// prefix when it starts, so a file added
between two triggers is seen by the second run only."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest

from cli import services
from tests.fixtures_llm import models_json
from tests.run_harness import ROOT, isolated, repl

FAR_FUTURE_CRON = "0 0 1 1 *"  # once a year, on 1 January: never fires during a test


def _env(settings, fake_url: str) -> dict[str, str]:
    import os

    env = {**os.environ, **settings.to_env(), "RLM_MODELS_JSON": models_json(fake_url), "RLM_EMBEDDED_WORKER": "true"}
    for name in ("RLM_MODEL", "OPENAI_API_KEY", "OPENAI_API_BASE"):
        env.pop(name, None)
    return env


def _rlm(settings, fake_url: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        env=_env(settings, fake_url), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    return proc.stdout


def _one_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


@pytest.fixture
def s(settings):
    """The session's services with a task queue of this test's own; its worker is stopped after."""
    own = isolated(settings).model_copy(update={"embedded_worker": True})
    yield own
    services.stop_worker(own)


@pytest.fixture
def name(s, llm):
    """A schedule name of this test's own, deleted after the test if it still exists."""
    value = f"audit-{uuid.uuid4().hex[:8]}"
    yield value
    _rlm(s, llm.url, "schedule", "delete", value, timeout=60)


def _row(s, fake_url: str, name: str) -> dict | None:
    rows = json.loads(_ok(_rlm(s, fake_url, "schedule", "list", "--json")))
    return next((r for r in rows if r["name"] == name), None)


def _held_schedule(s, llm, object_store, name: str, overlap: str):
    """A schedule `name` over one file with overlap policy `overlap`, whose
    runs' root calls wait until the returned event is set."""
    import threading

    hold = threading.Event()
    llm.add_rule(None, repl("FINAL('done')"), model=ROOT, name="root", hold=hold)
    prefix = f"inbox-{uuid.uuid4().hex[:8]}/"
    object_store.put_bytes(prefix + "a.txt", b"one invoice")
    _ok(_rlm(s, llm.url, "schedule", "create", name, "q?", "--cron", FAR_FUTURE_CRON, "--model", ROOT,
             "--context", f"s3://{object_store.bucket}/{prefix}", "--overlap", overlap))  # fmt: skip
    return hold


def _run_answer(s, fake_url: str, workflow_id: str) -> str:
    result = json.loads(_ok(_rlm(s, fake_url, "result", workflow_id, "--json")))
    assert result["status"] == "completed", result
    return result["answer"]


def test_triggered_runs_read_the_files_present_at_their_start(s, llm, object_store, name):
    llm.add_rule(None, repl("FINAL('DOCS=' + ' | '.join(context))"), model=ROOT, name="root")
    prefix = f"inbox-{uuid.uuid4().hex[:8]}/"
    uri = f"s3://{object_store.bucket}/{prefix}"
    object_store.put_bytes(prefix + "a.txt", b"first invoice: 10 EUR")

    created = _rlm(
        s, llm.url, "schedule", "create", name, "List the invoices.", "--cron", FAR_FUTURE_CRON,
        "--context", uri, "--model", ROOT, "--max-usd", "1", "--max-tokens", "200000", "--max-turns", "3",
        "--overlap", "buffer_one",
    )  # fmt: skip
    assert _ok(created).strip() == name

    first = _ok(_rlm(s, llm.url, "schedule", "trigger", name)).strip()
    assert first.startswith(f"rlm-sched-{name}-"), first
    assert _run_answer(s, llm.url, first) == "DOCS=first invoice: 10 EUR"

    object_store.put_bytes(prefix + "b.txt", b"second invoice: 20 EUR")
    second = _ok(_rlm(s, llm.url, "schedule", "trigger", name)).strip()
    assert second.startswith(f"rlm-sched-{name}-") and second != first
    assert _run_answer(s, llm.url, second) == "DOCS=first invoice: 10 EUR | second invoice: 20 EUR"

    row = _row(s, llm.url, name)
    assert row is not None
    assert row["cron"] == FAR_FUTURE_CRON and row["context"] == uri and row["question"] == "List the invoices."
    assert row["model"] == ROOT and row["overlap"] == "buffer_one" and row["task_queue"] == s.task_queue
    assert row["paused"] is False and row["runs"] == 2
    assert {r["workflow_id"] for r in row["recent"]} == {first, second}
    assert row["next"][0][5:10] == "01-01", row["next"]  # the cron's next time, not a triggered run

    assert _ok(_rlm(s, llm.url, "schedule", "pause", name, "--note", "month-end freeze")).strip() == f"paused {name}"
    row = _row(s, llm.url, name)
    assert row["paused"] is True and row["note"] == "month-end freeze"
    text = _ok(_rlm(s, llm.url, "schedule", "list"))
    assert f"{name}  [paused (month-end freeze)]" in text and uri in text

    _ok(_rlm(s, llm.url, "schedule", "unpause", name))
    assert _row(s, llm.url, name)["paused"] is False

    assert _ok(_rlm(s, llm.url, "schedule", "delete", name)).strip() == f"deleted {name}"
    assert _row(s, llm.url, name) is None
    gone = _one_error(_rlm(s, llm.url, "schedule", "trigger", name))
    assert f"no schedule named {name!r}" in gone
    assert llm.count() == 2  # one root call per run


def test_create_refuses_a_duplicate_name(s, llm, object_store, name):
    args = ("schedule", "create", name, "q?", "--cron", FAR_FUTURE_CRON,
            "--context", f"s3://{object_store.bucket}/x/", "--model", ROOT)  # fmt: skip
    _ok(_rlm(s, llm.url, *args))
    assert f"schedule {name!r} exists" in _one_error(_rlm(s, llm.url, *args))


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--context", "/srv/invoices/", "--cron", FAR_FUTURE_CRON], "--context '/srv/invoices/'"),
        (["--context", "s3://", "--cron", FAR_FUTURE_CRON], "--context: 's3://' is not an S3 URI"),
        (["--context", "s3://bucket/in/", "--cron", "every tuesday-ish"], "--cron 'every tuesday-ish'"),
        (["--context", "s3://bucket/in/", "--cron", "0 6 30 2 *"], "--cron '0 6 30 2 *' never fires"),
        (["--context", "s3://bucket/in/", "--cron", "0 6 30 2 *", "--paused"], "--cron '0 6 30 2 *' never fires"),
        (["--context", "s3://bucket/in/", "--cron", FAR_FUTURE_CRON, "--max-usd", "-1"], "--max-usd"),
        (["--context", "s3://bucket/in/", "--cron", FAR_FUTURE_CRON, "--max-turns", "0"],
         "--max-turns: caps.max_turns must be at least 1"),
        (["--context", "s3://bucket/in/", "--cron", FAR_FUTURE_CRON, "--cell-memory", "8192"],
         "--cell-memory: the REPL's memory cap must be 16 to 4096 MiB"),
        (["--context", "s3://bucket/in/", "--cron", FAR_FUTURE_CRON, "--cell-memory", "0"], "--cell-memory"),
    ],
)
def test_bad_create_gives_one_line_naming_the_field(s, llm, name, args, named):
    proc = _rlm(s, llm.url, "schedule", "create", name, "q?", "--model", ROOT, *args)
    assert named in _one_error(proc)
    assert _row(s, llm.url, name) is None


def test_a_budget_too_small_to_start_is_refused_at_create_for_a_model_only_litellm_knows(s, llm, name):
    """`rlm run` leaves a model only litellm knows to the worker's first step
    (the run ends there, at once, saying why). A schedule left so started a
    run that failed that way at every firing (every second for `@every 1s`);
    its create now reads litellm's price list and refuses it."""
    env = _env(s, llm.url) | {"OPENAI_API_KEY": "sk-not-used"}  # the key is only checked to be set
    args = ["schedule", "create", name, "q?", "--model", "gpt-4o-mini", "--cron", FAR_FUTURE_CRON,
            "--context", "s3://bucket/in/", "--max-usd", "0"]  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "cli.main", *args], env=env, capture_output=True, text=True, timeout=120)
    assert "budget too small to start" in _one_error(proc) and "max_usd" in proc.stderr
    assert _row(s, llm.url, name) is None


def test_bad_names_and_missing_schedules(s, llm):
    bad = _one_error(_rlm(s, llm.url, "schedule", "create", "no/slash", "q?", "--cron", FAR_FUTURE_CRON,
                          "--context", "s3://b/x/", "--model", ROOT))  # fmt: skip
    assert "'no/slash'" in bad
    for verb in ("pause", "unpause", "trigger", "delete"):
        assert "no schedule named 'never-made'" in _one_error(_rlm(s, llm.url, "schedule", verb, "never-made"))


def test_schedule_commands_do_not_load_the_worker_modules(s, llm):
    probe = (
        "import os, sys\nfrom cli import main\ncode = main.main(['schedule', 'list', '--json'])\n"
        "print([m for m in ('litellm', 'openai', 'wasmtime') if m in sys.modules], flush=True)\n"
        # Leave as the `rlm` command does: a process that used a Temporal client
        # can abort at interpreter exit (cli/main.py, sdk-python#300).
        "sys.stderr.flush(); os._exit(code)"
    )
    env = _env(s, llm.url)
    proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_create_takes_the_run_flags_into_each_runs_request(monkeypatch, tmp_path):
    """`schedule create` has `rlm run`'s flags (one list): skipping unreadable
    files, a typed answer, tools and every cap reach the RunRequest. No servers."""
    from cli.main import build_parser
    from cli.schedule_commands import schedule_request
    from tests.fixtures_llm import FAKE_API_KEY_ENV

    monkeypatch.setenv("RLM_MODELS_JSON", models_json("http://127.0.0.1:9"))
    monkeypatch.setenv(FAKE_API_KEY_ENV, "k")
    schema = {"type": "object", "properties": {"total": {"type": "number"}}, "required": ["total"]}
    schema_file = tmp_path / "answer.json"
    schema_file.write_text(json.dumps(schema))
    args = build_parser().parse_args([
        "schedule", "create", "nightly", "Sum the invoices.", "--cron", FAR_FUTURE_CRON,
        "--context", "s3://bucket/in/", "--model", ROOT, "--skip-unreadable", "--answer-schema", str(schema_file),
        "--max-errors", "3", "--max-tool-calls", "10", "--tool", "ledger_lookup",
    ])  # fmt: skip
    request = schedule_request(args)
    assert request.on_unreadable == "skip" and request.answer_schema == schema
    assert (request.caps.max_errors, request.caps.max_tool_calls, request.tools) == (3, 10, ["ledger_lookup"])
    assert request.context.uri == "s3://bucket/in/"


# -- schedules made by another client, and overlapping triggers --------------------
def _with_client(s, body):
    """Run `body(client)` with a Temporal client of the test's own, as another
    service would (any SDK): the CLI's checks do not stand in its way."""
    import asyncio

    from activities.temporal_client import connect

    async def go():
        return await body(await connect(s))

    return asyncio.run(go())


def _foreign_schedule(s, name: str, request: dict, *, memo=None, note: str | None = None) -> None:
    from temporalio.client import Schedule, ScheduleActionStartWorkflow, ScheduleSpec, ScheduleState

    from workflows.names import WORKFLOW_RLM_RUN

    async def body(client):
        await client.create_schedule(
            name,
            Schedule(
                action=ScheduleActionStartWorkflow(
                    WORKFLOW_RLM_RUN, request, id=f"other-{name}", task_queue=s.task_queue
                ),
                spec=ScheduleSpec(cron_expressions=[FAR_FUTURE_CRON]),
                state=ScheduleState(paused=note is not None, note=note),
            ),
            memo=memo,
        )

    _with_client(s, body)


def test_list_escapes_what_another_client_wrote(s, llm, name):
    """A schedule's context URI and pause note are text another client writes:
    `list` must not hand their escape sequences to the operator's terminal."""
    hostile_uri = "s3://bucket-a/\x1b]52;c;cm0gLXJmIH4=\x07in/"  # OSC 52: write the clipboard
    request = {"question": "q?", "context": {"uri": hostile_uri}, "models": {"root": ROOT}}
    note = "\x1b[8mhidden\u202e\nforged  [active]"
    _foreign_schedule(s, name, request, memo={"rlm_cron": "\x1b[2J" + FAR_FUTURE_CRON}, note=note)
    text = _ok(_rlm(s, llm.url, "schedule", "list"))
    line = next(line for line in text.splitlines() if name in line)
    assert "[paused" in line, text
    for bad in ("\x1b", "\x07", "\u202e"):
        assert bad not in text, repr(text)
    assert "\\x1b]52" in text  # shown, escaped
    assert "\\nforged" in line and not any(x.startswith("forged") for x in text.splitlines()), text  # no forged row


def test_list_survives_a_memo_it_cannot_decode(s, llm, name):
    """Another service whose client has a payload codec (encryption) writes a
    memo the CLI cannot decode: `list` still lists every schedule."""
    from temporalio.api.common.v1 import Payload

    request = {"question": "q?", "context": {"uri": "s3://bucket-a/in/"}, "models": {"root": ROOT}}
    encrypted = Payload(metadata={"encoding": b"binary/encrypted"}, data=b"\x00\x01opaque")
    _foreign_schedule(s, name, request, memo={"rlm_cron": encrypted})
    rows = json.loads(_ok(_rlm(s, llm.url, "schedule", "list", "--json")))
    row = next(r for r in rows if r["name"] == name)
    assert row["cron"] is None and row["question"] == "q?", row
    assert name in _ok(_rlm(s, llm.url, "schedule", "list"))


def test_trigger_while_a_run_is_in_flight_says_the_new_run_is_queued(s, llm, object_store, name):
    """With a buffer overlap policy a trigger during a run queues a run that
    starts when the first ends: `trigger` says so at once (it used to wait
    30 s and suggest triggering again, which queues yet another paid run)."""
    import time

    hold = _held_schedule(s, llm, object_store, name, "buffer_all")
    try:
        first = _ok(_rlm(s, llm.url, "schedule", "trigger", name)).strip()
        started = time.monotonic()
        queued = _rlm(s, llm.url, "schedule", "trigger", name)
        took = time.monotonic() - started
        assert queued.returncode == 0, queued.stdout + queued.stderr[-3000:]
        assert queued.stdout == "" and "queued" in queued.stderr and first in queued.stderr, queued.stderr
        assert took < 20, took
        assert _row(s, llm.url, name)["queued"] == 1
        assert "runs 1 (+1 queued)" in _ok(_rlm(s, llm.url, "schedule", "list"))
    finally:
        hold.set()
    assert _run_answer(s, llm.url, first) == "done"
    deadline = time.monotonic() + 60
    while (row := _row(s, llm.url, name))["runs"] < 2 and time.monotonic() < deadline:
        time.sleep(1)
    assert row["runs"] == 2, row  # the queued run started once the first ended


def test_trigger_under_cancel_other_cancels_the_running_run_and_starts_its_own(s, llm, object_store, name):
    """cancel_other cancels the running run through Temporal: it ends
    `cancelled` with a result that keeps what it billed, its RlmStatus no
    longer says `running`, its provider request is closed, and the triggered
    run starts once it has. (A cancel that lands before the first turn, while
    the context is read, is tests/test_cancellation.py's.)"""
    import datetime
    import time

    from workflows.run import STATUS_KEY

    hold = _held_schedule(s, llm, object_store, name, "cancel_other")
    try:
        first = _ok(_rlm(s, llm.url, "schedule", "trigger", name)).strip()
        llm.wait_for_count(1, "root", timeout_s=60)  # the first run's root call is in flight (held)
        llm.add_rule(None, repl("FINAL('second')"), model=ROOT, name="root2")
        # Runs are named by the second they are triggered in: a trigger in the
        # first's second would name its run as the first's (and `rlm result`
        # would follow the newer run), so this one comes in a later second.
        named = datetime.datetime.fromisoformat(first[-len("2026-12-05T21:15:12Z") :])
        while datetime.datetime.now(datetime.timezone.utc) < named + datetime.timedelta(seconds=1):
            time.sleep(0.05)
        second = _ok(_rlm(s, llm.url, "schedule", "trigger", name)).strip()
        ended = _rlm(s, llm.url, "result", first, "--json")
        llm.wait_abandoned(1, timeout_s=60)  # its held model call is closed, not left to bill
    finally:
        hold.set()
    assert second != first
    assert ended.returncode == 3, ended.stderr[-3000:]  # a run that did not complete
    result = json.loads(ended.stdout)
    assert result["status"] == "cancelled" and result["spend"]["calls"] == 1, result  # what it billed is kept

    async def body(client):
        return (await client.get_workflow_handle(first).describe()).typed_search_attributes.get(STATUS_KEY)

    assert _with_client(s, body) == "cancelled"
    assert _run_answer(s, llm.url, second) == "second"


def test_a_run_after_its_files_were_deleted_fails_naming_the_prefix(s, llm, object_store, name):
    """A schedule runs for months: once its files are gone, each run fails
    at its first step, naming the prefix, and costs no model call."""
    llm.add_rule(None, repl("FINAL('DOCS=' + ' | '.join(context))"), model=ROOT, name="root")
    prefix = f"inbox-{uuid.uuid4().hex[:8]}/"
    uri = f"s3://{object_store.bucket}/{prefix}"
    object_store.put_bytes(prefix + "a.txt", b"first invoice")
    _ok(_rlm(s, llm.url, "schedule", "create", name, "q?", "--cron", FAR_FUTURE_CRON, "--model", ROOT,
             "--context", uri))  # fmt: skip
    assert _run_answer(s, llm.url, _ok(_rlm(s, llm.url, "schedule", "trigger", name)).strip()) == "DOCS=first invoice"
    object_store.client.remove_object(object_store.bucket, prefix + "a.txt")
    second = _ok(_rlm(s, llm.url, "schedule", "trigger", name)).strip()
    assert f"context.uri: no objects under {uri}" in _one_error(_rlm(s, llm.url, "result", second, "--json"))
    assert llm.count() == 1



def test_a_run_missed_while_temporal_was_down_is_caught_up_once_at_most(s, llm, name):
    """Temporal's default catchup window (a year) starts every run missed
    while the server was down once it is back: after a day down, a schedule
    firing each minute under allow_all would start 1,440 paid runs. A
    schedule's window is the shortest time between two of its runs, or
    `--catchup-window`; a window Temporal cannot keep is refused."""
    uri = "s3://rlm/inbox/"
    second = f"{name}-b"
    try:
        _ok(_rlm(s, llm.url, "schedule", "create", name, "q?", "--cron", "*/5 * * * *", "--model", ROOT,
                 "--context", uri, "--overlap", "allow_all", "--paused"))  # fmt: skip
        assert _row(s, llm.url, name)["catchup_window_s"] == 300
        _ok(_rlm(s, llm.url, "schedule", "create", second, "q?", "--cron", "0 6 * * 1-5", "--model", ROOT,
                 "--context", uri, "--catchup-window", "3600", "--paused"))  # fmt: skip
        assert _row(s, llm.url, second)["catchup_window_s"] == 3600
    finally:
        _rlm(s, llm.url, "schedule", "delete", second, timeout=60)
    for bad in ("5", "-1", "nan"):
        refused = _one_error(_rlm(s, llm.url, "schedule", "create", f"{name}-c", "q?", "--cron", "*/5 * * * *",
                                  "--model", ROOT, "--context", uri, "--catchup-window", bad))  # fmt: skip
        assert "--catchup-window" in refused and "10 to" in refused, refused
