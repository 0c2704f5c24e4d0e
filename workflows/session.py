"""The `RLMSession` workflow: one context, one REPL, many questions.

Each `ask` update runs its question as a child `RLMRun` (`<session id>/q<N>`)
that starts from the REPL state the previous question left
(`RunRequest.repl_snapshot_key`) and hands back the state it ends in
(`RunResult.snapshot_key`): the turn loop of a question is RLMRun's own, and
its turns, cells and sub-calls are in the child's history, so the session's
history grows by a few events per question. After each answer a short cell
run here appends the question and answer to the REPL's `session_history`.

What the model sees: every variable its code defined for earlier questions,
`context` as in any run, and `session_history`: the earlier questions,
oldest first, as dicts `{"question", "answer", "status"}` (not `history`:
that name is a run's compacted transcript). The question text carries a
note saying so.

Asks are serialised: a second ask while one runs waits for it (in order of
arrival) and then starts from the REPL state it left. `close` waits for the
asks already accepted, ends the session and returns its summary; an ask
after `close` is rejected. The `cancel` signal (`rlm cancel ID`) ends the
session at once: the question being answered is cancelled. An idle session holds nothing on a worker but
what the worker's REPL pool keeps warm (evicted when idle, or under memory
pressure); the next question rebuilds the REPL from its snapshot on any
worker. Between questions, after `continue_after_questions` questions (or
when Temporal suggests it) the session continues as new, carrying its
snapshot, its budget ledger and its recent questions.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any, NoReturn

from temporalio import workflow
from temporalio.common import RawValue
from temporalio.exceptions import ActivityError, ApplicationError, ChildWorkflowError, FailureError

with workflow.unsafe.imports_passed_through():
    from pydantic import ValidationError

    from workflows import names
    from workflows.budget import Caps, Ledger, Refusal, Spend
    from workflows.cancel_signal import cancel_reason
    from workflows.cell import execute_cell
    from workflows.refs import ContextRef
    from workflows.request import RunRequest, cell_memory_problem, clip_noting_length, context_fit_problem, validation_errors
    from workflows.request_decoding import decode_request
    from workflows.result import RunResult, Usage
    from workflows.context_ingest import failure_message, ingest_context
    from workflows.run import CELL_MEMORY_PATCH, CONTEXT_FIT_PATCH, FAILURE_TYPES, UNKNOWN_FIELDS_PATCH
    from workflows.session_patches import (
        ASK_WAITS_FOR_START_CHECKS_PATCH,
        CANCEL_STARTING_QUESTION_PATCH,
        INGEST_CANCEL_PATCH,
        INGEST_FAILURE_PATCH,
        LATE_CANCEL_PATCH,
        SETTLE_UNSTARTED_QUESTION_PATCH,
        TEMPORAL_CANCEL_PATCH,
    )
    from workflows.session_questions import ask_id_reused, not_run, question_caps
    from workflows.session_history import (
        HISTORY_BUDGET_BYTES,
        ask_history_bytes,
        history_code,
        newest_that_fit,
        session_question,
    )
    from workflows.session_models import (
        MAX_RECENT_ASKS,
        AskRecord,
        AskRequest,
        QuestionAnswer,
        SessionCaps,
        SessionRequest,
        SessionResume,
        SessionSummary,
    )
    from workflows.step_common import ERROR_CHARS, error_text, is_cancellation
    from workflows.steps import CellInput
    from workflows.summaries import MAX_SUMMARY_CHARS, run_static_details
    from workflows.summaries import clip

# The cell that appends to `session_history` runs no model code: a few seconds at most.
RECORD_CELL_TIMEOUT = timedelta(minutes=5)


@workflow.defn(name=names.WORKFLOW_RLM_SESSION, failure_exception_types=FAILURE_TYPES)
class RLMSession:
    # Taken raw and validated here, as RLMRun does: an input the converter
    # cannot decode would otherwise fail every workflow task and hang.
    @workflow.init
    def __init__(self, raw: RawValue) -> None:
        request, self._unknown_fields = decode_request(raw, SessionRequest)
        self._invalid = request if isinstance(request, str) else None
        if isinstance(request, str):
            request = SessionRequest.model_construct(resume=None, caps=SessionCaps(), continue_after_questions=1)
        self._req: SessionRequest = request
        resume = request.resume
        self._ledger = Ledger.model_validate(resume.ledger) if resume else self._new_ledger()
        self._asked = resume.asked if resume else 0
        self._asked_here = 0
        self._snapshot_key: str | None = resume.snapshot_key if resume else None
        self._unrecorded: list[QuestionAnswer] = list(resume.unrecorded) if resume else []
        self._usage: Usage = resume.usage if resume else Usage()
        self._recent: list[AskRecord] = list(resume.recent) if resume else []
        self._opened_at = resume.opened_at if resume else workflow.now()
        self._runs = (resume.runs if resume else 0) + 1
        context = getattr(request, "context", None)
        self._context: ContextRef | None = context if isinstance(context, ContextRef) else None
        # Stored and checked to fit the REPL: asks start from then on (in the
        # first workflow task an ask's handler runs before `run`'s checks).
        self._context_ready = False
        self._closing = False  # `close` arrived: no new asks
        self._closed = False  # every accepted ask finished: the session ends
        self._asking = asyncio.Lock()  # serialises asks (FIFO)
        self._cancel_reason: str | None = None
        self._question: workflow.ChildWorkflowHandle | None = None  # the run of the question being answered
        self._no_context = False  # cancelled while the context was stored: the asks waiting for it end
        self._context_problem: str | None = None  # why the context could not be stored or loaded: asks are told
        self._waiting_bytes = 0  # what the asks accepted and not yet answered may add to the history

    def _new_ledger(self) -> Ledger:
        caps = self._req.caps
        # Only the money caps hold across questions; turns and depth are per question.
        session_caps = Caps(
            max_usd=caps.max_usd, max_tokens=caps.max_tokens, max_calls=caps.max_calls, max_turns=1, max_depth=1
        )
        return Ledger.root(session_caps, workflow.now())

    # -- the session -----------------------------------------------------------
    @workflow.run
    async def run(self, raw: RawValue) -> SessionSummary:
        if self._invalid is not None:
            raise ApplicationError(self._invalid, type="InvalidSessionRequest", non_retryable=True)
        if self._unknown_fields is not None and workflow.patched(UNKNOWN_FIELDS_PATCH):
            raise ApplicationError(self._unknown_fields, type="InvalidSessionRequest", non_retryable=True)
        problem = None if self._req.resume else cell_memory_problem(self._req.limits.cell_memory_mb)
        if problem is not None and workflow.patched(CELL_MEMORY_PATCH):
            raise ApplicationError(f"invalid SessionRequest: {problem}", type="InvalidSessionRequest", non_retryable=True)
        if self._context is None:
            try:
                self._context = await ingest_context(self._req.context)
            except FailureError as exc:
                if is_cancellation(exc) and workflow.patched(INGEST_CANCEL_PATCH):
                    if workflow.patched(TEMPORAL_CANCEL_PATCH):
                        # The asks accepted meanwhile wait for the context: it will not come.
                        self._no_context = True
                        await self._answer_asks_cancelled()
                    raise asyncio.CancelledError() from exc
                await self._refuse_context(failure_message(exc), tell_asks=workflow.patched(INGEST_FAILURE_PATCH))
        too_large = None if self._req.resume else context_fit_problem(self._context.total_bytes, self._req.limits.cell_memory_mb)
        if too_large is not None and workflow.patched(CONTEXT_FIT_PATCH):
            await self._refuse_context(too_large, tell_asks=True)  # before any question's paid root turn
        self._context_ready = True
        self._show()
        try:
            while True:
                await workflow.wait_condition(lambda: self._closed or self._should_continue())
                # Only between questions: every accepted ask (and close) has finished.
                await workflow.wait_condition(workflow.all_handlers_finished)
                if self._closed:
                    return self._summary()
                workflow.continue_as_new(self._next_request())
        except asyncio.CancelledError:
            if not workflow.patched(TEMPORAL_CANCEL_PATCH):
                raise
            await self._answer_asks_cancelled()
            raise

    async def _refuse_context(self, problem: str, *, tell_asks: bool) -> NoReturn:
        """End the session: its context could not be stored or cannot be
        loaded. With `tell_asks`, the asks accepted meanwhile are answered so."""
        if tell_asks:
            self._context_problem = problem
            await workflow.wait_condition(workflow.all_handlers_finished)
        raise ApplicationError(problem, type="InvalidContext", non_retryable=True) from None

    async def _answer_asks_cancelled(self) -> None:
        """Meet a Temporal cancel (the UI's Cancel) as the `cancel` signal:
        Temporal cancels this task only, and the asks (update handlers) would
        be cut off unanswered, the question's run left to go on."""
        if self._cancel_reason is None:
            await self.cancel()
        await workflow.wait_condition(lambda: self._closed and workflow.all_handlers_finished())

    def _should_continue(self) -> bool:
        return (
            self._asked_here >= self._req.continue_after_questions
            or workflow.info().is_continue_as_new_suggested()
        )

    def _next_request(self) -> SessionRequest:
        resume = SessionResume(
            asked=self._asked,
            snapshot_key=self._snapshot_key,
            unrecorded=self._unrecorded,
            ledger=self._ledger.compacted().model_dump(mode="json"),
            usage=self._usage,
            recent=self._recent,
            opened_at=self._opened_at,
            runs=self._runs,
        )
        return self._req.model_copy(update={"context": self._context, "resume": resume})

    # -- asking ------------------------------------------------------------------
    @workflow.update(name=names.UPDATE_ASK)
    async def ask(self, ask: AskRequest) -> RunResult:
        held = ask_history_bytes(ask, self._unrecorded)
        self._waiting_bytes += held
        # Before the patch an ask waited only for the context to be stored.
        checked = workflow.patched(ASK_WAITS_FOR_START_CHECKS_PATCH)
        try:
            async with self._asking:  # a second ask waits for the first
                await workflow.wait_condition(
                    lambda: (self._context_ready if checked else self._context is not None)
                    or self._no_context
                    or self._context_problem is not None
                )
                if self._context_problem is not None:
                    raise ApplicationError(self._no_context_message(), type="InvalidContext", non_retryable=True)
                return await self._answer(ask, workflow.current_update_info().id)  # type: ignore[union-attr]
        finally:
            self._waiting_bytes -= held

    @ask.validator
    def _validate_ask(self, ask: AskRequest) -> None:
        if self._closing:
            raise ValueError(f"session {workflow.info().workflow_id} is closed: start a new session")
        if self._invalid is not None:
            raise ValueError(self._invalid)
        if self._context_problem is not None:
            raise ValueError(self._no_context_message())
        if problem := ask.unknown_fields_problem():
            raise ValueError(problem)
        # Sent again under the id of an ask answered before the session continued
        # as new (a caller retrying once it lost the first reply): Temporal's own
        # dedup of update ids holds within one run only, and it would run again.
        update = workflow.current_update_info()
        if update is not None and (done := next((r for r in self._recent if r.ask_id == update.id), None)):
            if not done.asks(ask.question):
                raise ValueError(ask_id_reused(update.id, done))
            # Typed, with the run: a client reads that run's result as the ask's (cli/_session_client.py).
            raise ApplicationError(
                f"ask {update.id} was answered already, as question {done.number} ({done.status}): "
                f"its result is that of run {done.workflow_id} (`rlm result {done.workflow_id}`)",
                done.workflow_id,
                type=names.ASK_ANSWERED_ALREADY,
                non_retryable=True,
            )
        ask.caps_over(self._req.question_caps)  # refuse bad caps before the ask is accepted
        if workflow.info().get_current_history_size() + self._waiting_bytes + ask_history_bytes(ask, self._unrecorded) > HISTORY_BUDGET_BYTES:
            raise ValueError(
                f"session {workflow.info().workflow_id} has too many questions waiting for its history: "
                "ask again once they are answered"
            )

    def _no_context_message(self) -> str:
        return f"session {workflow.info().workflow_id} has no usable context: {self._context_problem}"

    async def _answer(self, ask: AskRequest, ask_id: str) -> RunResult:
        self._asked += 1
        self._asked_here += 1
        number = self._asked
        child_id = f"{workflow.info().workflow_id}/q{number}"
        if self._cancel_reason is None and self._unrecorded:  # an earlier answer whose cell failed
            await self._record(f"q{number}p")
        caps = question_caps(ask, self._req.question_caps, self._ledger, child_id) if self._cancel_reason is None else None
        if caps is None:  # accepted before a cancel: not run
            result = not_run(child_id, f"the session was cancelled: {self._cancel_reason}", status="cancelled")
        elif isinstance(caps, Refusal):
            result = not_run(child_id, f"session budget: {caps.message}")
        else:
            result = await self._run_question(ask, number, child_id, caps)
        self._recent = (self._recent + [
            AskRecord(number=number, question=AskRecord.cut(ask.question), workflow_id=child_id,
                      status=result.status, spend=result.spend, turns=result.turns, ask_id=ask_id,
                      question_sha256=AskRecord.digest(ask.question))
        ])[-MAX_RECENT_ASKS:]  # fmt: skip
        if self._cancel_reason is None:  # a cancelled session asks nothing more of its REPL
            self._unrecorded.append(QuestionAnswer(question=ask.question, answer=result.answer, status=result.status))
            await self._record(f"q{number}r")
        self._show()
        return result

    async def _run_question(self, ask: AskRequest, number: int, child_id: str, caps: Caps) -> RunResult:
        assert self._context is not None
        try:
            request = RunRequest(
                question=session_question(ask.question, number),
                context=self._context,
                models=self._req.models,
                caps=caps,
                limits=self._req.limits,
                repl_snapshot_key=self._snapshot_key,
                answer_schema=ask.answer_schema,
                tools=self._req.tools,
            )
        except ValidationError as exc:
            # Anything the ask's validator did not foresee: the question does
            # not run, and the session's budget held for it is given back.
            if not workflow.patched(SETTLE_UNSTARTED_QUESTION_PATCH):
                raise
            self._ledger.child_settle(child_id, Spend())
            return not_run(child_id, f"the question's run could not start: {validation_errors(exc)}", status="failed")
        try:
            self._question = await workflow.start_child_workflow(
                names.WORKFLOW_RLM_RUN,
                request,
                id=child_id,
                result_type=RunResult,
                task_queue=workflow.info().task_queue,
                parent_close_policy=workflow.ParentClosePolicy.REQUEST_CANCEL,
                static_summary=f"session question {number} · " + clip(ask.question, MAX_SUMMARY_CHARS - 30),
                static_details=run_static_details(request),
            )
            if self._cancel_reason is not None and workflow.patched(CANCEL_STARTING_QUESTION_PATCH):
                # The cancel came while the run started: it found no run to cancel.
                await self._cancel_question(self._question)
            result: RunResult = await self._question
        except ChildWorkflowError as exc:
            # It reported nothing: count its caps, the most it could spend (its
            # slice is all the session had left; unlimited dimensions count 0).
            most = Spend(usd=caps.max_usd or 0.0, tokens=caps.max_tokens or 0, calls=caps.max_calls or 0)
            self._ledger.child_settle(child_id, most)
            return not_run(child_id, f"the question's run failed: {error_text(exc)}", status="failed")
        finally:
            self._question = None
        self._ledger.child_settle(child_id, result.spend)
        self._usage.merge(result.usage)
        if result.snapshot_key is not None:
            self._snapshot_key = result.snapshot_key
        return result

    async def _record(self, cell_id: str) -> None:
        """Append the answers not yet recorded to the REPL's `session_history`."""
        assert self._context is not None
        # Bounded here too: a session resumed with more (before the bound) was stuck.
        self._unrecorded = newest_that_fit(self._unrecorded)
        limits = self._req.limits
        try:
            cell = await execute_cell(
                CellInput(
                    workflow_id=workflow.info().workflow_id,
                    cell_id=cell_id,
                    code=history_code(self._unrecorded),
                    context=self._context,
                    snapshot_key=self._snapshot_key,
                    # The same limits as the questions' cells: the worker keeps one warm REPL.
                    timeout_s=limits.cell_timeout_s,
                    memory_mb=limits.cell_memory_mb,
                    output_chars=limits.output_chars,
                ),
                summary=f"session history · {len(self._unrecorded)} answer(s)",
                start_to_close=RECORD_CELL_TIMEOUT,
                wait_until_stopped=False,
            )
        except ActivityError as exc:
            workflow.logger.warning("session history cell failed: %s", error_text(exc))
            return
        if cell.error is not None or cell.snapshot_key is None:
            workflow.logger.warning("session history cell failed: %s", clip_noting_length(cell.error or "no snapshot", ERROR_CHARS))
            return
        self._snapshot_key = cell.snapshot_key
        self._unrecorded = []

    # -- closing and watching ------------------------------------------------------
    @workflow.update(name=names.UPDATE_CLOSE)
    async def close(self) -> SessionSummary:
        self._closing = True
        async with self._asking:  # the asks accepted before close finish first
            self._closed = True
        self._show()
        return self._summary()

    @workflow.signal(name=names.SIGNAL_CANCEL)
    async def cancel(self, reason: Any = None) -> None:
        """End the session now: the question being answered is cancelled (it
        ends `cancelled` with what it has), asks already waiting are not run."""
        if (text := cancel_reason(reason)) is None:
            return  # a reason that is not text, in a history from before it was taken
        self._cancel_reason = text
        self._closing = True
        if self._question is not None:
            await self._cancel_question(self._question)
        async with self._asking:
            self._closed = True
        self._show()

    async def _cancel_question(self, question: workflow.ChildWorkflowHandle) -> None:
        try:
            await question.signal(names.SIGNAL_CANCEL, self._cancel_reason)
        except FailureError as exc:
            # The question's run ended meanwhile (a cancel sent twice, one landing
            # as it finished, or a run that ended in its first step, its budget too
            # small to start): nothing left to cancel, and no reason to fail the
            # session, or the ask waiting for that run's result.
            if not workflow.patched(LATE_CANCEL_PATCH):
                raise
            workflow.logger.info("cancel of the question's run not delivered: %s", exc)

    @workflow.query(name=names.QUERY_SESSION)
    def session(self) -> SessionSummary:
        return self._summary()

    def _summary(self) -> SessionSummary:
        return SessionSummary(
            session_id=workflow.info().workflow_id,
            state="closed" if self._closing else "open",
            questions=self._asked,
            spend=self._ledger.spent(),
            caps=self._req.caps,
            usage=self._usage,
            recent=self._recent,
            snapshot_key=self._snapshot_key,
            opened_at=self._opened_at,
            runs=self._runs,
        )

    def _show(self) -> None:
        """The session's state as the workflow's current details (Temporal UI)."""
        spent = self._ledger.spent()
        state = "closed" if self._closing else "open"
        workflow.set_current_details(
            f"**session** {state} · {self._asked} question(s) · "
            f"spent ${spent.usd:.4f}, {spent.tokens:,} tokens, {spent.calls} calls"
        )
