"""Turning user input (strings, files, directories) into validated UTF-8
byte streams, one per document, without holding large files in memory."""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ContextInputError",
    "DocumentStats",
    "NamedFile",
    "expand_paths",
    "file_blocks",
    "named_files",
    "text_blocks",
]

_READ_BLOCK = 1 << 20
_UTF8_BOM = codecs.BOM_UTF8
_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


class ContextInputError(ValueError):
    """The given context cannot be stored as text; the message says why."""


@dataclass
class DocumentStats:
    """Filled in while a document's blocks are consumed."""

    bytes: int = 0
    chars: int = 0
    encoding: str = "utf-8"


def text_blocks(text: str, stats: DocumentStats, *, label: str) -> Iterator[bytes]:
    """UTF-8 blocks of an in-memory string."""
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ContextInputError(
            f"{label} cannot be encoded as UTF-8: {exc.reason} at character {exc.start}"
            " (a lone surrogate); clean the text before storing it"
        ) from None
    stats.chars = len(text)
    stats.bytes = len(data)
    view = memoryview(data)
    for start in range(0, len(data), _READ_BLOCK):
        yield bytes(view[start : start + _READ_BLOCK])


def file_blocks(path: Path, stats: DocumentStats) -> Iterator[bytes]:
    """Validated UTF-8 blocks of a file: a NUL byte (binary file), bytes
    that are not UTF-8, or a UTF-16 file stop with the offset of the problem."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    consumed = 0
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise ContextInputError(f"file {path} does not exist; check the path") from None
    except OSError as exc:
        raise ContextInputError(f"cannot read {path}: {exc.strerror}") from None
    with handle:
        first = True
        while block := handle.read(_READ_BLOCK):
            if first:
                first = False
                if block.startswith(_UTF16_BOMS):
                    raise ContextInputError(
                        f"file {path} is UTF-16 (byte-order mark at offset 0); contexts must be "
                        f"UTF-8: convert it, e.g. `iconv -f UTF-16 -t UTF-8 {path}`"
                    )
                if block.startswith(_UTF8_BOM):
                    # The BOM is an encoding marker, not text: drop it, record it.
                    stats.encoding = "utf-8-sig"
                    consumed += len(_UTF8_BOM)
                    block = block[len(_UTF8_BOM) :]
            nul = block.find(b"\x00")
            if nul >= 0:
                raise ContextInputError(
                    f"file {path} looks binary (NUL byte at offset {consumed + nul}); "
                    "contexts must be UTF-8 text files"
                )
            pending = len(decoder.getstate()[0])
            try:
                stats.chars += len(decoder.decode(block))
            except UnicodeDecodeError as exc:
                offset = consumed - pending + exc.start
                bad = exc.object[exc.start : exc.start + 1].hex()
                raise ContextInputError(
                    f"file {path} is not valid UTF-8: byte 0x{bad} at offset {offset}; "
                    f"convert it to UTF-8, e.g. `iconv -f latin1 -t UTF-8 {path}`"
                ) from None
            consumed += len(block)
            stats.bytes += len(block)
            yield block
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise ContextInputError(
                f"file {path} is not valid UTF-8: it ends inside a multi-byte character "
                f"(offset {consumed - len(decoder.getstate()[0])}); the file may be truncated"
            ) from None


@dataclass(frozen=True)
class NamedFile:
    """A file to store as one document."""

    path: Path
    name: str
    """The document's name: its path under the folder (or prefix) given."""
    shown: str
    """How messages call it (the path or URI the caller gave)."""


def named_files(paths: list[Path]) -> list[NamedFile]:
    """`expand_paths` with names: a file under a directory argument is named
    by its path relative to that directory, a file argument by the path given."""
    out: list[NamedFile] = []
    for path in paths:
        for file in expand_paths([path]):
            name = file.relative_to(path).as_posix() if path.is_dir() else str(path)
            out.append(NamedFile(file, name, str(file)))
    return out


def expand_paths(paths: list[Path]) -> list[Path]:
    """Files named directly, plus every non-hidden file under each directory
    (recursively, sorted by relative path); hidden entries such as .git are
    skipped because they are tooling, not text."""
    if not paths:
        raise ContextInputError("no paths given: name at least one file or directory")
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise ContextInputError(f"directory {path} contains no (non-hidden) files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        elif not path.exists():
            raise ContextInputError(f"file {path} does not exist; check the path")
        else:
            raise ContextInputError(f"{path} is neither a regular file nor a directory")
    return files
