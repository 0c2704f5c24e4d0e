"""Snapshot and restore of the REPL's user globals with cloudpickle.

Objects stored by reference (pickle persistent ids), not by value:
- the `context` (and each of its documents), the protected API functions, and
  the REPL globals dict itself. The last one is what makes a function defined
  in a cell, once restored, read the *live* globals: cloudpickle gives each
  pickled function a reconstructed globals dict, and we seed that dict with a
  marker that unpickles as the REPL's own namespace;
- every str or bytes of at least RECORD_MIN characters: as ("c", doc, start,
  end) when it equals a slice of the context (nothing stored), as ("x",
  before, doc, start, end, after) when it is a slice with short texts around
  it (a prompt around a chunk: only those texts are stored), as ("m", texts,
  slices) when it joins documents, in any order (rlm_slices, rlm_references;
  as ("j", name) when that reference is large, its pickle a record), else as a
  record ("r", name, kind) whose bytes go to the host once (`record_name`). The state
  pickle itself stays small, so a snapshot costs what changed;
- every list, set or dict (or Counter, OrderedDict, defaultdict of a builtin
  factory: rlm_references.container_name) of at least CONTAINER_MIN items
  that holds only immutable atoms (str, bytes, int, float, bool, None, and
  tuples of those): as a record of its own ("k", name, its type's name,
  number), the pickle of its items (large ones by reference as above). The
  pickler calls `persistent_id` in Python for every object, ~10 us each in
  this guest: 10,000 prompts cost 200 ms per snapshot whether they changed
  or not. A container unchanged since the last snapshot
  (the same object, its items the same objects, exact because atoms cannot
  change: for a long list the host compares its item array with the kept
  tuple's, rlm_same_items) is named again without being pickled again.
  A list of str that splitting the context makes (its lines, a document's
  paragraphs, its words) is named as ("s", segments, number) instead, with
  no record (rlm_splits); a list of items of such a list (its lines
  filtered) by their indices ("i"), and a str joining consecutive ones as
  where they are ("q"): rlm_items.

`Stored` (rlm_stored) remembers which large values were already sent or
restored, by identity, so an unchanged value costs one dict lookup per
snapshot.

The picklers themselves are in rlm_pickling.
"""

import _pickle  # the C pickler alone: `pickle` itself is not needed
from itertools import chain

import rlm_items
import rlm_pickling
import rlm_references
import rlm_restore
import rlm_slices
import rlm_splits
from rlm_same_items import SameItems
from rlm_stored import Stored, context_item_ids, record_name

MAGIC = b"RLMSNAP2"
# Snapshots written before values became records: the whole state in one pickle.
_LEGACY_MAGIC = b"RLMSNAP1"
RECORD_MIN = 4096
# Documents one joined reference may name inline in the state (past it, "j").
_JOINED_INLINE = 64
CONTAINER_MIN = 1000  # below, inline costs under ~10 ms; a record its own S3 write when it changes
_STR = {str}
_ATOMS = frozenset((str, bytes, int, float, bool, type(None)))
# What a name adds to the state pickle beside its value (key, opcodes, memo).
_PER_NAME_BYTES = 16


def _mb(count):
    return "%.1f MB" % (count / 1e6)


