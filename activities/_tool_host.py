"""Host side of a cell's custom-tool calls.

Each call is checked against the tool's signature here (a wrong call fails
in the guest naming the TypeError, and no step is made), then sent to the run as a
`tool_call` update whose id names the cell and a digest of the call: a cell
re-run after a crash that makes the same call again is answered from the
run's record, and the tool is not called again.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from typing import Any

from activities._cell_host import CellHost
from activities._tools_registry import ToolRegistry
from sandbox_wasm import ToolError
from workflows.names import UPDATE_TOOL_CALL
from workflows.tool_steps import ToolCallReply, ToolCallRequest, tool_call_digest

CALL_TOOL = "call_tool"
"""The generic entry: `call_tool(name, *args, **kwargs)`, for a name known only at run time."""


def tool_docs(registry: ToolRegistry, names: list[str]) -> dict[str, str]:
    """Docstrings of the guest's stubs for a run's tools (name -> text)."""
    docs = {}
    for name in names:
        tool = registry.get(name)
        if tool is not None:
            docs[name] = f"{name}{tool.spec.signature}\n\n{tool.spec.description}"
    if names:
        docs[CALL_TOOL] = "call_tool(name, *args, **kwargs): call this run's tool `name` (same as name(...))."
    return docs


class ToolHost:
    """The host functions of one cell for the run's tools."""

    def __init__(self, cell: CellHost, registry: ToolRegistry, cell_id: str, allowed: list[str]) -> None:
        self._cell = cell
        self._registry = registry
        self._cell_id = cell_id
        self._allowed = list(allowed)
        self._asked: Counter[tuple[str, str]] = Counter()
        self.calls = 0

    def functions(self) -> dict[str, Callable[..., Any]]:
        if not self._allowed:
            return {}
        out: dict[str, Callable[..., Any]] = {name: self._stub(name) for name in self._allowed}
        out[CALL_TOOL] = self.call_tool
        return out

    def call_tool(self, tool: Any, /, *args: Any, **kwargs: Any) -> Any:
        # Positional-only: a tool may have a parameter called `name` or `tool`.
        if not isinstance(tool, str):
            raise TypeError(f"call_tool(name, ...): name must be a str, got {type(tool).__name__}")
        return self.call(tool, args, kwargs)

    def _stub(self, name: str) -> Callable[..., Any]:
        def stub(*args: Any, **kwargs: Any) -> Any:
            return self.call(name, args, kwargs)

        return stub

    def call(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The tool's result (JSON decoded); an error string when no call is
        made (unknown or disallowed tool, cap reached); ToolError when it raised."""
        if name not in self._allowed:
            what = "allowed in" if self._registry.get(name) is not None else "a tool of"
            return f"Error: {name!r} is not {what} this run; its tools: {', '.join(self._allowed)}"
        tool = self._registry.get(name)
        if tool is None:
            return f"Error: no tool named {name!r} is registered on this worker"
        args_json = tool.bind(args, kwargs)
        occurrence = self._asked[(name, args_json)]
        self._asked[(name, args_json)] += 1
        request = ToolCallRequest(
            cell_id=self._cell_id,
            name=name,
            args_json=args_json,
            occurrence=occurrence,
            digest=tool_call_digest(self._cell_id, name, args_json, occurrence),
        )
        reply: ToolCallReply = self._cell.send_update(
            UPDATE_TOOL_CALL, request, update_id=request.update_id(), result_type=ToolCallReply
        )
        self.calls += 1
        if reply.refused is not None:
            return reply.refused
        if reply.error is not None:
            raise ToolError(f"{name}(): {reply.error}")
        return json.loads(reply.result_json or "null")
