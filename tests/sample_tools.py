"""Custom tools for tests (`--tools tests.sample_tools:TOOLS`): a ledger and a
vendor registry, an audit service that always fails, and an archive that never answers. Every call is
appended to the file named by RLM_TEST_TOOL_CALLS (when set), so a test can
count the calls a worker in another process made."""

from __future__ import annotations

import json
import os
import threading

CALLS_FILE_ENV = "RLM_TEST_TOOL_CALLS"

LEDGER = {
    1: {"id": 1, "vendor": "Globex", "amount": 99.0},
    3: {"id": 3, "vendor": "Acme", "amount": 120.5},
}


def _count(tool: str, /, **args: object) -> None:
    path = os.environ.get(CALLS_FILE_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps({"tool": tool, "args": args}) + "\n")


def calls(path: str, tool: str | None = None) -> list[dict]:
    """The calls recorded in `path` (of one tool, or all)."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as source:
        rows = [json.loads(line) for line in source if line.strip()]
    return [r for r in rows if tool is None or r["tool"] == tool]


def ledger_lookup(id: int) -> dict:
    """Look up a ledger entry by its numeric id; returns {"id", "vendor", "amount"}."""
    _count("ledger_lookup", id=id)
    if id not in LEDGER:
        raise KeyError(f"no ledger entry {id}")
    return LEDGER[id]


def vendor_registry(name: str, country: str = "US") -> list[str]:
    """Registered vendors whose name contains `name` in a country."""
    _count("vendor_registry", name=name, country=country)
    return [v["vendor"] for v in LEDGER.values() if name.lower() in v["vendor"].lower()]


def audit_flag(entry_id: int, reason: str) -> str:
    """Flag a ledger entry for audit (this audit service is always down)."""
    _count("audit_flag", entry_id=entry_id, reason=reason)
    raise RuntimeError(f"audit service unavailable, entry {entry_id} not flagged")


TOOLS = [ledger_lookup, vendor_registry, audit_flag]

HUNG_RELEASE = threading.Event()
"""Set by a test when it is done: the hung calls' threads may then end."""


def hung_export(batch: int) -> str:
    """Export a batch to the archive (this archive never answers)."""
    _count("hung_export", batch=batch)
    HUNG_RELEASE.wait(120)
    return "exported"


def archive_path(batch: int) -> str:
    """The archive path of a batch (an archive whose file names are not UTF-8)."""
    _count("archive_path", batch=batch)
    raise LookupError(f"no file /archive/caf\udce9-{batch}.pdf")  # a name read with surrogateescape


HUNG_TOOLS = [hung_export, archive_path]


class Opaque:
    pass


def takes_opaque(thing: Opaque) -> str:
    """A tool whose argument has no JSON form."""
    return "never"


BAD_TOOLS = [takes_opaque]
