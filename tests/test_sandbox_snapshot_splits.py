"""Lists that splitting the context makes (its lines, a document's
paragraphs, the lines of every document in turn) are stored as the splits
that make them, not as a second copy of the context; a list that only
resembles one is stored by content. The REPL tests run real wasmtime; the
finder's exactness and its bounds are checked on the guest's code itself
(pure logic, run on the host)."""

from __future__ import annotations

import random

import pytest

from sandbox_wasm import ReplSession, SandboxError, SandboxLimits
from sandbox_wasm.guest import rlm_references, rlm_slices, rlm_splits
from tests.test_sandbox_context_spans import packed_spans

LIMITS = SandboxLimits(cell_timeout_s=60.0, memory_bytes=1024**3)
# Each value's expression, made again in the restored REPL to compare.
SPLITS = {
    "lines": "context.split('\\n')",
    "splitlines": "context.splitlines()",
    "paragraphs": "context.split('\\n\\n')",
    "a slice's lines": "context[100_003:700_001].split('\\n')",
    "words": "context[:300_000].split(' ')",
    "chunks": "[context[i:i + 1_000] for i in range(0, len(context), 1_000)]",
    "characters": "list(context[:5_000])",
    "whitespace-separated words": "context.split()",
}
LIST_SPLITS = {
    "a document's lines": "context[2].split('\\n')",
    "every document's lines": "[line for doc in context for line in doc.split('\\n')]",
    "a short document's lines": "context[5].split('\\n')",
    "every document in chunks": "[doc[i:i + 500] for doc in context for i in range(0, len(doc), 500)]",
    "a document's words": "context[3].split()",
    "every document's words": "[word for doc in context for word in doc.split()]",
}


def prose(rng: random.Random, lines: int) -> str:
    """Lines of words, paragraphs between blank lines, no line twice."""
    words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(2, 9))) for _ in range(3000)]
    out = []
    for number in range(lines):
        out.append(f"{number}: " + " ".join(rng.choice(words) for _ in range(rng.randint(3, 25))))
        if rng.random() < 0.1:
            out.append("")
    return "\n".join(out) + "\n"


def _snapshot_and_compare(spans, kind: str, values: dict[str, str]) -> tuple[int, int]:
    """Makes each value, snapshots, restores into a second guest and checks
    every value equals its expression there; returns (bytes of new records,
    items in all the lists)."""
    names = {f"v{i}": expr for i, expr in enumerate(values.values())}
    make = "\n".join(f"{name} = {expr}" for name, expr in names.items())
    with ReplSession(limits=LIMITS).start() as session:
        session.load_context(spans, kind)
        session.wait_context_index()  # a slice's lines are placed by the anchors of a large document
        session.run_cell(make)
        items = int(session.run_cell(" + ".join(f"len({name})" for name in names)).value_repr)
        snap = session.snapshot()
        with ReplSession(limits=LIMITS).start() as other:
            other.load_context(spans, kind)
            other.restore(snap.data, snap.new_records)
            same = " and ".join(f"{name} == ({expr}) and type({name}) is list" for name, expr in names.items())
            assert other.run_cell(same).value_repr == "True"
    return sum(map(len, snap.new_records.values())), items


def test_lists_split_from_a_text_context_are_stored_as_their_splits(tmp_path):
    text = prose(random.Random(3), 30_000)  # ~2 MB, anchor-indexed
    stored, items = _snapshot_and_compare(packed_spans(tmp_path, [text]), "str", SPLITS)
    assert items > 100_000 and stored < 1_000  # was ~3 MB, a second copy of the text in pieces


def test_lists_split_from_a_list_context_are_stored_as_their_splits(tmp_path):
    rng = random.Random(5)
    docs = [prose(rng, rng.randint(50, 400)) for _ in range(12)]
    docs[5] = "ok\nyes\n" + docs[5]  # a first line too short to look up on its own
    docs[7] = ""  # an empty document splits into one empty line
    stored, items = _snapshot_and_compare(packed_spans(tmp_path, docs), "list", LIST_SPLITS)
    assert items > 3_000 and stored < 1_000


def test_equal_split_lists_restore_as_separate_lists(tmp_path):
    spans = packed_spans(tmp_path, [prose(random.Random(7), 3_000)])
    with ReplSession(limits=LIMITS).start() as session:
        session.load_context(spans, "str")
        session.run_cell("a = context.split('\\n')\nb = context.split('\\n')\nc = a")
        snap = session.snapshot()
        with ReplSession(limits=LIMITS).start() as other:
            other.load_context(spans, "str")
            other.restore(snap.data, snap.new_records)
            assert other.run_cell("a.append('x')\n(a is c, a is not b, len(a) == len(b) + 1)").value_repr \
                == "(True, True, True)"
            # Changed since: no longer a split; stored by content, restored as changed.
            again = other.snapshot()
            with ReplSession(limits=LIMITS).start() as third:
                third.load_context(spans, "str")
                third.restore(again.data, {**snap.new_records, **again.new_records})
                assert third.run_cell("(a[-1], a[:-1] == context.split('\\n'), a is c)").value_repr \
                    == "('x', True, True)"


