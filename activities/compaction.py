"""The `compact_transcript` activity: the root model summarises its own
transcript, which then restarts from the system prompt (workflows/compaction.py).

Writes two records: the history (every message of the compacted turns,
continuing earlier compactions), read by cells through `history()`, and the
new transcript. A later attempt answers from the records of an earlier one
that finished unseen, without calling the model again.
"""

from __future__ import annotations

import structlog
from temporalio import activity

from activities.llm import complete, to_application_error
from activities.runtime import WorkerRuntime, call_timeout_s, heartbeating, run_key
from workflows.budget import messages_token_bound
from workflows.compaction import CompactInput, CompactOutput
from workflows.names import ACTIVITY_COMPACT_TRANSCRIPT
from workflows.prompts import merge_consecutive

log = structlog.get_logger(__name__)


class CompactionActivity:
    def __init__(self, runtime: WorkerRuntime) -> None:
        self._rt = runtime

    @activity.defn(name=ACTIVITY_COMPACT_TRANSCRIPT)
    async def compact_transcript(self, inp: CompactInput) -> CompactOutput:
        key = run_key(inp.workflow_id, "transcript", f"{inp.turn:04d}-compacted.json")
        history_key = run_key(inp.workflow_id, "history", f"{inp.turn:04d}.json")
        if inp.attempt > 1 or activity.info().attempt > 1:
            done = await self._rt.io(self._rt.get_json, key)
            if done is not None:
                return CompactOutput.model_validate({**done["result"], "replayed": True})
        prev = await self._rt.io(self._rt.get_json, inp.transcript_prev_key)
        messages = list(prev["messages"]) if prev else []
        earlier = []
        if inp.history_prev_key:
            record = await self._rt.io(self._rt.get_json, inp.history_prev_key)
            earlier = list(record["messages"]) if record else []
        asked = merge_consecutive(messages + [{"role": "user", "content": inp.request}])
        try:
            spec = self._rt.models.resolve(inp.model)
            self._rt.models.check_credentials(spec)
            reply = await heartbeating(
                complete(spec, asked, max_tokens=inp.max_tokens, stop=inp.stop or None, timeout_s=call_timeout_s())
            )
        except Exception as exc:  # mapped in one place: activities/llm.py
            raise to_application_error(exc) from exc
        system = [m for m in messages[:1] if m.get("role") == "system"]
        # The system prompt once, then every turn in order, this request and its summary too.
        history = earlier + (messages[len(system) :] if earlier else messages)
        history += [{"role": "user", "content": inp.request}, {"role": "assistant", "content": reply.text}]
        await self._rt.io(self._rt.put_json, history_key, {"messages": history})
        result = CompactOutput(
            summary=reply.text,
            prompt_tokens=reply.prompt_tokens,
            completion_tokens=reply.completion_tokens,
            usd=reply.usd,
            transcript_key=key,
            history_key=history_key,
            system_tokens=messages_token_bound(system),
        )
        await self._rt.io(self._rt.put_json, key, {"messages": system, "result": result.model_dump(mode="json")})
        log.info(
            "compact_transcript.done", workflow_id=inp.workflow_id, turn=inp.turn,
            messages=len(messages), prompt_tokens=reply.prompt_tokens, summary_chars=len(reply.text),
        )  # fmt: skip
        return result
