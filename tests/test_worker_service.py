"""The embedded worker as users meet it: `rlm run` commands in separate
processes (real Temporal, S3, WASM, and the scripted model server) must each
get an answer, whether they run one after another, at once, after the
worker was killed, or after its code changed; a run no worker picks up is
told what to start."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from cli import _worker_service, services
from cli._process import is_alive, read_pid_file
from tests.run_harness import ROOT, isolated, repl
from tests.test_cli_run import rlm_env


@pytest.fixture
def s(settings):
    own = isolated(settings).model_copy(update={"embedded_worker": True})
    yield own
    services.stop_worker(own)


def _rlm_popen(settings, llm, *args: str, extra_env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "cli.main", *args],
        env=rlm_env(settings, llm.url, extra_env),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _answered(proc: subprocess.Popen, expected: str, timeout: float = 180) -> None:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    assert out.strip().splitlines()[0] == expected, (out, err[-2000:])


def _echo_run(llm, doc: Path, text: str) -> list[str]:
    """A document whose run answers with its text (two root turns)."""
    doc.write_text(text)
    llm.add_rule("Turn 1 of", repl("print(context)"), model=ROOT)
    llm.add_rule(lambda r: r.model == ROOT and "ANSWER-" in r.last_text and "Turn 1 of" not in r.last_text,
                 lambda r: f"FINAL({r.last_text.split('ANSWER-')[1].split()[0]})", model=ROOT)
    return ["run", "q", "--context", str(doc), "--model", ROOT]


def _worker_pids(settings) -> list[int]:
    """Processes running the worker of this task queue (by its readiness file argument)."""
    marker = str(_worker_service.WorkerFiles(settings).ready_file).encode()
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if marker in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def test_two_runs_in_a_row_share_one_worker_and_status_and_down_see_it(s, llm, tmp_path):
    args = _echo_run(llm, tmp_path / "doc.txt", "ANSWER-one")
    _answered(_rlm_popen(s, llm, *args), "one")
    first = read_pid_file(_worker_service.WorkerFiles(s).pid_file)
    assert first is not None and is_alive(first)
    _answered(_rlm_popen(s, llm, *args), "one")
    assert read_pid_file(_worker_service.WorkerFiles(s).pid_file).pid == first.pid
    assert _worker_pids(s) == [first.pid]
    # `rlm status` from the same environment (the worker's identity covers the model configuration).
    proc = _rlm_popen(s, llm, "status", "--json")
    out, err = proc.communicate(timeout=60)
    worker = json.loads(out)["worker"]
    assert worker["healthy"] and worker["pid"] == first.pid and worker["detail"] == "ready", (worker, err[-2000:])


def test_three_runs_at_once_start_one_worker(s, llm, tmp_path):
    procs = []
    for name in ("a", "b", "c"):
        args = _echo_run(llm, tmp_path / f"{name}.txt", f"ANSWER-{name}")
        procs.append((_rlm_popen(s, llm, *args), name))
    for proc, name in procs:
        _answered(proc, name)
    assert len(_worker_pids(s)) == 1


def test_killed_worker_is_restarted_and_the_run_in_flight_completes(s, llm, tmp_path):
    doc = tmp_path / "slow.txt"
    doc.write_text("ANSWER-slow")
    release = threading.Event()
    # The first run's second root call waits until the worker has been killed.
    llm.add_rule("Turn 1 of", repl("print(context)"), model=ROOT)
    llm.add_rule("ANSWER-slow", "FINAL(slow)", model=ROOT)  # the retry, on the new worker
    held = llm.add_rule("ANSWER-slow", "FINAL(slow)", model=ROOT, hold=release, times=1)
    in_flight = _rlm_popen(s, llm, "run", "q", "--context", str(doc), "--model", ROOT)
    try:
        llm.wait_for_count(1, held, timeout_s=120)
        worker = read_pid_file(_worker_service.WorkerFiles(s).pid_file)
        os.kill(worker.pid, signal.SIGKILL)
        release.set()
        fresh = _echo_run(llm, tmp_path / "fresh.txt", "ANSWER-fresh")
        _answered(_rlm_popen(s, llm, *fresh), "fresh")
        restarted = read_pid_file(_worker_service.WorkerFiles(s).pid_file)
        assert restarted.pid != worker.pid and is_alive(restarted)
        _answered(in_flight, "slow", timeout=240)
    finally:
        release.set()
        if in_flight.poll() is None:
            in_flight.kill()


def test_worker_with_outdated_code_is_restarted(s, llm, tmp_path):
    # A worker started by older code: same files, another identity on its command line.
    stale = _worker_service.start(s, _worker_service.argv(s, "0" * 16), environ=rlm_env(s, llm.url))
    assert "older code" in services.status(s).worker.detail
    args = _echo_run(llm, tmp_path / "doc.txt", "ANSWER-new")
    _answered(_rlm_popen(s, llm, *args), "new")
    current = read_pid_file(_worker_service.WorkerFiles(s).pid_file)
    assert current.pid != stale.pid and not is_alive(stale)
    assert _worker_pids(s) == [current.pid]


def test_run_no_worker_picks_up_is_told_what_to_start(s, llm, tmp_path):
    args = _echo_run(llm, tmp_path / "doc.txt", "ANSWER-late")
    no_worker = {"RLM_EMBEDDED_WORKER": "false", "RLM_NO_WORKER_WARNING_S": "1"}
    proc = _rlm_popen(s, llm, *args, extra_env=no_worker)
    worker = None
    try:
        lines = []
        for line in proc.stderr:  # ends when the command exits
            lines.append(line)
            if "no worker has picked up run" in line:
                break
        message = lines[-1]
        assert "`rlm worker`" in message and f"task queue {s.task_queue}" in message, "".join(lines)
        worker = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "worker"], env=rlm_env(s, llm.url, no_worker),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        _answered(proc, "late")
    finally:
        if proc.poll() is None:
            proc.kill()
        if worker is not None:
            worker.terminate()
            worker.wait(30)


def test_code_digest_follows_the_source(tmp_path, monkeypatch):
    for folder in _worker_service.CODE_DIRS:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "m.py").write_text("x = 1\n")
    (tmp_path / "worker.py").write_text("")
    monkeypatch.setattr(_worker_service, "_ROOT", tmp_path)
    before = _worker_service.code_digest()
    assert _worker_service.code_digest() == before
    (tmp_path / "activities" / "m.py").write_text("x = 2\n")
    assert _worker_service.code_digest() != before
