"""Text a model or a context writes reaches the operator's terminal as text,
never as escape sequences: a prompt injection in an audited document could
otherwise write the clipboard (OSC 52), clear the screen, hide text or
overwrite a line through `rlm run`, `rlm result`, `rlm show` or an error
line. JSON outputs stay valid and decode to the very text the model wrote.
Real CLI processes, worker, Temporal, S3 and WASM; the model scripted."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest

from activities.terminal_text import json_text, printable
from cli import services
from tests.run_harness import ROOT, SUB, isolated, repl
from tests.test_cli_run import rlm_env

ESC = "\x1b"
# Clipboard write, clear screen and home, a line overwritten, concealed text, a one-character CSI (C1).
PAYLOAD = ESC + "]52;c;cm0gLXJmIH4K\x07" + ESC + "[2J" + ESC + "[H" + "\rALL CHECKS PASSED" + ESC + "[8m" + "\u009b31m\u202e"
RAW = [b"\x1b", "\u009b".encode(), "\u202e".encode(), b"\x07"]


def _rlm(settings, url: str, *args: str) -> subprocess.CompletedProcess:
    # Bytes, not text: what a terminal would receive.
    return subprocess.run([sys.executable, "-m", "cli.main", *args], env=rlm_env(settings, url), capture_output=True, timeout=120)


def _raw(out: bytes) -> list[bytes]:
    return [b for b in RAW if b in out]


@pytest.fixture
def s(settings):
    own = isolated(settings).model_copy(update={"embedded_worker": True})
    yield own
    services.stop_worker(own)


def test_model_text_is_shown_escaped_and_json_keeps_it_exact(s, llm, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("an audited document\n")
    code = 'print("CELLOUT\\x1b]52;c;Y2VsbA==\\x07\\x1b[2J")\nprint("SUB:" + llm_query("say hi"))'
    llm.add_rule("Turn 1 of", "thinking " + PAYLOAD + "\n" + repl(code), model=ROOT)
    llm.add_rule(None, "SUBREPLY" + PAYLOAD, model=SUB)
    llm.add_rule("CELLOUT", "FINAL(" + PAYLOAD + ")", model=ROOT)
    wid = f"escapes-{uuid.uuid4().hex[:8]}"
    run = _rlm(s, llm.url, "run", "q", "--context", str(doc), "--model", ROOT, "--sub-model", SUB, "--id", wid)
    assert run.returncode == 0, run.stderr[-3000:]
    outputs = {"run": run, **{" ".join(a): _rlm(s, llm.url, *a, wid) for a in (["result"], ["show"], ["show", "--json"], ["export"], ["result", "--json"])}}
    for name, proc in outputs.items():
        assert proc.returncode == 0, (name, proc.stderr[-2000:])
        assert _raw(proc.stdout) == [] and _raw(proc.stderr) == [], (name, _raw(proc.stdout), _raw(proc.stderr))
    assert b"\\x1b]52;c;cm0gLXJmIH4K\\x07" in run.stdout  # shown, not obeyed
    show = outputs["show"].stdout
    assert b"\\x1b]52;c;Y2VsbA==\\x07" in show and b"SUBREPLY\\x1b]52" in show  # cell output, sub-call reply
    answer = json.loads(outputs["result --json"].stdout)["answer"]
    assert ESC + "]52;c;cm0gLXJmIH4K" in answer and "\u009b31m\u202e" in answer  # the model's own text, exact
    json.loads(outputs["show --json"].stdout), [json.loads(line) for line in outputs["export"].stdout.splitlines()]  # still JSON


def test_file_names_in_messages_are_shown_escaped(s, llm, tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "ok.txt").write_text("fine text\n")
    (folder / "inv\x1b]52;c;ZXZpbA==\x07\x1b[2J\rall files read.txt").write_bytes(b"\x00\x01binary")
    llm.add_rule("Turn 1 of", repl("print(len(context))"), model=ROOT)
    llm.add_rule("Turn 2 of", "FINAL(done)", model=ROOT)
    skipped = _rlm(s, llm.url, "run", "q", "--context", str(folder), "--skip-unreadable", "--model", ROOT, "--sub-model", SUB)
    refused = _rlm(s, llm.url, "run", "q", "--context", str(folder), "--model", ROOT, "--sub-model", SUB)
    assert skipped.returncode == 0 and refused.returncode == 1, (skipped.stderr[-2000:], refused.stderr[-2000:])
    for proc in (skipped, refused):
        assert _raw(proc.stderr) == [] and b"inv\\x1b]52;c;ZXZpbA==\\x07\\x1b[2J\\x0dall files read.txt" in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    "text, shown",
    [
        ("plain text, tabs\tand\nlines\r\nstay", "plain text, tabs\tand\nlines\r\nstay"),
        ("é ü 漢字 emoji 🙂", "é ü 漢字 emoji 🙂"),
        ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),
        ("over\rwrite", "over\\x0dwrite"),
        ("\x9b2J \x85 \x7f \x00", "\\x9b2J \\x85 \\x7f \\x00"),
        ("abc\u202edcba \u2066x\u2069", "abc\\u202edcba \\u2066x\\u2069"),
        ("lone \ud800 surrogate", "lone \\ud800 surrogate"),
    ],
)
def test_printable_escapes_what_drives_a_terminal_and_nothing_else(text, shown):
    assert printable(text) == shown
    assert json.loads(json_text({"t": text})) == {"t": text}
    escaped = json_text({"t": text})
    assert not any(c in escaped for c in "\x1b\x9b\x85\x7f\u202e\u2066\ud800")
    escaped.encode("utf-8")  # a lone surrogate no longer breaks a UTF-8 stream
