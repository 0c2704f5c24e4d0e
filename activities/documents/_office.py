"""DOCX, XLSX and PPTX to text: paragraphs in order, tables as Markdown
tables (one row a line, cells separated by `|`), sheets and slides headed."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from activities.documents._limits import Budget, DocumentError, check_archive

__all__ = ["docx_text", "pptx_text", "table_lines", "xlsx_text"]


def table_lines(rows: Iterable[list[str]], budget: Budget) -> list[str]:
    """A Markdown table: the first row as header. Newlines and `|` in cells
    are escaped so one row stays one line."""
    lines = []
    for i, row in enumerate(rows):
        cells = [" ".join(c.split()).replace("|", "\\|") for c in row]
        lines.append(budget.take("| " + " | ".join(cells) + " |"))
        if i == 0:
            lines.append("|" + "---|" * len(cells))
    return lines


def docx_text(path: Path, budget: Budget) -> str:
    check_archive(path, "DOCX")
    import docx
    from docx.table import Table
    from docx.text.paragraph import Paragraph

    try:
        document = docx.Document(str(path))
    except Exception as exc:  # noqa: BLE001 - python-docx raises many types for a damaged file
        raise DocumentError(f"not a readable DOCX ({type(exc).__name__}: {str(exc)[:200]})") from None
    out: list[str] = []
    # Body order: paragraphs and tables interleaved as in the document.
    for block in document.iter_inner_content():
        budget.check_time()
        if isinstance(block, Paragraph):
            text = block.text.strip()
            if text:
                style = (block.style.name if block.style is not None else "") or ""
                if style.startswith("Heading") and style[7:].strip().isdigit():
                    text = "#" * min(int(style[7:]), 6) + " " + text
                out.append(budget.take(text))
        elif isinstance(block, Table):
            out.append("\n".join(table_lines(([c.text for c in row.cells] for row in block.rows), budget)))
    return "\n\n".join(out)


def xlsx_text(path: Path, budget: Budget) -> str:
    check_archive(path, "XLSX")
    import openpyxl

    try:
        # read_only streams rows; data_only gives the cached values of formulas.
        book = openpyxl.load_workbook(str(path), read_only=True, data_only=True)
    except Exception as exc:  # noqa: BLE001
        raise DocumentError(f"not a readable XLSX ({type(exc).__name__}: {str(exc)[:200]})") from None
    out: list[str] = []
    try:
        for sheet in book.worksheets:
            rows = ([_cell(v) for v in row] for row in sheet.iter_rows(values_only=True))
            lines = table_lines((_trim(r) for r in rows if any(r)), budget)
            out.append(f"## Sheet: {sheet.title}\n" + "\n".join(lines))
    finally:
        book.close()
    return "\n\n".join(out)


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _trim(row: list[str]) -> list[str]:
    while row and not row[-1]:
        row = row[:-1]
    return row


def pptx_text(path: Path, budget: Budget) -> str:
    check_archive(path, "PPTX")
    import pptx

    try:
        deck = pptx.Presentation(str(path))
    except Exception as exc:  # noqa: BLE001
        raise DocumentError(f"not a readable PPTX ({type(exc).__name__}: {str(exc)[:200]})") from None
    out: list[str] = []
    for number, slide in enumerate(deck.slides, start=1):
        budget.check_time()
        parts = [f"## Slide {number}"]
        for shape in slide.shapes:
            if shape.has_text_frame and shape.text_frame.text.strip():
                parts.append(budget.take(shape.text_frame.text.strip()))
            elif getattr(shape, "has_table", False) and shape.has_table:
                rows = ([c.text for c in row.cells] for row in shape.table.rows)
                parts.append("\n".join(table_lines(rows, budget)))
        if slide.has_notes_slide and slide.notes_slide.notes_text_frame is not None:
            notes = slide.notes_slide.notes_text_frame.text.strip()
            if notes:
                parts.append(budget.take("Notes: " + notes))
        out.append("\n\n".join(parts))
    return "\n\n".join(out)
