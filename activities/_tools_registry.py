"""Custom tools registered on a worker (`worker.py --tools package.module:TOOLS`,
or the setting RLM_TOOLS for the embedded worker).

A tool is a plain Python function (or `async def`) with a docstring and type
hints: its name is the name cells call, its docstring is what the model is
told, and its parameters' hints become the JSON Schema of its arguments. A
tool whose signature cannot travel as JSON (a parameter without a hint, a
hint with no JSON form, `*args` / `**kwargs`, no docstring) is refused when
the worker starts, with the tool and the parameter named: a run must never
discover it mid-cell.
"""

from __future__ import annotations

import builtins
import importlib
import inspect
import json
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError, create_model

from workflows.request import validation_errors
from workflows.tool_steps import MAX_TOOL_DESCRIPTION_CHARS, MAX_TOOL_JSON_BYTES, ToolSpec, tool_name_problem


SHADOWED_NAMES = frozenset({"document", "document_names", *dir(builtins)})
"""More names a cell already has than `tool_steps.RESERVED_NAMES` (REPL
functions, Python builtins): a tool `print` turned every print into a tool
call, a tool `document_names` broke `document()`. Refused here, where a
tool is registered, not in a run's request, so a run already going that
names one still replays."""


class ToolRegistrationError(ValueError):
    """A tool cannot be registered; the message names it."""


@dataclass(frozen=True)
class RegisteredTool:
    spec: ToolSpec
    fn: Callable[..., Any]
    signature: inspect.Signature
    args_model: type[BaseModel]
    result: TypeAdapter[Any] | None
    """Serialises the result by the return hint; None: plain `json.dumps`."""

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.fn)

    def bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        """The call's arguments by name, checked against the signature and
        the hints, as canonical JSON; TypeError / ValueError name the tool."""
        name = self.spec.name
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{name}{self.spec.signature}: {exc}") from None
        try:
            self.args_model.model_validate(dict(bound.arguments))
        except ValidationError as exc:
            raise TypeError(f"{name}(): wrong arguments: {validation_errors(exc)}") from None
        try:
            text = json.dumps(bound.arguments, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name}(): the arguments are not JSON: {exc}") from None
        if len(text.encode()) > MAX_TOOL_JSON_BYTES:
            raise ValueError(
                f"{name}(): the arguments are {len(text.encode()):,} bytes as JSON, at most "
                f"{MAX_TOOL_JSON_BYTES:,}; a tool takes keys and small values, not documents"
            )
        return text

    def arguments(self, args_json: str) -> dict[str, Any]:
        """The keyword arguments to call the function with (validated)."""
        model = self.args_model.model_validate_json(args_json)
        return {key: getattr(model, key) for key in self.signature.parameters}

    def result_json(self, value: Any) -> str:
        """The result as JSON; ValueError when it has no JSON form or is too large."""
        try:
            if self.result is not None:
                text = self.result.dump_json(value).decode()
            else:
                text = json.dumps(value, ensure_ascii=False)
        except Exception as exc:  # pydantic's and json's errors alike
            raise ValueError(f"the result of {self.spec.name}() is not JSON: {exc}") from None
        if len(text.encode()) > MAX_TOOL_JSON_BYTES:
            raise ValueError(
                f"the result of {self.spec.name}() is {len(text.encode()):,} bytes as JSON, "
                f"at most {MAX_TOOL_JSON_BYTES:,}"
            )
        return text


class ToolRegistry:
    """The tools of one worker, by name."""

    def __init__(self, tools: Mapping[str, RegisteredTool] | None = None) -> None:
        self._tools = dict(tools or {})

    @classmethod
    def from_functions(cls, functions: Mapping[str, Callable[..., Any]] | list[Callable[..., Any]]) -> ToolRegistry:
        items = functions.items() if isinstance(functions, Mapping) else [(f.__name__, f) for f in functions]
        tools: dict[str, RegisteredTool] = {}
        for name, fn in items:
            if name in tools:
                raise ToolRegistrationError(f"tool {name!r} is registered twice")
            tools[name] = register(name, fn)
        return cls(tools)

    @classmethod
    def from_setting(cls, value: str | None) -> ToolRegistry:
        """Tools from `package.module:NAME[,package.module:NAME...]`; NAME is a
        list of functions, a dict of name -> function, or one function."""
        functions: dict[str, Callable[..., Any]] = {}
        for target in [t.strip() for t in (value or "").split(",") if t.strip()]:
            for name, fn in _load(target):
                if name in functions:
                    raise ToolRegistrationError(f"tool {name!r} is registered twice (again by {target})")
                functions[name] = fn
        return cls.from_functions(functions)

    def get(self, name: str) -> RegisteredTool | None:
        return self._tools.get(name)

    def names(self) -> list[str]:
        return sorted(self._tools)