def test_lists_that_only_resemble_a_split_are_stored_by_content(tmp_path):
    text = prose(random.Random(11), 3_000)
    cell = ("lines = context.split('\\n')\n"
            "stripped = [line.strip('0123456789') for line in lines]\n"
            "merged = lines[:500] + [lines[500] + '\\n' + lines[501]] + lines[502:]\n"  # a separator inside an item
            "limited = context.split('\\n', 40)\n"  # its last item holds the rest
            "swapped = lines[:]\nswapped[10], swapped[20] = swapped[20], swapped[10]\n")
    expressions = ("[line.strip('0123456789') for line in lines]",
                   "lines[:500] + ['\\n'.join(lines[500:502])] + lines[502:]", "context.split('\\n', 40)")
    spans = packed_spans(tmp_path, [text])
    with ReplSession(limits=LIMITS).start() as session:
        session.load_context(spans, "str")
        session.run_cell(cell)
        snap = session.snapshot()
        with ReplSession(limits=LIMITS).start() as other:
            other.load_context(spans, "str")
            other.restore(snap.data, snap.new_records)
            check = "(stripped, merged, limited) == (%s)" % ", ".join(expressions)
            assert other.run_cell(check).value_repr == "True"
            assert other.run_cell("swapped[10] == lines[20] and swapped[20] == lines[10]").value_repr == "True"


def test_every_split_the_finder_gives_makes_its_list_exactly():
    """Random contexts of a few letters (separators everywhere, items alike)
    and lists made by splitting them, then changed (an item longer, two
    merged, one dropped or inserted, a split stopped early): whatever
    split_reference gives rebuilds the list exactly."""
    found = 0
    for seed in range(150):
        rng = random.Random(seed)
        alphabet = rng.choice(["ab\n", "abc\n-", "a\n\n b,", "xyz\r\n"])
        docs = tuple("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 3000)))
                     for _ in range(rng.choice([1, 3, 10])))
        slices = rlm_slices.ContextSlices(docs)
        for _ in range(20):
            sep = rng.choice(["\n", "\n\n", "a", "ab", "aa", "--", ",", "\r\n", " b"])
            text = docs[rng.randrange(len(docs))]
            begin = rng.randint(0, len(text))
            items = _changed(rng, text[begin:rng.randint(begin, len(text))].split(sep), sep, docs, text)
            segments = rlm_splits.split_reference(items, slices)
            if segments is not None:
                found += 1
                assert rlm_references.rebuild_split(("s", segments, 0), docs) == items, (seed, sep, segments)
    assert found > 500


WHITESPACE = " \n\t\r\x0b\x0c\x1c\x85\xa0\u2028\u3000"


def test_every_split_into_words_the_finder_gives_makes_its_list_exactly():
    """The same for `str.split()` with no argument: random runs of every
    kind of whitespace, lists of the words of a slice or of every document,
    then changed (whitespace inside an item, two merged, one dropped or
    inserted, a split stopped early)."""
    found = 0
    for seed in range(150):
        rng = random.Random(seed)
        pool = ["ab", "b", "abc"] + list(WHITESPACE)
        docs = tuple("".join(rng.choice(pool) for _ in range(rng.randint(0, 3000)))
                     for _ in range(rng.choice([1, 3, 10])))
        slices = rlm_slices.ContextSlices(docs)
        for _ in range(20):
            text = docs[rng.randrange(len(docs))]
            begin = rng.choice([0, 0, rng.randint(0, len(text))])
            items = text[begin:rng.randint(begin, len(text))].split()
            roll = rng.random()
            if roll < 0.2:
                items = [word for doc in docs for word in doc.split()]
            elif roll < 0.3:
                items = text.split(None, rng.randint(1, 5))
            elif roll < 0.6 and items:
                i = rng.randrange(len(items))
                change = rng.randrange(4)
                if change == 0:
                    items[i] += rng.choice(WHITESPACE) + "a"
                elif change == 1 and i + 1 < len(items):
                    items[i:i + 2] = [items[i] + items[i + 1]]
                elif change == 2:
                    del items[i]
                else:
                    items.insert(i, rng.choice(["", "a", "b"]))
            segments = rlm_splits.split_reference(items, slices)
            if segments is not None:
                found += 1
                assert rlm_references.rebuild_split(("s", segments, 0), docs) == items, (seed, segments)
    assert found > 500


