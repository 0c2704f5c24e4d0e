"""Files of common office and web formats as plain text documents.

PDF (pypdf), DOCX (python-docx), XLSX (openpyxl, streamed), PPTX
(python-pptx), HTML and EML (Python stdlib) are converted to text with
tables as Markdown rows; text files (TXT, Markdown, CSV, JSON, ...) are not
converted at all: they are stored as they are, streamed, whatever their
size. bench/bench_documents.py compares this with one-package converters.

`kind_of` says what a file is (by extension, else by its first bytes);
`convert` turns a non-text file into text or raises `DocumentError` with
the reason, within the bounds of `_limits`.
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path
from typing import BinaryIO, Literal

from activities._context_input import FileIdentity, open_regular_file
from activities.documents._limits import MAX_ARCHIVE_MEMBERS, MAX_DOCUMENT_CHARS, Budget, DocumentError

__all__ = ["Budget", "DocumentError", "Kind", "MAX_DOCUMENT_CHARS", "convert", "kind_of"]

Kind = Literal["text", "pdf", "docx", "xlsx", "pptx", "html", "eml"]

_BY_SUFFIX: dict[str, Kind] = {
    ".pdf": "pdf",
    ".docx": "docx", ".docm": "docx",
    ".xlsx": "xlsx", ".xlsm": "xlsx",
    ".pptx": "pptx", ".pptm": "pptx",
    ".html": "html", ".htm": "html", ".xhtml": "html",
    ".eml": "eml",
}
_LEGACY = {".doc": "DOCX", ".xls": "XLSX", ".ppt": "PPTX"}
_ZIP_PARTS: dict[str, Kind] = {"word/document.xml": "docx", "xl/workbook.xml": "xlsx", "ppt/presentation.xml": "pptx"}


def kind_of(path: Path, identity: FileIdentity | None = None) -> Kind:
    """What `path` holds, by its extension, else by its first bytes (an S3
    key often has no extension). Anything else is text (checked as UTF-8
    when stored). Raises DocumentError for a format that has no converter,
    ContextInputError for a file that cannot be opened as a regular file
    (or, with `identity`, is not the file listed)."""
    suffix = path.suffix.lower()
    if suffix in _BY_SUFFIX:
        return _BY_SUFFIX[suffix]
    if suffix in _LEGACY:
        raise DocumentError(
            f"{suffix} is a legacy binary Office format with no converter here: save it as {_LEGACY[suffix]}"
        )
    # One handle for every read: a FIFO swapped in between two opens must not block.
    with open_regular_file(path, identity) as handle:
        head = handle.read(8)
        if head.startswith(b"%PDF-"):
            return "pdf"
        if head.startswith(b"PK\x03\x04"):
            names = _zip_names(handle)
            for part, kind in _ZIP_PARTS.items():
                if part in names:
                    return kind
            raise DocumentError("a zip archive that is not a DOCX, XLSX or PPTX: unpack it and give its files")
    return "text"


def _zip_names(handle: BinaryIO) -> set[str]:
    """The member names of a zip, read only when it declares no more members
    than a document may have: Python's zipfile holds an object per member
    (a 90 MB zip of a million empty members cost 336 MB to list), and this
    runs in the worker, before the converter's own bounded process."""
    declared = _zip_declared_members(handle)
    if declared is None or declared > MAX_ARCHIVE_MEMBERS:
        shown = "more than 65,535" if declared is None else f"{declared:,}"
        raise DocumentError(
            f"a zip archive of {shown} members (a document has at most {MAX_ARCHIVE_MEMBERS:,}): "
            "unpack it and give its files"
        )
    try:
        handle.seek(0)
        with zipfile.ZipFile(handle) as archive:
            return set(archive.namelist())
    except Exception as exc:  # noqa: BLE001 - a damaged zip breaks zipfile in many ways (NotImplementedError, ...)
        raise DocumentError(f"not a readable zip archive ({type(exc).__name__}: {str(exc)[:200]})") from None


_EOCD = b"PK\x05\x06"
_EOCD_SIZE = 22
_MAX_ZIP_COMMENT = 0xFFFF


def _zip_declared_members(handle: BinaryIO) -> int | None:
    """Members the zip's end-of-central-directory record declares (0 when it
    has none: zipfile then says why); None for a ZIP64 count (over 65,535)."""
    size = handle.seek(0, os.SEEK_END)
    handle.seek(max(0, size - _EOCD_SIZE - _MAX_ZIP_COMMENT))
    tail = handle.read()
    at = tail.rfind(_EOCD)
    if at < 0 or at + _EOCD_SIZE > len(tail):
        return 0
    count = int.from_bytes(tail[at + 10 : at + 12], "little")
    return None if count == 0xFFFF else count


def convert(path: Path, kind: Kind, budget: Budget | None = None, *, depth: int = 0) -> str:
    """The text of a file of `kind` (not "text": text files are stored as
    they are). Raises DocumentError with the reason."""
    budget = budget or Budget()
    if path.stat().st_size == 0:
        raise DocumentError(f"the file is empty (0 bytes): not a valid {kind.upper()} file")
    try:
        return _convert(path, kind, budget, depth)
    except DocumentError:
        raise
    except (Exception, RecursionError) as exc:  # noqa: BLE001 - a damaged file may break a parser anywhere
        raise DocumentError(f"not a readable {kind.upper()} ({type(exc).__name__}: {str(exc)[:200]})") from None


def _convert(path: Path, kind: Kind, budget: Budget, depth: int) -> str:
    if kind == "pdf":
        from activities.documents._pdf import pdf_text

        return pdf_text(path, budget)
    if kind in ("docx", "xlsx", "pptx"):
        from activities.documents import _office

        return {"docx": _office.docx_text, "xlsx": _office.xlsx_text, "pptx": _office.pptx_text}[kind](path, budget)
    if kind == "html":
        from activities.documents._html import html_text

        return html_text(_decoded(path), budget)
    if kind == "eml":
        from activities.documents._email import eml_text

        return eml_text(path, budget, _convert_attachment, depth)
    raise DocumentError(f"no converter for {kind!r}")


def _convert_attachment(path: Path, name: str, budget: Budget, depth: int) -> str:
    """An e-mail attachment, converted like a file (text as it is)."""
    kind = kind_of(path)
    if kind != "text":
        return convert(path, kind, budget, depth=depth)
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        raise DocumentError("binary attachment with no converter")
    return budget.take(data.decode("utf-8", errors="replace"))


def _decoded(path: Path) -> str:
    """HTML as text: UTF-8 (BOM dropped), else the charset it declares, else Latin-1."""
    data = path.read_bytes()
    if len(data) > 4 * MAX_DOCUMENT_CHARS:
        raise DocumentError(f"the HTML file is {len(data):,} bytes: too large to convert")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    declared = re.search(rb"""charset=["']?([A-Za-z0-9_\-]+)""", data[:4096])
    if declared:
        try:
            return data.decode(declared.group(1).decode(), errors="replace")
        except LookupError:
            pass
    return data.decode("latin-1")
