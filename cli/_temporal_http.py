"""The few read-and-signal calls `rlm result` and `rlm cancel` make, over the
Temporal server's HTTP API (plain JSON through urllib).

Why not the SDK client: importing `temporalio.client` costs ~0.35 s of CPU
here, most of a client command's start; these calls need none of it. The
HTTP API (frontend, default port 7243; the embedded server's
RLM_TEMPORAL_HTTP_PORT) sends payloads in their JSON shorthand, which is
exactly what the pydantic data converter wrote. A server whose HTTP API is
not reachable raises `HttpUnavailable`, and the caller uses the SDK instead.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote

from activities.settings import Settings

__all__ = ["HttpApiError", "HttpUnavailable", "NotFound", "TemporalHttp", "close_outcome", "waiting_task_key", "workflow_type_name"]

# A long poll for the close event returns empty after ~20 s; the request may
# take that long, plus some slack.
LONG_POLL_TIMEOUT_S = 90.0
CALL_TIMEOUT_S = 10.0
# A query waits for a worker; the progress line can do without one.
QUERY_TIMEOUT_S = 3.0
_CLOSE_FILTER = "waitNewEvent=true&historyEventFilterType=HISTORY_EVENT_FILTER_TYPE_CLOSE_EVENT"


class HttpUnavailable(Exception):
    """The HTTP API does not answer (not exposed, other port): use gRPC."""


class NotFound(Exception):
    """No run with that id in the namespace."""


class HttpApiError(Exception):
    """Temporal refused the call (e.g. a run with that id already runs)."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code

    @property
    def transient(self) -> bool:
        """Worth another try: "Workflow is busy" (RESOURCE_EXHAUSTED) or UNAVAILABLE."""
        return self.code in _TRANSIENT_CODES

    @property
    def already_exists(self) -> bool:
        """A start refused: a workflow with the id runs (or, by the reuse policy, has run)."""
        return self.code == _ALREADY_EXISTS


# gRPC status codes the server gives when it is overloaded, not when the call is wrong.
_TRANSIENT_CODES = (8, 14)
_ALREADY_EXISTS = 6


class TemporalHttp:
    def __init__(self, settings: Settings) -> None:
        ns = quote(settings.temporal_namespace, safe="")
        self.base = f"http://{settings.temporal_host}:{settings.temporal_http_port}/api/v1/namespaces/{ns}"

    def _call(self, method: str, path: str, body: Any = None, timeout: float = CALL_TIMEOUT_S) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            try:
                error = json.loads(exc.read())
            except ValueError:
                error = {}
            if exc.code == 404 and error.get("code") == 5:
                raise NotFound(error.get("message", "not found")) from None
            if "code" not in error:  # not the Temporal HTTP API answering
                raise HttpUnavailable(f"HTTP {exc.code} from {self.base}") from None
            raise HttpApiError(error.get("message") or str(exc), error.get("code")) from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise HttpUnavailable(f"no answer from {self.base} ({getattr(exc, 'reason', exc)})") from None

    def check(self) -> None:
        """Raise HttpUnavailable unless the API answers for the namespace."""
        self._call("GET", "")

    def start(self, workflow_type: str, arg: Any, *, workflow_id: str, task_queue: str,
              summary: str | None = None, details: str | None = None, id_reuse_policy: str | None = None) -> None:
        """Start a run; `arg` is the workflow's input as JSON (what the
        pydantic data converter would send), summary/details what the UI
        shows, `id_reuse_policy` the server's enum name (None: its default)."""
        body: dict[str, Any] = {"workflowType": {"name": workflow_type}, "taskQueue": {"name": task_queue}, "input": [arg]}
        if id_reuse_policy is not None:
            body["workflowIdReusePolicy"] = id_reuse_policy
        metadata = {k: v for k, v in (("summary", summary), ("details", details)) if v is not None}
        if metadata:
            body["userMetadata"] = metadata
        self._call("POST", f"/workflows/{quote(workflow_id, safe='')}", body)

    def describe(self, workflow_id: str) -> dict[str, Any]:
        return self._call("GET", f"/workflows/{quote(workflow_id, safe='')}")

    def started_input(self, workflow_id: str, run_id: str | None = None) -> Any:
        """The first argument a run of `workflow_id` (its latest, or `run_id`)
        was started with, as JSON (None if it had none)."""
        run = f"&execution.runId={quote(run_id, safe='')}" if run_id else ""
        page = self._call("GET", f"/workflows/{quote(workflow_id, safe='')}/history?maximumPageSize=1{run}")
        events = page.get("history", {}).get("events", [])
        attributes = events[0].get("workflowExecutionStartedEventAttributes", {}) if events else {}
        values = attributes.get("input") or [None]
        return values[0]

    def signal(self, workflow_id: str, name: str, arg: Any) -> None:
        self._call("POST", f"/workflows/{quote(workflow_id, safe='')}/signal/{quote(name, safe='')}", {"input": [arg]})

    def query(self, workflow_id: str, name: str) -> Any:
        answer = self._call("POST", f"/workflows/{quote(workflow_id, safe='')}/query/{quote(name, safe='')}", {},
                            timeout=QUERY_TIMEOUT_S)
        values = answer.get("queryResult") or [None]
        return values[0]

    def close_event(self, workflow_id: str) -> dict[str, Any] | None:
        """The close event of the run's latest execution, waiting for it one
        long poll at most; None when the poll ended first."""
        page = self._call("GET", f"/workflows/{quote(workflow_id, safe='')}/history?{_CLOSE_FILTER}",
                          timeout=LONG_POLL_TIMEOUT_S)
        events = page.get("history", {}).get("events", [])
        return events[-1] if events else None


def workflow_type_name(description: dict[str, Any]) -> str:
    """The workflow type a `describe` answer names ("" when it names none)."""
    return description.get("workflowExecutionInfo", {}).get("type", {}).get("name", "")


def waiting_task_key(description: dict[str, Any]) -> tuple[str, int] | None:
    """The run's workflow task that no worker has started, as a key, else None
    (see cli._pickup)."""
    task = description.get("pendingWorkflowTask")
    if not task or task.get("state") != "PENDING_WORKFLOW_TASK_STATE_SCHEDULED":
        return None
    return str(task.get("scheduledTime")), int(task.get("attempt", 1))


def close_outcome(event: dict[str, Any]) -> tuple[str, Any]:
    """("completed", result JSON) | ("continued", None) | ("failed", message)."""
    kind = event.get("eventType", "")
    if kind == "EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED":
        payloads = event.get("workflowExecutionCompletedEventAttributes", {}).get("result") or [None]
        return "completed", payloads[0]
    if kind == "EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW":
        return "continued", None
    if kind == "EVENT_TYPE_WORKFLOW_EXECUTION_FAILED":
        failure = event.get("workflowExecutionFailedEventAttributes", {}).get("failure", {})
        return "failed", failure.get("message") or "workflow failed"
    if kind == "EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED":
        reason = event.get("workflowExecutionTerminatedEventAttributes", {}).get("reason")
        return "failed", "terminated" + (f": {reason}" if reason else "")
    if kind == "EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED":
        return "failed", "cancelled (by Temporal, not by `rlm cancel`)"
    if kind == "EVENT_TYPE_WORKFLOW_EXECUTION_TIMED_OUT":
        return "failed", "timed out"
    return "failed", f"closed with {kind}"
