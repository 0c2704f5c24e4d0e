"""The run tree the chaos suite disturbs: a root run whose cell makes a
batch of sub-calls and starts two child runs (depth 1), each of which makes
its own batch and starts a grandchild (depth 2). Every run continues as new
after its first turn (`continue_after_updates=1`), so chains run in children
too. The scripted models make the answer a pure function of the tree's work.

`install(llm, kill_point)` scripts the model server; for a kill point that
needs a model call in flight it adds a held rule (answering one request,
then the plain rule answers the retry), and for the two cell points it puts
a wait into the root cell that leaves room to kill the worker at that spot.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field

from tests.fake_llm import FakeLLM, FakeRequest, Rule
from tests.run_harness import ROOT, SUB, repl, request
from workflows.refs import ContextRef
from workflows.request import RunRequest

KILL_POINTS = (
    "root_turn",  # the root model call of turn 1 is in flight
    "cell_before_subcalls",  # the root cell runs and has sent no sub-call yet
    "cell_after_subcalls",  # the root cell's sub-calls (and child runs) are answered; the cell goes on
    "child_root_turn",  # a child's first root model call is in flight
    "child_cell",  # a child's cell waits on its grandchild, whose sub-call is in flight
    "continue_as_new",  # the root run has just continued as new
)
ROOT_CONTEXT = "alpha beta gamma"
KID_CONTEXTS = {"kid-one": "k1 red green", "kid-two": "k2 blue"}
# Time a cell waits at a kill point: room for the test to see the cell there
# and kill the worker (it kills as soon as it sees it; the wait is not the sync).
CELL_WINDOW_S = 8.0


def root_cell(kill_point: str | None) -> str:
    before = f"import time\ntime.sleep({CELL_WINDOW_S})\n" if kill_point == "cell_before_subcalls" else ""
    after = f"import time\ntime.sleep({CELL_WINDOW_S})\n" if kill_point == "cell_after_subcalls" else ""
    kids = ", ".join(repr(k) for k in KID_CONTEXTS)
    contexts = ", ".join(repr(c) for c in KID_CONTEXTS.values())
    return (
        before
        + "parts = llm_query_batched(['w ' + x for x in context.split()])\n"
        + f"kids = rlm_query_batched([{kids}], contexts=[{contexts}])\n"
        + after
        + "print('ROOT', len(parts), len(kids))"
    )


KID_CELL = (
    "a = llm_query_batched(['c ' + w for w in context.split()])\n"
    "g = rlm_query('grand-' + context.split()[0], context=context)\n"
    "print('KID', len(a))"
)
GRAND_CELL = "FINAL('G(' + llm_query('g ' + context) + ')')"


def question(r: FakeRequest) -> str:
    m = re.search(r"Question: (\S+)", r.all_text)
    return m.group(1) if m else ""


def turn(r: FakeRequest) -> int:
    m = re.search(r"Turn (\d+) of", r.last_user_text)
    return int(m.group(1)) if m else 0


def root_reply(kill_point: str | None):
    def reply(r: FakeRequest) -> str:
        q, t = question(r), turn(r)
        if q == "root":
            return repl(root_cell(kill_point)) if t == 1 else repl("FINAL(repr(parts) + ' # ' + repr(kids))")
        if q in KID_CONTEXTS:
            return repl(KID_CELL) if t == 1 else repl("FINAL(' '.join(a) + ' / ' + g)")
        if q.startswith("grand-"):
            return repl(GRAND_CELL)
        raise ValueError(f"no script for question {q!r} turn {t}")

    return reply


def sub_reply(r: FakeRequest) -> str:
    return "<" + r.last_user_text.upper() + ">"


@dataclass
class Script:
    """The rules of one run of the tree, and the held rule of its kill point."""

    held: Rule | None = None
    release: threading.Event = field(default_factory=threading.Event)


def install(llm: FakeLLM, kill_point: str | None = None) -> Script:
    script = Script()
    llm.add_rule(None, root_reply(kill_point), model=ROOT, name="root")
    llm.add_rule(None, sub_reply, model=SUB, name="sub")
    held = {
        "root_turn": (ROOT, lambda r: question(r) == "root" and turn(r) == 1),
        "child_root_turn": (ROOT, lambda r: question(r) == "kid-one" and turn(r) == 1),
        "child_cell": (SUB, lambda r: r.last_user_text == "g " + KID_CONTEXTS["kid-one"]),
        # Holds the new run's first root call, so the kill lands at the boundary.
        "continue_as_new": (ROOT, lambda r: question(r) == "root" and turn(r) == 2),
    }.get(kill_point or "")
    if held is not None:
        model, match = held
        reply = root_reply(kill_point) if model == ROOT else sub_reply
        script.held = llm.add_rule(match, reply, model=model, name="held", times=1, hold=script.release)
    return script


def tree_request(context: ContextRef) -> RunRequest:
    return request(
        "root",
        context,
        caps={"max_depth": 2, "max_concurrency": 8},
        limits={"continue_after_updates": 1, "cell_timeout_s": 30.0},
    )
