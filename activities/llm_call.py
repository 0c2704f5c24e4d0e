"""The `llm_calls` activity (several `llm_query` attempts, each with its own
outcome; workflows/call_groups.py), the older one-call `llm_call`, and
`resolve_models`.

Large prompts and replies travel as object-storage references. A completed
call is recorded as soon as its reply arrives (activities/_call_records.py),
so a later attempt (the workflow retries, attempt by attempt, also after a
group was cut short by a crash) never pays for it twice. The record is
written beside the activity, not before it may complete: only an attempt that
never completed is ever retried, and a group does not wait on its last
call's S3 PUT (median 11 ms, p90 28 ms with 32 calls in flight).
"""

from __future__ import annotations

import asyncio

import structlog
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities._call_records import CallRecorder, RecordFinder
from activities._context_cache import adopt_local_manifest
from activities.context_store import ContextIntegrityError, ContextMissingError
from activities.llm import complete, to_application_error
from activities.object_store import UPLOAD_GRACE_S
from activities.runtime import WorkerRuntime, call_timeout_s, heartbeating
from workflows.names import ACTIVITY_LLM_CALL, ACTIVITY_LLM_CALLS, ACTIVITY_LLM_CALLS_IN_LANES, ACTIVITY_RESOLVE_MODELS
from workflows.refs import ContextRef
from workflows.steps import (
    LlmCallFailure,
    LlmCallInput,
    LlmCallOutput,
    LlmCallResult,
    LlmCallsInput,
    LlmCallsOutput,
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
        unknown one is reported by the request field that names it), key
        present; and a caller's ContextRef, if given: stored and sound."""
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
        if inp.context is None:
            return ResolveModelsOutput(models=models)
        try:
            ref = await self._rt.io(self._ref_for, inp.context.sha256)
        except (ContextMissingError, ContextIntegrityError) as exc:
            return ResolveModelsOutput(models=models, context_problem=f"context: {exc}")
        except Exception as exc:  # noqa: BLE001 - storage down: the run's own steps retry their reads
            log.warning("context_check_skipped", sha256=inp.context.sha256[:16], error=str(exc)[:300])
            return ResolveModelsOutput(models=models)
        return ResolveModelsOutput(models=models, context=ref)

    @activity.defn(name=ACTIVITY_LLM_CALL)
    async def llm_call(self, inp: LlmCallInput) -> LlmCallOutput:
        """One call per activity: what runs started before call groups schedule."""
        recorder = CallRecorder(self._rt, inp.workflow_id, None)
        retried = activity.info().attempt > 1
        return await heartbeating(self._call(inp, call_timeout_s(), recorder, RecordFinder(self._rt), retried=retried))

    @activity.defn(name=ACTIVITY_LLM_CALLS)
    async def llm_calls(self, inp: LlmCallsInput) -> LlmCallsOutput:
        """Several calls at once, each with its own outcome: one failing (or
        timing out) does not fail the others, and each completed one is
        recorded as soon as it completes."""
        http_timeout = max(10.0, inp.call_timeout_s)
        workflow_id = inp.calls[0].workflow_id if inp.calls else ""
        recorder, finder = CallRecorder(self._rt, workflow_id, inp.records), RecordFinder(self._rt)
        # Lanes: a call waits for one of them; the next starts as one ends.
        lanes = asyncio.Semaphore(inp.lanes or max(1, len(inp.calls)))
        results = await heartbeating(
            asyncio.gather(
                *(self._one(call, inp.call_timeout_s, http_timeout, recorder, finder, lanes) for call in inp.calls)
            )
        )
        return LlmCallsOutput(results=list(results))

    @activity.defn(name=ACTIVITY_LLM_CALLS_IN_LANES)
    async def llm_calls_in_lanes(self, inp: LlmCallsInput) -> LlmCallsOutput:
        """`llm_calls` for a group with lanes, under a name only workers that
        honour `lanes` register (workflows/names.py)."""
        return await self.llm_calls(inp)

    async def _one(
        self,
        inp: LlmCallInput,
        deadline_s: float,
        http_timeout_s: float,
        recorder: CallRecorder,
        finder: RecordFinder,
        lanes: asyncio.Semaphore,
    ) -> LlmCallResult:
        try:
            prompt, spent = None, 0.0
            if inp.attempt == 1:  # a retry may be answered from its record: read nothing first
                # Read before the call waits for a lane, so that a lane goes
                # from one reply straight to its next request (an S3 read of
                # a 200K-character prompt took 7 ms, p90 17 ms, with 32 in flight).
                # The read counts against the call's deadline, as when it ran in the lane.
                started = asyncio.get_running_loop().time()
                async with asyncio.timeout(deadline_s):
                    prompt = await self._read_prompt(inp)
                spent = asyncio.get_running_loop().time() - started
            async with lanes, asyncio.timeout(deadline_s - spent):
                out = await self._call(inp, http_timeout_s, recorder, finder, retried=False, prompt=prompt)
        except TimeoutError as exc:
            # As the single-call activity's start-to-close timeout: may be billed.
            error = to_application_error(exc, model=inp.model)
            return LlmCallResult(call_id=inp.call_id, failure=_failure(error))
        except ApplicationError as exc:
            return LlmCallResult(call_id=inp.call_id, failure=_failure(exc))
        except Exception as exc:  # noqa: BLE001 - one call's surprise is its own, not its group's
            return LlmCallResult(call_id=inp.call_id, failure=_failure(to_application_error(exc, model=inp.model)))
        return LlmCallResult(call_id=inp.call_id, output=out)

    async def _read_prompt(self, inp: LlmCallInput) -> str:
        if inp.context is None:
            # Inline, or usually its cell's, stored from this worker: no thread
            # hop (the storage threads may be busy storing that cell's prompts).
            if inp.prompt_ref is None:
                return inp.prompt or ""
            held = self._rt.store.cached_blob(inp.prompt_ref)
            if held is not None:
                return held.decode()
        try:
            return await self._rt.io(self._prompt, inp)
        except Exception as exc:
            # Nothing was sent: the attempt cost nothing.
            raise to_application_error(exc, sent=False) from exc

    async def _call(
        self,
        inp: LlmCallInput,
        timeout_s: float,
        recorder: CallRecorder,
        finder: RecordFinder,
        *,
        retried: bool,
        prompt: str | None = None,
    ) -> LlmCallOutput:
        """One attempt (`prompt`: read already); raises the ApplicationError the workflow reads."""
        if inp.attempt > 1 or retried:
            # An earlier attempt may have finished unseen (timed out, worker died).
            done = await finder.find(inp)
            if done is not None:
                return done
        if prompt is None:
            prompt = await self._read_prompt(inp)
        try:
            spec = self._rt.models.resolve(inp.model)
        except Exception as exc:
            raise to_application_error(exc, sent=False) from exc
        try:
            reply = await complete(spec, [{"role": "user", "content": prompt}], max_tokens=inp.max_tokens, timeout_s=timeout_s)
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
        recorder.add(inp.call_id, out)
        return out

    def _ref_for(self, sha256: str) -> ContextRef:
        """The context's reference rebuilt from its manifest: from a copy on
        this machine when `rlm run` wrote one (its upload may still run),
        else from the bucket."""
        adopt_local_manifest(self._rt.contexts, self._rt.context_cache_dir, sha256)
        return self._rt.contexts.ref_for(sha256, grace_s=UPLOAD_GRACE_S)

    def _prompt(self, inp: LlmCallInput) -> str:
        prompt = inp.prompt or ""
        if inp.prompt_ref is not None:
            # Its cell may still be storing it (ObjectStore.put_blob_behind).
            prompt = self._rt.store.get_blob(inp.prompt_ref, grace_s=UPLOAD_GRACE_S).decode()
        if inp.context is not None:
            value = self._rt.contexts.read_all(inp.context)
            text = value if isinstance(value, str) else "\n\n".join(value)
            prompt = f"{prompt}\n\n{text}"
        return prompt


def _failure(error: ApplicationError) -> LlmCallFailure:
    details = error.details[0] if error.details and isinstance(error.details[0], dict) else {}
    delay = error.next_retry_delay.total_seconds() if error.next_retry_delay is not None else None
    return LlmCallFailure(
        message=error.message, type=error.type, non_retryable=error.non_retryable, retry_after_s=delay, details=details
    )
