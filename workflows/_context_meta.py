"""What the root model is told about its context: shape, sizes and, for
files, names (the first ones, then a count: a context may hold thousands),
plus the files left out as unreadable. Never content (DESIGN.md section 8)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from workflows.refs import ContextRef

__all__ = ["ContextMeta", "describe_context"]

_DOC_LENGTHS_SHOWN = 20
_SKIPPED_SHOWN = 5


@dataclass(frozen=True)
class ContextMeta:
    """What the model may know about its context: shape and size, never content."""

    kind: Literal["str", "list"]
    """`str`: one document; `list`: a list of documents."""
    total_chars: int
    """Characters in all documents together."""
    doc_count: int
    """Number of documents (1 for `str`)."""
    doc_chars_head: list[int] = field(default_factory=list)
    """Character lengths of the first documents, in order."""
    doc_names_head: list[str] = field(default_factory=list)
    """Names (file paths) of the first documents, in order; empty when unnamed."""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(name, reason) of the first files left out as unreadable."""
    skipped_count: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("str", "list"):
            raise ValueError(f"ContextMeta.kind must be 'str' or 'list', got {self.kind!r}")
        if self.total_chars < 0 or self.doc_count < 0 or any(n < 0 for n in self.doc_chars_head):
            raise ValueError(
                f"ContextMeta sizes must be >= 0 (total_chars={self.total_chars}, "
                f"doc_count={self.doc_count}); build it from the stored ContextRef"
            )

    @classmethod
    def from_ref(cls, ref: ContextRef) -> ContextMeta:
        """Metadata of a stored context (no storage access: all of it is in the ref)."""
        return cls(
            ref.kind,
            ref.total_chars,
            ref.doc_count,
            list(ref.doc_chars_head),
            list(ref.doc_names_head),
            [(s.name, s.reason) for s in ref.skipped],
            ref.skipped_count,
        )


def describe_context(meta: ContextMeta) -> str:
    size = f"{meta.total_chars:,} characters (about {meta.total_chars // 4:,} tokens)"
    if meta.kind == "str":
        head = f"Your context is a str of {size}."
    else:
        docs = "document" if meta.doc_count == 1 else "documents"
        head = f"Your context is a list of {meta.doc_count:,} str {docs}, {size} in total."
        shown = meta.doc_chars_head[:_DOC_LENGTHS_SHOWN]
        if shown and meta.doc_names_head:
            head += " " + _describe_names(meta, shown)
        elif shown:
            which = f"Lengths of the first {len(shown)} documents"
            which = "Document lengths" if len(shown) >= meta.doc_count else which
            head += f" {which}: {', '.join(f'{n:,}' for n in shown)}."
    if meta.kind == "str" and meta.doc_names_head:
        head += f" It is the file {meta.doc_names_head[0]!r}."
    head += " It is in the REPL variable `context`; you have not seen any of it."
    if meta.doc_names_head and meta.kind == "list":
        head += (
            " `document(name)` returns a document by its name, `document_names()` lists every name "
            "in the order of `context`."
        )
    if meta.skipped_count:
        listed = "; ".join(f"{_shown_name(name)} ({reason})" for name, reason in meta.skipped[:_SKIPPED_SHOWN])
        more = meta.skipped_count - min(len(meta.skipped), _SKIPPED_SHOWN)
        head += f" {meta.skipped_count:,} unreadable file(s) were left out: {listed}" + (
            f"; and {more:,} more." if more > 0 else "."
        )
    return head


def _shown_name(name: str) -> str:
    """A name as is, or quoted when it holds a newline or other control character."""
    return name if name.isprintable() else repr(name)


def _describe_names(meta: ContextMeta, lengths: list[int]) -> str:
    """`name` (characters) of the first documents, then how many more."""
    pairs = ", ".join(f"{_shown_name(name)} ({n:,})" for name, n in zip(meta.doc_names_head, lengths))
    which = "Documents" if len(lengths) >= meta.doc_count else f"The first {len(lengths)} documents"
    more = f", and {meta.doc_count - len(lengths):,} more" if meta.doc_count > len(lengths) else ""
    return f"{which}, by name (characters): {pairs}{more}."
