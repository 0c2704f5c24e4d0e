"""Compaction of a long root transcript (as the reference engine does at 85%).

When the next root call would fill `COMPACT_AT` of the root model's window,
the root model is asked (one paid call, reserved and capped like every model
call) to summarise its work so far; the run then goes on with a fresh
transcript: the system prompt, the question and that summary, followed by
the latest REPL output. Nothing is lost: the full transcript of the
compacted turns is stored and readable in the REPL through `history()`.

Pure and deterministic: the texts, the step models and the trigger.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from pydantic import BaseModel
from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from workflows import names
    from workflows.budget import Ledger, Refusal, messages_token_bound
    from workflows.model_attempts import ONE_ATTEMPT, paid_model_call
    from workflows.result import Usage
    from workflows.step_common import MODEL_CALL_HEARTBEAT_TIMEOUT, error_text, raise_if_cancelled
    from workflows.steps import ModelInfo
    from workflows.summaries import compaction_summary

COMPACT_AT = 0.85
"""Share of the root model's window at which the transcript is compacted."""
HISTORY_FUNCTION = "history"

COMPACTION_REQUEST = """\
Your conversation is about to be compacted to fit your context window: the earlier turns will be \
replaced by your summary. Write that summary now, without code: what you have learned about the \
context and the question, the REPL variables you built and what each holds, the results of your \
sub-calls and tool calls that matter, and what remains to be done. Be specific (names, numbers, \
findings); do not answer the question yet unless you are sure."""

_COMPACTED = """\
Question: {question}

Your turns 1 to {turns} were compacted to fit your context window. Your summary of them:
{summary}

Your REPL variables are unchanged. The full transcript of the compacted turns is readable in the \
REPL: `history()` returns it as a list of {{"role", "content"}} messages, oldest first."""


def compacted_message(question: str, summary: str, turns: int) -> str:
    """The user message that opens the compacted transcript."""
    return _COMPACTED.format(question=question, turns=turns, summary=summary.strip() or "(empty summary)")


def should_compact(transcript: int, new: int, max_output_tokens: int, window: int) -> bool:
    """Would a call of the `transcript` so far plus `new` tokens of new
    messages, and its reply, pass COMPACT_AT of `window`, with the transcript
    filling at least half of that room? When it does not, the new messages
    (whose byte bound is often 4x their tokens) are what looks large, and a
    summary of the transcript would make little room for its cost."""
    room = COMPACT_AT * window - max_output_tokens
    return transcript >= room / 2 and transcript + new > room


@dataclass
class TranscriptWindow:
    """A run's transcript against the root model's window: what compaction
    remembers from turn to turn (and across continue-as-new)."""

    history_key: str | None = None
    """Transcript of the compacted turns; `history()` reads it."""
    compacted_turn: int = 0
    """The turn before which the last compaction ran (0: never)."""
    transcript_tokens: int = 0
    """The transcript's tokens as the provider counted them at the last root
    call (prompt plus reply); 0 when unknown."""

    def due(self, *, turn: int, transcript_bound: int, pending: list[dict[str, str]], max_output_tokens: int,
            window: int) -> bool:  # fmt: skip
        """`should_compact` for the root call of `turn`: the transcript as the
        provider counted it (else `transcript_bound`, a `token_bound`), the
        new messages by `messages_token_bound`. A transcript compacted at the
        previous turn is not compacted again."""
        if turn - 1 <= self.compacted_turn:
            return False
        transcript = self.transcript_tokens or transcript_bound
        due = should_compact(transcript, messages_token_bound(pending), max_output_tokens, window)
        return due and workflow.patched("compaction")

    def compacted(self, out: CompactOutput, turn: int) -> None:
        self.history_key, self.compacted_turn, self.transcript_tokens = out.history_key, turn, 0


class CompactInput(BaseModel):
    workflow_id: str
    turn: int
    """The turn about to start; names the records (`transcript/<turn>-compacted`)."""
    model: str
    request: str
    max_tokens: int
    stop: list[str] = []
    transcript_prev_key: str
    history_prev_key: str | None = None
    """History of earlier compactions, continued by this one."""
    attempt: int = 1


class CompactOutput(BaseModel):
    summary: str
    prompt_tokens: int
    completion_tokens: int
    usd: float
    transcript_key: str
    """The new transcript: the system prompt alone (the next root call appends the rest)."""
    history_key: str
    """Every message of every compacted turn so far."""
    system_tokens: int
    """`token_bound` of the new transcript."""
    replayed: bool = False


async def compact(
    ledger: Ledger,
    usage: Usage,
    *,
    model: ModelInfo,
    depth: int,
    turn: int,
    transcript_key: str,
    history_key: str | None,
    transcript_tokens: int,
    max_output_tokens: int,
    stop: list[str],
    timeout: timedelta,
) -> CompactOutput | None:
    """Ask the root model for the summary (a paid call like every other);
    None when the budget refuses it or it fails: the run then goes on with
    its transcript as it is (the provider has the last word on the window)."""
    request_tokens = transcript_tokens + messages_token_bound([{"role": "user", "content": COMPACTION_REQUEST}])

    async def attempt(number: int) -> CompactOutput:
        return await workflow.execute_activity(
            names.ACTIVITY_COMPACT_TRANSCRIPT,
            CompactInput(
                workflow_id=workflow.info().workflow_id,
                turn=turn,
                model=model.name,
                request=COMPACTION_REQUEST,
                max_tokens=max_output_tokens,
                stop=stop,
                transcript_prev_key=transcript_key,
                history_prev_key=history_key,
                attempt=number,
            ),
            result_type=CompactOutput,
            start_to_close_timeout=timeout,
            retry_policy=ONE_ATTEMPT,
            heartbeat_timeout=MODEL_CALL_HEARTBEAT_TIMEOUT,
            summary=compaction_summary(turn - 1, model.name, request_tokens),
        )

    try:
        out = await paid_model_call(
            ledger, usage, call_id=f"compact:{turn}", model=model, depth=depth,
            prompt_tokens=request_tokens, max_output_tokens=max_output_tokens, run_attempt=attempt,
        )  # fmt: skip
    except ActivityError as exc:
        raise_if_cancelled(exc)
        workflow.logger.warning("compaction failed, going on uncompacted: %s", error_text(exc))
        return None
    return None if isinstance(out, Refusal) else out
