"""The turn loop of a run: ask the root model, run its cells, feed back.

Kept apart from workflows/run.py (handlers, result) so each reads on its own.
Ends by returning `(status, reason, answer)` or raising `RunEnded`.
"""

from __future__ import annotations

import asyncio

from datetime import timedelta
from typing import TYPE_CHECKING, Any

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from workflows import names
    from workflows.budget import Refusal, messages_token_bound, token_bound, worst_case
    from workflows.cell import (
        REPL_TOO_LARGE_PATCH,
        TURN_OUTPUT_CHARS,
        cell_report,
        cell_start_to_close,
        execute_cell,
        no_cell_can_run,
    )
    from workflows.compaction import TranscriptWindow, compact, compacted_message
    from workflows.model_attempts import ONE_ATTEMPT, paid_model_call
    from workflows.parsing import parse_reply
    from workflows.prompts import (
        REASON_FINAL_BEFORE_LOOKING,
        REASON_NO_ACTION,
        CellReport,
        ContextMeta,
        final_request_message,
        first_user_message,
        missing_variable_reason,
        nudge_message,
        stop_sequences,
        system_prompt,
        turn_message,
    )
    from workflows.refs import BlobRef
    from workflows.request import ResumeState, RunRequest, clip_noting_length
    from workflows.result import RunStatus, bounded_tree
    from workflows.step_common import (
        ERROR_CHARS,
        MODEL_CALL_HEARTBEAT_TIMEOUT,
        error_text,
        raise_if_cancelled,
        until_deadline_s,
    )
    from workflows.steps import CellInput, CellOutput, RootTurnInput, RootTurnOutput
    from workflows.summaries import cell_summary, root_turn_summary
    from workflows.tool_steps import ToolSpec, tools_instructions
    from workflows.typed_answer import correction_note, parse_answer, schema_instructions

if TYPE_CHECKING:
    from workflows.run import RLMRun

Outcome = tuple[RunStatus, "str | None", "str | None"]


class ContinueAsNew(Exception):
    """Raised inside the loop: the run goes on as a new run of the chain."""

    def __init__(self, request: RunRequest) -> None:
        super().__init__("continue as new")
        self.request = request


