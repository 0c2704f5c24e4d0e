"""Snapshots, restore, the compiled-module cache and the runtime pin (real wasmtime)."""

from __future__ import annotations

import pytest

from sandbox_wasm import ReplSession, SandboxError, SandboxLimits
from sandbox_wasm import _runtime

LIMITS = SandboxLimits(cell_timeout_s=2.0, memory_bytes=512 * 1024**2, restore_min_s=2.0)


@pytest.fixture()
def context_files(tmp_path):
    docs = [tmp_path / "d0.txt", tmp_path / "d1.txt"]
    docs[0].write_text("alpha " * 200_000, encoding="utf-8")  # 1.2 MB
    docs[1].write_text("beta", encoding="utf-8")
    return docs


def fresh(context_files, **kwargs):
    session = ReplSession(limits=LIMITS, **kwargs).start()
    session.load_context(context_files, "list")
    return session


def test_round_trip_keeps_values_functions_classes_and_live_globals(context_files):
    with fresh(context_files) as first:
        first.run_cell(
            "import re, collections\n"
            "rate = 2\n"
            "def scaled(x):\n    return x * rate\n"
            "class Box:\n    def __init__(self, v):\n        self.v = v\n"
            "    def twice(self):\n        return scaled(self.v)\n"
            "box = Box(5)\n"
            "shared = [1, 2]\nalias = shared\n"
            "counts = collections.Counter('abca')\n"
            "pattern = re.compile('a+')\n"
            "first_doc = context[0]\n"
            "whole = context\n"
            "times = lambda y: y * rate\n"
        )
        snap = first.snapshot()
    assert snap.unsaved == [] and "scaled" in snap.saved and "context" not in snap.saved
    # The 1.2 MB document is referenced, not copied into the snapshot.
    assert len(snap.data) < 20_000
    with fresh(context_files) as second:
        second.restore(snap.data)
        result = second.run_cell(
            "rate = 10\n"  # a global rebound after restore must be seen by the functions
            "(scaled(3), box.twice(), times(2), alias is shared, counts['a'],\n"
            " pattern.match('aaab').group(), first_doc is context[0], whole is context)")
        assert result.error is None, result.traceback
        assert result.value_repr == "(30, 50, 20, True, 2, 'aaa', True, True)"


def test_documents_are_saved_by_index_snapshot_after_snapshot(context_files):
    with fresh(context_files) as first:
        first.run_cell("picked = [context[1], context[0]]")
        first.snapshot()
        first.run_cell("picked.append(context[1])")
        snap = first.snapshot()  # the REPL's map of the documents, kept from the first
    assert len(snap.data) < 20_000
    with fresh(context_files) as second:
        second.restore(snap.data)
        result = second.run_cell("[p is d for p, d in zip(picked, [context[1], context[0], context[1]])]")
        assert result.value_repr == "[True, True, True]"


def test_plain_data_is_saved_without_cloudpickle_and_a_cell_function_still_by_value(context_files):
    # Importing cloudpickle in the guest was the whole cost of a first snapshot
    # (~150 ms); data alone does not need it, a function defined in a cell does.
    with fresh(context_files) as first:
        first.run_cell("import json, sys\nrows = [{'n': i} for i in range(3)]\ndumps = json.dumps\n")
        first.snapshot()
        assert first.run_cell("'cloudpickle' in sys.modules").value_repr == "False"
        first.run_cell("table = {'double': lambda v: v * 2}")
        snap = first.snapshot()
        assert snap.unsaved == [] and "table" in snap.saved
        assert first.run_cell("'cloudpickle' in sys.modules").value_repr == "True"
    with fresh(context_files) as second:
        second.restore(snap.data)
        result = second.run_cell("(dumps(rows[2]), table['double'](21), dumps is json.dumps)")
        assert result.error is None, result.traceback
        assert result.value_repr == """('{"n": 2}', 42, True)"""


def test_functools_partial_made_in_a_cell_survives_a_snapshot(context_files):
    with fresh(context_files) as first:
        first.run_cell("import sys\nn = 3")
        first.snapshot()
        result = first.run_cell(
            "import functools\n"
            "twice = functools.partial(lambda a, b: a * b, 2)\n"
            "(functools.reduce(int.__add__, [1, 2, 3]), hasattr(functools, 'lru_cache'),\n"
            " functools.partial(int, base=2)('101'))")
        assert result.error is None, result.traceback
        assert result.value_repr == "(6, True, 5)"
        snap = first.snapshot()
        assert snap.unsaved == [] and "twice" in snap.saved
    with fresh(context_files) as second:
        second.restore(snap.data)
        result = second.run_cell("(twice(21), n, functools.partial is type(twice))")
        assert result.error is None, result.traceback
        assert result.value_repr == "(42, 3, True)"


