"""A worker running a changed RLMRun, for the live upgrade test: the change
(an extra model check before the models are resolved) ships behind
`workflow.patched`, as README "Changing workflow code safely" says.

    python -m tests.chaos.upgraded_worker   # settings from RLM_* as worker.py
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RawValue, RetryPolicy

with workflow.unsafe.imports_passed_through():
    from workflows import names
    from workflows.run import FAILURE_TYPES, RLMRun
    from workflows.refs import ContextRef
    from workflows.steps import ResolveModelsInput, ResolveModelsOutput

PATCH = "check-models-twice"


@workflow.defn(name=names.WORKFLOW_RLM_RUN, failure_exception_types=FAILURE_TYPES)
class RLMRunUpgraded(RLMRun):
    @workflow.run
    async def run(self, raw: RawValue):
        return await super().run(raw)

    async def _resolve_models(self, context: ContextRef | None) -> ResolveModelsOutput:
        if workflow.patched(PATCH):
            # New runs (and runs continued as new) take the new step; runs in
            # flight replay their history without it.
            await workflow.execute_activity(
                names.ACTIVITY_RESOLVE_MODELS,
                ResolveModelsInput(names=self._req.models.allowed()),
                result_type=ResolveModelsOutput,
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=RetryPolicy(maximum_attempts=3),
            )
        return await super()._resolve_models(context)


def main() -> None:
    import worker

    worker.RLMRun = RLMRunUpgraded  # build_worker registers the module's RLMRun
    worker.main([])


if __name__ == "__main__":
    main()
