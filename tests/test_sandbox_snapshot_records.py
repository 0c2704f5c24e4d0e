"""Snapshots that cost what changed (real wasmtime): large values are records
sent once, slices of the context are references, restores stay exact."""

from __future__ import annotations

import random

import pytest

from sandbox_wasm import CellInterrupted, RecordsUnavailable, ReplSession, SandboxError, SandboxLimits
from tests.test_sandbox_context_spans import packed_spans

LIMITS = SandboxLimits(cell_timeout_s=20.0, memory_bytes=512 * 1024**2)


@pytest.fixture(scope="module")
def context_files(tmp_path_factory):
    rng = random.Random(7)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(3000)]
    directory = tmp_path_factory.mktemp("ctx")
    docs = [directory / "d0.txt", directory / "d1.txt"]
    lines = []
    for _ in range(12_000):
        lines.append(" ".join(rng.choice(words) for _ in range(10)) + rng.choice([".\n", ", ", "; "]))
    docs[0].write_text("".join(lines), encoding="utf-8")  # ~700 KB of prose, not periodic
    # Multi-byte characters: slices are in characters, records in UTF-8 bytes.
    docs[1].write_text("".join(f"ligne {i}: café ☕ naïve 𝄞 {rng.random()}\n" for i in range(4000)),
                       encoding="utf-8")
    return docs


def fresh(context_files):
    session = ReplSession(limits=LIMITS).start()
    session.load_context(context_files, "list")
    assert session.wait_context_index(60)
    return session


def restored(context_files, snap, records):
    session = fresh(context_files)
    session.restore(snap.data, records)
    return session


def test_context_slices_are_references_not_records(context_files):
    with fresh(context_files) as session:
        session.run_cell(
            "chunks = [context[0][i:i + 20_000] for i in range(0, len(context[0]), 20_000)]\n"
            "import random\nrandom.seed(3)\n"
            "spots = sorted(random.sample(range(len(context[0]) - 30_000), 20), reverse=True)\n"
            "windows = [context[0][s:s + 9_000 + s % 5_000] for s in spots]\n"
            "accents = context[1][1234:60_000]\n"
            "prompts = ['Summarize:\\n' + c + '\\nBe brief.' for c in chunks[:-1]]\n"
            "quotes = ['Q: ' * 50 + w for w in windows]\n")
        snap = session.snapshot()
        assert snap.unsaved == [] and snap.refs == [] and snap.new_records == {}
        assert len(snap.data) < 20_000
        with restored(context_files, snap, {}) as other:
            check = other.run_cell(
                "import random\nrandom.seed(3)\n"
                "spots = sorted(random.sample(range(len(context[0]) - 30_000), 20), reverse=True)\n"
                "(''.join(chunks) == context[0],\n"
                " windows == [context[0][s:s + 9_000 + s % 5_000] for s in spots],\n"
                " accents == context[1][1234:60_000], '☕' in accents,\n"
                " prompts[2] == 'Summarize:\\n' + context[0][40_000:60_000] + '\\nBe brief.',\n"
                " quotes == ['Q: ' * 50 + w for w in windows])")
            assert check.value_repr == "(True, True, True, True, True, True)", check.error


def test_unchanged_values_are_not_sent_again(context_files):
    with fresh(context_files) as session:
        session.run_cell("made = [context[0][i:i + 10_000][::-1] for i in range(0, 200_000, 10_000)]\n"
                         "blob = bytes(range(256)) * 100")
        first = session.snapshot()
        assert len(first.new_records) == 21 and sorted(first.new_records) == first.refs
        again = session.snapshot()
        assert again.new_records == {} and again.unchanged and again.refs == first.refs
        session.run_cell("note = 'short'\nextra = 'y' * 50_000")
        small = session.snapshot()
        assert not small.unchanged and len(small.new_records) == 1
        assert set(small.refs) == set(first.refs) | set(small.new_records)
        records = {**first.new_records, **small.new_records}
        with restored(context_files, small, records) as other:
            check = other.run_cell("(made[3] == context[0][30_000:40_000][::-1],"
                                   " blob == bytes(range(256)) * 100, note, len(extra))")
            assert check.value_repr == "(True, True, 'short', 50000)", check.error
            # Restored values are known to the host: the next snapshot sends nothing.
            after = other.snapshot()
            assert after.new_records == {} and set(after.refs) == set(small.refs)


