"""A worker's memory stays bounded whatever guests and runs do: the REPL pool
keeps the memory caps of its live sessions within a budget (real sessions),
and the manifest cache is bounded (real S3 server)."""

from __future__ import annotations

import os
import platform
import threading
import time
import uuid
from pathlib import Path

import pytest

import activities._context_cache as context_cache_module
import activities.context_store as context_store_module
from activities._context_cache import STALE_WRITE_S, ContextFileCache
from activities._live_repl import CheckoutCancelled, GuestMemoryBusy, GuestMemoryTooLarge, LiveRepl
from activities._machine_memory import keep_freed_memory
from activities._repl_pool import ReplPool
from activities.context_store import ContextStore
from activities.object_store import ObjectStore
from sandbox_wasm import SandboxError, SandboxLimits

MIB = 1024 * 1024
CAP = SandboxLimits(cell_timeout_s=5.0, memory_bytes=128 * MIB)


def _start(live: LiveRepl) -> None:
    live.session.start()


def _until(condition) -> None:
    """Wait (30 s at most) until another thread made `condition` true."""
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.fixture
def patient_pool():
    """A 300 MiB pool whose checkouts wait a minute for memory."""
    pool = ReplPool(memory_budget=300 * MIB, busy_wait_s=60.0)
    yield pool
    pool.close()


@pytest.fixture
def pool():
    pool = ReplPool(memory_budget=300 * MIB, busy_wait_s=0.2)
    yield pool
    pool.close()


def test_third_session_closes_the_least_recently_used_idle_one(pool: ReplPool) -> None:
    a, _ = pool.checkout("run-a", None, CAP, _start)
    b, _ = pool.checkout("run-b", None, CAP, _start)
    pool.checkin("run-a", a)
    pool.checkin("run-b", b)
    assert pool.held_bytes == 256 * MIB
    c, warm = pool.checkout("run-c", None, CAP, _start)
    assert not warm and pool.held_bytes == 256 * MIB
    # run-a was idle longest: closed; run-b is still warm.
    with pytest.raises(SandboxError, match="not started"):
        a.session.run_cell("1")
    again, warm = pool.checkout("run-b", None, CAP, _start)
    assert warm and again is b
    assert b.session.run_cell("print(6 * 7)").output.strip() == "42"
    pool.discard(c)
    pool.checkin("run-b", b)
    assert pool.held_bytes == 128 * MIB


def test_busy_sessions_holding_the_budget_refuse_a_new_one_after_a_bounded_wait(pool: ReplPool) -> None:
    a, _ = pool.checkout("run-a", None, CAP, _start)
    b, _ = pool.checkout("run-b", None, CAP, _start)
    with pytest.raises(GuestMemoryBusy, match=r"already hold 256 MiB of its 300 MiB .* retried"):
        pool.checkout("run-c", None, CAP, _start)
    assert pool.held_bytes == 256 * MIB
    pool.discard(a)
    pool.discard(b)
    assert pool.held_bytes == 0


def test_a_waiting_checkout_proceeds_when_a_busy_session_is_checked_in(patient_pool: ReplPool) -> None:
    a, _ = patient_pool.checkout("run-a", None, CAP, _start)
    b, _ = patient_pool.checkout("run-b", None, CAP, _start)
    waiting = threading.Event()
    got: list[LiveRepl] = []

    def start_c(live: LiveRepl) -> None:
        got.append(live)
        live.session.start()

    def checkout_c() -> None:
        waiting.set()
        patient_pool.checkout("run-c", None, CAP, start_c)

    thread = threading.Thread(target=checkout_c)
    thread.start()
    waiting.wait()
    patient_pool.checkin("run-a", a)  # idle now: the waiting checkout closes it
    thread.join()
    assert len(got) == 1 and patient_pool.held_bytes == 256 * MIB
    with pytest.raises(SandboxError, match="not started"):
        a.session.run_cell("1")
    patient_pool.discard(b)
    patient_pool.discard(got[0])
    assert patient_pool.held_bytes == 0


