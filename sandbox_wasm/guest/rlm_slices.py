"""Find where a string occurs as an exact slice of the context (guest side).

Model code cuts the context into chunks and windows; a snapshot stores such a
value as (document, start, end) instead of its characters. Candidates are
found without scanning the context per value:

- a hint: where the previous match ended (chunks are usually cut in order),
  the next step of a regular stride, the start of the next document, and the
  start of each document;
- a whole document wrapped in texts as long as the last value's (a prompt per
  document, in any order): looked up by its length and first and last
  characters; the first such value found by where it stops sharing its
  beginning with the last value missed (`_bootstrap`);
- documents joined in one value: each next one the document after, or any
  document (filtered, shuffled) starting within a few characters, looked up
  by its first characters; a batch's first after the text that began the
  last batch;
- the anchor index of each large document (rlm_anchors): a value's first
  anchor leads to at most MAX_SAME offsets, each verified with one in-place
  comparison (`startswith`), so a hash collision never matters.

A miss only means the value is stored by content instead; it is never wrong.
The references found are described, and turned back into values, in
rlm_references.
"""

if __package__:  # the host imports this file as part of sandbox_wasm
    from .rlm_anchors import ANCHOR_LEN, MAX_SAME, first_anchor, unpack_index, window_key
    from .rlm_doc_starts import START_KEY, DocumentStarts
else:  # the guest imports its modules by their own names
    from rlm_anchors import ANCHOR_LEN, MAX_SAME, first_anchor, unpack_index, window_key
    from rlm_doc_starts import START_KEY, DocumentStarts

_START_DOCS = 16
# Documents sharing their first characters tried for a value that starts one.
_MAX_STARTS = 64
# What a bootstrap (see ContextSlices._bootstrap) may try: characters the
# documents share at their start, documents compared in all (documents that
# share a header all start alike), and failures per snapshot.
_MAX_HEADER = 256
_MAX_BOOTSTRAP_DOCS = 4096
_MAX_BOOTSTRAPS = 32
# A prompt's opening text of its own (not shared with the last value
# missed, or nothing to compare with yet): positions tried, up to this one.
_OWN_PREFIX = 256
# Text allowed between two documents joined in one value; positions tried
# for the next one's start when it is not the document after (documents
# filtered or shuffled), and how many such searches may fail per snapshot.
_MAX_GAP = 1024
_MAX_SEPARATOR = 64
_MAX_SEARCHES = 32
# A value found inside the context may have this many characters around the
# slice (stored inline); anchors tried before giving up on a value.
MAX_AFFIX = 16 * 1024
_MAX_TRIES = 8