def test_values_changed_in_place_or_rebound_are_stored_again(context_files):
    with fresh(context_files) as session:
        session.run_cell("items = ['a' * 5000]\nbuf = bytearray(b'x' * 10_000)\nword = 'q' * 8000")
        first = session.snapshot()
        session.run_cell("items.append('b' * 5000)\nbuf[0:1] = b'Z'\n"
                         "word = 'r' * 8000")  # same length as the value it replaces
        second = session.snapshot()
        assert len(second.new_records) == 2  # the appended string and the new word
        records = {**first.new_records, **second.new_records}
        with restored(context_files, second, records) as other:
            check = other.run_cell("([len(s) for s in items], items[1][0], bytes(buf[:2]), word[0])")
            assert check.value_repr == "([5000, 5000], 'b', b'Zx', 'r')", check.error


def test_edge_values_round_trip(context_files):
    with fresh(context_files) as session:
        session.run_cell(
            "empty, nothing = '', b''\n"
            "edge = 'e' * 4096\nbelow = 'f' * 4095\n"
            "a = 'shared' * 2000\nb = a\npair = (a, a)\n"
            "class Text(str):\n    pass\n"
            "sub = Text('s' * 10_000)\n"
            "globals().update({'v%d' % i: i for i in range(20_000)})\n")
        snap = session.snapshot()
        assert snap.unsaved == []
        records = dict(snap.new_records)
        with restored(context_files, snap, records) as other:
            check = other.run_cell(
                "(empty, nothing, len(edge), len(below), a is b, pair[0] is a,"
                " type(sub).__name__, len(sub), v0 + v19999)")
            assert check.value_repr == "('', b'', 4096, 4095, True, True, 'Text', 10000, 19999)", \
                check.error


def test_a_trap_restores_records_from_the_host_copy(context_files):
    with fresh(context_files) as session:
        session.run_cell("big = 'z' * 300_000\nchunk = context[0][5:70_000]")
        session.snapshot()
        dead = session.run_cell("import os\nos._exit(3)")
        assert dead.restarted
        check = session.run_cell("len(big), chunk == context[0][5:70_000]")
        assert check.value_repr == "(300000, True)"
        # The new instance learned what the host holds from the restore.
        assert session.snapshot().new_records == {}


def test_records_kept_elsewhere_are_read_back_only_for_a_restart(context_files):
    # Every idle session held a copy of its guest's large values on the host,
    # outside the guest memory budget. Once stored, they are dropped and read
    # back from the caller's source when a trap needs them.
    asked: list[list[str]] = []
    with fresh(context_files) as session:
        session.run_cell("note = 'n' * 50_000\nblob = b'b' * 60_000")
        stored = dict(session.snapshot().new_records)
        assert len(stored) == 2
        session.keep_records_elsewhere(lambda names: asked.append(sorted(names)) or {d: stored[d] for d in names})
        session.run_cell("extra = 'e' * 70_000")  # a new record, held until it is stored too
        snap = session.snapshot()
        assert snap.saved == ["blob", "extra", "note"] and len(snap.new_records) == 1 and not asked
        dead = session.run_cell("import os\nos._exit(7)")
        assert "restored from the last snapshot" in dead.output and asked == [sorted(stored)]
        assert session.run_cell("len(note), len(blob), len(extra)").value_repr == "(50000, 60000, 70000)"


