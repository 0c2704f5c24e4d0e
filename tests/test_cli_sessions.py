"""`rlm session start|ask|show|close` and `rlm chat` as a user runs them: a
subprocess with RLM_* settings pointing at the test session's servers, the
scripted model server, and the embedded worker started for the test's own
task queue (stopped after each test)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cli import services
from tests.run_harness import ROOT, SUB, isolated, repl
from tests.session_harness import asked
from tests.test_cli_run import rlm_env


def _rlm(settings, fake_url: str, *args: str, stdin: str | None = None, timeout: float = 180):
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        env=rlm_env(settings, fake_url), capture_output=True, text=True, timeout=timeout, input=stdin,
    )


@pytest.fixture
def s(settings):
    own = isolated(settings).model_copy(update={"embedded_worker": True})
    yield own
    services.stop_worker(own)


def _script(llm) -> None:
    llm.add_rule(asked("first"), repl("words = context.split()\nprint('count', len(words))"), model=ROOT)
    llm.add_rule("count 3", "FINAL(3 words)", model=ROOT)
    llm.add_rule(asked("second"), repl("print('last', words[-1], len(session_history))"), model=ROOT)
    llm.add_rule("last gamma 1", "FINAL(gamma)", model=ROOT)


def test_session_commands_end_to_end(s, llm, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("alpha beta gamma")
    _script(llm)
    start = _rlm(s, llm.url, "session", "start", "--context", str(doc), "--model", ROOT, "--sub-model", SUB,
                 "--session-max-usd", "1.0", "--json")
    assert start.returncode == 0, start.stderr[-3000:]
    session_id = json.loads(start.stdout)["session_id"]
    assert session_id.startswith("rlm-session-")

    first = _rlm(s, llm.url, "session", "ask", session_id, "first: how many words?")
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.strip().splitlines()[0] == "3 words"
    assert "status: completed" in first.stderr and f"session {session_id}: 1 question(s)" in first.stderr

    second = _rlm(s, llm.url, "session", "ask", session_id, "second: the last word?", "--json")
    assert second.returncode == 0, second.stderr[-3000:]
    result = json.loads(second.stdout)
    assert result["answer"] == "gamma" and result["workflow_id"] == f"{session_id}/q2"

    show = _rlm(s, llm.url, "session", "show", session_id, "--json")
    assert show.returncode == 0 and json.loads(show.stdout)["questions"] == 2

    close = _rlm(s, llm.url, "session", "close", session_id, "--json")
    assert close.returncode == 0, close.stderr[-3000:]
    summary = json.loads(close.stdout)
    assert summary["state"] == "closed" and summary["questions"] == 2 and summary["caps"]["max_usd"] == 1.0
    assert summary["spend"]["calls"] >= 4  # a timed-out attempt on a busy machine is charged too

    again = _rlm(s, llm.url, "session", "close", session_id, "--json")  # closed already: its summary
    assert again.returncode == 0 and json.loads(again.stdout)["questions"] == 2, again.stderr[-2000:]

    after = _rlm(s, llm.url, "session", "ask", session_id, "first again?")
    assert after.returncode == 1 and after.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in after.stderr


def test_rlm_chat_over_stdin(s, llm, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("alpha beta gamma")
    _script(llm)
    proc = _rlm(s, llm.url, "chat", "--context", str(doc), "--model", ROOT,
                stdin="first: how many words?\n\nsecond: the last word?\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "3 words" and lines[1] == "gamma", proc.stdout
    # End of input closed the session and printed its totals.
    assert "closed, 2 question(s)" in proc.stdout
    assert "q1 [completed] first: how many words?" in proc.stdout
    assert "Ctrl-D closes it" in proc.stderr


def test_rlm_chat_goes_on_with_an_open_session(s, llm, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("alpha beta gamma")
    _script(llm)
    start = _rlm(s, llm.url, "session", "start", "--context", str(doc), "--model", ROOT)
    assert start.returncode == 0, start.stderr[-3000:]
    session_id = start.stdout.strip()
    first = _rlm(s, llm.url, "session", "ask", session_id, "first: how many words?")
    assert first.returncode == 0, first.stderr[-3000:]
    proc = _rlm(s, llm.url, "chat", "--session", session_id, stdin="second: the last word?\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[0] == "gamma", proc.stdout
    assert f"session {session_id}: closed, 2 question(s)" in proc.stdout


def test_session_bad_inputs_give_one_line_errors(s, llm, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("text")
    big = tmp_path / "big.txt"
    big.write_bytes(b"x" * 17_000_000)
    cases = [
        (["session", "ask", "rlm-session-nope", "q"], "rlm-session-nope"),
        (["session", "close", "rlm-session-nope"], "rlm-session-nope"),
        (["session", "start", "--context", str(tmp_path / "missing.txt"), "--model", ROOT], "missing.txt"),
        (["session", "start", "--context", str(doc), "--model", ROOT, "--continue-after", "0"], "--continue-after"),
        (["session", "start", "--context", str(doc), "--model", ROOT, "--cell-memory", "0"],
         "--cell-memory: the REPL's memory cap must be 16 to 4096 MiB"),
        (["session", "start", "--context", str(big), "--model", ROOT, "--cell-memory", "16"],
         "the context (17.0 MB) does not fit in the REPL's memory cap of 16 MiB: raise --cell-memory"),
        (["chat", "--model", ROOT], "--context"),
        # Ids scripts read back: refused before anything starts (a newline split the printed
        # id in two; 1,200 characters failed in Temporal with a traceback).
        (["session", "start", "--context", str(doc), "--model", ROOT, "--id", "two\nlines"], "--id: 1 to 200"),
        (["session", "start", "--context", str(doc), "--model", ROOT, "--id", "x" * 1200], "(1200 characters)"),
        (["session", "start", "--context", str(doc), "--model", ROOT, "--id", ""], "--id: 1 to 200"),
        (["session", "ask", "rlm-session-nope", "q", "--ask-id", "a key"], "--ask-id: 1 to 200"),
        (["session", "ask", "rlm-session-nope", " "], "ask: question: the question is blank"),  # was pydantic's 4-line dump
    ]
    for args, needle in cases:
        proc = _rlm(s, llm.url, *args)
        assert proc.returncode == 1, (args, proc.stderr[-2000:])
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and needle in last and "Traceback" not in proc.stderr, (args, proc.stderr)


def test_ctrl_c_during_an_ask_says_how_to_wait_for_its_answer_without_asking_again(s, llm, tmp_path):
    """Ctrl-C while `rlm session ask` waits stops the command, not the session:
    the question is answered (and paid) anyway. The command says so and
    gives its key; the same command with `--ask-id KEY` then returns that
    answer instead of asking (and paying) again. It said only "interrupted"."""
    import signal
    import threading

    held = threading.Event()
    turn = llm.add_rule(asked("first"), repl("words = context.split()\nprint('count', len(words))"), model=ROOT, hold=held)
    llm.add_rule("count 3", "FINAL(3 words)", model=ROOT)
    doc = tmp_path / "doc.txt"
    doc.write_text("alpha beta gamma")
    start = _rlm(s, llm.url, "session", "start", "--context", str(doc), "--model", ROOT, "--json")
    assert start.returncode == 0, start.stderr[-3000:]
    session_id = json.loads(start.stdout)["session_id"]
    args = ["session", "ask", session_id, "first: how many words?", "--ask-id", "audit-q1"]
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", *args], env=rlm_env(s, llm.url),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        llm.wait_for_count(1, turn, 120)  # the question's run waits on the model
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        held.set()
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert f"session {session_id} received the question it answers it anyway" in err, err[-2000:]
    assert "`--ask-id audit-q1`" in err, err[-2000:]

    again = _rlm(s, llm.url, *args, "--json")
    assert again.returncode == 0, again.stderr[-3000:]
    result = json.loads(again.stdout)
    assert result["answer"] == "3 words" and result["workflow_id"] == f"{session_id}/q1", result
    assert llm.count(turn) == 1  # asked once
    show = _rlm(s, llm.url, "session", "show", session_id, "--json")
    assert json.loads(show.stdout)["questions"] == 1



def test_an_ask_refused_for_now_to_the_end_gives_its_key_as_it_may_have_been_taken(monkeypatch):
    """The server can refuse an ask for now that it had already handed the
    session, which answers it (the burst in tests/test_session_hostile.py).
    When `rlm session ask` stops sending it, the error says so and gives its
    key, under which the same command waits for that answer. It said "session
    ... is not open", and the question asked again (under a new key, as
    `rlm chat` does) could be run and paid twice."""
    import asyncio
    from types import SimpleNamespace

    from temporalio.client import WorkflowExecutionStatus
    from temporalio.service import RPCError, RPCStatusCode

    from cli import _session_client
    from cli._run_client import RunClient, RunError

    class Session:
        id = "sess-1"

        async def execute_update(self, *args, **kwargs):
            raise RPCError("limit on total payload size of in-flight updates has been reached", RPCStatusCode.RESOURCE_EXHAUSTED, b"")

        async def describe(self):
            return SimpleNamespace(status=WorkflowExecutionStatus.RUNNING)

    async def session(session_id):
        return Session()

    monkeypatch.setattr(_session_client, "ASK_ADMIT_WAIT_S", 0.0)  # the first refusal is the last
    sessions = _session_client.SessionClient(RunClient(SimpleNamespace(), None, progress=None))
    monkeypatch.setattr(sessions, "_session", session)
    with pytest.raises(RunError) as refused:
        asyncio.run(sessions.ask("sess-1", "first?", ask_id="audit-q7"))
    assert "may have taken it even so" in str(refused.value) and "`--ask-id audit-q7`" in str(refused.value), refused.value
    assert "not open" not in str(refused.value)


def test_ctrl_c_at_the_chat_prompt_leaves_at_once_and_the_session_open(s, llm, tmp_path):
    """Ctrl-C while `rlm chat` waits for the next question ends the command
    at once (the line being read must not hold it) and leaves the session open."""
    import signal

    doc = tmp_path / "doc.txt"
    doc.write_text("alpha beta gamma")
    start = _rlm(s, llm.url, "session", "start", "--context", str(doc), "--model", ROOT, "--json")
    assert start.returncode == 0, start.stderr[-3000:]
    session_id = json.loads(start.stdout)["session_id"]
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "chat", "--session", session_id], env=rlm_env(s, llm.url),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = ""
        while "one question per line" not in seen:  # the chat is reading its first question
            line = proc.stderr.readline()
            assert line, seen
            seen += line
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=15)  # stdin stays open: a read must not hold the exit
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert f"session {session_id} stays open" in err and f"rlm chat --session {session_id}" in err, err[-2000:]
    show = _rlm(s, llm.url, "session", "show", session_id, "--json")
    assert json.loads(show.stdout)["state"] == "open"


def test_a_session_started_again_under_its_id_is_the_same_session(s, llm, tmp_path):
    """`rlm session start --id X` sent again while X is open (a script that
    retries) printed a traceback; the same request now names the open
    session, another one is refused naming what differs, and a closed
    session's id opens a new one."""
    doc = tmp_path / "doc.txt"
    doc.write_text("alpha beta gamma")
    start = ["session", "start", "--context", str(doc), "--model", ROOT, "--id", "cli-session-again"]
    first = _rlm(s, llm.url, *start)
    again = _rlm(s, llm.url, *start)
    assert (first.returncode, again.returncode) == (0, 0), again.stderr[-3000:]
    assert again.stdout.strip() == "cli-session-again"
    assert "session cli-session-again was started already (running): not started again" in again.stderr
    other = _rlm(s, llm.url, *start, "--max-usd", "2")
    assert other.returncode == 1 and "Traceback" not in other.stderr, other.stderr[-3000:]
    assert "session id cli-session-again is taken by a session (running) that differs in question_caps" in other.stderr
    assert _rlm(s, llm.url, "session", "close", "cli-session-again").returncode == 0
    reopened = _rlm(s, llm.url, *start)
    assert reopened.returncode == 0 and "started already" not in reopened.stderr, reopened.stderr[-3000:]
    assert _rlm(s, llm.url, "session", "close", "cli-session-again").returncode == 0


