"""Parse a root model's reply: code to run, a final answer, invented turns cut off.

Pure and deterministic (it runs inside the workflow). Lenient where small
models drift, strict where the reference engine went wrong:

Code fences
    ```repl is the documented fence. ```python / ```py / ```python3 / ```ipython
    are run too (small models write them instead). A fence with no language
    tag or any other tag (```text, ```json, ```bash ...) is NOT run: such
    blocks are usually output examples or quoted data; each one is reported
    in `notes` so the workflow can tell the model, never dropped silently.
    A reply that ends inside an open code fence (the model hit its output
    limit, or never closed the fence) keeps that code only if it parses as
    complete Python; otherwise it is dropped and a note says why.

FINAL / FINAL_VAR in the text
    Recognised only outside fences, at the start of a line (after optional
    whitespace, markdown such as `**`, `>`, `#`, `-`, a backtick, or a label
    `Assistant:` / `Final answer:`), case-insensitively (`Final(x)`), with the
    paren written right after the keyword. A mention inside a sentence ("I
    will call FINAL(answer) once I know") is a plan, not an answer. The value
    runs to the MATCHING parenthesis, across lines if needed; one pair of
    surrounding quotes or backticks is stripped. FINAL_VAR needs a Python
    identifier. Placeholders such as FINAL(answer) are refused with a note.
    The first acceptable FINAL wins.

Invented turns
    A prose line that starts a fake turn ends the reply there: `User:` /
    `Human:` anywhere; `REPL output:` / `Output:` / `Observation:` (and fences
    tagged output / stdout / console) once a code block has been opened, since
    the code has not run yet; chat-template tokens such as `<|im_start|>`.
    Whatever follows (often an invented FINAL) is dropped, and `text` keeps
    only what came before, so the transcript never shows the invention.
"""

from __future__ import annotations

import ast
import keyword
import re
import textwrap
import warnings
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["CODE_FENCE_TAGS", "FinalAnswer", "ParsedReply", "parse_reply"]

CODE_FENCE_TAGS = frozenset({"repl", "python", "python3", "py", "py3", "ipython"})
"""Fence tags whose content is run as a REPL cell (compared lower-cased)."""

_OUTPUT_FENCE_TAGS = frozenset({"output", "stdout", "console", "repl-output", "repl_output"})

MAX_REPLY_CHARS = 1_000_000
"""A reply is parsed up to this many characters; the rest is ignored (with a note)."""
MAX_CODE_BLOCKS = 20
"""Runnable blocks taken from one reply; further ones are reported, not run."""
MAX_FINAL_CANDIDATES = 10
"""FINAL / FINAL_VAR candidates examined in one reply (each may scan to its end)."""
MAX_NOTES = 12
"""Distinct notes kept for one reply; a flood of refused blocks gives one summary."""
MAX_FINAL_CHARS = 100_000
"""How far a FINAL's value is searched for its closing parenthesis."""
MAX_UNCLOSED_CODE_CHARS = 200_000
"""An unclosed block longer than this is not test-parsed (dropped with a note)."""

_PAREN = re.compile(r"[()]")
_TEMPLATE_TOKEN = re.compile(r"<\|(?:im_start|im_end|endoftext|eot_id|start_header_id)\|>")

_LINE_LEAD = r"^[ \t>*_#`~-]*"
_ROLE_TURN = re.compile(_LINE_LEAD + r"(?:user|human)[ \t]*:", re.IGNORECASE)
_FAKE_OUTPUT = re.compile(
    _LINE_LEAD + r"(?:repl[ \t]+output|execution[ \t]+output|code[ \t]+output|output|observation|stdout)"
    r"[ \t]*:",
    re.IGNORECASE,
)
_FINAL_START = re.compile(
    _LINE_LEAD + r"(?:(?:assistant|final[ \t]+answer)[ \t]*:[ \t*_`]*)?"
    r"(?P<kw>FINAL_VAR|FINAL)\(",
    re.IGNORECASE | re.MULTILINE,
)

