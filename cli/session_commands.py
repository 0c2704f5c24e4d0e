"""`rlm session start|ask|close|show` and `rlm chat`: questions over one
context whose REPL state carries from one question to the next (the
`RLMSession` workflow, workflows/session.py).

`rlm chat` is an interactive loop over a new session (or `--session ID`):
each line read is a question, its answer and spend are printed; end of
input (Ctrl-D) closes the session and prints its totals. Ctrl-C leaves the
session open (ask it more later with `rlm chat --session ID`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from activities.terminal_text import printable
from cli._errors import UserError
from cli._ids import checked_id, existing_id
from cli._progress import ProgressPrinter
from cli.run_commands import answer_schema_from_file, caps_of, model_and_cap_arguments, print_result

if TYPE_CHECKING:  # the session client pulls in temporalio and minio: import it when a command runs
    from cli._session_client import SessionClient, SessionOptions
    from workflows.session_models import SessionSummary

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    session = sub.add_parser("session", help="questions over one context, REPL state kept between them")
    commands = session.add_subparsers(dest="session_command", required=True, metavar="SUBCOMMAND")

    start = commands.add_parser("start", help="start a session and print its id")
    _start_arguments(start)
    start.add_argument("--id", dest="session_id", default=None,
                       help="session id: 1-200 printable characters, no spaces (default: rlm-session-<random>)")
    start.add_argument("--json", action="store_true", help="print {session_id, ui} as JSON")
    start.set_defaults(handler=_cmd_start)

    ask = commands.add_parser("ask", help="ask a session a question and print the answer")
    ask.add_argument("session_id", type=existing_id)
    ask.add_argument("question")
    for flag, kind in (("--max-usd", float), ("--max-tokens", int), ("--max-calls", int), ("--max-turns", int)):
        ask.add_argument(flag, type=kind, default=None, help="this question only (default: the session's)")
    ask.add_argument("--max-wall", type=float, default=None, metavar="SECONDS", help="this question only")
    ask.add_argument("--answer-schema", type=Path, default=None, metavar="FILE",
                     help="a JSON Schema file: the answer must be JSON that validates (printed as JSON)")
    ask.add_argument("--json", action="store_true", help="print the question's RunResult as JSON")
    ask.add_argument("--ask-id", default=None, metavar="KEY",
                     help="idempotency key: the same command with the same key waits for the first answer "
                          "instead of asking again (for the session's last 50 questions)")
    ask.set_defaults(handler=_cmd_ask)

    close = commands.add_parser("close", help="close a session and print its totals")
    close.add_argument("session_id", type=existing_id)
    close.add_argument("--json", action="store_true", help="print the SessionSummary as JSON")
    close.set_defaults(handler=_cmd_close)

    show = commands.add_parser("show", help="print a session's state and totals")
    show.add_argument("session_id", type=existing_id)
    show.add_argument("--json", action="store_true", help="print the SessionSummary as JSON")
    show.set_defaults(handler=_cmd_show)

    chat = sub.add_parser("chat", help="an interactive session: one question per line, Ctrl-D closes")
    _start_arguments(chat, context_required=False)
    chat.add_argument("--session", dest="session_id", default=None, type=existing_id, help="continue this open session instead")
    chat.set_defaults(handler=_cmd_chat)


def _start_arguments(p: argparse.ArgumentParser, *, context_required: bool = True) -> None:
    p.add_argument("--context", nargs="+", type=Path, required=context_required, metavar="PATH",
                   help="a file, several files, or a directory of text files")
    model_and_cap_arguments(p)  # the caps of each question
    p.add_argument("--session-max-usd", type=float, default=None, help="dollars for the whole session")
    p.add_argument("--session-max-tokens", type=int, default=None, help="tokens for the whole session")
    p.add_argument("--session-max-calls", type=int, default=None, help="model calls for the whole session")
    p.add_argument("--continue-after", type=int, default=100, metavar="QUESTIONS",
                   help="questions per run of the session's continue-as-new chain")


def _options(args: argparse.Namespace) -> SessionOptions:
    from cli._session_client import SessionOptions

    if args.continue_after < 1:
        raise UserError("--continue-after must be at least 1")
    return SessionOptions(
        context_paths=list(args.context),
        model=args.model,
        sub_model=args.sub_model,
        question_caps=caps_of(args),
        session_caps={
            "max_usd": args.session_max_usd,
            "max_tokens": args.session_max_tokens,
            "max_calls": args.session_max_calls,
        },
        cell_timeout_s=args.cell_timeout,
        **({"cell_memory_mb": args.cell_memory} if args.cell_memory is not None else {}),
        tools=list(args.tools),
        continue_after_questions=args.continue_after,
        **({"session_id": checked_id(args.session_id, "--id")} if args.session_id is not None else {}),
    )


async def _open(settings, **kwargs: Any) -> SessionClient:
    from cli._session_client import SessionClient

    return await SessionClient.open(settings, progress=ProgressPrinter(sys.stderr), **kwargs)


def _cmd_start(args: argparse.Namespace, settings) -> int:
    opts = _options(args)  # a bad flag is refused before any service starts

    async def go() -> int:
        client = await _open(settings)
        session_id, existing = await client.start(opts)
        if existing is not None:  # the same session sent again: it holds the id
            print(f"session {session_id} was started already ({existing}): not started again", file=sys.stderr)
        if args.json:
            print(json.dumps({"session_id": session_id, "ui": client.ui_link(session_id)}))
        else:
            print(session_id)
            print(f"watch: {client.ui_link(session_id)}", file=sys.stderr)
        return 0

    return asyncio.run(go())


def _cmd_ask(args: argparse.Namespace, settings) -> int:
    caps = {
        "max_usd": args.max_usd,
        "max_tokens": args.max_tokens,
        "max_calls": args.max_calls,
        "max_turns": args.max_turns,
        "max_wall_s": args.max_wall,
    }

    schema = answer_schema_from_file(args.answer_schema)
    ask_id = checked_id(args.ask_id, "--ask-id") if args.ask_id is not None else f"ask-{uuid.uuid4().hex}"

    async def go() -> int:
        client = await _open(settings)
        given = {k: v for k, v in caps.items() if v is not None}
        result = await client.ask(args.session_id, args.question, given, answer_schema=schema, ask_id=ask_id)
        print_result(result, client.ui_link(result.workflow_id), as_json=args.json, settings=settings)
        if not args.json:
            _print_totals(await client.summary(args.session_id))
        # As `rlm run`: a typed answer that never validated is no answer a program can read.
        typed_ok = schema is None or result.answer_value is not None
        return 0 if result.status == "completed" and typed_ok else 3

    try:
        return asyncio.run(go())
    except KeyboardInterrupt:
        # Ctrl-C stops this command, not the session: a question it received is
        # answered (and paid) anyway. Asking again would pay twice; the key does not.
        sys.stderr.write(
            f"\ninterrupted: if session {args.session_id} received the question it answers it anyway; "
            f"the same command with `--ask-id {ask_id}` waits for that answer instead of asking again\n"
        )
        return 130


def _cmd_close(args: argparse.Namespace, settings) -> int:
    async def go() -> int:
        client = await _open(settings, start_services=False)
        _print_summary(await client.close(args.session_id), as_json=args.json)
        return 0

    return asyncio.run(go())


def _cmd_show(args: argparse.Namespace, settings) -> int:
    async def go() -> int:
        client = await _open(settings, start_services=False)
        _print_summary(await client.summary(args.session_id), as_json=args.json)
        return 0

    return asyncio.run(go())


def _cmd_chat(args: argparse.Namespace, settings) -> int:
    if args.session_id is None and not args.context:
        raise UserError("rlm chat needs --context PATH (a new session) or --session ID (an open one)")

    opts = _options(args) if args.context else None  # a bad flag is refused before any service starts

    async def go(opened: list[str]) -> int:
        client = await _open(settings)
        if opts is not None:
            session_id, _ = await client.start(opts)
        else:
            session_id = args.session_id
            await client.summary(session_id)  # says clearly when it does not exist
        opened.append(session_id)
        print(f"session {session_id}: one question per line; Ctrl-D closes it", file=sys.stderr)
        while True:
            print("? ", end="", file=sys.stderr, flush=True)
            line = await asyncio.to_thread(sys.stdin.readline)
            if not line:  # end of input
                break
            question = line.strip()
            if not question:
                continue
            try:
                result = await client.ask(session_id, question)
            except UserError as exc:
                print(f"error: {printable(str(exc))}", file=sys.stderr)
                continue
            print_result(result, client.ui_link(result.workflow_id), as_json=False, settings=settings)
            _print_totals(await client.summary(session_id))
        print(file=sys.stderr)
        _print_summary(await client.close(session_id), as_json=False)
        return 0

    opened: list[str] = []  # the session, once known
    try:
        return asyncio.run(go(opened))
    except KeyboardInterrupt:
        if not opened:
            raise
        sys.stderr.write(
            f"\ninterrupted: session {opened[0]} stays open and answers a question it received "
            f"(`rlm chat --session {opened[0]}` goes on with it, `rlm session close {opened[0]}` ends it)\n"
        )
        return 130


def _print_totals(summary: SessionSummary) -> None:
    spend = summary.spend
    print(
        f"session {summary.session_id}: {summary.questions} question(s) | calls: {spend.calls} | "
        f"tokens: {spend.tokens:,} | cost: ${spend.usd:.4f}" + _caps_text(summary),
        file=sys.stderr,
    )


def _caps_text(summary: SessionSummary) -> str:
    caps = summary.caps.model_dump(exclude_none=True)
    return (" | session caps: " + ", ".join(f"{k}={v}" for k, v in caps.items())) if caps else ""


def _print_summary(summary: SessionSummary, *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary.model_dump(mode="json"), indent=2))
        return
    print(f"session {summary.session_id}: {summary.state}, {summary.questions} question(s)")
    for ask in summary.recent:
        print(f"  q{ask.number} [{ask.status}] {printable(ask.question[:80])} (${ask.spend.usd:.4f}, {ask.turns} turns)")
    _print_totals(summary)
