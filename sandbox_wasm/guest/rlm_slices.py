"""Find where a string occurs as an exact slice of the context (guest side).

Model code cuts the context into chunks and windows; a snapshot stores such a
value as (document, start, end) instead of its characters. Candidates are
found without scanning the context per value:

- a hint: where the previous match ended (chunks are usually cut in order),
  and the next step of a regular stride;
- an anchor index per document: every occurrence of one rarely used character
  (picked from a strided sample so occurrences are ~ANCHOR_GAP apart) keyed by
  the hash of the ANCHOR_LEN characters that start there. A value's first
  anchor character leads to at most MAX_SAME offsets, each verified with one
  in-place comparison (`startswith`), so a hash collision never matters.

A miss only means the value is stored by content instead; it is never wrong.
"""

ANCHOR_GAP = 4096
ANCHOR_LEN = 64
MAX_SAME = 8
# Documents shorter than this are not indexed (a slice of them is small anyway).
MIN_INDEXED_DOC = 64 * 1024
_SAMPLE_CHARS = 256 * 1024
_SAMPLE_BLOCKS = 16
_MAX_ANCHOR_LEN = 4


class ContextSlices:
    """Locates exact slices of the context documents (a tuple of str)."""

    def __init__(self, docs, anchors=None):
        self.docs = docs
        self.indexes = anchors  # per document: (anchor, {crc32: offset or [offsets]}) or None
        self.hint = None  # (doc, start of the last match, its end, the step from the one before)

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
        if not self.indexes or len(self.indexes) != len(self.docs):
            return None
        for doc, entry in enumerate(self.indexes):
            if entry is None:
                continue
            char, table = entry
            first = value.find(char)
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

    def _found(self, doc, start, size):
        step = start - self.hint[1] if self.hint is not None and self.hint[0] == doc else 0
        self.hint = (doc, start, start + size, step)
        return doc, start


def anchor_index(text):
    """(anchor, {window key: offset or [offsets]}) for a document, or None."""
    if len(text) < MIN_INDEXED_DOC:
        return None
    anchor = _anchor(text)
    if anchor is None:
        return None
    table = {}
    limit = len(text) - ANCHOR_LEN
    pos = text.find(anchor)
    while 0 <= pos <= limit:
        key = _window_key(text, pos)
        known = table.get(key)
        if known is None:
            table[key] = pos
        elif isinstance(known, list):
            if len(known) < MAX_SAME:
                known.append(pos)
        else:
            table[key] = [known, pos]
        pos = text.find(anchor, pos + 1)
    return anchor, table


def _window_key(text, pos):
    from zlib import crc32

    return crc32(text[pos:pos + ANCHOR_LEN].encode("utf-8", "surrogatepass"))


def _anchor(text):
    """A short string whose frequency in `text` is near 1 / ANCHOR_GAP: the
    rarest-but-not-too-rare character, extended by following characters while
    it is too frequent (plain prose has no character rare enough alone)."""
    from collections import Counter

    if len(text) <= _SAMPLE_CHARS:
        sample = text
    else:  # blocks spread over the text, so one repetitive region does not decide
        step = len(text) // _SAMPLE_BLOCKS
        block = _SAMPLE_CHARS // _SAMPLE_BLOCKS
        sample = "\0".join(text[i * step:i * step + block] for i in range(_SAMPLE_BLOCKS))
    target = len(sample) / ANCHOR_GAP
    counts = Counter(sample)
    chosen, chosen_score = None, None
    for _ in range(_MAX_ANCHOR_LEN):
        dense, dense_score = None, None
        for key, count in counts.items():
            if "\0" in key:
                continue
            score = count / target if count >= target else target / count
            if count > 4 * target:  # too many anchors: a candidate to extend
                if dense is None or score < dense_score:
                    dense, dense_score = key, score
            elif chosen is None or score < chosen_score:
                chosen, chosen_score = key, score
        if dense is None or (chosen is not None and chosen_score < 2):
            break
        counts = Counter()  # extend: count what follows the densest good candidate
        pos = sample.find(dense)
        while 0 <= pos < len(sample) - len(dense):
            counts[dense + sample[pos + len(dense)]] += 1
            pos = sample.find(dense, pos + 1)
    return chosen
