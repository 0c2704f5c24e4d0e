"""EML (RFC 822 mail) to text: the headers that matter, the body (plain
text preferred, else HTML converted), and each attachment converted like a
file of its own kind, or named with why it was not."""

from __future__ import annotations

import email
import email.policy
import tempfile
from collections.abc import Callable
from pathlib import Path, PurePath

from activities.documents._html import html_text
from activities.documents._limits import Budget, DocumentError

__all__ = ["MAX_NESTED_MAILS", "eml_text"]

MAX_NESTED_MAILS = 3
"""Mails attached to mails (to mails...) converted; deeper ones are named only."""
_HEADERS = ("From", "To", "Cc", "Date", "Subject")

Convert = Callable[[Path, str, Budget, int], str]
"""(file, name, budget, depth) -> text; raises DocumentError."""


def eml_text(path: Path, budget: Budget, convert: Convert, depth: int = 0) -> str:
    with path.open("rb") as handle:
        message = email.message_from_binary_file(handle, policy=email.policy.default)
    if not any(message.get(h) for h in ("From", "To", "Subject", "Date", "Message-ID")):
        raise DocumentError("not an e-mail message (no From, To, Subject, Date or Message-ID header)")
    out = [budget.take(f"{h}: {message[h]}") for h in _HEADERS if message.get(h)]
    body = message.get_body(preferencelist=("plain", "html"))
    if body is not None:
        content = _content(body)
        text = html_text(content, budget) if body.get_content_type() == "text/html" else budget.take(content.strip())
        out.append("\n" + text)
    for number, part in enumerate(message.iter_attachments(), start=1):
        name = _safe_name(part.get_filename(), number)
        out.append(f"\n## Attachment: {name}\n" + _attachment(part, name, budget, convert, depth))
    return "\n".join(out)


def _safe_name(given: str | None, number: int) -> str:
    """The attachment's base name, usable as a file name in a scratch directory."""
    name = PurePath((given or "").replace("\\", "/").replace("\x00", "")).name
    return name if name not in ("", ".", "..") and len(name) <= 200 else f"attachment-{number}"


def _content(part: email.message.EmailMessage) -> str:
    try:
        return part.get_content()
    except (LookupError, UnicodeError):  # an unknown or wrong charset: keep what decodes
        payload = part.get_payload(decode=True) or b""
        return payload.decode("utf-8", errors="replace")


def _attachment(part: email.message.EmailMessage, name: str, budget: Budget, convert: Convert, depth: int) -> str:
    if part.get_content_type() == "message/rfc822" or name.lower().endswith(".eml"):
        if depth + 1 > MAX_NESTED_MAILS:
            return f"(not converted: a mail nested deeper than {MAX_NESTED_MAILS} levels)"
    data = part.get_payload(decode=True)
    if data is None and part.get_content_type() == "message/rfc822":
        inner = part.get_payload()[0] if isinstance(part.get_payload(), list) else None
        data = inner.as_bytes() if inner is not None else b""
        name = name if name.lower().endswith(".eml") else name + ".eml"
    if not data:
        return "(not converted: the attachment is empty)"
    with tempfile.TemporaryDirectory(prefix="eml-") as scratch:
        file = Path(scratch) / name
        file.write_bytes(data)
        try:
            return convert(file, name, budget, depth + 1)
        except DocumentError as exc:
            return f"(not converted: {exc})"
