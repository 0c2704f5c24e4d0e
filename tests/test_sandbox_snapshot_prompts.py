"""Prompts made one per document of a list context are stored as the
document between two short texts, in whatever order the model made them;
a value that only resembles such a prompt is stored by content. The REPL
tests run real wasmtime; the bound on the search is checked on the guest's
slice finder itself (pure logic, run on the host)."""

from __future__ import annotations

import pickle
import random

import pytest

from sandbox_wasm import ReplSession, SandboxError, SandboxLimits
from sandbox_wasm.guest import rlm_doc_starts, rlm_references, rlm_slices
from tests.test_sandbox_context_spans import packed_spans

LIMITS = SandboxLimits(cell_timeout_s=60.0, memory_bytes=1024**3)
HEADER = '<?xml version="1.0" encoding="UTF-8"?>\n<report kind="audit" region="north">\n'
PROMPTS = "prompts = ['Summarize this document:\\n' + d + '\\n---\\nAnswer in one line.' for d in docs]\n"
SAME = "hash(tuple(prompts)) == hash(tuple('Summarize this document:\\n' + d + '\\n---\\nAnswer in one line.' for d in docs))"
ORDERS = {
    "in order": "docs = list(context)",
    "reversed": "docs = list(reversed(context))",
    "shuffled": "import random\nrandom.seed(4)\ndocs = random.sample(context, len(context))",
    "sorted by length": "docs = sorted(context, key=len)",
    "every third": "docs = context[1::3]",
}


def documents(count: int, header: str = "") -> list[str]:
    """~5 KB documents of prose that does not repeat, lengths all different."""
    rng = random.Random(count)
    words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(2, 9))) for _ in range(3000)]
    return [header + " ".join(rng.choice(words) for _ in range(800 + index)) + f". End of {index}."
            for index in range(count)]


@pytest.mark.parametrize(("order", "header"), [
    ("in order", ""), ("reversed", ""), ("shuffled", ""), ("sorted by length", ""),
    ("every third", ""), ("shuffled", HEADER), ("in order", HEADER)])
def test_prompts_per_document_are_the_documents_between_short_texts(tmp_path, order, header):
    spans = packed_spans(tmp_path, documents(1_000, header))
    with ReplSession(limits=LIMITS).start() as session:
        session.load_context(spans, "list")
        session.run_cell(ORDERS[order] + "\n" + PROMPTS)
        snap = session.snapshot()
        # Stored by content: the prompts made before the texts around their
        # documents were known (the first two of an order no hint follows).
        missed = [data for data in snap.new_records.values() if data.startswith(b"Summarize")]
        assert len(missed) <= 2
        # The lists `docs` and `prompts` are records of their own: a few bytes
        # per item (a document's number; the texts around it are pickled once).
        lists = [data for data in snap.new_records.values() if not data.startswith(b"Summarize")]
        count = int(session.run_cell("len(prompts)").value_repr)
        assert len(lists) <= 2 and sum(map(len, lists)) < 40 * count
        with ReplSession(limits=LIMITS).start() as other:
            other.load_context(spans, "list")
            other.restore(snap.data, snap.new_records)
            assert other.run_cell(ORDERS[order] + "\n" + SAME).value_repr == "True"


def test_values_that_only_resemble_a_prompt_are_stored_by_content(tmp_path):
    docs = documents(300)
    # A twin: the same length and the same first and last characters as
    # document 7, one character different in the middle.
    docs.append(docs[7][:2_000] + ("Q" if docs[7][2_000] != "Q" else "R") + docs[7][2_001:])
    spans = packed_spans(tmp_path, docs)
    cell = (
        "import random\nrandom.seed(9)\norder = random.sample(range(len(context)), len(context))\n"
        "prompts = ['Read:\\n' + context[i] + '\\nDone.' for i in order]\n"
        # Changed in the middle, with the usual texts around it.
        "altered = ['Read:\\n' + d[:1_000] + '#' + d[1_001:] + '\\nDone.' for d in context[20:40]]\n"
        # Texts around the document too long to store inline, or the document under half the value.
        "long_affix = 'Read:\\n' + 'w' * 20_000 + context[50] + '\\nDone.'\n"
        "mostly_text = 'Read:\\n' + 'w' * 12_000 + context[51] + '\\nDone.'\n")
    check = ("(prompts == ['Read:\\n' + context[i] + '\\nDone.' for i in order],"
             " altered == ['Read:\\n' + d[:1_000] + '#' + d[1_001:] + '\\nDone.' for d in context[20:40]],"
             " long_affix == 'Read:\\n' + 'w' * 20_000 + context[50] + '\\nDone.',"
             " mostly_text == 'Read:\\n' + 'w' * 12_000 + context[51] + '\\nDone.')")
    with ReplSession(limits=LIMITS).start() as session:
        session.load_context(spans, "list")
        session.run_cell(cell)
        snap = session.snapshot()
        stored = {data for data in snap.new_records.values() if data.startswith(b"Read:")}
        assert len(stored) >= 22  # the 20 altered, the two with long texts around
        with ReplSession(limits=LIMITS).start() as other:
            other.load_context(spans, "list")
            other.restore(snap.data, snap.new_records)
            other.run_cell("import random\nrandom.seed(9)\norder = random.sample(range(len(context)), len(context))")
            assert other.run_cell(check).value_repr == "(True, True, True, True)"


