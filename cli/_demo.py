"""`rlm demo`: a needle-in-a-haystack job over a generated document far
larger than any model's window, to see an RLM work on this machine.

The same generator serves the local-model test and the accuracy benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
from pathlib import Path

from activities.terminal_text import printable

__all__ = ["make_task", "register"]

_WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there would their we him been has when who will more no if out so said what up its "
    "about into than them can only other new some could time these two may then do first any my now such like "
    "our over man me even most made after also did many before must through back years where much your way "
    "well down should because each just those people how too little state good very make world still own see "
    "men work long get here between both life being under never day same another know while last might us "
    "great old year off come since against go came right used take three"
).split()
CHARS_PER_TOKEN = 4


def make_task(kind: str, seed: int, n_chars: int) -> tuple[str, str, str]:
    """(document, question, expected answer) for `needle` or `count`."""
    rng = random.Random(seed)
    lines, total = [], 0
    while total < n_chars:
        line = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(8, 16))).capitalize() + "."
        lines.append(line)
        total += len(line) + 1
    if kind == "needle":
        code = f"{rng.choice(['ORCHID', 'TULIP', 'MAPLE', 'CEDAR', 'LOTUS'])}-{rng.randint(1000, 9999)}"
        lines.insert(rng.randrange(len(lines)), f"The secret code is {code}.")
        return "\n".join(lines), "What is the secret code?", code
    if kind == "count":
        n = rng.randint(3, 12)
        for _ in range(n):
            lines.insert(rng.randrange(len(lines)), "ALERT: sensor fault reported.")
        return "\n".join(lines), "How many lines say 'ALERT: sensor fault reported.'?", str(n)
    raise ValueError(f"unknown task kind {kind!r}: use 'needle' or 'count'")


def is_correct(kind: str, answer: str | None, expected: str) -> bool:
    if answer is None:
        return False
    if kind == "needle":
        return expected.lower() in answer.lower()
    return answer.strip().strip(".").split()[0:1] == [expected] if answer.strip() else False


def register(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="run a needle-in-a-haystack job over a generated document")
    demo.add_argument("--tokens", type=int, default=1_000_000, help="document size in tokens (about 4 chars each)")
    demo.add_argument("--kind", choices=["needle", "count"], default="needle")
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--model", default=None, help="root model (default: as `rlm run`)")
    demo.set_defaults(handler=_cmd_demo)


def _cmd_demo(args: argparse.Namespace, settings) -> int:
    from cli._progress import ProgressPrinter
    from cli._run_checks import RunOptions
    from cli._run_client import RunClient

    path = Path(settings.data_dir) / "demo" / f"{args.kind}-{args.tokens}-{args.seed}.txt"
    text, question, expected = make_task(args.kind, args.seed, args.tokens * CHARS_PER_TOKEN)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    progress = ProgressPrinter(sys.stderr)
    progress.note(f"document: {path} ({len(text):,} characters, about {args.tokens:,} tokens)")
    progress.note(f"question: {question}")

    async def go() -> int:
        client = await RunClient.open(settings, progress=progress)
        opts = RunOptions(question=question, context_paths=[path], model=args.model, sub_model=None)
        result = await client.run(opts)
        ok = is_correct(args.kind, result.answer, expected)
        print(printable(result.answer) if result.answer is not None else "(no answer)")
        print(
            f"\nexpected: {expected} -> {'correct' if ok else 'WRONG'} | status: {result.status} | "
            f"turns: {result.turns} | tokens: {result.spend.tokens:,} | model calls: {result.spend.calls}",
            file=sys.stderr,
        )
        print(f"run: {client.ui_link(result.workflow_id)}", file=sys.stderr)
        return 0 if ok else 3

    return asyncio.run(go())
