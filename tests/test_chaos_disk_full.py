"""Chaos: the disk of the worker's context cache is full.

A real full disk: the worker's data dir (the cache is data_dir/cache/contexts)
is a 4 MiB tmpfs mounted for the test, and the run's 1.5 MB context does not
fit on it.

- Filled by a file of something else: the cell cannot run; the model is told
  why (no space left, naming the cache's directory) and the run goes on. Once
  the operator frees the disk, the next cell reads the context and the run
  completes.
- Filled by an old context no one uses (the disk is smaller than the cache's
  byte bound): the worker deletes it to make room and the first cell runs.

Mounting needs root (CI runs as root); elsewhere these are skipped with the
reason. RLIMIT_FSIZE was not used: it fails writes with EFBIG ("File too
large"), not the ENOSPC a full disk gives.
"""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from tests.chaos.workers import WorkerProcesses
from tests.run_harness import ROOT, isolated, repl, request, start
from worker import connect
from workflows.result import RunResult

pytestmark = pytest.mark.chaos
DISK_BYTES = 4 << 20
CONTEXT_CHARS = 1_500_000


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _on_disk(settings, data_dir: Path):
    """Settings for a worker whose data dir is `data_dir` (S3 keys given
    explicitly: they live in the session's data dir)."""
    access_key, secret_key = settings.s3_credentials()
    update = {"data_dir": data_dir, "s3_access_key": access_key, "s3_secret_key": secret_key}
    return isolated(settings).model_copy(update=update)


def _run_on_small_disk(
    settings, llm, small_disk: Path, ctx, log_dir: Path, label: str,
    during: Callable[[], Awaitable[None]] | None = None,
) -> tuple[RunResult, str]:
    """One run by a worker whose data dir is on the small disk; `during`
    acts while it runs. Returns the result and the workers' log tail."""
    s = _on_disk(settings, small_disk)
    started = time.monotonic()
    with WorkerProcesses(s, llm.url, log_dir / "workers.log") as workers:
        workers.start()

        async def go() -> RunResult:
            client = await connect(s)
            handle = await start(client, s, request("how long?", ctx), workflow_id=f"chaos-{label}-{uuid.uuid4().hex[:6]}")
            if during is not None:
                await during()
            return await asyncio.wait_for(handle.result(), 120.0)

        result = asyncio.run(go())
        log_tail = workers.log_tail()
    print(f"\n[chaos {label}] {time.monotonic() - started:.1f} s")
    return result, log_tail


def test_full_context_cache_disk_is_reported_and_survived(settings, llm, context_store, small_disk, tmp_path):
    filler = small_disk / "other-data.bin"
    filler.write_bytes(b"\0" * (DISK_BYTES - (1 << 20)))  # leaves 1 MiB: the context needs 1.5 MB
    ctx = context_store.put_value("y" * CONTEXT_CHARS)
    freed = threading.Event()
    llm.add_rule("Turn 1 of", repl("print('length', len(context))"), model=ROOT, name="turn1")
    llm.add_rule("no space left on the disk of the worker's context cache", repl("print('length', len(context))"), model=ROOT, name="told", hold=freed, times=1)
    llm.add_rule(f"length {CONTEXT_CHARS}", f"FINAL({CONTEXT_CHARS})", model=ROOT, name="final")

    async def free_the_disk_once_told() -> None:
        await asyncio.to_thread(llm.wait_for_count, 1, "told", 120.0)
        told = llm.requests(ROOT)[-1].last_user_text
        assert "the cell could not run" in told and str(small_disk / "cache" / "contexts") in told, told[-2000:]
        filler.unlink()  # the operator frees the disk
        freed.set()

    try:
        result, log_tail = _run_on_small_disk(settings, llm, small_disk, ctx, tmp_path, "disk-full", free_the_disk_once_told)
    finally:
        freed.set()
    assert result.status == "completed", (result.reason, log_tail)
    assert result.answer == str(CONTEXT_CHARS)
    assert llm.count("turn1") == llm.count("told") == llm.count("final") == 1
    assert not list(Path(small_disk / "cache" / "contexts").glob(".*-*")), "a half-written context was left behind"


def test_full_cache_disk_makes_room_from_unused_contexts(settings, llm, context_store, small_disk, tmp_path):
    cache = small_disk / "cache" / "contexts"
    old = context_store.put_value("o" * 3_000_000)
    context_store.materialize(old, cache)  # an earlier run's context, no longer in use
    ctx = context_store.put_value("y" * CONTEXT_CHARS)
    llm.add_rule("Turn 1 of", repl("print('length', len(context))"), model=ROOT, name="turn1")
    llm.add_rule(f"length {CONTEXT_CHARS}", f"FINAL({CONTEXT_CHARS})", model=ROOT, name="final")
    result, log_tail = _run_on_small_disk(settings, llm, small_disk, ctx, tmp_path, "disk-evict")
    assert result.status == "completed", (result.reason, log_tail)
    assert result.answer == str(CONTEXT_CHARS)
    assert llm.count("turn1") == llm.count("final") == 1  # the first cell ran
    assert not (cache / old.sha256).exists() and (cache / ctx.sha256).is_dir()