def _wrap(doc: str) -> str:
    return "Question about this record:\n" + doc + "\nEnd."


def _check(slices: rlm_slices.ContextSlices, value: str) -> bool:
    """Whether the finder placed `value`, and placed it exactly."""
    found = slices.reference(value)
    if found is None:
        return False
    assert rlm_references.rebuild(found, slices.docs) == value
    return True


def test_the_first_prompt_of_an_unfollowed_order_teaches_the_texts_around():
    docs = tuple(documents(200))
    order = [150, 30, 199, 64, 101, 17, 188]  # none of the first documents, none following another
    slices = rlm_slices.ContextSlices(docs)
    slices.new_snapshot()
    assert all(_check(slices, _wrap(docs[index])) for index in order)
    # Opening text longer than the first value's search (256 characters):
    # that prompt is stored by content, the next found by what they share.
    preamble = "Read the record below and answer the auditor's question. " * 6
    slices = rlm_slices.ContextSlices(docs)
    slices.new_snapshot()
    placed = [_check(slices, preamble + docs[index] + "\nEnd.") for index in order]
    assert placed == [False] + [True] * (len(order) - 1)


def test_searches_for_the_texts_around_are_bounded_per_snapshot():
    """Values that wrap no document must not each cost a search: after a
    snapshot's share of failed searches, prompts of an unfollowed order are
    stored by content until the next snapshot begins."""
    docs = tuple(documents(200))
    slices = rlm_slices.ContextSlices(docs)
    slices.new_snapshot()
    template = "x" * 3_000
    for number in range(100):
        assert not _check(slices, template + f" unrelated value {number}")
    assert not any(_check(slices, _wrap(docs[index])) for index in (150, 30, 199))
    slices.new_snapshot()  # the last prompt missed is what the next one is compared with
    assert all(_check(slices, _wrap(docs[index])) for index in (120, 40, 170))


class _CountingText(str):
    """A value that counts the comparisons made against it."""

    compared = 0

    def startswith(self, *args):
        _CountingText.compared += 1
        return super().startswith(*args)


def test_documents_that_all_start_alike_do_not_make_searches_quadratic():
    # 5,000 documents opening with the same run of characters: at every
    # position of such a run, every document is a candidate start.
    docs = tuple("x" * 300 + f" record {index} " + "body " * 900 for index in range(5_000))
    slices = rlm_slices.ContextSlices(docs)
    slices.new_snapshot()
    _CountingText.compared = 0
    for number in range(100):
        assert not _check(slices, _CountingText("x" * 600 + f" value {number} " + "y" * 5_000))
    # 32 searches of at most 4,096 comparisons, not 257 x 5,000 each.
    assert _CountingText.compared <= 32 * 4_096 + 100 * 4


def test_documents_filed_under_one_hash_are_told_apart_by_their_whole_text(monkeypatch):
    # Every document under one key, as a hash collision would file them: one
    # is the start of another, so only its length tells it apart.
    monkeypatch.setattr(rlm_doc_starts, "whole_key", lambda text, begin, end: 0)
    docs = ("A" * 5_000, "A" * 5_000 + "B" * 10, "C" * 6_000)
    slices = rlm_slices.ContextSlices(docs)
    slices.new_snapshot()
    assert _check(slices, _wrap(docs[0]))  # the texts around are learnt here
    assert all(_check(slices, _wrap(doc)) for doc in (docs[1], docs[2], docs[0], docs[1]))


