"""Custom tools as the steps of a run see them: what a tool is (name,
description, JSON schema of its arguments), the call a cell sends its
workflow (the `tool_call` update) and the `tool_call` activity's input and
output. Shared by `workflows/` and `activities/`.

Arguments and results are JSON text bounded by `MAX_TOOL_JSON_BYTES` (the
inline limit of every other value that travels in a payload): a tool is a
lookup in an approved system, not a way to move documents.
"""

from __future__ import annotations

import hashlib
import keyword
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from workflows.refs import INLINE_LIMIT_BYTES

MAX_TOOL_JSON_BYTES = 16 * INLINE_LIMIT_BYTES
"""UTF-8 bytes of one call's arguments, and of its result, as JSON (64 KiB)."""
MAX_TOOLS_PER_RUN = 64
MAX_TOOL_NAME_CHARS = 64
MAX_TOOL_DESCRIPTION_CHARS = 2_000
"""A tool's description as the model sees it (its docstring, cut)."""

RESERVED_NAMES = frozenset(
    {"context", "history", "llm_query", "llm_query_batched", "rlm_query", "rlm_query_batched",
     "FINAL", "FINAL_VAR", "SHOW_VARS", "HostCallError", "ToolError", "call_tool"}
)
"""Names of the REPL that a tool may not take."""


def tool_name_problem(name: Any) -> str | None:
    """Why `name` cannot name a tool, or None."""
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        return f"{name!r} is not a Python identifier"
    if name.startswith("_"):
        return f"{name!r} starts with '_' (private names are not callable from cells)"
    if len(name) > MAX_TOOL_NAME_CHARS:
        return f"{name[:20]!r}... is longer than {MAX_TOOL_NAME_CHARS} characters"
    if name in RESERVED_NAMES:
        return f"{name!r} is a name the REPL already defines"
    return None


class ToolSpec(BaseModel):
    """What the model is told about one tool (no code, no secrets)."""

    model_config = ConfigDict(frozen=True)

    name: str
    description: str
    parameters: dict[str, Any]
    """JSON Schema of the keyword arguments (an object schema)."""
    signature: str
    """The Python signature as the model calls it, e.g. `(id: int) -> dict`."""


class ResolveToolsInput(BaseModel):
    names: list[str]


class ResolveToolsOutput(BaseModel):
    tools: list[ToolSpec]


def tool_call_digest(cell_id: str, name: str, args_json: str, occurrence: int) -> str:
    """What one call asks: the same call of a re-run cell has the same digest."""
    what = "\0".join([cell_id, name, args_json, str(occurrence)])
    return hashlib.sha256(what.encode()).hexdigest()


class ToolCallRequest(BaseModel):
    """Sent by a cell to its workflow as the `tool_call` update."""

    cell_id: str = Field(min_length=1, max_length=64)
    name: str = Field(min_length=1, max_length=200)
    args_json: str
    """The keyword arguments, bound to the tool's signature, as canonical JSON."""
    occurrence: int = Field(0, ge=0)
    """How many times this cell made the same call before."""
    digest: str

    def update_id(self) -> str:
        """Names exactly this call: Temporal answers an id it has seen with
        its first result whatever the payload (DESIGN.md section 9)."""
        return f"{self.cell_id}:tool:{self.digest[:32]}"


class ToolCallReply(BaseModel):
    """`result_json` on success; `error` when the tool raised or its step
    failed (the guest gets a ToolError); `refused` when no call was made
    (a tool not of this run, the cap reached: the guest gets the text as
    the call's value)."""

    result_json: str | None = None
    error: str | None = None
    refused: str | None = None


class ToolCallInput(BaseModel):
    workflow_id: str
    call_id: str
    name: str
    args_json: str


class ToolCallOutput(BaseModel):
    result_json: str | None = None
    error: str | None = None
    """The tool raised: `Type: message` (not retried: a tool with side
    effects must not run twice because it raised)."""


def tools_instructions(specs: list[ToolSpec]) -> str:
    """The system prompt's section on the run's tools (appended like the answer schema)."""
    lines = [
        "Tools: these functions are also defined in the REPL. Each call reaches an approved system outside "
        "the sandbox and returns JSON values (dict, list, str, number); a tool that fails raises ToolError "
        "with its message, and a call that is refused (unknown tool, limit reached) returns a string "
        "starting with \"Error:\" or \"Budget refused\". Call them from code, batch what you can, and print what "
        "you need to see."
    ]
    for spec in specs:
        description = "\n    ".join(spec.description.splitlines())
        lines.append(f"- `{spec.name}{spec.signature}`: {description}")
    return "\n".join(lines)