_PLACEHOLDERS = frozenset(
    {
        "answer", "your answer", "your_answer", "the answer", "final answer", "final_answer",
        "answer here", "your answer here", "<answer>", "[answer]", "{answer}", "...", "…",
    }
)
_QUOTE_PAIRS = {'"': '"', "'": "'", "`": "`", "\u201c": "\u201d", "\u2018": "\u2019"}


@dataclass(frozen=True)
class FinalAnswer:
    """A final answer given in the reply's text (not in code)."""

    kind: Literal["answer", "var"]
    """`answer`: `value` is the answer; `var`: `value` names a REPL variable."""
    value: str
    """The answer text, or the variable name for FINAL_VAR."""


@dataclass(frozen=True)
class ParsedReply:
    """What the workflow does with one reply."""

    code_blocks: list[str]
    """Code of the runnable fences, in order, dedented; run each as a cell."""
    final: FinalAnswer | None
    """FINAL(...) / FINAL_VAR(...) found outside code, at the start of a line."""
    final_after_code: bool
    """The reply has both code and a FINAL: take the FINAL only after the code
    ran (without error, and only if the code did not call FINAL itself)."""
    truncated_at_fake_output: bool
    """The reply invented a REPL output or a user turn and was cut there."""
    text: str
    """The reply as kept (after cutting): store this in the transcript."""
    notes: list[str] = field(default_factory=list)
    """What was seen but not taken, phrased for the model (for a nudge)."""


@dataclass
class _Fence:
    tag: str
    marker: str
    lines: list[str]
    closed: bool = False


def parse_reply(reply: str | None) -> ParsedReply:
    """Parse one reply. `None` or an empty reply gives an empty result with a note."""
    if reply is not None and not isinstance(reply, str):
        raise TypeError(
            f"parse_reply expects the reply text as str (or None), got {type(reply).__name__}; "
            "pass the message content, not the response object"
        )
    if reply is None or not reply.strip():
        return ParsedReply([], None, False, False, "", ["Your reply was empty."])

    notes: list[str] = []
    if len(reply) > MAX_REPLY_CHARS:
        notes.append(
            f"Your reply had {len(reply):,} characters; only the first {MAX_REPLY_CHARS:,} were read. "
            "Keep replies short: put long data in REPL variables, not in the reply."
        )
        reply = reply[:MAX_REPLY_CHARS]
    text = reply.replace("\r\n", "\n").replace("\r", "\n")
    text, truncated = _cut_template_tokens(text)
    segments, kept_lines, cut_at_line = _split(text.split("\n"))
    truncated = truncated or cut_at_line
    if truncated:
        notes.append(
            "Your reply went on to invent the REPL output or the next turn; it was cut there. "
            "Stop after your ```repl block: the real output comes in the next message."
        )

    code_blocks: list[str] = []
    prose: list[str] = []
    for seg in segments:
        if isinstance(seg, str):
            prose.append(seg)
            continue
        code = textwrap.dedent("\n".join(seg.lines)).strip("\n")
        if seg.tag not in CODE_FENCE_TAGS:
            label = f"```{seg.tag}" if seg.tag else "``` (no language tag)"
            notes.append(f"A {label} block was not run: only ```repl blocks run as code.")
            if _FINAL_START.search(code):
                notes.append(
                    "A FINAL inside a ``` block was not taken: write FINAL(...) on its own line "
                    "outside code fences."
                )
        elif not code.strip():
            notes.append("An empty ```repl block was skipped.")
        elif len(code_blocks) >= MAX_CODE_BLOCKS:
            notes.append(
                f"Only the first {MAX_CODE_BLOCKS} ```repl blocks of a reply run; later ones were "
                "skipped. Put more work into each block."
            )
        elif seg.closed or _is_complete_python(code):
            code_blocks.append(code)
        else:
            notes.append(
                "Your reply ended inside a ```repl block whose code is incomplete (probably cut by "
                "the output limit), so it did not run. Write shorter code and close the fence with ```."
            )

    final = None
    candidates = [MAX_FINAL_CANDIDATES]
    for chunk in prose:
        final = _find_final(chunk, notes, candidates)
        if final is not None or candidates[0] <= 0:
            break

    kept = "\n".join(kept_lines).rstrip()
    return ParsedReply(
        code_blocks=code_blocks,
        final=final,
        final_after_code=final is not None and bool(code_blocks),
        truncated_at_fake_output=truncated,
        text=kept,
        notes=_bounded_notes(notes),
    )


