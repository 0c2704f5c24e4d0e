"""`rlm context put` and `rlm context get`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from typing import TYPE_CHECKING

from pydantic import ValidationError

from activities._context_input import paths_bytes
from activities.settings import Settings
from activities.terminal_text import json_text, printable_if_terminal
from cli._errors import UserError

if TYPE_CHECKING:  # the stores pull in the S3 client (minio): imported by the commands that use them
    from activities.context_store import ContextStore
    from workflows.refs import ContextRef

__all__ = ["register"]

_PROGRESS_MIN_BYTES = 16 << 20


class _Progress:
    """A one-line byte counter on a terminal, for uploads worth waiting on."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.enabled = sys.stderr.isatty() and total >= _PROGRESS_MIN_BYTES
        self._last = 0.0

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if self.enabled and (now - self._last > 0.2 or done >= self.total):
            self._last = now
            sys.stderr.write(f"\ruploading {done / 1e6:,.1f} / {self.total / 1e6:,.1f} MB")
            sys.stderr.flush()

    def finish(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def _put(args: argparse.Namespace, settings: Settings) -> int:
    from activities.context_store import ContextStore
    from activities.object_store import ObjectStore

    store = ContextStore(ObjectStore.from_settings(settings))
    paths = [Path(p) for p in args.paths]
    progress = _Progress(paths_bytes(paths))
    try:
        ref = store.put_paths(paths, progress=progress, on_unreadable="skip" if args.skip_unreadable else "fail")
    finally:
        progress.finish()
    sys.stdout.write(json_text(ref.model_dump(mode="json")) + "\n")
    return 0


def _parse_ref(text: str, store: ContextStore) -> ContextRef:
    from workflows.refs import ContextRef

    text = text.strip()
    if text.startswith("{"):
        try:
            return ContextRef.model_validate_json(text)
        except ValidationError as exc:
            raise UserError(f"not a ContextRef JSON: {exc.errors()[0]['msg']}") from None
    if len(text) == 64 and all(c in "0123456789abcdef" for c in text):
        return store.ref_for(text)
    raise UserError(
        "give a context as its sha256 (64 hex digits), as ContextRef JSON, or `-` to read "
        "the JSON printed by `rlm context put` from stdin"
    )


def _get(args: argparse.Namespace, settings: Settings) -> int:
    from activities.context_store import ContextStore
    from activities.object_store import ObjectStore

    store = ContextStore(ObjectStore.from_settings(settings))
    ref = _parse_ref(sys.stdin.read() if args.ref == "-" else args.ref, store)
    if args.doc is not None:
        sys.stdout.write(printable_if_terminal(store.read_document(ref, args.doc)))
        return 0
    value = store.read_all(ref)
    if isinstance(value, str):
        sys.stdout.write(printable_if_terminal(value))
    else:
        sys.stdout.write(json_text(value) + "\n")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    context = subparsers.add_parser("context", help="store contexts in object storage and read them back")
    actions = context.add_subparsers(dest="context_command", required=True, metavar="ACTION")

    put = actions.add_parser(
        "put",
        help="upload a file (one str document), several files or a directory (a list of documents)",
    )
    put.add_argument(
        "paths", nargs="+", metavar="PATH",
        help="files or directories: UTF-8 text (TXT, CSV, JSON, ...) as it is; PDF, DOCX, XLSX, PPTX, HTML "
        "and EML converted to text; each document named by its path under the directory",
    )
    put.add_argument("--skip-unreadable", action="store_true",
                     help="leave out files that cannot be converted (listed in the printed ref's `skipped`)")
    put.set_defaults(handler=_put)

    get = actions.add_parser("get", help="print a stored context (str as text, list as JSON)")
    get.add_argument("ref", metavar="REF", help="sha256, ContextRef JSON, or - for JSON on stdin")
    get.add_argument("--doc", type=int, default=None, help="print only document DOC (0-based)")
    get.set_defaults(handler=_get)
