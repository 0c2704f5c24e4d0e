"""Folders and S3 prefixes of mixed files become named documents: PDF, DOCX,
XLSX, PPTX, HTML and EML converted to text, text files as they are. The
root model sees names and sizes; the REPL gets a document by name. A file
that cannot be converted ends the run with it named, or with
`on_unreadable: "skip"` is left out and listed. Real worker, Temporal, S3
(SeaweedFS) and WASM; the model scripted through litellm."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path

import pytest

from activities.context_store import ContextInputError, ContextStore
from tests.document_files import make_all, make_hostile
from tests.fixtures_llm import fake_registry
from tests.run_harness import ROOT, isolated, repl, running_worker, start
from workflows.names import WORKFLOW_RLM_RUN
from workflows.result import RunResult

REPO = Path(__file__).resolve().parent.parent
NAMES = [
    "contract.docx", "data.json", "invoice.pdf", "mail.eml", "more/deck.pptx", "more/ledger.xlsx",
    "notes.txt", "page.html", "table.csv",
]  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("docs") / "docs"
    make_all(root)
    return root


def test_a_folder_becomes_documents_named_by_their_path(context_store: ContextStore, folder: Path):
    ref = context_store.put_paths([folder])
    assert ref.kind == "list" and ref.doc_names_head == NAMES
    docs = dict(zip(NAMES, context_store.read_all(ref), strict=True))
    assert "| INV-001 | Acme Corp | 1200 |" in docs["contract.docx"]
    assert "--- page 1 ---" in docs["invoice.pdf"] and "## Sheet: Invoices" in docs["more/ledger.xlsx"]
    assert docs["table.csv"] == (folder / "table.csv").read_text()  # text: stored as it is
    manifest = context_store.manifest(ref)
    assert [d.encoding for d in manifest.documents][:3] == ["docx", "utf-8", "pdf"]
    assert ref.skipped == [] and ref.skipped_count == 0


def test_a_single_file_is_a_str_context_named_by_its_path(context_store: ContextStore, folder: Path):
    ref = context_store.put_paths([folder / "invoice.pdf"])
    assert ref.kind == "str" and ref.doc_names_head == [str(folder / "invoice.pdf")]
    assert "Quarterly invoices" in context_store.read_all(ref)


def test_contexts_without_names_keep_their_manifest_and_hash(context_store: ContextStore):
    """Inline texts have no names: their manifest JSON has no new keys, so a
    context stored before documents had names keeps its sha256."""
    ref = context_store.put_documents(["alpha", "beta"])
    assert ref.doc_names_head == []
    data = json.loads(context_store.store.get_bytes(ref.manifest_key))
    assert "skipped" not in data and all("name" not in d for d in data["documents"])


def test_an_unreadable_file_fails_the_put_or_is_skipped_and_listed(context_store: ContextStore, tmp_path: Path):
    folder = tmp_path / "mixed"
    make_all(folder)
    hostile = make_hostile(folder / "bad")
    with pytest.raises(ContextInputError, match=r"file .*bad/bomb\.docx cannot be converted to text: .*zip bomb"):
        context_store.put_paths([folder])
    ref = context_store.put_paths([folder], on_unreadable="skip")
    skipped = {s.name: s.reason for s in ref.skipped}
    assert set(skipped) == {f"bad/{p.name}" for p in hostile.values()}, skipped
    assert "needs a password" in skipped["bad/locked.pdf"] and "looks binary" in skipped["bad/image.bin"]
    assert str(folder) not in " ".join(skipped.values())  # named by the document name, not our path
    assert ref.skipped_count == len(hostile) and ref.doc_names_head == NAMES
    with pytest.raises(ContextInputError, match=r"no readable file in .*: all 7 were skipped"):
        context_store.put_paths([folder / "bad"], on_unreadable="skip")


def test_rlm_context_put_converts_a_folder(settings, folder: Path, tmp_path: Path):
    """The local path (`rlm context put`, as `rlm run --context`) uses the same converter."""
    env = {**os.environ, **settings.to_env()}
    out = subprocess.run(
        [sys.executable, "-m", "cli.main", "context", "put", str(folder)],
        capture_output=True, text=True, timeout=120, env=env, cwd=REPO,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["doc_names_head"] == NAMES


def _upload(object_store, folder: Path, prefix: str) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            object_store.put_bytes(prefix + path.relative_to(folder).as_posix(), path.read_bytes())


def test_a_run_over_an_s3_prefix_reads_a_document_by_name(settings, object_store, llm, folder: Path, tmp_path):
    """Started with JSON alone over an S3 prefix of mixed files plus a corrupt
    PDF: with `fail` the run ends naming the object; with `skip` the model
    sees names and sizes, reads `document("more/ledger.xlsx")`, and the
    result lists the skipped file."""
    prefix = f"mixed-{uuid.uuid4().hex[:8]}/"
    _upload(object_store, folder, prefix)
    object_store.put_bytes(prefix + "scans/broken.pdf", b"%PDF-1.7\n\x00\x01 truncated")
    code = (
        "names = document_names()\n"
        "ledger = document('more/ledger.xlsx')\n"
        "document = 'overwritten'\n"
        "FINAL(f\"{len(names)} docs; first {names[0]}; \" + [l for l in ledger.splitlines() if 'INV-002' in l][0])"
    )
    llm.add_rule(None, repl(code), model=ROOT, name="root")
    uri = f"s3://{object_store.bucket}/{prefix}"
    s = isolated(settings)

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            results = {}
            for mode in ("fail", "skip"):
                payload = {"question": "q?", "context": {"uri": uri}, "models": {"root": ROOT}, "on_unreadable": mode}
                handle = await client.start_workflow(
                    WORKFLOW_RLM_RUN, payload, id=f"docs-{mode}-{uuid.uuid4().hex[:8]}",
                    task_queue=s.task_queue, result_type=RunResult,
                )  # fmt: skip
                results[mode] = await asyncio.wait_for(handle.result(), 120)
            return results

    results = asyncio.run(go())
    failed = results["fail"]
    assert failed.status == "failed" and failed.reason.startswith("context.uri: "), failed
    assert f"{uri}scans/broken.pdf cannot be converted to text: not a readable PDF" in failed.reason
    done = results["skip"]
    assert done.status == "completed", done
    assert done.answer == "9 docs; first contract.docx; | INV-002 | Globex | 560 |"
    assert [(d.name, d.reason[:20]) for d in done.skipped_documents] == [("scans/broken.pdf", "not a readable PDF (")]
    assert done.skipped_count == 1
    first = llm.requests(model=ROOT)[0].all_text
    assert "contract.docx (" in first and "more/ledger.xlsx (" in first and "`document(name)`" in first
    assert "1 unreadable file(s) were left out: scans/broken.pdf (not a readable PDF" in first


def test_odd_objects_under_a_prefix_are_named_or_skipped_not_a_run_failure(settings, object_store, llm):
    """S3 allows what a file system does not (a key that is also the folder of
    other keys), and an extensionless object may be a damaged zip that breaks
    zipfile with NotImplementedError: the first fails the run naming the key
    (it was an OSError with the worker's scratch path, retried), the second is
    skipped when the caller allows it (it failed the run as `zip file version 14.4`)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("word/document.xml", "<w/>")
    damaged = bytearray(buffer.getvalue())
    central = damaged.index(b"PK\x01\x02")
    damaged[central + 6 : central + 8] = (144).to_bytes(2, "little")
    clash, odd = (f"{name}-{uuid.uuid4().hex[:8]}/" for name in ("clash", "odd"))
    object_store.put_bytes(clash + "a", b"a file")
    object_store.put_bytes(clash + "a/b", b"a file in a folder named like it")
    object_store.put_bytes(odd + "scan0001", bytes(damaged))
    object_store.put_bytes(odd + "ok.txt", b"readable text")
    llm.add_rule(None, repl("FINAL(document_names())"), model=ROOT)
    s = isolated(settings)

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            results = []
            for prefix in (clash, odd):
                payload = {
                    "question": "q?", "context": {"uri": f"s3://{object_store.bucket}/{prefix}"},
                    "models": {"root": ROOT}, "on_unreadable": "skip",
                }  # fmt: skip
                results.append(await asyncio.wait_for((await start(client, s, payload)).result(), 120))
            return results

    clashed, skipped = asyncio.run(go())
    assert clashed.status == "failed" and clashed.reason.startswith("context.uri: object key "), clashed
    assert f"{clash}a" in clashed.reason and "also the folder of other keys" in clashed.reason
    assert "/cache/ingest/" not in clashed.reason
    assert skipped.status == "completed" and skipped.answer == "['ok.txt']", skipped
    assert [(d.name, d.reason[:27]) for d in skipped.skipped_documents] == [("scan0001", "not a readable zip archive ")]
