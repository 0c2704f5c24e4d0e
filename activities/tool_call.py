"""The `tool_call` activity (one call of a custom tool) and `resolve_tools`.

Tools run here, on the worker, never inside the sandbox. A finished call is
recorded under its call id before the activity reports, so a later attempt
(the worker died between the tool's return and the report) answers from the
record instead of calling the tool again.
"""

from __future__ import annotations

import asyncio
import functools
from datetime import datetime, timezone

import structlog
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities._tool_threads import ToolThreadsBusy
from activities.runtime import WorkerRuntime, heartbeating, run_key
from activities.terminal_text import without_surrogates
from workflows.names import ACTIVITY_RESOLVE_TOOLS, ACTIVITY_TOOL_CALL
from workflows.tool_steps import ResolveToolsInput, ResolveToolsOutput, ToolCallInput, ToolCallOutput

log = structlog.get_logger(__name__)
# What a call keeps of its start-to-close timeout to record and report its
# answer: a call that times out in the activity is answered, not retried.
_REPORT_S = 2.0


class ToolCallActivity:
    def __init__(self, runtime: WorkerRuntime) -> None:
        self._rt = runtime

    @activity.defn(name=ACTIVITY_RESOLVE_TOOLS)
    async def resolve_tools(self, inp: ResolveToolsInput) -> ResolveToolsOutput:
        """The specs of a run's tools; a name this worker did not register
        fails the run at once, naming `tools[i]`."""
        specs = []
        for index, name in enumerate(inp.names):
            tool = self._rt.tools.get(name)
            if tool is None:
                registered = self._rt.tools.names()
                raise ApplicationError(
                    f"tools[{index}]: no worker registered a tool named {name!r}; "
                    f"registered: {registered or 'none (start workers with --tools package.module:TOOLS)'}",
                    type="UnknownTool",
                    non_retryable=True,
                )
            specs.append(tool.spec)
        return ResolveToolsOutput(tools=specs)

    @activity.defn(name=ACTIVITY_TOOL_CALL)
    async def tool_call(self, inp: ToolCallInput) -> ToolCallOutput:
        key = run_key(inp.workflow_id, "tools", inp.call_id.replace(":", "-") + ".json")
        done = await self._rt.recorded(key)
        if done is not None:
            return ToolCallOutput.model_validate(done)
        tool = self._rt.tools.get(inp.name)
        if tool is None:
            # Workers of one task queue should register the same tools; another may have it.
            raise ApplicationError(f"this worker has no tool named {inp.name!r}", type="UnknownTool")
        seconds = _answer_within_s()
        limit: asyncio.Timeout | None = None
        try:
            kwargs = tool.arguments(inp.args_json)
            async with asyncio.timeout(seconds) as limit:
                if tool.is_async:
                    value = await heartbeating(tool.fn(**kwargs))
                else:
                    value = await heartbeating(self._rt.tool_threads.run(functools.partial(tool.fn, **kwargs)))
            out = ToolCallOutput(result_json=tool.result_json(value))
        except asyncio.CancelledError:
            raise
        except TimeoutError as exc:
            if limit is None or not limit.expired():  # the tool's own (a socket's): its answer, as any raise
                out = _raised(inp, exc)
            else:
                # Its answer too: a timed-out call that Temporal retried ran the
                # tool (and its side effects) again, up to three times.
                log.info("tool_call.timed_out", tool=inp.name, call_id=inp.call_id, seconds=seconds)
                within = f"{_timeout_s():g} s"
                out = ToolCallOutput(error=f"TimeoutError: the tool did not return within {within}; it is not called again")
        except ToolThreadsBusy as exc:
            out = ToolCallOutput(error=f"ToolThreadsBusy: {exc}")
        except Exception as exc:
            out = _raised(inp, exc)
        await self._rt.io(self._rt.put_json, key, out.model_dump(mode="json"))
        return out


def _raised(inp: ToolCallInput, exc: Exception) -> ToolCallOutput:
    """The tool's own failure is its answer (the guest gets a ToolError):
    running a tool with side effects again because it raised could repeat them."""
    log.info("tool_call.raised", tool=inp.name, call_id=inp.call_id, error=repr(exc)[:500])
    return ToolCallOutput(error=without_surrogates(f"{type(exc).__name__}: {exc}"[:4000]))


def _timeout_s() -> float | None:
    limit = activity.info().start_to_close_timeout
    return limit.total_seconds() if limit else None


def _answer_within_s() -> float | None:
    """What is left of this attempt's start-to-close timeout, less what the
    call needs to record and report its answer (None: no timeout set)."""
    info, seconds = activity.info(), _timeout_s()
    if seconds is None:
        return None
    share = max(seconds / 2, seconds - _REPORT_S)
    spent = (datetime.now(timezone.utc) - info.started_time).total_seconds()
    return max(0.05, share - max(0.0, spent))
