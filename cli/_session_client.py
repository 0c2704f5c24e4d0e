"""Client side of a session: start it (context uploaded, models checked as
for a run), ask it questions, close it. Used by `rlm session ...` and
`rlm chat`; like every client command it never imports litellm or wasmtime.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from temporalio.client import (
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.exceptions import ApplicationError, CancelledError, TerminatedError, WorkflowAlreadyStartedError
from pydantic import ValidationError
from temporalio.service import RPCError, RPCStatusCode

from activities.settings import Settings
from activities.temporal_client import refused_for_now, until_admitted
from cli._progress import ProgressPrinter
from cli._run_checks import RunOptions
from cli._run_client import RunClient, RunError
from cli._taken_id import check_taken, holder_sdk
from cli._workflow_kind import not_a
from workflows.names import (
    ASK_ANSWERED_ALREADY,
    QUERY_PROGRESS,
    QUERY_SESSION,
    UPDATE_ASK,
    UPDATE_CLOSE,
    WORKFLOW_RLM_SESSION,
)
from workflows.request import RunLimits, validation_errors
from workflows.result import RunResult
from workflows.session_models import AskRequest, SessionCaps, SessionRequest, SessionSummary
from workflows.session_questions import ask_id_reused
from workflows.summaries import clip

# How long an ask refused for now (others waiting hold the session's in-flight
# update payloads) is sent again before the refusal is reported.
ASK_ADMIT_WAIT_S = 300.0


@dataclass
class SessionOptions:
    context_paths: list[Path]
    model: str | None
    sub_model: str | None
    question_caps: dict[str, Any] = field(default_factory=dict)
    session_caps: dict[str, Any] = field(default_factory=dict)
    cell_timeout_s: float = 120.0
    cell_memory_mb: int = RunLimits().cell_memory_mb
    tools: list[str] = field(default_factory=list)
    continue_after_questions: int = 100
    session_id: str = field(default_factory=lambda: f"rlm-session-{uuid.uuid4().hex[:12]}")


class SessionClient:
    def __init__(self, runs: RunClient) -> None:
        self.runs = runs
        self.client = runs.client
        self.progress = runs.progress

    @classmethod
    async def open(cls, settings: Settings, *, progress: ProgressPrinter | None, start_services: bool = True) -> SessionClient:
        # Sessions use updates, which the SDK client sends (not the HTTP API).
        return cls(await RunClient.open(settings, progress=progress, start_services=start_services, sdk=True))

    def ui_link(self, workflow_id: str) -> str:
        return self.runs.ui_link(workflow_id)

    # -- starting --------------------------------------------------------------
    def build_request(self, opts: SessionOptions) -> SessionRequest:
        # The same checks and upload as a run's: a session is runs over one context.
        run = self.runs.build_request(
            RunOptions(
                question="(session)",
                context_paths=opts.context_paths,
                model=opts.model,
                sub_model=opts.sub_model,
                caps=opts.question_caps,
                cell_timeout_s=opts.cell_timeout_s,
                cell_memory_mb=opts.cell_memory_mb,
                tools=opts.tools,
            )
        )
        try:
            caps = SessionCaps(**{k: v for k, v in opts.session_caps.items() if v is not None})
        except ValueError as exc:
            raise RunError(f"session caps: {exc}") from None
        return SessionRequest(
            context=run.context,
            models=run.models,
            caps=caps,
            question_caps=run.caps,
            limits=run.limits,
            tools=run.tools,
            continue_after_questions=opts.continue_after_questions,
        )

    async def start(self, opts: SessionOptions) -> tuple[str, str | None]:
        """(session id, None) once started; (session id, its status) when the
        same session is open under the id already (sent again: cli/_taken_id.py)."""
        request = await asyncio.to_thread(self.build_request, opts)
        try:
            await self.client.start_workflow(
                WORKFLOW_RLM_SESSION,
                request,
                id=opts.session_id,
                task_queue=self.runs.settings.task_queue,
                result_type=SessionSummary,
                static_summary=f"session · {request.models.root} · context {request.context.sha256[:12]}"[:200],
            )
            return opts.session_id, None
        except WorkflowAlreadyStartedError:
            pass
        return opts.session_id, check_taken(opts.session_id, request, await holder_sdk(self.client, opts.session_id), what="session")

    # -- asking and closing ------------------------------------------------------
    async def ask(
        self,
        session_id: str,
        question: str,
        caps: dict[str, Any] | None = None,
        answer_schema: dict | None = None,
        ask_id: str | None = None,
    ) -> RunResult:
        """The answer to `question`. `ask_id` (the update id; a new one by
        default) makes the ask idempotent: sent again under it, it returns
        the first answer, also after the session continued as new (for its
        last 50 questions)."""
        try:
            ask = AskRequest(question=question, caps=caps or {}, answer_schema=answer_schema)
        except ValidationError as exc:
            raise RunError(f"ask: {validation_errors(exc)}") from None
        handle = await self._session(session_id)
        watcher = asyncio.create_task(self._watch(handle)) if self.progress else None
        keyed = ask_id is not None
        try:
            # One id for every send: an ask the server refused for now (RESOURCE_EXHAUSTED:
            # others waiting hold its in-flight update payloads) is sent again, never run twice.
            ask_id = ask_id or f"ask-{uuid.uuid4().hex}"
            result = await until_admitted(
                lambda: handle.execute_update(UPDATE_ASK, ask, id=ask_id, result_type=RunResult), ASK_ADMIT_WAIT_S
            )
            if keyed:  # Temporal answers an id sent again with its first outcome, whatever was asked
                await _check_same_question(handle, ask_id, question)
            return result
        except WorkflowUpdateFailedError as exc:
            if (answered_by := _answered_by(exc)) is not None:
                # Sent again after the session continued as new: the run that answered it holds the answer.
                try:
                    return await self.client.get_workflow_handle(answered_by, result_type=RunResult).result()
                except Exception as again:
                    raise RunError(f"session {session_id}: {_cause(exc)}; reading it: {again}") from None
            if _cut_off(exc) and (why := await _why_ended(handle)):
                raise RunError(f"session {session_id} ended before answering: {why}") from None
            raise RunError(f"session {session_id}: {_cause(exc)}") from None
        except RPCError as exc:
            why = await _why_ended(handle)
            if why is None and refused_for_now(exc):
                # Refused to the end of our wait, yet perhaps taken: the server may
                # refuse an ask it had handed the session already, which answers it
                # (refused_for_now). Asked again under a new key, it could run twice.
                raise RunError(
                    f"session {session_id} refused the ask for now for {ASK_ADMIT_WAIT_S:.0f} s ({exc.message}); "
                    f"it may have taken it even so: the same ask with its key (`--ask-id {ask_id}`) "
                    "waits for that answer instead of asking again"
                ) from None
            raise RunError(f"session {session_id} is not open: {why or exc}") from None
        except WorkflowUpdateRPCTimeoutOrCancelledError:
            raise _cancelled_or(
                f"session {session_id}: no answer from Temporal in time; the same ask with its key "
                f"(`--ask-id {ask_id}`) waits for the answer without asking again"
            ) from None
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
                self.progress.done()  # type: ignore[union-attr]

    async def close(self, session_id: str) -> SessionSummary:
        handle = await self._session(session_id)
        closed: SessionSummary | None = None
        try:
            closed = await handle.execute_update(UPDATE_CLOSE, result_type=SessionSummary)
        except WorkflowUpdateFailedError as exc:
            if not _cut_off(exc):
                raise RunError(f"session {session_id}: {_cause(exc)}") from None
            # The session ended (terminated) while the close waited: its result says how.
        except WorkflowUpdateRPCTimeoutOrCancelledError:
            raise _cancelled_or(f"session {session_id}: no answer from Temporal in time; close it again") from None
        except RPCError:
            pass  # ended before (closed): its result is the summary
        try:
            return await handle.result()
        except RPCError as exc:
            raise RunError(f"session {session_id}: {exc}") from None
        except WorkflowFailureError as exc:
            if closed is not None and _ended_from_outside(exc):  # a cancel overtook the close, which had its summary
                return closed
            raise RunError(f"session {session_id} ended without a summary: {_ended_how(exc)}") from None

    async def summary(self, session_id: str) -> SessionSummary:
        handle = await self._session(session_id)
        try:
            return await handle.query(QUERY_SESSION, result_type=SessionSummary)
        except RPCError as exc:
            raise RunError(f"session {session_id}: {exc}") from None

    def _handle(self, session_id: str) -> WorkflowHandle:
        return self.client.get_workflow_handle(session_id, result_type=SessionSummary)

    async def _session(self, session_id: str) -> WorkflowHandle:
        """The session's handle, once the id is known to name a session."""
        handle = self._handle(session_id)
        try:
            described = await handle.describe()
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                raise RunError(f"no session {session_id} in namespace {self.runs.settings.temporal_namespace}") from None
            raise RunError(f"session {session_id}: {exc}") from None
        if problem := not_a(session_id, described.workflow_type, "session"):
            raise RunError(problem)
        return handle

    async def _watch(self, handle: WorkflowHandle) -> None:
        """Show the progress of the question being answered (its own run)."""
        with contextlib.suppress(Exception):
            summary = await handle.query(QUERY_SESSION, result_type=SessionSummary)
            run = self.client.get_workflow_handle(f"{handle.id}/q{summary.questions + 1}")
            while True:
                with contextlib.suppress(Exception):
                    self.progress.update(await run.query(QUERY_PROGRESS))  # type: ignore[union-attr]
                await asyncio.sleep(0.5)


