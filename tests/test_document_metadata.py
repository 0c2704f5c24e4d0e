"""What the root model is told about named documents: names with sizes for
the first ones, a count of the rest (compact for thousands of files), the
accessors, and the files left out with why. Pure prompt building."""

from __future__ import annotations

from workflows.prompts import ContextMeta, first_user_message
from workflows.refs import ContextRef, SkippedDocument, manifest_key_for


def _first(meta: ContextMeta) -> str:
    return first_user_message("Q?", meta, turn=1, max_turns=5)


def test_names_and_sizes_of_the_first_documents_then_a_count():
    names = [f"invoices/{i:05d}.pdf" for i in range(5_000)]
    meta = ContextMeta("list", 5_000_000, 5_000, [1_000] * 100, names[:100])
    text = _first(meta)
    assert "The first 20 documents, by name (characters): invoices/00000.pdf (1,000), " in text
    assert "invoices/00019.pdf (1,000), and 4,980 more." in text and "invoices/00020.pdf" not in text
    assert "`document(name)` returns a document by its name, `document_names()` lists every name" in text
    assert len(text) < 2_000


def test_a_few_documents_are_all_listed_and_odd_names_are_quoted():
    meta = ContextMeta("list", 30, 2, [10, 20], ["a.txt", "evil\nname.txt"])
    text = _first(meta)
    assert "Documents, by name (characters): a.txt (10), 'evil\\nname.txt' (20)." in text


def test_a_single_file_is_named_and_unnamed_contexts_read_as_before():
    assert "It is the file 'report.pdf'." in _first(ContextMeta("str", 10, 1, [10], ["report.pdf"]))
    plain = _first(ContextMeta("list", 30, 2, [10, 20]))
    assert "Document lengths: 10, 20." in plain and "document(" not in plain


def test_skipped_files_are_listed_with_the_reason_then_counted():
    skipped = [(f"bad/{i}.pdf", "encrypted PDF: it needs a password") for i in range(50)]
    meta = ContextMeta("list", 30, 2, [10, 20], ["a", "b"], skipped, 70)
    text = _first(meta)
    assert "70 unreadable file(s) were left out: bad/0.pdf (encrypted PDF: it needs a password); " in text
    assert "bad/4.pdf (encrypted PDF: it needs a password); and 65 more." in text and "bad/5.pdf" not in text


def test_metadata_comes_from_the_ref_alone():
    ref = ContextRef(
        sha256="0" * 64, manifest_key=manifest_key_for("0" * 64), kind="list", total_chars=3, total_bytes=3, doc_count=2,
        doc_chars_head=[1, 2], doc_names_head=["x", "y"],
        skipped=[SkippedDocument(name="z.pdf", reason="no text")], skipped_count=1,
    )  # fmt: skip
    assert ContextMeta.from_ref(ref) == ContextMeta("list", 3, 2, [1, 2], ["x", "y"], [("z.pdf", "no text")], 1)
    # An older ref (a recorded history, a JSON caller) without the new fields still reads.
    old = ContextRef.model_validate({**ref.model_dump(), "doc_names_head": None, "skipped": None, "skipped_count": 0})
    assert ContextMeta.from_ref(old).doc_names_head == []