def test_unsaved_names_are_listed_with_reasons(context_files):
    with fresh(context_files) as session:
        session.run_cell("gen = (i for i in range(3))\nkept = {'a': 1}\n"
                         "def uses_gen():\n    return next(gen)\n")
        snap = session.snapshot()
        assert snap.unsaved == ["gen", "uses_gen"]
        assert "generator" in snap.unsaved_reasons["gen"]
        assert snap.saved == ["kept"]
    with fresh(context_files) as other:
        other.restore(snap.data)
        assert other.run_cell("kept").value_repr == "{'a': 1}"
        assert other.run_cell("gen").error.startswith("NameError")


def test_restore_replaces_existing_user_state(context_files):
    with fresh(context_files) as session:
        session.run_cell("keep = 1")
        snap = session.snapshot()
        session.run_cell("keep = 2\nextra = 3")
        session.restore(snap.data)
        assert session.run_cell("keep").value_repr == "1"
        assert session.run_cell("extra").error.startswith("NameError")
        assert session.run_cell("callable(llm_query) and len(context)").value_repr == "2"


def test_restore_needs_the_context_loaded_first(context_files):
    with fresh(context_files) as session:
        session.run_cell("doc = context[1]")
        snap = session.snapshot()
    with ReplSession(limits=LIMITS) as bare:
        with pytest.raises(SandboxError, match="load the context"):
            bare.restore(snap.data)


def test_restore_rejects_foreign_bytes(context_files):
    with fresh(context_files) as session:
        with pytest.raises(SandboxError, match="not a REPL snapshot"):
            session.restore(b"definitely not a snapshot")
        assert session.run_cell("1 + 1").value_repr == "2"


def test_trap_restores_last_snapshot_automatically(context_files):
    limits = SandboxLimits(cell_timeout_s=1.0, memory_bytes=256 * 1024**2)
    with ReplSession(limits=limits).start() as session:
        session.load_context(context_files, "list")
        session.run_cell("def f():\n    return total\ntotal = 1")
        session.snapshot()
        session.run_cell("total = 2  # not in any snapshot")
        dead = session.run_cell("import os\nos._exit(7)")
        assert dead.restarted and dead.limit.kind == "trap" and "exit" in dead.limit.message
        assert "restored from the last snapshot" in dead.output
        assert session.run_cell("f(), len(context)").value_repr == "(1, 2)"


_POISON = {  # a value whose unpickling fails every time: its snapshot saves fine
    "raises": "class P:\n    def __reduce__(self):\n        return (int, ('not a number',))\n",
    "loops": "class P:\n    def __reduce__(self):\n        return (eval, ('[0 for _ in iter(int, 1)]',))\n",
    "exits": "import os\nclass P:\n    def __reduce__(self):\n        return (os._exit, (3,))\n",
}


@pytest.mark.parametrize("kind", sorted(_POISON))
def test_a_state_that_cannot_be_restored_starts_the_repl_empty_and_says_so(context_files, kind):
    # It failed every restore: the activity's retries, then every later cell
    # of the run (each restoring the same snapshot), so FINAL never ran.
    # Found by review.
    with fresh(context_files) as first:
        first.run_cell(_POISON[kind] + "p = P()\nkept = 42")
        poisoned = first.snapshot()
        dead = first.run_cell("import os\nos._exit(1)")  # a trap: the restart restores the last snapshot
        assert dead.restarted and "the saved state could not be restored" in dead.output, dead.output
        assert first.run_cell("len(context), 'kept' in globals()").value_repr == "(2, False)"
    with fresh(context_files) as other:  # another worker, or the cell's retry
        assert other.restore_or_start_empty(poisoned.data, poisoned.new_records) is False
        cell = other.run_cell("print(len(context))")
        assert cell.error is None and cell.output.startswith("2\n")
        assert "[sandbox: the saved state could not be restored" in cell.output, cell.output
        assert "earlier variables are gone" in cell.output
        assert "[sandbox:" not in other.run_cell("print(1)").output  # said once


def test_a_value_rebinding_protected_names_while_it_is_pickled_does_not_reach_the_next_cell(context_files):
    with fresh(context_files) as session:
        session.run_cell(
            "class Sneaky:\n"
            "    def __reduce__(self):\n"
            "        globals()['FINAL_VAR'] = lambda name: 'forged'\n"
            "        return (int, (1,))\n"
            "s = Sneaky()"
        )
        session.snapshot()
        cell = session.run_cell("FINAL_VAR.__module__")
        assert cell.value_repr != "'__main__'" and not cell.restored_names, (cell.value_repr, cell.restored_names)