def test_a_run_id_given_to_a_session_command_and_back_says_what_it_names(s, llm, tmp_path):
    """`rlm result` on a session id waited until the session closed, `rlm
    show` and `export` showed it as an empty run, `rlm session show` on a run
    id printed a traceback, `session close` said "invalid settings", and
    `rlm cancel` on a run that had ended said there was no such run. Each
    names what the id is and the command that fits."""
    doc = tmp_path / "doc.txt"
    doc.write_text("abc")
    llm.add_rule("Turn 1 of", repl("print(context)"), model=ROOT)
    llm.add_rule("abc", "FINAL(abc)", model=ROOT)
    session = _rlm(s, llm.url, "session", "start", "--context", str(doc), "--model", ROOT, "--id", "cli-kind-session")
    run = _rlm(s, llm.url, "run", "How long?", "--context", str(doc), "--model", ROOT, "--id", "cli-kind-run")
    assert (session.returncode, run.returncode) == (0, 0), run.stderr[-3000:]

    for args in (["result", "cli-kind-session"], ["show", "cli-kind-session"], ["export", "cli-kind-session"]):
        proc = _rlm(s, llm.url, *args, timeout=60)
        assert proc.returncode == 1, (args, proc.stderr[-2000:])
        assert "cli-kind-session is a session, not a run: `rlm session show cli-kind-session`" in proc.stderr, args
    for args in (["session", "ask", "cli-kind-run", "q?"], ["session", "show", "cli-kind-run"], ["session", "close", "cli-kind-run"]):
        proc = _rlm(s, llm.url, *args, timeout=60)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, (args, proc.stderr[-2000:])
        assert "cli-kind-run is a run, not a session: `rlm result cli-kind-run`" in proc.stderr, args
    ended = _rlm(s, llm.url, "cancel", "cli-kind-run")
    assert ended.returncode == 1 and "run cli-kind-run has ended: nothing to cancel" in ended.stderr, ended.stderr
    missing = _rlm(s, llm.url, "session", "show", "cli-kind-nothing")
    assert missing.returncode == 1 and "no session cli-kind-nothing in namespace" in missing.stderr, missing.stderr
    assert _rlm(s, llm.url, "session", "close", "cli-kind-session").returncode == 0
