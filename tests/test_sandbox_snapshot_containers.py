"""Long lists, sets and dicts (a Counter, a defaultdict too) of atoms in
snapshots (real wasmtime): each is a record of its own, named again without
being pickled again while it is unchanged, and restored exactly (its type,
its identity, every change)."""

from __future__ import annotations

import pytest

# The same sessions as the other records tests (their limits, the slice index ready).
from tests.test_sandbox_snapshot_records import fresh, restored

MAKE = (
    "prompts = ['Summarize:\\n' + d + '\\nBe brief.' for d in context * 2]\n"
    "scores = {'doc%d' % i: i * 0.5 for i in range(2_000)}\n"
    "ids = list(range(3_000))\n"
    "alias = ids\n"
    "twin = list(ids)\n"
)
COLLECTIONS = (
    "from collections import Counter, OrderedDict, defaultdict\n"
    "counts = Counter('w%d' % (i % 1_500) for i in range(9_000))\n"
    "totals = defaultdict(float)\n"
    "for i in range(2_000):\n"
    "    totals['k%d' % (i % 1_200)] += 0.5\n"
    "ordered = OrderedDict(('z%d' % i, i) for i in range(1_100, 0, -1))\n"
    "nothing = defaultdict(None, counts)\n"
)
COLLECTIONS_CHECK = (
    "(type(counts).__name__, counts['w7'], counts.most_common(1)[0][1], totals['k3'], totals['missing'],"
    " type(totals).__name__, list(ordered)[:2], type(ordered).__name__, nothing.default_factory, len(nothing))"
)
SETS_AND_ROWS = (
    "from collections import Counter\n"
    "vocab = set('w%d' % i for i in range(1_500))\n"
    "frozen = frozenset(range(2_000))\n"
    "rows = [('k%d' % i, i, 0.5, None) for i in range(1_500)]\n"
    "bigrams = Counter(('w%d' % (i % 40), 'w%d' % (i % 37)) for i in range(6_000))\n"
    "nested = [((i,),) for i in range(1_200)]\n"  # a tuple in a tuple: one level only
)
SETS_AND_ROWS_CHECK = (
    "(type(vocab).__name__, len(vocab), 'w77' in vocab, type(frozen).__name__, sum(frozen), rows[7],"
    " bigrams[('w3', 'w3')], nested[5])"
)


@pytest.fixture(scope="module")
def context_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("many")
    files = []
    for i in range(600):
        files.append(directory / f"d{i:04d}.txt")
        files[-1].write_text(f"document {i} é " + "x" * (5_000 + i), encoding="utf-8")
    return files


def test_unchanged_containers_cost_nothing_and_restore_exactly(context_files):
    with fresh(context_files) as session:
        assert session.run_cell(MAKE).error is None
        first = session.snapshot()
        assert first.unsaved == [] and len(first.data) < 5_000  # the state names records only
        records = dict(first.new_records)
        session.run_cell("note = 'small'")
        second = session.snapshot()
        assert second.new_records == {} and set(second.refs) == set(first.refs)
        assert len(second.data) < 5_000
    with restored(context_files, second, records) as other:
        check = other.run_cell(
            "(type(prompts).__name__, type(scores).__name__, len(prompts), prompts[3] == 'Summarize:\\n' + context[3]"
            " + '\\nBe brief.', scores['doc1999'], ids[-1], alias is ids, twin == ids, twin is not ids, note)")
        assert check.value_repr == "('list', 'dict', 1200, True, 999.5, 2999, True, True, True, 'small')", check.error
        # Still independent objects: a change to one shows in it alone.
        assert other.run_cell("twin.append(-1)\n(len(twin), len(ids), len(alias))").value_repr == "(3001, 3000, 3000)"


@pytest.mark.parametrize("make, change, check, expected", [
    (MAKE, "ids.append(7)", "ids[-2:]", "[2999, 7]"),
    (MAKE, "ids[10] = 'ten'", "ids[9:12]", "[9, 'ten', 11]"),
    (MAKE, "ids.reverse()", "ids[:2]", "[2999, 2998]"),  # same items, another order
    (MAKE, "ids[5] = 5.0", "ids[5], type(ids[5]).__name__", "(5.0, 'float')"),  # equal, not the same
    (MAKE, "scores['doc7'] = -1", "scores['doc7'], len(scores)", "(-1, 2000)"),
    (MAKE, "del scores['doc0']; scores['doc0'] = 0.0", "list(scores)[-1]", "'doc0'"),  # the order changed
    (MAKE, "prompts[0] = prompts[0] + '!'", "prompts[0][-2:]", "'.!'"),
    (MAKE, "twin.clear()", "len(twin), len(ids)", "(0, 3000)"),
    (COLLECTIONS, "totals.default_factory = int", "type(totals['missing']).__name__", "'int'"),  # the items unchanged
    (COLLECTIONS, "totals.default_factory = lambda: -1", "totals['missing']", "-1"),  # no builtin: pickled inline
    (COLLECTIONS, "ordered.note = 'mine'", "ordered.note, ordered['z5']", "('mine', 5)"),  # an attribute: inline
    (COLLECTIONS, "counts['w1'] += 1", "counts['w1']", "7"),
    (COLLECTIONS, "ordered.move_to_end('z1100')", "list(ordered)[0], list(ordered)[-1]", "('z1099', 'z1100')"),
    (SETS_AND_ROWS, "vocab.add('new')", "len(vocab), 'new' in vocab", "(1501, True)"),
    (SETS_AND_ROWS, "vocab.discard('w3'); vocab.add('w3')", "len(vocab), 'w3' in vocab", "(1500, True)"),
    (SETS_AND_ROWS, "rows[5] = ('k5', 6)", "rows[5]", "('k5', 6)"),
    (SETS_AND_ROWS, "rows[5] = ('k5', 5, 0.5, None)", "rows[5]", "('k5', 5, 0.5, None)"),  # equal, not the same
    (SETS_AND_ROWS, "rows[6] = (['a list'],)", "rows[6]", "(['a list'],)"),  # now inline
])
def test_a_container_changed_after_a_snapshot_is_saved_again(context_files, make, change, check, expected):
    with fresh(context_files) as session:
        session.run_cell(make)
        records = dict(session.snapshot().new_records)
        assert session.run_cell(change).error is None
        snap = session.snapshot()
        records.update(snap.new_records)
    with restored(context_files, snap, records) as other:
        assert other.run_cell(check).value_repr == expected


