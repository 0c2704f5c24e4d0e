"""Snapshot and restore of the REPL's user globals with cloudpickle.

Three kinds of objects are stored by reference (pickle persistent ids), not
by value: the `context` (and each of its documents), the protected API
functions, and the REPL globals dict itself. The last one is what makes a
function defined in a cell, once restored, read the *live* globals: cloudpickle
gives each pickled function a reconstructed globals dict, and we seed that dict
with a marker that unpickles as the REPL's own namespace.
"""

import _pickle  # the C module: `pickle` itself (and its `re` import) is not needed to load
import io
import sys

MAGIC = b"RLMSNAP1"
_CLOUDPICKLE_DIR = "/rlm/cloudpickle"


def _cloudpickle():
    module = sys.modules.get("cloudpickle")
    if module is None:
        try:  # precompiled copy in /rlm/pyc, when the host built one
            import cloudpickle as module

            return module
        except ImportError:
            pass
        # The package dir is preopened read-only; load it by location because
        # its parent directory is not visible to the guest.
        import importlib.util

        spec = importlib.util.spec_from_file_location(
            "cloudpickle", _CLOUDPICKLE_DIR + "/__init__.py",
            submodule_search_locations=[_CLOUDPICKLE_DIR])
        module = importlib.util.module_from_spec(spec)
        sys.modules["cloudpickle"] = module
        spec.loader.exec_module(module)
    return module


class References:
    """Objects pickled by reference, and how to find them again."""

    def __init__(self, user_globals, protected, context, context_loaded):
        self.user_globals = user_globals
        self.protected = protected
        self.context = context
        self.context_loaded = context_loaded
        self.globals_marker = {"__name__": "__main__", "__rlm_live_globals__": True}
        by_id = {id(self.globals_marker): ("globals", self.globals_marker)}
        for name, obj in protected.items():
            by_id[id(obj)] = (("protected", name), obj)
        if context_loaded:
            if isinstance(context, list):
                for index, doc in enumerate(context):
                    by_id.setdefault(id(doc), (("context_item", index), doc))
            by_id[id(context)] = ("context", context)
        self.by_id = by_id

    def persistent_id(self, obj):
        entry = self.by_id.get(id(obj))
        if entry is not None and entry[1] is obj:
            return entry[0]
        return None

    def persistent_load(self, pid):
        if pid == "globals":
            return self.user_globals
        if pid == "context" or (isinstance(pid, tuple) and pid[0] == "context_item"):
            if not self.context_loaded:
                raise _pickle.UnpicklingError(
                    "the snapshot refers to `context`; load the context before restoring")
            return self.context if pid == "context" else self.context[pid[1]]
        if isinstance(pid, tuple) and pid[0] == "protected" and pid[1] in self.protected:
            return self.protected[pid[1]]
        raise _pickle.UnpicklingError("unknown persistent reference %r" % (pid,))


def _dumps(refs, value):
    cloudpickle = _cloudpickle()

    class Pickler(cloudpickle.Pickler):
        def persistent_id(self, obj):
            return refs.persistent_id(obj)

    buffer = io.BytesIO()
    pickler = Pickler(buffer, protocol=5)
    # Functions whose __globals__ is the REPL namespace share this dict; it
    # pickles as a persistent reference to the live namespace.
    pickler.globals_ref[id(refs.user_globals)] = refs.globals_marker
    pickler.dump(value)
    return buffer.getvalue()


def _reason(exc):
    text = "%s: %s" % (type(exc).__name__, exc)
    return text if len(text) <= 300 else text[:300] + "..."


def take(refs, names):
    """Pickle the named globals. Returns data, saved names and {unsaved: reason}."""
    state = {name: refs.user_globals[name] for name in names}
    unsaved = {}
    try:
        data = _dumps(refs, state)
    except Exception:
        # Find the culprits one by one, then save everything else together so
        # shared references between the saved values are kept.
        for name, value in state.items():
            try:
                _dumps(refs, value)
            except Exception as exc:
                unsaved[name] = _reason(exc)
        for name in unsaved:
            del state[name]
        try:
            data = _dumps(refs, state)
        except Exception as exc:  # a failure only visible in combination
            for name in list(state):
                unsaved[name] = "could not be saved together with the others: " + _reason(exc)
            state = {}
            data = _dumps(refs, state)
    return {"data": MAGIC + data, "saved": sorted(state), "unsaved": unsaved}


def load(refs, data):
    """Unpickle snapshot bytes; returns the dict of globals to install."""
    if not data.startswith(MAGIC):
        raise ValueError("not a REPL snapshot (bad header)")

    class Unpickler(_pickle.Unpickler):
        def persistent_load(self, pid):
            return refs.persistent_load(pid)

        def find_class(self, module, name):
            # cloudpickle is imported only if the snapshot holds functions or
            # classes defined in cells (plain data restores without it).
            if module.split(".")[0] == "cloudpickle":
                _cloudpickle()
            return super().find_class(module, name)

    return Unpickler(io.BytesIO(memoryview(data)[len(MAGIC):])).load()
