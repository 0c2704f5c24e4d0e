"""Workflow code stays deterministic: no I/O, clocks, randomness or
environment reads anywhere in `workflows/` (the standard of DESIGN.md).

Workers run workflows outside Temporal's sandbox by default
(settings.workflow_sandbox), and even inside it the helper modules the
workflows import are passed through, unchecked; so every module of the
package is read here instead: the modules it may import, and the calls it
may not make. Replays (tests/test_replay.py) still run in the sandbox.

A `set` is never iterated unless through `sorted()`: the order of a set of
strings changes with the process's hash seed, so a loop over one could
schedule steps in another order on replay (DESIGN.md section 9: a set
iterated in another order answered 298 of 300 updates with the wrong
prompts). A set is what is written as one (`{a, b}`, a set comprehension,
`set(...)`, `frozenset(...)`, an operation of them) or a name assigned or
annotated as one anywhere in the module; a set reached through anything
else (a function's return value) is left to review and to the replays."""

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


# Calls that walk their argument in its iteration order.
ORDERED_CONSUMERS = frozenset({"list", "tuple", "enumerate", "zip", "iter", "next", "reversed", "map", "filter"})


def _set_names(tree: ast.Module) -> set[str]:
    """Names (and attribute names) the module assigns a set to or annotates as one."""
    names: set[str] = set()
    for node in ast.walk(tree):
        targets, value, annotation = [], None, None
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign):
            targets, value, annotation = [node.target], node.value, node.annotation
        base = annotation.value if isinstance(annotation, ast.Subscript) else annotation
        annotated = isinstance(base, ast.Name) and base.id in ("set", "frozenset", "Set", "FrozenSet", "AbstractSet")
        if annotated or (value is not None and _is_set(value, set())):
            names.update(t.id if isinstance(t, ast.Name) else t.attr for t in targets
                         if isinstance(t, (ast.Name, ast.Attribute)))  # fmt: skip
    return names


def _is_set(node: ast.expr, names: set[str]) -> bool:
    if isinstance(node, (ast.Set, ast.SetComp)):
        return True
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        return node.func.id in ("set", "frozenset")
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Sub, ast.BitOr, ast.BitAnd, ast.BitXor)):
        return _is_set(node.left, names) or _is_set(node.right, names)
    if isinstance(node, ast.Name):
        return node.id in names
    return isinstance(node, ast.Attribute) and node.attr in names


def _iterated(node: ast.AST) -> list[ast.expr]:
    """The expressions `node` walks in their iteration order."""
    if isinstance(node, (ast.For, ast.AsyncFor)):
        return [node.iter]
    if isinstance(node, (ast.ListComp, ast.GeneratorExp, ast.DictComp)):
        return [gen.iter for gen in node.generators]
    if isinstance(node, ast.Call):
        func = node.func
        if isinstance(func, ast.Name) and func.id in ORDERED_CONSUMERS:
            return list(node.args)
        if isinstance(func, ast.Attribute) and func.attr in ("join", "extend", "gather"):
            return list(node.args)
    if isinstance(node, ast.Starred):
        return [node.value]
    return []


def problems(source: str, filename: str = "<source>") -> list[str]:
    """Each forbidden import, call or set iteration in `source`, as `file:line: what`."""
    found: list[str] = []
    tree = ast.parse(source, filename)
    set_names = _set_names(tree)
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        found += [f"{where}: iterates a set (use sorted())" for walked in _iterated(node) if _is_set(walked, set_names)]
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
        ("for name in {'a', 'b'}:\n    pass\n", "iterates a set (use sorted())"),
        ("ids = set(xs)\nfor i in ids:\n    pass\n", "iterates a set (use sorted())"),
        ("calls = [f(x) for x in set(xs) - set(ys)]\n", "iterates a set (use sorted())"),
        ("pending: set[str] = set()\nout = list(pending)\n", "iterates a set (use sorted())"),
        ("class G:\n    done: frozenset[str]\ndef f(g):\n    return ','.join(g.done)\n", "iterates a set (use sorted())"),
        ("async def f(names):\n    await asyncio.gather(*{step(n) for n in names})\n", "iterates a set (use sorted())"),
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
        "def names(changes, known):\n"
        "    unknown = set(changes) - set(known)\n"
        "    if 'x' in unknown and len(unknown) > 1:\n"
        "        return sorted(unknown)\n"
        "    return [k for k in changes if k not in unknown]\n"
    )
    assert problems(source) == []
