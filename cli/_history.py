"""A run's trajectory rebuilt from its Temporal history (pure, no I/O).

The history already holds everything a run did: the request it started
with, each `root_turn` (the reply), each `run_cell` (code and output), each
`subcalls` update (the batch the code sent and the answers it got back),
each `llm_call` (model, tokens, cost) and each child run. `parse_history`
turns the events of one run of a chain into plain dicts; `assemble` nests
them as turn -> cell -> sub-call batch -> item. Payloads are read as JSON
without the project's models, so an old history still reads.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime, timezone
from typing import Any

from temporalio.api.enums.v1 import EventType

from workflows.names import CALL_GROUP_ACTIVITIES, SUB_CALL_ACTIVITIES

__all__ = ["assemble", "parse_history", "payload_value"]

# Longest text of a run listing's preview.
PREVIEW_CHARS = 400

_CELL_TURN = re.compile(r"^t(\d+)")


def payload_value(payloads: Any) -> Any:
    """The first payload of a `Payloads` (or a single `Payload`) as JSON."""
    items = list(payloads.payloads) if hasattr(payloads, "payloads") else [payloads]
    if not items or items[0] is None:
        return None
    payload = items[0]
    encoding = payload.metadata.get("encoding", b"")
    if encoding == b"json/plain":
        return json.loads(payload.data)
    if encoding == b"binary/null":
        return None
    return f"<{encoding.decode(errors='replace') or 'unknown'} payload, {len(payload.data)} bytes>"


def _time(event: Any) -> str:
    return event.event_time.ToDatetime(tzinfo=timezone.utc).isoformat()


def _failure_text(failure: Any) -> str:
    """The innermost message of a Temporal failure chain."""
    text = failure.message
    while failure.HasField("cause"):
        failure = failure.cause
        text = failure.message or text
    return text


def _summary(event: Any) -> str | None:
    if event.HasField("user_metadata") and event.user_metadata.HasField("summary"):
        value = payload_value(event.user_metadata.summary)
        return value if isinstance(value, str) else None
    return None


def parse_history(events: list[Any]) -> dict[str, Any]:
    """One run of a chain: its request, steps, updates, children and end."""
    run: dict[str, Any] = {"activities": {}, "children": {}, "updates": {}, "end": None}
    acts, kids, updates = run["activities"], run["children"], run["updates"]
    for ev in events:
        t = ev.event_type
        if t == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED:
            a = ev.workflow_execution_started_event_attributes
            run["request"] = payload_value(a.input)
            run["started_at"] = _time(ev)
            run["previous_run_id"] = a.continued_execution_run_id or None
            run["run_id"] = a.original_execution_run_id
        elif t == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            a = ev.activity_task_scheduled_event_attributes
            acts[ev.event_id] = {
                "type": a.activity_type.name, "input": payload_value(a.input), "scheduled_at": _time(ev),
                "summary": _summary(ev), "state": "scheduled", "attempt": 0,
            }  # fmt: skip
        elif t == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            a = ev.activity_task_started_event_attributes
            act = acts.get(a.scheduled_event_id)
            if act is not None:
                act.update(state="running", started_at=_time(ev), attempt=a.attempt)
        elif t == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            a = ev.activity_task_completed_event_attributes
            act = acts.get(a.scheduled_event_id)
            if act is not None:
                act.update(state="completed", ended_at=_time(ev), result=payload_value(a.result))
        elif t in _ACTIVITY_FAILED:
            a = getattr(ev, _ACTIVITY_FAILED[t])
            act = acts.get(a.scheduled_event_id)
            if act is not None:
                error = _failure_text(a.failure) if a.HasField("failure") else "cancelled"
                act.update(state="failed", ended_at=_time(ev), error=error)
        elif t == EventType.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_INITIATED:
            a = ev.start_child_workflow_execution_initiated_event_attributes
            kids[ev.event_id] = {
                "workflow_id": a.workflow_id, "input": payload_value(a.input), "started_at": _time(ev),
                "summary": _summary(ev), "state": "starting",
            }  # fmt: skip
        elif t == EventType.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_FAILED:
            a = ev.start_child_workflow_execution_failed_event_attributes
            kid = kids.get(a.initiated_event_id)
            if kid is not None:
                kid.update(state="failed", ended_at=_time(ev), error="could not start the child run")
        elif t == EventType.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_STARTED:
            kid = kids.get(ev.child_workflow_execution_started_event_attributes.initiated_event_id)
            if kid is not None:
                kid["state"] = "running"
        elif t == EventType.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_COMPLETED:
            a = ev.child_workflow_execution_completed_event_attributes
            kid = kids.get(a.initiated_event_id)
            if kid is not None:
                kid.update(state="completed", ended_at=_time(ev), result=payload_value(a.result))
        elif t in _CHILD_ENDED:
            a = getattr(ev, _CHILD_ENDED[t])
            kid = kids.get(a.initiated_event_id)
            if kid is not None:
                error = _failure_text(a.failure) if hasattr(a, "failure") and a.HasField("failure") else None
                kid.update(state="failed", ended_at=_time(ev), error=error or t.name.rsplit("_", 1)[-1].lower())
        elif t == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED:
            req = ev.workflow_execution_update_accepted_event_attributes.accepted_request
            updates[req.meta.update_id] = {
                "name": req.input.name, "input": payload_value(req.input.args), "accepted_at": _time(ev),
            }  # fmt: skip
        elif t == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_COMPLETED:
            a = ev.workflow_execution_update_completed_event_attributes
            update = updates.get(a.meta.update_id)
            if update is not None:
                update["completed_at"] = _time(ev)
                if a.outcome.HasField("success"):
                    update["result"] = payload_value(a.outcome.success)
                else:
                    update["error"] = _failure_text(a.outcome.failure)
        elif t in _WORKFLOW_ENDED:
            run["end"] = _workflow_end(ev, t)
            run["ended_at"] = _time(ev)
    return run


_ACTIVITY_FAILED = {
    EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED: "activity_task_failed_event_attributes",
    EventType.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT: "activity_task_timed_out_event_attributes",
    EventType.EVENT_TYPE_ACTIVITY_TASK_CANCELED: "activity_task_canceled_event_attributes",
}
_CHILD_ENDED = {
    EventType.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_FAILED: "child_workflow_execution_failed_event_attributes",
    EventType.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_CANCELED: "child_workflow_execution_canceled_event_attributes",
    EventType.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_TERMINATED: "child_workflow_execution_terminated_event_attributes",
    EventType.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_TIMED_OUT: "child_workflow_execution_timed_out_event_attributes",
}
_WORKFLOW_ENDED = {
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED,
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED,
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED,
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED,
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TIMED_OUT,
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW,
}


def _workflow_end(ev: Any, t: int) -> dict[str, Any]:
    if t == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED:
        return {"kind": "completed", "result": payload_value(ev.workflow_execution_completed_event_attributes.result)}
    if t == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW:
        return {"kind": "continued"}
    if t == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED:
        return {"kind": "failed", "error": _failure_text(ev.workflow_execution_failed_event_attributes.failure)}
    kind = {
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED: "cancelled",
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED: "terminated",
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TIMED_OUT: "timed_out",
    }[t]
    return {"kind": kind, "error": kind.replace("_", " ")}


# -- nesting -------------------------------------------------------------------
def cut(text: str | None, limit: int = PREVIEW_CHARS) -> str | None:
    if text is None or len(text) <= limit:
        return text
    return text[:limit] + f" ... [{len(text) - limit:,} more chars]"


def _seconds(a: str | None, b: str | None) -> float | None:
    if not a or not b:
        return None
    return round((datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds(), 3)


def _spend(usd: float = 0.0, tokens: int = 0, calls: int = 0) -> dict[str, Any]:
    return {"usd": usd, "tokens": tokens, "calls": calls}


def _add(total: dict[str, Any], part: dict[str, Any]) -> None:
    for key in ("usd", "tokens", "calls"):
        total[key] += part.get(key, 0) or 0


def _content_key(cell_id: str, text: str | None, ref: Any, context: Any) -> tuple:
    """What a sub-call asks, as the history shows it on both sides: the
    batch item (update input) and the step that answered it (`llm_call`
    input, child run request). Matching by content, not by call id, keeps
    this independent of how call ids are spelled."""
    sha = ref.get("sha256") if isinstance(ref, dict) else hashlib.sha256((text or "").encode()).hexdigest()
    return (cell_id, sha, (context or {}).get("sha256"))


def _calls(steps: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Group a content key's steps into calls: a step with `attempt` > 1 is
    another try of the call before it."""
    calls: list[list[dict[str, Any]]] = []
    for step in steps:
        if calls and int(step.get("attempt_no") or 1) > 1:
            calls[-1].append(step)
        else:
            calls.append([step])
    return calls


