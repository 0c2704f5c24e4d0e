"""A context's documents as spans of one file (the worker's cache packs
them): loaded as they are, checked before any work, read again after a trap,
and the file's descriptor never left open (real wasmtime)."""

from __future__ import annotations

import os
import resource
from pathlib import Path

import pytest

from sandbox_wasm import DocumentSpan, ReplSession, SandboxError, SandboxLimits

SMALL = SandboxLimits(cell_timeout_s=5.0, memory_bytes=512 * 1024**2, output_chars=2_000)
DOCS = ["first", "", "ünïcode € and more", "", "x" * 5_000, "last"]


def packed_spans(tmp_path: Path, docs: list[str], lead: bytes = b"") -> list[DocumentSpan]:
    """`docs` back to back in one file after `lead` bytes, as spans."""
    path = tmp_path / "documents.utf8"
    data = [doc.encode() for doc in docs]
    path.write_bytes(lead + b"".join(data))
    spans, offset = [], len(lead)
    for blob in data:
        spans.append(DocumentSpan(path, offset, len(blob)))
        offset += len(blob)
    return spans


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _fds_open_under(directory: Path) -> list[str]:
    """Descriptors of this process open on files under `directory`. Asked by
    target, not by count: the rest of the suite shares the process, and its
    threads open and close descriptors of their own while a test runs."""
    found = []
    for fd in _open_fds():
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed since the listing
            continue
        if target.startswith(f"{directory}/"):
            found.append(target)
    return found


def test_spans_of_one_file_load_as_their_documents_and_again_after_a_trap(tmp_path):
    spans = packed_spans(tmp_path, DOCS, lead=b"not a document\xff")
    with ReplSession(limits=SMALL) as session:
        session.load_context(spans, "list")
        assert session.run_cell("context == %r" % DOCS).value_repr == "True"
        session.snapshot()
        assert session.run_cell("import os\nos._exit(3)").restarted
        assert session.run_cell("context == %r" % DOCS).value_repr == "True"


def test_spans_out_of_order_and_from_two_files(tmp_path):
    spans = packed_spans(tmp_path, DOCS)
    other = tmp_path / "other.txt"
    other.write_text("another file")
    order = [spans[4], DocumentSpan(other, 8, 4), spans[0], spans[2], DocumentSpan(other, 0, 7), spans[5]]
    with ReplSession(limits=SMALL) as session:
        session.load_context(order, "list")
        expected = [DOCS[4], "file", DOCS[0], DOCS[2], "another", DOCS[5]]
        assert session.run_cell("context == %r" % expected).value_repr == "True"
        session.load_context([spans[2]], "str")
        assert session.run_cell("context").value_repr == repr(DOCS[2])


def test_spans_outside_their_file_are_refused_before_loading(tmp_path):
    spans = packed_spans(tmp_path, DOCS)
    path, end = spans[0].path, spans[-1].offset + spans[-1].size
    with ReplSession(limits=SMALL) as session:
        session.load_context(spans[:1], "list")
        for bad in (DocumentSpan(path, end - 3, 4), DocumentSpan(path, -1, 2), DocumentSpan(path, 0, -1)):
            with pytest.raises(ValueError, match="does not lie inside"):
                session.load_context([spans[0], bad], "list")
        with pytest.raises(ValueError, match="does not exist"):
            session.load_context([DocumentSpan(tmp_path / "missing", 0, 0)], "list")
        with pytest.raises(ValueError, match="exactly one document"):
            session.load_context(spans[:2], "str")
        assert session.run_cell("context").value_repr == "['first']"  # the REPL goes on, as it was


def test_a_span_that_cuts_a_character_is_named_as_not_utf8(tmp_path):
    spans = packed_spans(tmp_path, DOCS)
    cut = DocumentSpan(spans[2].path, spans[2].offset, 1)  # the first of the 2 bytes of "ü"
    with ReplSession(limits=SMALL) as session:
        with pytest.raises(SandboxError, match="context document 1 is not valid UTF-8"):
            session.load_context([spans[0], cut], "list")
        session.load_context(spans, "list")
        assert session.run_cell("len(context)").value_repr == str(len(DOCS))


def test_loading_many_spans_leaves_no_descriptor_open(tmp_path):
    spans = packed_spans(tmp_path, [f"doc {i}" for i in range(3_000)])
    other = tmp_path / "other.txt"
    other.write_text("between")
    interleaved = [span for pair in zip(spans[::2], spans[1::2]) for span in (pair[1], pair[0])]
    with ReplSession(limits=SMALL) as session:
        for documents in (spans, interleaved, [spans[0], DocumentSpan(other, 0, 7), spans[1]]):
            session.load_context(documents, "list")
            assert _fds_open_under(tmp_path) == []
        assert session.run_cell("context").value_repr == "['doc 0', 'between', 'doc 1']"


def test_a_file_per_document_loads_under_a_low_descriptor_limit(tmp_path):
    # An earlier version's cache holds a file per document: each is closed
    # after its last byte, not when the load ends (20,000 at once would pass
    # the process's limit).
    files = []
    for index in range(1_500):
        files.append(tmp_path / f"{index:06d}.txt")
        files[-1].write_text(f"doc {index}")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with ReplSession(limits=SMALL) as session:
        session.load_context(files[:1], "list")
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(_open_fds()) + 300, hard))
        try:
            session.load_context(files, "list")
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert session.run_cell("context[-1], len(context)").value_repr == "('doc 1499', 1500)"
