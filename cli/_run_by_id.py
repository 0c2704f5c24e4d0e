"""A started run, by its id: wait for its result, or ask it to cancel.

`rlm result` and `rlm cancel` read and signal over the Temporal HTTP API
(cli/_temporal_http.py) and never import the SDK client, whose import is
most of a client command's start; when the HTTP API does not answer, the
same calls go through the SDK client (cli/_run_client.py). Both ways show
the same progress line, the same "no worker" note and the same errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

from activities.settings import Settings
from cli._errors import UserError
from cli._pickup import no_worker_message, watch_pickup
from cli._progress import ProgressPrinter
from cli._temporal_http import (
    HttpApiError,
    HttpUnavailable,
    NotFound,
    TemporalHttp,
    close_outcome,
    waiting_task_key,
    workflow_type_name,
)
from cli._workflow_kind import kind_of, not_a
from workflows.names import QUERY_PROGRESS, SIGNAL_CANCEL

if TYPE_CHECKING:
    from workflows.result import RunResult

__all__ = ["RunError", "cancel", "checked_result", "embedded", "follow_http", "result", "say_no_worker", "ui_link"]

_PROGRESS_POLL_S = 0.5
# An overloaded server answers a long poll with "Workflow is busy": ask again.
_BUSY_RETRY_S = 0.5


class RunError(UserError):
    """An expected failure, shown to the user as one line."""


def ui_link(settings: Settings, workflow_id: str) -> str:
    """The run's page in the Temporal Web UI."""
    ns = quote(settings.temporal_namespace, safe="")
    return f"{settings.temporal_ui_url}/namespaces/{ns}/workflows/{quote(workflow_id, safe='')}"


def embedded(settings: Settings) -> bool:
    """Both services on this machine: `rlm run` may start them itself."""
    return all(
        host in ("127.0.0.1", "localhost", "::1") for host in (settings.temporal_host, settings.s3_host)
    )


def checked_result(result: RunResult) -> RunResult:
    """The result, unless the run was refused before its first turn (unknown
    model, missing key, budget too small): the worker's check of what the
    client could not check, reported like a client-side error."""
    if result.turns == 0 and result.status in ("failed", "budget_exhausted") and result.answer is None:
        raise RunError(result.reason or f"run {result.workflow_id} ended with status {result.status}")
    return result


def say_no_worker(settings: Settings, workflow_id: str, progress: ProgressPrinter | None) -> Callable[[float], None]:
    def say(waited_s: float) -> None:
        text = no_worker_message(settings, workflow_id, waited_s, embedded=embedded(settings))
        if progress:
            progress.note(text)
        else:
            sys.stderr.write(text + "\n")

    return say


async def result(settings: Settings, workflow_id: str, progress: ProgressPrinter | None) -> RunResult:
    """Wait for the run (through continue-as-new) and return its result."""
    http = TemporalHttp(settings)
    try:
        described = await asyncio.to_thread(http.describe, workflow_id)
    except HttpUnavailable:
        from cli._run_client import RunClient

        client = await RunClient.open(settings, progress=progress, start_services=False, sdk=True)
        return await client.result(workflow_id)
    except NotFound:
        raise RunError(f"no run {workflow_id} in namespace {settings.temporal_namespace}") from None
    except HttpApiError as exc:
        raise RunError(f"cannot read run {workflow_id}: {exc}") from None
    if problem := not_a(workflow_id, workflow_type_name(described), "run"):
        raise RunError(problem)  # a session's result would wait until it closes
    return await follow_http(http, settings, workflow_id, progress)


async def follow_http(http: TemporalHttp, settings: Settings, workflow_id: str, progress: ProgressPrinter | None) -> RunResult:
    async def waiting_task():
        return waiting_task_key(await asyncio.to_thread(http.describe, workflow_id))

    say = say_no_worker(settings, workflow_id, progress)
    watchers = [asyncio.create_task(watch_pickup(waiting_task, settings.no_worker_warning_s, say))]
    if progress:
        watchers.append(asyncio.create_task(_watch(http, workflow_id, progress)))
    try:
        while True:
            try:
                event = await _in_daemon_thread(http.close_event, workflow_id)
            except HttpApiError as exc:
                if not exc.transient:
                    raise RunError(f"cannot read run {workflow_id}: {exc}") from None
                await asyncio.sleep(_BUSY_RETRY_S)
                continue
            if event is None:
                continue  # the long poll ended before the run did
            outcome, value = close_outcome(event)
            if outcome == "continued":
                continue  # the chain goes on in a new run under the same id
            if outcome == "failed":
                raise RunError(f"run {workflow_id} failed: {value}")
            break
    finally:
        for watcher in watchers:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        if progress:
            progress.done()
    from workflows.result import RunResult

    return checked_result(RunResult.model_validate(value))


T = TypeVar("T")


async def _in_daemon_thread(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in a daemon thread of its own. For the long poll (up to
    ~20 s): `asyncio.run` joins its executor's threads on the way out, so
    after Ctrl-C the command sat until the poll returned."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(value: Any, exc: BaseException | None) -> None:
        if future.done():  # the waiter was cancelled
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(value)

    def target() -> None:
        try:
            value, exc = fn(*args), None
        except BaseException as error:  # noqa: BLE001 - handed to the waiter
            value, exc = None, error
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(settle, value, exc)

    threading.Thread(target=target, name="rlm-long-poll", daemon=True).start()
    return await future


async def _watch(http: TemporalHttp, workflow_id: str, progress: ProgressPrinter) -> None:
    while True:
        with contextlib.suppress(Exception):  # a query fails while no worker serves the run
            state = await asyncio.to_thread(http.query, workflow_id, QUERY_PROGRESS)
            if isinstance(state, dict):
                progress.update(state)
        await asyncio.sleep(_PROGRESS_POLL_S)


async def cancel(settings: Settings, workflow_id: str, reason: str | None) -> None:
    """Signal the run to cancel itself (and its child runs)."""
    try:
        await asyncio.to_thread(TemporalHttp(settings).signal, workflow_id, SIGNAL_CANCEL, reason)
    except HttpUnavailable:
        from cli._run_client import RunClient

        client = await RunClient.open(settings, progress=None, start_services=False, sdk=True)
        await client.cancel(workflow_id, reason)
    except NotFound:
        raise RunError(await asyncio.to_thread(_nothing_to_cancel, settings, workflow_id)) from None
    except HttpApiError as exc:
        raise RunError(f"cannot cancel run {workflow_id}: {exc}") from None


def _nothing_to_cancel(settings: Settings, workflow_id: str) -> str:
    """Why a cancel found nothing running: the id names nothing, or a run
    or session that has ended (a signal to it is "not found" as well)."""
    try:
        described = TemporalHttp(settings).describe(workflow_id)
    except (NotFound, HttpApiError, HttpUnavailable):
        return f"no run {workflow_id} in namespace {settings.temporal_namespace}"
    kind = kind_of(workflow_type_name(described))
    how = f" (`rlm result {workflow_id}` says how)" if kind == "run" else ""
    return f"{kind} {workflow_id} has ended: nothing to cancel{how}"
