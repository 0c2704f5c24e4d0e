"""The `RLMRun` workflow: one RLM run, turn by turn, until FINAL.

Each turn the root model writes code (`root_turn` activity), each ```repl
block runs in the WASM REPL (`run_cell` activity), sub-calls made by that code
come back here as `subcalls` updates (workflows/subcalls.py). Everything here
is deterministic: time is `workflow.now()`, I/O happens in activities.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RawValue, RetryPolicy, SearchAttributeKey
from temporalio.exceptions import ActivityError, ApplicationError, FailureError

with workflow.unsafe.imports_passed_through():
    from workflows import names
    from workflows.budget import Caps, Ledger, Spend, money_cap_problem
    from workflows.cancel_signal import DEFAULT_CANCEL_REASON, cancel_reason
    from workflows.caps_update import caps_change_problem
    from workflows.request import (
        RunRequest,
        cell_memory_problem,
        clip_noting_length,
        clip_utf8,
        context_fit_problem,
    )
    from workflows.request_decoding import decode_request
    from workflows.result import ANSWER_INLINE_BYTES, RunResult, RunStatus, Usage, bounded_tree
    from workflows.run_state import RunState
    from workflows.refs import ContextRef
    from workflows.step_common import ERROR_CHARS, error_text, raise_if_cancelled
    from workflows.context_ingest import failure_message, ingest_context
    from workflows.steps import (
        ResolveModelsInput,
        ResolveModelsOutput,
        SubcallBatch,
        SubcallReply,
    )
    from workflows.subcalls import MAX_SUBCALL_UPDATES, SubcallRouter
    from workflows.tool_calls import ToolRouter
    from workflows.tool_steps import ResolveToolsInput, ResolveToolsOutput, ToolCallReply, ToolCallRequest, ToolSpec
    from workflows.summaries import progress_details
    from workflows.turn import ContinueAsNew, RunEnded, TurnDriver

# Errors of our own code or data fail the run (or the update) with a reason
# instead of failing the workflow task, which the SDK retries forever
# (DESIGN.md section 9). Non-determinism is left out on purpose: that is a
# deployment bug, and a suspended run resumes once a fixed worker is deployed.
FAILURE_TYPES = (
    ValueError,  # includes pydantic's ValidationError and the ledger's errors
    TypeError,
    LookupError,
    AttributeError,
    AssertionError,
    ArithmeticError,
    RuntimeError,
    NameError,
)
DEPTH_KEY = SearchAttributeKey.for_int("RlmDepth")
ROOT_KEY = SearchAttributeKey.for_keyword("RlmRootRunId")
STATUS_KEY = SearchAttributeKey.for_keyword("RlmStatus")
# Runs started since this patch resolve models and tools as local activities.
RESOLVE_LOCALLY_PATCH = "resolve-locally"
# Runs started since this patch fail on a request field no model knows;
# older runs had such fields dropped and replay as they ran.
UNKNOWN_FIELDS_PATCH = "refuse-unknown-request-fields"
# Runs started since this patch refuse a money cap over a model with no known
# price; older histories (which may hold such a run going on) replay without it.
UNPRICED_CAP_PATCH = "refuse-usd-cap-over-unpriced-model"
# Runs started since this patch end a Temporal cancel that lands before the
# turn loop (a schedule's cancel_other overlap, the UI's Cancel) with a
# `cancelled` result; older ones replay as they ended (workflow cancelled, or
# `failed: Cancelled` when the cancel arrived as the failure of the step in flight).
EARLY_CANCEL_PATCH = "result-on-cancel-before-the-loop"
# Runs started since this patch end a Temporal cancel that lands after the
# loop, as they wait for their sub-calls to stop, with the loop's result;
# older ones replay as they ended (bare cancelled: the answer lost, RlmStatus `running`).
LATE_CANCEL_PATCH = "result-on-cancel-after-the-loop"
# Runs started since this patch are refused at the start with a REPL memory
# cap the sandbox cannot make; older ones replay as they ran (every cell failed).
CELL_MEMORY_PATCH = "refuse-cell-memory-out-of-range"
# Runs and sessions started since this patch end before their first root turn
# when the context cannot fit the REPL's memory cap; older ones ended at their first cell.
CONTEXT_FIT_PATCH = "refuse-context-past-cell-memory"


@workflow.defn(name=names.WORKFLOW_RLM_RUN, failure_exception_types=FAILURE_TYPES)
class RLMRun:
    # The input is taken raw and validated here: a request the data converter
    # could not decode would fail every workflow task ("Failed decoding
    # arguments") and the run would hang; this way it fails with the reason.
    @workflow.init
    def __init__(self, raw: RawValue) -> None:
        request, self._unknown_fields = decode_request(raw, RunRequest)
        self._invalid: str | None = None
        try:
            ledger = self._start_ledger(request) if isinstance(request, RunRequest) else None
        except ValueError as exc:  # a resumed ledger that does not validate
            request = f"invalid RunRequest: resume.ledger: {exc}"
        if isinstance(request, str):
            # A stand-in so queries and handlers work until run() fails the run.
            self._invalid = request
            request = RunRequest.model_construct(depth=0, parent=None, resume=None, caps=Caps())
            ledger = Ledger.root(request.caps, workflow.now())
        self._req = request
        info = workflow.info()
        self._root_id = request.parent.root_workflow_id if request.parent else info.workflow_id
        resume = request.resume
        self.state = RunState(
            ledger=ledger,
            usage=resume.usage if resume else Usage(),
            turn=resume.turn if resume else 0,
            cells=resume.cells if resume else 0,
        )
        self._phase = "starting"
        self._cancel_reason: str | None = None
        self._driver: TurnDriver | None = None
        self._loop_task: asyncio.Task | None = None
        self._unsettled = False

    # -- the run -------------------------------------------------------------
    @workflow.run
    async def run(self, raw: RawValue) -> RunResult:
        if self._invalid is not None:
            raise ApplicationError(self._invalid, type="InvalidRunRequest", non_retryable=True)
        if self._unknown_fields is not None and workflow.patched(UNKNOWN_FIELDS_PATCH):
            raise ApplicationError(self._unknown_fields, type="InvalidRunRequest", non_retryable=True)
        problem = None if self._req.resume else cell_memory_problem(self._req.limits.cell_memory_mb)
        if problem is not None and workflow.patched(CELL_MEMORY_PATCH):
            raise ApplicationError(f"invalid RunRequest: {problem}", type="InvalidRunRequest", non_retryable=True)
        try:
            return await self._run(self._req)
        except asyncio.CancelledError:
            # Cancelled by Temporal while the run checked its models or read its
            # context: the loop, which turns a cancel into a result, had not
            # started. Ended raw, the run had no result and its RlmStatus
            # stayed `running` for good. (Once the loop ran, a cancel is its.)
            if self._loop_task is not None or not workflow.patched(EARLY_CANCEL_PATCH):
                raise
            return self._result("cancelled", self._cancel_reason or DEFAULT_CANCEL_REASON, None)
        except FAILURE_TYPES as exc:
            # A bug or a value no validator caught: end with a reason, never hang.
            workflow.logger.exception("run failed inside workflow code")
            self.set_phase("failed")
            if self.state.router is not None:
                self.state.router.cancel_all()
            if self.state.tools is not None:
                self.state.tools.cancel_all()
            return self._result("failed", f"internal error: {type(exc).__name__}: {exc}", None)

    async def _run(self, request: RunRequest) -> RunResult:
        # Lets the Temporal UI list a whole tree (RlmRootRunId) or a depth.
        workflow.upsert_search_attributes(
            [
                DEPTH_KEY.value_set(request.depth),
                ROOT_KEY.value_set(self._root_id),
                STATUS_KEY.value_set("running"),
            ]
        )
        # A caller's ContextRef (not a parent's, not the chain's own) is checked
        # as any other context, in the same local step as the models.
        callers = isinstance(request.context, ContextRef) and request.parent is None and not request.resume
        callers_ref = request.context if callers else None
        try:
            resolved = await self._resolve_models(callers_ref)
            self.state.models = resolved.models
            # Checked once per chain: a run naming a tool no worker has fails now.
            tool_specs = await self._resolve_tools() if request.tools and not request.resume else []
        except FailureError as exc:
            raise_if_cancelled(exc, EARLY_CANCEL_PATCH)  # run() ends it `cancelled`
            # A local activity's failure arrives as itself (an ApplicationError,
            # a timeout), an activity's wrapped in an ActivityError.
            cause = exc.cause if isinstance(exc, ActivityError) else exc
            # An unknown model is the caller's: the message names the field (`models.sub: ...`), keep it first.
            if isinstance(cause, ApplicationError) and cause.type == "UnknownModel":
                return self._result("failed", cause.message, None)
            return self._result("failed", error_text(exc), None)
        if resolved.context_problem is not None:
            return self._result("failed", resolved.context_problem, None)
        if resolved.context is not None:
            request = self._req = request.model_copy(update={"context": resolved.context})
        # Checked when a run starts, not again after continue-as-new: a chain already running keeps going.
        if not request.resume and (unbound := money_cap_problem(request.caps.max_usd, self._unpriced_models())):
            if workflow.patched(UNPRICED_CAP_PATCH):
                return self._result("failed", unbound, None)
        if not isinstance(request.context, ContextRef):
            try:
                ref = await self._ingest_context()
            except FailureError as exc:
                raise_if_cancelled(exc, EARLY_CANCEL_PATCH)  # run() ends it `cancelled`
                return self._result("failed", failure_message(exc), None)
            # From here on (turns, sub-calls, continue-as-new) the context is a ref.
            request = self._req = request.model_copy(update={"context": ref})
        too_large = None if request.resume else context_fit_problem(request.context.total_bytes, request.limits.cell_memory_mb)
        if too_large is not None and workflow.patched(CONTEXT_FIT_PATCH):
            return self._result("failed", too_large, None)  # before a paid root turn: no cell could load it
        self.state.router = SubcallRouter(
            request=request, models=self.state.models, ledger=self.state.ledger, usage=self.state.usage, root_workflow_id=self._root_id
        )
        self.state.tools = ToolRouter(request=request, ledger=self.state.ledger)
        if request.resume:
            self.state.router.child_runs.children = list(request.resume.children)
            self.state.router.child_runs.runs_below = request.resume.runs_below
        self._driver = TurnDriver(self, request, tools=tool_specs)
        refusal = self._driver.check_start()
        if refusal is not None:
            return self._result("budget_exhausted", f"budget too small to start: {refusal.message}", None)
        if self._cancel_reason is not None:
            return self._result("cancelled", self._cancel_reason, None)
        # The loop runs as a task so a cancel signal can stop it at any await.
        self._loop_task = asyncio.ensure_future(self._driver.loop())
        waited = True  # False once a Temporal cancel ended a wait: the run then reports at once
        try:
            status, reason, answer = await self._loop_task
        except asyncio.CancelledError:
            # Cancelled by signal or by Temporal: end cleanly with a partial result.
            status, reason, answer = "cancelled", self._cancel_reason or DEFAULT_CANCEL_REASON, None
        except RunEnded as ended:
            status, reason, answer = ended.status, ended.reason, ended.answer
        except ContinueAsNew as chain:
            waited = await self._unless_cancelled(workflow.wait_condition(workflow.all_handlers_finished))
            if waited:
                workflow.continue_as_new(chain.request)
            status, reason, answer = "cancelled", self._cancel_reason or DEFAULT_CANCEL_REASON, None
        self.state.router.cancel_all()
        self.state.tools.cancel_all()
        # What did not stop in time, or when a cancel ended the wait, is counted
        # at what it holds: never report less than was billed.
        waited = waited and await self._unless_cancelled(workflow.wait_condition(workflow.all_handlers_finished))
        self._unsettled = not (waited and await self._unless_cancelled(self.state.router.settled()))
        return self._result(status, reason, answer)

    @staticmethod
    async def _unless_cancelled(wait: Coroutine[Any, Any, bool | None]) -> bool:
        """False when `wait` (for sub-steps to stop) returns False or a Temporal
        cancel lands meanwhile. That cancel is the run's only one (one during the
        loop ends the loop) and means stop now: the run reports what it has."""
        try:
            return await wait is not False
        except asyncio.CancelledError:
            if not workflow.patched(LATE_CANCEL_PATCH):
                raise
            return False

    @staticmethod
    def _start_ledger(request: RunRequest) -> Ledger:
        if request.resume:
            return Ledger.model_validate(request.resume.ledger)
        return Ledger.root(request.caps, workflow.now(), depth=request.depth)

    async def _resolve_models(self, context: ContextRef | None) -> ResolveModelsOutput:
        allowed = self._req.models.allowed()
        return await self._resolve(
            names.ACTIVITY_RESOLVE_MODELS,
            ResolveModelsInput(names=allowed, fields=self._req.models.fields(), context=context),
            ResolveModelsOutput,
            "resolve models · " + ", ".join(allowed)[:160],
        )

    async def _resolve_tools(self) -> list[ToolSpec]:
        out: ResolveToolsOutput = await self._resolve(
            names.ACTIVITY_RESOLVE_TOOLS,
            ResolveToolsInput(names=self._req.tools),
            ResolveToolsOutput,
            "resolve tools · " + ", ".join(self._req.tools)[:160],
        )
        return out.tools

    @staticmethod
    async def _resolve(activity: str, arg: Any, result_type: type, summary: str) -> Any:
        """A lookup in the worker's own registries (models, tools). Runs started
        since the patch make it a local activity: it runs inside the workflow
        task that starts the run, which saves an activity task and a second
        workflow task per run (and per child run). Its outcome is still
        recorded in the history (a marker), so replay does not repeat it."""
        options: dict[str, Any] = {
            "result_type": result_type,
            "summary": summary,
            "start_to_close_timeout": timedelta(seconds=30),
            "retry_policy": RetryPolicy(maximum_attempts=3),
        }
        if workflow.patched(RESOLVE_LOCALLY_PATCH):
            return await workflow.execute_local_activity(activity, arg, **options)
        return await workflow.execute_activity(activity, arg, **options)

    async def _ingest_context(self) -> ContextRef:
        return await ingest_context(self._req.context, self._req.on_unreadable)

    def _result(self, status: RunStatus, reason: str | None, answer: str | None) -> RunResult:
        info = workflow.info()
        context = self._req.context
        answer_ref = self._driver.answer_ref if self._driver else None
        if answer is not None and answer_ref is None and len(answer.encode()) > ANSWER_INLINE_BYTES and reason is None:
            # No stored copy (a root turn of a worker from before final_ref): say it was cut, never silently.
            reason = (
                f"the answer has {len(answer):,} characters; this result holds its first {ANSWER_INLINE_BYTES:,} "
                "bytes (the whole answer is the last reply in the transcript)"
            )
        workflow.upsert_search_attributes([STATUS_KEY.value_set(status)])
        return RunResult(
            answer=clip_utf8(answer, ANSWER_INLINE_BYTES) if answer is not None else None,
            answer_ref=answer_ref,
            answer_value=self._driver.answer_value if self._driver else None,
            status=status,
            reason=clip_noting_length(reason, ERROR_CHARS) if reason is not None else None,
            turns=self.state.turn,
            spend=self.state.ledger.spent() + (self.state.ledger.reserved() if self._unsettled else Spend()),
            usage=self.state.usage,
            workflow_id=info.workflow_id,
            run_id=info.run_id,
            root_workflow_id=self._root_id,
            depth=self._req.depth,
            transcript_key=self._driver.transcript_key if self._driver else None,
            children=bounded_tree(self.state.router.child_runs.children) if self.state.router else [],
            runs_below=self.state.router.child_runs.runs_below if self.state.router else 0,
            skipped_documents=list(context.skipped) if isinstance(context, ContextRef) else [],
            skipped_count=context.skipped_count if isinstance(context, ContextRef) else 0,
            snapshot_key=self._driver.snapshot_key if self._driver else None,
        )

    # -- sub-calls from cells ----------------------------------------------
    @workflow.update(name=names.UPDATE_SUBCALLS)
    async def subcalls(self, batch: SubcallBatch) -> SubcallReply:
        await workflow.wait_condition(lambda: self.state.router is not None)
        assert self.state.router is not None
        return await self.state.router.handle(batch)

    @subcalls.validator
    def _validate_subcalls(self, batch: SubcallBatch) -> None:
        if self.state.router is None:
            raise ValueError("the run has not started its REPL yet")
        self.state.router.validate(batch, workflow.current_update_info().id)

    # -- custom tools from cells ---------------------------------------------
    @workflow.update(name=names.UPDATE_TOOL_CALL)
    async def tool_call(self, call: ToolCallRequest) -> ToolCallReply:
        await workflow.wait_condition(lambda: self.state.tools is not None)
        assert self.state.tools is not None
        return await self.state.tools.handle(call)

    @tool_call.validator
    def _validate_tool_call(self, call: ToolCallRequest) -> None:
        if self.state.tools is None or self.state.router is None:
            raise ValueError("the run has not started its REPL yet")
        # Sub-calls and tool calls share the server's updates per run.
        self.state.tools.validate(call, workflow.current_update_info().id, MAX_SUBCALL_UPDATES - self.state.router.updates)

    # -- watching and steering -------------------------------------------
    def set_phase(self, phase: str) -> None:
        """What the run does now; shown as the workflow's current details
        (Markdown in the Temporal UI: turn, phase, spend against caps)."""
        self._phase = phase
        progress = self.state.router.progress() if self.state.router else {}
        workflow.set_current_details(
            progress_details(
                turn=self.state.turn,
                max_turns=self.state.ledger.caps.max_turns,
                phase=phase,
                spent=self.state.ledger.spent().model_dump(),
                caps=self.state.ledger.caps.model_dump(mode="json"),
                open_subcalls=progress.get("open_subcalls", 0),
                done_subcalls=progress.get("done_subcalls", 0),
                children=progress.get("children", 0),
            )
        )

    @workflow.query(name=names.QUERY_PROGRESS)
    def progress(self) -> dict[str, Any]:
        spent = self.state.ledger.spent()
        out: dict[str, Any] = {
            "phase": self._phase,
            "turn": self.state.turn,
            "max_turns": self.state.ledger.caps.max_turns,
            "cells": self.state.cells,
            "depth": self._req.depth,
            "spent": spent.model_dump(),
            "caps": self.state.ledger.caps.model_dump(mode="json"),
            "usage": self.state.usage.model_dump(mode="json"),
        }
        if self.state.router:
            out.update(self.state.router.progress())
        return out

    @workflow.update(name=names.UPDATE_SET_CAPS)
    def set_caps(self, changes: dict[str, Any]) -> dict[str, Any]:
        self.state.ledger.set_caps(**changes)
        return self.state.ledger.caps.model_dump(mode="json")

    @set_caps.validator
    def _validate_set_caps(self, changes: dict[str, Any]) -> None:
        # The handler must not fail after the update is accepted: try it here.
        child_of = self._root_id if self._req.parent is not None else None
        unpriced = self._unpriced_models()
        if problem := caps_change_problem(self.state.ledger.caps, changes, root_workflow_id=child_of, unpriced=unpriced):
            raise ValueError(problem)

    def _unpriced_models(self) -> list[str]:
        """The run's models with no known price (a money cap cannot bind them)."""
        return [name for name, info in self.state.models.items() if not info.priced]

    @property
    def cancel_requested(self) -> bool:
        """A cancel signal arrived; steps that outlive it (a cell stopping) end the loop."""
        return self._cancel_reason is not None

    @workflow.signal(name=names.SIGNAL_CANCEL)
    def cancel(self, reason: Any = None) -> None:
        if (text := cancel_reason(reason)) is None:
            return  # a reason that is not text, in a history from before it was taken
        self._cancel_reason = text
        if self._loop_task is not None:
            self._loop_task.cancel()

