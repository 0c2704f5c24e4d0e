"""Document conversion candidates compared: speed, table fidelity, weight.

Each candidate gets its own virtualenv (made under --venvs if missing, with
pip), so installed size, package count and import time are its own. Sample
files are real files written by python-docx, openpyxl, python-pptx and fpdf2
(tests/document_files.py), each holding the same 3-row table; a converter
"keeps" the table when every row's cells appear in order on one line.

Candidates converted here:
- ours: pypdf + python-docx + openpyxl + python-pptx, HTML and EML with the
  Python stdlib (activities/documents, what the engine uses);
- markitdown[pdf,docx,xlsx,pptx].
Candidates weighed only (a dry-run install report: they are not converted
here because their PDF pipelines need model weights fetched at run time):
docling, unstructured[pdf,docx,xlsx,pptx].

    python bench/bench_documents.py [--venvs DIR] [--repeats 5]

Writes bench/results/documents.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.document_files import TABLE, csv_bytes, make_all, make_xlsx  # noqa: E402

RESULT = ROOT / "bench" / "results" / "documents.json"
PROBE = ROOT / "bench" / "_documents_probe.py"
INSTALLS = {
    "ours": ["pypdf", "python-docx", "openpyxl", "python-pptx", "defusedxml"],
    "markitdown": ["markitdown[pdf,docx,xlsx,pptx]"],
}
IMPORTS = {
    "ours": "import pypdf, docx, openpyxl, pptx, html.parser, email",
    "markitdown": "import markitdown; markitdown.MarkItDown()",
}
WEIGHED_ONLY = {"docling": ["docling"], "unstructured": ["unstructured[pdf,docx,xlsx,pptx]"]}
NO_TABLE = ("text", "big_csv")
HEAVY = ("torch", "onnxruntime", "transformers", "pandas", "numpy", "opencv-python", "scipy", "magika", "nltk")


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=True, **kw)


def venv(root: Path, name: str, packages: list[str]) -> Path:
    """The candidate's virtualenv python, made and filled if missing."""
    python = root / name / "bin" / "python"
    if not python.exists():
        print(f"making venv {name}: pip install {' '.join(packages)}", flush=True)
        run([sys.executable, "-m", "venv", str(root / name)])
        if packages:
            run([str(python), "-m", "pip", "install", "-q", *packages])
    return python


def weight(python: Path, baseline: Path) -> dict:
    def site_bytes(py: Path) -> int:
        site = run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
        return sum(f.stat().st_size for f in Path(site).rglob("*") if f.is_file())

    def dists(py: Path) -> set[str]:
        out = run([str(py), "-m", "pip", "list", "--format", "json"]).stdout
        return {d["name"].lower() for d in json.loads(out)}

    added = sorted(dists(python) - dists(baseline))
    return {
        "installed_mb": round((site_bytes(python) - site_bytes(baseline)) / 1e6, 1),
        "distributions": len(added),
        "heavy": [d for d in added if d in HEAVY],
        "packages": added,
    }


def import_s(python: Path, statement: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run([str(python), "-c", statement], env={**os.environ, "PYTHONPATH": str(ROOT)})
        times.append(time.perf_counter() - t)
    base = []
    for _ in range(repeats):
        t = time.perf_counter()
        run([str(python), "-c", "pass"])
        base.append(time.perf_counter() - t)
    return round(sorted(times)[len(times) // 2] - sorted(base)[len(base) // 2], 3)


def dry_run(name: str, packages: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        try:
            run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q",
                 "--report", str(report), *packages], timeout=600)
        except (subprocess.SubprocessError, OSError) as exc:
            return {"error": str(exc)[:300]}
        items = json.loads(report.read_text())["install"]
    names = sorted(i["metadata"]["name"].lower() for i in items)
    return {"distributions": len(names), "heavy": [n for n in names if n in HEAVY or n.startswith("nvidia-")][:20],
            "nvidia_packages": sum(n.startswith("nvidia-") for n in names)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--venvs", type=Path, default=Path(tempfile.gettempdir()) / "rlm-docbench")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-dry-run", action="store_true", help="do not weigh docling and unstructured again (keep the figures of the last result)")
    args = parser.parse_args()
    load_start = os.getloadavg()
    baseline = venv(args.venvs, "baseline", [])
    with tempfile.TemporaryDirectory() as tmp:
        files = make_all(Path(tmp) / "samples")
        files["big_xlsx"] = make_xlsx(Path(tmp) / "big.xlsx", rows=20_000)
        files["big_csv"] = Path(tmp) / "big.csv"
        files["big_csv"].write_bytes(csv_bytes(200_000))
        candidates = {}
        for name, packages in INSTALLS.items():
            python = venv(args.venvs, name, packages)
            figures = {"install": packages, **weight(python, baseline), "import_s": import_s(python, IMPORTS[name], 3)}
            per_kind = {}
            for kind, path in files.items():
                repeats = 1 if kind.startswith("big") else args.repeats
                table = [] if kind in NO_TABLE else TABLE  # files without the table: not judged
                out = subprocess.run(
                    [str(python), str(PROBE), name, str(path), str(repeats), json.dumps(table)],
                    capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=900,
                )
                per_kind[kind] = json.loads(out.stdout) if out.returncode == 0 else {"error": out.stderr[-300:]}
                shown = per_kind[kind]
                print(f"{name:10} {kind:9} median {shown.get('median_s')} s  rss {shown.get('max_rss_mb')} MB  "
                      f"table {shown.get('table_kept')}  {shown.get('error') or ''}", flush=True)
            figures["files"] = per_kind
            candidates[name] = figures
            print(f"{name}: {figures['installed_mb']} MB, {figures['distributions']} distributions, "
                  f"heavy {figures['heavy']}, import {figures['import_s']} s", flush=True)
    if args.skip_dry_run:  # keep what the last run weighed
        weighed = json.loads(RESULT.read_text()).get("weighed_only", {}) if RESULT.exists() else {}
    else:
        weighed = {n: dry_run(n, p) for n, p in WEIGHED_ONLY.items()}
    for name, figures in weighed.items():
        print(f"{name} (dry run): {figures}", flush=True)
    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_avg_at_start": load_start, "load_avg_at_end": os.getloadavg()},
        "table": TABLE,
        "candidates": candidates,
        "weighed_only": weighed,
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {RESULT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
