"""Values made of the items of a list cut from the context (guest side).

Model code filters the context's lines, then joins them into prompts:

    lines = context.split("\\n")                  # ("s", ...): rlm_splits
    hits = [l for l in lines if "ERROR" in l]    # ("i", base, indices, number)
    batches = ["\\n".join(hits[i:i + 50]) ...]     # ("q", base, start, stop, sep, before, after)

A list whose items are all items of such a list (filtered, sorted, shuffled:
the same objects) is stored as their indices, a record of 4 bytes an item; a
str that joins consecutive items of one, maybe between short texts, as where
they are. `base` is the reference ("s" or "i") of the list they come from,
not the list: what it names never changes (a split of the context, or
indices into one), so these references stay right whatever the model does
to the list itself afterwards, and the restore makes the base once and
shares its items.
"""

from array import array
from operator import itemgetter

if __package__:  # the host imports this file as part of sandbox_wasm (tests)
    from .rlm_slices import MAX_AFFIX  # texts allowed around the items a value joins
else:  # the guest imports its modules by their own names
    from rlm_slices import MAX_AFFIX

# Lists cut from the context a snapshot remembers as bases (the latest
# kept), and how many lists of items of lists of items... deep; characters
# searched for the separator after a value's first item.
_MAX_BASES = 8
MAX_DEPTH = 4
_MAX_SEP = 64
# A value's first lines where a join may begin (a prompt's opening text),
# within its first characters; characters an item is looked up by.
_PLACES = 16
_LINES_SEARCHED = 2048
_KEY = 32
# Items of the largest list whose items are filed by how they start (a
# table made once per list: ~0.3 s for 300,000 in this guest); items of all
# the lists whose items are filed by identity (~100 bytes of guest memory
# each: a REPL of many huge lists must not run out of memory snapshotting).
_MAX_LOOKED_UP = 128 * 1024
_MAX_MAPPED = 2 * 1024 * 1024
# A list's items are mapped (~1 us an item, once) only for a subset that
# would cost more stored by content: ~2 us an item, and its text, weighed
# at _CHARS_PER_US (the bytes also stay in storage and come back on every
# restore). 2,400 words kept of a text's 1.4M took 1.4 s to map, where
# their 17 KB by content took 9 ms; 1.2M of them 2.4 s and 12 MB by content.
_CHARS_PER_US = 16
# Items a value may start past the last join found (the values between,
# under a record's size, are not looked up): eight joins of the last one's
# size, at most _MAX_SKIP (a value that only begins like the last join
# compares each).
_SKIP = 8
_MAX_SKIP = 512


_head = itemgetter(slice(0, _KEY))


