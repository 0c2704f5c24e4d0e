"""`rlm schedule create|list|pause|unpause|trigger|delete`: RLM runs on a
cron, as Temporal Schedules.

A schedule's action starts `RLMRun` with a `RunRequest` whose context is an
`s3://` URI, so each run's first step (`ingest_context`) reads the files
present under it when that run starts. The schedule id is NAME; its runs get
the workflow id `rlm-sched-NAME-<scheduled time>` (Temporal appends the time).
The cron text is kept in the schedule's memo: the server keeps only its
calendar form.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cli._errors import UserError
from cli.run_commands import answer_schema_from_file, caps_of, model_and_cap_arguments

if TYPE_CHECKING:  # temporalio and the run client load only when a command runs
    from temporalio.client import Client, ScheduleDescription

    from workflows.request import RunRequest

__all__ = ["WORKFLOW_ID_PREFIX", "register", "schedule_request"]

WORKFLOW_ID_PREFIX = "rlm-sched-"
OVERLAP_CHOICES = ("skip", "buffer_one", "buffer_all", "cancel_other", "terminate_other", "allow_all")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_MEMO_CRON = "rlm_cron"
# Temporal's bounds of a catchup window (its shortest is 10 s; a year is its default).
_MIN_CATCHUP_S, _MAX_CATCHUP_S = 10.0, 366 * 86_400.0
# How long `trigger` waits for the schedule to report the run it started.
_TRIGGER_WAIT_S = 30.0
# Request fields as the user spells them on the command line (caps.X is --X).
_FLAGS = {
    "question": "QUESTION",
    "models.root": "--model",
    "models.sub": "--sub-model",
    "caps": "--max-turns",  # the one check over the caps as a whole: a run needs a turn
    "caps.max_wall_s": "--max-wall",
    "limits.cell_timeout_s": "--cell-timeout",
    "tools": "--tool",
}


def register(sub: argparse._SubParsersAction) -> None:
    schedule = sub.add_parser("schedule", help="run an RLM job on a cron (Temporal Schedules)")
    commands = schedule.add_subparsers(dest="schedule_command", required=True, metavar="SUBCOMMAND")

    create = commands.add_parser("create", help="create a schedule of RLM runs over s3:// files")
    create.add_argument("name", help="schedule id; its runs are named rlm-sched-NAME-<time>")
    create.add_argument("question")
    create.add_argument("--cron", required=True, metavar="EXPR", help='cron expression, e.g. "0 6 * * 1-5"')
    create.add_argument("--context", required=True, metavar="S3_URI",
                        help="s3://bucket/key or s3://bucket/prefix/: read afresh at each run's start")
    model_and_cap_arguments(create)  # the flags of `rlm run`, one list for both
    create.add_argument("--skip-unreadable", action="store_true",
                        help="at each run, leave out files that cannot be converted to text (listed in "
                             "its result) instead of failing the run")
    create.add_argument("--answer-schema", type=Path, default=None, metavar="FILE",
                        help="a JSON Schema file: each run's answer must be JSON that validates")
    create.add_argument("--overlap", choices=OVERLAP_CHOICES, default="skip",
                        help="when a run is due while the last still runs (default: skip it)")
    create.add_argument("--catchup-window", type=float, default=None, metavar="SECONDS",
                        help="how late a run missed while Temporal was down may still start (default: the "
                             "shortest time between two of its runs, so an outage costs at most one late run)")
    create.add_argument("--time-zone", default=None, help="IANA zone of the cron (default UTC)")
    create.add_argument("--paused", action="store_true", help="create it paused")
    create.set_defaults(handler=_cmd_create)

    listing = commands.add_parser("list", help="list RLM schedules")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=_cmd_list)

    for verb, text in (("pause", "stop starting runs"), ("unpause", "start runs again")):
        p = commands.add_parser(verb, help=text)
        p.add_argument("name")
        p.add_argument("--note", default=None)
        p.set_defaults(handler=_cmd_pause_or_unpause, pause=verb == "pause")

    trigger = commands.add_parser("trigger", help="start a run now and print its workflow id")
    trigger.add_argument("name")
    trigger.set_defaults(handler=_cmd_trigger)

    delete = commands.add_parser("delete", help="delete a schedule (runs already started go on)")
    delete.add_argument("name")
    delete.set_defaults(handler=_cmd_delete)


# -- the request -----------------------------------------------------------------
def schedule_request(args: argparse.Namespace) -> RunRequest:
    """The RunRequest every run of the schedule starts with, checked here so a
    mistake shows at `create`, not at the first run."""
    from pydantic import ValidationError

    from activities.local_model import LOCAL_MODEL_NAME
    from cli._context_fit import CELL_MEMORY_FLAG
    from cli._run_checks import check_models, choose_models
    from workflows.request import ModelChoice, RunLimits, RunRequest, cell_memory_problem, validation_errors

    if not args.context.startswith("s3://"):
        raise UserError(
            f"--context {args.context!r}: a schedule reads its files at each run's start, so give "
            "s3://bucket/key or s3://bucket/prefix/ (upload local files first, e.g. with `aws s3 cp`)"
        )
    root, sub = choose_models(args.model, args.sub_model, None)
    local = root == LOCAL_MODEL_NAME
    caps = caps_of(args)
    if caps["max_concurrency"] is None and local:
        caps["max_concurrency"] = 1  # one llama.cpp server answers one call at a time
    answer_schema = answer_schema_from_file(args.answer_schema)
    if args.cell_memory is not None and (problem := cell_memory_problem(args.cell_memory, CELL_MEMORY_FLAG)):
        raise UserError(problem)  # each run would be refused at its start
    try:
        request = RunRequest(
            question=args.question,
            context={"uri": args.context},
            models=ModelChoice(root=root, sub=sub),
            caps={k: v for k, v in caps.items() if v is not None},
            limits=RunLimits(
                cell_timeout_s=args.cell_timeout,
                **({"cell_memory_mb": args.cell_memory} if args.cell_memory is not None else {}),
                model_call_timeout_s=900.0 if local else 300.0,
            ),
            answer_schema=answer_schema,
            on_unreadable="skip" if args.skip_unreadable else "fail",
            tools=list(args.tools),
        )
    except ValidationError as exc:
        raise UserError(_flag_names(validation_errors(exc))) from None
    check_models(request.models.root, request.models.sub_model(), request.caps, thorough=True)
    return request


def _flag_names(errors: str) -> str:
    """`caps.max_usd: ...` -> `--max-usd: ...`, as the user typed it."""
    out = []
    for part in errors.split("; "):
        field, sep, message = part.partition(": ")
        flag = "--context" if field.startswith("context") else _FLAGS.get(field)
        if flag is None and field.startswith("caps."):
            flag = "--" + field.removeprefix("caps.").replace("_", "-")
        out.append(f"{flag or field}{sep}{message}")
    return "invalid schedule: " + "; ".join(out)


def _check_name(name: str) -> str:
    if not _NAME.match(name):
        raise UserError(f"schedule name {name[:120]!r}: use letters, digits, '.', '_' or '-' (at most 100)")
    return name


# -- commands --------------------------------------------------------------------
async def _client(settings, *, start_services: bool) -> Client:
    from cli._run_client import RunClient

    # Scheduled runs need a worker: `create` and `trigger` start the embedded
    # one (without waiting for it) as `rlm submit` does.
    opened = await RunClient.open(settings, progress=None, start_services=start_services, wait_for_worker=False, sdk=True)
    return opened.client


def _cmd_create(args: argparse.Namespace, settings) -> int:
    from temporalio.client import (
        Schedule, ScheduleActionStartWorkflow, ScheduleAlreadyRunningError, ScheduleOverlapPolicy,
        SchedulePolicy, ScheduleSpec, ScheduleState,
    )  # fmt: skip
    from temporalio.service import RPCError

    from workflows.names import WORKFLOW_RLM_RUN

    name = _check_name(args.name)
    if args.catchup_window is not None and not _MIN_CATCHUP_S <= args.catchup_window <= _MAX_CATCHUP_S:
        raise UserError(
            f"--catchup-window {args.catchup_window:g}: give {_MIN_CATCHUP_S:g} to {_MAX_CATCHUP_S:,.0f} seconds (a year)"
        )
    request = schedule_request(args)
    schedule = Schedule(
        action=ScheduleActionStartWorkflow(
            WORKFLOW_RLM_RUN,
            request,
            id=WORKFLOW_ID_PREFIX + name,
            task_queue=settings.task_queue,
            static_summary=f"RLM schedule {name}: {request.question[:150]}",
        ),
        spec=ScheduleSpec(cron_expressions=[args.cron], time_zone_name=args.time_zone),
        policy=SchedulePolicy(
            overlap=ScheduleOverlapPolicy[args.overlap.upper()],
            catchup_window=timedelta(seconds=args.catchup_window) if args.catchup_window is not None else None,
        ),
        state=ScheduleState(paused=args.paused, note="created paused" if args.paused else None),
    )

    async def go() -> int:
        client = await _client(settings, start_services=True)
        try:
            await client.create_schedule(name, schedule, memo={_MEMO_CRON: args.cron})
        except ScheduleAlreadyRunningError:
            raise UserError(f"schedule {name!r} exists: delete it first (`rlm schedule delete {name}`)") from None
        except RPCError as exc:
            what = f"--cron {args.cron!r}" + (f" / --time-zone {args.time_zone!r}" if args.time_zone else "")
            raise UserError(f"{what} refused by Temporal: {exc.message}") from None
        # Temporal takes a cron that matches no date ("0 6 30 2 *": 30
        # February) and the schedule would wait silently forever: refuse it
        # here, where the mistake can still be seen (paused ones list theirs too).
        handle = client.get_schedule_handle(name)
        upcoming = (await handle.describe()).info.next_action_times
        if not upcoming:
            await handle.delete()
            raise UserError(f"--cron {args.cron!r} never fires: it matches no date (check the day and month)")
        if args.catchup_window is None:
            try:
                await handle.update(lambda given: _with_catchup_window(given.description.schedule, upcoming))
            except RPCError as exc:
                await handle.delete()  # not left with Temporal's year-long window
                raise UserError(f"schedule {name!r} not created: setting its catchup window: {exc.message}") from None
        print(name)
        print(f"runs: {WORKFLOW_ID_PREFIX}{name}-<time>, reading {request.context.uri} at each start", file=sys.stderr)
        return 0

    return asyncio.run(go())


def _with_catchup_window(schedule: Any, upcoming: list[datetime]) -> Any:
    """`schedule` with the default catchup window: the shortest time between
    two of its upcoming runs (the ~10 Temporal lists), so an outage costs at
    most one late run. Temporal's own default (a year) starts every run
    missed while the server was down once it is back: after a day down, a
    schedule firing each minute under buffer_all or allow_all would start
    1,440 paid runs."""
    from temporalio.client import ScheduleUpdate

    gaps = [(b - a).total_seconds() for a, b in zip(upcoming, upcoming[1:])]
    seconds = min(gaps, default=_MAX_CATCHUP_S)
    schedule.policy.catchup_window = timedelta(seconds=min(max(seconds, _MIN_CATCHUP_S), _MAX_CATCHUP_S))
    return ScheduleUpdate(schedule=schedule)


def _cmd_list(args: argparse.Namespace, settings) -> int:
    async def go() -> int:
        client = await _client(settings, start_services=False)
        rows = []
        # The list comes from the visibility store; each schedule is then
        # described for its current state (a pause shows at once there).
        async for entry in await client.list_schedules():
            row = await _describe(client, entry.id)
            if row is not None:
                rows.append(row)
        rows.sort(key=lambda r: r["name"])
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            _print_rows(rows)
        return 0

    return asyncio.run(go())


def _cmd_pause_or_unpause(args: argparse.Namespace, settings) -> int:
    async def go() -> int:
        client = await _client(settings, start_services=False)
        handle = client.get_schedule_handle(args.name)
        note = args.note or f"{'paused' if args.pause else 'unpaused'} with `rlm schedule`"
        await _or_not_found(args.name, handle.pause(note=note) if args.pause else handle.unpause(note=note))
        print(f"{'paused' if args.pause else 'unpaused'} {args.name}")
        return 0

    return asyncio.run(go())


def _cmd_trigger(args: argparse.Namespace, settings) -> int:
    async def go() -> int:
        client = await _client(settings, start_services=True)
        handle = client.get_schedule_handle(args.name)
        before = await _or_not_found(args.name, handle.describe())
        started, skipped = before.info.num_actions, before.info.num_actions_skipped_overlap
        buffered = before.raw_description.info.buffer_size
        await handle.trigger()
        # The schedule starts the run on its own: wait until it reports it.
        deadline = asyncio.get_running_loop().time() + _TRIGGER_WAIT_S
        while asyncio.get_running_loop().time() < deadline:
            now = await handle.describe()
            if now.info.num_actions > started:
                newest = max(now.info.recent_actions, key=lambda a: a.started_at)
                print(newest.action.workflow_id)
                return 0
            if now.info.num_actions_skipped_overlap > skipped:
                raise UserError(f"schedule {args.name!r} skipped the run: its last run still runs (overlap policy)")
            overlap = now.schedule.policy.overlap.name.lower()
            if overlap.startswith("buffer_") and now.raw_description.info.buffer_size > buffered:
                # The run starts when the running one ends, maybe hours from
                # now: said at once, not as a lost trigger (triggering again
                # would queue one more paid run). cancel_other/terminate_other
                # also buffer, for a moment: their run's id is worth the wait.
                running = ", ".join(a.workflow_id for a in now.info.running_actions) or "the running run"
                again = "queues one more run" if overlap == "buffer_all" else "is skipped while this one waits"
                print(
                    f"queued: schedule {args.name!r} starts the run when {running} ends "
                    f"(overlap {overlap}); triggering again {again}",
                    file=sys.stderr,
                )
                return 0
            await asyncio.sleep(0.2)
        # Temporal names a schedule's runs by the second they start: a second
        # trigger in the same second is dropped as a duplicate of the first.
        raise UserError(
            f"schedule {args.name!r} reported no new run within {_TRIGGER_WAIT_S:g} s of the trigger: another "
            "run of it may have started in the same second (runs are named by the second), or the server is slow; "
            "see `rlm schedule list`, and trigger again if no run is listed"
        )

    return asyncio.run(go())


def _cmd_delete(args: argparse.Namespace, settings) -> int:
    async def go() -> int:
        client = await _client(settings, start_services=False)
        await _or_not_found(args.name, client.get_schedule_handle(args.name).delete())
        print(f"deleted {args.name}")
        return 0

    return asyncio.run(go())


# -- reading schedules -----------------------------------------------------------
async def _or_not_found(name: str, call) -> Any:
    from temporalio.service import RPCError, RPCStatusCode

    try:
        return await call
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            raise UserError(f"no schedule named {name!r} (see `rlm schedule list`)") from None
        raise UserError(f"schedule {name!r}: {exc.message}") from None


async def _describe(client: Client, name: str) -> dict[str, Any] | None:
    """One schedule as a row, or None if it is gone or does not start RLM runs."""
    from temporalio.client import ScheduleActionStartWorkflow
    from temporalio.service import RPCError

    from workflows.names import WORKFLOW_RLM_RUN
    from workflows.request import RunRequest

    try:
        desc: ScheduleDescription = await client.get_schedule_handle(name).describe()
    except RPCError:
        return None  # deleted since it was listed
    action = desc.schedule.action
    if not isinstance(action, ScheduleActionStartWorkflow) or action.workflow != WORKFLOW_RLM_RUN:
        return None
    try:
        [request] = await client.data_converter.decode(list(action.args), [RunRequest])
    except Exception:
        request = None  # made by hand with another input: still list it
    try:
        memo = await desc.memo()
    except Exception:
        memo = {}  # written by a client with a codec of its own (encryption): list it without its cron
    context = getattr(request.context, "uri", None) if request is not None else None
    return {
        "name": desc.id,
        "cron": memo.get(_MEMO_CRON),
        "question": request.question if request is not None else None,
        "context": context,
        "model": request.models.root if request is not None else None,
        "task_queue": action.task_queue,
        "overlap": desc.schedule.policy.overlap.name.lower(),
        "catchup_window_s": window.total_seconds() if (window := desc.schedule.policy.catchup_window) else None,
        "paused": desc.schedule.state.paused,
        "note": desc.schedule.state.note or None,
        "runs": desc.info.num_actions,
        "skipped_overlap": desc.info.num_actions_skipped_overlap,
        "queued": desc.raw_description.info.buffer_size,  # buffered by the overlap policy, not started yet
        "running": [a.workflow_id for a in desc.info.running_actions],
        "recent": [
            {"workflow_id": a.action.workflow_id, "scheduled_at": _iso(a.scheduled_at),
             "started_at": _iso(a.started_at)}
            for a in desc.info.recent_actions
        ],  # fmt: skip
        "next": [_iso(t) for t in desc.info.next_action_times[:3]],
    }


def _iso(when: datetime | None) -> str | None:
    return when.isoformat() if when is not None else None


def _print_rows(rows: list[dict[str, Any]]) -> None:
    # A schedule's name, note and context are text any Temporal client may
    # write: `printable` keeps their escape sequences off the terminal, and
    # a newline in them is shown, not obeyed (it would forge a row).
    from activities.terminal_text import printable

    def one_line(text: str) -> str:
        return printable(text).replace("\r\n", "\\r\\n").replace("\n", "\\n").replace("\t", "\\t")

    if not rows:
        print("no schedules (create one with `rlm schedule create NAME --cron EXPR QUESTION --context s3://...`)")
        return
    for r in rows:
        state = "paused" + (f" ({r['note']})" if r["note"] else "") if r["paused"] else "active"
        nxt = r["next"][0] if r["next"] and not r["paused"] else "-"
        queued = f" (+{r['queued']} queued)" if r["queued"] else ""
        line = f"{r['name']}  [{state}]  cron {r['cron']!r}  overlap {r['overlap']}  runs {r['runs']}{queued}  next {nxt}"
        print(one_line(line))
        print("    " + one_line(f"{r['question']!r} over {r['context']}"))
