"""The context's lines filtered (any order) are stored as their indices in
the split, and prompts joining consecutive ones as where they are; the
restore makes the lines once and shares them. Whatever the model does to
the lines afterwards, what was stored stays right. Real wasmtime guests;
the malformed references on the guest's code itself (pure logic)."""

from __future__ import annotations

import random

import pytest

from sandbox_wasm import ReplSession, SandboxError, SandboxLimits
from sandbox_wasm.guest import rlm_items
from tests.test_sandbox_context_spans import packed_spans
from tests.test_sandbox_snapshot_splits import prose

LIMITS = SandboxLimits(cell_timeout_s=60.0, memory_bytes=1024**3)
MAKE = (
    "lines{n} = context.split('\\n')\n"
    "hits{n} = [l for l in lines{n} if 'a' in l[4:12]]\n"
    "ranked{n} = sorted(hits{n}, key=len)\n"
    "import random\nrandom.seed(3)\nshuffled{n} = random.sample(lines{n}, len(lines{n}))\n"
    "batches{n} = ['\\n'.join(hits{n}[i:i + 50]) for i in range(0, len(hits{n}), 50)]\n"
    "prompts{n} = ['Find the errors in:\\n' + '\\n'.join(hits{n}[i:i + 40]) + '\\nList them.'"
    " for i in range(0, len(hits{n}), 40)]\n"
)
# Made again in the restored REPL, from its own context, to compare.
AGAIN = MAKE.format(n=2)
SAME = ("(lines == lines2, hits == hits2, ranked == ranked2, shuffled == shuffled2, batches == batches2,"
        " prompts == prompts2)")
ALL_TRUE = "(True, True, True, True, True, True)"


def _restored(spans, snapshots):
    """A guest restored from the last of `snapshots`, the records of all."""
    records = {}
    for snap in snapshots:
        records.update(snap.new_records)
    other = ReplSession(limits=LIMITS).start()
    other.load_context(spans, "str")
    other.restore(snapshots[-1].data, records)
    return other


def test_lines_filtered_and_joined_are_stored_as_where_they_are(tmp_path):
    text = prose(random.Random(21), 20_000)
    spans = packed_spans(tmp_path, [text])
    with ReplSession(limits=LIMITS).start() as session:
        session.load_context(spans, "str")
        session.run_cell(MAKE.format(n=''))
        lines, hits = eval(session.run_cell("len(lines), len(hits)").value_repr)
        snap = session.snapshot()
        # Three lists of indices (4 bytes an item), not a line's text; the
        # batches and prompts are references in the state.
        stored = sum(map(len, snap.new_records.values()))
        assert hits > 2_000 and stored == 4 * (2 * hits + lines), stored
        assert not any(b"Find the errors" in data for data in snap.new_records.values() if len(data) > 4_000)
    with _restored(spans, [snap]) as other:
        assert other.run_cell(AGAIN + SAME).value_repr == ALL_TRUE
        # One list of lines restored, its items shared by the lists made of them.
        shared = "(hits[0] is lines[lines.index(hits[0])], shuffled[0] is lines[lines.index(shuffled[0])])"
        assert other.run_cell(shared).value_repr == "(True, True)"


def test_what_was_stored_stays_right_when_the_lines_change_afterwards(tmp_path):
    spans = packed_spans(tmp_path, [prose(random.Random(22), 5_000)])
    with ReplSession(limits=LIMITS).start() as session:
        session.load_context(spans, "str")
        session.run_cell(MAKE.format(n=''))
        first = session.snapshot()
        # The lines changed in place, then dropped: the lists and prompts
        # made of them, unchanged, are named again as before.
        session.run_cell("kept = list(lines)\nlines[:] = ['changed'] * len(lines)\nlines.append('one more')")
        second = session.snapshot()
        session.run_cell("del lines")
        third = session.snapshot()
    with _restored(spans, [first, second, third]) as other:
        other.run_cell(AGAIN)
        assert other.run_cell("(hits == hits2, ranked == ranked2, shuffled == shuffled2, batches == batches2,"
                              " prompts == prompts2, kept == lines2, 'lines' in globals())").value_repr \
            == "(True, True, True, True, True, True, False)"
    with _restored(spans, [first, second]) as other:
        assert other.run_cell("(lines[-1], len(set(lines[:-1])), hits[0] in lines)").value_repr \
            == "('one more', 1, False)"