def _bounded_notes(notes: list[str]) -> list[str]:
    """Each distinct note once, in order, at most MAX_NOTES of them."""
    unique = list(dict.fromkeys(notes))
    if len(unique) <= MAX_NOTES:
        return unique
    return unique[:MAX_NOTES] + [f"({len(unique) - MAX_NOTES} more notes like these were left out.)"]


def _cut_template_tokens(text: str) -> tuple[str, bool]:
    """Cut at a leaked chat-template token; a fake turn only if text follows it."""
    m = _TEMPLATE_TOKEN.search(text)
    if m is None:
        return text, False
    rest = _TEMPLATE_TOKEN.sub("", text[m.end():]).strip()
    rest = re.sub(r"^(?:assistant|user|system)\b", "", rest).strip()
    return text[: m.start()], bool(rest)


def _split(lines: list[str]) -> tuple[list[str | _Fence], list[str], bool]:
    """Split into prose chunks and fences; stop at the first invented turn.

    Returns (segments, kept lines, whether the reply was cut at an invented turn).
    """
    segments: list[str | _Fence] = []
    prose: list[str] = []
    fence: _Fence | None = None
    seen_code = False
    for i, line in enumerate(lines):
        if fence is not None:
            if _closes(line, fence.marker):
                fence.closed = True
                segments.append(fence)
                fence = None
            else:
                fence.lines.append(line)
            continue
        opened = _fence_open(line)
        if opened is not None:
            marker, info = opened
            tag = _fence_tag(info)
            if seen_code and tag in _OUTPUT_FENCE_TAGS:
                return _flush(segments, prose), lines[:i], True
            if prose:
                segments.append("\n".join(prose))
                prose = []
            fence = _Fence(tag=tag, marker=marker, lines=[])
            seen_code = seen_code or tag in CODE_FENCE_TAGS
            continue
        if _ROLE_TURN.match(line) or (seen_code and _FAKE_OUTPUT.match(line)):
            return _flush(segments, prose), lines[:i], True
        prose.append(line)
    if fence is not None:
        segments.append(fence)
    return _flush(segments, prose), lines, False


def _fence_open(line: str) -> tuple[str, str] | None:
    """(marker, tag word) if `line` opens a fence: optional indent, three or
    more backticks or tildes, an info string without backticks.

    Plain string work instead of a regex: the regex this replaces
    backtracked quadratically on a long info string ending in a backtick.
    """
    body = line.lstrip(" \t")
    if body[:3] not in ("```", "~~~"):
        return None
    char = body[0]
    run = len(body) - len(body.lstrip(char))
    rest = body[run:]
    if "`" in rest:
        return None
    rest = rest.lstrip(" \t")
    word_end = next((i for i, ch in enumerate(rest) if ch.isspace()), len(rest))
    return body[:run], rest[:word_end]


def _fence_tag(info: str) -> str:
    """The language word of a fence's info string: ```{python}, ```repl: and ```Python3 count."""
    m = re.match(r"[{.]*([\w+-]*)", info)
    return m.group(1).lower() if m else ""


def _flush(segments: list[str | _Fence], prose: list[str]) -> list[str | _Fence]:
    if prose:
        segments.append("\n".join(prose))
    return segments


def _closes(line: str, marker: str) -> bool:
    stripped = line.strip()
    return (
        len(stripped) >= len(marker)
        and stripped[0] == marker[0]
        and stripped == marker[0] * len(stripped)
    )


