"""ReplSession: the public face of the sandbox (one WASM Python REPL)."""

from __future__ import annotations

import struct
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import structlog

from ._cell_result import TOO_MANY_CALLS, cell_result
from ._context_anchors import ContextIndex
from ._guest_results import SnapshotError, is_record_name, report_text, snapshot_parts
from ._host_functions import HostFunction, call_host, checked_host_functions
from ._context_files import context_spans, file_sources
from ._instance import Event, GuestInstance, HungGuest, boot_guest
from ._runtime import get_runtime
from ._saved_state import RecordSource, SavedState
from ._types import CellInterrupted, CellResult, ContextTooLarge, DocumentSpan, SandboxError, SandboxLimits, Snapshot
from .guest.rlm_codec import CodecError

log = structlog.get_logger(__name__)

MAX_DOCUMENT_BYTES = 2**31 - 1
"""The largest context document a guest can load: one object of a 32-bit
guest (ssize_t); a 3 GB document failed with OverflowError."""

# The session thread waits for the guest in slices this long, so an exception
# raised into it from another thread (an activity's cancellation) lands promptly.
_WAIT_SLICE_S = 0.2


class ReplSession:
    """A persistent Python REPL in a WASI CPython instance.

    Not thread-safe: use a session from one thread at a time (run several
    sessions in several threads). Host functions run in the thread that calls
    `run_cell`. After a trap (timeout, crash) the session boots a new instance,
    reloads the context and restores the state of the last `snapshot()` or
    `restore()`, so take a snapshot after each cell you want to keep.
    """

    def __init__(self, limits: SandboxLimits | None = None,
                 host_functions: Mapping[str, HostFunction] | None = None,
                 cache_dir: str | Path | None = None):
        self.limits = limits or SandboxLimits()
        self._host_functions = checked_host_functions(host_functions or {})
        self._cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._instance: GuestInstance | None = None
        self._context: tuple[list[DocumentSpan], str] | None = None
        self._saved = SavedState()  # what a restart goes back to
        self._index = ContextIndex()  # of the context files, for recognising slices
        self._needs_restart: str | None = None  # why the next use must restart the guest
        self._interrupted: str | None = None
        self._interrupts = 0  # interrupt() calls so far: one during a restart's reads must not be lost
        self._notes: list[str] = []  # said in the next cell's output (a state that could not be restored)
        self._seq = 0  # numbers the commands; the guest's driver echoes it in each result

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> ReplSession:
        """Load the compiled module (disk cache) and boot the guest REPL."""
        if self._instance is not None:
            raise SandboxError("session already started")
        self._runtime = get_runtime(self._cache_dir)
        self._instance = self._boot()
        return self

    def close(self) -> None:
        if self._instance is not None:
            self._instance.close()
            self._instance = None

    @property
    def guest_memory_bytes(self) -> int:
        """Linear memory the guest has grown to, as of its last host-function
        call. Read inside a host function, it holds until the function
        returns: only the guest's own code grows its memory."""
        instance = self._instance
        return instance.memory_bytes if instance is not None else 0

    @property
    def held_record_bytes(self) -> int:
        """Bytes of large values the host holds for a restart (0 once they are
        kept elsewhere: `keep_records_elsewhere`)."""
        return self._saved.held_record_bytes

    def interrupt(self, reason: str) -> None:
        """Stop the command running now, from any thread (e.g. a cancelled cell).

        The guest is trapped by the host (an epoch check), not sent an
        exception, so its code cannot catch it; `run_cell` then raises
        `CellInterrupted`. The next use of the session starts a new instance
        from the last snapshot."""
        self._interrupted = reason
        self._interrupts += 1
        instance = self._instance
        if instance is not None:
            instance.interrupt(reason)

    def __enter__(self) -> ReplSession:
        if self._instance is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- context and state --------------------------------------------------------
    def load_context(self, documents: Sequence[Path | str | DocumentSpan], kind: Literal["str", "list"]) -> None:
        """Load UTF-8 documents as `context`: one `str` (kind "str", one
        document) or a `list[str]` in order (kind "list"). A document is a
        file or a span of one (DocumentSpan); each is copied once, straight
        from its file into guest memory."""
        spans = context_spans(documents, kind)
        self._load_context(spans, kind)
        self._context = (spans, kind)
        self._index.use(spans)

    def wait_context_index(self, timeout_s: float | None = None) -> bool:
        """Build the context's slice index now (snapshots start it only once
        one stores a large value by content) and wait until it is ready, e.g.
        in tests; snapshots never wait for it."""
        return self._index.wait(timeout_s)

    def snapshot(self) -> Snapshot:
        """Pickle the user globals (context by reference, large values as
        records); also kept as the state to fall back to after a trap.
        Raises SnapshotError when the cell's objects cannot be saved."""
        anchors = self._index.unsent()
        try:
            result = self._admin(["snapshot", anchors], self._user_code_timeout_s())
            return self._take_snapshot(result)
        except CellInterrupted:
            raise
        except SandboxError as exc:
            # The guest may still hold the unsaved state: go back to the last
            # saved one at the next use, as after a trap.
            self._needs_restart = "the previous cell's state could not be saved"
            raise SnapshotError(str(exc)) from None

    def _take_snapshot(self, result: dict[str, Any]) -> Snapshot:
        data, saved, unsaved, refs, records = snapshot_parts(result, self._saved.names)
        snap = Snapshot(data=data, saved=saved, unsaved=sorted(unsaved), unsaved_reasons=unsaved,
                        refs=refs, new_records=records, unchanged=self._saved.unchanged(data, refs, records))
        self._saved.update(data, refs, records)
        if records:
            self._index.build()  # large values the guest could not place: help the next snapshot
        return snap

    def restore(self, data: bytes, records: Mapping[str, bytes] | None = None) -> None:
        """Replace the user globals with a snapshot's (load_context first if
        the snapshot refers to `context`); `records` must hold the bytes of
        every record name in the snapshot's `refs`."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"restore() needs the snapshot bytes, got {type(data).__name__}")
        kept = {}
        for digest, value in (records or {}).items():
            if not (is_record_name(digest) and isinstance(value, (bytes, bytearray))):
                raise TypeError("restore() records must map record names (40 hex digits) to bytes")
            kept[digest] = bytes(value)
        self._admin(["restore", bytes(data), kept], self._restore_timeout_s())
        self._saved.replace(bytes(data), kept)

    def keep_records_elsewhere(self, source: RecordSource) -> None:
        """The records of the last snapshot or restore are stored durably and
        `source` reads them back: the session drops its copies (they can be as
        large as the guest's memory) and reads them only to restart after a
        trap. Call it again after each snapshot whose new records were stored.
        A restart whose source fails raises RecordsUnavailable."""
        self._saved.keep_records_elsewhere(source)

    def restore_or_start_empty(self, data: bytes, records: Mapping[str, bytes] | None = None) -> bool:
        """`restore`, or, when the snapshot cannot be brought back (a value's
        own unpickling code raises, loops or exits; it needs more memory than
        the guest has), a fresh REPL with the context loaded and a note in the
        next cell's output. Such a state fails the same way every time: it
        must not fail every later cell of the run. Call it only once a
        restore already failed (a retry): a first failure may be the
        worker's, not the state's. True when restored."""
        try:
            self.restore(data, records)
            return True
        except CellInterrupted:
            raise
        except SandboxError as exc:
            self._notes.append(self._start_empty(str(exc)))
            return False

    # -- cells -----------------------------------------------------------------------
    def run_cell(self, code: str) -> CellResult:
        """Run one cell against the persistent globals; never raises for the
        cell's own errors or limits (those are in the result)."""
        if not isinstance(code, str):
            raise TypeError(f"code must be str, got {type(code).__name__}")
        instance = self._require()
        notes, self._notes = self._notes, []
        restarted = False
        self._interrupted = None
        if self._needs_restart:
            restarted = True
            reason = self._needs_restart
            notes += [reason, self._restart(reason)]
            instance = self._require()
        limits = self.limits
        began = time.perf_counter()
        instance.output.reset()
        instance.take_refusal()  # one of an earlier command is not this cell's
        event = self._command(instance, ["exec", code, limits.cell_timeout_s, limits.output_chars],
                              limits.cell_timeout_s, max_calls=limits.max_host_calls)
        duration = time.perf_counter() - began
        if event.interrupted:
            self._needs_restart = _HOST_STOPPED
            raise CellInterrupted(f"the cell was interrupted: {event.payload}")
        text, dropped = instance.output.take()
        result, cell_notes, stopped = cell_result(event, text, dropped, limits, duration, restarted,
                                                  instance.take_refusal())
        notes += cell_notes
        if stopped is not None:
            notes.append(self._restart(stopped))
        if notes:
            suffix = "".join(f"\n[sandbox: {note}]" for note in notes)
            result.output += suffix
            result.full_output += suffix
        log.debug("sandbox_cell", seconds=round(duration, 4), error=result.error,
                  limit=result.limit.kind if result.limit else None)
        return result

    # -- internals -------------------------------------------------------------------
    def _require(self) -> GuestInstance:
        if self._instance is None:
            raise SandboxError("session not started: call start() first (or use `with`)")
        return self._instance

    def _boot(self) -> GuestInstance:
        with self._runtime.boot_slots:  # waiting for a slot is not part of the boot's deadline
            return self._boot_now()

    def _boot_now(self) -> GuestInstance:
        instance = boot_guest(self._runtime, self.limits)
        self._instance = instance
        self._index.sent = False
        # Docstrings of host functions the guest has no fixed stub for (custom tools).
        docs = {n: f.__doc__ for n, f in self._host_functions.items() if getattr(f, "__doc__", None)}
        self._admin(["setup", sorted(self._host_functions), self.limits.max_frame_bytes, docs])
        return instance

    def _load_context(self, spans: list[DocumentSpan], kind: str) -> None:
        # Refused before any work when it cannot fit: one object of a 32-bit
        # guest stays under 2 GiB, and the guest holds the bytes (and the interpreter).
        sizes = [span.size for span in spans]
        largest, total = max(sizes, default=0), sum(sizes)
        if largest > MAX_DOCUMENT_BYTES:
            raise ContextTooLarge(f"a context document of {largest / 1e6:,.1f} MB is larger than a 32-bit "
                                  f"WebAssembly guest can hold ({MAX_DOCUMENT_BYTES / 1e6:,.1f} MB at most)")
        past_cap = (f"the context ({total / 1e6:,.1f} MB) does not fit in the REPL's memory cap of "
                    f"{self.limits.memory_bytes >> 20} MiB")
        if total >= self.limits.memory_bytes:
            raise ContextTooLarge(past_cap)
        sources = file_sources(spans)
        result = self._admin(["load_context", kind, struct.pack(f"<{len(sizes)}Q", *sizes)], sources=sources)
        error = result.get("error")
        if error and str(error).startswith("MemoryError"):
            raise ContextTooLarge(past_cap + " (loading it ran out of memory)")
        if error:
            raise SandboxError(f"loading the context failed: {error}")

    def _restart(self, reason: str) -> str:
        """Boot a fresh instance and bring back context and the last snapshot."""
        log.warning("sandbox_restart", reason=reason)
        records = None
        if self._saved.data is not None:
            # Read first, before anything changes, and outside the fallback
            # below: records out of reach (storage down) are not a state that
            # fails to restore. The session still needs its restart then.
            self._needs_restart = reason
            interrupts = self._interrupts
            records = self._saved.records()
            if self._interrupts != interrupts:
                # It reached the old instance only, and the new one must not run past it.
                raise CellInterrupted(f"the restart was interrupted: {self._interrupted}")
        self._fresh_instance()
        if records is not None:
            try:
                self._admin(["restore", self._saved.data, records], self._restore_timeout_s())
            except CellInterrupted:
                raise
            except SandboxError as exc:
                return self._start_empty(str(exc))
            return "the REPL was restarted and its state restored from the last snapshot"
        return "the REPL was restarted; no snapshot existed, so earlier variables are gone"

    def _start_empty(self, reason: str) -> str:
        """A fresh instance with the context and no variables, after a
        snapshot failed to restore; the note says so."""
        log.warning("sandbox_restore_failed", reason=reason[:300])
        self._saved.clear()
        self._fresh_instance()
        loaded = ", the context loaded" if self._context is not None else ""
        return (f"the saved state could not be restored ({reason[:500]}); the REPL starts empty{loaded}: "
                "earlier variables are gone")

    def _fresh_instance(self) -> None:
        """The old instance closed, a new one booted with the context loaded."""
        old, self._instance = self._instance, None
        if old is not None:
            old.close()
        self._needs_restart = None
        self._interrupted = None
        self._boot()
        if self._context is not None:
            self._load_context(*self._context)

    def _restore_timeout_s(self) -> float:
        """The cell's limit, but at least `limits.restore_min_s` (see there)."""
        return min(self.limits.admin_timeout_s, max(self.limits.cell_timeout_s, self.limits.restore_min_s))

    def _user_code_timeout_s(self) -> float:
        """Time for an admin command that runs the cell's own code: pickling
        (`__reduce__`) and unpickling (`__setstate__`) get the cell's limit,
        not the long one of admin commands (a loop held a restore 120 s)."""
        return min(self.limits.cell_timeout_s, self.limits.admin_timeout_s)

    def _admin(self, message: list[Any], timeout_s: float | None = None,
               sources: list[Any] | None = None) -> dict[str, Any]:
        instance = self._require()
        if self._needs_restart:
            self._notes.append(self._restart(self._needs_restart))  # said in the next cell's output
            instance = self._require()
        event = self._command(instance, message, timeout_s or self.limits.admin_timeout_s,
                              sources, admin=True)
        if event.kind != "done":
            reason = "deadline" if event.timed_out else event.payload
            self._needs_restart = _HOST_STOPPED
            if event.interrupted:
                raise CellInterrupted(f"{message[0]} was interrupted: {reason}")
            if event.timed_out and timeout_s is not None:
                reason = f"it ran longer than {timeout_s:g} s and was stopped"
            raise SandboxError(f"the sandbox died during {message[0]}: {reason}")
        payload = event.payload
        if payload.get("error") and message[0] != "load_context":
            raise SandboxError(f"{message[0]} failed in the guest: {report_text(payload['error'])}")
        return payload

    def _command(self, instance: GuestInstance, message: list[Any], timeout_s: float,
                 sources: list[Any] | None = None, max_calls: int | None = None,
                 admin: bool = False) -> Event:
        """Send one command and serve the guest until it reports its result."""
        self._seq += 1
        # The number goes right after the command's name; the driver echoes
        # it in the result (see _serve).
        instance.send([message[0], self._seq, *message[1:]], timeout_s, sources)
        return self._pump(instance, timeout_s, max_calls, message[0] if admin else None)

    def _pump(self, instance: GuestInstance, timeout_s: float,
              max_calls: int | None = None, admin: str | None = None) -> Event:
        """Serve host-function calls until the command finishes or the guest dies."""
        try:
            return self._serve(instance, timeout_s, max_calls, admin)
        except BaseException:
            # Cancellation raised into this thread, or a host function's
            # BaseException: the guest is mid-command; stop it now.
            instance.interrupt("the host stopped waiting for it")
            self._needs_restart = _HOST_STOPPED
            raise

    def _serve(self, instance: GuestInstance, timeout_s: float, max_calls: int | None,
               admin: str | None) -> Event:
        hard_deadline = time.monotonic() + timeout_s + self.limits.hang_grace_s
        calls = 0
        while True:
            if self._interrupted is not None:
                instance.interrupt(self._interrupted)
            left = hard_deadline - time.monotonic()
            try:
                event = instance.wait(min(max(left, 0.0), _WAIT_SLICE_S))
            except HungGuest:
                if left > _WAIT_SLICE_S:
                    continue  # only this slice ran out
                instance.abort()
                return Event("dead", "hung", timed_out=True)
            if event.kind == "done" and not (isinstance(event.payload, dict)
                                             and event.payload.get("seq") == self._seq):
                # Only the driver, once the command's handler returned, answers
                # with this command's number. A 'done' without it was written
                # by the cell's code (Channel().request(['done', ...])): taken,
                # the next command would go to that code and the driver's own
                # result would answer the command after it.
                instance.abort()
                return Event("dead", "the guest broke the host-call protocol (a result that "
                                     "does not answer this command: the code wrote to the "
                                     "REPL's own channel)")
            if event.kind != "call":
                return event
            if admin is not None:
                # Only the cell's code calls host functions, from an object's
                # __reduce__ or __setstate__ here: outside a cell, where the
                # cell's call cap does not hold. Refused; the time the refused
                # calls take still counts (the deadline is not extended).
                instance.reply(["err", f"host functions cannot be called during {admin} (e.g. "
                                       "from an object's __reduce__, __getstate__ or "
                                       "__setstate__): only while a cell runs"])
                continue
            calls += 1
            if max_calls is not None and calls > max_calls:
                instance.abort()
                return Event("dead", TOO_MANY_CALLS)
            called = time.monotonic()
            answer = call_host(self._host_functions, *event.payload)
            try:
                instance.reply(answer)
            except CodecError as exc:
                instance.reply(["err", f"host function {event.payload[0]!r} returned a value "
                                       f"that cannot be sent to the sandbox: {exc}"])
            hard_deadline += time.monotonic() - called


_HOST_STOPPED = "the previous cell was interrupted on the host side"
