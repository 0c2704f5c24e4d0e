"""A worker interceptor for tests/test_session_cancel.py: a session gets the
handle of its question's run, once started, only after the session's
`cancel` signal came. So the cancel finds no run to signal, as one landing
while the run starts does in production (a window of milliseconds),
deterministically. Runs in the workflow sandbox: temporalio imports only."""

from __future__ import annotations

from typing import Any

from temporalio import workflow
from temporalio.worker import (
    HandleSignalInput,
    Interceptor,
    StartChildWorkflowInput,
    WorkflowInboundInterceptor,
    WorkflowInterceptorClassInput,
    WorkflowOutboundInterceptor,
)

from workflows.names import SIGNAL_CANCEL, WORKFLOW_RLM_SESSION


class QuestionStartOutlastsCancel(Interceptor):
    def workflow_interceptor_class(self, input: WorkflowInterceptorClassInput) -> type[WorkflowInboundInterceptor]:
        return _Inbound


class _CancelSeen:
    value = False


class _Inbound(WorkflowInboundInterceptor):
    def init(self, outbound: WorkflowOutboundInterceptor) -> None:
        self._seen = _CancelSeen()
        super().init(_Outbound(outbound, self._seen))

    async def handle_signal(self, input: HandleSignalInput) -> None:
        if input.signal == SIGNAL_CANCEL:
            self._seen.value = True  # before the handler runs: it looks for the run at once
        await super().handle_signal(input)


class _Outbound(WorkflowOutboundInterceptor):
    def __init__(self, next: WorkflowOutboundInterceptor, seen: _CancelSeen) -> None:
        super().__init__(next)
        self._seen = seen

    async def start_child_workflow(self, input: StartChildWorkflowInput) -> workflow.ChildWorkflowHandle[Any, Any]:
        handle = await super().start_child_workflow(input)
        if workflow.info().workflow_type == WORKFLOW_RLM_SESSION:
            await workflow.wait_condition(lambda: self._seen.value)
        return handle