def test_records_out_of_reach_at_a_restart_fail_the_cell_and_keep_the_state(context_files):
    # Storage down is not a state that cannot be restored: starting the REPL
    # empty would let the next snapshot replace the stored state.
    with fresh(context_files) as session:
        session.run_cell("note = 'n' * 50_000")
        session.snapshot()

        def down(names):
            raise ConnectionError("S3 is down")

        session.keep_records_elsewhere(down)
        with pytest.raises(RecordsUnavailable, match="S3 is down"):
            session.run_cell("import os\nos._exit(7)")
        with pytest.raises(RecordsUnavailable):  # the next use still restarts first: no cell runs on an empty REPL
            session.run_cell("note = 'lost'")
        session.keep_records_elsewhere(lambda names: {names[0]: b"n" * 50_000})
        assert session.run_cell("len(note)").value_repr == "50000"


def test_a_cancel_while_a_restart_reads_its_records_is_not_lost(context_files):
    # The heartbeat thread's interrupt() reached only the dead instance while
    # the restart read from storage; the new one then ran the rest unchecked.
    with fresh(context_files) as session:
        session.run_cell("note = 'n' * 50_000")
        stored = dict(session.snapshot().new_records)

        def read_while_cancelled(names):
            session.interrupt("the run was cancelled")
            return {d: stored[d] for d in names}

        session.keep_records_elsewhere(read_while_cancelled)
        with pytest.raises(CellInterrupted, match="the run was cancelled"):
            session.run_cell("import os\nos._exit(7)")
        session.keep_records_elsewhere(lambda names: {d: stored[d] for d in names})
        assert session.run_cell("len(note)").value_repr == "50000"


def test_restore_without_a_needed_record_fails_clearly(context_files):
    with fresh(context_files) as session:
        session.run_cell("big = 'z' * 300_000")
        snap = session.snapshot()
    with fresh(context_files) as other:
        with pytest.raises(SandboxError, match="needs value record"):
            other.restore(snap.data, {})
        with pytest.raises(TypeError, match="record names"):
            other.restore(snap.data, {"../../x": b"1"})


def test_a_guest_that_claims_records_it_never_sent_is_refused(context_files):
    with fresh(context_files) as session:
        session.run_cell("keep = 'k' * 10_000")
        session.snapshot()
        session.run_cell(
            "import rlm_snapshot\n_take = rlm_snapshot.take\n"
            "def take(refs, names):\n"
            "    out = _take(refs, names)\n"
            "    out['refs'] = out['refs'] + '0' * 40\n"
            "    return out\n"
            "rlm_snapshot.take = take\n")
        with pytest.raises(SandboxError, match="never sent"):
            session.snapshot()
        # The instance is replaced from the last good snapshot: the patch is gone.
        check = session.run_cell("len(keep), 'take' in globals()")
        assert check.value_repr == "(10000, False)"
        assert session.snapshot().refs


@pytest.mark.parametrize("refs", ["out['refs'] + '0' * 39", "out['refs'] + 'G' * 40", "[out['refs']]",
                                  "out['refs'][:-40]"])  # the last: a record sent but not named
def test_malformed_record_names_are_refused(context_files, refs):
    with fresh(context_files) as session:
        session.run_cell(
            "big = 'b' * 10_000\n"
            "import rlm_snapshot\n_take = rlm_snapshot.take\n"
            "def take(refs, names):\n"
            "    out = _take(refs, names)\n"
            f"    out['refs'] = {refs}\n"
            "    return out\n"
            "rlm_snapshot.take = take\n")
        with pytest.raises(SandboxError, match="malformed snapshot"):
            session.snapshot()


def test_a_malformed_record_is_refused(context_files):
    with fresh(context_files) as session:
        session.run_cell(
            "import rlm_snapshot\n_take = rlm_snapshot.take\n"
            "def take(refs, names):\n"
            "    out = _take(refs, names)\n"
            "    out['refs'] = ['not-a-name']\n"
            "    out['records'] = {'not-a-name': b'x'}\n"
            "    return out\n"
            "rlm_snapshot.take = take\n")
        with pytest.raises(SandboxError, match="malformed"):
            session.snapshot()


