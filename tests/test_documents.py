"""Files of each kind become text (tests/document_files.py writes them with
the packages that make them: fpdf2, python-docx, openpyxl, python-pptx, the
email package); hostile files are refused with the reason, quickly, without
reading what a zip bomb declares. Pure conversion: no servers."""

from __future__ import annotations

import re
import shutil
import time
import zipfile
from pathlib import Path

import pytest

from activities.documents import Budget, DocumentError, convert, kind_of
from activities.documents._isolated import ConverterProcess
from activities.documents._limits import MAX_ARCHIVE_EXPANDED_BYTES
from tests.document_files import TABLE, make_all, make_docx, make_eml, make_hostile, make_pdf, make_slow_pdf, make_xlsx


def _table_kept(text: str) -> bool:
    """Each row's cells in order on one line."""
    lines = text.splitlines()
    return all(
        any(re.search(r".*?".join(re.escape(c) for c in row), line) for line in lines) for row in TABLE
    )


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_all(tmp_path_factory.mktemp("samples"))


@pytest.mark.parametrize(
    "kind, words",
    [
        ("pdf", ["Quarterly invoices of the PDF kind", "--- page 2 ---", "payment terms 30 days"]),
        ("docx", ["# Contract of the DOCX kind", "delivers within 14 days", "Signed after the table."]),
        ("xlsx", ["## Sheet: Invoices", "## Sheet: Notes", "Spreadsheet of the XLSX kind"]),
        ("pptx", ["## Slide 1", "Slides of the PPTX kind"]),
        ("html", ["# Invoices", "Paid & filed."]),
        ("eml", ["Subject: Mail of the EML kind", "From: billing@example.com", "contract attached"]),
    ],
)
def test_each_kind_converts_with_its_text_and_its_table(samples, kind, words):
    path = samples[kind]
    assert kind_of(path) == kind
    text = convert(path, kind)
    for word in words:
        assert word in text, (kind, word, text)
    assert _table_kept(text), text


def test_docx_keeps_paragraphs_and_tables_in_document_order(samples):
    text = convert(samples["docx"], "docx")
    assert text.index("delivers within 14 days") < text.index("| INV-001 |") < text.index("Signed after the table.")
    assert "| Invoice | Vendor | Amount |\n|---|---|---|\n| INV-001 | Acme Corp | 1200 |" in text


def test_html_drops_scripts_and_styles(samples):
    text = convert(samples["html"], "html")
    assert "SCRIPT-TEXT" not in text and "MORE-SCRIPT" not in text and "color: red" not in text


def test_eml_converts_its_attachments_and_names_the_ones_it_cannot(samples):
    text = convert(samples["eml"], "eml")
    assert "## Attachment: contract.docx" in text and "# Contract of the DOCX kind" in text
    assert "## Attachment: blob.bin\n(not converted: binary attachment with no converter)" in text


def test_mail_inside_a_mail_inside_a_mail_stops_at_a_depth(tmp_path):
    inner = make_eml(tmp_path / "m0.eml")
    for depth in range(1, 6):
        inner = make_eml(tmp_path / f"m{depth}.eml", attachment=inner)
    text = convert(inner, "eml")
    assert "a mail nested deeper than 3 levels" in text


def test_text_formats_are_stored_as_they_are_not_converted(samples):
    for kind in ("csv", "json", "text"):
        assert kind_of(samples[kind]) == "text"


def test_kind_is_found_from_the_first_bytes_when_the_name_has_no_extension(samples, tmp_path):
    for kind in ("pdf", "docx", "xlsx", "pptx"):
        bare = tmp_path / f"object-{kind}"
        shutil.copy(samples[kind], bare)
        assert kind_of(bare) == kind
    archive = tmp_path / "bundle"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("a.txt", "x")
    with pytest.raises(DocumentError, match="zip archive that is not a DOCX"):
        kind_of(archive)


def test_a_bare_zip_is_sized_up_before_it_is_listed(tmp_path):
    """Sniffing runs in the worker, outside the converter's bounded process:
    a zip declaring more members than a document may have is refused from
    its last bytes (listing a million members cost 336 MB), and a damaged
    one is a DocumentError whatever zipfile raises (it was a run failure)."""
    many = tmp_path / "many"
    with zipfile.ZipFile(many, "w") as z:
        for i in range(20_001):
            z.writestr(str(i), "")
    with pytest.raises(DocumentError, match="a zip archive of 20,001 members \\(a document has at most 20,000\\)"):
        kind_of(many)
    future = tmp_path / "future"
    with zipfile.ZipFile(future, "w") as z:
        z.writestr("word/document.xml", "<w/>")
    data = bytearray(future.read_bytes())
    central = data.index(b"PK\x01\x02")
    data[central + 6 : central + 8] = (144).to_bytes(2, "little")  # "needs zip version 14.4"
    future.write_bytes(bytes(data))
    with pytest.raises(DocumentError, match="not a readable zip archive \\(NotImplementedError: zip file version 14.4"):
        kind_of(future)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_hostile(tmp_path_factory.mktemp("hostile"))


@pytest.mark.parametrize(
    "name, reason",
    [
        ("corrupt_pdf", r"not a readable PDF \(PdfReadError"),
        ("empty_pdf", r"the file is empty \(0 bytes\): not a valid PDF"),
        ("encrypted_pdf", r"encrypted PDF: it needs a password"),
        ("bomb_docx", r"expands to 33\d,\d{3},\d{3} bytes \(over 268,435,456\): a zip bomb"),
        ("not_zip_xlsx", r"not a readable XLSX file \(bad zip container"),
    ],
)
def test_hostile_files_are_refused_with_the_reason(hostile, name, reason):
    path = hostile[name]
    with pytest.raises(DocumentError, match=reason):
        convert(path, kind_of(path))


