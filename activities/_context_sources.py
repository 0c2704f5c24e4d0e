"""The documents of a list of files as byte streams for the context store:
text files streamed as they are, other formats converted first."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import structlog

from activities._context_input import ContextInputError, DocumentStats, NamedFile, file_blocks, text_blocks
from activities.documents import DocumentError, kind_of
from activities.documents._isolated import ConverterProcess
from workflows.refs import SkippedDocument

__all__ = ["file_sources"]

log = structlog.get_logger(__name__)


def file_sources(
    files: list[NamedFile], *, skip: bool, skipped: list[SkippedDocument], tick: Callable[[], None] | None = None
) -> Iterator[tuple[DocumentStats, Iterator[bytes], str]]:
    """(stats, blocks, name) per readable file, converted when needed.
    Conversion happens here, before the document starts in the stream,
    so an unreadable file can still be left out. It runs in a child process
    (`ConverterProcess`) that a hostile file cannot hang or exhaust; `tick`
    runs about every second meanwhile (an activity's heartbeat)."""
    with ConverterProcess(tick=tick) as converter:
        yield from _sources(files, converter, skip=skip, skipped=skipped)


def _sources(
    files: list[NamedFile], converter: ConverterProcess, *, skip: bool, skipped: list[SkippedDocument]
) -> Iterator[tuple[DocumentStats, Iterator[bytes], str]]:
    for file in files:
        if file.refused is not None:
            skipped.append(SkippedDocument(name=file.name, reason=file.refused))
            log.info("document skipped", name=file.name[:200], reason=file.refused[:300])
            continue
        stats = DocumentStats()
        try:
            doc_kind = kind_of(file.path, file.identity)
            if doc_kind == "text":
                if skip:  # read it through once: a bad byte must not stop the stream later
                    for _ in file_blocks(file.path, DocumentStats(), file.identity):
                        pass
                yield stats, file_blocks(file.path, stats, file.identity), file.name
                continue
            text = converter.convert(file.path, doc_kind, file.identity)
        except (DocumentError, ContextInputError) as exc:
            reason = str(exc)
            if not skip:
                if isinstance(exc, ContextInputError):
                    raise
                raise ContextInputError(f"file {file.shown} cannot be converted to text: {reason}") from None
            reason = reason.replace(str(file.path), file.name)
            skipped.append(SkippedDocument(name=file.name, reason=reason))
            log.info("document skipped", name=file.name[:200], reason=reason[:300])
            continue
        stats.encoding = doc_kind
        yield stats, text_blocks(text, stats, label=f"file {file.shown}"), file.name