# Values a cell makes from the context, each checked against its expression after the restore.
BATCH_VALUES = {
    "batches": "['\\n\\n'.join(context[i:i + 10]) for i in range(0, len(context), 10)]",
    "numbered": "['Records:\\n' + '\\n'.join(f'[{j}] {context[j]}' for j in range(i, min(i + 8, len(context))))"
                " + '\\nList the totals.' for i in range(0, len(context), 8)]",
    "joined": "'\\n'.join(context)",
    "pieces": "[joined[i:i + 50_000] for i in range(0, len(joined), 50_000)]",
    # A batch with a document changed in its middle, and one of 100 documents (more than the state holds inline).
    "altered": "'\\n\\n'.join(context[40:42] + [context[42][:1000] + '#' + context[42][1001:], context[43]])",
    "long_batch": "'\\n'.join(context[:100])",
    # Documents filtered, and in no order the context has (empty ones among them).
    "filtered": "['\\n\\n'.join(context[1::3][i:i + 10]) for i in range(0, len(context[1::3]), 10)]",
    "scrambled": "[' | '.join(context[(37 * k + 11) % len(context)] for k in range(i, i + 8)) + '\\nAny refunds?'"
                 " for i in range(0, 96, 8)]",
}
BATCHES = "".join(f"{name} = {expression}\n" for name, expression in BATCH_VALUES.items())
SAME_BATCHES = "(" + ", ".join(f"{name} == {expression}" for name, expression in BATCH_VALUES.items()) + ",)"


def test_documents_joined_are_references_to_them(tmp_path):
    """A batch of documents joined by a separator (numbered, wrapped, or a
    piece of the whole context joined and cut; in the context's order,
    filtered or scrambled) is stored as the documents and the texts between
    them, unless less than half of it is left to refer to; empty documents
    inside a batch join as nothing."""
    docs = documents(400)
    for index in (13, 14, 215):
        docs[index] = ""
    spans = packed_spans(tmp_path, docs)
    with ReplSession(limits=LIMITS).start() as session:
        session.load_context(spans, "list")
        session.run_cell(BATCHES)
        snap = session.snapshot()
        by_content = [data for data in snap.new_records.values() if not data.startswith(b"\x80")]  # not pickled
        # Stored by content: only the altered batch (under half of it left to
        # refer to). The whole joined context and the batch of 100 are
        # references too many to keep inline: records of their own, small.
        altered = "\n\n".join(docs[40:42] + [docs[42][:1000] + "#" + docs[42][1001:], docs[43]])
        assert [len(data) for data in by_content] == [len(altered.encode())]
        assert sum(map(len, snap.new_records.values())) < 100_000
        with ReplSession(limits=LIMITS).start() as other:
            other.load_context(spans, "list")
            other.restore(snap.data, snap.new_records)
            assert other.run_cell(SAME_BATCHES).value_repr == repr((True,) * len(BATCH_VALUES))


def test_a_batch_refers_to_its_documents_up_to_the_first_one_changed():
    docs = tuple(documents(40))
    slices = rlm_slices.ContextSlices(docs)
    slices.new_snapshot()
    changed = docs[5][:1_000] + "#" + docs[5][1_001:]
    value = "Records:\n" + "\n\n".join(docs[:5] + (changed,))
    found = slices.reference(value)
    assert found[0] == "m" and [piece[0] for piece in found[2]] == [0, 1, 2, 3, 4]
    assert found[1][-1] == "\n\n" + changed and rlm_references.rebuild(found, docs) == value
    # The next batch follows on: found from where this one's documents ended.
    following = "\n\n".join(docs[5:12])
    assert slices.reference(following)[2][0] == (5, 0, len(docs[5]))


@pytest.mark.parametrize("reference", [
    ("m", ("", ""), ((0, 0, 5),), "extra"),
    ("m", ("",), ((0, 0, 5),)),  # a text short
    ("m", ("", b"bytes"), ((0, 0, 5),)),
    ("m", ("", ""), ((2, 0, 5),)),  # no such document
    ("m", ("", ""), ((0, 3, 2),)),  # ends before it starts
    ("m", ("", ""), ((0, 0, 999),)),  # past the document
    ("m", ("", ""), ((0, 0.0, 5),)),
    ("m", ["", ""], [(0, 0, 5)]),
    ("x", "", 0, 0, 5),
    ("c", -1, 0, 5),
    ("q", 0, 0, 5),
])
def test_malformed_slice_references_are_refused(reference):
    with pytest.raises(ValueError, match="slice"):
        rlm_references.rebuild(reference, ("first", "second"))


@pytest.mark.parametrize("record", [b"not a pickle", pickle.dumps((("", ""), ((0, 0, 10**9),))), pickle.dumps(["x"])])
def test_a_joined_reference_whose_record_is_broken_is_refused_at_restore(tmp_path, record):
    spans = packed_spans(tmp_path, documents(100))
    with ReplSession(limits=LIMITS).start() as session:
        session.load_context(spans, "list")
        session.run_cell("everything = '\\n'.join(context)")
        snap = session.snapshot()
        (name,) = snap.new_records  # the reference to 100 documents, kept out of the state
        assert len(snap.new_records[name]) < 10_000
        with ReplSession(limits=LIMITS).start() as other:
            other.load_context(spans, "list")
            with pytest.raises(SandboxError, match="joined reference|outside the context"):
                other.restore(snap.data, {name: record})
            other.restore(snap.data, snap.new_records)
            assert other.run_cell("everything == '\\n'.join(context)").value_repr == "True"


