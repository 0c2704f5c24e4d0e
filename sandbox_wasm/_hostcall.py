"""Host side of the guest channel: shadowed WASI imports for one instance.

- `fd_write` on fd 0 carries framed messages from the guest; on fd 1 and 2 it
  is the guest's printed output. Other fds go to the real WASI function.
  One message reads guest memory: whether a list holds a tuple's objects
  (`same_items`, _same_items.py), answered on the wasm thread.
- `fd_read` on fd 0 returns the pending reply (framed messages, or raw bytes
  of a context file copied straight from the file into guest memory).
- `poll_oneoff` (every blocking sleep) has its clock timeouts clamped to the
  current deadline, because a blocking WASI call cannot be interrupted by the
  epoch deadline.

Every pointer and length comes from untrusted guest code: each range is
checked against the memory size before the host touches it, every count
(iovecs, subscriptions) is bounded, a frame's announced size is checked
against the instance's limit before anything is allocated for it, and its
body is buffered only as its bytes actually arrive. Decoding a frame is
bounded too (`rlm_codec`: values per byte, dict keys, int digits): a frame
over those bounds is refused with an errno, the REPL goes on.

A refusal also leaves a ["refused", reason] reply to be read, so the guest's
channel can raise an exception that says why (a bare errno does not). Bytes
that are not a whole frame by the time the guest reads fd 0 are dropped and
refused the same way; the guest's channel reads fd 0 (for nothing) before it
sends, so what cell code left half-written there is dropped instead of being
taken for the start of the next message.
"""

from __future__ import annotations

import collections
import ctypes
import os
import struct
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NoReturn

import wasmtime

from ._same_items import same_items
from .guest.rlm_codec import FRAME_HEADER, CodecLimit, decode, encode_frame

_WASI = "wasi_snapshot_preview1"
_ERRNO_SUCCESS = 0
_ERRNO_BADMSG = 9
_ERRNO_FAULT = 21
_ERRNO_INVAL = 28
_ERRNO_MSGSIZE = 35
# POSIX IOV_MAX; wasi-libc never passes more in one call.
_MAX_IOVECS = 1024
# poll_oneoff subscriptions in one call: CPython's select() on no sockets needs a handful.
_MAX_SUBSCRIPTIONS = 4096
_IOVEC = struct.Struct("<II")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_SUBSCRIPTION_SIZE = 48
_SLEEP_SLACK_NS = 20_000_000


def _size(count: int) -> str:
    """As the guest's channel writes sizes (rlm_channel._size)."""
    return f"{count / 1e6:.1f} MB" if count >= 10**6 else f"{count:,} bytes"


class ProtocolViolation(Exception):
    """The guest sent bytes on the channel that are not a valid message."""


class _Fault(Exception):
    pass


class _Refused(Exception):
    """A request the host turns down with a WASI errno; the guest goes on."""

    def __init__(self, errno: int):
        self.errno = errno


class _BytesSource:
    """Reply bytes waiting to be read by the guest (a list of buffers)."""

    def __init__(self, segments: Iterable[Any]):
        self._segments = collections.deque(memoryview(s).cast("B") for s in segments if len(s))

    def readinto(self, target: memoryview) -> int:
        done = 0
        while self._segments and done < len(target):
            head = self._segments[0]
            count = min(len(head), len(target) - done)
            target[done:done + count] = head[:count]
            done += count
            if count == len(head):
                self._segments.popleft()
            else:
                self._segments[0] = head[count:]
        return done

    def exhausted(self) -> bool:
        return not self._segments


class SharedFile:
    """A context file opened once for all the sources that read from it (a
    worker's cache packs a context's documents into one file) and closed
    after the last of them, not at the end of the load: a context of a file
    per document must not hold them all open. Used only on the instance's
    wasm thread, which reads sources one after another."""

    def __init__(self, path: Path, readers: int):
        self.path = path
        self._readers = readers
        self._handle = None

    def fileno(self) -> int:
        if self._handle is None:
            self._handle = open(self.path, "rb", buffering=0)  # noqa: SIM115 (closed by done(), or when dropped)
        return self._handle.fileno()

    def done(self) -> None:
        self._readers -= 1
        if not self._readers and self._handle is not None:
            self._handle.close()


