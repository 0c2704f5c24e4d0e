"""Snapshot benchmark: a REPL holding 100 MB of strings derived from the
context, then a small cell. Prints figures, writes bench/results/snapshots.json.

Run: python bench/bench_snapshots.py [--context-mb 100] [--label after] [--docs N]
`--docs N` splits the context into N documents (a list context, the
back-office folder) and derives the strings from the first half of them.
`--derive lines` (one text context) splits it instead: its lines, those with
a word starting "ab", and prompts of fifty of those; `--derive words` into
its words (`context.split()`), and those starting "ab".
It also runs against code without value records (the snapshot is then one
pickle uploaded whole), so the same script measures before and after:
    PYTHONPATH=<old checkout> python bench/bench_snapshots.py --label before
Target (issue 13): the small cell's snapshot (guest pickle + upload) < 50 ms.
Private Temporal + S3 servers are started (only S3 is used).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import RESULTS_DIR, machine_info, private_services, split_into_files  # noqa: E402

from activities.object_store import ObjectStore  # noqa: E402
from sandbox_wasm import ReplSession, SandboxLimits  # noqa: E402

try:  # absent before value records existed
    from activities._snapshot_store import SnapshotStore
except ImportError:
    SnapshotStore = None

BIG_CELL = (
    "chunks = [context[i:i + 200_000] for i in range(0, {half}, 200_000)]\n"
    "prompts = ['Summarize this part of the report:\\n' + c + '\\nAnswer briefly.' for c in chunks]\n"
)
BIG_CELL_DOCS = (
    "chunks = context[:len(context) // 2]\n"
    "prompts = ['Summarize this part of the report:\\n' + c + '\\nAnswer briefly.' for c in chunks]\n"
)
# --derive batches: prompts of ten documents each (a list context only);
# --derive shuffled: the same of every other document, in a random order.
BATCH_PROMPTS = (
    "prompts = ['Summarize these reports:\\n' + '\\n\\n'.join(chunks[i:i + 10]) + '\\nAnswer briefly.'"
    " for i in range(0, len(chunks), 10)]\n"
)
BIG_CELL_DERIVED = {
    "prompts": BIG_CELL_DOCS,
    "batches": "chunks = context[:len(context) // 2]\n" + BATCH_PROMPTS,
    "shuffled": "import random\npicked = context[::2]\nchunks = random.Random(7).sample(picked, len(picked))\n"
                + BATCH_PROMPTS,
}
# --derive lines: a text context's lines, those with a word starting "ab",
# and prompts of fifty of them each.
BIG_CELL_LINES = (
    "chunks = context.split('\\n')\n"
    "hits = [line for line in chunks if ' ab' in line]\n"
    "prompts = ['Find the errors in:\\n' + '\\n'.join(hits[i:i + 50]) + '\\nList them.'"
    " for i in range(0, len(hits), 50)]\n"
)
# --derive words: a text context's words (runs of whitespace between them),
# and those starting "ab".
BIG_CELL_WORDS = (
    "chunks = context.split()\n"
    "prompts = [word for word in chunks if word.startswith('ab')]\n"
)
RESTORED_CHECK = {
    "words": "len(chunks), len(prompts), best, chunks[:5] == context.split(None, 5)[:5],"
             " prompts[:3] == [w for w in context[:100_000].split() if w.startswith('ab')][:3]",
    "lines": "len(chunks), len(prompts), best, '\\n'.join(chunks[:9]) == context[:len('\\n'.join(chunks[:9]))],"
             " prompts[3] == 'Find the errors in:\\n' + '\\n'.join(hits[150:200]) + '\\nList them.'",
    "prompts": "len(chunks), len(prompts), best, prompts[7][35:60] == chunks[7][:25]",
    "batches": "len(chunks), len(prompts), best, prompts[7][25:50] == chunks[70][:25]",
    "shuffled": "len(chunks), len(prompts), best, prompts[7][25:50] == chunks[70][:25]",
}
SMALL_CELL = "answers = ['answer %d' % i for i in range(250)]\nstep = {step}\nbest = max(answers)\n"


def make_context(path: Path, megabytes: int) -> None:
    """Prose-like text that does not repeat (random words and punctuation)."""
    rng = random.Random(13)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choices(letters, k=rng.randint(2, 10))) for _ in range(20_000)]
    with open(path, "w", encoding="utf-8") as handle:
        written = 0
        while written < megabytes * 1024**2:
            picked = rng.choices(words, k=200_000)
            for i in range(11, len(picked), 12):
                picked[i] += rng.choice((".\n", ",", ";", "."))
            block = " ".join(picked) + "\n"
            handle.write(block)
            written += len(block)


def timed(fn):
    began = time.perf_counter()
    value = fn()
    return time.perf_counter() - began, value


class Saver:
    """Uploads a snapshot the way run_cell does (or did, before records)."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self.snapshots = SnapshotStore(store) if SnapshotStore else None
        self.locations: dict = {}
        self.count = 0

    def save(self, session: ReplSession) -> dict:
        self.count += 1
        key = f"runs/bench/snapshots/{self.count}.bin"
        snap_s, snap = timed(session.snapshot)
        if self.snapshots is None:
            upload_s, _ = timed(lambda: self.store.put_bytes(key, snap.data))
            return {"snapshot_s": snap_s, "upload_s": upload_s, "bytes_uploaded": len(snap.data), "key": key}
        if snap.unchanged:
            return {"snapshot_s": snap_s, "upload_s": 0.0, "bytes_uploaded": 0, "key": None}
        upload_s, self.locations = timed(lambda: self.snapshots.save(key, snap, self.locations))
        uploaded = len(snap.data) + sum(len(v) for v in snap.new_records.values())
        return {"snapshot_s": snap_s, "upload_s": upload_s, "bytes_uploaded": uploaded, "key": key,
                "records_new": len(snap.new_records), "records_referenced": len(snap.refs)}

    def restore(self, session: ReplSession, key: str) -> dict:
        if self.snapshots is None:
            fetch_s, data = timed(lambda: self.store.get_bytes(key))
            restore_s, _ = timed(lambda: session.restore(data))
        else:
            fetch_s, stored = timed(lambda: self.snapshots.load(key))
            restore_s, _ = timed(lambda: session.restore(stored.state, stored.records))
        return {"fetch_s": fetch_s, "restore_s": restore_s}