def _is_complete_python(code: str) -> bool:
    if len(code) > MAX_UNCLOSED_CODE_CHARS:
        return False
    # Warnings (invalid escapes) are irrelevant here and must not reach stderr
    # from inside a workflow.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ast.parse(code)
        except (SyntaxError, ValueError, MemoryError, RecursionError):
            # Deep nesting (e.g. 8,000 `-` in a row) makes CPython's parser raise
            # MemoryError ("parser stack overflow") or RecursionError: not complete code.
            return False
    return True


def _find_final(chunk: str, notes: list[str], candidates: list[int]) -> FinalAnswer | None:
    """The first acceptable FINAL / FINAL_VAR at the start of a line of `chunk`.

    `candidates[0]` is how many more candidates may be examined (shared by
    all chunks of a reply): each may scan to the end of the chunk, so an
    unbounded number would make the work quadratic in the reply's length.
    """
    for m in _FINAL_START.finditer(chunk):
        if candidates[0] <= 0:
            notes.append(
                f"Only the first {MAX_FINAL_CANDIDATES} FINAL(...) lines of a reply are considered; "
                "give one FINAL."
            )
            return None
        candidates[0] -= 1
        inner = _balanced_content(chunk, m.end())
        kw = m.group("kw").upper()
        value = _strip_quotes(inner.strip())
        if kw == "FINAL_VAR":
            if value.isidentifier() and not keyword.iskeyword(value):
                return FinalAnswer(kind="var", value=value)
            notes.append(
                f"FINAL_VAR({inner.strip()}) was not taken: FINAL_VAR needs a variable name, "
                f"e.g. FINAL_VAR(result). If {value or '...'} is the answer itself, reply "
                f"FINAL({value or '...'})."
            )
            continue
        if not value:
            notes.append("FINAL() was empty: put the answer inside the parentheses.")
            continue
        if value.lower() in _PLACEHOLDERS:
            notes.append(
                f"FINAL({value}) looks like a placeholder and was not taken: write the answer itself "
                f"inside FINAL(...), or use FINAL_VAR(name) to return a REPL variable."
            )
            continue
        return FinalAnswer(kind="answer", value=value)
    return None


def _balanced_content(text: str, start: int) -> str:
    """Text from `start` (just after the opening paren) to its matching ')'.

    A value that opens with a quote ends at the same quote followed by ')',
    so parentheses inside quotes do not count. Unbalanced parentheses
    (never closed) give the rest of that line, minus a trailing ')'.
    """
    quoted = _quoted_content(text, start)
    if quoted is not None:
        return quoted
    depth = 1
    for m in _PAREN.finditer(text, start, start + MAX_FINAL_CHARS):
        depth += 1 if m.group() == "(" else -1
        if depth == 0:
            return text[start : m.start()]
    line_end = text.find("\n", start)
    line = text[start:] if line_end < 0 else text[start:line_end]
    line = line.rstrip().rstrip("*`_ ")
    return line[:-1] if line.endswith(")") else line


def _quoted_content(text: str, start: int) -> str | None:
    m = re.compile(r"[ \t]*(\"\"\"|'''|[\"'`\u201c\u2018])").match(text, start)
    if m is None:
        return None
    opener = m.group(1)
    closer = _QUOTE_PAIRS.get(opener, opener)
    close_re = re.compile(re.escape(closer) + r"[ \t]*\)")
    end = close_re.search(text, m.end(), start + MAX_FINAL_CHARS)
    if end is None:
        return None
    return text[start : end.start() + len(closer)]


def _strip_quotes(value: str) -> str:
    """Strip one pair of surrounding quotes / backticks, if nothing inside clashes."""
    for triple in ('"""', "'''", "```"):
        if len(value) >= 6 and value.startswith(triple) and value.endswith(triple):
            return value[3:-3].strip()
    if len(value) >= 2:
        opener, last = value[0], value[-1]
        closer = _QUOTE_PAIRS.get(opener)
        if closer is not None and last == closer:
            inner = value[1:-1]
            # `"a" and "b"` is two quoted items, not one quoted answer.
            first_close = inner.find(closer)
            if first_close < 0 or inner.find(opener, first_close + 1) < 0:
                return inner.strip()
    return value
