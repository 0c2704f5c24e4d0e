"""`rlm result` and `rlm cancel` over the Temporal HTTP API, and through the
SDK client when that API does not answer: same answers, same errors.

Real `rlm` subprocesses against the session's servers and the embedded
worker of the test's own task queue; the close-event reading is also checked
on its own (pure)."""

from __future__ import annotations

import json
import threading
import time

import pytest

from cli import services
from cli._ports import find_free_port
from cli._temporal_http import TemporalHttp, close_outcome, waiting_task_key
from tests.run_harness import ROOT, isolated, repl
from tests.test_cli_run import _rlm
from workflows.names import QUERY_PROGRESS


@pytest.fixture
def s(settings):
    own = isolated(settings).model_copy(update={"embedded_worker": True})
    yield own
    services.stop_worker(own)


def _no_http(settings):
    """The same services, but an HTTP API port where nothing listens."""
    return settings.model_copy(update={"temporal_http_port": find_free_port()})


@pytest.mark.parametrize("transport", ["http", "sdk"])
def test_result_and_cancel_by_id(s, llm, tmp_path, transport):
    doc = tmp_path / "doc.txt"
    doc.write_text("abc")
    held = threading.Event()
    # Whatever else the root model is asked (the held run after its release): a harmless cell.
    llm.add_rule(None, repl("print(1)"), model=ROOT)
    llm.add_rule("Turn 1 of", repl("print(context)"), model=ROOT)
    llm.add_rule("abc", "FINAL(abc)", model=ROOT)
    llm.add_rule("HOLD", repl("print(2)"), model=ROOT, hold=held)
    reader = s if transport == "http" else _no_http(s)
    try:
        run_id = f"by-id-{transport}"
        assert _rlm(s, llm.url, "submit", "q", "--context", str(doc), "--model", ROOT, "--id", run_id).returncode == 0
        done = _rlm(reader, llm.url, "result", run_id, "--json")
        assert done.returncode == 0, done.stderr[-2000:]
        assert json.loads(done.stdout)["answer"] == "abc"
        assert done.stderr.count("error") == 0

        held_id = f"by-id-held-{transport}"
        assert _rlm(s, llm.url, "submit", "HOLD", "--context", str(doc), "--model", ROOT, "--id", held_id).returncode == 0
        if transport == "http":  # the progress line's query, as the HTTP API answers it
            # Held in its first turn; the query may answer before that turn begins.
            assert _progress(s, held_id, until=lambda state: state.get("turn") == 1)["turn"] == 1
        cancel = _rlm(reader, llm.url, "cancel", held_id, "--reason", "enough")
        assert cancel.returncode == 0 and f"cancel requested for {held_id}" in cancel.stdout, cancel.stderr[-2000:]
        held.set()
        after = _rlm(reader, llm.url, "result", held_id, "--json")
        assert json.loads(after.stdout)["status"] == "cancelled", after.stdout + after.stderr[-2000:]
    finally:
        held.set()


def _progress(settings, workflow_id: str, timeout_s: float = 60, until=lambda state: True) -> dict:
    """The run's progress query once its worker answers it (and `until` holds)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            state = TemporalHttp(settings).query(workflow_id, QUERY_PROGRESS)
            if isinstance(state, dict) and until(state):
                return state
        except Exception:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"no progress from {workflow_id}")
        time.sleep(0.2)


def test_unknown_run_is_one_line_error(s, llm):
    for command in ("result", "cancel"):
        proc = _rlm(s, llm.url, command, "no-such-run-xyz")
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines()[-1] == "error: no run no-such-run-xyz in namespace default"
        # An empty id reached the server as a broken request: a traceback.
        proc = _rlm(s, llm.url, command, " ")
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines()[-1] == f"rlm {command}: error: argument run_id: not an id: ' ' (1 to 1000 printable characters)"


def test_close_events_read_as_outcomes():
    completed = {"eventType": "EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED",
                 "workflowExecutionCompletedEventAttributes": {"result": [{"status": "completed"}]}}
    assert close_outcome(completed) == ("completed", {"status": "completed"})
    assert close_outcome({"eventType": "EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW"}) == ("continued", None)
    failed = {"eventType": "EVENT_TYPE_WORKFLOW_EXECUTION_FAILED",
              "workflowExecutionFailedEventAttributes": {"failure": {"message": "boom", "cause": {"message": "inner"}}}}
    assert close_outcome(failed) == ("failed", "boom")
    terminated = {"eventType": "EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED",
                  "workflowExecutionTerminatedEventAttributes": {"reason": "ops"}}
    assert close_outcome(terminated) == ("failed", "terminated: ops")
    pending = {"pendingWorkflowTask": {"state": "PENDING_WORKFLOW_TASK_STATE_SCHEDULED",
                                       "scheduledTime": "2026-01-01T00:00:00Z", "attempt": 2}}
    assert waiting_task_key(pending) == ("2026-01-01T00:00:00Z", 2)
    started = {"pendingWorkflowTask": {"state": "PENDING_WORKFLOW_TASK_STATE_STARTED"}}
    assert waiting_task_key(started) is None and waiting_task_key({}) is None
