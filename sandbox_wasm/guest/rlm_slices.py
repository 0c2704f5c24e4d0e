"""Find where a string occurs as an exact slice of the context (guest side).

Model code cuts the context into chunks and windows; a snapshot stores such a
value as (document, start, end) instead of its characters. Candidates are
found without scanning the context per value:

- a hint: where the previous match ended (chunks are usually cut in order),
  the next step of a regular stride, and the start of each document;
- an anchor index per document: every occurrence of one rarely used character
  (picked from a strided sample so occurrences are ~ANCHOR_GAP apart) keyed by
  the hash of the ANCHOR_LEN characters that start there. A value's first
  anchor character leads to at most MAX_SAME offsets, each verified with one
  in-place comparison (`startswith`), so a hash collision never matters.

A miss only means the value is stored by content instead; it is never wrong.
"""

ANCHOR_GAP = 2048
ANCHOR_LEN = 64
MAX_SAME = 8
# Documents shorter than this are not indexed (a slice of them is small anyway).
MIN_INDEXED_DOC = 64 * 1024
_SAMPLE_CHARS = 256 * 1024
_SAMPLE_BLOCKS = 16
_MAX_ANCHOR_LEN = 4
_START_KEY = 32
_START_DOCS = 16
# A value found inside the context may have this many characters around the
# slice (stored inline); anchors tried before giving up on a value.
MAX_AFFIX = 16 * 1024
_MAX_TRIES = 8
_BRANCHES = 16


class ContextSlices:
    """Locates exact slices of the context documents (a tuple of str)."""

    def __init__(self, docs, packed=None):
        self.docs = docs
        # per document: (anchor, {crc32: offset or [offsets]}) or None
        self.indexes = [unpack_index(entry) for entry in packed] if packed else None
        self.hint = None  # (doc, start of the last match, its end, the step from the one before)
        self.starts = None  # first characters -> documents starting with them
        self.indexed = None  # [(doc, index)] of the documents that have one
        self.run_starts = []  # (doc, start) of the last few matches that began a run

    def find(self, value):
        """(doc index, start) of a document slice equal to `value`, or None."""
        size = len(value)
        if not size:
            return None
        if self.hint is not None:
            doc, start, end, step = self.hint
            text = self.docs[doc]
            for guess in (end, start + step):  # the next chunk, or the next window of a stride
                if 0 <= guess <= len(text) - size and text.startswith(value, guess):
                    return self._found(doc, guess, size)
        if self.starts is None:
            self.starts = {}
            for doc, text in enumerate(self.docs):
                self.starts.setdefault(text[:_START_KEY], []).append(doc)
        for doc in self.starts.get(value[:_START_KEY], ()):  # the first chunk of a document
            if self.docs[doc].startswith(value):
                return self._found(doc, 0, size)
        for doc, (anchors, table) in self._indexes():
            first = _first_anchor(value, anchors)
            if first < 0 or first + ANCHOR_LEN > size:
                continue
            offsets = table.get(_window_key(value, first))
            if offsets is None:
                continue
            text = self.docs[doc]
            for offset in (offsets if isinstance(offsets, list) else (offsets,)):
                start = offset - first
                if 0 <= start <= len(text) - size and text.startswith(value, start):
                    return self._found(doc, start, size)
        return None

    def find_inside(self, value):
        """(prefix, doc, start, end, suffix) with value == prefix +
        docs[doc][start:end] + suffix, for a value that wraps one slice in
        short texts (a prompt around a chunk), or None."""
        size = len(value)
        for doc, delta, known in self._alignments(value):
            text = self.docs[doc]
            lo = max(-delta, 0)
            hi = min(size, len(text) - delta)
            begin = _match_start(value, text, delta, lo, known)
            end = _match_end(value, text, delta, known + ANCHOR_LEN, hi)
            if end - begin >= size // 2 and size - (end - begin) <= MAX_AFFIX:
                self._found(doc, begin + delta, end - begin)
                return value[:begin], doc, begin + delta, end + delta, value[end:]
        return None

    def _alignments(self, value):
        """(doc, delta, i): value[i:i + ANCHOR_LEN] == docs[doc][i + delta:...]."""
        size = len(value)
        limit = min(size - ANCHOR_LEN, MAX_AFFIX)
        origins = []
        if self.hint is not None:  # the chunk after the previous match
            doc, start, end, step = self.hint
            origins += [(doc, end), (doc, start + step)]
        # Where runs of chunks began (prompts are made from chunks in order),
        # and the first documents' starts.
        origins += self.run_starts + [(doc, 0) for doc in range(min(len(self.docs), _START_DOCS))]
        for doc, origin in origins:
            if 0 <= origin <= len(self.docs[doc]) - ANCHOR_LEN:  # a negative slice start would wrap
                pos = value.find(self.docs[doc][origin:origin + ANCHOR_LEN], 0, limit + ANCHOR_LEN)
                if pos >= 0:
                    yield doc, origin - pos, pos
        for doc, (anchor, table) in self._indexes():
            pos, tries = _first_anchor(value, anchor), 0
            while 0 <= pos <= limit and tries < _MAX_TRIES:
                offsets = table.get(_window_key(value, pos))
                if offsets is None:
                    offsets = ()
                for offset in (offsets if isinstance(offsets, (list, tuple)) else (offsets,)):
                    if self.docs[doc].startswith(value[pos:pos + ANCHOR_LEN], offset):
                        yield doc, offset - pos, pos
                pos, tries = _first_anchor(value, anchor, pos + 1), tries + 1

    def _indexes(self):
        if self.indexed is None:
            entries = self.indexes if self.indexes and len(self.indexes) == len(self.docs) else ()
            self.indexed = [(doc, entry) for doc, entry in enumerate(entries) if entry]
        return self.indexed

    def _found(self, doc, start, size):
        step = start - self.hint[1] if self.hint is not None and self.hint[0] == doc else 0
        if self.hint is None or (doc, start) not in ((self.hint[0], self.hint[2]),
                                                     (self.hint[0], self.hint[1] + self.hint[3])):
            self.run_starts = [(doc, start)] + [r for r in self.run_starts if r != (doc, start)][:3]
        self.hint = (doc, start, start + size, step)
        return doc, start


