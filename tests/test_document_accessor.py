"""`document(name)` and `document_names()` in the REPL (real WASM guest): a
document by its name, in `context` order; a close match suggested for a
wrong name; unnamed contexts say to use `context[i]`; the names are
restored like the other host names when code reassigns them."""

from __future__ import annotations

import pytest

from sandbox_wasm import ReplSession, SandboxLimits

SMALL = SandboxLimits(cell_timeout_s=5.0, memory_bytes=512 * 1024**2, output_chars=2_000, full_output_chars=5_000)


def _session(tmp_path, names: list[str]) -> ReplSession:
    calls = []

    def document_names():
        calls.append(1)
        return names

    (tmp_path / "000000.txt").write_text("first: invoice text", encoding="utf-8")
    (tmp_path / "000001.txt").write_text("second: ledger text", encoding="utf-8")
    session = ReplSession(limits=SMALL, host_functions={"document_names": document_names})
    session.calls = calls  # type: ignore[attr-defined]
    session.start()
    session.load_context([tmp_path / "000000.txt", tmp_path / "000001.txt"], "list")
    return session


def test_a_document_by_name_and_the_names_in_context_order(tmp_path):
    with _session(tmp_path, ["invoices/a.pdf", "ledger.xlsx"]) as repl:
        result = repl.run_cell("print(document_names()); print(document('ledger.xlsx'))")
        assert result.output == "['invoices/a.pdf', 'ledger.xlsx']\nsecond: ledger text\n", result
        again = repl.run_cell("document('invoices/a.pdf') is context[0] or document('invoices/a.pdf')")
        assert again.value_repr == "True"
        assert len(repl.calls) == 1  # names asked of the host once per context
        wrong = repl.run_cell("document('ledger.xls')")
        assert wrong.error.startswith("KeyError: ")
        assert "no document named 'ledger.xls' among the 2 documents; did you mean 'ledger.xlsx'?" in wrong.error
        typed = repl.run_cell("document(1)")
        assert typed.error.startswith("TypeError: ") and "context[i]" in typed.error


def test_names_overwritten_by_code_are_restored(tmp_path):
    with _session(tmp_path, ["a.txt", "b.txt"]) as repl:
        result = repl.run_cell("document = None\ndel document_names")
        assert sorted(result.restored_names) == ["document", "document_names"]
        assert repl.run_cell("document('b.txt')").value_repr == "'second: ledger text'"


def test_unnamed_documents_point_to_context_indexes(tmp_path):
    with _session(tmp_path, []) as repl:
        result = repl.run_cell("document('x')")
        assert result.error.startswith("KeyError: ") and "use context[i]" in result.error


@pytest.mark.parametrize("names", [["only.txt"]])
def test_without_the_host_function_the_accessor_says_so(tmp_path, names):
    (tmp_path / "000000.txt").write_text("text", encoding="utf-8")
    with ReplSession(limits=SMALL, host_functions={}) as repl:
        repl.load_context([tmp_path / "000000.txt"], "str")
        result = repl.run_cell("document('only.txt')")
        assert result.error.startswith("HostCallError: ") and "document_names() is not available" in result.error
