"""Conversion in a child process, stopped from outside.

The bounds in `_limits` are checked between pages, rows and slides; a file
can still defeat them inside one parser call (one PDF page whose content
stream takes minutes, a parser that loops or eats memory). So files are
converted by a child process that the caller kills at a hard deadline, and
that runs under an address-space limit: a hostile file costs bounded time
and memory and is refused with the reason; the worker never hangs on it.

One process converts every file of a context in turn, so its start (an
interpreter and the parsers, about half a second) is paid once; after a
kill the next file gets a new process. Replies travel on a private pipe
(a parser printing to stdout cannot garble them), text through a file.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from activities._context_input import ContextInputError, FileIdentity, open_regular_file, shown_path
from activities.documents._limits import MAX_CONVERTED_FILE_BYTES, MAX_DOCUMENT_SECONDS, DocumentError

__all__ = ["HARD_DEADLINE_GRACE_S", "MAX_CONVERTER_BYTES", "ConverterProcess"]

HARD_DEADLINE_GRACE_S = 10.0
"""Time past the soft limit (checked between pages) before the process is killed."""
MAX_CONVERTER_BYTES = 2 << 30
"""Address space of the converter process (parsers, the file's objects, its text)."""
_COPY_BLOCK = 1 << 20
_POLL_S = 1.0  # the caller's `tick` (an activity heartbeat) runs this often while a file converts
_PROJECT_ROOT = str(Path(__file__).resolve().parents[2])


class ConverterProcess:
    """Converts files of known kinds (see `kind_of`) in a child process."""

    def __init__(
        self,
        *,
        max_seconds: float = MAX_DOCUMENT_SECONDS,
        hard_grace_s: float = HARD_DEADLINE_GRACE_S,
        max_bytes: int = MAX_CONVERTER_BYTES,
        tick: Callable[[], None] | None = None,
    ) -> None:
        self.max_seconds = max_seconds
        self.hard_seconds = max_seconds + hard_grace_s
        self.max_bytes = max_bytes
        self._tick = tick
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._replies = -1
        self._jobs = 0
        self.started = 0
        """Processes started so far (one, unless a file had to be stopped)."""

    def __enter__(self) -> ConverterProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def convert(self, path: Path, kind: str, identity: FileIdentity | None = None) -> str:
        """The text of `path`; raises DocumentError with the reason.
        `identity`: the file listed (ContextInputError for another one)."""
        self._jobs += 1
        out = Path(self._workdir()) / f"{self._jobs}.txt"
        copy = None
        if identity is not None:
            # The parsers open the path themselves, maybe more than once: they
            # get a private copy of the file listed, so a link swapped in
            # meanwhile (to a file outside the folder) is never what they read.
            # Named by its kind: openpyxl refuses a name whose suffix it does not know.
            copy = Path(self._workdir()) / f"{self._jobs}.{kind}"
            self._copy(path, identity, copy)
        # The child runs in a scratch directory of its own: a relative path would name nothing there.
        job = {"path": str(copy or os.path.abspath(path)), "kind": kind, "out": str(out), "max_seconds": self.max_seconds}
        try:
            return self._run(self._process(), job, out)
        except DocumentError as exc:
            if copy is None:
                raise
            raise DocumentError(str(exc).replace(str(copy), str(path))) from None
        finally:
            if copy is not None:
                copy.unlink(missing_ok=True)

    @staticmethod
    def _copy(path: Path, identity: FileIdentity, copy: Path) -> None:
        try:
            with open_regular_file(path, identity) as source:
                size = os.fstat(source.fileno()).st_size
                if size > MAX_CONVERTED_FILE_BYTES:
                    # A sparse file declares terabytes at no cost to its author.
                    raise DocumentError(
                        f"the file has {size:,} bytes, more than the {MAX_CONVERTED_FILE_BYTES >> 20:,} MiB "
                        "a file to convert may have: split it"
                    )
                with copy.open("wb") as target:
                    shutil.copyfileobj(source, target, _COPY_BLOCK)
        except OSError as exc:  # no space left, an I/O error: the file's, not the run's
            copy.unlink(missing_ok=True)
            raise ContextInputError(f"cannot copy {shown_path(path)} to convert it: {exc.strerror}") from None
        except BaseException:
            copy.unlink(missing_ok=True)
            raise

    def _run(self, proc: subprocess.Popen[bytes], job: dict, out: Path) -> str:
        try:
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(job).encode() + b"\n")
            proc.stdin.flush()
        except OSError:
            pass  # it died already: the read below says so
        line = self._reply(time.monotonic() + self.hard_seconds)
        if not line:
            code = None if line is None else proc.wait()  # b"": its reply pipe closed as it exited
            self._stop()
            if code is None:
                raise DocumentError(
                    f"converting it did not finish within {self.hard_seconds:g} s and was stopped: "
                    "split or simplify the file"
                )
            raise DocumentError(
                f"the converter process died on it (exit code {code}): the file needs more than "
                f"{self.max_bytes >> 20:,} MiB of memory to convert, or breaks a parser"
            )
        reply = json.loads(line)
        if "error" in reply:
            raise DocumentError(reply["error"])
        try:
            return out.read_text(encoding="utf-8", errors="surrogatepass")
        finally:
            out.unlink(missing_ok=True)

    def close(self) -> None:
        self._stop()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    # -- the child ---------------------------------------------------------------
    def _workdir(self) -> str:
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="rlm-convert-")
        return self._dir.name

    def _process(self) -> subprocess.Popen[bytes]:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        self._stop()
        replies_r, replies_w = os.pipe()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (_PROJECT_ROOT, os.environ.get("PYTHONPATH")) if p)}
        argv = [sys.executable, "-m", "activities.documents._isolated", str(replies_w), str(self.max_bytes)]
        try:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                pass_fds=(replies_w,), env=env, cwd=self._workdir(),
            )  # fmt: skip
        finally:
            os.close(replies_w)
        self._replies = replies_r
        self.started += 1
        return self._proc

    def _reply(self, deadline: float) -> bytes | None:
        """One reply line; b"" when the child exits; None when the deadline passes."""
        buf = b""
        with selectors.DefaultSelector() as sel:
            sel.register(self._replies, selectors.EVENT_READ)
            while True:
                if self._tick is not None:
                    self._tick()
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                if not sel.select(min(left, _POLL_S)):
                    continue
                chunk = os.read(self._replies, 65536)
                if not chunk:
                    return b""
                buf += chunk
                if buf.endswith(b"\n"):
                    return buf

    def _stop(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            if self._proc.stdin is not None:
                self._proc.stdin.close()
            self._proc = None
        if self._replies >= 0:
            os.close(self._replies)
            self._replies = -1


def _serve(replies_fd: int, max_bytes: int) -> None:
    """The child: convert each job read from stdin, reply on `replies_fd`."""
    import resource

    from activities.documents import Budget, convert

    resource.setrlimit(resource.RLIMIT_AS, (max_bytes, max_bytes))
    replies = os.fdopen(replies_fd, "w", encoding="utf-8")
    for line in sys.stdin:
        job = json.loads(line)
        try:
            text = convert(Path(job["path"]), job["kind"], Budget(max_seconds=job["max_seconds"]))
            Path(job["out"]).write_text(text, encoding="utf-8", errors="surrogatepass")
            reply: dict[str, object] = {"ok": True}
        except DocumentError as exc:
            reply = {"error": str(exc)}
        except MemoryError:
            reply = {"error": f"converting it needs more than {max_bytes >> 20:,} MiB of memory"}
        except OSError as exc:  # gone or unreadable since it was listed: a reply, not a dead child
            reply = {"error": f"cannot read the file: {exc.strerror}"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


if __name__ == "__main__":
    _serve(int(sys.argv[1]), int(sys.argv[2]))
