"""The `root_turn` activity: one call of the root model.

The transcript lives in object storage, one record per turn; the activity
returns only the reply and its usage. A later attempt finds the record of a
call that already completed and returns it instead of calling the model again.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import structlog
from temporalio import activity

from activities.llm import complete, to_application_error
from activities.runtime import WorkerRuntime, call_timeout_s, heartbeating, run_key
from workflows.names import ACTIVITY_ROOT_TURN
from workflows.parsing import MAX_REPLY_CHARS, ParsedReply, parse_reply
from workflows.result import ANSWER_INLINE_BYTES
from workflows.prompts import merge_consecutive
from workflows.steps import CellInput, RootTurnInput, RootTurnOutput

log = structlog.get_logger(__name__)
ROOT_REPLY_JSON_BYTES = 1536 * 1024
"""The most a root reply takes in the activity's result, as JSON: well under
Temporal's 4 MB payload limit (2 MB warns). A reply travels inline, and one
past the limit failed every attempt (each charged), then the run."""
_NOTE_CHARS = 200


class RootTurnActivity:
    def __init__(self, runtime: WorkerRuntime, prepare_repl: Callable[[CellInput], None] | None = None) -> None:
        """`prepare_repl`: starts making the REPL a turn's `warm_repl` asks for
        (RunCellActivity.prepare); None, the cell makes it."""
        self._rt = runtime
        self._prepare_repl = prepare_repl

    @activity.defn(name=ACTIVITY_ROOT_TURN)
    async def root_turn(self, inp: RootTurnInput) -> RootTurnOutput:
        if inp.warm_repl is not None and self._prepare_repl is not None:
            try:
                self._prepare_repl(inp.warm_repl)  # in the background, while the model answers
            except Exception:  # noqa: BLE001 - only ever a head start: the cell reports what is wrong
                log.warning("root_turn.prepare_skipped", workflow_id=inp.workflow_id, exc_info=True)
        key = run_key(inp.workflow_id, "transcript", f"{inp.turn:04d}.json")
        done = None
        if inp.attempt > 1 or activity.info().attempt > 1:
            done = await self._rt.read_before_call(key)
        if done is not None:
            log.info("root_turn.replayed", workflow_id=inp.workflow_id, turn=inp.turn)
            return RootTurnOutput.model_validate({**done["result"], "transcript_key": key, "replayed": True})
        messages: list[dict[str, str]] = []
        if inp.transcript_prev_key:
            prev = await self._rt.read_before_call(inp.transcript_prev_key)
            messages = list(prev["messages"]) if prev else []
        messages = merge_consecutive(messages + list(inp.append))
        try:
            spec = self._rt.models.resolve(inp.model)
            self._rt.models.check_credentials(spec)
            reply = await heartbeating(complete(spec, messages, max_tokens=inp.max_tokens, stop=inp.stop or None, timeout_s=call_timeout_s()))
        except Exception as exc:  # mapped in one place: activities/llm.py
            raise to_application_error(exc) from exc
        text = kept_reply(reply.text)
        if text is not reply.text:
            log.warning("root_turn.reply_clipped", workflow_id=inp.workflow_id, turn=inp.turn, chars=len(reply.text))
        parsed = parse_reply(text)
        result = {
            "reply": text,
            "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": reply.completion_tokens,
            "usd": reply.usd,
            "usage_estimated": reply.usage_estimated,
            "final_ref": await self._long_final(parsed),
        }
        # The transcript keeps the reply as parsed: an invented "User:" turn
        # that the parser cut must never be shown back to the model.
        record = {"messages": messages + [{"role": "assistant", "content": parsed.text}], "result": result}
        await self._rt.io(self._rt.put_json, key, record)
        log.info(
            "root_turn.done",
            workflow_id=inp.workflow_id,
            turn=inp.turn,
            model=inp.model,
            prompt_tokens=reply.prompt_tokens,
            completion_tokens=reply.completion_tokens,
        )
        return RootTurnOutput(transcript_key=key, **result)

    async def _long_final(self, parsed: ParsedReply) -> dict | None:
        """A `FINAL(...)` answer longer than a result holds inline, stored
        whole (it used to be cut at 64 KiB, the rest only in the transcript)."""
        final = parsed.final
        answer = final.value.encode() if final is not None and final.kind == "answer" else b""
        if len(answer) <= ANSWER_INLINE_BYTES:
            return None
        try:
            ref = await self._rt.io(self._rt.store.put_blob, answer)
        except Exception as exc:  # noqa: BLE001 - the reply is paid for: keep it, cut (the result says so)
            log.warning("root_turn.final_not_stored", error=str(exc)[:300], bytes=len(answer))
            return None
        return ref.model_dump(mode="json")


def kept_reply(text: str) -> str:
    """`text` itself, or (past the parser's MAX_REPLY_CHARS, or past
    ROOT_REPLY_JSON_BYTES as JSON, where a control character takes 6 bytes)
    its head with a note saying how much was cut, which the model then sees."""
    if len(text) * 6 <= ROOT_REPLY_JSON_BYTES - 2:  # fits even if all of it were escaped
        return text
    if len(text) <= MAX_REPLY_CHARS and _json_bytes(text) <= ROOT_REPLY_JSON_BYTES:
        return text
    budget = ROOT_REPLY_JSON_BYTES - 6 * _NOTE_CHARS
    kept = text[: MAX_REPLY_CHARS - _NOTE_CHARS]
    while (size := _json_bytes(kept)) > budget:
        kept = kept[: min(len(kept) - 1, int(len(kept) * budget / size))]
    return kept + f"\n[the worker kept the first {len(kept):,} of this reply's {len(text):,} characters]"


def _json_bytes(text: str) -> int:
    return len(json.dumps(text, ensure_ascii=False).encode())
