"""The `rlm` command: embedded services, contexts, and (from
`cli.run_commands`, when present) running RLM jobs and workers.

A command module contributes subcommands through `register(subparsers)`;
each subcommand sets `handler(args, settings) -> int`. Expected failures
raise `UserError` (or a storage / launcher error) and are reported as one
line `error: ...` with exit code 1, never a traceback.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import os
import sys
import threading

from activities.settings import load_settings
from activities.terminal_text import printable
from cli import _context_commands, _service_commands
from cli._errors import UserError, describe, is_expected
from cli._logging import configure_logging

__all__ = ["UserError", "build_parser", "main"]

# Optional command modules, registered when importable.
_EXTENSIONS = (
    "cli.run_commands",
    "cli.session_commands",
    "cli.trace_commands",
    "cli.schema_commands",
    "cli.schedule_commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlm",
        description="Recursive Language Models as durable Temporal workflows. "
        "Settings come from RLM_* environment variables (see README).",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _service_commands.register(subparsers)
    _context_commands.register(subparsers)
    for name in _EXTENSIONS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise  # the module exists but one of its imports is missing
            continue
        module.register(subparsers)
    return parser


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
        configure_logging(settings.log_level)
        return int(args.handler(args, settings) or 0)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except Exception as exc:
        if not is_expected(exc):
            raise
        sys.stderr.write(f"error: {printable(describe(exc))}\n")
        return 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `rlm` console command (argv None) and of tests."""
    code = _run(argv)
    if argv is None and (_only_daemon_threads() or "temporalio.client" in sys.modules):
        _leave(code)
    return code


def _only_daemon_threads() -> bool:
    return all(t.daemon or t is threading.main_thread() for t in threading.enumerate())


def _leave(code: int) -> None:
    """End the command without tearing the interpreter down: what registered
    for exit runs (logging's flush, weakref finalizers), output is flushed,
    and the process ends. Unloading the ~400 modules a command loads took
    60-90 ms after every command had finished (`rlm run`, `rlm status`); and
    a process that used a Temporal client can abort in that teardown
    (PyGILState_Release, rc 134; sdk-python#300), so it leaves this way even
    while a non-daemon thread works (as it always did)."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`rlm ... | head`): nothing more to say
            pass
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
