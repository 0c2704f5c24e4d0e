"""What a caller may give as a run's context (`RunRequest.context`,
`SessionRequest.context`): a ContextRef, inline text or texts bounded in
size, or an S3 URI. Every form but a ContextRef is turned into one by the
run's first step (`ingest_context`)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Union

from pydantic import AfterValidator, Discriminator, Field, Tag

from workflows.refs import ContextRef, ContextURI

MAX_INLINE_CONTEXT_BYTES = 1 << 20
"""Largest inline context, measured as the workflow sends it on to the ingest
step: JSON with non-ASCII characters escaped (`\\u00e9`: 6 bytes each), as
Temporal's Python SDK encodes payloads (Temporal refuses payloads over 2 MiB
by default). Larger contexts go through object storage."""
_TOO_LARGE = (
    "store it in object storage and pass {\"uri\": \"s3://bucket/key\"} (or a prefix ending in /), "
    "or a ContextRef from `rlm context put`"
)


def _json_bytes(value: str | list[str]) -> int:
    """Size of `value` as JSON with non-ASCII characters escaped."""
    return len(json.dumps(value))


def _check_inline_text(text: str) -> str:
    if not text.strip():
        raise ValueError("the inline text is blank: a context needs some text")
    size = _json_bytes(text)
    if size > MAX_INLINE_CONTEXT_BYTES:
        raise ValueError(
            f"inline text of {size:,} bytes as JSON (non-ASCII escaped) is over the "
            f"{MAX_INLINE_CONTEXT_BYTES:,}-byte inline limit: " + _TOO_LARGE
        )
    return text


def _check_inline_texts(texts: list[str]) -> list[str]:
    if not texts:
        raise ValueError("the list of texts is empty: give at least one text")
    if not any(t.strip() for t in texts):
        raise ValueError("every text of the list is blank: a context needs some text")
    size = _json_bytes(texts)
    if size > MAX_INLINE_CONTEXT_BYTES:
        raise ValueError(
            f"{len(texts):,} inline texts of {size:,} bytes as JSON (non-ASCII escaped) are over the "
            f"{MAX_INLINE_CONTEXT_BYTES:,}-byte inline limit: " + _TOO_LARGE
        )
    return texts


def _context_kind(value: Any) -> str | None:
    if isinstance(value, (ContextRef, ContextURI)):
        return "uri" if isinstance(value, ContextURI) else "ref"
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "texts"
    if isinstance(value, dict):
        return "uri" if "uri" in value else "ref"
    return None


InlineText = Annotated[
    str,
    AfterValidator(_check_inline_text),
    Field(description=f"Inline text, one document (at most {MAX_INLINE_CONTEXT_BYTES:,} bytes as ASCII-escaped JSON)."),
]
InlineTexts = Annotated[
    list[str],
    AfterValidator(_check_inline_texts),
    Field(
        description=f"Inline texts, one document each (at most {MAX_INLINE_CONTEXT_BYTES:,} bytes as ASCII-escaped JSON)."
    ),
]
ContextInput = Annotated[
    Union[
        Annotated[ContextRef, Tag("ref")],
        Annotated[InlineText, Tag("text")],
        Annotated[InlineTexts, Tag("texts")],
        Annotated[ContextURI, Tag("uri")],
    ],
    Discriminator(
        _context_kind,
        custom_error_type="context_kind",
        custom_error_message=(
            "context must be a text, a list of texts, {\"uri\": \"s3://bucket/key\"} or a ContextRef object"
        ),
    ),
]
"""What a caller may give as `RunRequest.context`; every form but a
ContextRef is turned into one by the run's first step (`ingest_context`)."""


__all__ = ["MAX_INLINE_CONTEXT_BYTES", "ContextInput"]