@pytest.mark.parametrize(("text", "found"), [
    ("alpha" + " " * 10_000 + "beta gamma\n" * 600, True),  # a run longer than a piece: the piece grows
    ("\n" * 3_000 + "alpha beta\n" * 600, True),  # leading whitespace
    ("\n" * 10_000 + "alpha beta\n" * 600, True),  # more than is looked through at once
    ("alpha " * 700 + "\n" * 10_000 + "omega", True),  # the last word after it
    ("alpha " * 700 + "beta", False),  # the list below differs in its last word
    ("alpha\u2028beta\xa0" * 700 + "x" * 20_000, True),  # a last word longer than a piece
])
def test_long_runs_of_whitespace_and_long_words(text, found):
    items = text.split() if found else text.split()[:-1] + ["gamma"]
    segments = rlm_splits.split_reference(items, rlm_slices.ContextSlices((text,)))
    assert (segments is not None) is found
    if found:
        assert rlm_references.rebuild_split(("s", segments, 0), (text,)) == items


def _changed(rng: random.Random, items: list[str], sep: str, docs: tuple[str, ...], text: str) -> list[str]:
    roll = rng.random()
    if roll < 0.3:
        return items
    if roll < 0.5:
        return [line for doc in docs for line in doc.split(sep)]
    if roll < 0.6:
        return text.split(sep, rng.randint(1, 5))
    i = rng.randrange(len(items))
    if roll < 0.7:
        items[i] += rng.choice(["a", "\n", sep])
    elif roll < 0.8 and i + 1 < len(items):
        items[i:i + 2] = [items[i] + sep + items[i + 1]]
    elif roll < 0.9:
        del items[i]
    else:
        items.insert(i, rng.choice(["", "a", "zz"]))
    return items


@pytest.mark.parametrize(("sep", "items"), [
    ("\n\n", ["a\n", "b"]),  # "a\n" + "\n\n" + "b" splits as ["a", "\nb"]
    ("aa", ["xa", "x"]),
    ("\n", ["a\nb", "c"]),
])
def test_a_separator_that_would_cut_elsewhere_is_not_taken(sep, items):
    docs = (sep.join(items) + "\n" + "filler line\n" * 2_000,)
    assert rlm_splits.split_reference(items * 1, rlm_slices.ContextSlices(docs)) is None


def test_the_work_on_a_list_that_is_no_split_is_bounded(monkeypatch):
    """Many short segments that each almost match: at most MAX_SEGMENTS are
    tried, each with a bounded number of lookups."""
    text = "\n".join(f"line {i} of the report, long enough to look up" for i in range(20_000))
    slices = rlm_slices.ContextSlices((text,))
    lookups = []
    find = slices.find
    monkeypatch.setattr(slices, "find", lambda value: lookups.append(value) or find(value))
    lines = text.split("\n")
    every_other = lines[::2]  # each item is in the context, none where the one before ends
    assert rlm_splits.split_reference(every_other, slices) is None
    assert len(lookups) <= rlm_splits.MAX_SEGMENTS * rlm_splits.LOOKUPS_PER_SEGMENT
    assert rlm_splits.split_reference(lines, slices) == ((0, 0, len(text), "\n"),)


@pytest.mark.parametrize("reference", [
    ("s", ((0, 0, 5, "\n"),)),  # no number
    ("s", ((0, 0, 5, "\n"),), "1"),
    ("s", [(0, 0, 5, "\n")], 1),
    ("s", ((0, 0, 5, ""),), 1),  # str.split("") raises
    ("s", ((0, 0, 5),), 1),
    ("s", ((1, 0, 5, "\n"),), 1),
    ("s", ((0, 4, 2, "\n"),), 1),
    ("s", ((0, 0, 10**9, "\n"),), 1),
    ("s", ((0, -1, 5, "\n"),), 1),
    ("s", ((0, 0, 5, 0),), 1),  # chunks of no width
    ("s", ((0, 0, 5, -2),), 1),
    ("s", ((0, 0, 5, True),), 1),
    ("s", ((0, 3, 3, 2),), 1),  # chunks of nothing
])
def test_malformed_split_references_are_refused(reference):
    with pytest.raises(ValueError):
        rlm_references.rebuild_split(reference, ("first\nsecond",))


def test_a_split_reference_outside_the_context_fails_the_restore_by_name(tmp_path):
    spans = packed_spans(tmp_path, [prose(random.Random(2), 2_000)])
    with ReplSession(limits=LIMITS).start() as session:
        session.load_context(spans, "str")
        session.run_cell("lines = context.split('\\n')")
        snap = session.snapshot()
    (tmp_path / "short").mkdir()
    short = packed_spans(tmp_path / "short", ["a much shorter context\n"])
    with ReplSession(limits=LIMITS).start() as other:
        other.load_context(short, "str")
        with pytest.raises(SandboxError, match="outside the context"):
            other.restore(snap.data, snap.new_records)
