"""The messages the root model sees: system prompts per profile and per-turn user messages.

Pure and deterministic (built inside the workflow); the texts are module-level
data, the functions only fill them in. From the reference engine's lessons
(DESIGN.md section 8): the model sees metadata of `context`, never the context;
every turn is numbered "turn i of N" and the first forbids answering unseen;
only printed output reaches the model, and a silent cell is called silent; the
REPL output and the next instruction are ONE user message (strict chat
templates reject two in a row); the request for a final answer is a user
message, never an assistant message.

Profiles: "full" is the paper-style RLM prompt for large hosted models;
"compact" a short few-shot prompt for small local models (a 1.5B model solved
5/5 tasks with a short few-shot prompt, 0/5 with a plain one), sent with the
stop sequence `COMPACT_STOP` so the model cannot invent the next turn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from workflows._context_meta import ContextMeta, describe_context

__all__ = [
    "COMPACT_STOP", "REASON_FINAL_BEFORE_LOOKING", "REASON_NO_ACTION", "CellReport", "ContextMeta",
    "final_request_message", "first_user_message", "merge_consecutive", "missing_variable_reason",
    "nudge_message", "stop_sequences", "system_prompt", "turn_message",
]

COMPACT_STOP = ["\nUser:", "\nQuestion:"]
"""Stop sequences for the compact profile: the few-shot example shows `User:`
after each code block, so the model stops there instead of inventing output;
after its FINAL it tends to go on with the next "Question:" of the pattern
(measured: ~50 wasted tokens a run). Pass a copy (`stop_sequences("compact")`);
do not mutate."""

Profile = Literal["full", "compact"]

# How many document lengths the first message lists (ContextRef keeps up to 100).

_FULL_INTRO = """\
You answer a question about a context that lives in a Python REPL. You cannot see the context: \
you explore, transform and analyse it by writing code, and you can query sub-LLMs from that code, \
which you are encouraged to do. You will be prompted turn by turn until you give a final answer.

The REPL starts with:"""

_FULL_CONTEXT_ITEM = """\
- `context`: the data the question is about (a `str`, or a `list[str]` of documents). It is never \
shown to you; the first message gives its type and size. Look at it with code."""

_FULL_LLM_ITEMS = """\
- `llm_query(prompt: str, model: str | None = None) -> str`: ask a sub-LLM. Put the text it must \
read into the prompt; keep each prompt under about 100,000 characters.
- `llm_query_batched(prompts: list[str], model: str | None = None) -> list[str]`: many llm_query \
calls in parallel, far faster than a loop. Answers keep the order of the prompts; an item that \
fails comes back as an error message in its place."""

_FULL_RLM_ITEMS = """\
- `rlm_query(question: str, context=None, model: str | None = None) -> str`: a child RLM with its \
own REPL whose `context` is the value you pass; use it for a sub-task that itself needs code, \
e.g. one large document.
- `rlm_query_batched(questions: list[str], contexts: list | None = None, model: str | None = None) \
-> list[str]`: several child RLMs in parallel, answers in order."""

_FULL_RLM_AT_DEPTH_CAP = """\
- `rlm_query(question, context=None, model=None)` and `rlm_query_batched(questions, contexts=None, \
model=None)`: at this depth they fall back to a plain llm_query on question + context; prefer \
llm_query / llm_query_batched."""

_FULL_TOOL_ITEMS = """\
- `SHOW_VARS()`: list the variables you have defined.
- `FINAL(answer)` and `FINAL_VAR("name")` may also be called in code: the run ends after that cell \
with the answer, or with the value of the variable `name`.
These names are restored after each cell if your code reassigns them. Variables persist across \
cells and turns."""

_FULL_RULES = """\
Write code in ```repl fences. Several blocks in one reply run in order; then stop and wait: the \
REPL output comes in the next message. Never write the output yourself, and do not put FINAL \
in a reply whose code you have not seen run.
Only what you print() reaches you, and long output is truncated: a bare expression on the last \
line shows nothing (this is not a notebook). Print summaries, counts and short excerpts, not \
whole documents.

Work as an orchestrator:
1. Look first: type, length, a short slice, the document lengths. Never answer before you have \
looked at the context, and never type data yourself: use `context`.
2. Filter with code: regular expressions (`re`), string search, slicing, splitting into lines or \
sections. Code is exact and cheap; your own reading window is small.
3. For what code cannot judge, fan out: cut the relevant text into chunks of about 100,000 \
characters and send them all in ONE llm_query_batched call, not one llm_query per loop step.
4. Combine the answers with code, or with one more llm_query, and check them before answering.

Examples:
```repl
print(type(context), len(context))
print(context[:1000])
```
```repl
import re
hits = [m.start() for m in re.finditer(r"(?i)annual budget", context)]
print(len(hits), hits[:20])
```
```repl
chunks = [context[i:i + 100_000] for i in range(0, len(context), 100_000)]
answers = llm_query_batched(
    [f"Who approved the annual budget? Quote the sentence, or reply NONE.\\n\\n{c}" for c in chunks]
)
found = [a for a in answers if "NONE" not in a]
print(len(found), found[:5])
```

When you know the answer, write it on its own line, outside any code block:
FINAL(the answer)
or, to return a variable you built in the REPL:
FINAL_VAR(variable_name)"""

_COMPACT_PROMPT = """\
You answer a question about a text stored in the Python variable `context`. You cannot read it \
directly: write Python code in a ```repl block, and you will see what the code prints. `context` \
is already loaded: never type its content yourself.