class FileSource:
    """A context document read straight into guest memory: the only copy made."""

    def __init__(self, file: SharedFile, offset: int, size: int):
        self._file = file
        self._offset = offset
        self._left = size
        if not size:
            file.done()

    def readinto(self, target: memoryview) -> int:
        want = min(self._left, len(target))
        if not want:
            return 0
        count = os.preadv(self._file.fileno(), [target[:want]], self._offset)
        if not count:
            raise ProtocolViolation(f"context file {self._file.path} shrank while being loaded")
        self._offset += count
        self._left -= count
        if not self._left:
            self._file.done()
        return count

    def exhausted(self) -> bool:
        return self._left == 0


def frame_source(message: Any) -> _BytesSource:
    segments, _total = encode_frame(message)
    return _BytesSource(segments)


class WasiShim:
    """The shadowed imports of one guest instance (used only on its wasm thread)."""

    def __init__(self, on_message: Callable[[Any, Any], list[Any]],
                 on_output: Callable[[memoryview], None], deadline: Callable[[], float | None],
                 max_frame: int):
        self._on_message = on_message
        self._on_output = on_output
        self._deadline = deadline
        self._max_frame = max_frame
        self._pending: collections.deque[Any] = collections.deque()
        self._header = bytearray()
        self._body: bytearray | None = None
        self._size = 0
        self.refused_frames = 0
        """Frames turned down for their announced size (the guest got EMSGSIZE)."""
        self.refused_contents = 0
        """Frames turned down for their contents (the guest got EBADMSG)."""
        self.last_refusal: str | None = None
        """Why the last refusal (those, or an incomplete frame dropped) was made;
        reset by whoever reports it (GuestInstance.take_refusal)."""
        self._memory: wasmtime.Memory | None = None
        self._real_funcs: dict[str, Any] = {}  # WASI functions bound to the store
        self._real: dict[str, Any] = {}  # the same, called through the trampoline
        self._after_clock: Callable[[Any], None] | None = None

    def install(self, linker: wasmtime.Linker, store: wasmtime.Store,
                after_clock: Callable[[Any], None] | None = None) -> None:
        """Keep the real WASI functions, then shadow them in `linker`
        (`clock_time_get` too if `after_clock` is given: called after each read)."""
        names = ("fd_read", "fd_write", "poll_oneoff", "clock_time_get")
        real = {name: linker.get(store, _WASI, name) for name in names}
        self._real_funcs = real
        linker.allow_shadowing = True
        i32 = wasmtime.ValType.i32()
        four = wasmtime.FuncType([i32] * 4, [i32])
        linker.define_func(_WASI, "fd_write", four, self._fd_write, access_caller=True)
        linker.define_func(_WASI, "fd_read", four, self._fd_read, access_caller=True)
        linker.define_func(_WASI, "poll_oneoff", four, self._poll_oneoff, access_caller=True)
        if after_clock is not None:
            self._after_clock = after_clock
            clock = wasmtime.FuncType([i32, wasmtime.ValType.i64(), i32], [i32])
            linker.define_func(_WASI, "clock_time_get", clock, self._clock_time_get,
                               access_caller=True)

    def bind(self, store: wasmtime.Store, instance: wasmtime.Instance,
             trampoline: wasmtime.Module) -> None:
        """Connect to the instantiated guest (its memory and a forwarding trampoline)."""
        memory = instance.exports(store)["memory"]
        assert isinstance(memory, wasmtime.Memory)
        self._memory = memory
        real = self._real_funcs
        tramp = wasmtime.Instance(store, trampoline, [
            memory, real["fd_read"], real["fd_write"], real["poll_oneoff"],
            real["clock_time_get"]])
        exports = tramp.exports(store)
        self._real = {name: exports[name] for name in real}

    def push(self, sources: list[Any]) -> None:
        self._pending.extend(sources)

    # -- guest memory -----------------------------------------------------------
    def memory_bytes(self, caller: Any) -> int:
        """Size of the guest's linear memory (what it has grown to, in use or not)."""
        assert self._memory is not None
        return self._memory.data_len(caller)

    def _view(self, caller: Any, ptr: int, length: int) -> memoryview:
        return memoryview((ctypes.c_ubyte * length).from_address(self._address(caller, ptr, length))).cast("B")

    def _address(self, caller: Any, ptr: int, length: int) -> int:
        """The host address of guest range [ptr, ptr + length), checked in bounds."""
        assert self._memory is not None
        if ptr < 0 or length < 0 or ptr + length > self._memory.data_len(caller):
            raise _Fault
        return ctypes.addressof(self._memory.data_ptr(caller).contents) + ptr

    def same_items(self, caller: Any, list_at: int, tuple_at: int, list_type: int, tuple_type: int) -> bool:
        """Whether a guest list holds a guest tuple's objects (_same_items); False if any range is out of bounds."""
        try:
            return same_items(lambda ptr, length: self._address(caller, ptr, length),
                              list_at, tuple_at, list_type, tuple_type)
        except _Fault:
            return False

    def _iovecs(self, caller: Any, ptr: int, count: int) -> list[tuple[int, int]]:
        if not 0 <= count <= _MAX_IOVECS:
            raise _Refused(_ERRNO_INVAL)
        raw = bytes(self._view(caller, ptr, _IOVEC.size * count))
        return list(_IOVEC.iter_unpack(raw))

    def _put_u32(self, caller: Any, ptr: int, value: int) -> None:
        self._view(caller, ptr, 4)[:] = _U32.pack(value)

    # -- shadowed imports -------------------------------------------------------
    def _fd_write(self, caller: Any, fd: int, iovs: int, count: int, out: int) -> int:
        if fd > 2:
            return self._real["fd_write"](caller, fd, iovs, count, out)
        try:
            total = 0
            for ptr, length in self._iovecs(caller, iovs, count):
                chunk = self._view(caller, ptr, length)
                if fd == 0:
                    self._feed(chunk, caller)
                else:
                    # A view of guest memory: the collector copies only what it keeps.
                    self._on_output(chunk)
                total += length
            if fd == 0 and self._header:
                # The channel writes a header whole: a write ending inside
                # one is not the channel's (and would garble the next frame).
                self._drop_stray()
            self._put_u32(caller, out, total)
        except _Fault:
            return _ERRNO_FAULT
        except _Refused as refused:
            return refused.errno
        return _ERRNO_SUCCESS

    def _fd_read(self, caller: Any, fd: int, iovs: int, count: int, out: int) -> int:
        if fd != 0:
            return self._real["fd_read"](caller, fd, iovs, count, out)
        try:
            if self._header or self._body is not None:
                # The guest reads only once its message is whole: these bytes are none.
                self._drop_stray()
            total = 0
            while self._pending and self._pending[0].exhausted():
                self._pending.popleft()
            if self._pending:
                for ptr, length in self._iovecs(caller, iovs, count):
                    got = self._read_sources(self._view(caller, ptr, length))
                    total += got
                    if got < length:
                        break
            self._put_u32(caller, out, total)
        except _Fault:
            return _ERRNO_FAULT
        except _Refused as refused:
            return refused.errno
        return _ERRNO_SUCCESS

    def _read_sources(self, view: memoryview) -> int:
        """Fill `view` from the first pending source. A read never spans a
        frame and a file, but goes on from a context file into the next one:
        the guest reads many small documents in one call (guest/rlm_driver.py
        `_load_batches`)."""
        source = self._pending[0]
        done = source.readinto(view)
        while done < len(view) and isinstance(source, FileSource) and source.exhausted():
            self._pending.popleft()
            if not self._pending or not isinstance(self._pending[0], FileSource):
                break
            source = self._pending[0]
            done += source.readinto(view[done:])
        return done

    def _clock_time_get(self, caller: Any, clock_id: int, precision: int, out: int) -> int:
        result = self._real["clock_time_get"](caller, clock_id, precision, out)
        assert self._after_clock is not None
        self._after_clock(caller)
        return result

    def _poll_oneoff(self, caller: Any, subs: int, events: int, count: int, out: int) -> int:
        if not 0 < count <= _MAX_SUBSCRIPTIONS:
            return _ERRNO_INVAL
        deadline = self._deadline()
        if deadline is not None:
            try:
                self._clamp_sleeps(caller, subs, events, count, deadline)
            except _Fault:
                return _ERRNO_FAULT
        return self._real["poll_oneoff"](caller, subs, events, count, out)

    def _clamp_sleeps(self, caller: Any, subs: int, events: int, count: int,
                      deadline: float) -> None:
        budget = max(0, int((deadline - time.monotonic()) * 1e9)) + _SLEEP_SLACK_NS
        table = self._view(caller, subs, _SUBSCRIPTION_SIZE * count)
        for index in range(count):
            base = index * _SUBSCRIPTION_SIZE
            if table[base + 8] != 0:  # not a clock subscription
                continue
            (clock_id,) = _U32.unpack_from(table, base + 16)
            (timeout,) = _U64.unpack_from(table, base + 24)
            absolute = table[base + 40] & 1
            now = 0
            if absolute:
                # The events buffer is scratch until poll_oneoff fills it.
                self._view(caller, events, 8)
                if self._real["clock_time_get"](caller, clock_id, 1, events) != 0:
                    continue
                (now,) = _U64.unpack_from(self._view(caller, events, 8))
            if timeout - now > budget:
                _U64.pack_into(table, base + 24, now + budget)

    def take_refusal(self) -> str | None:
        """Why the last refusal was made, once (then None until the next)."""
        reason, self.last_refusal = self.last_refusal, None
        return reason

    # -- framing -----------------------------------------------------------------
    def _refuse(self, errno: int, reason: str) -> NoReturn:
        """Turn the message down: the guest gets `errno`, then may read why."""
        self.last_refusal = reason
        self._pending.clear()
        self._pending.append(frame_source(["refused", reason]))
        raise _Refused(errno)

    def _drop_stray(self) -> NoReturn:
        """Drop an incomplete frame (written by cell code, not by the channel)."""
        if self._body is None:
            count, what = len(self._header), f"{len(self._header)} of a frame header's 8 bytes"
        else:
            count = FRAME_HEADER.size + len(self._body)
            what = f"a frame header announcing {self._size:,} bytes, then {len(self._body):,} of them"
        self._header, self._body = bytearray(), None
        self._refuse(_ERRNO_BADMSG, f"{count:,} bytes written to fd 0 were not a whole message "
                                    f"({what}) and were dropped; fd 0 is the sandbox's channel "
                                    "to the host, not a file (print, or write to fd 1)")

    def _feed(self, chunk: memoryview, caller: Any) -> None:
        while len(chunk):
            if self._body is None:
                need = FRAME_HEADER.size - len(self._header)
                self._header += chunk[:need]
                chunk = chunk[need:]
                if len(self._header) < FRAME_HEADER.size:
                    return
                (size,) = FRAME_HEADER.unpack(self._header)
                self._header = bytearray()
                if size > self._max_frame:
                    # Refused before anything is allocated; the rest of this
                    # write is dropped with it, and the guest's channel turns
                    # the errno into a clear exception.
                    self.refused_frames += 1
                    self._refuse(_ERRNO_MSGSIZE, f"a frame of {_size(size)} exceeds the "
                                                 f"{_size(self._max_frame)} limit of one message")
                # Grown as bytes arrive (not bytearray(size)): a header alone
                # costs nothing, and the body can only be as large as what the
                # guest really wrote.
                self._body = bytearray()
                self._size = size
            count = min(len(chunk), self._size - len(self._body))
            self._body += chunk[:count]
            chunk = chunk[count:]
            if len(self._body) == self._size:
                body, self._body = self._body, None
                try:
                    message = decode(body)
                except CodecLimit as exc:
                    # Well-formed but over the decoder's bounds (guest code
                    # forged it: the guest's own encoder refuses such values
                    # with a clear error). Dropped like an oversized frame.
                    self.refused_contents += 1
                    self._refuse(_ERRNO_BADMSG, f"the host refused the message: {exc}")
                except ValueError as exc:
                    raise ProtocolViolation(str(exc)) from None
                del body
                self._pending.clear()
                self._pending.extend(self._on_message(message, caller))