class ItemLists:
    """The lists cut from the context that the last snapshots held, by
    reference: {pid: the tuple of items it names}."""

    def __init__(self):
        self.bases = {}
        self._ids = {}  # pid -> {id(item): index}, made when first needed
        self._mapped = 0  # items in self._ids
        self._starts = {}  # pid -> {hash of an item's first _KEY characters: index}, the same
        self._hint = None  # (pid, next index, sep, count, before) of the last join found
        self._held = set()  # the bases added (named or restored) since the last `keep`

    def add(self, pid, items):
        """A list named `pid` is held: its items may make the next values."""
        self._held.add(pid)
        if pid in self.bases or depth(pid) >= MAX_DEPTH:
            return
        if len(self.bases) >= _MAX_BASES:
            self._forget(next(iter(self.bases)))
        self.bases[pid] = items

    def keep(self):
        """Forget the bases not added since the last call (a snapshot ends:
        the lists it did not hold)."""
        for pid in [p for p in self.bases if p not in self._held]:
            self._forget(pid)
        self._held = set()

    def _forget(self, pid):
        del self.bases[pid]
        self._mapped -= len(self._ids.pop(pid, ()))
        self._starts.pop(pid, None)

    def subset(self, items):
        """(base pid, indices as bytes) when every one of `items` is an item
        of one base (the same object), else None."""
        for pid, base in self.bases.items():
            ids = self._ids.get(pid)
            if ids is None:
                if self._mapped + len(base) > _MAX_MAPPED or not _worth_mapping(items, base):
                    continue
                ids = self._ids[pid] = dict(zip(map(id, base), range(len(base))))
                self._mapped += len(ids)
            if id(items[0]) not in ids:
                continue
            indices = list(map(ids.get, map(id, items)))
            if None not in indices:
                return pid, array("I", indices).tobytes()
        return None

    def join(self, value):
        """("q", base, start, stop, sep, before, after) when `value` is
        before + sep.join(items[start:stop]) + after for a base's items,
        the texts around them short; else None. Tried where the last join
        found ended (or a few joins on), then from each base's first item,
        then from the item a line of the value starts as (in lists of items
        of a split, the smaller first)."""
        return next(filter(None, self._attempts(value)), None)

    def _attempts(self, value):
        """Each way of finding `value`, cheapest first, tried while needed."""
        yield self._after_last(value)
        for pid, base in self.bases.items():
            pos = value.find(base[0], 0, MAX_AFFIX + len(base[0])) if base else -1
            yield self._starting(value, pid, 0, pos) if pos >= 0 else None
        for pid in sorted(self.bases, key=lambda p: len(self.bases[p])):
            # Consecutive items of a split are a slice of the context, which
            # rlm_slices finds; a table is made only for lists up to a size.
            if pid[0] == "i" and len(self.bases[pid]) <= _MAX_LOOKED_UP:
                yield self._looked_up(value, pid)

    def _after_last(self, value):
        """A join that goes on from the last one found, with the same text
        before it. Values under a record's size between (not looked up)
        may have taken a few joins' items."""
        if self._hint is None or self._hint[0] not in self.bases:
            return None
        pid, start, sep, count, before = self._hint
        if not value.startswith(before):
            return None
        base, pos = self.bases[pid], len(before)
        reach = min(_SKIP * max(count, 1), _MAX_SKIP)
        for index in range(start, min(start + reach, len(base))):
            if value.startswith(base[index], pos):
                found = self._joined(value, pid, index, pos, sep, count if index == start else 0)
                if found is not None:
                    return found
        return None

    def _looked_up(self, value, pid):
        """A join whose first item begins the value or one of its first
        lines, found by a hash of its first _KEY characters."""
        starts = self._starts.get(pid)
        if starts is None:
            base = self.bases[pid]
            # First index of each, in C: an item under _KEY characters is filed
            # whole, and found only at the value's end.
            starts = self._starts[pid] = dict(zip(map(hash, map(_head, reversed(base))), range(len(base) - 1, -1, -1)))
        places, pos = [0], value.find("\n", 0, _LINES_SEARCHED)
        while pos >= 0 and len(places) < _PLACES:
            places.append(pos + 1)
            pos = value.find("\n", pos + 1, _LINES_SEARCHED)
        for pos in places:
            index = starts.get(hash(value[pos:pos + _KEY]))
            if index is not None:
                found = self._starting(value, pid, index, pos)
                if found is not None:
                    return found
        return None

    def _starting(self, value, pid, index, pos):
        """The join from base[index] at value[pos:], the separator what is
        between it and the next item."""
        base = self.bases[pid]
        if index + 1 >= len(base) or not value.startswith(base[index], pos):
            return None
        end = pos + len(base[index])
        following = value.find(base[index + 1], end, end + _MAX_SEP + len(base[index + 1]))
        return self._joined(value, pid, index, pos, value[end:following], 0) if following >= 0 else None

    def _joined(self, value, pid, start, pos, sep, count):
        """The "q" reference for value[pos:], items from `start` joined by
        `sep` (the first `count` of them checked at once), or None."""
        base, size = self.bases[pid], len(value)
        begin, stop = pos, start
        known = sep.join(base[start:start + count]) if count else None
        if known is not None and value.startswith(known, pos):
            pos += len(known)
            stop = min(start + count, len(base))
        elif stop < len(base) and value.startswith(base[stop], pos):
            pos += len(base[stop])
            stop += 1
        else:
            return None
        while stop < len(base) and value.startswith(sep, pos) and value.startswith(base[stop], pos + len(sep)):
            pos += len(sep) + len(base[stop])
            stop += 1
        before, after = value[:begin], value[pos:]
        if self._hint is not None and self._hint[4] == before:
            before = self._hint[4]  # one object: a list of prompts pickles it once
        if len(before) > MAX_AFFIX or len(after) > MAX_AFFIX or 2 * (len(before) + len(after)) > size:
            return None
        self._hint = (pid, stop, sep, stop - start, before)
        return "q", pid, start, stop, sep, before, after


def depth(pid):
    """How many "i" or "q" references lead from `pid` to a split (a filter of
    a filter of ...), counted up to MAX_DEPTH + 1: bases deeper than
    MAX_DEPTH are not kept, and a restore refuses them, so what each
    follows stays bounded."""
    count = 0
    while count <= MAX_DEPTH and type(pid) is tuple and len(pid) > 1 and pid[0] in ("i", "q"):
        pid, count = pid[1], count + 1
    return count


def records_of(pid):
    """The record names an "i" or "q" reference needs (its base's too)."""
    if pid[0] == "i":
        return (pid[2],) + records_of(pid[1])
    if pid[0] == "q":
        return records_of(pid[1])
    return ()


def rebuild(pid, base, data):
    """The value an "i" (with its record `data`) or "q" reference names,
    from `base`, the list its base reference made: ValueError when the
    reference does not fit it."""
    if type(base) is not list:
        raise ValueError("the base of %r is not a list" % (pid[0],))
    if pid[0] == "i":
        if len(pid) != 4 or type(pid[2]) is not str or type(pid[3]) is not int or len(data) % 4:
            raise ValueError("malformed item list reference")
        indices = array("I")
        indices.frombytes(data)
        if indices and max(indices) >= len(base):
            raise ValueError("an item list refers past its base's %d items" % len(base))
        return list(map(base.__getitem__, indices))
    if not (len(pid) == 7 and type(pid[2]) is int and type(pid[3]) is int
            and all(type(text) is str for text in pid[4:])):
        raise ValueError("malformed joined items reference")
    start, stop, sep, before, after = pid[2:]
    if not 0 <= start < stop <= len(base):
        raise ValueError("joined items %d:%d are outside their base's %d" % (start, stop, len(base)))
    return before + sep.join(base[start:stop]) + after


def _worth_mapping(items, base):
    """Whether mapping `base` costs less than storing `items` by content
    (their text estimated from the first few)."""
    sample = items[:64]
    chars = sum(map(len, sample)) * len(items) // len(sample)
    return 2 * len(items) + chars // _CHARS_PER_US >= len(base)