def assemble(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Turns, cells, batches and items of a chain of runs (oldest first),
    plus the spend of each node and the run's spend over time."""
    turns: dict[int, dict[str, Any]] = {}
    cells: dict[str, dict[str, Any]] = {}
    series: list[tuple[str, dict[str, Any]]] = []
    child_ids: list[str] = []
    # Model-call attempts that failed: the ledger may have charged them (see
    # workflows/model_attempts.py); their cost is in the run's total only.
    failed_attempts = 0

    def turn(n: int) -> dict[str, Any]:
        return turns.setdefault(n, {"turn": n, "cells": [], "spend": _spend(), "state": "pending", "attempts": 0})

    def cell_node(cell_id: str) -> dict[str, Any]:
        cell = cells.setdefault(cell_id, {"id": cell_id, "batches": [], "spend": _spend(), "code": ""})
        m = _CELL_TURN.match(cell_id)
        owner = turn(int(m.group(1)) if m else 0)
        if cell not in owner["cells"]:
            owner["cells"].append(cell)
        return cell

    for run in runs:
        steps: dict[tuple, list[dict[str, Any]]] = {}
        for act in run["activities"].values():
            inp, out = act.get("input") or {}, act.get("result") or {}
            base = {"state": act["state"], "started_at": act["scheduled_at"], "ended_at": act.get("ended_at"),
                    "seconds": _seconds(act["scheduled_at"], act.get("ended_at")), "summary": act.get("summary")}  # fmt: skip
            spend = _spend(out.get("usd", 0.0), out.get("prompt_tokens", 0) + out.get("completion_tokens", 0), 1)
            if act["type"] in ("root_turn", "llm_call") and act["state"] == "failed":
                failed_attempts += 1
            elif act["type"] in CALL_GROUP_ACTIVITIES and act["state"] == "failed":
                failed_attempts += len(inp.get("calls") or [])
            if act["type"] == "root_turn":
                node = turn(int(inp.get("turn", 0)))
                node["attempts"] += 1
                if node["state"] == "completed":
                    continue  # a later try of a turn that already answered: nothing new
                node.update(base, model=inp.get("model"), appended=inp.get("append", []), reply=out.get("reply"),
                            prompt_tokens=out.get("prompt_tokens"), completion_tokens=out.get("completion_tokens"),
                            transcript_key=out.get("transcript_key"), error=act.get("error"))  # fmt: skip
                if act["state"] == "completed":
                    _add(node["spend"], spend)
                    series.append((act["ended_at"], spend))
            elif act["type"] == "run_cell":
                cell = cell_node(inp.get("cell_id", "?"))
                error = out.get("error") or (f"the cell could not run: {act['error']}" if act.get("error") else None)
                cell.update(base, code=inp.get("code", ""), output=out.get("output"), output_key=out.get("output_key"),
                            error=error, limit=out.get("limit"), final=out.get("final"),
                            duration_s=out.get("duration_s"), subcalls=out.get("subcalls", 0),
                            warm=out.get("warm"))  # fmt: skip
            elif act["type"] in SUB_CALL_ACTIVITIES:
                # One call per activity, or a group of calls (workflows/call_groups.py):
                # either way each call is its own step, with its own outcome.
                grouped = act["type"] in CALL_GROUP_ACTIVITIES
                results = out.get("results") or []
                for i, call in enumerate(inp.get("calls") or [] if grouped else [inp]):
                    res = (results[i] if i < len(results) else {}) if grouped else {"output": out}
                    one, failure = res.get("output") or {}, res.get("failure") or {}
                    ok = act["state"] == "completed" and (not grouped or bool(one))
                    if grouped and failure:
                        failed_attempts += 1
                    cost = _spend(one.get("usd", 0.0), one.get("prompt_tokens", 0) + one.get("completion_tokens", 0), 1)
                    cell_id = str(call.get("call_id", "")).split(":", 1)[0]
                    key = _content_key(cell_id, call.get("prompt"), call.get("prompt_ref"), call.get("context"))
                    steps.setdefault(key, []).append({
                        **base, "state": "completed" if ok else ("failed" if act["state"] == "completed" else act["state"]),
                        "attempt_no": call.get("attempt"), "model": call.get("model"),
                        "prompt_ref": _ref_key(call.get("prompt_ref")), "reply_ref": _ref_key(one.get("text_ref")),
                        "reply": one.get("text"), "tokens_in": one.get("prompt_tokens"),
                        "tokens_out": one.get("completion_tokens"), "error": failure.get("message") or act.get("error"),
                        "spend": cost if ok else _spend(),
                    })  # fmt: skip
                    if ok:
                        series.append((act["ended_at"], cost))
        for kid in run["children"].values():
            req, result = kid.get("input") or {}, kid.get("result") or {}
            cell_id = str((req.get("parent") or {}).get("call_id", "")).split(":", 1)[0]
            key = _content_key(cell_id, req.get("question"), None, req.get("context"))
            spend = dict(result.get("spend") or _spend())
            depth, models = req.get("depth", 0), req.get("models") or {}
            steps.setdefault(key, []).append({
                "state": kid["state"], "started_at": kid["started_at"], "ended_at": kid.get("ended_at"),
                "seconds": _seconds(kid["started_at"], kid.get("ended_at")), "summary": kid.get("summary"),
                "model": (models.get("per_depth") or {}).get(str(depth)) or models.get("root"),
                "child_id": kid["workflow_id"], "child_status": result.get("status") or kid["state"],
                "spend": spend, "reply": result.get("answer"), "error": kid.get("error"),
            })  # fmt: skip
            child_ids.append(kid["workflow_id"])
            if kid.get("ended_at") and result:
                series.append((kid["ended_at"], spend))
        calls = {key: _calls(found) for key, found in steps.items()}
        for update_id, update in run["updates"].items():
            if update.get("name") != "subcalls" or not isinstance(update.get("input"), dict):
                continue
            cell = cell_node(update["input"].get("cell_id") or "?")
            cell["batches"].append(_batch(update_id, update, calls))
    for cell in cells.values():
        for batch in cell["batches"]:
            _add(cell["spend"], batch["spend"])
    for node in turns.values():
        for cell in node["cells"]:
            _add(node["spend"], cell["spend"])
    return {
        "turns": [turns[n] for n in sorted(turns)],
        "child_ids": child_ids,
        "series": _cumulative(series),
        "failed_attempts": failed_attempts,
    }


def _batch(update_id: str, update: dict[str, Any], calls: dict[tuple, list[list[dict[str, Any]]]]) -> dict[str, Any]:
    """One `subcalls` update: its items, each with the step(s) that answered it."""
    batch_in = update["input"]
    answers = (update.get("result") or {}).get("answers") or []
    items = []
    for index, entry in enumerate(batch_in.get("items") or []):
        key = _content_key(batch_in.get("cell_id") or "?", entry.get("text"), entry.get("text_ref"), entry.get("context"))
        waiting = calls.get(key) or calls.get(key[:2] + (None,)) or []
        tries = waiting.pop(0) if waiting else []
        item: dict[str, Any] = {"spend": _spend()}
        for step in tries:  # the last try tells the outcome; every try's spend counts
            spend = item["spend"]
            item.update(step)
            item["spend"] = spend
            _add(spend, step.get("spend") or {})
        answer = answers[index] if index < len(answers) else {}
        item.update(index=index, kind=batch_in.get("kind"), attempts=len(tries), prompt=entry.get("text"),
                    prompt_chars=entry.get("text_chars"), context_chars=(entry.get("context") or {}).get("total_chars"),
                    answer_error=answer.get("error"))  # fmt: skip
        item.setdefault("prompt_ref", _ref_key(entry.get("text_ref")))
        if item.get("reply") is None:
            item["reply"] = answer.get("text")
        if not item.get("reply_ref"):
            item["reply_ref"] = _ref_key(answer.get("text_ref"))
        if not tries:  # no step ran: refused before any call, answered from memory, or not yet
            item["state"] = "refused" if answer.get("error") else "answered" if answer else "waiting"
        item.pop("attempt_no", None)
        items.append(item)
    spend = _spend()
    for item in items:
        _add(spend, item["spend"])
    return {
        "id": update_id, "cell_id": batch_in.get("cell_id"), "seq": batch_in.get("seq"), "kind": batch_in.get("kind"),
        "model": batch_in.get("model"), "started_at": update["accepted_at"], "ended_at": update.get("completed_at"),
        "seconds": _seconds(update["accepted_at"], update.get("completed_at")), "refused": update.get("error"),
        "items": items, "count": len(items), "spend": spend,
        "models": sorted({i["model"] for i in items if i.get("model")}),
        "errors": sum(1 for i in items if i.get("answer_error") or i.get("error")),
    }  # fmt: skip


def _cumulative(points: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    total = _spend()
    out = []
    for at, spend in sorted(points, key=lambda p: p[0]):
        _add(total, spend)
        out.append({"at": at, **total})
    return out


def _ref_key(ref: Any) -> str | None:
    return ref.get("key") if isinstance(ref, dict) else None
