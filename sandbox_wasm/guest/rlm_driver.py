"""Guest REPL driver: runs inside the WASI CPython, executes the host's commands.

Control flow: the guest reports the result of the previous command with a
["done", result] message and receives the next command as the reply, so the
guest is always the one calling out and the host never needs to call in.
"""

import _ast  # the builtin, not `ast`: importing ast (and re, enum) costs ~60 ms of boot
from _bisect import bisect_right as _bisect_right  # builtins too
from itertools import accumulate as _accumulate
import io
import os
import struct  # loaded already by rlm_codec
import sys
import time
import types

import rlm_api
import rlm_same_items
from rlm_channel import Channel, ChannelRefused, FrameTooLarge
from rlm_codec import CodecError

_REPR_MARKER = "... [repr truncated: %s more chars]"
# Error texts sent back after a cell; the host cuts them too.
_MAX_ERROR_CHARS = 20_000
# Of the host's frame limit, what a snapshot keeps for its pickle and framing
# beside the new values it sends (a value past the rest is left unsaved).
_SNAPSHOT_HEADROOM = 16 << 20
_GUEST_DIR = "/rlm/guest/"
# Imported before a boot image is taken. Each costs a guest this much CPU at
# its first import otherwise: re 35 ms, json 47 ms, traceback 63 ms; the
# image's changed pages grow from 2.2 to 3.2 MB and an image boot from 4.5
# to 6.5 ms (wall, with setup).
_IMAGED_IMPORTS = ("rlm_snapshot", "rlm_slices", "re", "json", "traceback")

# Documents are read in batches of up to this many bytes, each in one read
# that the host fills from consecutive documents: one host call per batch, not
# per document (20,000 small documents took 0.8 s one by one). A larger
# document is a batch of its own: a load needs the documents' memory plus
# one batch at most, as it needed the largest document before.
LOAD_BATCH_BYTES = 8 << 20


def _load_batches(sizes):
    """`sizes` cut into runs of at most LOAD_BATCH_BYTES in all (a larger
    document alone); found by bisection, not a Python step per document."""
    ends = list(_accumulate(sizes))
    start, base = 0, 0
    while start < len(sizes):
        stop = max(start + 1, _bisect_right(ends, base + LOAD_BATCH_BYTES, start))
        yield sizes[start:stop]
        base, start = ends[stop - 1], stop