class References:
    """Objects pickled by reference, and how to find them again."""

    def __init__(self, user_globals, protected, context, context_loaded, stored=None,
                 slices=None, max_new_bytes=None, context_ids=None, same_items=None):
        self.user_globals = user_globals
        self.protected = protected
        self.context = context
        self.context_loaded = context_loaded
        self.stored = stored if stored is not None else Stored()
        if self.stored.item_lists is None:
            self.stored.item_lists = rlm_items.ItemLists()
        self.items = self.stored.item_lists
        # Whether a list stored before still holds the same objects.
        self.same_items = same_items if same_items is not None else SameItems()
        self.slices = slices if context_loaded else None
        self.docs = (tuple(context) if isinstance(context, list) else (context,)) \
            if context_loaded else ()
        self.new_records = {}  # record name -> bytes, not yet sent to the host
        # What one snapshot may send (the host's frame limit): a value past it
        # is left unsaved on its own, not the whole snapshot with it.
        self.max_new_bytes = max_new_bytes
        self.new_bytes = 0
        self._kept = set()  # new records of the dumps that succeeded
        self.pending = {}  # id -> (value, pid) named during this take(), held until it ends
        self.seen = {}  # id -> Stored entry, for the values in the last dump
        self.used = set()  # record names the last dump refers to
        self.globals_marker = {"__name__": "__main__", "__rlm_live_globals__": True}
        # Later entries win: a protected object or the context itself is
        # named so even where it is also a document.
        by_id = {}
        if context_loaded and isinstance(context, list):
            by_id.update(context_ids if context_ids is not None else context_item_ids(context))
        by_id[id(self.globals_marker)] = ("globals", self.globals_marker)
        for name, obj in protected.items():
            by_id[id(obj)] = (("protected", name), obj)
        if context_loaded:
            by_id[id(context)] = ("context", context)
        self.by_id = by_id

    def persistent_id(self, obj):
        entry = self.by_id.get(id(obj))
        if entry is not None and entry[1] is obj:
            return entry[0]
        kind = type(obj)
        if (kind is str or kind is bytes) and len(obj) >= RECORD_MIN:
            return self._large(obj, kind)
        if kind in rlm_references.CONTAINER_TYPES and len(obj) >= CONTAINER_MIN:
            return self._container(obj, kind)
        return None

    def begin_dump(self):
        self.seen = {}
        self.used = set()

    def _large(self, obj, kind):
        pending = self.pending.get(id(obj))  # named by an earlier dump of this take()
        pid = pending[1] if pending is not None and pending[0] is obj else self.stored.get(obj)
        if pid is None:
            reference = None
            if kind is str and self.slices is not None:
                reference = self.items.join(obj) or self.slices.reference(obj)
            if reference is None:
                data = obj.encode("utf-8", "surrogatepass") if kind is str else obj
                pid = ("r", self._new_record(obj, data), "s" if kind is str else "b")
            else:
                pid = self._joined_record(reference) if reference[0] == "m" else reference
            self.pending[id(obj)] = (obj, pid)
        self.used.update(rlm_references.records_needed(pid))
        self.seen[id(obj)] = (obj, pid)
        return pid

    def _new_record(self, obj, data):
        digest = record_name(obj, data)
        if digest not in self.new_records:
            self._count_new(len(data))
            self.new_records[digest] = data
        return digest

    def _joined_record(self, reference):
        """A reference to many documents ("\\n".join(context) itself), or
        with long texts between them, goes to the host once as a record of
        its own ("j") instead of inline in every snapshot's state."""
        texts, pieces = reference[1], reference[2]
        if len(pieces) <= _JOINED_INLINE and sum(map(len, texts)) <= rlm_slices.MAX_AFFIX:
            return reference
        data = _pickle.dumps((texts, pieces), 5)
        return ("j", self._new_record(data, data))

    def _container(self, obj, kind):
        """A list or dict of atoms as a record; None to pickle it inline.
        Its entry: (obj, pid, shape, the digests and the table entries of
        the large items it names), so that naming it again without pickling
        it keeps what it refers to."""
        name = rlm_references.container_name(obj)
        if name is None:
            return None
        entry = self.pending.get(id(obj))
        if entry is None or entry[0] is not obj:
            entry = self.stored.by_id.get(id(obj))
            if (entry is None or entry[0] is not obj or len(entry) != 5 or not self._same(obj, kind, entry[2])
                    or entry[1][0] == "k" and entry[1][2] != name):  # a defaultdict's factory changed, say
                entry = self._new_container(obj, kind, name)
                if entry is None:
                    return None
            self.pending[id(obj)] = entry
        pid = entry[1]
        if pid[0] in ("s", "i"):
            self.items.add(pid, entry[2])  # its items may make the next values
        self.used.update(rlm_references.records_needed(pid))
        self.used.update(entry[3])
        self.seen.update(entry[4])
        self.seen[id(obj)] = entry
        return pid

    def _new_container(self, obj, kind, name):
        types = set(map(type, obj))
        if kind in rlm_references.DICT_TYPES:
            types |= set(map(type, obj.values()))
        if tuple in types:  # pairs, rows: a tuple of atoms cannot change either (one level)
            types.discard(tuple)
            for values in (obj, obj.values()) if kind in rlm_references.DICT_TYPES else (obj,):
                types.update(map(type, chain.from_iterable([v for v in values if type(v) is tuple])))
        if not types <= _ATOMS:
            return None
        if kind is list and types == _STR and self.slices is not None:
            segments = rlm_splits.split_reference(obj, self.slices)
            if segments is not None:
                return (obj, ("s", segments, self._container_number()), tuple(obj), set(), {})
            found = self.items.subset(obj)
            if found is not None:
                base, indices = found
                pid = ("i", base, self._new_record(indices, indices), self._container_number())
                return (obj, pid, tuple(obj), set(), {})
        shape = _shape(obj, kind)
        outer_used, outer_seen = self.used, self.seen
        self.used, self.seen = set(), {}
        try:
            data = rlm_pickling.dump(_pickle.Pickler, self, shape)
            nested_used, nested_seen = self.used, self.seen
        finally:
            self.used, self.seen = outer_used, outer_seen
        digest = record_name(data, data)
        if digest not in self.new_records:
            self._count_new(len(data))
            self.new_records[digest] = data
        number = self._container_number()
        # "k", not "r": code before containers refuses it (it would restore
        # the list as the bytes of its record).
        return (obj, ("k", digest, name, number), shape, nested_used, nested_seen)

    def _same(self, obj, kind, shape):
        if kind in rlm_references.DICT_TYPES:
            keys, values = shape
            return self.same_items.same(obj, keys) and self.same_items.same(obj.values(), values)
        return self.same_items.same(obj, shape)  # a set in the order it iterates

    def _container_number(self):
        number = self.stored.next_container
        self.stored.next_container += 1
        return number

    def forget_new(self):
        """Undo what dumps since the last one that succeeded named: their new
        records and byte count (the per-name search of `take` dumps again)."""
        unkept = {name for name in self.new_records if name not in self._kept}
        for key, entry in list(self.pending.items()):
            if unkept.intersection(rlm_references.records_needed(entry[1])):
                del self.pending[key]
        for digest in [d for d in self.new_records if d not in self._kept]:
            del self.new_records[digest]
        self.new_bytes = sum(len(self.new_records[d]) for d in self._kept)

    def keep_new(self):
        """The records named so far belong to a dump that succeeded."""
        self._kept = set(self.new_records)

    def _count_new(self, size):
        self.check_fits(size)
        self.new_bytes += size

    def check_fits(self, size, inline=0):
        """Raise unless `size` more bytes, beside the new records and `inline`
        bytes of pickled state, fit in what one snapshot may send."""
        total = self.new_bytes + inline + size
        if self.max_new_bytes is not None and total > self.max_new_bytes:
            raise ValueError(
                "too large to save: %s of new values in this snapshot, at most %s go to the host at "
                "once; it stays in memory until the REPL restarts (split it, or save less per cell)"
                % (_mb(total), _mb(self.max_new_bytes)))

    def persistent_load(self, pid, records, loaded):
        return rlm_restore.persistent_load(self, pid, records, loaded)