Each reply is either ONE ```repl block (then stop), or, once the printed output shows the \
answer, one line: FINAL(answer). Never answer before your code has looked at `context`.

Example:
User: Question: What is the secret code?
Assistant:
```repl
import re
print(re.findall(r"secret code is:? *(\\S+)", context, re.I)[:10])
```
User: REPL output:
['KX-4471']
If the output answers the question, reply with FINAL(answer); otherwise write a new ```repl block.
Assistant: FINAL(KX-4471)

Tips: search with re (re.I ignores case) and print only short results; if nothing is found, \
search more loosely; len(re.findall(...)) counts; if `context` is a list, loop over its items.
llm_query(prompt) asks a helper model about a piece of text (under 100,000 characters)."""

_FIRST_TURN_RULE = """\
Turn {turn} of {max_turns}. You have not looked at the context yet, so do not answer yet: \
start with a ```repl block that examines `context`."""

_TURN_CONTINUE = """\
Turn {turn} of {max_turns}. If the output above answers the question, reply with FINAL(answer) \
on its own line; otherwise continue with a ```repl block."""

_TURN_LAST = """\
Turn {turn} of {max_turns}: this is the last turn. Answer now with FINAL(answer) on its own line."""

_NOTHING_PRINTED = "(the cell printed nothing: a bare expression shows nothing; use print(...))"

REASON_NO_ACTION = "Your last reply had no ```repl block and no FINAL(...) line, so nothing ran."
"""Nudge reason for a reply with neither code nor a final answer."""

REASON_FINAL_BEFORE_LOOKING = (
    "You answered before any code had looked at `context`; that answer was not accepted. "
    "Look at the context first."
)
"""Nudge reason for a FINAL given before any cell has run in this run."""

_REASON_MISSING_VARIABLE = (
    "FINAL_VAR({name}) names a variable that does not exist in the REPL, so the run did not end. "
    "Call SHOW_VARS() to list your variables, or answer with FINAL(answer)."
)

_NUDGE = """\
{reason}