class Repl:
    """The REPL's state: user globals, protected names and the context."""

    def __init__(self, channel):
        self.channel = channel
        self.clock = rlm_api.CellClock()
        rlm_api.install_safe_sleep(self.clock)
        module = types.ModuleType("__main__")
        sys.modules["__main__"] = module
        self.globals = module.__dict__
        self.globals["__builtins__"] = __builtins__
        self.protected = {}
        self.context = None
        self.context_loaded = False
        self.context_docs = ()
        self.cell_count = 0
        self.sources = {}
        self.stored = None  # rlm_stored.Stored: large values the host already holds
        self.same_items = rlm_same_items.SameItems(channel)  # is a stored list unchanged
        self.slices = None  # rlm_slices.ContextSlices of the loaded context
        self._context_ids = None  # (context_docs, rlm_stored.context_item_ids of them)
        self.stdout = io.TextIOWrapper(io.BufferedWriter(io.FileIO(1, "w", closefd=False)),
                                       encoding="utf-8", errors="backslashreplace")
        self._reset_streams()

    def _reset_streams(self):
        if self.stdout.closed:
            self.stdout = io.TextIOWrapper(io.BufferedWriter(io.FileIO(1, "w", closefd=False)),
                                           encoding="utf-8", errors="backslashreplace")
        # One stream for both: stdout and stderr stay interleaved as printed.
        sys.stdout = sys.stderr = self.stdout

    # -- commands -----------------------------------------------------------
    def setup(self, registered, max_frame=None, docs=None):
        self.channel.max_frame = max_frame
        api = rlm_api.build_api(self.channel, self.globals, set(registered), self.clock,
                                lambda: self.context_docs, docs or {})
        self.protected.update(api)
        self.globals.update(api)
        return {"names": sorted(api)}

    def load_context(self, kind, packed_sizes):
        # The sizes come packed (8 bytes each, little-endian): as a list, the
        # 20,000 ints of a folder's documents took ~30 ms to encode and decode.
        sizes = struct.unpack("<%dQ" % (len(packed_sizes) // 8), packed_sizes)
        docs = []
        for batch in _load_batches(sizes):
            raw = bytearray(sum(batch))
            self.channel.read_exact(memoryview(raw))
            if len(batch) > 1 and raw.isascii():
                # Its characters are its bytes: one decode, and the documents
                # are slices of it, cut in C (with the batches found by
                # bisection, a load of 20,000 documents 57-59 -> 42-46 ms).
                text, ends = raw.decode("ascii"), list(_accumulate(batch))
                del raw
                docs.extend(map(text.__getitem__, map(slice, [0, *ends[:-1]], ends)))
                del text
                continue
            view, at = memoryview(raw), 0
            for size in batch:
                try:
                    docs.append(str(view[at:at + size], "utf-8"))
                except UnicodeDecodeError as exc:
                    return {"error": "context document %d is not valid UTF-8 (%s)" % (len(docs), exc)}
                at += size
            del view, raw
        self.context = docs[0] if kind == "str" else docs
        self.context_docs = tuple(docs)
        self.context_loaded = True
        self.protected["context"] = self.context
        self.globals["context"] = self.context
        return {"chars": sum(map(len, docs))}

    def exec_cell(self, code, timeout, repr_cap):
        self.cell_count += 1
        filename = "<cell %d>" % self.cell_count
        result = {"error": None, "error_type": None, "traceback": None, "value_repr": None}
        self._restore_protected()  # rebound between cells (a finaliser, say): the cell gets the real ones
        self.clock.start(timeout)
        try:
            self.sources[filename] = code
            _register_source(filename, code)
            tree = compile(code, filename, "exec", _ast.PyCF_ONLY_AST)
            last = tree.body.pop() if tree.body and isinstance(tree.body[-1], _ast.Expr) else None
            exec(compile(tree, filename, "exec"), self.globals)
            if last is not None:
                value = eval(compile(_ast.Expression(last.value), filename, "eval"), self.globals)
                if value is not None:
                    result["value_repr"] = _capped_repr(value, repr_cap)
        except BaseException as exc:  # SystemExit too: the REPL must go on
            result.update(_describe(exc, self.sources))
            del exc
        finally:
            try:
                self.stdout.flush()
            except Exception:
                pass
            self._reset_streams()
        result["restored"] = self._restore_protected()
        if result["error_type"] == "MemoryError" and self.stored is not None:
            # The table of stored values keeps values this cell dropped alive
            # until the next snapshot; free them for the model's next try
            # (the next snapshot sends the surviving ones again).
            self.stored.by_id.clear()
        return result

    def snapshot(self, anchors=None):
        import rlm_snapshot

        if anchors is not None and self.context_loaded:
            import rlm_slices

            self.slices = rlm_slices.ContextSlices(self.context_docs, anchors)
        names = [n for n in self.globals if not n.startswith("__") and n not in self.protected]
        try:
            return rlm_snapshot.take(self._refs(), names)
        finally:
            # Pickling runs the cell's own __reduce__, which can rebind
            # llm_query or FINAL_VAR for the next cell: put them back. A
            # changed `context` list is put back when the next cell starts
            # (checking it here too cost ~5 ms a snapshot over 20,000 documents).
            self._restore_protected(check_context=False)

    def restore(self, data, records=None):
        import rlm_snapshot

        state = rlm_snapshot.load(self._refs(), data, records)
        for name in [n for n in self.globals if not n.startswith("__")]:
            if name not in self.protected:
                del self.globals[name]
        self.globals.update(state)
        self._restore_protected()
        return {"names": sorted(state)}

    # -- helpers ------------------------------------------------------------
    def _refs(self):
        import rlm_snapshot
        import rlm_stored

        if self.stored is None:
            self.stored = rlm_stored.Stored()
        if self.context_loaded and (self.slices is None or self.slices.docs is not self.context_docs):
            import rlm_slices

            self.slices = rlm_slices.ContextSlices(self.context_docs)
        if self.slices is not None:
            self.slices.new_snapshot()
        if self.context_loaded and isinstance(self.context, list) and (
                self._context_ids is None or self._context_ids[0] is not self.context_docs):
            self._context_ids = (self.context_docs, rlm_stored.context_item_ids(self.context_docs))
        limit = self.channel.max_frame
        return rlm_snapshot.References(self.globals, self.protected, self.context,
                                       self.context_loaded, self.stored, self.slices,
                                       None if limit is None else limit - min(_SNAPSHOT_HEADROOM, limit // 4),
                                       self._context_ids[1] if self._context_ids else None,
                                       self.same_items)

    def _restore_protected(self, check_context=True):
        restored = []
        for name, obj in self.protected.items():
            if self.globals.get(name) is not obj:
                self.globals[name] = obj
                restored.append(name)
        # A context of 20,000 documents is checked twice a cell: by the host past a few thousand.
        if check_context and isinstance(self.context, list) and not self.same_items.same(
                self.context, self.context_docs):
            self.context[:] = self.context_docs
            if "context" not in restored:
                restored.append("context")
        return restored


def _capped_repr(value, cap):
    try:
        text = repr(value)
    except Exception as exc:
        return "<repr failed: %s: %s>" % (type(exc).__name__, exc)
    if len(text) > cap:
        text = text[:cap] + _REPR_MARKER % format(len(text) - cap, ",")
    return text


def _register_source(filename, code):
    """Make a cell's source visible to tracebacks and inspect, if loaded."""
    linecache = sys.modules.get("linecache")
    if linecache is not None:
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)


def _describe(exc, sources):
    try:
        import traceback  # lazily: it pulls in linecache, tokenize and re

        cache = sys.modules["linecache"].cache
        for filename, code in sources.items():
            if filename not in cache:
                _register_source(filename, code)
        summary = traceback.extract_tb(exc.__traceback__)
        # Show only the model's frames: the driver and API stubs are noise.
        frames = [f for f in summary if not f.filename.startswith(_GUEST_DIR)]
        lines = ["Traceback (most recent call last):\n"] if frames else []
        lines += traceback.format_list(frames)
        lines += traceback.format_exception_only(type(exc), exc)
        text = "".join(lines)
    except BaseException:  # e.g. MemoryError while formatting
        text = None
    try:
        message = str(exc)
    except BaseException:
        message = "<unprintable>"
    error = type(exc).__name__ + (": " + message if message else "")
    return {"error": _cut(error), "error_type": type(exc).__name__,
            "traceback": None if text is None else _cut(text)}


def _cut(text):
    if len(text) <= _MAX_ERROR_CHARS:
        return text
    half = _MAX_ERROR_CHARS // 2
    return "%s\n... [%s chars cut] ...\n%s" % (text[:half], format(len(text) - _MAX_ERROR_CHARS, ","),
                                             text[-half:])


def main():
    """Entry of a normal boot (`python -c`)."""
    _serve(Repl(Channel()))


def resume():
    """Entry of a guest started from a boot image (sandbox_wasm/_boot_image.py):
    the imaged guest's REPL object is left behind, this one starts clean."""
    random = sys.modules.get("random")
    if random is not None:  # seeded once per process otherwise: every guest would draw the same
        random.seed()
    _serve(Repl(Channel()))


def _import_ahead():
    """Before being imaged: import what REPLs import later, so copies start
    with it: our snapshot modules, and what nearly every model's cells
    import (and a cell's traceback needs). A command of its own, so that no
    import (nor any clock read one makes) runs while the host waits to image."""
    for name in _IMAGED_IMPORTS:
        __import__(name)
    return {}


def _stand_still():
    """Be imaged: the host copies this guest's memory during the clock read
    below, a host call made holding the GIL (channel I/O releases it), so a
    copy can call back into Python from there. It is the first clock read
    after the "image" command arrives: nothing runs before it."""
    time.monotonic_ns()
    return {"imaged": True}


def _serve(repl):
    channel = repl.channel
    handlers = {"setup": repl.setup, "load_context": repl.load_context,
                "exec": repl.exec_cell, "snapshot": repl.snapshot, "restore": repl.restore,
                "import_ahead": _import_ahead, "image": _stand_still}
    result = {"python": sys.version, "boot_s": time.perf_counter()}
    seq = None
    while True:
        try:
            command = channel.request(["done", result])
        except (FrameTooLarge, CodecError, ChannelRefused) as exc:
            # E.g. a snapshot larger, or of more values, than the host accepts;
            # or bytes the cell's code left on fd 0, dropped by the host before
            # this result (which then reports that instead).
            result = {"error": "%s: %s" % (type(exc).__name__, exc), "seq": seq}
            del exc
            continue
        # The previous result (a snapshot's records) is sent: free it before the next command.
        result = None
        if command[0] == "exit":
            # No interpreter shutdown: it would run the cells' exit hooks and
            # __del__ methods after the last cell (a hook waiting on a host
            # function kept the guest thread and its memory alive), and
            # finalizing the heap cost ~7 ms of the ~8 ms a close took.
            os._exit(0)
        # The session numbers its commands (the instance's own imaging
        # commands have no number); the result echoes it, so the host can tell
        # it from a 'done' the cell's code wrote to the channel itself.
        unnumbered = command[0] in ("import_ahead", "image")
        seq, args = (None, command[1:]) if unnumbered else (command[1], command[2:])
        if command[0] not in ("exec", "image"):
            # Commands other than a cell run the cell's code only through its
            # objects (__reduce__, __setstate__): no time to sleep in. Not
            # "image": the host images the guest at its first clock read, which
            # must be the one `_stand_still` makes.
            repl.clock.start(0.0)
        try:
            result = handlers[command[0]](*args)
        except BaseException as exc:
            result = {"error": "%s: %s" % (type(exc).__name__, exc)}
            del exc
        result["seq"] = seq