def test_lists_that_are_not_items_of_the_lines_are_stored_by_content(tmp_path):
    spans = packed_spans(tmp_path, [prose(random.Random(23), 5_000)])
    cell = ("lines = context.split('\\n')\n"
            "mixed = lines[:3000] + ['not a line of the context'] + lines[3000:]\n"
            "copies = [l + '' if i % 2 else ''.join(list(l)) for i, l in enumerate(lines[:2000])]\n"
            "almost = ['\\n'.join(lines[i:i + 50]) + '\\n' + 'x' * 9_000 for i in range(0, 2000, 50)]\n")
    with ReplSession(limits=LIMITS).start() as session:
        session.load_context(spans, "str")
        session.run_cell(cell)
        snap = session.snapshot()
    with _restored(spans, [snap]) as other:
        check = ("(mixed == lines[:3000] + ['not a line of the context'] + lines[3000:],"
                 " copies == lines[:2000], almost == ['\\n'.join(lines[i:i + 50]) + '\\n' + 'x' * 9_000"
                 " for i in range(0, 2000, 50)])")
        assert other.run_cell(check).value_repr == "(True, True, True)"


def test_filters_of_filters_are_bounded_in_depth(tmp_path):
    spans = packed_spans(tmp_path, [prose(random.Random(24), 8_000)])
    cell = "lines = context.split('\\n')\nlevels = [lines]\n" + "".join(
        f"levels.append([l for l in levels[-1] if len(l) != {n}])\n" for n in range(10, 17))
    with ReplSession(limits=LIMITS).start() as session:
        session.load_context(spans, "str")
        session.run_cell(cell)
        snap = session.snapshot()
    with _restored(spans, [snap]) as other:
        other.run_cell(cell.replace("levels", "again"))
        assert other.run_cell("levels == again").value_repr == "True"


BASE = ("s", ((0, 0, 11, "\n"),), 0)


@pytest.mark.parametrize(("pid", "base", "data"), [
    (("i", BASE, "d", 1), ["a", "b"], b"\x05\x00\x00\x00"),  # past the base
    (("i", BASE, "d", 1), ["a", "b"], b"\x00\x00\x00"),  # not whole indices
    (("i", BASE, "d", "1"), ["a", "b"], b""),
    (("q", BASE, 0, 3, "\n", "", ""), ["a", "b"], b""),
    (("q", BASE, 1, 1, "\n", "", ""), ["a", "b"], b""),
    (("q", BASE, 0, 1, 5, "", ""), ["a", "b"], b""),
    (("q", BASE, 0, 1, "\n", ""), ["a", "b"], b""),
    (("q", BASE, 0, 1, "\n", "", ""), "not a list", b""),
])
def test_malformed_item_references_are_refused(pid, base, data):
    with pytest.raises(ValueError):
        rlm_items.rebuild(pid, base, data)


def test_a_chain_of_bases_deeper_than_the_bound_is_counted_past_it():
    pid = BASE
    for number in range(rlm_items.MAX_DEPTH + 3):
        pid = ("i", pid, "digest", number)
    assert rlm_items.depth(pid) == rlm_items.MAX_DEPTH + 1


