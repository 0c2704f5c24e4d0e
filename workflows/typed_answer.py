"""Typed answers: a run given `RunRequest.answer_schema` must answer with JSON
that validates against it.

Pure and deterministic (used inside the workflow and at the edge): checking
the schema itself, parsing and validating an answer, and the texts that tell
the model about the schema or send a wrong answer back. JSON Schema Draft
2020-12 through `jsonschema`; `$ref`s to other documents are not fetched
(the validator has no retriever), so a schema must be self-contained.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any

import jsonschema
from referencing.exceptions import Unresolvable

__all__ = [
    "MAX_SCHEMA_BYTES", "check_answer_schema", "correction_note", "parse_answer", "schema_instructions",
]

MAX_SCHEMA_BYTES = 64 * 1024
"""Largest `answer_schema`, as compact JSON: it travels in every request of
the chain and in the system prompt."""
SCHEMA_PROMPT_CHARS = 16_000
"""Schema text shown in the system prompt; the rest is cut with a note."""
ERROR_CHARS = 1_500
"""Validation errors sent back to the model or named in a result's reason."""
_ERRORS_SHOWN = 3

_FENCE = re.compile(r"^```[A-Za-z0-9_-]*[ \t]*\n(?P<body>.*?)\n?```$", re.DOTALL)

_INSTRUCTIONS = """\
Your final answer must be JSON that validates against this JSON Schema (Draft 2020-12):
```json
{schema}
```
Give it on its own line as FINAL(<the JSON>), e.g. FINAL({example}), or build it in the REPL as a \
dict or list and end with FINAL_VAR(name). Plain prose is not accepted as the final answer."""

_CORRECTION = (
    "Your final answer was not accepted: {error}. The answer must be JSON that validates against "
    "the answer schema given in the system prompt. Reply with the corrected answer on its own line: "
    "FINAL(<the JSON>); this is the only retry."
)


def check_answer_schema(schema: Any) -> dict[str, Any]:
    """`schema` if it is a usable JSON Schema object; a ValueError saying why not."""
    if not isinstance(schema, dict):
        raise ValueError(f"the schema must be a JSON Schema object, got {type(schema).__name__}")
    try:
        size = len(json.dumps(schema, separators=(",", ":")))
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValueError(f"the schema is not JSON: {exc}") from None
    if size > MAX_SCHEMA_BYTES:
        raise ValueError(f"the schema is {size:,} bytes as JSON, over the {MAX_SCHEMA_BYTES:,}-byte limit")
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ValueError(f"the schema is not a valid JSON Schema (Draft 2020-12): {_describe(exc)}") from None
    return schema


def parse_answer(text: str, schema: dict[str, Any]) -> tuple[Any, str | None]:
    """`(value, None)` for an answer that parses and validates, else `(None, why)`.

    Lenient in what models write: surrounding ```json fences, and a Python
    literal (what FINAL_VAR gives for a dict: `{'a': 1}`) if it is not JSON.
    """
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group("body").strip()
    try:
        value = json.loads(body)
    except (ValueError, RecursionError) as json_error:
        try:
            # Only JSON-shaped literals (no sets, bytes); tuples become lists.
            value = json.loads(json.dumps(ast.literal_eval(body)))
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return None, _clip(f"it is not JSON ({json_error})")
    try:
        errors = sorted(
            jsonschema.Draft202012Validator(schema).iter_errors(value), key=lambda e: [str(p) for p in e.absolute_path]
        )
    except RecursionError:
        return None, "it is nested too deeply to validate"
    except Unresolvable as exc:  # the schema's own fault: a $ref to nowhere (none are fetched)
        return None, _clip(f"the answer schema has a $ref that cannot be resolved ({exc})")
    if not errors:
        return value, None
    shown = "; ".join(_describe(e) for e in errors[:_ERRORS_SHOWN])
    more = f" (and {len(errors) - _ERRORS_SHOWN} more)" if len(errors) > _ERRORS_SHOWN else ""
    return None, _clip(f"it does not validate against the answer schema: {shown}{more}")


def schema_instructions(schema: dict[str, Any]) -> str:
    """System-prompt section: the schema (bounded) and how to answer with it."""
    text = json.dumps(schema)
    if len(text) > SCHEMA_PROMPT_CHARS:
        text = text[:SCHEMA_PROMPT_CHARS] + f" ... [schema cut: {len(text):,} characters in all]"
    example = '{"field": "value"}' if schema.get("type", "object") == "object" else "[1, 2]"
    return _INSTRUCTIONS.format(schema=text, example=example)


def correction_note(error: str) -> str:
    """The note that sends an invalid answer back once."""
    return _CORRECTION.format(error=error)


def _describe(error: jsonschema.ValidationError | jsonschema.SchemaError) -> str:
    """`at $.path: message`, the message cut (it may quote a large instance)."""
    path = "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    message = error.message if len(error.message) <= 300 else error.message[:300] + " ..."
    return f"at {path}: {message}"


def _clip(text: str) -> str:
    return text if len(text) <= ERROR_CHARS else text[:ERROR_CHARS] + " ..."
