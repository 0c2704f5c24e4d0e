"""Client side of a run: check its models, upload the context, start the
workflow, follow its progress, fetch its result.

Temporal is reached through its HTTP API (cli/_temporal_http.py) when it
answers, so `rlm run` and `rlm submit` do not import the SDK client (~0.35 s
of CPU); otherwise, or when a caller needs the SDK client itself
(schedules), through the SDK.

A client command never imports litellm (seconds of CPU): models are checked
here as far as their configuration decides (name configured, key variable
set, prices known); the worker checks the rest in the run's first step, and
a run that ends there is reported like a client-side error.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
from pydantic import ValidationError

from activities.local_model import LOCAL_MODEL_NAME
from activities.settings import Settings
from cli._pickup import sdk_waiting_task, watch_pickup
from cli._progress import ProgressPrinter
from cli._run_by_id import RunError, checked_result, embedded, follow_http, say_no_worker, ui_link
from cli._run_checks import RunOptions, checked_options
from cli._taken_id import REUSE_POLICY_JSON, check_taken, holder_http, holder_sdk
from cli._temporal_http import HttpApiError, HttpUnavailable, NotFound, TemporalHttp
from cli._workflow_kind import not_a
from workflows.budget import Caps
from workflows.names import QUERY_PROGRESS, SIGNAL_CANCEL, WORKFLOW_RLM_RUN
from workflows.refs import ContextRef
from workflows.request import ModelChoice, RunLimits, RunRequest, validation_errors
from workflows.result import RunResult
from workflows.summaries import run_static_details, run_static_summary

if TYPE_CHECKING:  # the SDK client is imported only when the HTTP API does not answer
    from temporalio.client import Client, WorkflowHandle

    from activities._context_upload import StagedContext
    from activities.object_store import ObjectStore

log = structlog.get_logger(__name__)


class RunClient:
    def __init__(
        self, settings: Settings, client: Client | None, progress: ProgressPrinter | None, *, http: TemporalHttp | None = None
    ) -> None:
        self.settings = settings
        self.client = client
        self.progress = progress
        self.http = http

    @classmethod
    async def open(
        cls,
        settings: Settings,
        *,
        progress: ProgressPrinter | None,
        start_services: bool = True,
        wait_for_worker: bool = True,
        sdk: bool = False,
    ) -> RunClient:
        """Connect; with `start_services`, first make sure the embedded services
        and worker run (`wait_for_worker`: until the worker polls). `sdk`: the
        caller uses `.client` (the SDK client) itself."""
        if start_services and embedded(settings):
            from cli import services

            await asyncio.to_thread(services.ensure_up, settings, wait_for_worker=wait_for_worker)
        if not sdk:
            http = TemporalHttp(settings)
            try:
                await asyncio.to_thread(http.check)
                return cls(settings, None, progress, http=http)
            except HttpUnavailable:
                pass
        from activities.temporal_client import connect

        try:
            client = await connect(settings)
        except Exception as exc:
            raise RunError(
                f"cannot reach Temporal at {settings.temporal_address}: {exc}; start it with `rlm up` "
                "or set RLM_TEMPORAL_ADDRESS"
            ) from None
        return cls(settings, client, progress)

    def ui_link(self, workflow_id: str) -> str:
        return ui_link(self.settings, workflow_id)

    # -- starting --------------------------------------------------------------
    def build_request(self, opts: RunOptions) -> RunRequest:
        """The run's request, once its context is stored."""
        request, upload = self.stage_request(opts)
        try:
            upload.wait()
        except Exception as exc:
            raise RunError(str(exc)) from None
        return request

    def stage_request(
        self, opts: RunOptions, *, start_first: bool = False, stop: threading.Event | None = None
    ) -> tuple[RunRequest, StagedContext]:
        """The run's request as soon as its context's reference is known;
        the upload may still run (activities/_context_upload.py). With
        `start_first`, and a copy for the embedded worker, nothing is sent
        before `release()`: the caller starts the run first. `stop` set
        (Ctrl-C): the reading ends at its next block."""
        opts, caps = checked_options(opts, self.progress)
        local_model = opts.model == LOCAL_MODEL_NAME
        from activities._context_upload import DEFAULT_CHUNK_BYTES, stage_files

        if self.progress:
            self.progress.note(f"uploading context ({(opts.context_bytes or 0) / 1e6:.1f} MB)")  # summed by checked_options
        # The embedded worker shares this machine and data dir: it finds the
        # context in its cache instead of downloading what we upload.
        copy_to = self.settings.context_cache_dir if embedded(self.settings) else None
        # The S3 client (~0.1 s to import) opens on a thread while the context
        # is read (which mostly releases the GIL) and before the run starts, so
        # that bad keys or no bucket stop it here, not a started run; or, when
        # these keys reached this bucket from here before, once it has started.
        hold = copy_to is not None and start_first
        later = hold and _s3_checked(self.settings)
        with ThreadPoolExecutor(1, thread_name_prefix="s3-open") as opener:
            opening = None if later else opener.submit(_open_store, self.settings)
            try:
                upload = stage_files(
                    (lambda: _open_store(self.settings)) if opening is None else opening.result,
                    DEFAULT_CHUNK_BYTES, opts.context_paths, on_unreadable=opts.on_unreadable,  # type: ignore[arg-type]
                    copy_to=copy_to, hold=hold, stop=stop,
                )  # fmt: skip
                if opening is not None:
                    opening.result()
            except Exception as exc:
                raise RunError(str(exc)) from None
        try:
            return self._request(opts, upload.ref, caps, local_model), upload
        except ValidationError as exc:  # what checked_options does not foresee
            raise RunError(f"invalid run request: {validation_errors(exc)}") from None

    @staticmethod
    def _request(opts: RunOptions, ref: ContextRef, caps: Caps, local_model: bool) -> RunRequest:
        return RunRequest(
            question=opts.question,
            context=ref,
            models=ModelChoice(root=opts.model, sub=opts.sub_model),
            caps=caps,
            # A 1.5B model on 2 cores reads ~50 tokens/s: a full window takes minutes.
            limits=RunLimits(
                cell_timeout_s=opts.cell_timeout_s,
                cell_memory_mb=opts.cell_memory_mb,
                model_call_timeout_s=900.0 if local_model else 300.0,
            ),
            answer_schema=opts.answer_schema,
            on_unreadable=opts.on_unreadable,
            tools=opts.tools,
        )

    async def start(self, request: RunRequest, workflow_id: str) -> str | None:
        """Start the run. None when it started; when the same request holds
        the id already (sent again: cli/_taken_id.py), that run's status."""
        if self.http is not None:
            return await self._start_http(self.http, request, workflow_id)
        from temporalio.common import WorkflowIDReusePolicy
        from temporalio.exceptions import WorkflowAlreadyStartedError

        try:
            await self.client.start_workflow(
                WORKFLOW_RLM_RUN,
                request,
                id=workflow_id,
                task_queue=self.settings.task_queue,
                result_type=RunResult,
                id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY,
                # What the Temporal UI shows for the run: question, context, models, caps.
                static_summary=run_static_summary(request),
                static_details=run_static_details(request),
            )
            return None
        except WorkflowAlreadyStartedError:
            pass
        return check_taken(workflow_id, request, await holder_sdk(self.client, workflow_id), what="run")

    async def _start_http(self, http: TemporalHttp, request: RunRequest, workflow_id: str) -> str | None:
        try:
            await asyncio.to_thread(
                http.start, WORKFLOW_RLM_RUN, request.model_dump(mode="json"), workflow_id=workflow_id,
                task_queue=self.settings.task_queue, summary=run_static_summary(request),
                details=run_static_details(request), id_reuse_policy=REUSE_POLICY_JSON,
            )  # fmt: skip
            return None
        except HttpApiError as exc:
            if not exc.already_exists:
                raise RunError(f"cannot start run {workflow_id}: {exc}") from None
        try:
            holder = await asyncio.to_thread(holder_http, http, workflow_id)
        except (HttpApiError, NotFound) as exc:
            raise RunError(f"cannot start run {workflow_id}: the workflow holding the id cannot be read ({exc})") from None
        return check_taken(workflow_id, request, holder, what="run")

    async def submit(self, opts: RunOptions) -> tuple[str, str | None]:
        """(run id, None) once started; (run id, its status) when the same
        run held the id already. Returns once the context is stored."""
        return opts.workflow_id, await self._start_staged(opts, start_first=False)

    async def run(self, opts: RunOptions, on_started: Callable[[str], None] | None = None) -> RunResult:
        """Start the run and wait for its result; `on_started(run id)` once it
        is started (from then on it runs whether or not this client waits)."""
        existing = await self._start_staged(opts, on_started, start_first=True)
        if self.progress:
            if existing is not None:
                self.progress.note(f"run {opts.workflow_id} was started already ({existing}): not started again")
            self.progress.note(f"run {opts.workflow_id}: {self.ui_link(opts.workflow_id)}")
        if self.http is not None:
            return await follow_http(self.http, self.settings, opts.workflow_id, self.progress)
        return await self._follow(self.client.get_workflow_handle(opts.workflow_id, result_type=RunResult))

    async def _start_staged(
        self, opts: RunOptions, on_started: Callable[[str], None] | None = None, *, start_first: bool
    ) -> str | None:
        """Start the run once its context is stored or, with `start_first`
        when the worker on this machine reads the copy written beside the
        upload, as soon as the context's reference is known (40 MB: ~0.2 s
        earlier; `rlm run`, which waits for the run anyway, while `rlm submit`
        is quickest overlapping the upload with the reading); either way
        return once the context is stored. A run started on a copy whose
        upload then fails is cancelled: no other worker could load it."""
        stop = threading.Event()
        try:
            request, upload = await asyncio.to_thread(
                functools.partial(self.stage_request, opts, start_first=start_first, stop=stop)
            )
        except asyncio.CancelledError:
            stop.set()  # Ctrl-C while a large context is read: stop reading (the command waits for that thread)
            raise
        if not (start_first and upload.local):
            await _stored(upload)
        try:
            existing = await self.start(request, opts.workflow_id)
        except (KeyboardInterrupt, asyncio.CancelledError):
            self._finish_upload(upload)  # the start may have gone through
            raise
        # (Refused: no run started, and nothing held back is sent.)
        if on_started is not None:
            on_started(opts.workflow_id)
        upload.release()
        try:
            await _stored(upload)
        except asyncio.CancelledError:
            self._finish_upload(upload)
            raise
        except RunError as exc:
            if existing is not None:  # not ours: the run holding the id has its own upload
                raise
            raise await self._cancel_for(opts.workflow_id, exc) from None
        return existing

    def _finish_upload(self, upload: StagedContext) -> None:
        """Interrupted once the run may have started: it goes on, and needs
        its context in the bucket (a second Ctrl-C leaves it to the copy here)."""
        if upload.local and self.progress:
            self.progress.note("finishing the context's upload: the run goes on and needs it")
        with contextlib.suppress(Exception):
            upload.wait()

    async def _cancel_for(self, workflow_id: str, failure: RunError) -> RunError:
        """The run started on the copy here, and its upload failed: no other
        worker could load it, so it is cancelled."""
        try:
            await self.cancel(workflow_id, f"context upload failed: {failure}")
        except Exception as exc:  # noqa: BLE001 - said, with what to do
            return RunError(
                f"{failure}; run {workflow_id} started on this machine's copy of its context and could not be "
                f"cancelled ({exc}): stop it with `rlm cancel {workflow_id}`"
            )
        return RunError(f"{failure}; run {workflow_id} is cancelled, as no worker elsewhere could load its context")

    # -- following -------------------------------------------------------------
    async def result(self, workflow_id: str) -> RunResult:
        if self.http is not None:
            return await follow_http(self.http, self.settings, workflow_id, self.progress)
        from temporalio.service import RPCError

        handle = self.client.get_workflow_handle(workflow_id, result_type=RunResult)
        try:
            workflow_type = (await handle.describe()).workflow_type
        except RPCError as exc:
            raise RunError(f"cannot read run {workflow_id}: {exc}") from None
        if problem := not_a(workflow_id, workflow_type, "run"):
            raise RunError(problem)  # a session's result would wait until it closes
        return await self._follow(handle)

    async def _follow(self, handle: WorkflowHandle) -> RunResult:
        from temporalio.client import WorkflowFailureError

        say = say_no_worker(self.settings, handle.id, self.progress)
        watchers = [asyncio.create_task(watch_pickup(lambda: sdk_waiting_task(handle), self.settings.no_worker_warning_s, say))]
        if self.progress:
            watchers.append(asyncio.create_task(self._watch(handle)))
        try:
            result = await handle.result()
        except WorkflowFailureError as exc:
            raise RunError(f"run {handle.id} failed: {exc.cause or exc}") from None
        finally:
            for watcher in watchers:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            if self.progress:
                self.progress.done()
        return checked_result(result)

    async def _watch(self, handle: WorkflowHandle) -> None:
        while True:
            with contextlib.suppress(Exception):
                state = await handle.query(QUERY_PROGRESS)
                self.progress.update(state)  # type: ignore[union-attr]
            await asyncio.sleep(0.5)

    async def cancel(self, workflow_id: str, reason: str | None) -> None:
        if self.http is not None:
            await asyncio.to_thread(self.http.signal, workflow_id, SIGNAL_CANCEL, reason)
            return
        await self.client.get_workflow_handle(workflow_id).signal(SIGNAL_CANCEL, reason)


def _open_store(settings: Settings) -> ObjectStore:
    """The S3 client, its bucket checked (made if missing); noted as working."""
    from activities.object_store import ObjectStore

    store = ObjectStore.from_settings(settings)
    try:
        store.ensure_bucket()
    except Exception:
        _s3_check_file(settings).unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):
        _s3_check_file(settings).write_text(_s3_identity(settings))
    return store


def _s3_checked(settings: Settings) -> bool:
    """These S3 keys reached this bucket from this machine before."""
    try:
        return _s3_check_file(settings).read_text() == _s3_identity(settings)
    except (OSError, ValueError):
        return False


def _s3_check_file(settings: Settings) -> Path:
    return settings.data_dir / "s3-checked"


def _s3_identity(settings: Settings) -> str:
    """A digest of the endpoint, bucket and keys (never the keys themselves)."""
    credentials = settings.s3_credentials() or ("", "")
    seen = "\0".join((settings.s3_endpoint, str(settings.s3_secure), settings.s3_bucket, *credentials))
    return hashlib.sha256(seen.encode()).hexdigest()


async def _stored(upload: StagedContext) -> None:
    try:
        await asyncio.to_thread(upload.wait)
    except Exception as exc:
        raise RunError(str(exc)) from None
