"""Restoring a snapshot's references (guest side): the object each
persistent id names, made again from the context, the records the host
supplies, or both, and checked first (rlm_snapshot.References names them
when it pickles; rlm_references, rlm_items say what each names).
"""

import _pickle

import rlm_items
import rlm_pickling
import rlm_references


def persistent_load(refs, pid, records, loaded):
    """The object a snapshot's persistent id names (rlm_pickling.unpickle)."""
    if isinstance(pid, tuple) and pid and pid[0] in rlm_references.BY_REFERENCE:
        entry = _entry(refs, pid, records, loaded)
        # At every use, not only the first: a container's entry must list
        # each large value it holds, including those loaded before it.
        if len(entry) == 5:
            refs.seen.update(entry[4])
        refs.seen[id(entry[0])] = entry
        return entry[0]
    if pid == "globals":
        return refs.user_globals
    if pid == "context" or (isinstance(pid, tuple) and pid[0] == "context_item"):
        _need_context(refs)
        return refs.context if pid == "context" else refs.context[pid[1]]
    if isinstance(pid, tuple) and pid[0] == "protected" and pid[1] in refs.protected:
        return refs.protected[pid[1]]
    raise _pickle.UnpicklingError("unknown persistent reference %r" % (pid,))


def _entry(refs, pid, records, loaded):
    """The table entry of the value `pid` names, made once per restore."""
    entry = loaded.get(pid)
    if entry is None:
        entry = loaded[pid] = _load_large(refs, pid, records, loaded)
    return entry


def _load_large(refs, pid, records, loaded):
    """The table entry of the value `pid` names."""
    if pid[0] == "s":
        _need_context(refs)
        try:
            value = rlm_references.rebuild_split(pid, refs.docs)
        except ValueError as exc:
            raise _pickle.UnpicklingError(str(exc)) from None
        return _list_entry(refs, value, pid, pid[2])
    if pid[0] in ("i", "q"):
        return _load_items(refs, pid, records, loaded)
    if pid[0] == "k":
        if len(pid) != 4 or pid[2] not in rlm_references.CONTAINER_NAMES or type(pid[3]) is not int:
            raise _pickle.UnpicklingError("malformed container reference %r" % (pid,))
        refs.stored.next_container = max(refs.stored.next_container, pid[3] + 1)
        data = _record(pid[1], records)
        outer_seen = refs.seen
        refs.seen = {}
        try:
            shape = rlm_pickling.unpickle(refs, data, records, loaded)
            nested_seen = refs.seen
        finally:
            refs.seen = outer_seen
        try:
            value = rlm_references.make_container(pid[2], shape)
        except (ValueError, TypeError) as exc:
            raise _pickle.UnpicklingError("record %s is not a saved %s: %s" % (pid[1], pid[2], exc)) from None
        if pid[2] in ("set", "frozenset"):
            shape = tuple(value)  # the order the next snapshot finds it in
        nested_used = {name for _, p, *_ in nested_seen.values() for name in rlm_references.records_needed(p)}
        return (value, pid, shape, nested_used, nested_seen)
    return (_load_value(refs, pid, records), pid)


def _load_value(refs, pid, records):
    if pid[0] in rlm_references.OF_CONTEXT:
        _need_context(refs)
        reference = pid
        if pid[0] == "j":
            if len(pid) != 2:
                raise _pickle.UnpicklingError("malformed joined reference %r" % (pid,))
            data = _record(pid[1], records)
            try:
                texts, pieces = _pickle.loads(data)
            except Exception as exc:
                raise _pickle.UnpicklingError(
                    "record %s is not a joined reference: %s" % (pid[1], reason(exc))) from None
            reference = ("m", texts, pieces)
        try:
            return rlm_references.rebuild(reference, refs.docs)
        except ValueError as exc:
            raise _pickle.UnpicklingError(str(exc)) from None
    data = _record(pid[1], records)
    return str(data, "utf-8", "surrogatepass") if pid[2] == "s" else bytes(data)


def _load_items(refs, pid, records, loaded):
    """The entry of an "i" list or a "q" str, made from the list its base
    reference names (made once, shared with every value of it)."""
    if rlm_items.depth(pid) > rlm_items.MAX_DEPTH or type(pid[1]) is not tuple or pid[1][:1] not in (("s",), ("i",)):
        raise _pickle.UnpicklingError("malformed item reference %r" % (pid[:1],))
    if pid[0] == "i" and not (len(pid) == 4 and type(pid[2]) is str and type(pid[3]) is int):
        raise _pickle.UnpicklingError("malformed item list reference")
    base = _entry(refs, pid[1], records, loaded)
    data = _record(pid[2], records) if pid[0] == "i" else b""
    try:
        value = rlm_items.rebuild(pid, base[0], data)
    except ValueError as exc:
        raise _pickle.UnpicklingError(str(exc)) from None
    return (value, pid) if pid[0] == "q" else _list_entry(refs, value, pid, pid[3])


def _list_entry(refs, value, pid, number):
    """The entry of a list made from the context ("s") or of a split's items
    ("i"): no records of its own; its items, once, are both its shape and a
    base later values may be made of."""
    refs.stored.next_container = max(refs.stored.next_container, number + 1)
    shape = tuple(value)
    refs.items.add(pid, shape)
    return (value, pid, shape, set(), {})


def _need_context(refs):
    if not refs.context_loaded:
        raise _pickle.UnpicklingError("the snapshot refers to `context`; load the context before restoring")


def _record(name, records):
    data = records.get(name)
    if data is None:
        raise _pickle.UnpicklingError("the snapshot needs value record %s, which was not "
                                      "supplied" % name)
    return data


def reason(exc):
    text = "%s: %s" % (type(exc).__name__, exc)
    return text if len(text) <= 300 else text[:300] + "..."
