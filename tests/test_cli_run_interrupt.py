"""`rlm run` interrupted by Ctrl-C once its run has ended (while the result
is printed, or its whole answer read): no services, the client faked."""

from __future__ import annotations

import pytest

from activities.settings import load_settings
from cli import run_commands
from cli.main import build_parser
from workflows.result import RunResult, Usage
from workflows.budget import Spend


class _EndedRun:
    """A RunClient whose run has started and ended."""

    @classmethod
    async def open(cls, settings, **_):
        return cls()

    async def run(self, opts, on_started=None):
        on_started(opts.workflow_id)
        return RunResult(answer="42", status="completed", turns=1, spend=Spend(), usage=Usage(),
                         workflow_id=opts.workflow_id, run_id="r", root_workflow_id=opts.workflow_id, depth=0)

    def ui_link(self, workflow_id):
        return f"http://ui/{workflow_id}"


def test_ctrl_c_after_the_run_ended_does_not_say_it_goes_on(monkeypatch, tmp_path, capsys):
    import cli._run_checks as run_checks
    import cli._run_client as run_client

    def interrupted(*_, **__):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_client, "RunClient", _EndedRun)
    monkeypatch.setattr(run_checks, "checked_options", lambda opts, progress=None: (opts, None))
    monkeypatch.setattr(run_commands, "print_result", interrupted)
    doc = tmp_path / "doc.txt"
    doc.write_text("abc")
    args = build_parser().parse_args(["run", "q", "--context", str(doc), "--id", "ended-1"])
    with pytest.raises(KeyboardInterrupt):  # cli.main says "interrupted", as for any command
        run_commands._cmd_run(args, load_settings())
    assert "goes on" not in capsys.readouterr().err