def anchor_index(text):
    """([prefix, followers], {window key: offset or [offsets]}) for a document,
    or None. An anchor is `prefix` followed by one of `followers` (any
    character when empty); with an empty prefix, any one of `followers`."""
    if len(text) < MIN_INDEXED_DOC:
        return None
    anchor = _anchor(text)
    if anchor is None:
        return None
    table = {}
    limit = len(text) - ANCHOR_LEN
    for pos in _occurrences(text, anchor[0], anchor[1], limit + 1):
        key = _window_key(text, pos)
        known = table.get(key)
        if known is None:
            table[key] = pos
        elif isinstance(known, list):
            if len(known) < MAX_SAME:
                known.append(pos)
        else:
            table[key] = [known, pos]
    return anchor, table


def pack_index(entry):
    """An anchor index as a few flat buffers: the guest rebuilds the dict at C
    speed (decoding 50,000 dict items one by one costs ~0.5 s in the guest)."""
    from array import array

    if entry is None:
        return None
    anchor, table = entry
    single = {k: v for k, v in table.items() if not isinstance(v, list)}
    shared = {k: v for k, v in table.items() if isinstance(v, list)}
    return [anchor, array("I", single.keys()).tobytes(), array("q", single.values()).tobytes(), shared]


def unpack_index(packed):
    from array import array

    if not packed:
        return None
    anchor, keys, offsets, shared = packed
    keys_array, offsets_array = array("I"), array("q")
    keys_array.frombytes(keys)
    offsets_array.frombytes(offsets)
    table = dict(zip(keys_array, offsets_array))
    table.update(shared)
    return anchor, table


def _occurrences(text, prefix, followers, end):
    """Anchor positions below `end`, in order. Runs on the host (see the
    module doc): one regex pass, not a Python loop per prefix occurrence."""
    import re

    pattern = re.escape(prefix)
    if followers:
        pattern += "[" + "".join(re.escape(char) for char in followers) + "]"
    stop = min(len(text), end + len(prefix) + 1)
    return [match.start() for match in re.compile(pattern).finditer(text, 0, stop)
            if match.start() < end]


def _match_end(value, text, delta, lo, hi):
    """Largest end in [lo, hi] with value[lo:end] == text[lo + delta:end + delta]
    (value[..lo] is known to match). Halving: at most len(value) chars copied."""
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if text.startswith(value[lo:mid], lo + delta):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _match_start(value, text, delta, lo, hi):
    """Smallest start in [lo, hi] with value[start:hi] matching the text."""
    while lo < hi:
        mid = (lo + hi) // 2
        if text.startswith(value[mid:hi], mid + delta):
            hi = mid
        else:
            lo = mid + 1
    return hi


def _first_anchor(value, anchor, begin=0):
    prefix, followers = anchor
    if not prefix:
        first = -1
        for char in followers:
            pos = value.find(char, begin, first if first >= 0 else len(value))
            if pos >= 0:
                first = pos
        return first
    after = len(prefix)
    pos = value.find(prefix, begin)
    while pos >= 0:
        if not followers or value[pos + after:pos + after + 1] in followers and pos + after < len(value):
            return pos
        pos = value.find(prefix, pos + 1)
    return -1


def _window_key(text, pos):
    from zlib import crc32

    return crc32(text[pos:pos + ANCHOR_LEN].encode("utf-8", "surrogatepass"))


def _anchor(text):
    """[prefix, followers] whose occurrences are ~1 per ANCHOR_GAP characters:
    rare characters alone, else a frequent prefix narrowed by the characters
    allowed after it (plain prose has no character rare enough alone)."""
    if len(text) <= _SAMPLE_CHARS:
        sample = text
    else:  # blocks spread over the text, so one repetitive region does not decide
        step = len(text) // _SAMPLE_BLOCKS
        block = _SAMPLE_CHARS // _SAMPLE_BLOCKS
        sample = "\0".join(text[i * step:i * step + block] for i in range(_SAMPLE_BLOCKS))
    target = len(sample) / ANCHOR_GAP
    prefixes = [""]
    for _ in range(_MAX_ANCHOR_LEN):
        tried = []
        for prefix in prefixes:
            counts = _followers(sample, prefix)
            followers, total, dense = "", 0, []
            for char, count in sorted(counts.items(), key=lambda item: item[1]):
                if total + count <= 1.5 * target:
                    followers += char
                    total += count
                elif count > 1.5 * target:
                    dense.append(char)
            if total >= target / 2:
                return [prefix, followers]
            tried += [prefix + char for char in dense[:_BRANCHES]]
        # Too sparse with what fits: narrow the least frequent too-dense ones.
        prefixes = tried[:_BRANCHES]
        if not prefixes:
            return None
    return None


def _followers(sample, prefix):
    from collections import Counter

    if not prefix:
        counts = Counter(sample)
    else:
        counts = Counter()
        pos = sample.find(prefix)
        while 0 <= pos < len(sample) - len(prefix):
            counts[sample[pos + len(prefix)]] += 1
            pos = sample.find(prefix, pos + 1)
    counts.pop("\0", None)
    return counts
