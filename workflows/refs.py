"""References to data kept in object storage.

Temporal payloads carry these small records, never the data itself: a context
of 40 MB travels through the run as a `ContextRef` of a few hundred bytes.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

# Inline values up to this size travel in Temporal payloads; larger ones are
# stored and passed as a BlobRef (Temporal warns at 512 KiB, fails at 2 MiB).
INLINE_LIMIT_BYTES = 4096
# S3 bucket naming rules (3-63 lowercase letters, digits, dots, hyphens), then a key or prefix.
_S3_URI = re.compile(r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]/")


T = TypeVar("T")


def _null_is_empty(value: Any) -> Any:
    return [] if value is None else value


JsonList = Annotated[list[T], BeforeValidator(_null_is_empty)]
"""A list field of a workflow's input or result. Temporal's HTTP API and CLI
turn an empty JSON array inside a payload into `null` (measured on the dev
server: `{"a": []}` is stored as `{"a": null}`), so a JSON caller's `[]`
arrives as `null`, and a result read back through them holds `null`."""


CONTEXT_MANIFEST_PREFIX = "contexts/manifests"
"""Where a context's manifest is stored: under its own sha256 (`manifest_key_for`)."""
CONTEXT_CHUNK_PREFIX = "contexts/chunks"
"""Where a context's chunks are stored, each under its sha256."""
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def manifest_key_for(sha256: str) -> str:
    """The one key a context's manifest may have: its sha256 names it."""
    return f"{CONTEXT_MANIFEST_PREFIX}/{sha256}.json"


def chunk_key_for(sha256: str) -> str:
    """The one key a context chunk may have: its sha256 names it."""
    return f"{CONTEXT_CHUNK_PREFIX}/{sha256}"


def _check_sha256(value: str) -> str:
    if not _SHA256_HEX.fullmatch(value):
        raise ValueError(f"must be a sha256 of 64 lowercase hex digits, got {value[:80]!r}")
    return value


Sha256Hex = Annotated[str, AfterValidator(_check_sha256)]
"""A sha256 as the engine writes them (64 lowercase hex digits): a key is
built from it, so nothing else may pass for one."""


NAMES_HEAD = 100
"""Document names a ContextRef carries (the manifest holds them all)."""
NAME_CHARS_HEAD = 200
SKIPPED_HEAD = 50


class ContextRef(BaseModel):
    """A context stored as sha256-addressed chunks plus a manifest."""

    model_config = ConfigDict(frozen=True)

    sha256: Sha256Hex
    """Hash of the manifest: the context's identity (same content, same hash)."""
    manifest_key: str
    """Object key of the manifest (documents, lengths, chunk keys): always
    `contexts/manifests/<sha256>.json`, so that a reference a caller writes
    can name no other object of the bucket."""
    kind: Literal["str", "list"]
    """`str`: one document, loaded as a `str`; `list`: several, as `list[str]`."""
    total_chars: int = Field(ge=0)
    total_bytes: int = Field(ge=0)
    doc_count: int = Field(ge=0)
    doc_chars_head: JsonList[int]
    """Character length of the first documents (at most 100), for the prompt."""
    doc_names_head: JsonList[str] = Field(default_factory=list)
    """Names of the first documents (at most 100, each cut to 200 characters):
    the file's path under the folder or prefix it came from. Empty when the
    documents have no names (inline texts)."""
    skipped: JsonList[SkippedDocument] = Field(default_factory=list)
    """Files left out because they could not be converted (the caller allowed
    it with `on_unreadable: "skip"`): the first 50, with the reason."""
    skipped_count: int = 0
    """Every file left out, listed in `skipped` or not."""

    @model_validator(mode="after")
    def _manifest_key_is_the_sha256s(self) -> ContextRef:
        if self.manifest_key != manifest_key_for(self.sha256):
            raise ValueError(
                f"manifest_key must be {manifest_key_for(self.sha256)!r} (the manifest's key follows from "
                f"its sha256), got {self.manifest_key[:200]!r}"
            )
        return self


class SkippedDocument(BaseModel):
    """A file that was not made a document, and why."""

    model_config = ConfigDict(frozen=True)

    name: str
    reason: str


class BlobRef(BaseModel):
    """A value too large for a Temporal payload, stored under `key`."""

    model_config = ConfigDict(frozen=True)

    key: str
    size: int
    sha256: str


class ContextURI(BaseModel):
    """Files in object storage, ingested into a context by the run's first
    step: UTF-8 text as it is; PDF, DOCX, XLSX, PPTX, HTML and EML converted
    to text. `{"uri": "s3://bucket/key"}` is one document (a `str`
    context); `{"uri": "s3://bucket/prefix/"}` (ending in `/`) is every
    object under the prefix, sorted by key, one document each named by its
    key under the prefix (a `list`);
    `{"uri": "s3://bucket/"}` is the whole bucket. Read with the worker's S3
    endpoint and credentials; keys with a part starting with `.` are skipped
    under a prefix."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    uri: str = Field(max_length=2048, json_schema_extra={"pattern": _S3_URI.pattern})

    @field_validator("uri")
    @classmethod
    def _is_s3_uri(cls, value: str) -> str:
        if not _S3_URI.match(value):
            raise ValueError(
                f"{value[:200]!r} is not an S3 URI: give s3://bucket/key for one file, "
                "s3://bucket/prefix/ (ending in /) for every file under a prefix"
            )
        return value

    @property
    def bucket(self) -> str:
        return self.uri[len("s3://") :].split("/", 1)[0]

    @property
    def key(self) -> str:
        """The object key, or the prefix when it ends in `/` ('' = whole bucket)."""
        return self.uri[len("s3://") :].split("/", 1)[1]

    @property
    def is_prefix(self) -> bool:
        return self.key == "" or self.key.endswith("/")


ContextRef.model_rebuild()
