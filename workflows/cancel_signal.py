"""The `cancel` signal's argument (of a run and of a session), whatever shape
a client sends it in.

Declared `str | None`, anything else failed to decode, and the SDK drops a
signal it cannot decode (a log line on the worker): a client in another
language that sent `{"reason": "..."}`, as TypeScript code naming its
arguments does, or a number, asked to cancel and the run went on, paid.
Now text, null, `{"reason": text}` and anything else (shown as JSON) all
cancel. Workflow code.
"""

from __future__ import annotations

import json
from typing import Any

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from workflows.request import clip_noting_length
    from workflows.step_common import ERROR_CHARS

__all__ = ["DEFAULT_CANCEL_REASON", "cancel_reason"]

DEFAULT_CANCEL_REASON = "cancelled by request"
# Runs and sessions started since this patch take a cancel whose reason is
# not text; older ones replay as they ran (the signal dropped).
ANY_REASON_PATCH = "cancel-with-a-reason-of-any-shape"


def cancel_reason(value: Any) -> str | None:
    """The reason to record for a cancel sent with `value`; None when this
    workflow's history is from before such a cancel was taken (drop it)."""
    if value is None or isinstance(value, str):
        return value or DEFAULT_CANCEL_REASON
    if not workflow.patched(ANY_REASON_PATCH):
        return None
    if isinstance(value, dict) and isinstance(value.get("reason"), str):
        return value["reason"] or DEFAULT_CANCEL_REASON
    return clip_noting_length(json.dumps(value, default=str), ERROR_CHARS)
