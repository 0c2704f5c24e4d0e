"""`rlm run` starts its run before the context's upload ends, when the
worker here loads the copy written beside it (cli/_run_client.py,
activities/_context_upload.py). What must hold anyway, with a real Temporal,
real S3 and a real worker: the context is in the bucket when the command
returns; a worker that reads the bucket instead of the copy still runs it;
bad S3 keys stop the command before any run starts; an upload that fails
after the start cancels the run, and the command says why."""

from __future__ import annotations

import asyncio
import socket
import threading
import uuid
from pathlib import Path

import pytest
from temporalio.service import RPCError

from activities._context_copy import MANIFEST_FILE
from activities._context_upload import DEFAULT_CHUNK_BYTES, stage_files
from activities.context_store import ContextStore
from activities.object_store import ObjectStore
from cli._run_checks import RunOptions
from cli._run_client import RunClient, RunError, _s3_check_file, _s3_identity
from tests.fixtures_llm import fake_registry, models_json
from tests.run_harness import ROOT, SUB, isolated, repl, running_worker
from workflows.result import RunResult


@pytest.fixture
def configured(llm, monkeypatch):
    """The scripted models, as a user configures them for the client's checks."""
    monkeypatch.setenv("RLM_MODELS_JSON", models_json(llm.url))
    return llm


