"""A session's history: how a question tells the model of it, the cell that
appends answers to the REPL's `session_history`, the answers waiting for it,
and what an ask may add to the session's Temporal history. Pure functions
(workflow-safe)."""

from __future__ import annotations

from workflows.result import CHILD_RESULT_BYTES
from workflows.session_models import SESSION_HISTORY_VAR, AskRequest, QuestionAnswer

MAX_UNRECORDED_BYTES = 1024 * 1024
"""Most code (UTF-8) the answers waiting for `session_history` may make (their
cell failed): past it the oldest are dropped. They travel in that cell's input
and in the continue-as-new input; a cell failing for good let them grow past
Temporal's payload limit, and every task of the session failed from then on."""
HISTORY_BUDGET_BYTES = 40 * 1024 * 1024
"""A session continues as new only between questions, so asks accepted back
to back all land in one run's history: each adds its question about three
times (the update, the question's run, the history cell), its result twice
and the waiting answers' cells twice. Past Temporal's history limit (50 MB by
default) the server terminated the session (45 asks of 60,000 control
characters); an ask that would take the history past this is refused
instead, and can be sent again once those waiting are answered."""


def history_code(answers: list[QuestionAnswer]) -> str:
    """A cell that appends `answers` to the REPL's `session_history` (made
    a list again if the model's code rebound the name). It names no builtin
    (`list`, `isinstance`, `globals`): model code that rebound one (`list =
    context.split()`) failed this cell for the rest of the session."""
    items = _history_items(answers)
    name = SESSION_HISTORY_VAR
    return (
        f"try:\n    {name} = {name} if [].__class__.__instancecheck__({name}) else []\n"
        f"except:  # not defined yet\n    {name} = []\n"
        f"[].__class__.extend({name}, {items})\n"
    )


def _history_items(answers: list[QuestionAnswer]) -> str:
    return repr([qa.model_dump(mode="json") for qa in answers])


def newest_that_fit(answers: list[QuestionAnswer]) -> list[QuestionAnswer]:
    """The newest of `answers` whose cell code stays within MAX_UNRECORDED_BYTES
    (the newest one always: a question and its inline answer are well below)."""
    kept, size = 0, 0
    for qa in reversed(answers):
        size += len(_history_items([qa]).encode())
        if kept and size > MAX_UNRECORDED_BYTES:
            break
        kept += 1
    return answers[len(answers) - kept:]


def ask_history_bytes(ask: AskRequest, unrecorded: list[QuestionAnswer]) -> int:
    """The most an ask adds to the session's history (see HISTORY_BUDGET_BYTES)."""
    waiting = 2 * len(history_code(unrecorded).encode()) if unrecorded else 0
    return 3 * len(ask.model_dump_json().encode()) + 2 * CHILD_RESULT_BYTES + waiting


def session_question(question: str, number: int) -> str:
    """The question as the model sees it: with a note on what the REPL holds."""
    if number == 1:
        note = (
            "(This is question 1 of a session: variables you define in the REPL stay there "
            "for the questions that follow.)"
        )
    else:
        note = (
            f"(This is question {number} of a session: the REPL still holds every variable defined "
            f"for earlier questions, and `{SESSION_HISTORY_VAR}` is the list of earlier questions and answers, "
            "oldest first, as dicts with keys 'question', 'answer' and 'status'.)"
        )
    return f"{question}\n\n{note}"