def rounded(figures: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--context-mb", type=int, default=100)
    parser.add_argument("--label", default=None, help="results key (default: after, or docs_N)")
    parser.add_argument("--docs", type=int, default=0, help="split the context into N documents")
    parser.add_argument("--derive", choices=sorted(RESTORED_CHECK), default="prompts",
                        help="what the big cell makes: a prompt per chunk, or per ten documents, in order or"
                             " shuffled (with --docs)")
    args = parser.parse_args()
    if args.derive not in ("prompts", "lines", "words") and not args.docs:
        parser.error(f"--derive {args.derive} needs --docs")
    if args.derive in ("lines", "words") and args.docs:
        parser.error(f"--derive {args.derive} splits one text: no --docs")
    args.label = args.label or (f"docs_{args.docs}" if args.docs else "after" if SnapshotStore else "before")
    limits = SandboxLimits(cell_timeout_s=600.0, memory_bytes=3 * 1024**3, admin_timeout_s=600.0)
    result: dict = {"label": args.label, "load_avg_at_start": os.getloadavg(), "derive": args.derive,
                    "value_records": SnapshotStore is not None, "documents": args.docs or 1}
    with tempfile.TemporaryDirectory() as tmp, private_services() as services:
        store = ObjectStore.from_settings(services.settings)
        store.ensure_bucket()
        context = Path(tmp) / "context.txt"
        make_context(context, args.context_mb)
        result["context_bytes"] = context.stat().st_size
        half = context.stat().st_size // 2 // 200_000 * 200_000
        files, kind = ([context], "str") if not args.docs else (split_into_files(context.read_text(encoding="utf-8"), args.docs, context.parent), "list")
        big_cell = BIG_CELL_DERIVED[args.derive] if args.docs else \
            BIG_CELL_LINES if args.derive == "lines" else BIG_CELL_WORDS if args.derive == "words" \
            else BIG_CELL.format(half=half)
        saver = Saver(store)
        with ReplSession(limits=limits).start() as session:
            session.load_context(files, kind)
            if hasattr(session, "wait_context_index"):
                result["context_index_s"] = round(timed(session.wait_context_index)[0], 3)
            session.run_cell("import cloudpickle")  # its import is not a snapshot's cost
            cell = session.run_cell(big_cell + "sum(map(len, chunks)) + sum(map(len, prompts))")
            assert cell.error is None, cell.error
            result["derived_chars"] = int(cell.value_repr)
            result["after_big_cell"] = rounded(saver.save(session))
            small = []
            for step in range(5):
                cell_s, cell = timed(lambda: session.run_cell(SMALL_CELL.format(step=step)))  # noqa: B023
                assert cell.error is None, cell.error
                small.append(rounded({"cell_s": cell_s} | saver.save(session)))
            result["after_small_cell"] = small
            totals = sorted(s["snapshot_s"] + s["upload_s"] for s in small)
            result["small_cell_snapshot_plus_upload_ms_median"] = round(totals[2] * 1000, 1)
            session.run_cell("x = len(prompts)")
            session.run_cell("del x")
            result["after_cell_changing_nothing"] = rounded(saver.save(session))
            last_key = saver.save(session)["key"] or small[-1]["key"]
        with ReplSession(limits=limits).start() as fresh:
            began = time.perf_counter()
            fresh.load_context(files, kind)
            cold = saver.restore(fresh, last_key)
            check = fresh.run_cell(RESTORED_CHECK[args.derive])
            cold["total_s"] = time.perf_counter() - began
            assert check.error is None and check.value_repr.endswith("True)"), check
            result["cold_restore"] = rounded(cold)
            fresh.run_cell("import cloudpickle")
            first = rounded(saver.save(fresh))  # a cell after a cold restore
            result["first_snapshot_after_cold_restore"] = first
    result["target_small_cell_under_50ms"] = result["small_cell_snapshot_plus_upload_ms_median"] < 50
    result["load_avg_at_end"] = os.getloadavg()
    print(json.dumps(result, indent=2))
    path = RESULTS_DIR / "snapshots.json"
    existing = json.loads(path.read_text()) if path.exists() else {}
    existing.update({"benchmark": "snapshots", "machine": machine_info(), args.label: result})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(existing, indent=2) + "\n")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
