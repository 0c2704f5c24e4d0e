"""Custom-tool calls made from cell code: each is a `tool_call` activity.

A cell's host sends each call to its workflow as the `tool_call` update
(activities/_tool_host.py), like sub-calls (workflows/subcalls.py): the
update id names what is asked, the workflow checks the call against the
run's tools and the `max_tool_calls` cap before anything runs, runs it as
its own activity (a step in the Temporal UI, retried when a worker dies)
and remembers the answer, so a cell re-run after a crash is answered from
memory and the tool is not called again.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from workflows import names
    from workflows.budget import Ledger, Spend
    from workflows.once_per_key import OncePerKey
    from workflows.request import RunRequest
    from workflows.step_common import error_text, raise_if_cancelled
    from workflows.summaries import tool_call_summary
    from workflows.tool_steps import (
        MAX_TOOL_JSON_BYTES,
        ToolCallInput,
        ToolCallOutput,
        ToolCallReply,
        ToolCallRequest,
        tool_call_digest,
    )

# A dead worker is noticed after this (the activity heartbeats every 2 s).
TOOL_HEARTBEAT_TIMEOUT = timedelta(seconds=10)
# Retries cover a worker that died or timed out, not the tool's own exception
# (that is its answer: see activities/tool_call.py).
TOOL_RETRY = RetryPolicy(initial_interval=timedelta(milliseconds=500), maximum_attempts=3)


class ToolRouter:
    """Runs and remembers the custom-tool calls of one run."""

    def __init__(self, *, request: RunRequest, ledger: Ledger) -> None:
        self._req = request
        self._ledger = ledger
        self._once: OncePerKey[ToolCallReply] = OncePerKey()
        self.updates = 0
        self.calls = 0
        self.closed = False

    def validate(self, call: ToolCallRequest, update_id: str, max_updates: int) -> None:
        if self.closed:
            raise ValueError("the run is finishing; no new tool calls are accepted")
        if self.updates >= max_updates:
            raise ValueError(f"this run made {self.updates} tool calls, the most one run may make before a turn ends")
        if len(call.args_json.encode()) > MAX_TOOL_JSON_BYTES:
            raise ValueError(f"tool call arguments over {MAX_TOOL_JSON_BYTES:,} bytes of JSON")
        digest = tool_call_digest(call.cell_id, call.name, call.args_json, call.occurrence)
        if call.digest != digest or update_id != call.update_id():
            raise ValueError(
                f"tool call {update_id!r} does not match its content: the update id must be "
                "ToolCallRequest.update_id() and the digest tool_call_digest() of the call"
            )

    async def handle(self, call: ToolCallRequest) -> ToolCallReply:
        self.updates += 1
        key = f"{call.cell_id}:tool:{call.digest[:24]}"
        return await self._once.ask(key, lambda: self._run(call, key))

    def cancel_all(self) -> None:
        self.closed = True
        self._once.cancel_running()

    async def _run(self, call: ToolCallRequest, key: str) -> ToolCallReply:
        allowed = self._req.tools
        if call.name not in allowed:
            return ToolCallReply(refused=f"Error: {call.name!r} is not one of this run's tools: {', '.join(allowed)}")
        if refusal := self._ledger.reserve_tool_call(key, workflow.now()):
            return ToolCallReply(refused=refusal.message)
        try:
            out: ToolCallOutput = await workflow.execute_activity(
                names.ACTIVITY_TOOL_CALL,
                ToolCallInput(
                    workflow_id=workflow.info().workflow_id, call_id=key, name=call.name, args_json=call.args_json
                ),
                result_type=ToolCallOutput,
                summary=tool_call_summary(call.name, call.args_json),
                start_to_close_timeout=timedelta(seconds=self._req.limits.tool_call_timeout_s),
                heartbeat_timeout=TOOL_HEARTBEAT_TIMEOUT,
                retry_policy=TOOL_RETRY,
            )
        except ActivityError as exc:
            raise_if_cancelled(exc)
            self._ledger.charge(key)  # it may have run before the worker died
            return ToolCallReply(error=f"the call failed after its retries: {error_text(exc)}")
        self._ledger.settle(key, Spend(tool_calls=1))
        self.calls += 1
        return ToolCallReply(result_json=out.result_json, error=out.error)
