"""PDF to text with pypdf (pure Python: no native code to crash the worker)."""

from __future__ import annotations

import logging
from pathlib import Path

from activities.documents._limits import Budget, DocumentError

__all__ = ["pdf_text"]


def pdf_text(path: Path, budget: Budget) -> str:
    import pypdf
    from pypdf.errors import DependencyError, FileNotDecryptedError, PdfReadError

    # pypdf logs every repaired defect as a warning; the result says what failed.
    logging.getLogger("pypdf").setLevel(logging.ERROR)
    try:
        reader = pypdf.PdfReader(path, strict=False)
        if reader.is_encrypted:
            # Many PDFs are "encrypted" with an empty password only to set permissions.
            try:
                opened = reader.decrypt("")
            except (DependencyError, NotImplementedError) as exc:
                raise DocumentError(f"encrypted PDF with a cipher that cannot be read here ({exc})") from None
            if not opened:
                raise DocumentError("encrypted PDF: it needs a password")
        pages = []
        for number, page in enumerate(reader.pages, start=1):
            budget.check_time()
            text = (page.extract_text() or "").strip()
            if text:
                pages.append(budget.take(f"--- page {number} ---\n{text}\n"))
    except DocumentError:
        raise
    except FileNotDecryptedError:
        raise DocumentError("encrypted PDF: it needs a password") from None
    except (PdfReadError, ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError) as exc:
        # pypdf reports a damaged file through many exception types.
        raise DocumentError(f"not a readable PDF ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not pages:
        raise DocumentError("no text in this PDF (scanned pages need OCR, which is not done here)")
    return "\n".join(pages)
