"""The manifest of a stored context: which chunks hold its bytes and where
each document starts. Stored as canonical JSON under its own sha256, so the
same content always yields the same manifest and the same ContextRef."""

from __future__ import annotations

import bisect
import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from workflows.refs import (
    NAME_CHARS_HEAD,
    NAMES_HEAD,
    SKIPPED_HEAD,
    ContextRef,
    Sha256Hex,
    SkippedDocument,
    chunk_key_for,
    manifest_key_for,
)

__all__ = [
    "MANIFEST_FORMAT",
    "Manifest",
    "ManifestChunk",
    "ManifestDocument",
]

MANIFEST_FORMAT = "durable-rlm/context-manifest/v1"
_DOC_CHARS_HEAD = 100


class ManifestDocument(BaseModel):
    """One document: a slice of the concatenated UTF-8 byte stream."""

    model_config = ConfigDict(frozen=True)

    offset: int
    """Byte offset in the concatenated stream."""
    bytes: int
    chars: int
    encoding: str
    """Encoding of the input: `utf-8`, or `utf-8-sig` if a BOM was dropped;
    for a converted file, its format (`pdf`, `docx`, ...)."""
    name: str | None = None
    """The file's path under the folder or prefix it came from; None for
    inline texts (left out of the JSON then, so older manifests keep their hash)."""


class ManifestChunk(BaseModel):
    """A fixed-size slice of the concatenated stream, stored under its hash."""

    model_config = ConfigDict(frozen=True)

    key: str
    sha256: Sha256Hex
    offset: int = Field(ge=0)
    bytes: int = Field(ge=0)

    # A manifest read back is checked as a caller's input would be: a chunk
    # key that is not its sha256's would let a forged manifest read any
    # object of the bucket (another run's transcript) as context.
    @model_validator(mode="after")
    def _key_is_the_sha256s(self) -> ManifestChunk:
        if self.key != chunk_key_for(self.sha256):
            raise ValueError(f"chunk key must be {chunk_key_for(self.sha256)!r}, got {self.key[:200]!r}")
        return self


class Manifest(BaseModel):
    """Everything needed to read a context back and verify it."""

    model_config = ConfigDict(frozen=True)

    format: str = MANIFEST_FORMAT
    kind: Literal["str", "list"]
    chunk_bytes: int
    total_bytes: int
    total_chars: int
    documents: list[ManifestDocument]
    chunks: list[ManifestChunk]
    skipped: list[SkippedDocument] = []
    """Files left out as unreadable (`on_unreadable: "skip"`), with the reason."""

    @model_validator(mode="after")
    def _chunks_tile_the_stream(self) -> Manifest:
        """Chunks follow each other from byte 0 to `total_bytes`, none longer
        than `chunk_bytes`, and every document lies inside: what reading
        relies on (and bounds each chunk's download by)."""
        offset = 0
        for chunk in self.chunks:
            if chunk.offset != offset or not 0 < chunk.bytes <= self.chunk_bytes:
                raise ValueError(
                    f"chunk at offset {chunk.offset} of {chunk.bytes} bytes does not follow the one before "
                    f"(expected offset {offset}, 1 to {self.chunk_bytes} bytes)"
                )
            offset += chunk.bytes
        if offset != self.total_bytes:
            raise ValueError(f"chunks hold {offset} bytes, the manifest says {self.total_bytes}")
        for doc in self.documents:
            if doc.offset < 0 or doc.bytes < 0 or doc.offset + doc.bytes > self.total_bytes:
                raise ValueError(f"document at offset {doc.offset} of {doc.bytes} bytes is outside the {self.total_bytes}-byte stream")
        return self

    def to_json_bytes(self) -> bytes:
        """Canonical JSON: sorted keys, no spaces, so equal content hashes equal.
        Fields added later are left out while unset, so a context stored
        before them keeps its hash."""
        data = self.model_dump()
        for doc in data["documents"]:
            if doc["name"] is None:
                del doc["name"]
        if not data["skipped"]:
            del data["skipped"]
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()

    def to_ref(self) -> tuple[ContextRef, bytes]:
        """The reference and the manifest bytes to store under its key."""
        data = self.to_json_bytes()
        digest = hashlib.sha256(data).hexdigest()
        ref = ContextRef(
            sha256=digest,
            manifest_key=manifest_key_for(digest),
            kind=self.kind,
            total_chars=self.total_chars,
            total_bytes=self.total_bytes,
            doc_count=len(self.documents),
            doc_chars_head=[d.chars for d in self.documents[:_DOC_CHARS_HEAD]],
            doc_names_head=[(d.name or "")[:NAME_CHARS_HEAD] for d in self.documents[:NAMES_HEAD]]
            if any(d.name for d in self.documents[:1])
            else [],
            skipped=[
                SkippedDocument(name=s.name[:NAME_CHARS_HEAD], reason=s.reason[:300]) for s in self.skipped[:SKIPPED_HEAD]
            ],
            skipped_count=len(self.skipped),
        )
        return ref, data

    def chunks_for(self, start: int, end: int) -> list[ManifestChunk]:
        """Chunks overlapping the byte range [start, end)."""
        if start >= end:
            return []
        offsets = [c.offset for c in self.chunks]
        first = bisect.bisect_right(offsets, start) - 1
        last = bisect.bisect_left(offsets, end)
        return self.chunks[max(first, 0) : last]