class ContextSlices:
    """Locates exact slices of the context documents (a tuple of str)."""

    def __init__(self, docs, packed=None):
        self.docs = docs
        # per document: (anchor, {crc32: offset or [offsets]}) or None
        self.indexes = [unpack_index(entry) for entry in packed] if packed else None
        self.hint = None  # (doc, start of the last match, its end, the step from the one before)
        self.doc_starts = None  # rlm_doc_starts.DocumentStarts, made when first needed
        self.affix_texts = None  # (prefix, suffix) of the last value found inside
        self.join_texts = None  # (first text, separator) of the last joined value found
        self.searches_left = _MAX_SEARCHES
        self.last_missed = None  # the start of the last value no reference was found for
        self.bootstraps_left = _MAX_BOOTSTRAPS
        self.indexed = None  # [(doc, index)] of the documents that have one
        self.run_starts = []  # (doc, start) of the last few matches that began a run

    def reference(self, value):
        """How a snapshot refers to `value`, or None (stored by content):
        ("c", doc, start, end) for a slice of one document, ("x", prefix,
        doc, start, end, suffix) for one slice between short texts (a prompt
        around a chunk), ("m", texts, ((doc, start, end), ...)) for documents
        joined (a batch of them in any order, or all, wrapped or not; the
        texts at most half the value). rlm_references.rebuild turns each back
        into the value. While values are found as whole documents wrapped (a
        list of prompts), that one lookup goes first: find's hints and tables
        would miss each of them first (~20% of such a snapshot's time)."""
        whole = self._whole_inside(value)
        if whole is not None:
            return whole
        place = self.find(value)
        if place is not None:
            return "c", place[0], place[1], place[1] + len(value)
        return self._inside(value)

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
            following = self._next_document()
            if following is not None and self.docs[following].startswith(value):
                return self._found(following, 0, size)
        doc_starts = self._doc_starts()
        for doc in doc_starts.whole(value, 0, size, MAX_SAME):  # a document itself
            if self.docs[doc] == value:
                return self._found(doc, 0, size)
        # The first chunk of a document. Bounded: documents may share a long
        # header, and a miss only costs storing the value.
        for doc in doc_starts.starting(value, 0, _MAX_STARTS):
            if self.docs[doc].startswith(value):
                return self._found(doc, 0, size)
        for doc, (anchors, table) in self._indexes():
            first = first_anchor(value, anchors)
            if first < 0 or first + ANCHOR_LEN > size:
                continue
            offsets = table.get(window_key(value, first))
            if offsets is None:
                continue
            text = self.docs[doc]
            for offset in (offsets if isinstance(offsets, list) else (offsets,)):
                start = offset - first
                if 0 <= start <= len(text) - size and text.startswith(value, start):
                    return self._found(doc, start, size)
        return None

    def documents_starting(self, text, most):
        """At most `most` documents that may begin as `text` does (filed by a
        hash of their first characters: compare before use)."""
        return self._doc_starts().starting(text, 0, most)

    def _inside(self, value):
        """An "x" or "m" reference to `value` (see `reference`), once it is
        known to be neither a slice nor a whole document between texts as
        long as the last ones."""
        batch = self._batch_inside(value)
        if batch is not None:
            return batch
        size = len(value)
        for doc, delta, known in self._alignments(value):
            text = self.docs[doc]
            lo = max(-delta, 0)
            hi = min(size, len(text) - delta)
            begin = _match_start(value, text, delta, lo, known)
            end = _match_end(value, text, delta, known + ANCHOR_LEN, hi)
            if _wraps(size, begin, end):
                return self._wrapped(value, doc, begin + delta, begin, end)
            joined = self._joined(value, doc, begin + delta, begin, end)
            if joined is not None:
                return joined
        return self._bootstrap(value)

    def new_snapshot(self):
        """A snapshot begins: it may spend its own bootstraps."""
        self.bootstraps_left = _MAX_BOOTSTRAPS
        self.searches_left = _MAX_SEARCHES

    def _whole_inside(self, value):
        """An "x" reference for a whole document between texts as long as
        those around the last value found: one lookup, one comparison."""
        if self.affix_texts is None:
            return None
        before, after = map(len, self.affix_texts)
        size = len(value)
        end = size - after
        if not _wraps(size, before, end):
            return None
        for doc in self._doc_starts().whole(value, before, end, MAX_SAME):
            text = self.docs[doc]  # filed under a hash: its length is checked too
            if len(text) == end - before and value.startswith(text, before):
                return self._wrapped(value, doc, 0, before, end)
        return None

    def _batch_inside(self, value):
        """An "m" reference for documents joined after the text that began
        the last joined value (batches of documents filtered or shuffled,
        whose first document no hint points at): one lookup of its first
        characters, each candidate compared in place."""
        if self.join_texts is None or not value.startswith(self.join_texts[0]):
            return None
        begin = len(self.join_texts[0])
        for doc, _ in self._documents_at(value, (begin,), _MAX_STARTS):
            return self._joined(value, doc, 0, begin, begin + len(self.docs[doc]))
        return None

    def _bootstrap(self, value):
        """A whole document inside `value` when the texts around it are not
        known yet: the first of the prompts made one per document, or of the
        batches of documents joined, in an order the hints do not follow
        (reversed, sorted, shuffled). A prompt made like the last value
        missed has a prefix at most as long as what they share, so a
        document's start is looked up at each position from there back over
        _MAX_HEADER characters (documents may share a header); then, for a
        prompt with an opening text of its own, at each later position up
        to _OWN_PREFIX. Bounded per snapshot: values that wrap nothing must
        not cost each a search."""
        previous = self.last_missed
        self.last_missed = value[:MAX_AFFIX + _MAX_HEADER + START_KEY]
        if self.bootstraps_left <= 0:
            return None
        self.bootstraps_left -= 1
        size = len(value)
        shared = 0 if previous is None else min(_match_end(value, previous, 0, 0, min(size, len(previous))), MAX_AFFIX)
        places = (*range(shared, max(shared - _MAX_HEADER, 0) - 1, -1), *range(shared + 1, min(size, _OWN_PREFIX + 1)))
        for doc, before in self._documents_at(value, places, _MAX_BOOTSTRAP_DOCS):
            end = before + len(self.docs[doc])
            if _wraps(size, before, end):
                return self._wrapped(value, doc, 0, before, end)
            joined = self._joined(value, doc, 0, before, end)
            if joined is not None:
                return joined
        return None

    def _documents_at(self, value, places, most, cut=False):
        """(doc, place) for each non-empty document that `value` holds whole
        from one of `places` (with `cut`, or up to the value's end), looked
        up by its first characters: at most `most` candidates compared in
        all (documents may share a header)."""
        doc_starts, left = self._doc_starts(), most
        for place in places:
            for doc in doc_starts.starting(value, place, left):
                text = self.docs[doc]
                if text and (_starts_at(value, text, place) if cut else value.startswith(text, place)):
                    yield doc, place
                left -= 1
            if left <= 0:
                return

    def _wrapped(self, value, doc, start, begin, end):
        """The "x" reference when value[begin:end] is docs[doc][start:...].
        Texts around it equal to the last ones are the same objects, so a
        list of prompts pickles them once."""
        self._found(doc, start, end - begin)
        before, after = value[:begin], value[end:]
        if self.affix_texts is not None:
            before, after = _same(before, self.affix_texts[0]), _same(after, self.affix_texts[1])
        self.affix_texts = (before, after)
        return "x", before, doc, start, start + end - begin, after

    def _joined(self, value, doc, start, begin, end):
        """("m", texts, pieces) when value[begin:end], which is
        docs[doc][start:...], is the first of documents joined in `value`
        with short texts between them (a batch of documents joined by a
        separator, maybe numbered or wrapped, in the context's order or not;
        its last may be cut short), else None."""
        docs, size = self.docs, len(value)
        first = value[:begin]
        if self.join_texts is not None:  # pickled once for a list of batches
            first = _same(first, self.join_texts[0])
        texts, pieces = [first], [(doc, start, start + end - begin)]
        pos = end
        # Each piece but the value's last runs to its document's end.
        while pos < size and pieces[-1][2] == len(docs[doc]):
            following = self._next_piece(value, pos, doc, len(pieces) == 1)
            if following is None:
                break
            doc, found = following
            end = min(found + len(docs[doc]), size)
            # A separator repeated between the documents is pickled once.
            texts.append(_same(value[pos:found], texts[-1]) if len(texts) > 1 else value[pos:found])
            pieces.append((doc, 0, end - found))
            pos = end
        texts.append(value[pos:])
        if len(pieces) < 2 or 2 * sum(map(len, texts)) > size:
            return None
        last = pieces[-1]
        self._found(last[0], last[1], last[2] - last[1])
        self.join_texts = (texts[0], texts[1])
        return "m", tuple(texts), tuple(pieces)

    def _next_piece(self, value, pos, doc, second):
        """(document, where it starts in value) for the document joined after
        value[:pos], which ends `doc`: the document after it within _MAX_GAP
        characters, else any document starting after the separator last
        seen, or within _MAX_SEPARATOR characters (filtered or shuffled
        documents; a document under START_KEY characters is not found
        there; at most _MAX_STARTS candidates compared in all). None when
        none is there. Only a search for a value's `second` piece counts
        against the snapshot's failures: past it the value is a batch, and
        its end costs one search of its own."""
        following = self._non_empty_after(doc)
        if following is not None:
            text = self.docs[following]
            found = value.find(text[:ANCHOR_LEN], pos, pos + _MAX_GAP + min(len(text), ANCHOR_LEN))
            if found >= 0 and _starts_at(value, text, found):
                return following, found
        if second and self.searches_left <= 0:
            return None
        places = range(pos, min(pos + _MAX_SEPARATOR, len(value)))
        if self.join_texts is not None and self.join_texts[1]:  # after the separator last seen, first
            places = (pos + len(self.join_texts[1]), *places)
        for found in self._documents_at(value, places, _MAX_STARTS, cut=True):
            return found
        if second:
            self.searches_left -= 1
        return None

    def _doc_starts(self):
        if self.doc_starts is None:
            self.doc_starts = DocumentStarts(self.docs)
        return self.doc_starts

    def _next_document(self):
        """The first non-empty document after the last match, if that match
        reached the end of its own (a value per document, in order; an empty
        document joins a batch as nothing), or came closer to it than an
        anchor's length (the next value then starts with that short tail,
        which no anchor can place)."""
        doc, _, end, _ = self.hint
        return self._non_empty_after(doc) if len(self.docs[doc]) - end < ANCHOR_LEN else None

    def _non_empty_after(self, doc):
        """The first non-empty document after `doc`, or None: an empty one
        joins a batch as nothing (part of the text between its neighbours)."""
        doc += 1
        while doc < len(self.docs) and not self.docs[doc]:
            doc += 1
        return doc if doc < len(self.docs) else None

    def _alignments(self, value):
        """(doc, delta, i): value[i:i + ANCHOR_LEN] == docs[doc][i + delta:...]."""
        size = len(value)
        limit = min(size - ANCHOR_LEN, MAX_AFFIX)
        origins = []
        if self.hint is not None:  # the chunk after the previous match
            doc, start, end, step = self.hint
            origins += [(doc, end), (doc, start + step)]
            following = self._next_document()
            if following is not None:
                origins.append((following, 0))
        # Where runs of chunks began (prompts are made from chunks in order),
        # and the first documents' starts.
        origins += self.run_starts + [(doc, 0) for doc in range(min(len(self.docs), _START_DOCS))]
        for doc, origin in origins:
            if 0 <= origin <= len(self.docs[doc]) - ANCHOR_LEN:  # a negative slice start would wrap
                pos = value.find(self.docs[doc][origin:origin + ANCHOR_LEN], 0, limit + ANCHOR_LEN)
                if pos >= 0:
                    yield doc, origin - pos, pos
        for doc, (anchor, table) in self._indexes():
            pos, tries = first_anchor(value, anchor), 0
            while 0 <= pos <= limit and tries < _MAX_TRIES:
                offsets = table.get(window_key(value, pos))
                if offsets is None:
                    offsets = ()
                for offset in (offsets if isinstance(offsets, (list, tuple)) else (offsets,)):
                    if self.docs[doc].startswith(value[pos:pos + ANCHOR_LEN], offset):
                        yield doc, offset - pos, pos
                pos, tries = first_anchor(value, anchor, pos + 1), tries + 1

    def _indexes(self):
        if self.indexed is None:
            entries = self.indexes if self.indexes and len(self.indexes) == len(self.docs) else ()
            self.indexed = [(doc, entry) for doc, entry in enumerate(entries) if entry]
        return self.indexed

    def _found(self, doc, start, size):
        step = start - self.hint[1] if self.hint is not None and self.hint[0] == doc else 0
        if self.hint is None or (doc, start) not in ((self.hint[0], self.hint[2]),
                                                     (self.hint[0], self.hint[1] + self.hint[3]),
                                                     (self._next_document(), 0)):
            self.run_starts = [(doc, start)] + [r for r in self.run_starts if r != (doc, start)][:3]
        self.hint = (doc, start, start + size, step)
        return doc, start


def _starts_at(value, text, pos):
    """Whether value[pos:] is `text` followed by more, or a start of it."""
    if pos + len(text) <= len(value):
        return value.startswith(text, pos)
    return text.startswith(value[pos:])


def _same(text, known):
    """`known` when `text` equals it (one object, pickled once), else `text`."""
    return known if text == known else text


def _wraps(size, begin, end):
    """Whether value[begin:end], a slice of the context, is most of a value of
    `size` characters, with short enough texts around it to store inline."""
    return end - begin >= size // 2 and size - (end - begin) <= MAX_AFFIX


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
