"""`rlm show`, `rlm export`, `rlm ui`: look at a run, running or finished.

All three read what the engine already stores (cli/_trace.py). Imports are
deferred to the handlers so `rlm --help` and the other commands stay fast;
none of them imports litellm.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from activities.terminal_text import json_text, printable
from cli._errors import UserError
from cli._ids import existing_id

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    show = sub.add_parser("show", help="print a run (and its child runs) as a tree")
    show.add_argument("run_id", type=existing_id)
    show.add_argument("--json", action="store_true", help="the same tree as JSON")
    show.add_argument("--no-children", action="store_true", help="do not load child runs")
    show.set_defaults(handler=_cmd_show)

    export = sub.add_parser("export", help="write a run (and its child runs) as JSONL, close to the rlms logger format")
    export.add_argument("run_id", type=existing_id)
    export.add_argument("-o", "--output", type=Path, default=None, help="file to write (default: stdout)")
    export.set_defaults(handler=_cmd_export)

    ui = sub.add_parser("ui", help="serve the trace viewer on 127.0.0.1")
    ui.add_argument("--port", type=int, default=8244)
    ui.add_argument("--open", action="store_true", help="open the page in a browser")
    ui.set_defaults(handler=_cmd_ui)


def _cmd_show(args: argparse.Namespace, settings) -> int:
    from cli._show import render
    from cli._trace import TraceReader

    async def go() -> dict:
        reader = await TraceReader.open(settings)
        return await reader.load(args.run_id, children=not args.no_children)

    trace = asyncio.run(go())
    if args.json:
        sys.stdout.write(json_text(trace, indent=2) + "\n")
    else:
        print(printable(render(trace, settings.s3_bucket)))
    return 0


def _cmd_export(args: argparse.Namespace, settings) -> int:
    from cli._export import export_lines
    from cli._trace import TraceReader

    if args.output is not None and not args.output.parent.is_dir():  # before the run is read
        raise UserError(f"-o {args.output}: no directory {args.output.parent}")

    async def go() -> list[dict]:
        reader = await TraceReader.open(settings)
        trace = await reader.load(args.run_id)
        return await asyncio.to_thread(export_lines, reader, trace)

    lines = asyncio.run(go())
    text = "".join(json_text(line) + "\n" for line in lines)
    if args.output is None:
        sys.stdout.write(text)
    else:
        try:
            args.output.write_text(text)
        except OSError as exc:
            raise UserError(f"-o {args.output}: {exc.strerror or exc}") from None
        print(f"wrote {len(lines)} lines to {args.output}", file=sys.stderr)
    return 0


def _cmd_ui(args: argparse.Namespace, settings) -> int:
    from cli.ui.server import serve

    asyncio.run(serve(settings, port=args.port, open_browser=args.open))
    return 0