async def _why_ended(handle: WorkflowHandle) -> str | None:
    """How a session that refused an ask ended (closed, cancelled, failed and
    why), or None when it has not ended."""
    try:
        if (await handle.describe()).status == WorkflowExecutionStatus.RUNNING:
            return None
        await handle.result()
    except WorkflowFailureError as exc:
        return _ended_how(exc)
    except Exception:  # noqa: BLE001 - the refusal's own message stands
        return None
    return "it was closed; start a new session"


async def _check_same_question(handle: WorkflowHandle, ask_id: str, question: str) -> None:
    """Refuse an answer Temporal gave from an earlier ask under the same id
    that asked something else (the session's validator refuses that once it
    continued as new; within one run the server answers without asking it)."""
    try:
        summary: SessionSummary = await handle.query(QUERY_SESSION, result_type=SessionSummary)
    except RPCError:
        return  # ended meanwhile: nothing to check against
    done = next((r for r in summary.recent if r.ask_id == ask_id), None)
    if done is not None and not done.asks(question):
        raise RunError(f"session {handle.id}: {ask_id_reused(ask_id, done)}")


def _cancelled_or(message: str) -> BaseException:
    """What to raise for WorkflowUpdateRPCTimeoutOrCancelledError: the SDK
    turns a Ctrl-C (this task cancelled) into it, which would escape as a
    traceback instead of a KeyboardInterrupt; otherwise the call timed out."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        return asyncio.CancelledError()
    return RunError(message)


def _ended_from_outside(exc: WorkflowFailureError) -> bool:
    """Cancelled or terminated, not failed on its own (a context that could
    not be stored): a close that had its summary stands only then."""
    return isinstance(exc.cause, (CancelledError, TerminatedError))


def _ended_how(exc: WorkflowFailureError) -> str:
    if isinstance(exc.cause, CancelledError):
        return "it was cancelled"
    if isinstance(exc.cause, TerminatedError):
        return f"it was terminated: {_cause(exc)}"
    return f"it ended: {_cause(exc)}"


def _cut_off(exc: WorkflowUpdateFailedError) -> bool:
    """An accepted ask or close that the session's end cut off (terminated,
    timed out): the server's failure says only that the workflow completed."""
    return isinstance(exc.cause, ApplicationError) and exc.cause.type == "AcceptedUpdateCompletedWorkflow"


def _answered_by(exc: WorkflowUpdateFailedError) -> str | None:
    """The run that answered an ask refused as answered already, or None."""
    cause = exc.cause
    if isinstance(cause, ApplicationError) and cause.type == ASK_ANSWERED_ALREADY and cause.details:
        return str(cause.details[0])
    return None


def _cause(exc: WorkflowUpdateFailedError | WorkflowFailureError) -> str:
    cause = exc.cause
    while getattr(cause, "cause", None) is not None:
        cause = cause.cause  # type: ignore[union-attr]
    return clip(str(getattr(cause, "message", None) or cause or exc), 1000)
