"""Guest side of the host-call channel: framed messages over fd 0.

The host shadows the WASI `fd_write` / `fd_read` imports for fd 0, so a write
here is delivered to the host synchronously and the host's reply is waiting
to be read right after. Nothing here blocks on the host except the write.

A message the host refuses fails with an errno, and the host's reply is then
["refused", reason]: read, so the exception raised here says why.
"""

import errno
import os

from rlm_codec import FRAME_HEADER, decode, encode_frame

_FD = 0
# wasi-libc accepts at most 1024 iovecs per call; stay well below.
_IOV_BATCH = 256
_FIRST_READ = 64 * 1024


class FrameTooLarge(ValueError):
    """A message larger than the host accepts in one call."""


class ChannelRefused(OSError):
    """A message the host refused (or bytes the cell's code left on fd 0 that
    the host dropped before it): the text is the host's reason."""


def _size(count):
    return "%.1f MB" % (count / 1e6) if count >= 10**6 else "%s bytes" % format(count, ",")


class Channel:
    """Request/reply over the shadowed fd 0."""

    def __init__(self):
        self._buf = bytearray(_FIRST_READ)
        self.max_frame = None
        """Largest frame the host accepts (told at setup); the host enforces it too."""

    def send(self, message):
        segments, total = encode_frame(message)
        if self.max_frame is not None and total - FRAME_HEADER.size > self.max_frame:
            raise FrameTooLarge(
                "the data is %s; at most %s can go to the host in one call: send less at a "
                "time (split it, or store it in a variable and pass pieces)"
                % (_size(total - FRAME_HEADER.size), _size(self.max_frame)))
        views = [memoryview(s).cast("B") for s in segments if len(s)]
        # A read of nothing first: what the cell's code left half-written on
        # fd 0 is dropped (and refused) by the host, not taken for the start
        # of this message.
        self._refusable(os.readv, [memoryview(self._buf)[:0]], total)
        while views:
            written = self._refusable(os.writev, views[:_IOV_BATCH], total)
            if written <= 0:
                raise OSError("host channel refused a write")
            while written and views:
                if written >= len(views[0]):
                    written -= len(views[0])
                    views.pop(0)
                else:
                    views[0] = views[0][written:]
                    written = 0

    def _refusable(self, io, views, total):
        """`io(fd 0, views)`; a refusal is raised with the host's reason."""
        try:
            return io(_FD, views)
        except OSError as exc:
            code = exc.errno
            if code not in (errno.EMSGSIZE, errno.EBADMSG):
                raise
        reason = self._refusal()
        if code == errno.EMSGSIZE:
            raise FrameTooLarge("the host refused a message of %s: %s"
                                % (_size(total - FRAME_HEADER.size), reason))
        raise ChannelRefused(reason)

    def _refusal(self):
        """The host's reason for the refusal just made (its pending reply)."""
        try:
            reply = self.recv()
        except (OSError, EOFError, ValueError):
            reply = None
        if isinstance(reply, list) and len(reply) == 2 and reply[0] == "refused":
            return str(reply[1])
        return "no reason given"

    def recv(self):
        view = memoryview(self._buf)
        got = 0
        while got < FRAME_HEADER.size:
            got += self._read_some(view[got:])
        (size,) = FRAME_HEADER.unpack_from(self._buf)
        total = FRAME_HEADER.size + size
        if total <= len(self._buf):
            if got < total:
                self.read_exact(view[got:total])
            return decode(view[FRAME_HEADER.size:total])
        # A large reply: one buffer of the exact size, filled in place.
        big = bytearray(size)
        first = got - FRAME_HEADER.size
        big[:first] = self._buf[FRAME_HEADER.size:got]
        self.read_exact(memoryview(big)[first:])
        return decode(big)

    def request(self, message):
        self.send(message)
        return self.recv()

    def read_exact(self, view):
        """Fill `view` completely from the channel (raw bytes, no framing)."""
        while len(view):
            view = view[self._read_some(view):]

    @staticmethod
    def _read_some(view):
        count = os.readv(_FD, [view])
        if count <= 0:
            raise EOFError("host channel closed")
        return count
