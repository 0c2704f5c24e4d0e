"""Lists cut from the context by str.split, or into chunks (guest side).

`lines = context.split("\\n")` over 100 MB makes some 300,000 lines, and a
snapshot stored them whole, a second copy of the context: each line is too
short to be looked up on its own. A list of str equal to

    docs[d0][s0:e0].split(sep0) + docs[d1][s1:e1].split(sep1) + ...

(a document split, a slice of one, or the lines of several documents one
after another), where a segment's separator may also be a width (chunks of
that many characters, cut one after another: a list of 1,000-character
chunks, each too short to be looked up alone) or None (`str.split()` with no
argument: the words between runs of whitespace), is stored as
("s", ((d0, s0, e0, sep0), ...), number) instead:
`split_reference` places the list from a few of its first items, guesses the
separator from what follows them in the context, then checks every item in
place, in C, blocks at a time (rlm_references.rebuild_split makes it again).
A miss only means the list is stored by content, as before.
"""

from _operator import contains
from itertools import repeat

# Characters a separator may have; items looked at to place a segment, and
# how many of the longest of them are looked up in the context (each one
# `ContextSlices.find`: in a large document an item is found only when it
# holds one of the document's anchors, ~2 KB apart, so lines of a few
# hundred characters need several tries), the shortest worth a lookup;
# items after a placed one that must follow with the guessed separator
# before the whole check.
_MAX_SEP = 16
_FIRST = 64
LOOKUPS_PER_SEGMENT = 8
_MIN_FIND = 16
_CHAIN = 8
# What a document's first items are joined by to look it up by its start.
_STARTS = 8  # documents compared for each
_USUAL_SEPARATORS = ("\n", "\n\n", "\r\n", "\t", " ", ",", ";", "|")
# Items joined at once by the check: bounds the copy it makes; the same
# for the characters split at once when the items are words.
_BLOCK = 4096
_WORDS_SPAN = 256 * 1024
_SPACE_RUN = 4096  # whitespace looked through at once, around a word
# Segments one reference may hold (it is pickled inline in every snapshot).
MAX_SEGMENTS = 64


def split_reference(items, slices):
    """The segments ((doc, start, end, sep), ...) whose splits, one after
    another, make `items` (a list of str), or None. `slices` is the
    context's rlm_slices.ContextSlices."""
    docs, size = slices.docs, len(items)
    segments, at, last = [], 0, None
    while at < size:
        if len(segments) == MAX_SEGMENTS:
            return None
        found = _segment(items, at, slices, docs, last)
        if found is None:
            return None
        segments.append(found[0])
        at += found[1]
        last = found[0]
    return tuple(segments)


def _segment(items, at, slices, docs, last):
    """((doc, start, end, sep), count): the longest run of items from
    items[at] that one slice's split makes, or None. `last` is the segment
    before (its separator is tried first)."""
    words = last is not None and last[3] is None
    sep = None if last is None else (last[3] if type(last[3]) is str else "")
    for doc, pos, k in _places(items, at, slices, docs, None if last is None else last[0]):
        text = docs[doc]
        found = None if words else _by_separator(items, at, k, doc, text, pos, sep)
        if found is None or at + found[1] < len(items):  # its first block tells a list of no words fast
            by_words = _by_words(items, at, k, doc, text, pos)
            if by_words is not None and (found is None or by_words[1] > found[1]):
                found = by_words
        if found is not None:
            return found
    return None


def _by_separator(items, at, k, doc, text, pos, sep):
    """The segment of a separator (or a width) that places items[k] at text[pos], or None."""
    for guess in _separators(items, k, text, pos + len(items[k]), sep):
        start = pos - sum(map(len, items[at:k])) - (k - at) * len(guess)
        if start < 0 or not text.startswith(items[at], start):
            continue
        count, end = _run(items, at, text, start, guess)
        if count <= k - at:
            continue
        if guess and _splits_back(items, at, at + count, guess):
            return (doc, start, end, guess), count
        if not guess and _cut_evenly(items, at, at + count):
            return (doc, start, end, len(items[at])), count
    return None


def _by_words(items, at, k, doc, text, pos):
    """The segment of `str.split()` (no argument) that places items[k] at
    text[pos], or None: items[at:k] before it, each ending before a run of
    whitespace, then every item checked by splitting the text itself (from
    a document's start too: the whitespace a split skips may start it)."""
    for item in reversed(items[at:k]):  # at most _FIRST
        gap = _end_of_word(text, pos)
        if gap == pos or gap < len(item) or not text.startswith(item, gap - len(item)):
            return None
        pos = gap - len(item)
    count, end = _run_words(items, at, text, pos)
    return ((doc, pos, end, None), count) if count > k - at else None


def _places(items, at, slices, docs, last_doc):
    """(doc, pos, k): items[k] may be docs[doc][pos:...], for k from `at`.
    First the start of the document after the last segment's (the lines of
    the documents, one after another), or the context's start, or documents
    that start as the items joined by a usual separator do; then the
    longest of the next few items, looked up."""
    if last_doc is not None:
        doc = last_doc + 1
        while doc < len(docs):
            yield doc, 0, at
            if docs[doc] and not docs[doc].isspace():
                break
            doc += 1  # a document with no words: the next one's may follow
    else:
        if docs and (docs[0].startswith(items[at]) or docs[0][:1].isspace()):
            yield 0, 0, at
        if len(docs) > 1:  # a document's lines: looked up by how it starts, joined as usual
            tried = {0}
            for sep in _USUAL_SEPARATORS:
                for doc in slices.documents_starting(sep.join(items[at:at + _CHAIN]), _STARTS):
                    if doc not in tried and docs[doc].startswith(items[at]):
                        tried.add(doc)
                        yield doc, 0, at
    head = range(at, min(at + _FIRST, len(items) - 1))  # the placed item needs one after it
    for k in sorted(head, key=lambda i: -len(items[i]))[:LOOKUPS_PER_SEGMENT]:
        if len(items[k]) < _MIN_FIND:
            return
        place = slices.find(items[k])
        if place is not None:
            yield place[0], place[1], k


