"""Records of completed model calls (activities/_call_records.py) on a real
S3 server: a group's replies share objects, and a retried attempt finds its
record where an earlier attempt left it, or nowhere."""

from __future__ import annotations

import asyncio
import concurrent.futures
import uuid

import pytest
from temporalio.exceptions import ApplicationError

from activities._call_records import CallRecorder, RecordFinder, call_key, group_prefix, recorded_calls
from activities.object_store import ObjectStore
from activities.runtime import WorkerRuntime
from workflows.steps import LlmCallInput, LlmCallOutput


def _runtime(store: ObjectStore, loop: asyncio.AbstractEventLoop) -> WorkerRuntime:
    # Only storage is used by the records; the rest of a worker is not needed.
    return WorkerRuntime(
        settings=None, client=None, loop=loop, store=store, contexts=None, models=None,  # type: ignore[arg-type]
        context_cache_dir=None,  # type: ignore[arg-type]
        io_pool=concurrent.futures.ThreadPoolExecutor(max_workers=8),
    )  # fmt: skip


def _out(n: int) -> LlmCallOutput:
    return LlmCallOutput(text=f"reply {n}", prompt_tokens=10, completion_tokens=n, usd=0.001 * n)


def _call(workflow_id: str, n: int, *, attempt: int = 2, groups: list[str] | None = None) -> LlmCallInput:
    return LlmCallInput(
        workflow_id=workflow_id, call_id=f"cell-1:{n:024d}", model="sub", prompt=f"item {n}",
        max_tokens=10, inline_limit=1000, attempt=attempt, earlier_groups=groups or [],
    )  # fmt: skip


def _drained(rt: WorkerRuntime) -> None:
    rt.io_pool.shutdown(wait=True)  # every write submitted so far has landed


def test_a_group_writes_replies_together_and_a_retry_finds_each(object_store):
    async def scenario():
        rt = _runtime(object_store, asyncio.get_running_loop())
        wf = f"records-{uuid.uuid4().hex[:8]}"
        recorder = CallRecorder(rt, wf, "cell-1:first-a1")
        for n in range(20):  # replies arriving together, as a whole batch's do
            recorder.add(_call(wf, n).call_id, _out(n))
        _drained(rt)
        objects = object_store.keys(group_prefix(wf, "cell-1:first-a1"))
        assert 1 <= len(objects) < 20, objects
        rt = _runtime(object_store, asyncio.get_running_loop())
        finder = RecordFinder(rt)
        found = [await finder.find(_call(wf, n, groups=["other-a1", "cell-1:first-a1"])) for n in range(20)]
        assert [f.text for f in found] == [f"reply {n}" for n in range(20)]
        assert all(f.replayed for f in found) and found[7].completion_tokens == 7
        # A call that no earlier group reported, or one told of no group, is not found.
        assert await finder.find(_call(wf, 20, groups=["cell-1:first-a1"])) is None
        assert await RecordFinder(rt).find(_call(wf, 3)) is None

    asyncio.run(scenario())


def test_a_group_is_read_once_per_activity(object_store):
    async def scenario():
        rt = _runtime(object_store, asyncio.get_running_loop())
        wf = f"records-{uuid.uuid4().hex[:8]}"
        CallRecorder(rt, wf, "g-a1").add(_call(wf, 1).call_id, _out(1))
        _drained(rt)
        rt = _runtime(object_store, asyncio.get_running_loop())
        finder = RecordFinder(rt)
        assert (await finder.find(_call(wf, 1, groups=["g-a1"]))).text == "reply 1"
        for key in object_store.keys(group_prefix(wf, "g-a1")):
            object_store.client.remove_object(object_store.bucket, key)
        # The same activity's other calls use what it read; a new one reads again.
        assert (await finder.find(_call(wf, 1, groups=["g-a1"]))).text == "reply 1"
        assert await RecordFinder(rt).find(_call(wf, 1, groups=["g-a1"])) is None

    asyncio.run(scenario())


def test_a_call_outside_groups_has_its_own_record(object_store):
    async def scenario():
        rt = _runtime(object_store, asyncio.get_running_loop())
        wf = f"records-{uuid.uuid4().hex[:8]}"
        CallRecorder(rt, wf, None).add(_call(wf, 5).call_id, _out(5))
        _drained(rt)
        assert object_store.exists(call_key(wf, _call(wf, 5).call_id))
        rt = _runtime(object_store, asyncio.get_running_loop())
        # Found by its own key whatever groups the workflow names (records of older workers).
        assert (await RecordFinder(rt).find(_call(wf, 5, groups=["g-a1"]))).text == "reply 5"
        group = CallRecorder(rt, wf, "g-a1")
        for n in range(3):
            group.add(_call(wf, n).call_id, _out(n))
        _drained(rt)
        assert recorded_calls(object_store, wf) == 4  # one on its own, three in the group's objects

    asyncio.run(scenario())


def test_storage_down_fails_the_lookup_as_not_billable(settings):
    down = ObjectStore.from_settings(settings.model_copy(update={"s3_endpoint": "127.0.0.1:9"}))

    async def scenario():
        rt = _runtime(down, asyncio.get_running_loop())
        with pytest.raises(ApplicationError) as caught:
            await RecordFinder(rt).find(_call("wf", 1, groups=["g-a1"]))
        assert caught.value.details[0] == {"billable": False}

    asyncio.run(scenario())
