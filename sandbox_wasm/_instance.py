"""One guest instance: a wasmtime store running the REPL driver on its own thread.

The wasm thread runs the guest's `_start`, which never returns while the
REPL lives. The guest blocks inside a host callback whenever it waits for a
command or a host-function result; those callbacks hand messages to the
session's thread through two queues, so host functions run in the thread that
called `run_cell` (where, e.g., a Temporal activity context is available).
Deadlines are set from the wasm thread, the only thread that may touch the store.

Time is enforced by epoch interruption: every few ticks the store calls back
into `_on_epoch` (on the wasm thread), which traps the guest once its deadline
has passed or once another thread asked for an interrupt (`interrupt()`,
used to cancel a cell). A trap is not a Python exception inside the guest, so
guest code cannot catch it.
"""

from __future__ import annotations

import ctypes
import math
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import wasmtime
from wasmtime import _bindings as wasmtime_bindings
from wasmtime import _ffi as wasmtime_ffi

from ._boot_image import BootImage
from ._hostcall import WasiShim, frame_source
from ._output import OutputCollector
from ._runtime import CLOUDPICKLE_DIR, GUEST_DIR, TICK_S, Runtime
from ._types import SandboxError, SandboxLimits, SandboxUnavailable

_BOOT = ("import sys; sys.path[:0] = ['/rlm/pyc', '/rlm/guest']; "
         "import rlm_driver; rlm_driver.main()")
# Ticks between two epoch callbacks: how soon an interrupt from another
# thread stops running guest code (CHECK_TICKS x TICK_S = 50 ms).
CHECK_TICKS = 5
_EPOCH_CALLBACK = wasmtime_bindings._wasmtime_store_epoch_deadline_callback.argtypes[1]
# wasmtime calls a finalizer for the callback's data pointer, which we leave NULL.
_NO_FINALIZER = wasmtime_bindings._wasmtime_store_epoch_deadline_callback.argtypes[3](
    lambda _data: None)
_UPDATE_CONTINUE = 0


class Aborted(Exception):
    """Raised inside the wasm thread to kill an instance the session gave up on."""


_ABORT = object()


@dataclass(frozen=True)
class Event:
    """A message from the wasm thread to the session thread."""

    kind: str
    """`done` (command finished), `call` (host function wanted) or `dead`."""
    payload: Any = None
    timed_out: bool = False
    """For `dead`: the deadline trap (the cell ran out of time)."""
    interrupted: bool = False
    """For `dead`: stopped by `interrupt()` (e.g. the cell was cancelled)."""


class HungGuest(Exception):
    """The guest did not answer within its deadline plus grace."""