def test_legacy_office_formats_are_named_with_what_to_do(hostile):
    with pytest.raises(DocumentError, match=r"legacy binary Office format .* save it as DOCX"):
        kind_of(hostile["legacy_doc"])


def test_a_pdf_with_an_empty_user_password_is_read(tmp_path):
    # Encrypted only to set permissions: readers open it without asking.
    path = make_pdf(tmp_path / "open.pdf", password="")
    assert "Quarterly invoices" in convert(path, "pdf")


def test_a_zip_bomb_xlsx_under_the_total_bound_is_caught_by_its_ratio(tmp_path):
    path = make_xlsx(tmp_path / "bomb.xlsx")
    size = MAX_ARCHIVE_EXPANDED_BYTES // 16
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("xl/media/zeros.bin", "w", force_zip64=True) as part:
            for _ in range(size >> 20):
                part.write(bytes(1 << 20))
    with pytest.raises(DocumentError, match=r"part 'xl/media/zeros.bin' expands \d[\d,]*x .*: a zip bomb"):
        convert(path, "xlsx")


def test_a_zip_with_a_lying_size_fails_on_read_not_past_its_declared_size(tmp_path):
    """zipfile stops a member at its declared size: a part that declares
    little and holds much is refused as a damaged file, never read whole."""
    path = make_docx(tmp_path / "liar.docx")
    data = bytearray(path.read_bytes())
    name = b"word/document.xml"
    # Rewrite every central-directory size of the document part to 10 bytes.
    start = 0
    while (at := data.find(b"PK\x01\x02", start)) >= 0:
        name_len = int.from_bytes(data[at + 28 : at + 30], "little")
        if bytes(data[at + 46 : at + 46 + name_len]) == name:
            data[at + 24 : at + 28] = (10).to_bytes(4, "little")
        start = at + 4
    path.write_bytes(bytes(data))
    with pytest.raises(DocumentError, match="not a readable DOCX"):
        convert(path, "docx")


def test_the_budget_bounds_characters_and_time(tmp_path):
    path = make_xlsx(tmp_path / "big.xlsx", rows=2_000)
    with pytest.raises(DocumentError, match=r"its text is over 1,000 characters: split the file"):
        convert(path, "xlsx", Budget(max_chars=1_000))
    with pytest.raises(DocumentError, match=r"converting it took over 0 s"):
        convert(path, "xlsx", Budget(max_seconds=0))
    text = convert(path, "xlsx")
    assert text.count("\n| INV-") == 2_000 + 2 and "| INV-002001 | Filler Ltd | 1998 |" in text


@pytest.mark.parametrize("kind", ["pdf", "docx", "xlsx", "pptx", "eml", "html"])
def test_a_file_cut_short_converts_or_is_refused_never_crashes(samples, tmp_path, kind):
    """Whatever breaks inside a parser comes back as a DocumentError naming the format."""
    data = samples[kind].read_bytes()
    for cut in (len(data) // 3, len(data) // 2, len(data) - 7):
        short = tmp_path / f"short{samples[kind].suffix}"
        short.write_bytes(data[:cut])
        try:
            convert(short, kind)
        except DocumentError as exc:
            assert str(exc), exc


def test_the_budget_ticks_while_a_file_converts(tmp_path):
    """The ingest activity heartbeats through `tick` while a large file converts."""
    ticks = []
    convert(make_xlsx(tmp_path / "rows.xlsx", rows=500), "xlsx", Budget(tick=lambda: ticks.append(1)))
    assert len(ticks) >= 500


def test_a_file_that_defeats_the_checks_between_pages_is_stopped_from_outside(tmp_path, samples):
    """One page that takes pypdf ~20 s inside one call (the soft limit, checked
    before each page, passes): the converter process is killed at the hard
    deadline, and the next file gets a new process."""
    slow = make_slow_pdf(tmp_path / "slow.pdf", operators=400_000)
    ticks = []
    with ConverterProcess(max_seconds=3.0, hard_grace_s=1.0, tick=lambda: ticks.append(1)) as converter:
        started = time.monotonic()
        with pytest.raises(DocumentError, match=r"did not finish within 4 s and was stopped"):
            converter.convert(slow, "pdf")
        assert time.monotonic() - started < 10.0
        assert ticks  # the caller's heartbeat ran while it waited
        assert "Quarterly invoices of the PDF kind" in converter.convert(samples["pdf"], "pdf")
        assert converter.started == 2


def test_the_converter_process_reports_parser_errors_and_keeps_serving(hostile, samples):
    with ConverterProcess() as converter:
        with pytest.raises(DocumentError, match="password"):
            converter.convert(hostile["encrypted_pdf"], "pdf")
        assert "# Contract of the DOCX kind" in converter.convert(samples["docx"], "docx")
        assert converter.started == 1


def test_a_converter_that_runs_out_of_memory_names_the_limit(samples):
    # 16 MiB of address space is not enough to start the parsers (64 MiB was,
    # without numpy installed for openpyxl to import): the reply or the exit names memory.
    with ConverterProcess(max_bytes=16 << 20) as converter:
        with pytest.raises(DocumentError, match="MiB of memory|MemoryError"):
            converter.convert(samples["xlsx"], "xlsx")