def _context(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "ledger.txt"
    path.write_text("".join(f"{uuid.uuid4().hex} entry {i}\n" for i in range(20_000)))  # ~1 MB, never seen before
    return path


def _options(path: Path) -> RunOptions:
    return RunOptions(question="How many entries?", context_paths=[path], model=ROOT, sub_model=SUB,
                      workflow_id=f"upload-{uuid.uuid4().hex[:10]}")  # fmt: skip


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("shares_cache", [True, False], ids=["worker-reads-the-copy", "worker-reads-the-bucket"])
def test_a_run_started_before_its_upload_ended_runs_and_its_context_is_stored(
    settings, configured, object_store: ObjectStore, tmp_path, shares_cache
):
    s = isolated(settings)
    # A worker with another data dir (or on another machine) does not see the client's copy.
    access, secret = s.s3_credentials()
    client_settings = s if shares_cache else s.model_copy(
        update={"data_dir": tmp_path / "client-data", "s3_access_key": access, "s3_secret_key": secret}
    )
    configured.add_rule("Turn 1 of", repl("print(len(context.splitlines()))"), model=ROOT)
    configured.add_rule("20000", "FINAL(20000 entries)", model=ROOT)
    paths = [_context(tmp_path / f"run{i}") for i in range(2)]
    # Their references, computed without storing anything (never released).
    refs = [stage_files(lambda: object_store, DEFAULT_CHUNK_BYTES, [p], hold=True).ref for p in paths]
    in_bucket_at_start: list[bool] = []

    async def go():
        async with running_worker(s, fake_registry(configured)) as client:
            runs = RunClient(client_settings, client, progress=None)
            # The first run checks the keys before it starts, the second after.
            return [
                await runs.run(_options(path), on_started=lambda _, ref=ref: in_bucket_at_start.append(
                    object_store.exists(ref.manifest_key)))
                for path, ref in zip(paths, refs, strict=True)
            ]

    for result in asyncio.run(go()):
        assert result.status == "completed" and result.answer == "20000 entries", result
    assert in_bucket_at_start == [False, False]  # started before the upload
    assert _s3_check_file(client_settings).read_text() == _s3_identity(client_settings)
    for path, ref in zip(paths, refs, strict=True):
        assert ContextStore(object_store).read_all(ref) == path.read_text()  # stored before run() returned
        # Where the worker loaded it from: the copy (with its manifest), or the bucket (without).
        assert (s.context_cache_dir / ref.sha256 / MANIFEST_FILE).is_file() == shares_cache


@pytest.mark.parametrize("command", ["run", "submit"])
def test_a_run_whose_copy_cannot_be_written_starts_once_its_context_is_stored(
    settings, configured, object_store: ObjectStore, tmp_path, command
):
    """No copy for the worker (a full or read-only disk; a worker elsewhere):
    the command uploads, then starts, and waits for nothing more."""
    s = isolated(settings)
    access, secret = s.s3_credentials()
    blocked = tmp_path / "client-data"
    blocked.mkdir()
    (blocked / "cache").write_text("a file where the cache directory would be")
    client_settings = s.model_copy(update={"data_dir": blocked, "s3_access_key": access, "s3_secret_key": secret})
    configured.add_rule("Turn 1 of", repl("print(len(context.splitlines()))"), model=ROOT)
    configured.add_rule("20000", "FINAL(20000 entries)", model=ROOT)
    path = _context(tmp_path)
    ref = stage_files(lambda: object_store, DEFAULT_CHUNK_BYTES, [path], hold=True).ref  # never released: not stored
    in_bucket_at_start: list[bool] = []
    opts = _options(path)

    async def go():
        async with running_worker(s, fake_registry(configured)) as client:
            runs = RunClient(client_settings, client, progress=None)
            if command == "run":
                record = lambda _: in_bucket_at_start.append(object_store.exists(ref.manifest_key))  # noqa: E731
                return await asyncio.wait_for(runs.run(opts, on_started=record), 120)
            await asyncio.wait_for(runs.submit(opts), 120)
            in_bucket_at_start.append(True)  # submit returns once both are done
            return await client.get_workflow_handle(opts.workflow_id, result_type=RunResult).result()

    result = asyncio.run(go())
    assert result.status == "completed" and result.answer == "20000 entries", result
    assert in_bucket_at_start == [True]


def test_bad_s3_keys_stop_rlm_run_before_any_run_starts(settings, configured, tmp_path):
    s = isolated(settings)
    wrong = s.model_copy(update={"s3_access_key": "not-the-key", "s3_secret_key": "not-the-secret"})
    opts = _options(_context(tmp_path))

    async def go():
        async with running_worker(s, fake_registry(configured)) as client:
            with pytest.raises(RunError, match="rejected the credentials") as refused:
                await RunClient(wrong, client, progress=None).run(opts)
            with pytest.raises(RPCError, match="not found"):
                await client.get_workflow_handle(opts.workflow_id).describe()
            return refused.value

    asyncio.run(go())
    assert configured.requests() == []  # no model was paid


def test_an_upload_failing_after_the_start_cancels_the_run_and_says_why(settings, configured, tmp_path):
    s = isolated(settings)
    # The keys once reached a bucket that now cannot be reached: the client
    # starts the run on the copy, then finds out while uploading.
    gone = s.model_copy(update={"s3_endpoint": f"127.0.0.1:{_free_port()}"})
    _s3_check_file(gone).write_text(_s3_identity(gone))
    held = threading.Event()
    configured.add_rule("Turn 1 of", repl("print(1)"), model=ROOT, hold=held)
    opts = _options(_context(tmp_path))

    async def go():
        async with running_worker(s, fake_registry(configured)) as client:
            try:
                with pytest.raises(RunError) as failed:
                    await RunClient(gone, client, progress=None).run(opts)
            finally:
                held.set()
            result = await client.get_workflow_handle(opts.workflow_id, result_type=RunResult).result()
            return failed.value, result

    failed, result = asyncio.run(go())
    assert "unreachable" in str(failed) and f"run {opts.workflow_id} is cancelled" in str(failed), failed
    assert result.status == "cancelled" and "context upload failed" in (result.reason or ""), result
    assert not _s3_check_file(gone).exists()  # the next run checks the keys before it starts


def test_a_client_interrupted_after_the_start_still_stores_the_context(
    settings, configured, object_store: ObjectStore, tmp_path
):
    """Ctrl-C in `rlm run` cancels its task once the run has started (the
    run goes on): the upload, held until then, is finished before the
    cancellation reaches the command, which may then leave with os._exit."""
    s = isolated(settings)
    _s3_check_file(s).write_text(_s3_identity(s))  # the keys worked before: nothing is sent before the start
    held = threading.Event()
    configured.add_rule("Turn 1 of", repl("print(1)"), model=ROOT, hold=held)
    path = _context(tmp_path)
    ref = stage_files(lambda: object_store, DEFAULT_CHUNK_BYTES, [path], hold=True).ref  # never released: not stored
    opts = _options(path)

    async def go():
        async with running_worker(s, fake_registry(configured)) as client:
            task = asyncio.current_task()
            try:
                with pytest.raises(asyncio.CancelledError):
                    await RunClient(s, client, progress=None).run(opts, on_started=lambda _: task.cancel())
                stored = object_store.exists(ref.manifest_key)
                task.uncancel()
            finally:
                held.set()
            await client.get_workflow_handle(opts.workflow_id).cancel()
            return stored

    assert asyncio.run(go())
    assert ContextStore(object_store).read_all(ref) == path.read_text()


def test_ctrl_c_while_the_context_is_read_stops_the_reading(settings, configured, object_store: ObjectStore, tmp_path):
    """Ctrl-C before the run starts: nothing is started, and the reading of
    the context stops at its next block (a large context read and uploaded
    in full first kept the command from ending)."""
    s = isolated(settings)
    path = tmp_path / "large.txt"
    path.write_text("".join(f"{uuid.uuid4().hex} line {i}\n" for i in range(600_000)))  # ~30 MB, 30 read blocks
    ref = stage_files(lambda: object_store, DEFAULT_CHUNK_BYTES, [path], hold=True).ref  # never released: not stored
    opts = _options(path)
    cancelled = threading.Event()

    class _Interrupting:
        """Ctrl-C as the upload begins: the command's task is cancelled (and
        has ended) before the first block is read."""

        def __init__(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task) -> None:
            self._loop, self._task = loop, task

        def note(self, message: str) -> None:
            if message.startswith("uploading context"):
                self._loop.call_soon_threadsafe(self._cancel)
                assert cancelled.wait(30)

        def _cancel(self) -> None:
            self._task.add_done_callback(lambda _: cancelled.set())
            self._task.cancel()

    async def go():
        async with running_worker(s, fake_registry(configured)) as client:
            runs = RunClient(s, client, progress=None)
            task = asyncio.ensure_future(runs.run(opts))
            runs.progress = _Interrupting(asyncio.get_running_loop(), task)  # type: ignore[assignment]
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.get_running_loop().shutdown_default_executor()  # the reading thread ended
            with pytest.raises(RPCError, match="not found"):
                await client.get_workflow_handle(opts.workflow_id).describe()

    asyncio.run(go())
    assert not object_store.exists(ref.manifest_key)
    assert not (s.context_cache_dir / ref.sha256).exists()  # read only in part: no copy
