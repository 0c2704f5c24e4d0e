"""What the host already holds of a REPL's large values, and their names.

A snapshot sends each large value to the host once, as a record named by
`record_name`; `Stored` remembers which values were sent (or restored), by
identity, so an unchanged value costs one dict lookup per snapshot
(rlm_snapshot). `context_item_ids` maps a list context's documents, which
are named by index instead.
"""


def record_name(obj, data):
    """Name of a record: crc32 of its bytes, the object's own hash (32 bits
    on wasm32; seeded once per boot image, so the guests started from one
    share the seed) and the length, as 40 hex digits. sha256
    runs at ~15 MB/s in this guest, crc32 and hash() at ~250-500 MB/s. Names
    are only compared within one run's snapshots (the host keeps records
    under the run's prefix), so accidental collisions are what matters:
    64 bits plus the length. A run's own code could craft a collision (it
    computes hash() itself), which would only confuse that run's own state."""
    from zlib import crc32

    return "%08x%08x%024x" % (crc32(data), hash(obj) & 0xFFFFFFFF, len(data))


class Stored:
    """Large values the host already holds: id -> (value, reference).

    The value itself is held, so its id cannot be reused by another object
    (chunks cut in a loop often land at a freed chunk's address). Each
    snapshot replaces the table with the values it saw, so a value the model
    dropped is kept only until the end of the cell that dropped it (a cell
    that runs out of memory empties the table)."""

    def __init__(self):
        self.by_id = {}  # id -> (value, pid), or a container's entry (see References._container)
        # Containers are named per object, not per content: two equal lists
        # must come back as two lists. Past every number restored.
        self.next_container = 0
        # rlm_items.ItemLists: the lists cut from the context the last
        # snapshot held, whose items later values may be made of.
        self.item_lists = None

    def get(self, obj):
        entry = self.by_id.get(id(obj))
        return entry[1] if entry is not None and entry[0] is obj else None


def context_item_ids(docs):
    """{id(doc): (("context_item", index), doc)} for a list context's documents
    (the first index of a repeated one). The REPL keeps it while the documents
    stay the same: over 20,000 of them, building it was most of a snapshot."""
    ids = {}
    for index, doc in enumerate(docs):
        ids.setdefault(id(doc), (("context_item", index), doc))
    return ids
