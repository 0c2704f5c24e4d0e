"""Helpers for tests that drive `RLMSession` workflows (tests/test_sessions*.py
and the recorded session history)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from temporalio.client import Client, WorkflowHandle

from activities.settings import Settings
from tests.run_harness import ROOT, SUB, running_worker
from workflows.names import QUERY_SESSION, UPDATE_ASK, UPDATE_CLOSE, WORKFLOW_RLM_SESSION
from workflows.refs import ContextRef
from workflows.request import ModelChoice, RunLimits
from workflows.result import RunResult
from workflows.session_models import AskRequest, SessionCaps, SessionRequest, SessionSummary

TIMEOUT_S = 120.0
"""How long a test waits for one question's answer."""


def session_request(context: ContextRef, *, caps: dict[str, Any] | None = None,
                    question_caps: dict[str, Any] | None = None, **fields: Any) -> SessionRequest:
    return SessionRequest(
        context=context,
        models=ModelChoice(root=ROOT, sub=SUB),
        caps=SessionCaps(**(caps or {})),
        question_caps=question_caps or {},
        limits=RunLimits(cell_timeout_s=20.0),
        **fields,
    )


async def start_session(client: Client, settings: Settings, req: SessionRequest, session_id: str | None = None) -> WorkflowHandle:
    return await client.start_workflow(
        WORKFLOW_RLM_SESSION,
        req,
        id=session_id or f"test-session-{uuid.uuid4().hex[:10]}",
        task_queue=settings.task_queue,
        result_type=SessionSummary,
    )


async def ask(handle: WorkflowHandle, question: str, *, ask_id: str | None = None, **caps: Any) -> RunResult:
    """The answer to `question`; `ask_id` is the update id (a new one by default)."""
    return await handle.execute_update(
        UPDATE_ASK, AskRequest(question=question, caps=caps), id=ask_id, result_type=RunResult
    )


async def close(handle: WorkflowHandle) -> SessionSummary:
    return await handle.execute_update(UPDATE_CLOSE, result_type=SessionSummary)


async def summary(handle: WorkflowHandle) -> SessionSummary:
    return await handle.query(QUERY_SESSION, result_type=SessionSummary)


def asked(word: str, turn_text: str | None = "Turn 1 of"):
    """A fake-model rule match: the question starts with `word` (and, by
    default, the last message opens the question's first turn)."""

    def match(r) -> bool:
        return f"Question: {word}" in r.all_text and (turn_text is None or turn_text in r.last_user_text)

    return match


def first_and_second(settings: Settings, models: Any, req: SessionRequest) -> tuple[RunResult, RunResult]:
    """A session of `req` on a real worker (`models`: its model registry),
    asked "first?" then "second?", then closed: both results."""

    async def go() -> tuple[RunResult, RunResult]:
        async with running_worker(settings, models) as client:
            handle = await start_session(client, settings, req)
            first = await asyncio.wait_for(ask(handle, "first?"), TIMEOUT_S)
            second = await asyncio.wait_for(ask(handle, "second?"), TIMEOUT_S)
            await close(handle)
            return first, second

    return asyncio.run(go())