def test_snapshots_written_before_records_still_restore(context_files):
    with fresh(context_files) as session:
        session.run_cell("small = [1, 2, 3]\ndef f():\n    return small\n")
        snap = session.snapshot()
        assert snap.refs == []
    legacy = b"RLMSNAP1" + snap.data[len(b"RLMSNAP2"):]
    with fresh(context_files) as other:
        other.restore(legacy)
        assert other.run_cell("f()").value_repr == "[1, 2, 3]"


def test_running_out_of_memory_frees_the_stored_values(context_files):
    limits = SandboxLimits(cell_timeout_s=20.0, memory_bytes=128 * 1024**2)
    make = "x = None\nx = [bytes([200]) * 5_000_000 for _ in range(18)]\nlen(x)"
    with ReplSession(limits=limits).start() as session:
        session.load_context(context_files, "list")
        session.run_cell("big = [bytes([i]) * 5_000_000 for i in range(10)]")
        first = session.snapshot()
        # `big` is dropped, but the stored-values table still holds its items.
        crowded = session.run_cell("big = None\n" + make)
        assert crowded.limit is not None and crowded.limit.kind == "memory"
        retry = session.run_cell(make)  # the failed cell emptied the table
        assert retry.error is None and retry.value_repr == "18"
        after = session.snapshot()
        assert after.unsaved == [] and len(after.refs) == 1 and not set(first.refs) & set(after.refs)


_WINDOWS = (
    "import random\nrandom.seed({seed})\n"
    "spots = random.sample(range(len(context[0]) - 30_000), 20)\n"
    "windows{seed} = [context[0][s:s + 9_000] for s in spots]\n"
)


def test_the_slice_index_is_built_on_demand_then_reused(context_files, tmp_path):
    """Unordered windows are stored by content until a snapshot asks for the
    index; a later REPL over files already scanned has it from the start."""
    copies = []
    for path in context_files:  # files no other test scanned (the scan cache is per file)
        copy = tmp_path / path.name
        copy.write_bytes(path.read_bytes())
        copies.append(copy)
    with ReplSession(limits=LIMITS).start() as first:
        first.load_context(copies, "list")
        first.run_cell(_WINDOWS.format(seed=1))
        unplaced = first.snapshot()
        assert len(unplaced.new_records) == 20  # no index yet: each window by content
        assert first.wait_context_index(60)  # that snapshot started the scan
        first.run_cell(_WINDOWS.format(seed=2))
        assert first.snapshot().new_records == {}
    with ReplSession(limits=LIMITS).start() as second:
        second.load_context(copies, "list")
        second.run_cell(_WINDOWS.format(seed=3))
        assert second.snapshot().new_records == {}


def test_slices_of_documents_packed_in_one_file_are_references(context_files, tmp_path):
    """The worker's cache packs a context's documents into one file: the
    slice index is built per document span, so unordered windows of the
    second-to-last document are still references, restored exactly."""
    texts = [path.read_text(encoding="utf-8") for path in context_files]
    spans = packed_spans(tmp_path, texts, lead=b"lead bytes, in no document\n")
    with fresh(spans) as session:
        session.run_cell(_WINDOWS.format(seed=5) + "accents = [context[1][s:s + 7_000] for s in (9_000, 3, 41_000)]\n")
        snap = session.snapshot()
        assert snap.refs == [] and snap.new_records == {} and len(snap.data) < 20_000
        expected = session.run_cell("hash((tuple(windows5), tuple(accents)))").value_repr
        with restored(spans, snap, {}) as other:
            assert other.run_cell("hash((tuple(windows5), tuple(accents)))").value_repr == expected
            assert other.run_cell("windows5[0] in context[0] and accents[2] in context[1]").value_repr == "True"
