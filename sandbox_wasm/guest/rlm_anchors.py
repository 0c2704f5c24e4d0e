"""The anchor index of a context document: where a value cut from it can
start (built on the host, natively fast, and sent to the guest packed).

Every occurrence of one rarely used character, or of a short prefix followed
by one of a few characters (picked from a strided sample so occurrences are
~ANCHOR_GAP apart), keyed by the crc32 of the ANCHOR_LEN characters that
start there. Shared by the host (`sandbox_wasm._context_anchors` builds and
packs it) and the guest (rlm_slices unpacks and looks values up in it).
"""

ANCHOR_GAP = 2048
ANCHOR_LEN = 64
MAX_SAME = 8
# Documents shorter than this are not indexed (a slice of them is small anyway).
MIN_INDEXED_DOC = 64 * 1024
_SAMPLE_CHARS = 256 * 1024
_SAMPLE_BLOCKS = 16
_MAX_ANCHOR_LEN = 4
_BRANCHES = 16


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
        key = window_key(text, pos)
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
    stop = min(len(text), end + len(prefix) + 1)
    return [match.start() for match in _compiled(prefix, followers).finditer(text, 0, stop)
            if match.start() < end]


def _compiled(prefix, followers):
    """`prefix` followed by one of `followers` (anything, when none), as a regex."""
    import re

    pattern = re.escape(prefix)
    if followers:
        pattern += "[" + "".join(re.escape(char) for char in followers) + "]"
    return re.compile(pattern)


def first_anchor(value, anchor, begin=0):
    """Where the first anchor at or after `begin` starts in `value`, or -1."""
    prefix, followers = anchor
    if not prefix and not followers:
        return -1
    found = _search(prefix, followers)(value, begin)
    return found.start() if found is not None else -1


def _search(prefix, followers):
    """The compiled search for an anchor, made once per anchor: one regex
    search in C per value, where a loop over the occurrences of a one-letter
    prefix ran ~70 `find` calls for a 26 KB value (most of a snapshot's time
    over values the context does not hold)."""
    key = (prefix, "".join(followers))
    search = _SEARCHES.get(key)
    if search is None:
        search = _SEARCHES[key] = _compiled(prefix, followers).search
    return search


_SEARCHES = {}


def window_key(text, pos):
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
