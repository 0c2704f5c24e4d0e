"""Records of completed model calls: what a later attempt of a call reads
instead of calling the model again (workflows/model_attempts.py).

A call is recorded as soon as its reply arrives, beside its activity (which
does not wait for the write), so only an attempt that never reported is
retried and a completed call is never paid for twice.

Where a record lives:
- a call of a group that names its records (`LlmCallsInput.records`) goes to
  `runs/<wf>/calls/<group>/<n>.json`, one object per write, holding every
  reply that arrived while the previous write was under way. Replies of a
  group tend to arrive together (20 calls asked at once answer within
  milliseconds of each other), so a group costs a few writes instead of one
  per call: in bench_many_runs, one PUT per call was ~2.4 s of the S3
  server's CPU and ~1.6 s of the worker's for 2,000 calls;
- any other call (the one-call `llm_call` activity, a group from a workflow
  that names no records) goes to `runs/<wf>/calls/<call id>.json`.

A retried attempt looks in both: its own key, then each group an earlier
attempt of it was carried by when that group's activity ended without a
report (`LlmCallInput.earlier_groups`; the workflow knows them).
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import structlog
from temporalio.exceptions import ApplicationError

from activities.object_store import ObjectStore
from activities.runtime import WorkerRuntime, run_key
from workflows.steps import LlmCallInput, LlmCallOutput

log = structlog.get_logger(__name__)


def call_key(workflow_id: str, call_id: str) -> str:
    """The one-object record of a call."""
    return run_key(workflow_id, "calls", call_id.replace(":", "-") + ".json")


def group_prefix(workflow_id: str, group: str) -> str:
    """Where a group's records go, one object per write."""
    return run_key(workflow_id, "calls", group.replace(":", "-")) + "/"


def recorded_calls(store: ObjectStore, workflow_id: str) -> int:
    """Calls of a run whose reply is recorded (for tests and diagnostics)."""
    top = run_key(workflow_id, "calls") + "/"
    keys = store.keys(top)
    # A group's objects (one folder down) hold several calls; a call's own, one.
    return sum(len(json.loads(store.get_bytes(k))) if "/" in k[len(top):] else 1 for k in keys)


class CallRecorder:
    """Writes the records of one activity's calls on the storage threads.

    With a group name, at most one write is under way at a time and the
    replies that arrive meanwhile go together in the next one; without, each
    call gets its own object at once."""

    def __init__(self, rt: WorkerRuntime, workflow_id: str, group: str | None) -> None:
        self._rt = rt
        self._workflow_id = workflow_id
        self._prefix = group_prefix(workflow_id, group) if group is not None else None
        self._lock = threading.Lock()
        self._pending: dict[str, Any] = {}
        self._writing = False
        self._written = 0

    def add(self, call_id: str, out: LlmCallOutput) -> None:
        record = out.model_dump(mode="json")
        if self._prefix is None:
            self._rt.io_pool.submit(self._write, call_key(self._workflow_id, call_id), record, 1)
            return
        with self._lock:
            self._pending[call_id] = record
            if self._writing:
                return
            self._writing = True
        self._rt.io_pool.submit(self._drain)

    def _drain(self) -> None:
        """Write what is pending until nothing is (on a storage thread)."""
        while True:
            with self._lock:
                if not self._pending:
                    self._writing = False
                    return
                records, self._pending = self._pending, {}
                number, self._written = self._written, self._written + 1
            self._write(f"{self._prefix}{number:04d}.json", records, len(records))

    def _write(self, key: str, value: Any, calls: int) -> None:
        try:
            self._rt.put_json(key, value)
        except Exception as exc:  # noqa: BLE001 - reported, not raised: the reply still reaches the run
            # Only a retry of an attempt that never reported would pay again.
            log.warning("llm_call.record_failed", key=key, calls=calls, error=str(exc)[:300])


class RecordFinder:
    """Finds the record an earlier attempt of a call left; reads each earlier
    group's records once per activity, however many of its calls ask."""

    def __init__(self, rt: WorkerRuntime) -> None:
        self._rt = rt
        self._groups: dict[str, asyncio.Future[dict[str, Any]]] = {}

    async def find(self, inp: LlmCallInput) -> LlmCallOutput | None:
        """The recorded output (marked replayed), or None. Storage that fails
        fails the attempt as not billable (`WorkerRuntime.before_call`)."""
        done = await self._rt.read_before_call(call_key(inp.workflow_id, inp.call_id))
        for group in inp.earlier_groups:
            if done is not None:
                break
            done = (await self._group(group_prefix(inp.workflow_id, group))).get(inp.call_id)
        return None if done is None else LlmCallOutput.model_validate({**done, "replayed": True})

    async def _group(self, prefix: str) -> dict[str, Any]:
        if prefix not in self._groups:
            self._groups[prefix] = asyncio.ensure_future(self._rt.before_call(self._read_group, prefix))
        try:
            return await asyncio.shield(self._groups[prefix])
        except ApplicationError:
            self._groups.pop(prefix, None)  # the next call of the group tries again
            raise

    def _read_group(self, prefix: str) -> dict[str, Any]:
        records: dict[str, Any] = {}
        for key in self._rt.store.keys(prefix):
            records.update(json.loads(self._rt.store.get_bytes(key)))
        return records
