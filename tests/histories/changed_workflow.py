"""One change to RLMRun made two ways, for tests/test_replay.py: a new step
before the models are resolved, added carelessly (runs in flight break on
replay) and behind `workflow.patched` (they replay). Its own module: the
replayer's sandbox re-imports the module that defines a workflow, and this
one does no file-system work at import."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RawValue

with workflow.unsafe.imports_passed_through():
    from workflows import names
    from workflows.run import FAILURE_TYPES, RLMRun
    from workflows.refs import ContextRef
    from workflows.steps import ResolveModelsOutput

NEW_STEP = "check_models_again"  # no worker has this activity: replay never runs it


async def _new_step() -> None:
    await workflow.execute_activity(NEW_STEP, start_to_close_timeout=timedelta(seconds=30))


@workflow.defn(name=names.WORKFLOW_RLM_RUN, failure_exception_types=FAILURE_TYPES)
class RLMRunChangedCarelessly(RLMRun):
    @workflow.run
    async def run(self, raw: RawValue):
        return await super().run(raw)

    async def _resolve_models(self, context: ContextRef | None) -> ResolveModelsOutput:
        await _new_step()
        return await super()._resolve_models(context)


@workflow.defn(name=names.WORKFLOW_RLM_RUN, failure_exception_types=FAILURE_TYPES)
class RLMRunChangedBehindPatch(RLMRun):
    @workflow.run
    async def run(self, raw: RawValue):
        return await super().run(raw)

    async def _resolve_models(self, context: ContextRef | None) -> ResolveModelsOutput:
        if workflow.patched("ingest-before-models"):
            await _new_step()  # runs started by a worker with this code
        return await super()._resolve_models(context)  # runs in flight carry on as before