class RunEnded(Exception):
    """Raised inside the loop to end the run at once with a given status."""

    def __init__(self, status: RunStatus, reason: str | None, answer: str | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.answer = answer


class TurnDriver:
    def __init__(self, run: RLMRun, request: RunRequest, tools: list[ToolSpec] | None = None) -> None:
        self._run = run
        self._req = request
        self._tool_specs = list(tools or [])
        self._root_model = request.models.root_at(request.depth)
        self._info = run.state.models[self._root_model]
        self._max_out = min(self._info.max_output_tokens, request.limits.root_max_output_tokens or 8192)
        resume = request.resume
        # A run may start from another run's REPL state (a session's question).
        self.snapshot_key: str | None = resume.snapshot_key if resume else request.repl_snapshot_key
        self.transcript_key: str | None = resume.transcript_key if resume else None
        self.answer_ref: BlobRef | None = None
        self._reply_final_ref: BlobRef | None = None
        self._warned_unseen = resume.warned_unseen if resume else False
        self._repl_asked = False  # each run's first root call asks its worker to make the REPL
        # Typed answers (answer_schema): the parsed value, and whether an
        # invalid answer was already sent back (only once per run chain).
        self.answer_value: Any = None
        self._sent_back = resume.answer_sent_back if resume else False
        self._errors_in_a_row = resume.errors_in_a_row if resume else 0
        self.window = (
            TranscriptWindow(resume.history_key, resume.compacted_turn, resume.transcript_tokens)
            if resume
            else TranscriptWindow()
        )
        self._pending: list[dict[str, str]] = list(resume.pending) if resume else self._opening()
        # At most the tokens the next root call sends (`token_bound`): the
        # transcript so far plus the messages it appends.
        self._prompt_tokens = resume.prompt_tokens if resume else 0

    def _opening(self) -> list[dict[str, str]]:
        req = self._req
        meta = ContextMeta.from_ref(req.context)
        system = system_prompt(
            self._info.prompt_profile,
            can_recurse=True,  # rlm_query exists at every depth; at the cap it falls back
            sub_models=req.models.allowed(),
            max_depth_reached=req.caps.max_depth < 1,
        )
        if req.answer_schema is not None:
            system += "\n\n" + schema_instructions(req.answer_schema)
        if self._tool_specs:
            system += "\n\n" + tools_instructions(self._tool_specs)
        first = first_user_message(req.question, meta, turn=1, max_turns=req.caps.max_turns)
        return [{"role": "system", "content": system}, {"role": "user", "content": first}]

    def check_start(self) -> Refusal | None:
        """Refuse a run whose budget cannot pay for its first root call."""
        if self._req.resume is not None:
            return None
        first = worst_case(
            self._prompt_tokens + messages_token_bound(self._pending),
            self._max_out,
            self._info.usd_per_input_token,
            self._info.usd_per_output_token,
        )
        return self._run.state.ledger.check_start(est_first_call=first, now=workflow.now())

    # -- the loop ------------------------------------------------------------
    async def loop(self) -> Outcome:
        run = self._run
        while True:
            refusal = run.state.ledger.reserve_turn(workflow.now())
            if refusal is not None:
                return await self._last_word(refusal)
            run.state.turn += 1
            if self.transcript_key and self.window.due(
                turn=run.state.turn, transcript_bound=self._prompt_tokens, pending=self._pending,
                max_output_tokens=self._max_out, window=self._info.context_window,
            ):  # fmt: skip
                await self._compact()
            run.set_phase("thinking")
            reply = await self._root_call(self._pending)
            if isinstance(reply, Refusal):
                return "budget_exhausted", reply.message, None
            parsed = parse_reply(reply)
            reports: list[CellReport] = []
            final: str | None = None
            failed = False
            shown = 0
            for index, code in enumerate(parsed.code_blocks):
                cell = await self._run_cell(f"t{run.state.turn}c{index + 1}", code)
                reports.append(cell_report(code, cell, TURN_OUTPUT_CHARS - shown))
                shown += len(reports[-1].output)
                failed = failed or cell.error is not None or cell.limit is not None
                self._errors_in_a_row = self._errors_in_a_row + 1 if cell.error is not None else 0
                if cell.final is not None:
                    final = cell.final
                    break
            notes = list(parsed.notes)
            if final is None and parsed.final is not None:
                if parsed.code_blocks and failed:
                    notes.append("Your FINAL was not taken because a cell of the same reply failed.")
                elif run.state.cells == 0 and not self._warned_unseen:
                    # Answering before looking is how small models guess; ask once.
                    self._warned_unseen = True
                    notes.append(REASON_FINAL_BEFORE_LOOKING)
                else:
                    final = await self._resolve_final(parsed.final.kind, parsed.final.value, notes)
            if final is not None:
                accepted, reason = self._check_answer(final, notes)
                if accepted:
                    return "completed", reason, final
            if (refusal := self._too_many_errors()) is not None:
                return await self._last_word(refusal)
            self._pending = [{"role": "user", "content": self._next_message(reports, notes)}]
            if self._history_full():
                self._continue_as_new()

    def _too_many_errors(self) -> Refusal | None:
        """`caps.max_errors` cells failed in a row: the run ends (as the
        reference engine's `max_errors`) with its best answer so far."""
        cap = self._run.state.ledger.caps.max_errors
        if cap is None or self._errors_in_a_row < cap or not workflow.patched("max-errors"):
            return None
        return Refusal(cap="errors", message=f"max_errors: {self._errors_in_a_row} cells failed in a row (cap {cap})")

    async def _compact(self) -> None:
        """Replace the transcript by the root model's summary (workflows/compaction.py)."""
        run = self._run
        run.set_phase("compacting")
        out = await compact(
            run.state.ledger, run.state.usage, model=self._info, depth=self._req.depth, turn=run.state.turn,
            transcript_key=self.transcript_key or "", history_key=self.window.history_key,
            transcript_tokens=self._prompt_tokens, max_output_tokens=self._max_out,
            stop=self._info.stop or stop_sequences(self._info.prompt_profile),
            timeout=timedelta(seconds=self._req.limits.model_call_timeout_s),
        )  # fmt: skip
        if out is None:
            return
        self.window.compacted(out, run.state.turn)
        self.transcript_key, self._prompt_tokens = out.transcript_key, out.system_tokens
        opening = compacted_message(self._req.question, out.summary, run.state.turn - 1)
        self._pending = [{"role": "user", "content": opening}, *self._pending]

    def _history_full(self) -> bool:
        info = workflow.info()
        updates = self._run.state.router.updates if self._run.state.router else 0
        updates += self._run.state.tools.updates if self._run.state.tools else 0
        limits = self._req.limits
        return (
            updates >= limits.continue_after_updates
            or info.get_current_history_length() >= limits.history_events // 2
            or info.is_continue_as_new_suggested()
        )

    def _continue_as_new(self) -> None:
        """Go on in a fresh run of the same workflow id, at a turn boundary."""
        run = self._run
        resume = ResumeState(
            turn=run.state.turn,
            cells=run.state.cells,
            snapshot_key=self.snapshot_key,
            transcript_key=self.transcript_key,
            pending=self._pending,
            prompt_tokens=self._prompt_tokens,
            usage=run.state.usage,
            ledger=run.state.ledger.compacted().model_dump(mode="json"),
            children=bounded_tree(run.state.router.child_runs.children) if run.state.router else [],
            runs_below=run.state.router.child_runs.runs_below if run.state.router else 0,
            warned_unseen=self._warned_unseen,
            answer_sent_back=self._sent_back,
            errors_in_a_row=self._errors_in_a_row,
            history_key=self.window.history_key,
            compacted_turn=self.window.compacted_turn,
            transcript_tokens=self.window.transcript_tokens,
        )
        raise ContinueAsNew(self._req.model_copy(update={"resume": resume}))

    def _next_message(self, reports: list[CellReport], notes: list[str]) -> str:
        run = self._run
        max_turns = max(run.state.ledger.caps.max_turns, 1)
        # After the last turn this output goes with the request for a final answer.
        turn = min(run.state.turn + 1, max_turns)
        if reports:
            note = " ".join(notes) or None
            return turn_message(reports, turn=turn, max_turns=max_turns, question=self._req.question, note=note)
        return nudge_message(turn=turn, max_turns=max_turns, reason=" ".join(notes) or REASON_NO_ACTION)

    async def _last_word(self, refusal: Refusal) -> Outcome:
        """Ask once for a final answer when turns or budget run out."""
        run = self._run
        ends: dict[str, tuple[RunStatus, Any]] = {"turns": ("max_turns", "max_turns"), "errors": ("max_errors", "max_errors")}
        status, reason = ends.get(refusal.cap, ("budget_exhausted", "budget"))
        self._pending = self._pending + [{"role": "user", "content": final_request_message(reason=reason)}]
        run.set_phase("final answer")
        reply = await self._root_call(self._pending, count_turn=False)
        if isinstance(reply, Refusal):
            return status, refusal.message, None
        parsed = parse_reply(reply)
        if parsed.final is not None and parsed.final.kind == "answer":
            answer = self._reply_answer(parsed.final.value)
        elif parsed.final is not None:
            answer = await self._resolve_final("var", parsed.final.value, [])
        else:
            answer = parsed.text.strip() or None
        reason = refusal.message
        if answer is not None and self._req.answer_schema is not None:
            value, error = parse_answer(answer, self._req.answer_schema)
            self.answer_value = value
            reason = reason if error is None else f"{reason}; answer_schema: the answer is invalid: {error}"
        return status, reason, answer

    def _check_answer(self, answer: str, notes: list[str]) -> tuple[bool, str | None]:
        """`(accepted, reason)` for a final answer. With `answer_schema`, the
        first invalid answer is sent back (not accepted, the error in
        `notes`); a second one is accepted as text, `reason` naming the error."""
        schema = self._req.answer_schema
        if schema is None:
            return True, None
        value, error = parse_answer(answer, schema)
        if error is None:
            self.answer_value = value
            return True, None
        if not self._sent_back:
            self._sent_back = True
            self.answer_ref = None  # the whole of the refused answer, if it was large
            notes.append(correction_note(error))
            return False, None
        return True, f"answer_schema: the answer was sent back once and is still invalid: {error}"

    def _reply_answer(self, value: str) -> str:
        """A `FINAL(...)` answer of the last reply; stored whole by the root
        turn when it is long, which makes that copy the run's `answer_ref`."""
        ref = self._reply_final_ref
        if ref is not None and ref.size == len(value.encode()):
            self.answer_ref = ref
        return value

    async def _resolve_final(self, kind: str, value: str, notes: list[str]) -> str | None:
        if kind == "answer":
            return self._reply_answer(value)
        # FINAL_VAR outside code: the variable lives in the REPL, read it there.
        cell = await self._run_cell(f"t{self._run.state.turn}v", f"FINAL_VAR({value!r})")
        if cell.final is None:
            notes.append(missing_variable_reason(value))
        return cell.final

    # -- steps ---------------------------------------------------------------
    async def _root_call(self, append: list[dict[str, str]], count_turn: bool = True) -> str | Refusal:
        run = self._run
        info = self._info
        self._prompt_tokens += messages_token_bound(append)
        call_id = f"root:{run.state.turn}" if count_turn else f"root:{run.state.turn}:final"
        turn = run.state.turn if count_turn else run.state.turn + 1
        # The run's first turn (also after continue-as-new, where the worker
        # most likely holds the REPL and skips it): its worker makes the REPL
        # while the model answers.
        warm_repl = None if self._repl_asked else self._cell_input("warm", "")
        self._repl_asked = True

        async def attempt(number: int) -> RootTurnOutput:
            return await workflow.execute_activity(
                names.ACTIVITY_ROOT_TURN,
                RootTurnInput(
                    workflow_id=workflow.info().workflow_id,
                    turn=turn,
                    model=self._root_model,
                    append=append,
                    max_tokens=self._max_out,
                    stop=info.stop or stop_sequences(info.prompt_profile),
                    transcript_prev_key=self.transcript_key,
                    attempt=number,
                    warm_repl=warm_repl,
                ),
                result_type=RootTurnOutput,
                start_to_close_timeout=timedelta(
                    seconds=until_deadline_s(run.state.ledger.deadline, self._req.limits.model_call_timeout_s)
                ),
                retry_policy=ONE_ATTEMPT,
                heartbeat_timeout=MODEL_CALL_HEARTBEAT_TIMEOUT,
                summary=root_turn_summary(turn, self._root_model, self._prompt_tokens),
            )

        try:
            out = await paid_model_call(
                run.state.ledger, run.state.usage, call_id=call_id, model=info, depth=self._req.depth,
                prompt_tokens=self._prompt_tokens, max_output_tokens=self._max_out, run_attempt=attempt,
            )  # fmt: skip
        except ActivityError as exc:
            raise_if_cancelled(exc)
            raise RunEnded("failed", f"root model call failed: {error_text(exc)}") from exc
        if isinstance(out, Refusal):
            return out
        self.transcript_key = out.transcript_key
        self._reply_final_ref = out.final_ref
        # The transcript keeps (at most) the reply as the next prompt's last message.
        self._prompt_tokens += token_bound(len(out.reply.encode()), 1)
        self.window.transcript_tokens = 0 if out.usage_estimated else out.prompt_tokens + out.completion_tokens
        return out.reply

    async def _run_cell(self, cell_id: str, code: str) -> CellOutput:
        run = self._run
        run.set_phase(f"cell {cell_id}")
        run.state.cells += 1
        cell_timeout_s = until_deadline_s(run.state.ledger.deadline, self._req.limits.cell_timeout_s)
        try:
            cell = await execute_cell(
                self._cell_input(cell_id, code, cell_timeout_s),
                summary=cell_summary(cell_id, code),
                start_to_close=cell_start_to_close(run.state.ledger.deadline, cell_timeout_s),
                wait_until_stopped=True,
            )
        except ActivityError as exc:
            raise_if_cancelled(exc)
            failure = f"the cell could not run: {error_text(exc)}"
            if no_cell_can_run(exc) and workflow.patched(REPL_TOO_LARGE_PATCH):
                raise RunEnded("failed", failure) from exc
            cell = CellOutput(output="", error=failure)
        task = asyncio.current_task()
        if run.cancel_requested or (task is not None and task.cancelling()):
            # The run was cancelled (by signal, or by Temporal for a child run)
            # while the cell ran: the cell reported back instead of raising
            # (it waits for the cell to stop), so end the loop here.
            raise asyncio.CancelledError()
        if cell.error is not None:
            cell.error = clip_noting_length(cell.error, ERROR_CHARS)
        if cell.snapshot_key:
            self.snapshot_key = cell.snapshot_key
        if cell.final_ref is not None:
            self.answer_ref = cell.final_ref
        return cell

    def _cell_input(self, cell_id: str, code: str, timeout_s: float | None = None) -> CellInput:
        limits = self._req.limits
        return CellInput(
            workflow_id=workflow.info().workflow_id,
            cell_id=cell_id,
            code=code,
            context=self._req.context,
            snapshot_key=self.snapshot_key,
            timeout_s=limits.cell_timeout_s if timeout_s is None else timeout_s,
            memory_mb=limits.cell_memory_mb,
            output_chars=limits.output_chars,
            tools=self._req.tools,
            history_key=self.window.history_key,
        )
