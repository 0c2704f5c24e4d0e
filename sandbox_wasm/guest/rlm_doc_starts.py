"""The context's documents filed by how they start (guest side), so that a
value holding a whole document, or beginning where a document begins, finds
it by one dictionary lookup instead of a scan of the context.

Filed under hashes, not texts: a context of a million short documents keeps
its tables in a few tens of MB. A collision only adds a candidate; callers
compare every candidate with the value, length included.
"""

START_KEY = 32


class DocumentStarts:
    """Documents (a tuple of str) by a hash of their first START_KEY
    characters, and by one of their length and first and last characters
    (documents often share a header, or a length)."""

    def __init__(self, docs):
        self.wholes, self.starts = {}, {}
        for doc, text in enumerate(docs):
            _add(self.wholes, whole_key(text, 0, len(text)), doc)
            _add(self.starts, hash(text[:START_KEY]), doc)

    def whole(self, text, begin, end, most):
        """At most `most` documents that may be text[begin:end]."""
        return _candidates(self.wholes, whole_key(text, begin, end), most)

    def starting(self, text, pos, most):
        """At most `most` documents that may begin as text[pos:] does."""
        return _candidates(self.starts, hash(text[pos:pos + START_KEY]), most)


def whole_key(text, begin, end):
    """What tells documents apart cheaply, for text[begin:end] as a whole
    document: a hash of its length and its first and last characters."""
    return hash((end - begin, text[begin:min(begin + START_KEY, end)], text[max(end - START_KEY, begin):end]))


def _add(table, key, doc):
    known = table.get(key)
    if known is None:
        table[key] = doc
    elif type(known) is list:
        known.append(doc)
    else:
        table[key] = [known, doc]


def _candidates(table, key, most):
    known = table.get(key)
    if known is None:
        return ()
    return known[:most] if type(known) is list else (known,)