def test_a_checkout_waiting_for_memory_or_its_repl_stops_when_its_cell_is_cancelled(patient_pool: ReplPool) -> None:
    """A cancelled run's cell waited out the whole wait (30 s for memory, 60 s
    for the REPL being made for it) before its cancel was seen, and the run's
    cancel waited with it. It stops waiting once told, holding nothing; a
    REPL still being made for it is closed when done, not kept idle."""
    a, _ = patient_pool.checkout("run-a", None, CAP, _start)
    b, _ = patient_pool.checkout("run-b", None, CAP, _start)
    cancel = threading.Event()
    raised: list[BaseException] = []

    def checkout_c() -> None:
        try:
            patient_pool.checkout("run-c", None, CAP, _start, cancel=cancel)
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            raised.append(exc)

    thread = threading.Thread(target=checkout_c)
    thread.start()
    _until(lambda: patient_pool.waiting_checkouts == 1)
    cancel.set()
    thread.join(10)  # the wait for memory is 60 s
    assert not thread.is_alive() and [type(e) for e in raised] == [CheckoutCancelled], raised
    assert patient_pool.held_bytes == 256 * MIB
    patient_pool.discard(a)
    patient_pool.discard(b)

    release = threading.Event()

    def slow_start(live: LiveRepl) -> None:
        release.wait(30)
        live.session.start()

    assert patient_pool.prepare("run-d", None, CAP, slow_start)
    with pytest.raises(CheckoutCancelled, match="being made"):
        patient_pool.checkout("run-d", None, CAP, _start, cancel=cancel)  # its REPL is waited for 60 s
    release.set()
    _until(lambda: patient_pool.held_bytes == 0)  # made, then closed, not kept idle: no cell of the run will take it


def test_a_cancelled_checkout_closes_no_other_runs_idle_repl(patient_pool: ReplPool) -> None:
    """Cancelled as it was about to make room, a cell closed run-b's warm REPL
    and booted one for a run that had ended, instead of stopping."""
    a, _ = patient_pool.checkout("run-a", None, CAP, _start)
    b, _ = patient_pool.checkout("run-b", None, CAP, _start)
    patient_pool.checkin("run-b", b)  # idle: warm for run-b's next cell
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(CheckoutCancelled):
        patient_pool.checkout("run-c", None, CAP, _start, cancel=cancel)
    assert patient_pool.held_bytes == 256 * MIB
    again, warm = patient_pool.checkout("run-b", None, CAP, _start)
    assert warm and again is b
    patient_pool.discard(a)
    patient_pool.discard(b)


def test_checkouts_waiting_for_memory_are_served_in_arrival_order() -> None:
    """When memory frees up, the checkout that waited longest gets it (woken
    together, waiters used to race, and with 100 runs at once some lost until
    their wait ran out and their cells were retried)."""
    pool = ReplPool(memory_budget=200 * MIB, busy_wait_s=60.0)  # one 128 MiB REPL at a time
    names = [f"run-{i}" for i in range(1, 5)]
    started: list[str] = []
    got: dict[str, LiveRepl] = {}

    def checkout(name: str) -> None:
        got[name], _ = pool.checkout(name, None, CAP, lambda live: started.append(name))

    try:
        first, _ = pool.checkout("run-0", None, CAP, _start)
        threads = []
        for count, name in enumerate(names, start=1):
            threads.append(threading.Thread(target=checkout, args=(name,)))
            threads[-1].start()
            _until(lambda count=count: pool.waiting_checkouts == count)
        pool.discard(first)
        for name in names:
            _until(lambda name=name: name in got)
            assert pool.held_bytes == 128 * MIB
            pool.discard(got[name])
        for thread in threads:
            thread.join()
        assert started == names
        assert pool.waiting_checkouts == 0 and pool.held_bytes == 0
    finally:
        pool.close()


