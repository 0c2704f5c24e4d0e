"""Real files of each document kind, made with the packages that write
them (the `dev` extra), with known text and a known table, for the
conversion tests and bench/bench_documents.py."""

from __future__ import annotations

import email.message
import email.policy
import io
import json
import zipfile
from pathlib import Path

__all__ = ["TABLE", "make_all", "make_hostile"]

TABLE = [["Invoice", "Vendor", "Amount"], ["INV-001", "Acme Corp", "1200"], ["INV-002", "Globex", "560"]]
"""The table every kind that has tables carries; a converter keeps it when
each row's cells appear in order on one line."""


def make_pdf(path: Path, *, password: str | None = None) -> Path:
    from fpdf import FPDF

    pdf = FPDF()
    if password:
        pdf.set_encryption(owner_password=password + "-owner", user_password=password)
    pdf.add_page()
    pdf.set_font("helvetica", size=12)
    pdf.cell(text="Quarterly invoices of the PDF kind", new_x="LMARGIN", new_y="NEXT")
    with pdf.table() as table:
        for row in TABLE:
            r = table.row()
            for cell in row:
                r.cell(cell)
    pdf.add_page()
    pdf.cell(text="Second page: payment terms 30 days")
    pdf.output(str(path))
    return path


def make_docx(path: Path) -> Path:
    import docx

    document = docx.Document()
    document.add_heading("Contract of the DOCX kind", level=1)
    document.add_paragraph("The supplier delivers within 14 days.")
    table = document.add_table(rows=0, cols=3)
    for row in TABLE:
        cells = table.add_row().cells
        for cell, text in zip(cells, row):
            cell.text = text
    document.add_paragraph("Signed after the table.")
    document.save(str(path))
    return path


def make_xlsx(path: Path, *, rows: int = 0) -> Path:
    import openpyxl

    book = openpyxl.Workbook()
    sheet = book.active
    sheet.title = "Invoices"
    for row in TABLE:
        sheet.append([int(c) if c.isdigit() else c for c in row])
    for i in range(rows):
        sheet.append([f"INV-{i + 3:06d}", "Filler Ltd", i])
    book.create_sheet("Notes").append(["Spreadsheet of the XLSX kind"])
    book.save(str(path))
    return path


def make_pptx(path: Path) -> Path:
    import pptx
    from pptx.util import Inches

    deck = pptx.Presentation()
    slide = deck.slides.add_slide(deck.slide_layouts[5])
    slide.shapes.title.text = "Slides of the PPTX kind"
    shape = slide.shapes.add_table(len(TABLE), 3, Inches(1), Inches(2), Inches(6), Inches(2))
    for r, row in enumerate(TABLE):
        for c, text in enumerate(row):
            shape.table.cell(r, c).text = text
    deck.save(str(path))
    return path


def html_page() -> str:
    rows = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in TABLE)
    return (
        "<html><head><title>Page of the HTML kind</title><script>var secret = 'SCRIPT-TEXT';</script>"
        "<style>body { color: red }</style></head><body><h1>Invoices</h1><p>Paid &amp; filed.</p>"
        f"<table>{rows}</table><script>document.write('MORE-SCRIPT')</script></body></html>"
    )


def make_eml(path: Path, attachment: Path | None = None) -> Path:
    message = email.message.EmailMessage(policy=email.policy.default)
    message["From"] = "billing@example.com"
    message["To"] = "audit@example.com"
    message["Subject"] = "Mail of the EML kind"
    message.set_content("Please find the contract attached.")
    if attachment is not None:
        message.add_attachment(
            attachment.read_bytes(), maintype="application", subtype="octet-stream", filename=attachment.name
        )
    message.add_attachment(b"\x00\x01\x02\x03", maintype="application", subtype="octet-stream", filename="blob.bin")
    path.write_bytes(message.as_bytes())
    return path


def make_all(folder: Path) -> dict[str, Path]:
    """One file of each kind under `folder` (subfolder `more/` for some)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "more").mkdir(exist_ok=True)
    files = {
        "pdf": make_pdf(folder / "invoice.pdf"),
        "docx": make_docx(folder / "contract.docx"),
        "xlsx": make_xlsx(folder / "more" / "ledger.xlsx"),
        "pptx": make_pptx(folder / "more" / "deck.pptx"),
    }
    files["html"] = folder / "page.html"
    files["html"].write_text(html_page(), encoding="utf-8")
    files["eml"] = make_eml(folder / "mail.eml", attachment=files["docx"])
    files["csv"] = folder / "table.csv"
    files["csv"].write_text("\n".join(",".join(r) for r in TABLE) + "\n", encoding="utf-8")
    files["json"] = folder / "data.json"
    files["json"].write_text(json.dumps({"kind": "JSON kind", "rows": TABLE}), encoding="utf-8")
    files["text"] = folder / "notes.txt"
    files["text"].write_text("Plain notes of the text kind.\n", encoding="utf-8")
    return files


def make_hostile(folder: Path) -> dict[str, Path]:
    """Files a converter must refuse with a reason, not crash or hang on."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"corrupt_pdf": folder / "corrupt.pdf", "empty_pdf": folder / "empty.pdf"}
    files["corrupt_pdf"].write_bytes(b"%PDF-1.7\n1 0 obj << /Type /Catalog /Pages 9 0 R >>\n\x00\x01garbage\n%%EOF")
    files["empty_pdf"].write_bytes(b"")
    files["encrypted_pdf"] = make_pdf(folder / "locked.pdf", password="s3cret")
    # A real DOCX plus one part of 320 MiB of zeros (over the 256 MiB bound): ~320 KB on disk.
    files["bomb_docx"] = make_docx(folder / "bomb.docx")
    with zipfile.ZipFile(files["bomb_docx"], "a", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("word/media/zeros.bin", "w", force_zip64=True) as part:
            block = bytes(1 << 20)
            for _ in range(320):
                part.write(block)
    files["not_zip_xlsx"] = folder / "fake.xlsx"
    files["not_zip_xlsx"].write_bytes(b"this is not a spreadsheet")
    files["legacy_doc"] = folder / "old.doc"
    files["legacy_doc"].write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(100))
    files["binary"] = folder / "image.bin"
    files["binary"].write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00")
    return files


def csv_bytes(rows: int) -> bytes:
    """A CSV of `rows` lines (for the size of a huge one without holding it twice)."""
    out = io.StringIO()
    for i in range(rows):
        out.write(f"INV-{i:08d},Vendor {i % 97},{i * 3}\n")
    return out.getvalue().encode()


def make_slow_pdf(path: Path, *, operators: int = 200_000) -> Path:
    """A valid one-page PDF whose content stream repeats a text operator
    `operators` times: pypdf extracts ~20,000 per second, all inside one
    parser call, so no check between pages can stop it."""
    body = b"BT /F1 12 Tf 72 700 Td " + b"(x) Tj 0 0 Td " * operators + b"ET\n"
    objects = [
        b"<</Type/Catalog/Pages 2 0 R>>",
        b"<</Type/Pages/Kids[3 0 R]/Count 1>>",
        b"<</Type/Page/Parent 2 0 R/MediaBox[0 0 612 792]/Contents 4 0 R/Resources<</Font<</F1 5 0 R>>>>>>",
        b"<</Length %d>>stream\n" % len(body) + body + b"\nendstream",
        b"<</Type/Font/Subtype/Type1/BaseFont/Helvetica>>",
    ]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, obj in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + obj + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer<</Size %d/Root 1 0 R>>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    path.write_bytes(bytes(out))
    return path
