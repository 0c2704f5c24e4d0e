"""`rlm run`, `rlm submit`, `rlm result`, `rlm cancel`, `rlm worker`.

Thin glue: the work happens in the worker and the `RLMRun` workflow.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from activities.terminal_text import json_text, printable
from cli._demo import register as register_demo
from cli._ids import checked_id, existing_id
from cli._progress import ProgressPrinter

if TYPE_CHECKING:  # the run client pulls in temporalio and minio: import it when a command needs it
    from cli._run_checks import RunOptions

__all__ = [
    "answer_schema_from_file",
    "caps_of",
    "model_and_cap_arguments",
    "print_result",
    "register",
    "with_whole_answer",
]


def register(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="run an RLM job and print its answer")
    _run_arguments(run)
    run.add_argument("--json", action="store_true", help="print the RunResult as JSON")
    run.set_defaults(handler=_cmd_run)

    submit = sub.add_parser("submit", help="start an RLM job and print its run id")
    _run_arguments(submit)
    submit.set_defaults(handler=_cmd_submit)

    result = sub.add_parser("result", help="wait for a run and print its result")
    result.add_argument("run_id", type=existing_id)
    result.add_argument("--json", action="store_true")
    result.set_defaults(handler=_cmd_result)

    cancel = sub.add_parser("cancel", help="cancel a run (and its child runs)")
    cancel.add_argument("run_id", type=existing_id)
    cancel.add_argument("--reason", default=None)
    cancel.set_defaults(handler=_cmd_cancel)

    worker = sub.add_parser("worker", help="run a worker (workflow + activities) until Ctrl-C")
    worker.set_defaults(handler=_cmd_worker)

    register_demo(sub)


def _run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("question")
    p.add_argument("--context", nargs="+", type=Path, required=True, metavar="PATH",
                   help="a file, several files, or a directory: text, CSV, JSON, PDF, DOCX, XLSX, PPTX, "
                        "HTML, EML (documents are named by their path under the directory)")
    p.add_argument("--skip-unreadable", action="store_true",
                   help="leave out files that cannot be converted to text (listed in the result) "
                        "instead of refusing the run")
    model_and_cap_arguments(p)
    p.add_argument("--id", dest="workflow_id", default=None,
                   help="workflow id: 1-200 printable characters, no spaces (default: rlm-<random>)")
    p.add_argument("--answer-schema", type=Path, default=None, metavar="FILE",
                   help="a JSON Schema file: the answer must be JSON that validates (printed as JSON)")


def model_and_cap_arguments(p: argparse.ArgumentParser) -> None:
    """--model, --sub-model, the caps of one run, --tool and --cell-timeout
    (also `rlm session start`, `rlm chat`)."""
    p.add_argument("--model", default=None, help="root model (default: RLM_MODEL, else a hosted model whose key is set, else the local model)")
    p.add_argument("--sub-model", default=None, help="sub-call model (default: RLM_SUB_MODEL, else as --model)")
    p.add_argument("--max-turns", type=int, default=20)
    p.add_argument("--max-usd", type=float, default=None)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--max-calls", type=int, default=None)
    p.add_argument("--max-wall", type=float, default=None, metavar="SECONDS")
    p.add_argument("--max-depth", type=int, default=1)
    p.add_argument("--max-tool-calls", type=int, default=None, help="custom-tool calls for the whole tree")
    p.add_argument("--max-errors", type=int, default=None, help="end the run after this many failed cells in a row")
    p.add_argument("--tool", dest="tools", action="append", default=[], metavar="NAME",
                   help="a custom tool the run may use (registered on the workers: RLM_TOOLS); repeat for several")
    p.add_argument("--max-concurrency", type=int, default=None, help="parallel sub-calls (default 32; 1 for the local model)")
    p.add_argument("--cell-timeout", type=float, default=120.0, metavar="SECONDS")
    p.add_argument("--cell-memory", type=int, default=None, metavar="MIB",
                   help="the REPL's memory cap, 16-4096 (default 2048); the context must fit in it")


def _options(args: argparse.Namespace) -> RunOptions:
    from cli._run_checks import RunOptions

    return RunOptions(
        question=args.question,
        context_paths=list(args.context),
        model=args.model,
        sub_model=args.sub_model,
        caps=caps_of(args),
        cell_timeout_s=args.cell_timeout,
        **({"cell_memory_mb": args.cell_memory} if args.cell_memory is not None else {}),
        answer_schema=answer_schema_from_file(args.answer_schema),
        tools=list(args.tools),
        on_unreadable="skip" if args.skip_unreadable else "fail",
        **({"workflow_id": checked_id(args.workflow_id, "--id")} if args.workflow_id is not None else {}),
    )


def caps_of(args: argparse.Namespace) -> dict:
    """The caps given by `model_and_cap_arguments` flags (None: not given)."""
    return {
        "max_turns": args.max_turns,
        "max_usd": args.max_usd,
        "max_tokens": args.max_tokens,
        "max_calls": args.max_calls,
        "max_wall_s": args.max_wall,
        "max_depth": args.max_depth,
        "max_concurrency": args.max_concurrency,
        "max_tool_calls": args.max_tool_calls,
        "max_errors": args.max_errors,
    }


def answer_schema_from_file(path: Path | None) -> dict | None:
    """The schema of `--answer-schema FILE`, checked before any upload."""
    if path is None:
        return None
    from cli._errors import UserError
    from workflows.typed_answer import check_answer_schema

    try:
        return check_answer_schema(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"--answer-schema {path}: {exc}") from None


def _cmd_run(args: argparse.Namespace, settings) -> int:
    from cli._run_checks import checked_options
    from cli._run_client import RunClient

    opts = _options(args)
    checked_options(opts)  # refused before any service or worker starts

    going_on: list[str] = []  # the run, once started and until it ended

    async def go() -> int:
        client = await RunClient.open(settings, progress=ProgressPrinter(sys.stderr))
        result = await client.run(opts, on_started=going_on.append)
        going_on.clear()  # a Ctrl-C while the result prints leaves no run going on
        print_result(result, client.ui_link(result.workflow_id), as_json=args.json, settings=settings)
        # A typed answer that never validated is no answer a program can read.
        typed_ok = args.answer_schema is None or result.answer_value is not None
        return 0 if result.status == "completed" and typed_ok else 3

    try:
        return asyncio.run(go())
    except KeyboardInterrupt:
        if not going_on:
            raise
        # Ctrl-C stops this command, not the durable run it started.
        run_id = going_on[0]
        sys.stderr.write(
            f"\ninterrupted: run {run_id} goes on (`rlm result {run_id}` waits for its answer, "
            f"`rlm cancel {run_id}` stops it)\n"
        )
        return 130


def _cmd_submit(args: argparse.Namespace, settings) -> int:
    from cli._run_checks import checked_options
    from cli._run_client import RunClient

    opts = _options(args)
    checked_options(opts)  # refused before any service or worker starts

    async def go() -> int:
        # A missing worker is started, not waited for: submit returns at once.
        client = await RunClient.open(settings, progress=ProgressPrinter(sys.stderr), wait_for_worker=False)
        workflow_id, existing = await client.submit(opts)
        print(workflow_id)
        if existing is not None:  # the same run sent again: it holds the id
            print(f"run {workflow_id} was started already ({existing}): not started again", file=sys.stderr)
        print(f"watch: {client.ui_link(workflow_id)}", file=sys.stderr)
        return 0

    return asyncio.run(go())


def _cmd_result(args: argparse.Namespace, settings) -> int:
    from cli import _run_by_id

    result = asyncio.run(_run_by_id.result(settings, args.run_id, ProgressPrinter(sys.stderr)))
    print_result(result, _run_by_id.ui_link(settings, result.workflow_id), as_json=args.json, settings=settings)
    return 0 if result.status == "completed" else 3


def _cmd_cancel(args: argparse.Namespace, settings) -> int:
    from cli import _run_by_id

    asyncio.run(_run_by_id.cancel(settings, args.run_id, args.reason))
    print(f"cancel requested for {args.run_id}")
    return 0


def _cmd_worker(args: argparse.Namespace, settings) -> int:
    from activities._tools_registry import ToolRegistrationError, ToolRegistry
    from cli._errors import UserError
    from sandbox_wasm import SandboxUnavailable
    from worker import run_worker

    try:
        ToolRegistry.from_setting(settings.tools)  # a bad tool stops the worker before it polls
    except ToolRegistrationError as exc:
        raise UserError(f"RLM_TOOLS: {exc}") from None
    try:
        asyncio.run(run_worker(settings))
    except SandboxUnavailable as exc:
        raise UserError(f"no sandbox can start here: {exc}") from None
    return 0


def print_result(result, link: str, *, as_json: bool, settings) -> None:
    """The result as `rlm run` / `rlm result` show it, its whole answer
    included up to WHOLE_ANSWER_MAX_BYTES (a result holds the first 64 KiB;
    the whole answer is at `answer_ref`)."""
    result, complete = with_whole_answer(result, settings)
    if as_json:
        # `answer_complete`: false when `answer` is only the head (see stderr).
        print(json.dumps({**result.model_dump(mode="json"), "answer_complete": complete, "ui": link}, indent=2))
        return
    if result.answer_value is not None:  # a typed answer: its JSON, normalised
        print(json_text(result.answer_value))
    else:
        print(printable(result.answer) if result.answer is not None else "(no answer)")
    spend = result.spend
    print(
        f"\nstatus: {result.status}" + (f" ({printable(result.reason)})" if result.reason else "")
        + f" | turns: {result.turns} | calls: {spend.calls} | tokens: {spend.tokens:,} | cost: ${spend.usd:.4f}",
        file=sys.stderr,
    )
    for name, u in result.usage.by_model.items():
        print(f"  {printable(name)}: {u.calls} calls, {u.prompt_tokens:,} in / {u.completion_tokens:,} out, ${u.usd:.4f}", file=sys.stderr)
    for depth, u in sorted(result.usage.by_depth.items()):
        print(f"  depth {depth}: {u.calls} calls, ${u.usd:.4f}", file=sys.stderr)
    if result.children:
        print(f"  child runs: {len(result.children)}", file=sys.stderr)
    if result.skipped_count:
        print(f"  unreadable files left out: {result.skipped_count}", file=sys.stderr)
        for skipped in result.skipped_documents[:20]:
            print(f"    {printable(skipped.name)}: {printable(skipped.reason)}", file=sys.stderr)
    print(f"run: {link}", file=sys.stderr)


WHOLE_ANSWER_MAX_BYTES = 64 << 20
"""The largest answer the CLI reads from object storage to print; a larger
one is shown by its head and where it is (a FINAL_VAR value may be GBs)."""


def with_whole_answer(result, settings):
    """`(result, complete)`: `result` with its whole answer, and whether the
    answer is whole. Past ANSWER_INLINE_BYTES a result holds the head inline
    and the whole answer in object storage (`answer_ref`): a report cut at
    64 KiB on the terminal lost the rest."""
    ref = result.answer_ref
    head = len(result.answer.encode()) if result.answer is not None else 0
    if ref is None or result.answer is None or head >= ref.size:
        return result, True
    where = f"s3://{settings.s3_bucket}/{ref.key}"
    if ref.size > WHOLE_ANSWER_MAX_BYTES:
        print(f"note: the answer has {ref.size:,} bytes; shown: its first {head:,}; all of it: {where}", file=sys.stderr)
        return result, False
    from activities.object_store import ObjectStore

    try:
        whole = ObjectStore.from_settings(settings).get_blob(ref).decode("utf-8", "replace")
    except Exception as exc:  # noqa: BLE001 - the head is still worth printing
        print(
            f"warning: the whole answer ({ref.size:,} bytes, {where}) could not be read: "
            f"{printable(str(exc)[:300])}; shown: its first {head:,} bytes",
            file=sys.stderr,
        )
        return result, False
    return result.model_copy(update={"answer": whole}), True
