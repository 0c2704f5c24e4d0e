"""`rlm show` and `rlm export` on a real run with child runs and a failed
cell (real worker, Temporal, S3, WASM; scripted models), run as a user runs
them: the `rlm` command in a subprocess with RLM_* settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.trace_scenario import FAILING_CODE, QUESTION, run_scenario


def _rlm(settings, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, **settings.to_env()}
    return subprocess.run([sys.executable, "-m", "cli.main", *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def finished_run(settings, fake_llm, object_store):
    """The scenario run to its end: (its settings, its result)."""
    return run_scenario(settings, fake_llm, object_store)


def test_show_json_has_turns_cells_batches_children_and_spend(finished_run):
    s, result = finished_run
    proc = _rlm(s, "show", result.workflow_id, "--json")
    assert proc.returncode == 0, proc.stderr
    trace = json.loads(proc.stdout)
    assert trace["status"] == "completed" and trace["question"] == QUESTION
    assert trace["spend"] == result.spend.model_dump()
    assert [t["turn"] for t in trace["turns"]] == [1, 2, 3]
    t1, t2, t3 = trace["turns"]
    assert [c["id"] for c in t1["cells"]] == ["t1c1", "t1c2"]
    ok, failed = t1["cells"]
    assert "parts ['reply to say alpha', 'reply to say beta']" in ok["output"]
    assert failed["code"] == FAILING_CODE and "NameError" in failed["error"]
    # A small context is not worth making a REPL ahead: the first cell boots it, the next keeps it.
    assert (ok["warm"], failed["warm"]) == (False, True)
    [batch] = ok["batches"]
    assert (batch["kind"], batch["count"], batch["models"], batch["errors"]) == ("llm", 2, ["fake-sub"], 0)
    assert [i["prompt"] for i in batch["items"]] == ["say alpha", "say beta"]
    assert batch["spend"]["calls"] == 2 and batch["spend"]["tokens"] > 0
    [kids] = t2["cells"][0]["batches"]
    assert kids["kind"] == "rlm" and kids["count"] == 2
    children = [i["child"] for i in kids["items"]]
    assert [c["question"] for c in children] == ["Ca", "Cb"]
    assert [c["answer"] for c in children] == ["10", "20"]
    assert all(c["status"] == "completed" and c["depth"] == 1 for c in children)
    assert kids["spend"] == {k: sum(c["spend"][k] for c in children) for k in ("usd", "tokens", "calls")}
    assert "FINAL(sizes 10 and 20)" in t3["reply"]
    # Calls of the nodes add up to the run's (a failed attempt, e.g. timed out
    # on a busy machine, may be charged: the run's total counts it).
    assert sum(t["spend"]["calls"] for t in trace["turns"]) + trace["failed_attempts"] == result.spend.calls
    assert trace["series"][-1]["calls"] + trace["failed_attempts"] == result.spend.calls


def test_show_prints_a_tree(finished_run):
    s, result = finished_run
    proc = _rlm(s, "show", result.workflow_id)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    print(out)
    assert out.splitlines()[0].startswith(f"run {result.workflow_id} · completed · 3 turns · $")
    assert "├─ turn 1 · fake-root" in out
    assert "cell t1c2 · error" in out and "NameError" in out
    first, failed = (next(line for line in out.splitlines() if f"cell t1c{n} ·" in line) for n in (1, 2))
    assert first.endswith(" · new REPL") and "new REPL" not in failed
    assert "llm_query batch t1c1:1 · 2 calls · fake-sub · 0 errors" in out
    assert "rlm_query batch t2c1:1 · 2 calls" in out
    assert f"[0] child run {result.workflow_id}/d1-t2c1-" in out
    assert "answer: sizes 10 and 20" in out


def test_show_unknown_run_is_one_line_error(settings):
    proc = _rlm(settings, "show", "no-such-run")
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: no run 'no-such-run'") and "Traceback" not in proc.stderr


def test_export_to_a_path_it_cannot_write_is_one_line_error(finished_run, tmp_path):
    """Said before the run is read (it read the whole run, then failed with a traceback)."""
    s, result = finished_run
    missing = tmp_path / "no-such-dir" / "run.jsonl"
    proc = _rlm(s, "export", result.workflow_id, "-o", str(missing))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip() == f"error: -o {missing}: no directory {missing.parent}"
    proc = _rlm(s, "export", result.workflow_id, "-o", str(tmp_path))  # a directory, not a file
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().startswith(f"error: -o {tmp_path}: ")


def test_export_writes_rlms_logger_lines_with_children_nested(finished_run, tmp_path):
    s, result = finished_run
    out = tmp_path / "run.jsonl"
    proc = _rlm(s, "export", result.workflow_id, "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    meta, *iterations = lines
    # The fields rlms' RLMLogger writes, in its shape.
    assert meta["type"] == "metadata" and meta["root_model"] == "fake-root"
    assert {"max_depth", "max_iterations", "backend", "backend_kwargs", "environment_type", "environment_kwargs", "other_backends"} <= set(meta)
    assert meta["other_backends"] == ["fake-sub"] and meta["workflow_id"] == result.workflow_id
    assert [i["type"] for i in iterations] == ["iteration"] * 3
    assert [i["iteration"] for i in iterations] == [1, 2, 3]
    first = iterations[0]
    assert {"prompt", "response", "code_blocks", "final_answer", "iteration_time", "timestamp"} <= set(first)
    # The prompt is the message list the root model was sent (from the stored transcript).
    assert first["prompt"][0]["role"] == "system" and "Q0 how long" in first["prompt"][-1]["content"]
    assert "llm_query_batched" in first["response"]
    ok, failed = first["code_blocks"]
    assert set(ok["result"]) == {"stdout", "stderr", "locals", "execution_time", "rlm_calls", "final_answer"}
    assert "reply to say alpha" in ok["result"]["stdout"]
    assert [c["prompt"] for c in ok["result"]["rlm_calls"]] == ["say alpha", "say beta"]
    call = ok["result"]["rlm_calls"][0]
    assert call["response"] == "reply to say alpha" and call["root_model"] == "fake-sub"
    assert call["usage_summary"]["model_usage_summaries"]["fake-sub"]["total_calls"] == 1
    assert failed["code"] == FAILING_CODE and "NameError" in failed["result"]["stderr"]
    # Child runs: their whole trajectory nested in the call's metadata, as rlms does.
    kids = iterations[1]["code_blocks"][0]["result"]["rlm_calls"]
    assert [k["response"] for k in kids] == ["10", "20"]
    child = kids[0]["metadata"]
    assert child["run_metadata"]["depth"] == 1 and child["run_metadata"]["question"] == "Ca"
    assert child["iterations"][0]["code_blocks"][0]["result"]["final_answer"] == "10"
    assert iterations[-1]["final_answer"] == "sizes 10 and 20"
    assert [i["final_answer"] for i in iterations[:-1]] == [None, None]