def test_a_guest_waiting_in_a_host_call_holds_only_what_it_has_grown_to(pool: ReplPool) -> None:
    """While a cell waits for its sub-calls its guest cannot grow: the rest of
    its cap serves other sessions meanwhile (300 MiB budget, 128 MiB caps:
    a third session fits only while the first one waits), and is taken back
    when the call returns."""
    a, _ = pool.checkout("run-a", None, CAP, _start)
    b, _ = pool.checkout("run-b", None, CAP, _start)
    seen: dict[str, int] = {}

    def llm_query(prompt: str, model: str | None = None) -> str:
        seen["grown"] = a.session.guest_memory_bytes
        seen["held"] = pool.held_bytes
        c, _ = pool.checkout("run-c", None, CAP, _start)  # 384 MiB of caps: fits only now
        assert c.session.run_cell("print(6 * 7)").output.strip() == "42"
        pool.discard(c)
        return "ok"

    with pytest.raises(GuestMemoryBusy):  # no guest is waiting in a host call: the caps hold
        pool.checkout("run-c", None, CAP, _start)
    a.host["llm_query"] = llm_query
    cell = a.session.run_cell("grow = bytearray(30 * 2**20)\nllm_query('q')")
    assert cell.error is None and cell.value_repr == "'ok'", cell
    assert 30 * MIB < seen["grown"] < 100 * MIB
    assert seen["held"] == seen["grown"] + 128 * MIB
    assert pool.held_bytes == 256 * MIB  # the whole cap again
    # FINAL answers at once: its caller keeps its cap (nothing to lend, nothing to wait for).
    a.host["FINAL"] = lambda answer: seen.__setitem__("held_in_final", pool.held_bytes)
    assert a.session.run_cell("FINAL('done')").error is None
    assert seen["held_in_final"] == 256 * MIB
    pool.discard(a)
    pool.discard(b)
    assert pool.held_bytes == 0


def test_a_guest_back_from_a_host_call_takes_its_memory_back_before_new_sessions() -> None:
    """Returning guests go first: a new session waiting for memory does not
    take what a guest back from its sub-calls needs to run again."""
    pool = ReplPool(memory_budget=300 * MIB, busy_wait_s=60.0)
    order: list[str] = []
    lent = threading.Event()
    c_started = threading.Event()
    got: dict[str, LiveRepl] = {}

    try:
        a, _ = pool.checkout("run-a", None, CAP, _start)
        b, _ = pool.checkout("run-b", None, CAP, _start)

        def llm_query(prompt: str, model: str | None = None) -> str:
            lent.set()
            c_started.wait(30)  # C took the memory A lent
            return "ok"

        a.host["llm_query"] = llm_query

        def run_a() -> None:
            cell = a.session.run_cell("llm_query('q')")
            order.append("a ran on: " + str(cell.value_repr))

        def checkout(name: str, started: threading.Event | None) -> None:
            got[name], _ = pool.checkout(name, None, CAP, lambda live: order.append(name + " started"))
            if started is not None:
                started.set()

        threads = [threading.Thread(target=run_a)]
        threads[0].start()
        lent.wait(30)
        threads.append(threading.Thread(target=checkout, args=("c", c_started)))
        threads[-1].start()
        _until(lambda: "c" in got)  # A waits in its call: C fits
        threads.append(threading.Thread(target=checkout, args=("d", None)))
        threads[-1].start()
        _until(lambda: pool.waiting_checkouts == 1 and pool.returning_guests == 1)  # D waits, and A, back
        pool.discard(got["c"])  # enough for A (or for D): A goes first
        _until(lambda: any(o.startswith("a ran on") for o in order))
        assert "d started" not in order and pool.held_bytes == 256 * MIB
        pool.discard(b)  # now D fits
        for thread in threads:
            thread.join(30)
        assert order == ["c started", "a ran on: 'ok'", "d started"]
        pool.discard(a)
        pool.discard(got["d"])
        assert pool.held_bytes == 0
    finally:
        pool.close()


def test_a_cap_over_the_whole_budget_is_refused_at_once(pool: ReplPool) -> None:
    big = SandboxLimits(memory_bytes=512 * MIB)
    with pytest.raises(GuestMemoryTooLarge, match=r"512 MiB exceeds .* 300 MiB.*RLM_GUEST_MEMORY_SHARE"):
        pool.checkout("run-a", None, big, _start)
    assert pool.held_bytes == 0


def test_a_session_whose_start_fails_is_closed_and_its_memory_released(pool: ReplPool) -> None:
    started: list[LiveRepl] = []

    def failing(live: LiveRepl) -> None:
        live.session.start()
        started.append(live)
        raise RuntimeError("context download failed")

    with pytest.raises(RuntimeError, match="context download failed"):
        pool.checkout("run-a", None, CAP, failing)
    assert pool.held_bytes == 0
    with pytest.raises(SandboxError, match="not started"):
        started[0].session.run_cell("1")
    # The budget is whole again: two sessions fit.
    a, _ = pool.checkout("run-a", None, CAP, _start)
    b, _ = pool.checkout("run-b", None, CAP, _start)
    pool.discard(a)
    pool.discard(b)


