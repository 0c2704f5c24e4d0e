"""Workflow code stays deterministic: no I/O, clocks, randomness or
environment reads anywhere in `workflows/` (the standard of DESIGN.md).

Workers run workflows outside Temporal's sandbox by default
(settings.workflow_sandbox), and even inside it the helper modules the
workflows import are passed through, unchecked; so every module of the
package is read here instead: the modules it may import, and the calls it
may not make. Replays (tests/test_replay.py) still run in the sandbox.

What this cannot see (iterating a `set` of strings, whose order changes
with the process's hash seed) is left to review and to the replays."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"

# Top-level packages workflow code may import: pure computation only.
ALLOWED_IMPORTS = frozenset({
    "__future__", "abc", "ast", "asyncio", "base64", "bisect", "collections", "contextlib", "copy",
    "dataclasses", "datetime", "decimal", "enum", "functools", "hashlib", "heapq", "itertools", "json",
    "jsonschema", "keyword", "math", "operator", "pydantic", "re", "referencing", "string", "temporalio",
    "textwrap", "types", "typing", "unicodedata", "warnings", "workflows",
})  # fmt: skip
# Builtins that read or write the world, or differ from one process to the next
# (`id()` stays: workflows use it for identity within one step, never for order).
FORBIDDEN_BUILTINS = frozenset({"open", "print", "input", "hash", "exec", "eval", "breakpoint", "__import__"})
# Methods that read a clock or leave the workflow's event loop, whatever they are called on
# (`workflow.now()` is the workflow's clock, allowed).
FORBIDDEN_METHODS = frozenset({"now", "utcnow", "today", "to_thread", "run_in_executor", "urandom"})


def problems(source: str, filename: str = "<source>") -> list[str]:
    """Each forbidden import or call in `source`, as `file:line: what`."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            roots = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            roots = [] if node.level else [(node.module or "").split(".")[0]]
        else:
            roots = []
        found += [f"{where}: imports {root}" for root in roots if root not in ALLOWED_IMPORTS]
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in FORBIDDEN_BUILTINS:
            found.append(f"{where}: calls {func.id}()")
        if isinstance(func, ast.Attribute) and func.attr in FORBIDDEN_METHODS:
            owner = func.value.id if isinstance(func.value, ast.Name) else None
            if not (owner == "workflow" and func.attr == "now"):
                found.append(f"{where}: calls .{func.attr}()")
    return found


def test_every_workflow_module_is_deterministic():
    modules = sorted(WORKFLOWS.glob("*.py"))
    assert len(modules) > 30, "the package moved: read it where it is"
    found = [p for path in modules for p in problems(path.read_text(), f"workflows/{path.name}")]
    assert found == []


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import time\n", "imports time"),
        ("import os.path\n", "imports os"),
        ("from random import random\n", "imports random"),
        ("import uuid\n", "imports uuid"),
        ("from datetime import datetime\nx = datetime.now()\n", "calls .now()"),
        ("import datetime\nx = datetime.datetime.utcnow()\n", "calls .utcnow()"),
        ("from datetime import date\nx = date.today()\n", "calls .today()"),
        ("data = open('/etc/hosts').read()\n", "calls open()"),
        ("print('hello')\n", "calls print()"),
        ("key = hash('a')\n", "calls hash()"),
        ("import asyncio\nasync def f():\n    await asyncio.to_thread(len, 'a')\n", "calls .to_thread()"),
        ("async def f(loop):\n    await loop.run_in_executor(None, len, 'a')\n", "calls .run_in_executor()"),
    ],
)
def test_what_breaks_determinism_is_found(source, expected):
    assert [p.split(": ", 1)[1] for p in problems(source)] == [expected]


def test_what_workflows_use_is_not_flagged():
    source = (
        "from __future__ import annotations\n"
        "import asyncio\n"
        "from datetime import timedelta\n"
        "from temporalio import workflow\n"
        "from workflows.budget import Caps\n"
        "from . import names\n"
        "async def run():\n"
        "    started = workflow.now()\n"
        "    await asyncio.sleep(1)\n"
        "    return workflow.uuid4(), started + timedelta(seconds=1)\n"
    )
    assert problems(source) == []
