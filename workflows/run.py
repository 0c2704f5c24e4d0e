"""The `RLMRun` workflow: one RLM run, turn by turn, until FINAL.

Each turn the root model writes code (`root_turn` activity), each ```repl
block runs in the WASM REPL (`run_cell` activity), sub-calls made by that code
come back here as `subcalls` updates (workflows/subcalls.py). Everything here
is deterministic: time is `workflow.now()`, I/O happens in activities.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeKey
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from workflows import names
    from workflows.budget import Caps, Ledger
    from workflows.request import RunRequest, RunResult, RunStatus, Usage
    from workflows.step_common import error_text
    from workflows.steps import (
        ModelInfo,
        ResolveModelsInput,
        ResolveModelsOutput,
        SubcallBatch,
        SubcallReply,
    )
    from workflows.subcalls import SubcallRouter
    from workflows.turn import ContinueAsNew, RunEnded, TurnDriver

ANSWER_INLINE_CHARS = 64 * 1024
DEPTH_KEY = SearchAttributeKey.for_int("RlmDepth")
ROOT_KEY = SearchAttributeKey.for_keyword("RlmRootRunId")
STATUS_KEY = SearchAttributeKey.for_keyword("RlmStatus")


@workflow.defn(name=names.WORKFLOW_RLM_RUN)
class RLMRun:
    @workflow.init
    def __init__(self, request: RunRequest) -> None:
        self._req = request
        info = workflow.info()
        self._root_id = request.parent.root_workflow_id if request.parent else info.workflow_id
        self._ledger = (
            Ledger.model_validate(request.resume.ledger)
            if request.resume
            else Ledger.root(request.caps, workflow.now(), depth=request.depth)
        )
        self._usage = request.resume.usage if request.resume else Usage()
        self._models: dict[str, ModelInfo] = {}
        self._router: SubcallRouter | None = None
        self._turn = request.resume.turn if request.resume else 0
        self._cells = request.resume.cells if request.resume else 0
        self._phase = "starting"
        self._cancel_reason: str | None = None
        self._driver: TurnDriver | None = None
        self._loop_task: asyncio.Task | None = None

    # -- the run -------------------------------------------------------------
    @workflow.run
    async def run(self, request: RunRequest) -> RunResult:
        # Lets the Temporal UI list a whole tree (RlmRootRunId) or a depth.
        workflow.upsert_search_attributes(
            [
                DEPTH_KEY.value_set(request.depth),
                ROOT_KEY.value_set(self._root_id),
                STATUS_KEY.value_set("running"),
            ]
        )
        try:
            self._models = await self._resolve_models()
        except ActivityError as exc:
            return self._result("failed", error_text(exc), None)
        self._router = SubcallRouter(
            request=request, models=self._models, ledger=self._ledger, usage=self._usage, root_workflow_id=self._root_id
        )
        if request.resume:
            self._router.children = list(request.resume.children)
        self._driver = TurnDriver(self, request)
        refusal = self._driver.check_start()
        if refusal is not None:
            return self._result("budget_exhausted", f"budget too small to start: {refusal.message}", None)
        if self._cancel_reason is not None:
            return self._result("cancelled", self._cancel_reason, None)
        # The loop runs as a task so a cancel signal can stop it at any await.
        self._loop_task = asyncio.ensure_future(self._driver.loop())
        try:
            status, reason, answer = await self._loop_task
        except asyncio.CancelledError:
            # Cancelled by signal or by Temporal: end cleanly with a partial result.
            status, reason, answer = "cancelled", self._cancel_reason or "cancelled by request", None
        except RunEnded as ended:
            status, reason, answer = ended.status, ended.reason, ended.answer
        except ContinueAsNew as chain:
            await workflow.wait_condition(workflow.all_handlers_finished)
            workflow.continue_as_new(chain.request)
        self._router.cancel_all()
        await workflow.wait_condition(workflow.all_handlers_finished)
        return self._result(status, reason, answer)

    async def _resolve_models(self) -> dict[str, ModelInfo]:
        out: ResolveModelsOutput = await workflow.execute_activity(
            names.ACTIVITY_RESOLVE_MODELS,
            ResolveModelsInput(names=self._req.models.allowed()),
            result_type=ResolveModelsOutput,
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=RetryPolicy(maximum_attempts=3),
        )
        return out.models

    def _result(self, status: RunStatus, reason: str | None, answer: str | None) -> RunResult:
        info = workflow.info()
        workflow.upsert_search_attributes([STATUS_KEY.value_set(status)])
        return RunResult(
            answer=answer[:ANSWER_INLINE_CHARS] if answer is not None else None,
            answer_ref=self._driver.answer_ref if self._driver else None,
            status=status,
            reason=reason,
            turns=self._turn,
            spend=self._ledger.spent(),
            usage=self._usage,
            workflow_id=info.workflow_id,
            run_id=info.run_id,
            root_workflow_id=self._root_id,
            depth=self._req.depth,
            transcript_key=self._driver.transcript_key if self._driver else None,
            children=self._router.children if self._router else [],
        )

    # -- sub-calls from cells ----------------------------------------------
    @workflow.update(name=names.UPDATE_SUBCALLS)
    async def subcalls(self, batch: SubcallBatch) -> SubcallReply:
        await workflow.wait_condition(lambda: self._router is not None)
        assert self._router is not None
        return await self._router.handle(batch)

    @subcalls.validator
    def _validate_subcalls(self, batch: SubcallBatch) -> None:
        if self._router is None:
            raise ValueError("the run has not started its REPL yet")
        self._router.validate(batch)

    # -- watching and steering -------------------------------------------
    @workflow.query(name=names.QUERY_PROGRESS)
    def progress(self) -> dict[str, Any]:
        spent = self._ledger.spent()
        out: dict[str, Any] = {
            "phase": self._phase,
            "turn": self._turn,
            "max_turns": self._ledger.caps.max_turns,
            "cells": self._cells,
            "depth": self._req.depth,
            "spent": spent.model_dump(),
            "caps": self._ledger.caps.model_dump(mode="json"),
            "usage": self._usage.model_dump(mode="json"),
        }
        if self._router:
            out.update(self._router.progress())
        return out

    @workflow.update(name=names.UPDATE_SET_CAPS)
    def set_caps(self, changes: dict[str, Any]) -> dict[str, Any]:
        self._ledger.set_caps(**changes)
        return self._ledger.caps.model_dump(mode="json")

    @set_caps.validator
    def _validate_set_caps(self, changes: dict[str, Any]) -> None:
        unknown = set(changes) - set(Caps.model_fields)
        if unknown:
            raise ValueError(f"unknown caps {sorted(unknown)}; known: {sorted(Caps.model_fields)}")

    @workflow.signal(name=names.SIGNAL_CANCEL)
    def cancel(self, reason: str | None = None) -> None:
        self._cancel_reason = reason or "cancelled by request"
        if self._loop_task is not None:
            self._loop_task.cancel()