Turn {turn} of {max_turns}. Write a ```repl block that works on `context`, then stop; or, if the \
output you have already seen shows the answer, reply with FINAL(answer) on its own line."""

_FINAL_REQUEST = {
    "max_turns": "You have reached the turn limit, so no more code will run.",
    "budget": "The budget for this run is used up, so no more code or sub-calls will run.",
    "max_errors": "Your code failed too many times in a row, so no more code will run.",
}
# FINAL_VAR is left out of per-turn messages on purpose: a 1.5B model that sees
# it keeps answering FINAL_VAR(<the value>); the full system prompt explains it.
_FINAL_REQUEST_TAIL = """\
 Reply now with your best final answer on its own line: FINAL(answer). If you are not sure, \
give your best answer and say what is uncertain."""


@dataclass(frozen=True)
class CellReport:
    """One cell of the previous turn, as the model will see it."""

    code_preview: str
    """Start of the cell's code, to tell cells apart."""
    output: str
    """Printed output, already capped by the workflow."""
    error: str | None = None
    """The exception (type, message, short traceback), if the cell failed."""
    limit: str | None = None
    """A limit that was hit, e.g. "output truncated to 20,000 of 153,204 characters"."""
    restored_names: list[str] = field(default_factory=list)
    """Built-in names the code reassigned and the REPL restored."""


def system_prompt(
    profile: Profile, *, can_recurse: bool, sub_models: list[str], max_depth_reached: bool
) -> str:
    """The system prompt for `profile`.

    `can_recurse=False` leaves rlm_query out entirely; `max_depth_reached`
    says it falls back to llm_query. `sub_models` (first = default) are the
    names the model may pass as `model=`.
    """
    if profile == "compact":
        return _COMPACT_PROMPT
    if profile != "full":
        raise ValueError(f"unknown prompt profile {profile!r}: use 'full' or 'compact'")
    items = [_FULL_CONTEXT_ITEM, _FULL_LLM_ITEMS]
    if can_recurse:
        items.append(_FULL_RLM_AT_DEPTH_CAP if max_depth_reached else _FULL_RLM_ITEMS)
    items.append(_FULL_TOOL_ITEMS)
    if sub_models:
        names = ", ".join(f"`{m}`" for m in sub_models)
        items.append(f"Models you may pass as `model=`: {names} (default: `{sub_models[0]}`).")
    return "\n".join([_FULL_INTRO, *items, "", _FULL_RULES])


def stop_sequences(profile: Profile) -> list[str]:
    """Stop sequences to send with the root call for `profile` (a fresh list)."""
    return list(COMPACT_STOP) if profile == "compact" else []


def first_user_message(question: str, meta: ContextMeta, *, turn: int, max_turns: int) -> str:
    """Context metadata, the question, and the turn counter; forbids answering unseen."""
    _check_question(question)
    _check_turn(turn, max_turns)
    rule = _FIRST_TURN_RULE if turn == 1 else _TURN_CONTINUE
    return "\n\n".join(
        [describe_context(meta), f"Question: {question}", rule.format(turn=turn, max_turns=max_turns)]
    )


def turn_message(
    cell_reports: list[CellReport],
    *,
    turn: int,
    max_turns: int,
    question: str,
    note: str | None = None,
) -> str:
    """ONE user message: the previous turn's REPL output, then the next turn's prompt."""
    _check_question(question)
    _check_turn(turn, max_turns)
    parts = []
    if cell_reports:
        parts.append(_render_cells(cell_reports))
    if note:
        parts.append(f"Note: {note}")
    parts.append(f"Question: {question}")
    template = _TURN_LAST if turn == max_turns else _TURN_CONTINUE
    parts.append(template.format(turn=turn, max_turns=max_turns))
    return "\n\n".join(parts)


def nudge_message(*, turn: int, max_turns: int, reason: str) -> str:
    """For a reply that did nothing (no code, no FINAL) or a FINAL that was refused.

    `reason` is e.g. `REASON_NO_ACTION`, the parser's notes, or
    `missing_variable_reason(name)`.
    """
    _check_turn(turn, max_turns)
    if not reason.strip():
        raise ValueError("nudge_message needs a reason the model can act on, e.g. REASON_NO_ACTION")
    return _NUDGE.format(reason=reason.strip(), turn=turn, max_turns=max_turns)


def missing_variable_reason(name: str) -> str:
    """Nudge reason for FINAL_VAR(name) when the REPL has no such variable."""
    return _REASON_MISSING_VARIABLE.format(name=name)


def final_request_message(*, reason: Literal["max_turns", "budget", "max_errors"]) -> str:
    """The one request for a final answer, sent as a USER message."""
    if reason not in _FINAL_REQUEST:
        raise ValueError(f"unknown final-request reason {reason!r}: use one of {sorted(_FINAL_REQUEST)}")
    return _FINAL_REQUEST[reason] + _FINAL_REQUEST_TAIL


def merge_consecutive(messages: list[dict]) -> list[dict]:
    """Merge runs of same-role messages into one (contents joined by a blank line).

    Returns new dicts; the input is not changed. `content: None` counts as
    empty. Tool messages are never merged (each answers its own call id).
    """
    merged: list[dict] = []
    for i, msg in enumerate(messages):
        role = msg.get("role") if isinstance(msg, dict) else None
        if not role:
            raise ValueError(f"message {i} has no 'role': every chat message needs one")
        content = msg.get("content")
        if content is not None and not isinstance(content, str):
            raise TypeError(
                f"message {i} has {type(content).__name__} content; merge_consecutive handles "
                "text messages only (str or None)"
            )
        prev = merged[-1] if merged else None
        if prev is not None and prev["role"] == role and role != "tool":
            texts = [t for t in (prev.get("content"), content) if t]
            prev["content"] = "\n\n".join(texts)
        else:
            merged.append({**msg, "content": content or ""})
    return merged


def _render_cells(reports: list[CellReport]) -> str:
    blocks = []
    for i, cell in enumerate(reports, start=1):
        if len(reports) == 1:
            header = "REPL output:"
        else:
            header = f"REPL output of cell {i} of {len(reports)} (`{_one_line(cell.code_preview)}`):"
        lines = [header]
        if cell.output:
            lines.append(cell.output.rstrip("\n"))
        elif not cell.error:
            lines.append(_NOTHING_PRINTED)
        if cell.error:
            lines.append(f"Error:\n{cell.error.rstrip()}")
        if cell.limit:
            lines.append(f"(limit reached: {cell.limit})")
        if cell.restored_names:
            names = ", ".join(cell.restored_names)
            lines.append(f"(your code reassigned {names}; the REPL restored the built-in version)")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _one_line(code: str, limit: int = 80) -> str:
    first = code.strip().split("\n", 1)[0].replace("`", "'")
    more = "\n" in code.strip() or len(first) > limit
    return first[:limit] + (" …" if more else "")


def _check_turn(turn: int, max_turns: int) -> None:
    if max_turns < 1 or not 1 <= turn <= max_turns:
        raise ValueError(
            f"turn {turn} of {max_turns} is out of range: need 1 <= turn <= max_turns and max_turns >= 1"
        )


def _check_question(question: str) -> None:
    if not isinstance(question, str) or not question.strip():
        raise ValueError("the question is empty: pass the user's question as a non-empty string")