class GuestInstance:
    """A booted REPL guest. Methods are called from the session thread only.

    `image`: start from this boot image instead of running CPython's start-up;
    `take_image`: once booted, be imaged (`taken_image`) for later guests."""

    def __init__(self, runtime: Runtime, memory_bytes: int, output: OutputCollector,
                 max_frame: int, image: BootImage | None = None, take_image: bool = False):
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._commands: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._deadline: float | None = None
        self._fault: str | None = None
        self._interrupt: str | None = None
        self._busy = False
        self._ticker = runtime.ticker
        self.output = output
        self.alive = True
        self.memory_bytes = 0
        """Size of the guest's linear memory at its last host-function call:
        it cannot grow until the call returns (only guest code grows it)."""
        self.taken_image: BootImage | None = None
        self._image = image
        self._imaging = False  # the next clock read is the moment to image
        store = wasmtime.Store(runtime.engine)
        store.set_limits(memory_size=memory_bytes)
        store.set_epoch_deadline(CHECK_TICKS)
        # Kept on self: wasmtime holds only the C pointer.
        self._epoch_callback = _EPOCH_CALLBACK(self._on_epoch)
        wasmtime_ffi.wasmtime_store_epoch_deadline_callback(
            store.ptr(), self._epoch_callback, None, _NO_FINALIZER)
        wasi = wasmtime.WasiConfig()
        wasi.argv = ["python", "-I", "-S", "-B", "-c", _BOOT]
        # Our own guest code and cloudpickle, read-only; nothing else of the host.
        wasi.preopen_dir(str(GUEST_DIR), "/rlm/guest", False)
        wasi.preopen_dir(str(CLOUDPICKLE_DIR), "/rlm/cloudpickle", False)
        if runtime.bytecode_dir is not None:
            wasi.preopen_dir(str(runtime.bytecode_dir), "/rlm/pyc", False)
        store.set_wasi(wasi)
        linker = wasmtime.Linker(runtime.engine)
        linker.define_wasi()
        self._shim = WasiShim(self._on_message, output.feed, lambda: self._deadline, max_frame)
        self._shim.install(linker, store, self._on_clock if take_image else None)
        instance = linker.instantiate(store, runtime.module)
        self._shim.bind(store, instance, runtime.trampoline)
        self._exports: Any = instance.exports(store)
        # What an image is told apart from: a fresh instance's memory.
        self._fresh = self._exports["memory"].read(store) if take_image else None
        self._store: wasmtime.Store | None = store
        self._thread = threading.Thread(target=self._run, name="sandbox-guest", daemon=True)

    # -- session thread -----------------------------------------------------------
    def boot(self, timeout_s: float, grace_s: float) -> Any:
        """Start the wasm thread and wait until the driver reports ready."""
        self._deadline = time.monotonic() + timeout_s
        self._busy = True
        self._thread.start()
        event = self.wait(timeout_s + grace_s)
        if event.kind != "done":
            raise RuntimeError(f"guest failed to boot: {event.payload}")
        if self._fresh is not None:
            # Two commands: the imports REPLs will need (whatever clocks they
            # read), then, with nothing else running, the clock read to image at.
            self.send(["import_ahead"], timeout_s)
            prepared = self.wait(timeout_s + grace_s)
            if prepared.kind != "done" or "error" in prepared.payload:
                raise RuntimeError(f"guest could not prepare its image: {prepared.payload}")
            self._imaging = True
            self.send(["image"], timeout_s)
            imaged = self.wait(timeout_s + grace_s)
            if imaged.kind != "done" or self.taken_image is None:
                raise RuntimeError(f"guest could not be imaged: {imaged.payload}")
        return event.payload

    def send(self, message: Any, timeout_s: float, sources: list[Any] | None = None) -> None:
        """Hand the next command to the guest (it is waiting for one)."""
        # Encoded here, not on the wasm thread: an encoding error stays a
        # Python exception in the caller instead of killing the instance.
        source = frame_source(message)
        self._busy = True
        self._commands.put((source, timeout_s, sources or []))

    def reply(self, message: Any) -> None:
        """Answer a pending host-function call (raises CodecError if unencodable)."""
        self._commands.put((frame_source(message), None, []))

    def wait(self, timeout_s: float) -> Event:
        try:
            event = self._events.get(timeout=timeout_s)
        except queue.Empty:
            raise HungGuest from None
        if event.kind == "dead":
            self.alive = False
        elif event.kind == "done":
            self._busy = False
        return event

    @property
    def refused_frames(self) -> int:
        shim = self._shim
        return shim.refused_frames if shim is not None else 0

    def take_refusal(self) -> str | None:
        """Why the host last refused a write on fd 0, once (then None until
        the next refusal): cell code writing raw bytes there sees only an errno."""
        shim = self._shim
        return shim.take_refusal() if shim is not None else None

    def abort(self) -> None:
        """Kill the guest at its next host callback (used when the session gives up)."""
        self.alive = False
        self._commands.put(_ABORT)

    def interrupt(self, reason: str) -> None:
        """Stop the guest from any thread: running wasm traps within CHECK_TICKS
        ticks; a guest waiting in a host callback is aborted there."""
        if self._interrupt is None:
            self._interrupt = reason
        self.abort()

    def close(self) -> None:
        """Stop the guest and free the store (its memory) once the thread is done."""
        idle = self.alive and not self._busy
        if idle and self._thread.is_alive():
            self.send(["exit"], 5.0)
        elif self._thread.is_alive():
            # Mid-command: an exit command would wait for the command to end.
            self.interrupt("the session was closed")
        # A hung guest (blocked in a WASI call) is not waited for: it is left
        # to finish on its daemon thread and is freed by the garbage collector.
        self._thread.join(timeout=5.0 if idle else 1.0)
        self.alive = False
        if not self._thread.is_alive() and self._store is not None:
            # Callbacks registered with wasmtime keep this object (and so the
            # store) reachable; closing the store drops them and the memory.
            self._shim = None
            self._exports = None
            self._store.close()
            self._store = None
            self._epoch_callback = None

    # -- wasm thread --------------------------------------------------------------
    def _run(self) -> None:
        self._ticker.running()
        try:
            if self._image is not None:
                code = self._image.enter(self._store, self._exports)
                event = Event("dead", f"the guest REPL exited (resume returned {code})")
            else:
                self._exports["_start"](self._store)
                event = Event("dead", "the guest REPL exited")
        except wasmtime.ExitTrap as exc:
            event = Event("dead", f"the guest called exit (code {exc.code})")
        except BaseException as exc:  # a trap, or an exception from a callback
            event = self._classify(exc)
        finally:
            self._deadline = None
            self._ticker.waiting()
        self._events.put(event)

    def _classify(self, exc: BaseException) -> Event:
        if self._interrupt is not None:
            return Event("dead", self._interrupt, interrupted=True)
        if self._fault is not None:
            return Event("dead", self._fault)
        code = getattr(exc, "trap_code", None)
        deadline = self._deadline
        if code == wasmtime.TrapCode.INTERRUPT or (
                deadline is not None and time.monotonic() >= deadline):
            return Event("dead", "deadline", timed_out=True)
        if code == wasmtime.TrapCode.STACK_OVERFLOW:
            return Event("dead", "the guest exhausted its call stack (too deep recursion)")
        message = getattr(exc, "message", None) or str(exc)
        return Event("dead", f"the guest crashed: {message.splitlines()[0] if message else exc!r}")

    def _on_message(self, message: Any, caller: Any) -> list[Any]:
        kind = message[0] if isinstance(message, list) and message else None
        if kind == "call" and len(message) == 4:
            left = None if self._deadline is None else self._deadline - time.monotonic()
            self._deadline = None  # host time does not count
            self.memory_bytes = self._shim.memory_bytes(caller)
            self._events.put(Event("call", message[1:]))
            answer, _timeout, _sources = self._next_command()
            self._set_deadline(caller, left)
            return [answer]
        if kind == "same_items" and len(message) == 5 and all(type(v) is int for v in message[1:]):
            # Answered here, on the wasm thread: a snapshot asks it of each long list.
            return [frame_source([self._shim.same_items(caller, *message[1:])])]
        if kind == "done" and len(message) == 2:
            self._deadline = None
            self._events.put(Event("done", message[1]))
            command, timeout_s, sources = self._next_command()
            self._set_deadline(caller, timeout_s)
            return [command, *sources]
        self._fault = "the guest broke the host-call protocol (unexpected message on fd 0)"
        raise Aborted(self._fault)

    def _on_clock(self, caller: Any) -> None:
        """After each clock read of a guest to be imaged (wasm thread)."""
        if self._imaging:
            self._imaging = False
            fresh, self._fresh = self._fresh, None
            assert fresh is not None
            self.taken_image = BootImage.take(caller, fresh)

    def _next_command(self) -> tuple[Any, float | None, list[Any]]:
        self._ticker.waiting()  # no wasm runs here: the ticker may sleep
        try:
            item = self._commands.get()
        finally:
            self._ticker.running()
        if item is _ABORT:
            self._fault = "the session abandoned this instance"
            raise Aborted(self._fault)
        return item

    def _set_deadline(self, caller: Any, seconds: float | None) -> None:
        if seconds is None:
            return
        seconds = max(seconds, 0.0)
        self._deadline = time.monotonic() + seconds
        wasmtime_ffi.wasmtime_context_set_epoch_deadline(caller._context(), _ticks_until(seconds))

    def _on_epoch(self, _context: Any, _data: Any, delta: Any, update_kind: Any) -> int:
        """Epoch callback (wasm thread, between guest instructions): trap or go on.

        Must not raise: an exception cannot cross the C boundary."""
        try:
            if self._interrupt is not None:
                return _trap(f"interrupted: {self._interrupt}")
            deadline = self._deadline
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return _trap("the deadline passed")
            delta[0] = _ticks_until(left)
            update_kind[0] = _UPDATE_CONTINUE
            return 0
        except BaseException:  # noqa: BLE001 - stop the guest rather than lose control
            return _trap("epoch check failed")