def _separators(items, k, text, after, known):
    """Separators that may follow items[k], which ends at text[after]: the
    last segment's first (also for a last line that ends its document), then
    what the next items fit, shortest first: none at all for chunks cut one
    after another."""
    if known is not None and _chain(items, k, text, after, known):
        yield known
        return
    for width in range(0 if items[k] else 1, _MAX_SEP + 1):
        guess = text[after:after + width]
        if len(guess) < width:
            return
        if guess != known and _chain(items, k, text, after, guess):
            yield guess


def _chain(items, k, text, pos, sep):
    """Whether the few items after items[k] (which ends at text[pos]) follow
    it, each after `sep`, or as many as there are before the text ends (the
    rest of the list is then another document's)."""
    for item in items[k + 1:k + 1 + _CHAIN]:
        if pos == len(text):
            return True
        if not text.startswith(sep, pos) or not text.startswith(item, pos + len(sep)):
            return False
        pos += len(sep) + len(item)
    return True


def _run(items, at, text, start, sep):
    """(count, end): how many items from items[at] are text[start:] joined
    by `sep`, and where the last of them ends. Compared in place, in blocks
    that grow from _CHAIN items to _BLOCK (a list that parts from the text
    early costs little); a block that differs is halved to its last match."""
    count, pos, size, step = 0, start, len(items), _CHAIN
    while at + count < size:
        if count and not text.startswith(sep, pos):
            break
        begin = pos + (len(sep) if count else 0)
        block = items[at + count:at + count + step]
        joined = sep.join(block)
        if text.startswith(joined, begin):
            count, pos, step = count + len(block), begin + len(joined), min(2 * step, _BLOCK)
            continue
        # block[:0] matches, the whole block does not
        lo = _longest_match(len(block) - 1, lambda n: text.startswith(sep.join(block[:n]), begin))
        if lo:
            count, pos = count + lo, begin + len(sep.join(block[:lo]))
        break
    return count, pos


def _run_words(items, at, text, start):
    """(count, end): how many items from items[at] are the first words of
    text[start:] as `str.split()` cuts them, and where the last of them
    ends. The text is split in C a piece at a time (growing from _CHAIN
    words' worth to _WORDS_SPAN characters, so a list of no words costs
    little), its last word left to the next piece unless whitespace ends it."""
    count, pos, end, size = 0, start, start, len(items)
    span = sum(map(len, items[at:at + _CHAIN])) + 2 * _CHAIN + _MAX_SEP
    while at + count < size and pos < len(text):
        piece = text[pos:pos + span]
        words = piece.split()
        whole = pos + len(piece) == len(text) or piece[-1].isspace()
        if words and not whole:
            cut = len(piece) - len(words.pop())  # where the unfinished word starts
        else:
            cut = len(piece)
        if not words:
            if pos + len(piece) == len(text):
                break
            if whole:
                pos += len(piece)  # whitespace only
            span = min(2 * span, _WORDS_SPAN) if whole else 2 * span  # or an unfinished long word
            continue
        block = items[at + count:at + count + len(words)]
        if block == words:
            count += len(words)
            pos += cut
            end = _end_of_word(text, pos)
            span = min(2 * span, _WORDS_SPAN)
            continue
        lo = _longest_match(min(len(block), len(words)), lambda n: block[:n] == words[:n])
        if lo:
            rest = piece.split(None, lo)
            end = _end_of_word(text, pos + (len(piece) - len(rest[lo]) if len(rest) > lo else len(piece)))
            count += lo
        break
    return count, end


def _longest_match(most, matches):
    """The largest n <= `most` for which matches(n) holds, by halving:
    matches(0) holds, and past the first n that fails none does (a prefix)."""
    lo, hi = 0, most
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if matches(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _end_of_word(text, pos):
    """Where the word ends that the whitespace before text[pos] follows (at
    most _SPACE_RUN back: past a longer run, a place inside it, which ends
    a slice with the same words)."""
    tail = text[max(pos - _SPACE_RUN, 0):pos]
    return pos - (len(tail) - len(tail.rstrip()))


def _cut_evenly(items, begin, end):
    """Whether items[begin:end], one after another in the text, are chunks
    cut every len(items[begin]) characters (the last may be shorter)."""
    width = len(items[begin])
    return set(map(len, items[begin:end - 1])) <= {width} and 0 < len(items[end - 1]) <= width


def _splits_back(items, begin, end, sep):
    """Whether splitting items[begin:end] joined by `sep` cuts exactly
    between them: `sep` inside no item, nor starting in one and running on
    into the separator after it (possible when the separator's end repeats
    its start, as "\\n\\n" does; checked as the item ending with that
    start; not for the last item, which ends the slice). Then the text's
    split gives these items back."""
    run = items[begin:end]
    if any(map(contains, run, repeat(sep))):
        return False
    width = len(sep)
    for shift in range(1, width):
        if sep[shift:] == sep[:width - shift] and any(map(str.endswith, run[:-1], repeat(sep[:shift]))):
            return False
    return True