def test_a_value_changing_the_context_while_it_is_pickled_does_not_reach_the_next_cell(context_files):
    with fresh(context_files) as session:
        session.run_cell(
            "class Sneaky:\n"
            "    def __reduce__(self):\n"
            "        context.reverse()\n"
            "        context.append('forged')\n"
            "        return (int, (1,))\n"
            "s = Sneaky()"
        )
        snap = session.snapshot()
        assert session.run_cell("len(context), context[1]").value_repr == "(2, 'beta')"
    with fresh(context_files) as other:  # and what was saved names the real documents
        other.restore(snap.data)
        assert other.run_cell("s, context[1]").value_repr == "(1, 'beta')"


def test_a_value_too_large_to_send_is_left_unsaved_alone(context_files):
    # One value past the host's frame limit failed the whole snapshot: every
    # variable of the cell was lost, the next cell restarting from the state
    # before it. Found by review.
    limits = SandboxLimits(cell_timeout_s=10.0, memory_bytes=512 * 1024**2, max_host_call_bytes=16 << 20)
    with ReplSession(limits=limits).start() as session:
        session.load_context(context_files, "list")
        session.run_cell("kept = 'x' * 5_000_000\nbig = b'y' * 20_000_000\nsmall = 1")
        snap = session.snapshot()
        assert snap.saved == ["kept", "small"], snap.saved
        assert snap.unsaved_reasons["big"].startswith("ValueError: too large to save: 25.0 MB of new values")
    with fresh(context_files) as other:
        other.restore(snap.data, snap.new_records)
        assert other.run_cell("len(kept), small, 'big' in globals()").value_repr == "(5000000, 1, False)"
    with ReplSession(limits=limits).start() as session:
        # What a value that cannot be saved held is not sent, so it does not count.
        session.run_cell("a = ['x' * 8_000_000, (i for i in [])]\nb = 'y' * 8_000_000")
        snap = session.snapshot()
        assert snap.saved == ["b"] and "generator" in snap.unsaved_reasons["a"], snap.unsaved_reasons


def test_compiled_module_is_cached_on_disk(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv(_runtime.CACHE_DIR_ENV, str(cache))
    assert _runtime.default_cache_dir() == cache
    first = _runtime.get_runtime()
    assert first.compiled_now and first.module_path.parent == cache
    assert first.module_path.name.endswith(f"{_runtime.cache_key()}.cwasm")
    assert first.bytecode_dir is not None and first.bytecode_dir.parent == cache
    assert (first.bytecode_dir / "rlm_driver.pyc").is_file()
    # Both published by rename; no temporary files are left behind.
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [first.module_path.name, first.bytecode_dir.name])
    _runtime.clear_memory_cache()
    second = _runtime.get_runtime(cache)
    assert not second.compiled_now
    with ReplSession(limits=LIMITS, cache_dir=cache) as session:
        assert session.run_cell("6 * 7").value_repr == "42"
        # The guest runs the precompiled driver from the read-only bytecode dir.
        assert session.run_cell("import rlm_driver\nrlm_driver.__file__").value_repr == \
            "'/rlm/pyc/rlm_driver.pyc'"


def test_runtime_file_with_wrong_hash_is_refused(monkeypatch):
    monkeypatch.setattr(_runtime, "PINNED_WASM_SHA256", "0" * 64)
    monkeypatch.setattr(_runtime, "_verified_wasm", set())
    with pytest.raises(SandboxError, match="refusing to run"):
        _runtime.verified_wasm_path()


def test_values_pickled_inline_past_the_frame_limit_are_left_unsaved_alone(context_files):
    # Values that are not str or bytes (a bytearray, a list of many small
    # strings) are pickled inside the state itself, not as records: a state
    # past the host's frame limit failed the whole snapshot (every variable
    # of the cell lost), though each value but one fit.
    limits = SandboxLimits(cell_timeout_s=10.0, memory_bytes=512 * 1024**2, max_host_call_bytes=16 << 20)
    with ReplSession(limits=limits).start() as session:
        session.load_context(context_files, "list")
        session.run_cell(
            "kept = bytearray(b'k' * 6_000_000)\n"
            "big = bytearray(b'y' * 20_000_000)\n"
            "words = ['w%d' % i for i in range(400_000)]\n"
            "small = 1"
        )
        snap = session.snapshot()
        assert snap.saved == ["kept", "small", "words"], (snap.saved, snap.unsaved_reasons)
        assert "too large to save" in snap.unsaved_reasons["big"], snap.unsaved_reasons
    with fresh(context_files) as other:
        other.restore(snap.data, snap.new_records)
        cell = other.run_cell("len(kept), len(words), words[-1], small, 'big' in globals()")
        assert cell.value_repr == "(6000000, 400000, 'w399999', 1, False)", cell
    with ReplSession(limits=limits).start() as session:
        # Two values that fit alone but not together: one is saved.
        session.run_cell("a = bytearray(10_000_000)\nb = bytearray(10_000_000)")
        snap = session.snapshot()
        assert len(snap.saved) == 1 and len(snap.unsaved) == 1, (snap.saved, snap.unsaved_reasons)
