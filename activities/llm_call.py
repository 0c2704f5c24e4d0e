"""The `llm_call` activity (one `llm_query` item) and `resolve_models`.

Large prompts and replies travel as object-storage references. A completed
call is recorded under its call id, so a later attempt (the workflow retries,
attempt by attempt) never pays for it twice.
"""

from __future__ import annotations

import structlog
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.llm import complete, to_application_error
from activities.runtime import WorkerRuntime, call_timeout_s, heartbeating, run_key
from workflows.names import ACTIVITY_LLM_CALL, ACTIVITY_RESOLVE_MODELS
from workflows.steps import (
    LlmCallInput,
    LlmCallOutput,
    ResolveModelsInput,
    ResolveModelsOutput,
)

log = structlog.get_logger(__name__)


class LlmCallActivity:
    def __init__(self, runtime: WorkerRuntime) -> None:
        self._rt = runtime

    @activity.defn(name=ACTIVITY_RESOLVE_MODELS)
    async def resolve_models(self, inp: ResolveModelsInput) -> ResolveModelsOutput:
        """Check every model of a run before its first call: known (an
        unknown one is reported by the request field that names it), key present."""
        unknown = self._rt.models.unknown_fields(inp.fields)
        if unknown is not None:
            # The caller's mistake: retrying cannot help.
            raise ApplicationError(unknown, type="UnknownModel", non_retryable=True)
        models = {}
        for name in inp.names:
            try:
                spec = self._rt.models.resolve(name)
                self._rt.models.check_credentials(spec)
            except Exception as exc:
                raise to_application_error(exc) from exc
            models[name] = self._rt.models.info(name)
        return ResolveModelsOutput(models=models)

    @activity.defn(name=ACTIVITY_LLM_CALL)
    async def llm_call(self, inp: LlmCallInput) -> LlmCallOutput:
        key = run_key(inp.workflow_id, "calls", inp.call_id.replace(":", "-") + ".json")
        if inp.attempt > 1 or activity.info().attempt > 1:
            # An earlier attempt may have finished unseen (timed out, worker died).
            done = await self._rt.read_before_call(key)
            if done is not None:
                return LlmCallOutput.model_validate({**done, "replayed": True})
        try:
            prompt = await self._rt.io(self._prompt, inp)
            spec = self._rt.models.resolve(inp.model)
        except Exception as exc:
            # Nothing was sent: the attempt cost nothing.
            raise to_application_error(exc, sent=False) from exc
        try:
            reply = await heartbeating(
                complete(
                    spec, [{"role": "user", "content": prompt}], max_tokens=inp.max_tokens, timeout_s=call_timeout_s()
                )
            )
        except Exception as exc:
            raise to_application_error(exc) from exc
        text, ref = reply.text, None
        if len(text.encode()) > inp.inline_limit:
            ref = await self._rt.io(self._rt.store.put_blob, text.encode())
            text = None
        out = LlmCallOutput(
            text=text,
            text_ref=ref,
            prompt_tokens=reply.prompt_tokens,
            completion_tokens=reply.completion_tokens,
            usd=reply.usd,
        )
        await self._rt.io(self._rt.put_json, key, out.model_dump(mode="json"))
        return out

    def _prompt(self, inp: LlmCallInput) -> str:
        prompt = inp.prompt or ""
        if inp.prompt_ref is not None:
            prompt = self._rt.store.get_blob(inp.prompt_ref).decode()
        if inp.context is not None:
            value = self._rt.contexts.read_all(inp.context)
            text = value if isinstance(value, str) else "\n\n".join(value)
            prompt = f"{prompt}\n\n{text}"
        return prompt
