"""Text from models and contexts, made safe to print (by the CLI and the
logs' console renderers) and to carry (`without_surrogates`).

An answer, a cell's output, a provider's error or a document's name is text
an attacker may write (a prompt injection in an audited document is enough).
Printed raw, an escape sequence in it drives the operator's terminal: OSC 52
writes the clipboard, CSI clears the screen or hides text, a lone carriage
return or a bidi override makes a line read as something else. `printable`
shows each such character as an escape (`\\x1b`, `\\u202e`) and keeps
newlines, tabs and CRLF; `json_text` keeps JSON valid and non-ASCII text
readable while escaping the same characters (`json` escapes C0 controls
itself, not C1 controls, bidi overrides or lone surrogates, which a UTF-8
stream cannot even encode).
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any, TextIO

__all__ = ["escape_log_values", "json_text", "printable", "printable_if_terminal", "without_surrogates"]

# C0 controls but \t and \n, a \r not ending a line, DEL, C1 controls (U+009B
# is a one-character CSI), bidi embeddings, overrides and isolates, and lone
# surrogates (from a file name or a JSON \ud800 escape).
_UNSAFE = re.compile("\r(?!\n)|[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
# Inside JSON text (json escaped C0 already; any of these is inside a string).
_UNSAFE_IN_JSON = re.compile("[\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


_SURROGATE = re.compile("[\ud800-\udfff]")


def without_surrogates(text: str) -> str:
    """`text` as valid Unicode: a lone surrogate (a JSON `\\udfff` escape, a
    file name's undecodable byte) becomes U+FFFD, as a decoder shows a bad
    byte. Kept, it fails whatever stores or sends the text as UTF-8 (a
    transcript's S3 write, a Temporal failure, a batch's result)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)
    return text


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """`text` with every character that could drive a terminal escaped."""
    return _UNSAFE.sub(_escaped, text)


def printable_if_terminal(text: str, stream: TextIO | None = None) -> str:
    """For data a user may pipe (a stored context): raw into a pipe or a
    file, escaped on a terminal."""
    stream = stream or sys.stdout
    isatty = getattr(stream, "isatty", None)
    return printable(text) if isatty is not None and isatty() else text


def json_text(value: Any, **dumps: Any) -> str:
    """`json.dumps(value, ensure_ascii=False)` that a terminal and a UTF-8
    stream can take: the characters `printable` escapes become `\\uXXXX`."""
    return _UNSAFE_IN_JSON.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(value, ensure_ascii=False, **dumps))


def escape_log_values(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    """A structlog processor for the renderers that print values as they are
    (console, logfmt): a logged document name or provider error is text too.
    The JSON renderer escapes by itself."""
    return {key: printable(value) if isinstance(value, str) else value for key, value in event.items()}