def test_batches_in_no_order_are_found_from_the_first_whatever_ends_them():
    """Batches of shuffled documents, each ending in the same question: the
    first is found from its first document; the question after each batch's
    last document is not a failed search (a snapshot's failures are bounded,
    and 100 batches must not spend them)."""
    docs = tuple(documents(1_000))
    order = random.Random(3).sample(range(len(docs)), len(docs))
    slices = rlm_slices.ContextSlices(docs)
    slices.new_snapshot()
    for start in range(0, 1_000, 10):
        value = "\n\n".join(docs[index] for index in order[start:start + 10]) + "\nWhich mention a refund?"
        found = slices.reference(value)
        assert found is not None and [piece[0] for piece in found[2]] == order[start:start + 10]
        assert rlm_references.rebuild(found, docs) == value


def test_a_batch_after_unrelated_values_is_found_by_its_first_document():
    """No hint points at a batch's first document, and the values missed
    before it share nothing with it: its start is looked up at each of its
    first positions (an opening text of its own, up to 256 characters)."""
    docs = tuple(documents(300))
    slices = rlm_slices.ContextSlices(docs)
    slices.new_snapshot()
    assert not any(_check(slices, f"unrelated value {number} " * 300) for number in range(5))
    assert _check(slices, "\n".join(docs[100:200]))
    assert _check(slices, "Context:\n" + "\n".join(docs[220:230]) + "\nWhich mention a refund?")
    assert not _check(slices, "x" * 300 + "\n".join(docs[240:250]))  # an opening text past 256 characters


def test_searches_for_a_batch_s_next_document_are_bounded(monkeypatch):
    """A value that starts with a document and goes on with text that only
    resembles documents (all 5,000 open alike) costs at most 64 comparisons
    looking for the next document, and past a snapshot's 32 failed searches
    none: not a comparison per candidate at each of 64 positions."""
    docs = tuple("x" * 300 + f" record {index} " + "body " * 200 for index in range(5_000))
    compared = []
    starts_at = rlm_slices._starts_at
    monkeypatch.setattr(rlm_slices, "_starts_at", lambda *args: compared.append(1) or starts_at(*args))
    slices = rlm_slices.ContextSlices(docs)
    slices.new_snapshot()
    for number in range(100):
        index = number % 16  # the first documents: found where the value starts
        assert slices.reference(docs[index] + "\n" + "x" * 3_000 + f" value {number}") is None
    # The document after it tried in each value (again when its first
    # document is searched for), then 64 candidates in each of 32 searches.
    assert 100 <= len(compared) <= 2 * 100 + 32 * 64


def test_every_reference_the_finder_gives_rebuilds_its_value():
    """Random contexts (few letters, shared headers, empty documents, short
    and long ones) and values cut, wrapped, joined in
    and out of order, or unrelated: whatever the finder answers is exact."""
    found = 0
    for seed in range(150):
        rng = random.Random(seed)
        letters = rng.choice(["ab", "abc\n", "abcdefghij \n"])
        header = "".join(rng.choice(letters) for _ in range(rng.choice([0, 5, 40, 300])))
        docs = tuple("" if rng.random() < 0.1 else
                     header + "".join(rng.choice(letters) for _ in range(rng.choice([1, 10, 40, 200, 1_000])))
                     for _ in range(rng.randint(1, 40)))
        slices = rlm_slices.ContextSlices(docs)
        slices.new_snapshot()
        before, after = header[:rng.choice([0, 3, 30])], "".join(rng.choice(letters) for _ in range(rng.choice([0, 40])))
        for _ in range(40):
            doc = rng.randrange(len(docs))
            start = rng.randint(0, len(docs[doc]))
            first = rng.randrange(len(docs))
            picked = [docs[rng.randrange(len(docs))] for _ in range(4)]
            value = rng.choice([
                docs[doc][start:rng.randint(start, len(docs[doc]))],
                before + docs[doc] + after,
                before + rng.choice(["\n", "", " | "]).join(docs[first:first + 5]) + after,
                before + "\n\n".join(picked) + after,
                "".join(rng.choice(letters) for _ in range(rng.randint(1, 300))),
            ])
            reference = slices.reference(value)  # what a snapshot stores
            if reference is not None:
                assert rlm_references.rebuild(reference, docs) == value
                found += 1
    assert found > 2_500  # about half of the 6,000 values are found: the checks above ran