def register(name: str, fn: Callable[..., Any]) -> RegisteredTool:
    """One tool, checked: see the module docstring for what is refused."""
    if problem := tool_name_problem(name):
        raise ToolRegistrationError(f"tool {name!r}: {problem}")
    if name in SHADOWED_NAMES:
        raise ToolRegistrationError(
            f"tool {name!r}: a cell already has {name!r} (a Python builtin or a REPL function); "
            "a tool of that name would replace it in every cell: name the tool otherwise"
        )
    if not callable(fn):
        raise ToolRegistrationError(f"tool {name!r}: {fn!r} is not callable")
    doc = inspect.getdoc(fn)
    if not doc or not doc.strip():
        raise ToolRegistrationError(f"tool {name!r}: it has no docstring (the model is told what a tool does by it)")
    try:
        signature = inspect.signature(fn, eval_str=True)
        hints = typing.get_type_hints(fn)
    except Exception as exc:
        raise ToolRegistrationError(f"tool {name!r}: its signature cannot be read: {exc}") from None
    fields: dict[str, Any] = {}
    for param in signature.parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise ToolRegistrationError(
                f"tool {name!r}: parameter {param.name!r} is *args or **kwargs; a tool's arguments must be named "
                "and typed so they can travel as JSON"
            )
        if param.name not in hints:
            raise ToolRegistrationError(f"tool {name!r}: parameter {param.name!r} has no type hint")
        _require_json(name, f"parameter {param.name!r}", hints[param.name])
        fields[param.name] = (hints[param.name], ... if param.default is param.empty else param.default)
    result = None
    if "return" in hints and hints["return"] is not type(None):
        result = TypeAdapter(hints["return"]) if _require_json(name, "the return type", hints["return"]) else None
    try:
        args_model = create_model(f"{name}_arguments", __config__=ConfigDict(extra="forbid"), **fields)
        parameters = args_model.model_json_schema()
    except Exception as exc:
        raise ToolRegistrationError(f"tool {name!r}: its signature is not JSON-serialisable: {exc}") from None
    spec = ToolSpec(
        name=name,
        description=doc.strip()[:MAX_TOOL_DESCRIPTION_CHARS],
        parameters=parameters,
        signature=str(signature),
    )
    return RegisteredTool(spec=spec, fn=fn, signature=signature, args_model=args_model, result=result)


def _require_json(tool: str, what: str, hint: Any) -> bool:
    """Refuse a type hint with no JSON Schema (an arbitrary class, a callable)."""
    try:
        TypeAdapter(hint).json_schema()
    except Exception as exc:
        raise ToolRegistrationError(
            f"tool {tool!r}: {what} ({getattr(hint, '__name__', hint)!s}) is not JSON-serialisable: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None
    return True


def _load(target: str) -> list[tuple[str, Callable[..., Any]]]:
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ToolRegistrationError(f"tools {target!r}: write package.module:NAME (NAME a list or dict of functions)")
    try:
        value = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ToolRegistrationError(f"tools {target!r} cannot be loaded: {type(exc).__name__}: {exc}") from None
    if isinstance(value, Mapping):
        return list(value.items())
    if isinstance(value, (list, tuple)):
        return [(getattr(fn, "__name__", repr(fn)), fn) for fn in value]
    if callable(value):
        return [(value.__name__, value)]
    raise ToolRegistrationError(f"tools {target!r} is a {type(value).__name__}, not a list or dict of functions")