def test_close_callbacks_run_once_when_a_session_is_closed(pool: ReplPool) -> None:
    closed: list[str] = []
    a, _ = pool.checkout("run-a", None, CAP, _start)
    a.on_close.append(lambda: closed.append("a"))
    pool.checkin("run-a", a)
    pool.close()
    pool.discard(a)  # a second close neither calls back nor releases twice
    assert closed == ["a"] and pool.held_bytes == 0


def test_manifest_cache_is_bounded(object_store: ObjectStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(context_store_module, "MANIFEST_CACHE_ENTRIES", 3)
    store = ContextStore(object_store)
    texts = [f"[{uuid.uuid4().hex}] document {i}" for i in range(5)]
    refs = [store.put_text(t) for t in texts]
    assert store.cached_manifests == 3
    # Evicted manifests are fetched again (and verified) when needed.
    assert [store.read_all(r) for r in refs] == texts
    assert store.cached_manifests == 3


def test_manifest_cache_is_bounded_by_items(object_store: ObjectStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(context_store_module, "MANIFEST_CACHE_ITEMS", 5)
    store = ContextStore(object_store)
    refs = [store.put_documents([f"[{uuid.uuid4().hex}]", "b", "c"]) for _ in range(3)]
    # Each manifest lists 3 documents + 1 chunk: only one fits in 5 items.
    assert store.cached_manifests == 1
    assert store.read_all(refs[0])[1:] == ["b", "c"]


def test_context_files_are_evicted_by_size_but_never_while_in_use(
    object_store: ObjectStore, tmp_path: Path
) -> None:
    contexts = ContextStore(object_store)
    a, b, c = (contexts.put_text(f"[{uuid.uuid4().hex}] {name} " + "x" * 30) for name in "abc")
    cache = ContextFileCache(tmp_path, 100, contexts)  # room for one ~70-byte context
    a_paths, release_a = cache.acquire(a)
    b_paths, release_b = cache.acquire(b)
    release_b()
    c_paths, release_c = cache.acquire(c)
    # b was the only one not in use: gone; a and c stay although over the bound.
    assert not b_paths[0].path.exists()
    assert a_paths[0].read_bytes().startswith(b"[") and c_paths[0].path.exists()
    # Another user of the same directory (e.g. a second worker) sees them in use too.
    other = ContextFileCache(tmp_path, 0, contexts)
    assert other.evict() > 0 and a_paths[0].path.exists() and c_paths[0].path.exists()
    release_a()
    release_a()  # releasing twice is harmless
    cache.evict()
    assert not a_paths[0].path.exists() and c_paths[0].path.exists()
    # An evicted context is written again when needed.
    again, release_again = cache.acquire(a)
    assert again == a_paths and again[0].path.exists()
    release_again()
    release_c()
    assert other.evict() == 0


def _context_of(contexts: ContextStore, size: int):
    text = f"[{uuid.uuid4().hex}] "
    return contexts.put_text(text + "x" * (size - len(text)))


def test_a_full_cache_evicts_down_to_its_low_watermark(object_store: ObjectStore, tmp_path: Path) -> None:
    # Evicting to just under the bound would scan all contexts again at the
    # next new one; down to 90% of it, only after a tenth of the bound is written.
    contexts = ContextStore(object_store)
    cache = ContextFileCache(tmp_path, 1000, contexts)
    refs = [_context_of(contexts, 250) for _ in range(5)]
    assert {ref.total_bytes for ref in refs} == {250}
    long_ago = time.time() - 1000
    for age, ref in enumerate(refs[:4]):  # 1,000 bytes: at the bound, not past it
        paths, release = cache.acquire(ref)
        release()
        os.utime(paths[0].path.parent, (long_ago + age, long_ago + age))
    assert len(list(tmp_path.glob("[0-9a-f]" * 64))) == 4
    cache.acquire(refs[4])[1]()  # 1,250: down to 900 at most, the oldest first
    kept = {path.name for path in tmp_path.glob("[0-9a-f]" * 64)}
    assert kept == {ref.sha256 for ref in refs[2:]}


def test_a_cache_scans_its_directory_only_past_its_bound_or_a_while_after_its_last_scan(
    object_store: ObjectStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A scan reads every cached context's size (~150 ms at 10,000 of them);
    # an abandoned write shows whether one ran: only a scan removes it.
    contexts = ContextStore(object_store)
    cache = ContextFileCache(tmp_path, 1000, contexts)
    cache.acquire(_context_of(contexts, 300))[1]()  # a first scan: the cache does not know its total yet

    def abandon() -> Path:
        path = tmp_path / f".upload-{uuid.uuid4().hex[:8]}"
        path.mkdir()
        old = time.time() - STALE_WRITE_S - 60
        os.utime(path, (old, old))
        return path

    abandoned = abandon()
    cache.acquire(_context_of(contexts, 300))[1]()  # 600 bytes: within the bound
    assert abandoned.exists()
    cache.acquire(_context_of(contexts, 500))[1]()  # 1,100: past it
    assert not abandoned.exists()
    assert sum(1 for _ in tmp_path.glob("[0-9a-f]" * 64)) == 2  # evicted down to 900 at most
    abandoned = abandon()
    monkeypatch.setattr(context_cache_module, "RESCAN_S", 0.0)  # another process may have written meanwhile
    cache.acquire(_context_of(contexts, 10))[1]()
    assert not abandoned.exists()


def test_a_context_write_abandoned_mid_way_is_removed_but_not_one_in_progress(
    object_store: ObjectStore, tmp_path: Path
) -> None:
    # A worker or `rlm run` killed while writing a context leaves a hidden
    # directory that no eviction by size would ever see.
    contexts = ContextStore(object_store)
    cache = ContextFileCache(tmp_path, 1 << 30, contexts)
    abandoned, fresh = tmp_path / ".upload-dead", tmp_path / ".upload-live"
    for directory in (abandoned, fresh):
        directory.mkdir()
        (directory / "000000.txt").write_text("partial")
    locks = tmp_path / ".locks"
    locks.mkdir()
    old = time.time() - STALE_WRITE_S - 60
    for path in (abandoned / "000000.txt", abandoned, locks):
        os.utime(path, (old, old))
    cache.evict()
    assert not abandoned.exists()
    assert (fresh / "000000.txt").read_text() == "partial"
    assert locks.is_dir()  # the lock files' directory is not a write in progress


def test_context_sha256_never_names_a_path(object_store: ObjectStore, tmp_path: Path) -> None:
    contexts = ContextStore(object_store)
    ref = contexts.put_text(f"[{uuid.uuid4().hex}]")
    cache = ContextFileCache(tmp_path / "cache", 100, contexts)
    with pytest.raises(ValueError, match="64 lowercase hex"):
        cache.acquire(ref.model_copy(update={"sha256": "../escape"}))
    assert not (tmp_path / "escape").exists()


def test_a_worker_whose_guest_budget_is_below_the_default_repl_cap_says_so_at_start(settings, llm, tmp_path) -> None:
    """On a small machine or pod (half of 3 GiB under the default 2 GiB cap)
    every run with the default limits ends at its first cell: the operator is
    told when the worker starts, not by the first failed run."""
    import json
    import os
    import signal

    from tests.run_harness import isolated, start_worker_process

    log_path = tmp_path / "worker.log"
    proc = start_worker_process(isolated(settings), llm.url, log_path, env={"RLM_GUEST_MEMORY_SHARE": "0.00001"})
    try:
        _until(lambda: "worker.guest_memory_below_default_repl_cap" in log_path.read_text() or proc.poll() is not None)
        assert proc.poll() is None, log_path.read_text()[-3000:]
        events = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
        warned = [e for e in events if e.get("event") == "worker.guest_memory_below_default_repl_cap"]
        assert len(warned) == 1, events
        assert warned[0]["default_cap_mib"] == 2048 and warned[0]["budget_mib"] < 2048
        assert "RLM_GUEST_MEMORY_SHARE" in warned[0]["hint"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)


def test_the_worker_keeps_freed_memory_for_reuse_where_libc_allows() -> None:
    """glibc's thresholds are set (activities/_machine_memory.py); elsewhere
    nothing is changed and the worker still starts."""
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert keep_freed_memory()