def test_an_item_reference_past_the_lines_fails_the_restore_by_name(tmp_path):
    text = prose(random.Random(25), 3_000)
    spans = packed_spans(tmp_path, [text])
    with ReplSession(limits=LIMITS).start() as session:
        session.load_context(spans, "str")
        session.run_cell("lines = context.split('\\n')\nhits = [l for l in lines if 'p' in l]")
        assert int(session.run_cell("len(hits)").value_repr) > 1_000
        snap = session.snapshot()
    # A context as long, of fewer lines: the split fits, the indices do not.
    (tmp_path / "short").mkdir()
    short = packed_spans(tmp_path / "short", [("y" * 999 + "\n") * (len(text) // 1_000 + 1)])
    with ReplSession(limits=LIMITS).start() as other:
        other.load_context(short, "str")
        with pytest.raises(SandboxError, match="past its base"):
            other.restore(snap.data, snap.new_records)


def test_a_restored_container_of_joins_still_names_the_indices_they_need(tmp_path):
    """Joins inside a list of atoms (a container record) refer to the
    filtered lines' indices: after a restore, with the lines and the filter
    dropped, the next snapshot still names that record, so the host keeps it."""
    spans = packed_spans(tmp_path, [prose(random.Random(26), 3_000)])
    make = ("lines = context.split('\\n')\nhits = [l for l in lines if 'p' in l]\n"
            "holder = list(range(998)) + ['\\n'.join(hits[0:60]), '\\n'.join(hits[60:120])]")
    with ReplSession(limits=LIMITS).start() as session:
        session.load_context(spans, "str")
        session.run_cell(make)
        first = session.snapshot()
    # Two joins, the filtered lines' indices; no line's text.
    assert len(first.new_records) == 2 and sum(map(len, first.new_records.values())) < 20_000
    with _restored(spans, [first]) as other:
        other.run_cell("del lines, hits")
        second = other.snapshot()
    held = {**first.new_records, **second.new_records}
    named = {name: held[name] for name in second.refs}
    with ReplSession(limits=LIMITS).start() as third:
        third.load_context(spans, "str")
        third.restore(second.data, named)
        third.run_cell(make.replace("holder", "again"))
        assert third.run_cell("(holder == again, len(hits) > 1_000)").value_repr == "(True, True)"


def test_every_join_found_makes_its_value_exactly():
    """Random short items (alike, empty among them) and values joining them
    in and out of order, between texts, by other separators, or changed:
    whatever ItemLists.join gives rebuilds the value exactly."""
    found = 0
    for seed in range(200):
        rng = random.Random(seed)
        alphabet = rng.choice(["ab\n", "abc -", "a\n b,"])
        base = tuple("".join(rng.choice(alphabet) for _ in range(rng.choice([0, 5, 40, 80]))) for _ in range(300))
        items = rlm_items.ItemLists()
        pid = ("i", ("s", ((0, 0, 1, "\n"),), 0), "digest", 1)
        items.add(pid, base)
        for _ in range(30):
            start = rng.randrange(len(base))
            picked = list(base[start:start + rng.randint(1, 40)])
            if rng.random() < 0.3:
                rng.shuffle(picked)
            if rng.random() < 0.2 and picked:
                picked[rng.randrange(len(picked))] += "z"
            sep = rng.choice(["\n", "\n\n", "", " | ", "a"])
            value = rng.choice(["", "Q:\n", "ab"]) + sep.join(picked) + rng.choice(["", "\nA:", "b"])
            reference = items.join(value)
            if reference is not None:
                found += 1
                assert reference[1] == pid and rlm_items.rebuild(reference, list(base), b"") == value
    assert found > 2_000


def test_lists_past_the_identity_map_bound_are_not_mapped(monkeypatch):
    """Finding a list's items in a base maps the base's items by identity;
    past _MAX_MAPPED items in all, a further base is not mapped (its
    subsets are stored by content) instead of filling the guest's memory."""
    monkeypatch.setattr(rlm_items, "_MAX_MAPPED", 150)
    first = tuple(f"line {i} of the first" for i in range(100))
    second = tuple(f"line {i} of the second" for i in range(100))
    items = rlm_items.ItemLists()
    items.add(("s", ((0, 0, 1, "\n"),), 0), first)
    items.add(("s", ((0, 0, 2, "\n"),), 1), second)
    assert items.subset(list(first[::3]))[0][2] == 0
    assert items.subset(list(second[::3])) is None
    items.keep()  # a snapshot that held both
    items.keep()  # then one that held neither: both dropped, their maps with them
    assert items.bases == {}
    items.add(("s", ((0, 0, 2, "\n"),), 1), second)
    assert items.subset(list(second[::3])) is not None
