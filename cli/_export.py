"""`rlm export RUN_ID`: a run and its child runs as JSONL in the shape of the
`rlms` 0.1.3 logger (`RLMLogger`), so the paper authors' tools read it.

Line 1 is `{"type": "metadata", ...}` (`RLMMetadata.to_dict()`), then one
`{"type": "iteration", ...}` line per root turn (`RLMIteration.to_dict()`):
`prompt` (the messages sent), `response`, `code_blocks` with `code` and
`result` {stdout, stderr, locals, execution_time, rlm_calls, final_answer},
`final_answer` and `iteration_time`. Each sub-call is an `RLMChatCompletion`
dict in `rlm_calls`; a child run's whole trajectory sits in its call's
`metadata` ({"run_metadata", "iterations"}), as `rlms` nests children.
Where this differs from `rlms` is listed in the README.
"""

from __future__ import annotations

from typing import Any

from cli._trace import TraceReader

__all__ = ["export_lines", "trajectory"]

ENGINE = "durable-rlm"


def _usage(model: str | None, tokens_in: int | None, tokens_out: int | None, usd: float) -> dict[str, Any]:
    if not model:
        return {"model_usage_summaries": {}}
    return {
        "model_usage_summaries": {
            model: {
                "total_calls": 1,
                "total_input_tokens": tokens_in or 0,
                "total_output_tokens": tokens_out or 0,
                "total_cost": usd,
            }
        },
        "total_cost": usd,
    }


def _full(reader: TraceReader, text: str | None, key: str | None) -> str:
    """The whole text of a value that may have been stored by reference."""
    if key:
        try:
            return reader.read_text(key)
        except Exception as exc:  # a missing object must not lose the rest of the export
            return f"[could not read {key}: {exc}]"
    return text or ""


def _call(reader: TraceReader, item: dict[str, Any], model_root: str | None) -> dict[str, Any]:
    spend = item.get("spend") or {}
    out: dict[str, Any] = {
        "root_model": item.get("model") or model_root,
        "prompt": _full(reader, item.get("prompt"), item.get("prompt_ref")),
        "response": "" if item.get("answer_error") else _full(reader, item.get("reply"), item.get("reply_ref")),
        "usage_summary": _usage(item.get("model"), item.get("tokens_in"), item.get("tokens_out"), spend.get("usd", 0.0)),
        "execution_time": item.get("seconds") or 0.0,
    }
    if item.get("answer_error") or item.get("error"):
        out["error"] = item.get("answer_error") or item.get("error")
    if item.get("child") is not None:
        child = item["child"]
        out["usage_summary"] = {"model_usage_summaries": _usage_by_model(child), "total_cost": child["spend"]["usd"]}
        out["metadata"] = trajectory(reader, child)
    return out


def _usage_by_model(trace: dict[str, Any]) -> dict[str, Any]:
    by_model = (trace.get("usage") or {}).get("by_model") or {}
    return {
        name: {
            "total_calls": u.get("calls", 0),
            "total_input_tokens": u.get("prompt_tokens", 0),
            "total_output_tokens": u.get("completion_tokens", 0),
            "total_cost": u.get("usd", 0.0),
        }
        for name, u in by_model.items()
    }


def _metadata(trace: dict[str, Any]) -> dict[str, Any]:
    models = trace.get("models") or {}
    caps = trace.get("caps") or {}
    root = (models.get("per_depth") or {}).get(str(trace.get("depth", 0))) or models.get("root")
    others = [m for m in dict.fromkeys([models.get("sub"), *(models.get("per_depth") or {}).values()]) if m and m != root]
    return {
        "root_model": root,
        "max_depth": caps.get("max_depth"),
        "max_iterations": caps.get("max_turns"),
        "backend": "litellm",
        "backend_kwargs": {"model_name": root},
        "environment_type": "wasm",
        "environment_kwargs": {"context": trace.get("context")},
        "other_backends": others or None,
        # Not in rlms: where the run lives and how it ended.
        "engine": ENGINE,
        "workflow_id": trace["workflow_id"],
        "depth": trace.get("depth", 0),
        "question": trace.get("question"),
        "status": trace.get("status"),
        "answer": trace.get("answer"),
        "spend": trace.get("spend"),
        "usage_summary": {"model_usage_summaries": _usage_by_model(trace)},
    }


def _prompt(reader: TraceReader, turn: dict[str, Any]) -> Any:
    """The messages the turn sent: its transcript record without the reply."""
    key = turn.get("transcript_key")
    if key:
        try:
            messages = reader.read_json(key)["messages"]
            return messages[:-1] if messages and messages[-1].get("role") == "assistant" else messages
        except Exception:
            pass  # fall back to what the history holds: the messages this turn added
    return turn.get("appended") or []


def _iterations(reader: TraceReader, trace: dict[str, Any]) -> list[dict[str, Any]]:
    models = trace.get("models") or {}
    turns = trace.get("turns") or []
    out = []
    for n, turn in enumerate(turns, start=1):
        blocks = []
        for cell in turn.get("cells") or []:
            calls = [_call(reader, item, models.get("root")) for b in cell.get("batches") or [] for item in b["items"]]
            blocks.append({
                "code": cell.get("code") or "",
                "result": {
                    "stdout": _full(reader, cell.get("output"), cell.get("output_key")),
                    "stderr": cell.get("error") or cell.get("limit") or "",
                    "locals": {},
                    "execution_time": cell.get("duration_s"),
                    "rlm_calls": calls,
                    "final_answer": cell.get("final"),
                },
                "cell_id": cell.get("id"),
            })  # fmt: skip
        last = n == len(turns) and trace.get("status") not in ("running", None)
        out.append({
            "type": "iteration",
            "iteration": n,
            "timestamp": turn.get("ended_at") or turn.get("started_at"),
            "prompt": _prompt(reader, turn),
            "response": turn.get("reply") or "",
            "code_blocks": blocks,
            "final_answer": trace.get("answer") if last else None,
            "iteration_time": turn.get("seconds"),
            "turn": turn.get("turn"),
            "spend": turn.get("spend"),
        })  # fmt: skip
    return out


def trajectory(reader: TraceReader, trace: dict[str, Any]) -> dict[str, Any]:
    """`RLMLogger.get_trajectory()`: run metadata and iterations."""
    return {"run_metadata": _metadata(trace), "iterations": _iterations(reader, trace)}


def export_lines(reader: TraceReader, trace: dict[str, Any]) -> list[dict[str, Any]]:
    """The JSONL lines of a run: metadata, then one line per iteration."""
    meta = {"type": "metadata", "timestamp": trace.get("started_at"), **_metadata(trace)}
    return [meta, *_iterations(reader, trace)]
