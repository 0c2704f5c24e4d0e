"""The picklers of a snapshot, wired to its references (rlm_snapshot.References:
`persistent_id`, `persistent_load`, `begin_dump`).

A state of plain data (no function or class defined in a cell) is pickled
with the C pickler alone: importing `pickle` and cloudpickle in this guest
took ~150 ms, the whole cost of a REPL's first snapshot (3 ms after it).
cloudpickle is imported only for a state that needs it.
"""

import _pickle  # the C pickler alone: `pickle` itself is not needed
import io
import sys

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


class _ByValueOnly(Exception):
    """The state holds a function, class or module only cloudpickle can save."""


def _by_name(obj):
    """True when the C pickler saves this function or class correctly: by an
    importable name that leads back to this very object (not one defined in
    a cell, a lambda or a local)."""
    module = getattr(obj, "__module__", None)
    name = getattr(obj, "__qualname__", None)
    if not module or not name or module == "__main__" or "<" in name:
        return False
    target = sys.modules.get(module)
    for part in name.split("."):
        target = getattr(target, part, None)
    return target is obj


_FUNCTION = type(_by_name)
_MODULE = type(sys)


def dumps(refs, value):
    """`value` pickled, each object first offered to `refs.persistent_id`:
    by the C pickler when it can, else by cloudpickle. Each try is a dump of
    its own for `refs` (`begin_dump`)."""
    try:  # plain data: the C pickler alone
        refs.begin_dump()
        return dump(_pickle.Pickler, refs, value, reduce=_by_name_only)
    except Exception:  # a cell's function or class, a module...: cloudpickle's turn
        refs.begin_dump()
        return dump(_cloudpickle().Pickler, refs, value)


def _by_name_only(obj):
    """The C pickler's `reducer_override`: functions, classes and modules go
    by name, or the dump stops for cloudpickle to do it."""
    if isinstance(obj, (type, _FUNCTION)) and not _by_name(obj):
        raise _ByValueOnly
    if isinstance(obj, _MODULE):  # `import re` in a cell: by name, as cloudpickle does
        if sys.modules.get(obj.__name__) is not obj:
            raise _ByValueOnly
        # Imported here: `importlib` costs ~2.4 ms of a REPL's first snapshot.
        from importlib import import_module

        return import_module, (obj.__name__,)
    return NotImplemented


def dump(base, refs, value, reduce=None):
    """`value` pickled by `base` (a Pickler class) with `refs.persistent_id`."""

    class Pickler(base):
        def persistent_id(self, obj):
            return refs.persistent_id(obj)

    if reduce is not None:
        Pickler.reducer_override = staticmethod(reduce)
    buffer = io.BytesIO()
    pickler = Pickler(buffer, protocol=5)
    if hasattr(pickler, "globals_ref"):  # cloudpickle's
        # Functions whose __globals__ is the REPL namespace share this dict; it
        # pickles as a persistent reference to the live namespace.
        pickler.globals_ref[id(refs.user_globals)] = refs.globals_marker
    try:
        pickler.dump(value)
        return buffer.getvalue()
    finally:
        # The class is in a reference cycle (freed only by the cyclic GC): it
        # must not keep the values alive through its closure or the memo.
        pickler.clear_memo()
        refs = None


def unpickle(refs, data, records, loaded):
    """One pickle: the state, or a container's items (`loaded`: pid -> entry, shared)."""

    class Unpickler(_pickle.Unpickler):
        def persistent_load(self, pid):
            return refs.persistent_load(pid, records, loaded)

        def find_class(self, module, name):
            # cloudpickle is imported only if the snapshot holds functions or
            # classes defined in cells (plain data restores without it).
            if module.split(".")[0] == "cloudpickle":
                _cloudpickle()
            return super().find_class(module, name)

    try:
        return Unpickler(io.BytesIO(data)).load()
    finally:
        refs = records = loaded = None  # see dump: the class outlives this call
