"""Load a run and its child runs, running or finished, from what the engine
stores: the Temporal history (every run of a continue-as-new chain), the
`progress` query while it runs, and object storage for full texts.

No second database: `rlm show`, `rlm export` and `rlm ui` read through here.
Only temporalio is imported at module level (no litellm: these are client
commands that must start fast); object storage is opened on first use.
"""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from temporalio.client import Client

from activities.temporal_client import connect
from cli._history import assemble, cut, parse_history
from cli._errors import UserError
from cli._run_by_id import ui_link
from cli._workflow_kind import not_a
from workflows.names import QUERY_PROGRESS, WORKFLOW_RLM_RUN

if TYPE_CHECKING:
    from activities.object_store import ObjectStore
    from activities.settings import Settings

__all__ = ["TraceReader", "ui_link"]

# Children are loaded in parallel, a bounded number at a time.
CHILD_FETCH_CONCURRENCY = 16
QUERY_TIMEOUT = timedelta(seconds=3)
# Keys the viewer may read: a run's own artifacts and sub-call blobs.
READABLE_PREFIXES = ("runs/", "blobs/")


class TraceReader:
    def __init__(self, settings: Settings, client: Client) -> None:
        self.settings = settings
        self.client = client
        self._store: ObjectStore | None = None
        self._sem = asyncio.Semaphore(CHILD_FETCH_CONCURRENCY)

    @classmethod
    async def open(cls, settings: Settings) -> TraceReader:
        try:
            client = await connect(settings)
        except Exception as exc:
            raise UserError(
                f"cannot reach Temporal at {settings.temporal_address}: {exc}; start it with `rlm up` "
                "or set RLM_TEMPORAL_ADDRESS"
            ) from None
        return cls(settings, client)

    # -- object storage ------------------------------------------------------
    @property
    def store(self) -> ObjectStore:
        if self._store is None:
            from activities.object_store import ObjectStore

            self._store = ObjectStore.from_settings(self.settings)
        return self._store

    def read_text(self, key: str) -> str:
        """A stored artifact of a run as text (blocking; call in a thread)."""
        if not key.startswith(READABLE_PREFIXES) or ".." in key:
            raise UserError(f"{key!r} is not a run artifact (keys start with {' or '.join(READABLE_PREFIXES)})")
        return self.store.get_bytes(key).decode("utf-8", errors="replace")

    def read_json(self, key: str) -> Any:
        return json.loads(self.read_text(key))

    # -- histories -----------------------------------------------------------
    async def _chain(self, workflow_id: str) -> list[dict[str, Any]]:
        """Every run of the workflow id's continue-as-new chain, oldest first."""
        runs: list[dict[str, Any]] = []
        run_id: str | None = None
        while True:
            handle = self.client.get_workflow_handle(workflow_id, run_id=run_id)
            try:
                history = await handle.fetch_history()
            except Exception as exc:
                if runs:
                    break  # an older run of the chain past retention: show what is left
                raise UserError(f"no run {workflow_id!r} in namespace {self.settings.temporal_namespace!r}: {exc}") from None
            if not runs and history.events:  # the newest run of the chain: is it a run at all?
                started = history.events[0].workflow_execution_started_event_attributes
                if problem := not_a(workflow_id, started.workflow_type.name, "run"):
                    raise UserError(problem)
            run = parse_history(list(history.events))
            runs.insert(0, run)
            run_id = run.get("previous_run_id")
            if not run_id:
                return runs
        return runs

    async def load(self, workflow_id: str, *, children: bool = True) -> dict[str, Any]:
        """The run as a tree of plain data (JSON-ready); children nested in
        the sub-call items that started them."""
        async with self._sem:
            runs = await self._chain(workflow_id)
        first, last = runs[0], runs[-1]
        request = first.get("request") or {}
        body = assemble(runs)
        end = last.get("end")
        trace: dict[str, Any] = {
            "workflow_id": workflow_id,
            "run_ids": [r.get("run_id") for r in runs],
            "ui": ui_link(self.settings, workflow_id),
            "question": request.get("question"),
            "depth": request.get("depth", 0),
            "parent": request.get("parent"),
            "context": _context(request.get("context") or {}),
            "models": request.get("models"),
            "caps": request.get("caps"),
            "started_at": first.get("started_at"),
            "ended_at": last.get("ended_at") if end else None,
            **body,
        }
        trace.update(self._outcome(end))
        if end is None:
            trace["progress"] = await self._progress(workflow_id)
            if trace["progress"]:
                trace["spend"] = trace["progress"].get("spent")
        if trace.get("spend") is None:
            trace["spend"] = body["series"][-1] if body["series"] else {"usd": 0.0, "tokens": 0, "calls": 0}
            trace["spend"] = {k: trace["spend"].get(k, 0) for k in ("usd", "tokens", "calls")}
        if children:
            kids = await asyncio.gather(*(self.load(cid) for cid in body["child_ids"]), return_exceptions=True)
            by_id = {cid: k for cid, k in zip(body["child_ids"], kids) if isinstance(k, dict)}
            for node in _items(trace):
                if node.get("child_id") in by_id:
                    node["child"] = by_id[node["child_id"]]
        return trace

    def _outcome(self, end: dict[str, Any] | None) -> dict[str, Any]:
        if end is None:
            return {"status": "running", "reason": None, "answer": None}
        if end["kind"] == "completed" and isinstance(end.get("result"), dict):
            r = end["result"]
            return {
                "status": r.get("status"), "reason": r.get("reason"), "answer": r.get("answer"),
                "answer_ref": (r.get("answer_ref") or {}).get("key"), "spend": r.get("spend"),
                "usage": r.get("usage"), "transcript_key": r.get("transcript_key"),
            }  # fmt: skip
        return {"status": "failed", "reason": end.get("error"), "answer": None}

    async def _progress(self, workflow_id: str) -> dict[str, Any] | None:
        """The live `progress` query; None if no worker answers in time."""
        try:
            handle = self.client.get_workflow_handle(workflow_id)
            return await handle.query(QUERY_PROGRESS, rpc_timeout=QUERY_TIMEOUT)
        except Exception:
            return None

    # -- listing -------------------------------------------------------------
    async def list_runs(self, limit: int = 50) -> list[dict[str, Any]]:
        """Recent top-level runs, newest first, with their question."""
        query = f"WorkflowType = '{WORKFLOW_RLM_RUN}' AND RlmDepth = 0"
        try:
            found = [w async for w in self.client.list_workflows(query, limit=limit)]
        except Exception:  # search attributes not registered on this cluster
            found = [w async for w in self.client.list_workflows(f"WorkflowType = '{WORKFLOW_RLM_RUN}'", limit=limit)]
            found = [w for w in found if not w.parent_id]

        async def row(w: Any) -> dict[str, Any]:
            question = None
            async with self._sem:
                async for ev in self.client.get_workflow_handle(w.id, run_id=w.run_id).fetch_history_events(page_size=1):
                    request = parse_history([ev]).get("request") or {}
                    question = request.get("question")
                    break
            status = w.status.name.lower() if w.status else None
            if status == "completed":  # the run's own status: completed, max_turns, budget_exhausted, ...
                status = (w.search_attributes.get("RlmStatus") or [status])[0]
            return {
                "workflow_id": w.id, "status": status, "question": cut(question, 200),
                "started_at": w.start_time.isoformat() if w.start_time else None,
                "ended_at": w.close_time.isoformat() if w.close_time else None,
            }  # fmt: skip

        return list(await asyncio.gather(*(row(w) for w in found)))


def _context(ref: dict[str, Any]) -> dict[str, Any]:
    return {k: ref.get(k) for k in ("sha256", "kind", "total_chars", "total_bytes", "doc_count")}


def _items(trace: dict[str, Any]):
    for turn in trace["turns"]:
        for cell in turn["cells"]:
            for batch in cell["batches"]:
                yield from batch["items"]
