"""Turning user input (strings, files, directories) into validated UTF-8
byte streams, one per document, without holding large files in memory."""

from __future__ import annotations

import codecs
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "ContextInputError",
    "DocumentStats",
    "FileIdentity",
    "NamedFile",
    "expand_paths",
    "file_blocks",
    "file_identity",
    "named_files",
    "open_regular_file",
    "paths_bytes",
    "shown_path",
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


def shown_path(path: Path | str) -> str:
    """A path as text that can be printed and stored: a name that is not
    UTF-8 (Linux allows any bytes) shows its bad bytes as `\\xe9`, where the
    raw name would fail later (in JSON, in a Temporal payload, on a terminal)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


FileIdentity = tuple[int, int]
"""(st_dev, st_ino): which file a path named when it was listed."""


def file_identity(path: Path) -> FileIdentity:
    """The identity of the file `path` names now (links followed)."""
    info = path.stat()
    return info.st_dev, info.st_ino


def open_regular_file(path: Path, identity: FileIdentity | None = None) -> BinaryIO:
    """`path` opened for reading, refused unless it is a regular file when
    opened: it may have been swapped since it was listed, and a FIFO would
    block the read forever, a directory or a vanished file raise a raw OSError.
    `identity`: the file listed; another one found at the path (a file or a
    link in the folder replaced after the listing, say by a link to
    ~/.aws/credentials) is refused, not read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ContextInputError(f"file {shown_path(path)} does not exist; check the path") from None
    except OSError as exc:
        raise ContextInputError(f"cannot read {shown_path(path)}: {exc.strerror}") from None
    found = os.fstat(fd)
    if not stat.S_ISREG(found.st_mode):
        os.close(fd)
        raise ContextInputError(f"{shown_path(path)} is not a regular file (was it replaced after it was listed?)")
    if identity is not None and (found.st_dev, found.st_ino) != identity:
        os.close(fd)
        raise ContextInputError(
            f"{shown_path(path)} is not the file that was listed (replaced or re-linked since): not read; "
            "store the context again once the folder has stopped changing"
        )
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def file_blocks(path: Path, stats: DocumentStats, identity: FileIdentity | None = None) -> Iterator[bytes]:
    """Validated UTF-8 blocks of a file (`identity`: the one listed): a NUL
    byte (binary file), bytes that are not UTF-8, or a UTF-16 file stop with
    the offset of the problem."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    shown = shown_path(path)
    consumed = 0
    with open_regular_file(path, identity) as handle:
        first = True
        while block := handle.read(_READ_BLOCK):
            if first:
                first = False
                if block.startswith(_UTF16_BOMS):
                    raise ContextInputError(
                        f"file {shown} is UTF-16 (byte-order mark at offset 0); contexts must be "
                        f"UTF-8: convert it, e.g. `iconv -f UTF-16 -t UTF-8 {shown}`"
                    )
                if block.startswith(_UTF8_BOM):
                    # The BOM is an encoding marker, not text: drop it, record it.
                    stats.encoding = "utf-8-sig"
                    consumed += len(_UTF8_BOM)
                    block = block[len(_UTF8_BOM) :]
            nul = block.find(b"\x00")
            if nul >= 0:
                raise ContextInputError(
                    f"file {shown} looks binary (NUL byte at offset {consumed + nul}); "
                    "contexts must be UTF-8 text files"
                )
            pending = len(decoder.getstate()[0])
            try:
                stats.chars += len(decoder.decode(block))
            except UnicodeDecodeError as exc:
                offset = consumed - pending + exc.start
                bad = exc.object[exc.start : exc.start + 1].hex()
                raise ContextInputError(
                    f"file {shown} is not valid UTF-8: byte 0x{bad} at offset {offset}; "
                    f"convert it to UTF-8, e.g. `iconv -f latin1 -t UTF-8 {shown}`"
                ) from None
            consumed += len(block)
            stats.bytes += len(block)
            yield block
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise ContextInputError(
                f"file {shown} is not valid UTF-8: it ends inside a multi-byte character "
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
    refused: str | None = None
    """Why it is left out unread (a link out of its folder): listed among the
    context's skipped documents, whatever `on_unreadable` says."""
    identity: FileIdentity | None = None
    """The file the path named when it was listed; what is read must be it."""

    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except OSError as exc:
            raise ContextInputError(f"cannot read {self.shown}: {exc.strerror}") from None