def test_a_restored_container_is_reused_then_saved_again_when_changed(context_files):
    with fresh(context_files) as session:
        session.run_cell(MAKE)
        first = session.snapshot()
        records = dict(first.new_records)
    with restored(context_files, first, records) as second:
        unchanged = second.snapshot()
        assert unchanged.new_records == {} and unchanged.unchanged
        # A new container made after the restore gets its own name, not one
        # a restored container holds (they would come back as one object).
        second.run_cell("copies = [list(twin) for _ in range(6)]\nids.append(3000)")
        changed = second.snapshot()
        records.update(changed.new_records)
    with restored(context_files, changed, records) as third:
        check = third.run_cell("(len(ids), [len(c) for c in copies], len({id(c) for c in copies}),"
                               " any(c is twin for c in copies), alias is ids, len(twin))")
        assert check.value_repr == "(3001, [3000, 3000, 3000, 3000, 3000, 3000], 6, False, True, 3000)"


@pytest.mark.parametrize("make, records_made, state_under, check, expected", [
    # A Counter or a defaultdict was pickled through its __reduce__ at every
    # snapshot: a new dict each time, stored again (20,000 words counted:
    # 0.27 s and 772 KB a snapshot, whatever changed). `nothing` holds what
    # `counts` does: one record for both.
    (COLLECTIONS, 3, 5_000, COLLECTIONS_CHECK,
     "('Counter', 6, 6, 1.0, 0.0, 'defaultdict', ['z1100', 'z1099'], 'OrderedDict', None, 1500)"),
    # A set, and a list of tuples of atoms, went inline into every snapshot's
    # state (20,000 words in a set: 644 KB and 0.13 s a snapshot). `nested`
    # is inline still (~8.5 KB of state).
    (SETS_AND_ROWS, 4, 10_000, SETS_AND_ROWS_CHECK,
     "('set', 1500, True, 'frozenset', 1999000, ('k7', 7, 0.5, None), 5, ((5,),))"),
])
def test_collections_dicts_sets_and_rows_are_records_and_restore_as_their_type(
        context_files, make, records_made, state_under, check, expected):
    with fresh(context_files) as session:
        assert session.run_cell(make).error is None
        first = session.snapshot()
        records = dict(first.new_records)
        assert first.unsaved == [] and len(first.data) < state_under and len(records) == records_made
        session.run_cell("note = 1")
        second = session.snapshot()
        assert second.new_records == {} and set(second.refs) == set(first.refs)
    with restored(context_files, second, records) as other:
        again = other.snapshot()  # restored, unchanged: named again (a set in the order it iterates)
        assert again.new_records == {} and set(again.refs) == set(second.refs)
        assert other.run_cell(check).value_repr == expected


def test_containers_holding_mutable_values_are_pickled_inline(context_files):
    # A list of lists cannot be checked by its items' identities: an inner
    # list changed in place would be missed, so such a list is never reused.
    with fresh(context_files) as session:
        session.run_cell("rows = [[i] for i in range(2_000)]")
        first = session.snapshot()
        records = dict(first.new_records)
        session.run_cell("rows[500].append('changed')")
        snap = session.snapshot()
        records.update(snap.new_records)
    with restored(context_files, snap, records) as other:
        assert other.run_cell("rows[500], len(rows)").value_repr == "([500, 'changed'], 2000)"


def test_a_container_of_context_documents_names_them_by_index(context_files):
    with fresh(context_files) as session:
        session.run_cell("picked = (context * 2)[100:1300]\nbig = {i: context[i % 600] for i in range(1200)}")
        snap = session.snapshot()
        assert len(snap.data) < 5_000 and len(snap.new_records) == 2  # the two containers
    with restored(context_files, snap, dict(snap.new_records)) as other:
        check = other.run_cell("(all(a is b for a, b in zip(picked, (context * 2)[100:1300])),"
                               " all(big[i] is context[i % 600] for i in range(1200)))")
        assert check.value_repr == "(True, True)"


def test_a_trap_brings_containers_back_from_the_host_copy(context_files):
    with fresh(context_files) as session:
        session.run_cell(MAKE)
        session.snapshot()
        dead = session.run_cell("import os\nos._exit(3)")
        assert dead.restarted
        check = session.run_cell("(len(prompts), scores['doc5'], alias is ids, twin is ids, len(twin))")
        assert check.value_repr == "(1200, 2.5, True, False, 3000)"
        # The new instance holds the containers as restored: nothing to send again.
        again = session.snapshot()
        assert again.new_records == {} and len(again.data) < 5_000
