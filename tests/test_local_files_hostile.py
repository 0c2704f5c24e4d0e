"""Local files given as a context (`rlm run --context`, `rlm context put`)
by a caller who may not know what an untrusted folder holds: a relative
path, a file that cannot be opened, a file swapped after it was listed, a
name that is not UTF-8, a symbolic link out of the folder. Each is stored
or refused with its name and the reason; none hangs or ends in a traceback.
Real S3 (SeaweedFS) and the real converter process."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from activities._context_input import NamedFile, expand_paths, named_files
from activities.context_store import ContextInputError, ContextStore
from tests.document_files import make_all, make_xlsx


def test_a_relative_path_to_a_converted_format_is_read(context_store: ContextStore, tmp_path: Path, monkeypatch):
    # The converter runs in a scratch directory of its own: it used to get
    # the path as given, fail to find it and die, blamed on memory.
    make_all(tmp_path / "docs")
    monkeypatch.chdir(tmp_path)
    ref = context_store.put_paths([Path("docs/page.html")])
    assert ref.kind == "str" and ref.total_chars > 0
    folder = context_store.put_paths([Path("docs")])
    assert folder.skipped_count == 0 and "invoice.pdf" in folder.doc_names_head


def test_a_file_that_cannot_be_opened_is_named_and_can_be_skipped(context_store: ContextStore, tmp_path: Path):
    # ENOTDIR stands in for EACCES, which a root test runner cannot see.
    (tmp_path / "plain").write_text("not a folder")
    blocked = tmp_path / "plain" / "inner.pdf"
    with pytest.raises(ContextInputError, match=r"cannot read .*plain/inner\.pdf: Not a directory"):
        context_store.put_files([NamedFile(blocked, "inner.pdf", str(blocked))], kind="str")
    good = tmp_path / "good.txt"
    good.write_text("kept")
    ref = context_store.put_files(
        [NamedFile(blocked, "inner.pdf", str(blocked)), NamedFile(good, "good.txt", str(good))],
        kind="list", on_unreadable="skip",
    )  # fmt: skip
    assert [s.name for s in ref.skipped] == ["inner.pdf"] and "Not a directory" in ref.skipped[0].reason
    assert ref.doc_names_head == ["good.txt"]


@pytest.mark.parametrize("swap", ["fifo", "directory", "gone"])
def test_a_file_swapped_after_it_was_listed_is_refused_not_waited_on(context_store: ContextStore, tmp_path: Path, swap):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("first")
    target = folder / "b.txt"
    target.write_text("second")
    files = expand_paths([folder])
    target.unlink()
    if swap == "fifo":
        os.mkfifo(target)  # opened for reading, it blocked until a writer came: forever
    elif swap == "directory":
        target.mkdir()
    done: list[BaseException] = []

    def put() -> None:
        try:
            context_store.put_files([NamedFile(f, f.name, str(f)) for f in files], kind="list")
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            done.append(exc)

    worker = threading.Thread(target=put, daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "the read of a FIFO swapped in blocked"
    assert len(done) == 1 and isinstance(done[0], ContextInputError), done
    expected = "does not exist" if swap == "gone" else "is not a regular file"
    assert "b.txt" in str(done[0]) and expected in str(done[0]), done[0]


def test_a_name_that_is_not_utf8_is_stored_with_its_bad_bytes_shown(context_store: ContextStore, tmp_path: Path):
    # It used to be uploaded, then fail to serialise (rlm context put: a
    # traceback) or to reach Temporal (rlm run: "invalid escape code").
    folder = tmp_path / "latin"
    folder.mkdir()
    (folder / "ok.txt").write_text("fine")
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.txt"), "wb") as handle:
        handle.write(b"a file named in latin-1\n")
    ref = context_store.put_paths([folder])
    assert ref.doc_names_head == ["caf\\xe9.txt", "ok.txt"]
    assert ref.model_dump_json()  # a name JSON and Temporal can carry
    assert context_store.read_document(ref, 0) == "a file named in latin-1\n"


def test_links_in_a_folder_stay_inside_it(context_store: ContextStore, tmp_path: Path):
    outside = tmp_path / "home" / ".aws"
    outside.mkdir(parents=True)
    (outside / "credentials").write_text("aws_secret_access_key = hunter2")
    folder = tmp_path / "untrusted"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "real.txt").write_text("inside")
    (folder / "inner-link.txt").symlink_to(folder / "sub" / "real.txt")
    (folder / "sub-again").symlink_to(folder / "sub")  # its files are listed once, under sub/
    (folder / "loop").symlink_to(folder / "loop")
    (folder / "dangling.txt").symlink_to(folder / "nothing")
    assert [p.relative_to(folder).as_posix() for p in expand_paths([folder])] == ["inner-link.txt", "sub/real.txt"]
    (folder / "notes.txt").symlink_to(outside / "credentials")
    (folder / "config").symlink_to(outside)
    ref = context_store.put_paths([folder])  # a virtualenv's bin/python must not stop a folder either
    assert ref.doc_names_head == ["inner-link.txt", "sub/real.txt"], ref.doc_names_head
    skipped = {s.name: s.reason for s in ref.skipped}
    assert set(skipped) == {"config", "notes.txt"}
    assert skipped["notes.txt"].startswith("a symbolic link to ") and "credentials, outside" in skipped["notes.txt"]
    assert "hunter2" not in context_store.read_all(ref)[0] + context_store.read_all(ref)[1]
    # A link given as the argument itself is the caller's own choice.
    ref = context_store.put_paths([folder / "sub" / "real.txt", outside / "credentials"])
    assert ref.doc_count == 2 and ref.skipped_count == 0


@pytest.mark.parametrize("swap", ["text-file", "inside-link", "converted-file"])
def test_a_file_relinked_out_of_its_folder_after_the_listing_is_not_read(
    context_store: ContextStore, tmp_path: Path, swap
):
    # The listing checks links; a file or a link replaced after it (by a
    # link to ~/.aws/credentials) was read all the same. What is read must
    # be the file listed: compared by device and inode when it is opened.
    outside = tmp_path / "home"
    outside.mkdir()
    secret = outside / ("credentials.xlsx" if swap == "converted-file" else "credentials")
    if swap == "converted-file":
        make_xlsx(secret)
    else:
        secret.write_text("aws_secret_access_key = hunter2")
    folder = tmp_path / "untrusted"
    folder.mkdir()
    (folder / "a.txt").write_text("kept")
    (folder / "b.txt").write_text("listed text")
    (folder / "c.xlsx").write_bytes(make_xlsx(tmp_path / "listed.xlsx").read_bytes())
    if swap == "inside-link":
        (folder / "link.txt").symlink_to(folder / "b.txt")
    files = named_files([folder])
    assert all(f.refused is None for f in files)
    swapped = {"text-file": "b.txt", "inside-link": "link.txt", "converted-file": "c.xlsx"}[swap]
    (folder / swapped).unlink()
    (folder / swapped).symlink_to(secret)
    with pytest.raises(ContextInputError, match=rf"{swapped} is not the file that was listed"):
        context_store.put_files(files, kind="list")
    ref = context_store.put_files(files, kind="list", on_unreadable="skip")
    assert [s.name for s in ref.skipped] == [swapped] and "not the file that was listed" in ref.skipped[0].reason
    stored = "".join(context_store.read_all(ref))
    assert "hunter2" not in stored and "kept" in stored


def test_a_link_is_read_only_to_a_file_the_walk_found(tmp_path: Path):
    # Identities come from the walk itself (os.fwalk, lstat of each entry);
    # a link inside the folder is read only when its target is one of the
    # files walked, so repointing it mid-walk cannot pass. A hidden file is
    # not walked: a link to it is left out, with the reason.
    folder = tmp_path / "audit"
    folder.mkdir()
    (folder / ".env").write_text("TOKEN=hunter2")
    (folder / "a.txt").write_text("a")
    (folder / "to-a.txt").symlink_to(folder / "a.txt")
    (folder / "to-env.txt").symlink_to(folder / ".env")
    files = {f.name: f for f in named_files([folder])}
    assert files["to-a.txt"].refused is None and files["to-a.txt"].identity == files["a.txt"].identity
    assert "not one of the folder's files" in (files["to-env.txt"].refused or "")
    # A folder given through a link is walked (fwalk does not enter a top that is a link).
    (tmp_path / "linked").symlink_to(folder)
    assert sorted(f.name for f in named_files([tmp_path / "linked"])) == ["a.txt", "to-a.txt", "to-env.txt"]


def test_a_file_too_large_to_convert_is_refused_before_it_is_copied(context_store: ContextStore, tmp_path: Path):
    # The converter reads a private copy; a sparse file declaring a terabyte
    # cost its author nothing and filled the scratch disk.
    folder = tmp_path / "docs"
    folder.mkdir()
    with (folder / "huge.pdf").open("wb") as f:
        f.write(b"%PDF-1.4\n")
        f.truncate(1 << 40)
    (folder / "a.txt").write_text("kept")
    ref = context_store.put_paths([folder], on_unreadable="skip")
    [skipped] = ref.skipped
    assert skipped.name == "huge.pdf" and "1,099,511,627,776 bytes, more than the 512 MiB" in skipped.reason


def test_a_converted_file_without_a_suffix_in_a_folder_is_read(context_store: ContextStore, tmp_path: Path):
    # Sniffed as XLSX by its first bytes; the converter reads a private copy
    # named with the kind's suffix (openpyxl refuses a name without one).
    folder = tmp_path / "exports"
    folder.mkdir()
    (folder / "ledger").write_bytes(make_xlsx(tmp_path / "ledger.xlsx").read_bytes())
    ref = context_store.put_paths([folder])
    assert ref.skipped_count == 0 and ref.doc_names_head == ["ledger"]
    assert "|" in context_store.read_all(ref)[0]  # table rows as Markdown


def test_a_folder_that_cannot_be_listed_is_an_error_not_a_gap(tmp_path: Path, monkeypatch):
    folder = tmp_path / "audit"
    (folder / "locked").mkdir(parents=True)
    (folder / "a.txt").write_text("a")
    real_open = os.open

    def open_(path, flags, *args, **kwargs):  # EACCES on one folder, which a root test runner cannot get from chmod
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)
    with pytest.raises(ContextInputError, match=r"cannot list directory .*audit/locked: Permission denied"):
        expand_paths([folder])