def named_files(paths: list[Path]) -> list[NamedFile]:
    """Files named directly, plus every non-hidden file under each directory
    (recursively, sorted by relative path), each named by its path under the
    directory (a file argument by the path given). Hidden entries such as
    .git are skipped: tooling, not text. A directory that cannot be listed is
    an error, not a silent gap in an audit. A symbolic link under a
    directory is followed only to a file inside it: a link out (an untrusted
    folder's link to ~/.aws/credentials; a virtualenv's python) is not read,
    and is listed as skipped with the reason."""
    if not paths:
        raise ContextInputError("no paths given: name at least one file or directory")
    out: list[NamedFile] = []
    for path in paths:
        if path.is_dir():
            found = sorted(_walk(path), key=lambda entry: entry[0])
            if not found:
                raise ContextInputError(f"directory {shown_path(path)} contains no (non-hidden) files")
            for file, refused, identity in found:
                name = shown_path(file.relative_to(path).as_posix())
                out.append(NamedFile(file, name, shown_path(file), refused, identity))
        elif path.is_file():
            try:
                identity = file_identity(path)
            except OSError as exc:
                raise ContextInputError(f"cannot read {shown_path(path)}: {exc.strerror}") from None
            out.append(NamedFile(path, shown_path(path), shown_path(path), identity=identity))
        elif not path.exists():
            raise ContextInputError(f"file {shown_path(path)} does not exist; check the path")
        else:
            raise ContextInputError(f"{shown_path(path)} is neither a regular file nor a directory")
    return out


def expand_paths(paths: list[Path]) -> list[Path]:
    """The files `named_files` reads (links out of a folder left out)."""
    return [file.path for file in named_files(paths) if file.refused is None]


def paths_bytes(paths: list[Path]) -> int:
    """About how many bytes `paths` hold, for progress lines only: what
    cannot be listed or sized counts 0 (storing the files then says why)."""
    total = 0
    for path in paths:
        files = (os.path.join(d, n) for d, _, names in os.walk(path) for n in names) if path.is_dir() else [path]
        for file in files:
            try:
                info = os.stat(file)  # one call per file: 20,000 files took 0.24 s with rglob
            except OSError:
                continue
            total += info.st_size if stat.S_ISREG(info.st_mode) else 0
    return total


def _walk(top: Path) -> Iterator[tuple[Path, str | None, FileIdentity | None]]:
    """The non-hidden regular files under `top`, each with why it is refused
    (a link out of `top`) or None, and its identity (see `named_files`).

    The walk holds each folder open (os.fwalk) and never follows a link to
    a folder, and a file's identity is taken from the same lstat that found
    it a regular file: a file or folder swapped for a link while the walk
    runs yields an identity the later open will not find. A link to a file
    is read only when its target is one of the files the walk found."""
    root = top.resolve()
    found: set[FileIdentity] = set()
    links: list[Path] = []

    def unlistable(exc: OSError) -> None:  # fwalk names only the folder's own name: a fallback
        raise _unlistable(exc.filename or top, exc)

    # The resolved folder is walked (fwalk does not enter a top that is a
    # link); entries are named under `top` as given.
    for folder, dirs, names, dir_fd in os.fwalk(root, onerror=unlistable, follow_symlinks=False):
        base = top / os.path.relpath(folder, root)
        kept_dirs = []
        for name in dirs:
            if name.startswith("."):
                continue
            link = _link(base / name, root, top)
            if link is None:
                _check_listable(base / name, name, dir_fd)
                kept_dirs.append(name)  # a real folder: walked
            elif link != "inside":
                yield base / name, link, None  # a linked folder out of `top`; one inside is walked where it is
        dirs[:] = kept_dirs
        for name in names:
            if name.startswith("."):
                continue
            try:
                info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except OSError:
                continue  # gone since the folder was read
            if stat.S_ISREG(info.st_mode):
                found.add((info.st_dev, info.st_ino))
                yield base / name, None, (info.st_dev, info.st_ino)
            elif stat.S_ISLNK(info.st_mode):
                links.append(base / name)
            # else a FIFO, a socket or a device: not a document
    for entry in links:
        link = _link(entry, root, top)
        if link is not None and link != "inside":
            yield entry, link, None
            continue
        try:
            target = file_identity(entry)
        except OSError:
            continue  # dangling, or a loop: nothing to read
        if target in found:
            yield entry, None, target
        elif entry.is_file():
            yield entry, (
                f"a symbolic link to {shown_path(entry.resolve())}, which is not one of the folder's files "
                "(hidden, or changed while the folder was listed): not followed"
            ), None


def _check_listable(folder: Path, name: str, parent_fd: int) -> None:
    """A folder that cannot be listed is an error naming it (fwalk's own
    error would name it without its parent)."""
    try:
        os.close(os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=parent_fd))
    except OSError as exc:
        raise _unlistable(folder, exc) from None


def _unlistable(folder: Path | str, exc: OSError) -> ContextInputError:
    return ContextInputError(
        f"cannot list directory {shown_path(folder)}: {exc.strerror}; "
        "fix its permissions or leave it out (a folder left unread would be a gap in the context)"
    )


def _link(entry: Path, root: Path, top: Path) -> str | None:
    """None for anything but a symbolic link; "inside" for one to something
    inside `top` (or a loop, or nothing); else why it is not followed."""
    if not entry.is_symlink():
        return None
    try:
        target = entry.resolve()
    except (RuntimeError, OSError):  # a link loop (RuntimeError before Python 3.13)
        return "inside"
    if target == root or root in target.parents or not target.exists():
        return "inside"
    return (
        f"a symbolic link to {shown_path(target)}, outside {shown_path(top)}: links out of a folder are not "
        "followed; give that file itself to include it"
    )
