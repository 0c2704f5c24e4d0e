"""`rlm schema`: the JSON Schema of what the `RLMRun` workflow takes and
returns, for callers in other languages (any Temporal SDK, the HTTP API).

The same document is checked in at workflows/schemas/run.schema.json
(tests/test_json_start.py keeps the two in sync).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from workflows.names import TASK_QUEUE_DEFAULT, WORKFLOW_RLM_RUN

__all__ = ["SCHEMA_FILE", "register", "run_schema", "schema_text"]

SCHEMA_FILE = Path(__file__).resolve().parent.parent / "workflows" / "schemas" / "run.schema.json"


def run_schema() -> dict[str, Any]:
    """RunRequest (as a caller sends it) and RunResult (as a run returns it)
    under `$defs`; refer to them as `run.schema.json#/$defs/RunRequest`."""
    # Imported here: every `rlm` command loads this module to register it.
    from pydantic.json_schema import models_json_schema

    from workflows.request import RunRequest
    from workflows.result import RunResult

    _, defs = models_json_schema(
        [(RunRequest, "validation"), (RunResult, "serialization")], ref_template="#/$defs/{model}"
    )
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"durable-rlm {WORKFLOW_RLM_RUN} workflow",
        "description": (
            f"Start workflow type {WORKFLOW_RLM_RUN!r} (task queue {TASK_QUEUE_DEFAULT!r} by default) with one "
            "argument, a RunRequest as JSON; the result is a RunResult. Use #/$defs/RunRequest and "
            "#/$defs/RunResult."
        ),
        "$defs": defs["$defs"],
    }


def schema_text(which: str = "all") -> str:
    """The document as printed and checked in (sorted keys, 2-space indent)."""
    from workflows.request import RunRequest
    from workflows.result import RunResult

    if which == "request":
        doc: dict[str, Any] = RunRequest.model_json_schema(mode="validation")
    elif which == "result":
        doc = RunResult.model_json_schema(mode="serialization")
    else:
        doc = run_schema()
    return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def register(sub: argparse._SubParsersAction) -> None:
    schema = sub.add_parser(
        "schema",
        help="print the JSON Schema of RunRequest and RunResult (what RLMRun takes and returns)",
    )
    schema.add_argument(
        "which",
        nargs="?",
        choices=("all", "request", "result"),
        default="all",
        help="both under $defs (default, as in workflows/schemas/run.schema.json), or one standalone",
    )
    schema.set_defaults(handler=_cmd_schema)


def _cmd_schema(args: argparse.Namespace, settings: object) -> int:
    sys.stdout.write(schema_text(args.which))
    return 0
