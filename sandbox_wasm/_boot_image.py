"""Boot images: a guest starts as a copy of one that has already booted.

A normal boot runs CPython's start-up in wasm and imports the driver: 40-66
ms of CPU (two machines), most of a REPL's life, and 100 runs starting
together queue on it. From an image a guest starts in ~6 ms (a REPL's life
106 -> 21 ms of CPU, bench/bench_sandbox.py). The first guest of a runtime
boots normally, imports what REPLs will use (`rlm_driver._import_ahead`), and
is then asked to stand still in a host call made holding the GIL (a clock
read, `rlm_driver._stand_still`, the first once the command arrives); the
host copies its linear memory and stack pointer there: the image. Later
guests are fresh instances of the same module whose memory gets the pages
that differ from a fresh instance, whose stack pointer is set just below the
imaged one, and which enter Python through `PyRun_SimpleStringFlags` to run
`rlm_driver.resume()`: to the interpreter this is the imaged clock call
calling back into Python.
The imaged frames above stay intact and are never returned to; frame walks
(tracebacks, `sys._getframe`) end in them as they would in a normal boot.

The image is taken before the guest ran anything but our driver, so it holds
no cell's state. Every guest of a process starts from the same memory, so
they share CPython's string-hash secret; `resume()` reseeds `random`.

The module gets two exports the pinned CPython build lacks (`with_image_exports`;
it has no name section, so they are found by index, valid for the pinned
sha256 only).
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass
from typing import Any

import structlog
import wasmtime

from ._wasm_binary import CUSTOM_SECTION, EXPORT_SECTION, GLOBAL_SECTION, leb, sections, uleb

log = structlog.get_logger(__name__)

STACK_POINTER_EXPORT = "rlm_stack_pointer"
RUN_STRING_EXPORT = "rlm_run_string"
# Global 0 is the shadow-stack pointer (__stack_pointer, the module's only
# global). Function 4056 is PyRun_SimpleStringFlags(const char *, flags):
# the (i32, i32) -> i32 caller of PyRun_StringFlags (4057) in the wasm
# backtrace of `python -c` code interrupted in its eval loop (43 _start,
# 4056, 4057, 4053 run_mod, 4055 run_eval_code_obj, 3280 PyEval_EvalCode, ...).
_STACK_POINTER_GLOBAL = 0
_RUN_STRING_FUNC = 4056
_RESUME = b"import rlm_driver\nrlm_driver.resume()\n\0"
_PAGE = 4096
_WASM_PAGE = 65536


class BootImageError(Exception):
    """The module or an image does not fit this scheme (the session boots normally)."""


@dataclass(frozen=True)
class BootImage:
    """What a booted guest's memory differs in from a fresh instance."""

    memory_bytes: int
    """Size of the imaged linear memory (a fresh instance is grown to it)."""
    changes: tuple[tuple[int, bytes], ...]
    """(offset, bytes) runs of 4 KiB pages that differ from a fresh instance."""
    stack_pointer: int
    """The shadow-stack pointer inside the imaged host call."""

    @property
    def changed_bytes(self) -> int:
        return sum(len(data) for _offset, data in self.changes)

    @classmethod
    def take(cls, caller: Any, fresh: bytearray) -> BootImage:
        """Image the guest calling the host now (`fresh`: a fresh instance's memory)."""
        memory = caller["memory"]
        data = memory.read(caller, 0, memory.data_len(caller))
        stack_pointer = caller[STACK_POINTER_EXPORT].value(caller)
        changes: list[tuple[int, bytes]] = []
        start = None
        for offset in range(0, len(data) + _PAGE, _PAGE):
            same = offset >= len(data) or (
                data[offset:offset + _PAGE] == fresh[offset:offset + _PAGE] if offset < len(fresh)
                else not any(data[offset:offset + _PAGE]))
            if not same and start is None:
                start = offset
            elif same and start is not None:
                changes.append((start, bytes(data[start:offset])))
                start = None
        return cls(len(data), tuple(changes), stack_pointer)

    def enter(self, store: wasmtime.Store, exports: Any) -> int:
        """Turn a fresh instance into this image and run the driver's resume().

        Returns what PyRun_SimpleStringFlags returns (-1: resume() raised; it
        does not return while the REPL lives). Call on the instance's wasm thread."""
        memory = exports["memory"]
        grow = (self.memory_bytes - memory.data_len(store)) // _WASM_PAGE
        if grow < 0:
            raise BootImageError("a fresh instance is larger than the image")
        if grow:
            memory.grow(store, grow)  # raises if the store's memory limit is lower
        base = ctypes.addressof(memory.data_ptr(store).contents)
        size = memory.data_len(store)
        for offset, data in self.changes:
            if offset + len(data) > size:
                raise BootImageError("the image does not fit the instance's memory")
            ctypes.memmove(base + offset, data, len(data))
        # The command goes on the shadow stack just below the imaged frames,
        # and the stack pointer below it.
        command_at = (self.stack_pointer - len(_RESUME)) & ~15
        memory.write(store, _RESUME, command_at)
        exports[STACK_POINTER_EXPORT].set_value(store, wasmtime.Val.i32(command_at - 16))
        return exports[RUN_STRING_EXPORT](store, command_at, 0)


