"""The references a snapshot holds in place of values cut from the context
(guest side; rlm_slices.ContextSlices.reference finds them):

- ("c", doc, start, end): docs[doc][start:end], a chunk or a window;
- ("x", before, doc, start, end, after): that slice between two texts (a
  prompt around a chunk or a document);
- ("m", texts, ((doc, start, end), ...)): slices joined, texts[0] before the
  first, texts[i] between the i-th and the next, the last text after them
  all (documents joined by a separator, numbered or wrapped, in any order);
- ("s", ((doc, start, end, sep), ...), number): a list, the items of
  docs[doc][start:end].split(sep) for each segment in turn (the context's
  lines; rlm_splits finds them), or, where `sep` is a width, that slice in
  chunks of `sep` characters, or, where it is None, the slice's words
  (`str.split()`: since format 2). `number` tells two equal lists apart, as a
  container record's does.

Besides these, a snapshot names the values it sends as records ("r"), the
containers of atoms it sends as records ("k", rlm_snapshot) and the lists of
items of a split and their joins ("i", "q", rlm_items).

A snapshot is guest code's output, restored into another guest: `rebuild`
checks every reference before it makes the value.
"""

from collections import Counter, OrderedDict, defaultdict

if __package__:  # the host imports this file as part of sandbox_wasm (tests)
    from . import rlm_items
else:  # the guest imports its modules by their own names
    import rlm_items

# What this code's snapshots can hold, as a number: raised whenever code
# before it could not read them (a new kind of reference, a changed layout).
# The host writes it beside each snapshot; a worker given one of a higher
# number refuses it, to be retried on a newer worker, where it would have
# found a kind it does not know and started the REPL empty, the state lost.
# Snapshots written before the number existed are format 0. 1: the kinds
# below; 2: a split's words (a segment whose separator is None); 3: the
# dicts of `collections` as container records (CONTAINER_NAMES); 4: sets
# and frozensets too.
FORMAT = 4

# Pids whose second item names a record the host holds: a value's bytes ("r"),
# or the reference to the many documents it joins ("j").
RECORDED = ("r", "j")
# Pids that name a value made of the context ("j" through its record).
OF_CONTEXT = ("c", "x", "m", "j")
# Pids of the values a snapshot pickles by reference: records, containers,
# splits, items of a split and their joins, and the above.
BY_REFERENCE = ("r", "k", "s", "i", "q") + OF_CONTEXT


# The types a container record ("k") holds, by the name its pid gives them:
# a list, a dict, (format 3) a Counter, an OrderedDict or a defaultdict
# whose factory is one of these builtins (or None), (format 4) a set or a
# frozenset.
_FACTORIES = {factory.__name__: factory for factory in (int, float, str, bool, list, dict, set, tuple)}
CONTAINER_NAMES = ("l", "d", "c", "o", "f:", "set", "frozenset") + tuple("f:" + name for name in _FACTORIES)
DICT_TYPES = frozenset((dict, Counter, OrderedDict, defaultdict))
CONTAINER_TYPES = DICT_TYPES | {list, set, frozenset}


def container_name(obj):
    """The name a "k" pid gives the type of `obj` (one of CONTAINER_TYPES),
    or None when its pickle must say more (attributes of its own, another
    factory): it is then pickled inline."""
    kind = type(obj)
    if kind is list:
        return "l"
    if kind is dict:
        return "d"
    if kind is set or kind is frozenset:
        return kind.__name__
    if getattr(obj, "__dict__", None):
        return None
    if kind is Counter:
        return "c"
    if kind is OrderedDict:
        return "o"
    factory = obj.default_factory
    if factory is None:
        return "f:"
    name = getattr(factory, "__name__", None)
    return "f:" + name if _FACTORIES.get(name) is factory else None


def make_container(name, shape):
    """The container a "k" record's shape (its items; a dict's keys and
    values) makes as type `name`: ValueError when it makes none."""
    if name in ("l", "set", "frozenset"):
        if type(shape) is not tuple:
            raise ValueError("not a saved list or set")
        return list(shape) if name == "l" else set(shape) if name == "set" else frozenset(shape)
    if not (type(shape) is tuple and len(shape) == 2 and type(shape[0]) is tuple and type(shape[1]) is tuple
            and len(shape[0]) == len(shape[1])):
        raise ValueError("not a saved dict")
    pairs = zip(*shape)
    if name == "d":
        return dict(pairs)
    if name == "o":
        return OrderedDict(pairs)
    if name == "c":
        value = Counter()
    elif name in CONTAINER_NAMES and name.startswith("f:"):
        value = defaultdict(_FACTORIES.get(name[2:]))
    else:
        raise ValueError("unknown kind of container %r" % (name,))
    dict.update(value, pairs)  # as saved: Counter.update would add to the counts
    return value


def records_needed(pid):
    """The names of the records a reference needs the host to hold."""
    if pid[0] in RECORDED or pid[0] == "k":
        return (pid[1],)
    return rlm_items.records_of(pid)


def rebuild(reference, docs):
    """The value `reference` names, checked against `docs` (the context's
    documents): ValueError when it does not fit them."""
    kind = reference[0]
    if kind == "c" and len(reference) == 4:
        texts, pieces = ("", ""), (reference[1:],)
    elif kind == "x" and len(reference) == 6:
        texts, pieces = (reference[1], reference[5]), (reference[2:5],)
    elif kind == "m" and len(reference) == 3 and type(reference[1]) is tuple and type(reference[2]) is tuple:
        texts, pieces = reference[1], reference[2]
    else:
        raise ValueError("malformed slice reference %r" % (reference[:3],))
    if len(texts) != len(pieces) + 1 or not all(type(text) is str for text in texts):
        raise ValueError("malformed slice reference %r" % (reference[:3],))
    parts = [texts[0]]
    for piece, text in zip(pieces, texts[1:]):
        if not (type(piece) is tuple and len(piece) == 3 and all(type(n) is int for n in piece)
                and 0 <= piece[0] < len(docs) and 0 <= piece[1] <= piece[2] <= len(docs[piece[0]])):
            raise ValueError("slice %r is outside the context" % (piece,))
        parts.append(docs[piece[0]][piece[1]:piece[2]])
        parts.append(text)
    return "".join(parts)


def rebuild_split(reference, docs):
    """The list an "s" reference names, checked against `docs`: ValueError
    when it does not fit them."""
    if not (len(reference) == 3 and type(reference[1]) is tuple and type(reference[2]) is int):
        raise ValueError("malformed split reference %r" % (reference[:1],))
    items = []
    for segment in reference[1]:
        if not (type(segment) is tuple and len(segment) == 4 and all(type(n) is int for n in segment[:3])
                and (segment[3] is None or (type(segment[3]) is str or type(segment[3]) is int) and segment[3])):
            raise ValueError("malformed split segment %r" % (segment,))
        doc, start, end, sep = segment
        if not (0 <= doc < len(docs) and 0 <= start <= end <= len(docs[doc])):
            raise ValueError("split segment %r is outside the context" % (segment[:3],))
        text = docs[doc][start:end]
        if sep is None:
            items += text.split()
        elif type(sep) is str:
            items += text.split(sep)
        elif sep > 0 and text:
            items += [text[i:i + sep] for i in range(0, len(text), sep)]
        else:
            raise ValueError("malformed split segment %r" % (segment,))
    return items
