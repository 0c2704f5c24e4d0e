"""References to data kept in object storage.

Temporal payloads carry these small records, never the data itself: a context
of 40 MB travels through the run as a `ContextRef` of a few hundred bytes.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

# Inline values up to this size travel in Temporal payloads; larger ones are
# stored and passed as a BlobRef (Temporal warns at 512 KiB, fails at 2 MiB).
INLINE_LIMIT_BYTES = 4096


class ContextRef(BaseModel):
    """A context stored as sha256-addressed chunks plus a manifest."""

    model_config = ConfigDict(frozen=True)

    sha256: str
    """Hash of the manifest: the context's identity (same content, same hash)."""
    manifest_key: str
    """Object key of the manifest (documents, lengths, chunk keys)."""
    kind: Literal["str", "list"]
    """`str`: one document, loaded as a `str`; `list`: several, as `list[str]`."""
    total_chars: int
    total_bytes: int
    doc_count: int
    doc_chars_head: list[int]
    """Character length of the first documents (at most 100), for the prompt."""


class BlobRef(BaseModel):
    """A value too large for a Temporal payload, stored under `key`."""

    model_config = ConfigDict(frozen=True)

    key: str
    size: int
    sha256: str