class BootImageSlot:
    """The boot image of one runtime: taken by its first guest, then shared.

    A guest that fails to be imaged or to start from the image drops it (the
    next guest boots from scratch and takes a new one); after MAX_FAILURES
    in a row the runtime stops trying and every guest boots from scratch. A
    guest that starts from the image ends the row: a worker that lives for
    weeks keeps its images through the odd boot that timed out under load."""

    MAX_FAILURES = 3

    def __init__(self, enabled: bool = True):
        self._lock = threading.Lock()
        self._state = "empty" if enabled else "off"
        self._image: BootImage | None = None
        self._failures = 0

    @property
    def image(self) -> BootImage | None:
        return self._image

    def claim(self) -> bool:
        """True once per image: the caller's guest is to be imaged."""
        with self._lock:
            if self._state != "empty":
                return False
            self._state = "taking"
            return True

    def publish(self, image: BootImage) -> None:
        with self._lock:
            self._image, self._state = image, "ready"
        log.info("sandbox_boot_image", memory_mb=round(image.memory_bytes / 2**20, 1),
                 changed_mb=round(image.changed_bytes / 2**20, 2), runs=len(image.changes))

    def started(self) -> None:
        """A guest started from the image."""
        if self._failures:
            with self._lock:
                self._failures = 0

    def failed(self, reason: str) -> None:
        """Imaging, or a start from the image, failed: drop the image."""
        with self._lock:
            self._failures += 1
            self._image = None
            self._state = "off" if self._failures >= self.MAX_FAILURES else "empty"
            failures, state = self._failures, self._state
        log.warning("sandbox_boot_image_failed", reason=reason, failures=failures, images=state)


def with_image_exports(wasm: bytes) -> bytes:
    """`wasm` plus the two exports boot images need, without custom sections
    (the pinned build's are Rust debug info, ~12 MB that wasmtime would parse)."""
    out = bytearray(wasm[:8])
    found = set()
    for section_id, body in sections(wasm):
        if section_id == CUSTOM_SECTION:
            continue
        if section_id == GLOBAL_SECTION:
            _check_stack_pointer(body)
            found.add("global")
        elif section_id == EXPORT_SECTION:
            count, rest = uleb(body, 0)
            body = bytearray(leb(count + 2)) + body[rest:]
            for name, kind, index in ((STACK_POINTER_EXPORT, 3, _STACK_POINTER_GLOBAL),
                                      (RUN_STRING_EXPORT, 0, _RUN_STRING_FUNC)):
                body += leb(len(name)) + name.encode() + bytes([kind]) + leb(index)
            found.add("export")
        out += bytes([section_id]) + leb(len(body)) + body
    if found != {"global", "export"}:
        raise BootImageError("the CPython module lacks a global or an export section")
    return bytes(out)


def _check_stack_pointer(globals_section: bytes) -> None:
    count, at = uleb(globals_section, 0)
    if count <= _STACK_POINTER_GLOBAL or globals_section[at:at + 2] != b"\x7f\x01":
        raise BootImageError("global 0 of the CPython module is not a mutable i32")