def _shape(obj, kind):
    """What says a container of atoms is unchanged: its items, in order
    (a dict's keys and values)."""
    return (tuple(obj), tuple(obj.values())) if kind in rlm_references.DICT_TYPES else tuple(obj)


def take(refs, names):
    """Pickle the named globals. Returns data, saved names, {unsaved: reason},
    the record names the data refers to (joined) and the records the host lacks."""
    state = {name: refs.user_globals[name] for name in names}
    unsaved = {}
    try:
        data = rlm_pickling.dumps(refs, state)
        # Values other than str and bytes (a bytearray, a long list) are
        # pickled into the state itself, which goes in the same frame.
        refs.check_fits(len(data))
    except Exception:
        # Find the culprits one by one, then save everything else together so
        # shared references between the saved values are kept. What a failed
        # dump named is forgotten: it is not sent, and must not count.
        refs.forget_new()
        inline = 0
        for name, value in state.items():
            try:
                # A value two names share counts for each here (once in the
                # final dump): conservative, never past the frame.
                part = len(rlm_pickling.dumps(refs, value)) + len(name) + _PER_NAME_BYTES
                refs.check_fits(part, inline)
                refs.keep_new()
                inline += part
            except Exception as exc:
                refs.forget_new()
                unsaved[name] = rlm_restore.reason(exc)
        for name in unsaved:
            del state[name]
        try:
            data = rlm_pickling.dumps(refs, state)
            refs.check_fits(len(data))
        except Exception as exc:  # a failure only visible in combination
            for name in list(state):
                unsaved[name] = "could not be saved together with the others: " + rlm_restore.reason(exc)
            state = {}
            data = rlm_pickling.dumps(refs, state)
    # Only now, with the final dump done, does the host get to hold these.
    refs.stored.by_id = refs.seen
    refs.items.keep()
    refs.pending = {}
    new = {digest: data for digest, data in refs.new_records.items() if digest in refs.used}
    return {"data": MAGIC + data, "saved": sorted(state), "unsaved": unsaved,
            # One string of 40-character names, unsorted: 10,000 names as a
            # sorted list took ~30 ms to make and encode here, and to check
            # on the host (which sorts them).
            "refs": "".join(refs.used), "records": new}


def load(refs, data, records=None):
    """Unpickle snapshot bytes, with the records {name: bytes} they refer to;
    returns the dict of globals to install."""
    if data.startswith(MAGIC):
        header = len(MAGIC)
    elif data.startswith(_LEGACY_MAGIC):
        header = len(_LEGACY_MAGIC)
    else:
        raise ValueError("not a REPL snapshot (bad header)")
    refs.begin_dump()
    state = rlm_pickling.unpickle(refs, memoryview(data)[header:], records or {}, {})
    refs.stored.by_id = refs.seen  # the host holds exactly what was restored
    return state
