"""Helpers for tests that drive real runs: a real worker in this process (or
in a subprocess), the real Temporal dev server and S3 server from the session
fixtures, and the scripted model server reached through litellm."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHandle, WorkflowHistory

from activities._repl_pool import ReplPool
from activities.context_store import ContextStore
from activities.llm import ModelRegistry
from activities.settings import Settings
from tests.fixtures_llm import models_json
from worker import build_worker, connect
from workflows.budget import Caps
from workflows.names import WORKFLOW_RLM_RUN
from workflows.refs import ContextRef
from workflows.request import ModelChoice, RunLimits, RunRequest
from workflows.result import RunResult

REPO = Path(__file__).resolve().parent.parent
ROOT = "fake-root"
SUB = "fake-sub"


def isolated(settings: Settings) -> Settings:
    """The session's settings with a task queue of this test's own."""
    return settings.model_copy(update={"task_queue": f"test-{uuid.uuid4().hex[:10]}"})


def request(
    question: str,
    context: ContextRef | str,
    *,
    caps: dict[str, Any] | None = None,
    limits: dict[str, Any] | None = None,
    models: ModelChoice | None = None,
) -> RunRequest:
    return RunRequest(
        question=question,
        context=context,
        models=models or ModelChoice(root=ROOT, sub=SUB),
        caps=Caps(**(caps or {})),
        limits=RunLimits(**({"cell_timeout_s": 20.0} | (limits or {}))),
    )


@contextlib.asynccontextmanager
async def worker_and_pool(settings: Settings, models: ModelRegistry) -> AsyncIterator[tuple[Client, ReplPool]]:
    """A real worker (workflow + activities) on `settings.task_queue`, and
    its REPL pool (to evict from, or to force cold cells)."""
    client = await connect(settings)
    worker, pool = build_worker(client, settings, models=models)
    try:
        async with worker:
            yield client, pool
    finally:
        pool.close()


@contextlib.asynccontextmanager
async def running_worker(settings: Settings, models: ModelRegistry) -> AsyncIterator[Client]:
    """A real worker (workflow + activities) on `settings.task_queue`."""
    async with worker_and_pool(settings, models) as (client, _pool):
        yield client


async def start(
    client: Client, settings: Settings, req: RunRequest | dict[str, Any], workflow_id: str | None = None
) -> WorkflowHandle:
    """Start an `RLMRun`; `req` is a RunRequest, or the raw JSON a caller in
    another language would send (checked by the workflow, not here)."""
    return await client.start_workflow(
        WORKFLOW_RLM_RUN,
        req,
        id=workflow_id or f"test-run-{uuid.uuid4().hex[:10]}",
        task_queue=settings.task_queue,
        result_type=RunResult,
    )


async def run(client: Client, settings: Settings, req: RunRequest, timeout_s: float = 120.0) -> RunResult:
    handle = await start(client, settings, req)
    return await asyncio.wait_for(handle.result(), timeout_s)


def run_once(settings: Settings, models: ModelRegistry, req: RunRequest, timeout_s: float = 120.0) -> RunResult:
    """Start a worker, run `req` to its result, stop the worker."""

    async def go() -> RunResult:
        async with running_worker(settings, models) as client:
            return await run(client, settings, req, timeout_s)

    return asyncio.run(go())


def put_context(contexts: ContextStore, value: str | list[str]) -> ContextRef:
    return contexts.put_value(value)


def repl(code: str) -> str:
    """A root-model reply made of one ```repl``` block."""
    return f"Let me look.\n```repl\n{code.strip()}\n```\n"


def start_worker_process(
    settings: Settings, fake_url: str, log_path: Path, *, module: str | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """A worker in a process of its own (one a test can kill -9), its models
    the scripted server at `fake_url`, its JSON log appended to `log_path`.
    `module`: run this module (`python -m`) instead of worker.py; `env`: extra variables."""
    env = {**os.environ, **settings.to_env(), "RLM_MODELS_JSON": models_json(fake_url), "RLM_LOG_JSON": "1", **(env or {})}
    argv = [sys.executable, "-m", module] if module else [sys.executable, str(REPO / "worker.py")]
    log = open(log_path, "ab")  # noqa: SIM115 - the child process owns it
    return subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=log, start_new_session=True)


def completed_activities(history: WorkflowHistory, activity_type: str) -> int:
    """How many activities of `activity_type` completed in `history`."""
    scheduled = {
        e.event_id
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
        and e.activity_task_scheduled_event_attributes.activity_type.name == activity_type
    }
    return sum(
        1
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED
        and e.activity_task_completed_event_attributes.scheduled_event_id in scheduled
    )