def boot_guest(runtime: Runtime, limits: SandboxLimits) -> GuestInstance:
    """A booted guest: from the runtime's boot image if it has one, else from
    scratch (the first guest is imaged for the next ones). A failed image or
    imaging is dropped and the guest boots from scratch."""
    images = runtime.boot_image
    image = images.image
    take = image is None and images.claim()
    try:
        instance = _boot(runtime, limits, image, take)
    except SandboxError as exc:
        if image is None and not take:
            raise
        images.failed(str(exc))
        instance = _boot(runtime, limits, None, False)
    else:
        if image is not None:
            images.started()
    if take:
        assert instance.taken_image is not None  # boot() raises otherwise
        images.publish(instance.taken_image)
    return instance


def _boot(runtime: Runtime, limits: SandboxLimits, image: BootImage | None,
          take_image: bool) -> GuestInstance:
    output = OutputCollector(limits.full_output_chars)
    try:
        instance = GuestInstance(runtime, limits.memory_bytes, output, limits.max_frame_bytes,
                                 image, take_image)
    except Exception as exc:
        raise SandboxUnavailable(f"the sandbox failed to instantiate: {exc}") from exc
    try:
        instance.boot(limits.admin_timeout_s, limits.hang_grace_s)
    except Exception as exc:
        instance.close()
        raise SandboxError(f"the sandbox failed to boot: {exc}") from exc
    return instance


def _ticks_until(seconds: float | None) -> int:
    if seconds is None:
        return CHECK_TICKS
    # +1: the next tick may come at once, so n ticks can be as short as n-1.
    return max(1, min(math.ceil(seconds / TICK_S) + 1, CHECK_TICKS))


def _trap(message: str) -> int:
    error = wasmtime_ffi.wasmtime_error_new(ctypes.create_string_buffer(message.encode()))
    return ctypes.cast(error, ctypes.c_void_p).value or 0
