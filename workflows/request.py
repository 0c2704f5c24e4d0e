"""What a caller sends to start an RLM run and what it gets back.

These models are the public contract of the `RLMRun` workflow: any Temporal
client (any SDK) starts a run with a `RunRequest` as JSON and reads a
`RunResult` (workflows/result.py). They carry references and summaries
only: no secrets, no large text.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from workflows.budget import Caps
from workflows.context_input import ContextInput
from workflows.refs import ContextRef, JsonList
from workflows.result import ChildSummary, Usage
from workflows.tool_steps import MAX_TOOLS_PER_RUN, tool_name_problem

MAX_QUESTION_CHARS = 64 * 1024
"""A question travels inline in every turn's prompt and in the request of a
child run; long text belongs in the context."""
MAX_OUTPUT_CHARS = 200_000
"""Largest `limits.output_chars`: the cells of one turn travel inline in the
root turn's activity input (Temporal refuses payloads over 2 MiB)."""


MAX_STEP_SECONDS = 86_400.0
"""Longest `limits.cell_timeout_s` / `model_call_timeout_s`: a day."""
MIN_STEP_SECONDS = 1.0
"""Shortest step timeout: below it a model call or a cell cannot finish (and
a timeout under a microsecond is no timeout to Temporal at all)."""
MAX_CELL_MEMORY_MB = 64 * 1024
"""Largest `limits.cell_memory_mb` a request decodes with (runs started with
more replay as they ran); a run or session starting now is refused outside
CELL_MEMORY_MB_RANGE (`cell_memory_problem`)."""
CELL_MEMORY_MB_RANGE = (16, 4096)
"""The memory caps a REPL can be made with: sandbox_wasm.SandboxLimits takes
16 MiB to 4 GiB (a 32-bit WASM guest). Outside it every cell of the run
failed and the run spent its turns (each a paid root call) on nothing. A cap
in range that the worker's memory budget cannot hold is refused per cell."""
MAX_OUTPUT_TOKENS = 1_000_000
REQUEST_CAP_BOUNDS: dict[str, float] = {
    "max_usd": 1_000_000.0,
    "max_tokens": 10**13,
    "max_calls": 10**9,
    "max_turns": 10_000,
    "max_wall_s": 366 * 86_400.0,
    "max_depth": 16,
    "max_concurrency": 1_024,
}
"""Largest cap a caller may ask for: beyond these a value is a mistake (a
unit slip, an overflow), and some (`max_wall_s`) would overflow a time."""


ModelName = Annotated[
    str,
    Field(min_length=1, max_length=256, pattern=r"^\S(.*\S)?$"),
    Field(description="A model configured on the worker, or a model name litellm knows (checked by the run's first step)."),
]


# A caller's field that no model knows is refused, not dropped: a misplaced
# `max_usd` (at the top level instead of under `caps`) would otherwise start
# a run with no money cap (workflows/run.py refuses them for new runs only).
_NO_UNKNOWN_FIELDS = ConfigDict(extra="forbid")


class ModelChoice(BaseModel):
    """Which configured model plays which part of the run tree."""

    model_config = _NO_UNKNOWN_FIELDS

    root: ModelName
    """Model that writes the REPL code at depth 0."""
    sub: ModelName | None = None
    """Model for `llm_query` sub-calls; defaults to `root`."""
    per_depth: dict[Annotated[int, Field(ge=1, le=REQUEST_CAP_BOUNDS["max_depth"])], ModelName] = Field(
        default_factory=dict
    )
    """Root model of child runs at a given depth (1, 2, ...); defaults to `root`."""

    def sub_model(self) -> str:
        return self.sub or self.root

    def root_at(self, depth: int) -> str:
        return self.per_depth.get(depth, self.root)

    def fields(self) -> dict[str, str]:
        """Each model name by the request field that gives it (`models.root`, ...)."""
        out = {"models.root": self.root}
        if self.sub is not None:
            out["models.sub"] = self.sub
        out.update({f"models.per_depth.{depth}": name for depth, name in sorted(self.per_depth.items())})
        return out

    def allowed(self) -> list[str]:
        """Names that guest code may pick with `model=`."""
        names = [self.root, self.sub_model(), *self.per_depth.values()]
        return list(dict.fromkeys(names))


class RunLimits(BaseModel):
    """Per-step limits: how long and how large one step may be."""

    model_config = _NO_UNKNOWN_FIELDS

    cell_timeout_s: float = Field(120.0, ge=MIN_STEP_SECONDS, le=MAX_STEP_SECONDS, allow_inf_nan=False)
    """Guest CPU/wall time for one cell; time waiting on sub-calls does not count."""
    cell_memory_mb: int = Field(
        2048,
        ge=1,
        le=MAX_CELL_MEMORY_MB,
        # What callers are told is what a run takes (the decoder's wider
        # bounds are for replaying runs started before the range was enforced).
        json_schema_extra={"minimum": CELL_MEMORY_MB_RANGE[0], "maximum": CELL_MEMORY_MB_RANGE[1]},
        description="Linear-memory cap of the WASM REPL, in MiB (a run or session is refused outside 16-4096).",
    )
    """Linear-memory cap of the WASM REPL: 16 to 4096 (a run or session is
    refused at its start outside that range, CELL_MEMORY_MB_RANGE)."""
    output_chars: int = Field(20_000, ge=100, le=MAX_OUTPUT_CHARS)
    """Printed output of one cell kept in the transcript (the rest is stored)."""
    root_max_output_tokens: int | None = Field(None, ge=1, le=MAX_OUTPUT_TOKENS)
    """Cap on one root reply; None = the model's own maximum (at most 8192)."""
    sub_max_output_tokens: int | None = Field(None, ge=1, le=MAX_OUTPUT_TOKENS)
    """Cap on one sub-call reply; None = the model's own maximum (at most 4096)."""
    model_call_timeout_s: float = Field(300.0, ge=MIN_STEP_SECONDS, le=MAX_STEP_SECONDS, allow_inf_nan=False)
    """Start-to-close timeout of one model call activity."""
    continue_after_updates: int = Field(1_000, ge=1)
    """Start a fresh run of the chain (continue-as-new) at the next turn
    boundary once this many sub-call updates were made (the server keeps at
    most 2,000 per run); also done when Temporal suggests it (history size)."""
    tool_call_timeout_s: float = Field(60.0, ge=MIN_STEP_SECONDS, le=MAX_STEP_SECONDS, allow_inf_nan=False)
    """Start-to-close timeout of one custom-tool call (per attempt)."""
    history_events: int = Field(40_000, ge=200, le=50_000)
    """Events one run's history may reach before sub-calls are refused until
    the turn ends (the server ends a run at 51,200); past half of it the run
    continues as new at the next turn boundary."""


class ParentLink(BaseModel):
    """Set on child runs: where they sit in the tree."""

    model_config = _NO_UNKNOWN_FIELDS

    parent_workflow_id: str
    root_workflow_id: str
    call_id: str


class RunRequest(BaseModel):
    """Input of the `RLMRun` workflow."""

    model_config = _NO_UNKNOWN_FIELDS

    question: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS)
    context: ContextInput
    """A ContextRef (stored with `rlm context put`); or, ingested by the run's
    first step into the same chunked store: inline text (a JSON string), a
    list of texts (at most `MAX_INLINE_CONTEXT_BYTES` inline in all), or
    `{"uri": "s3://bucket/key"}` / `{"uri": "s3://bucket/prefix/"}` for plain
    UTF-8 files. Inside the run it is always a ContextRef."""
    on_unreadable: Literal["fail", "skip"] = "fail"
    """A file of an S3 context that cannot be converted to text (a corrupt
    or encrypted PDF, a zip bomb, a binary file): `fail` ends the run with
    the file named and the reason; `skip` leaves it out, lists it in the
    context's metadata and in `RunResult.skipped_documents`, and goes on."""
    models: ModelChoice
    caps: Caps = Field(default_factory=Caps)
    limits: RunLimits = Field(default_factory=RunLimits)
    depth: int = Field(0, ge=0, le=REQUEST_CAP_BOUNDS["max_depth"])
    """0 for a run started by a caller; children are parent depth + 1."""
    parent: ParentLink | None = None
    answer_schema: dict[str, Any] | None = None
    """A JSON Schema (Draft 2020-12, self-contained, at most 64 KiB as JSON):
    the model is shown it and must answer FINAL with JSON that validates; an
    invalid answer is sent back once with the error. `RunResult.answer_value`
    carries the parsed value."""
    tools: JsonList[str] = Field(default_factory=list, max_length=MAX_TOOLS_PER_RUN)
    """Custom tools the run's code may call, by name; each must be registered
    on the workers (`worker.py --tools package.module:TOOLS`). The model is
    shown their descriptions; child runs get the same tools."""
    repl_snapshot_key: str | None = Field(None, pattern=r"^runs/[^/]+/snapshots/[^/]+$", max_length=1024)
    """REPL state the run starts from: the `snapshot_key` of an earlier
    run's result (`runs/<workflow id>/snapshots/<cell>.bin`; a session's
    previous question, workflows/session.py); None = a fresh REPL holding
    only `context`."""
    resume: ResumeState | None = None
    """Set only by continue-as-new: the state carried into the next run."""

    _tools_are_names = field_validator("tools")(lambda v: check_tool_names(v))

    _answer_schema_is_a_schema = field_validator("answer_schema")(lambda v: check_answer_schema_field(v))
    _question_has_text = field_validator("question")(lambda v: check_question_text(v))

    @field_validator("caps")
    @classmethod
    def _caps_allow_a_turn(cls, value: Caps) -> Caps:
        # A run with no turn could never answer; the ledger allows 0 mid-run
        # (set_caps lowers it to stop a run), a request may not start with it.
        if value.max_turns < 1:
            raise ValueError("caps.max_turns must be at least 1 (a run needs a turn to answer)")
        if too_large := caps_past_bounds(value, prefix="caps."):
            raise ValueError("; ".join(too_large) + ": give a smaller cap, or leave a money cap out for no limit")
        return value

    @model_validator(mode="after")
    def _depth_fits_the_tree(self) -> RunRequest:
        # A caller starts at depth 0; a child's depth plus the levels left
        # below it never exceed the deepest tree (its models are named per depth).
        if self.parent is None and self.depth != 0:
            raise ValueError(f"depth is {self.depth}: a run started by a caller has depth 0 (children get theirs from the parent)")
        deepest = REQUEST_CAP_BOUNDS["max_depth"]
        if self.depth + self.caps.max_depth > deepest:
            raise ValueError(
                f"depth {self.depth} plus caps.max_depth {self.caps.max_depth} is more than {deepest:g} levels"
            )
        return self


def caps_past_bounds(caps: Caps, names: Iterable[str] = REQUEST_CAP_BOUNDS, prefix: str = "") -> list[str]:
    """`<prefix><name> is <value> (at most <bound>)` for each of `names` whose
    cap is past REQUEST_CAP_BOUNDS (a request's caps, a set_caps change)."""
    return [
        f"{prefix}{name} is {getattr(caps, name):,} (at most {REQUEST_CAP_BOUNDS[name]:,g})"
        for name in REQUEST_CAP_BOUNDS
        if name in names and getattr(caps, name) is not None and getattr(caps, name) > REQUEST_CAP_BOUNDS[name]
    ]


_BLANK_QUESTION = "the question is blank: ask something"


def check_question_text(value: str) -> str:
    """A question (of a run or a session's ask): some text, not only blanks."""
    if not value.strip():
        raise ValueError(_BLANK_QUESTION)
    return value


def question_problem(question: str) -> str | None:
    """Why a run's question would be refused, or None: what a client checks
    before it uploads the context."""
    if not question.strip():
        return _BLANK_QUESTION
    if len(question) > MAX_QUESTION_CHARS:
        return (
            f"the question has {len(question):,} characters, at most {MAX_QUESTION_CHARS:,}: "
            "put long material in the context"
        )
    return None


CELL_MEMORY_FIELD = "limits.cell_memory_mb"
"""How the memory cap is named in what a caller is told (the CLI names its flag)."""


def cell_memory_problem(cell_memory_mb: int, field: str = CELL_MEMORY_FIELD) -> str | None:
    """Why no REPL can be made with this `limits.cell_memory_mb`, or None."""
    low, high = CELL_MEMORY_MB_RANGE
    if low <= cell_memory_mb <= high:
        return None
    return (
        f"{field}: the REPL's memory cap must be {low} to {high} MiB "
        f"(a 32-bit WebAssembly guest), got {cell_memory_mb}"
    )


def context_fit_problem(context_bytes: int, cell_memory_mb: int, field: str = CELL_MEMORY_FIELD) -> str | None:
    """Why a context of `context_bytes` cannot be loaded in a REPL capped at
    `cell_memory_mb`, or None. The same size rule as the sandbox's own
    refusal (sandbox_wasm ContextTooLarge): the guest holds the bytes and the
    interpreter within its cap, so every cell of such a run would fail."""
    if context_bytes < cell_memory_mb << 20:
        return None
    return (
        f"the context ({context_bytes / 1e6:,.1f} MB) does not fit in the REPL's memory cap of {cell_memory_mb} MiB: "
        + context_fit_advice(cell_memory_mb, field)
    )


def context_fit_advice(cell_memory_mb: int, field: str = CELL_MEMORY_FIELD) -> str:
    """What to change when the context does not fit in the REPL's memory cap."""
    largest = CELL_MEMORY_MB_RANGE[1]
    if cell_memory_mb < largest:
        name = f"the run's {field}" if field == CELL_MEMORY_FIELD else field
        return f"raise {name} (at most {largest}) or give it a smaller context"
    return f"give the run a smaller context ({largest} MiB is the largest REPL memory cap)"


def check_answer_schema_field(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """An `answer_schema` (of a run or a session's ask): None, or a valid JSON Schema."""
    if value is None:
        return None
    # Imported here: jsonschema is only needed when a schema is given (a
    # CLI command that never sets one does not pay for its import). This
    # also runs inside the workflow sandbox (the run validates its input),
    # which must take jsonschema from outside: it calls `platform` on import.
    from temporalio import workflow

    with workflow.unsafe.imports_passed_through():
        from workflows.typed_answer import check_answer_schema

    return check_answer_schema(value)


def check_tool_names(value: list[str]) -> list[str]:
    """A request's `tools`: each a valid tool name, none twice."""
    for index, name in enumerate(value):
        if problem := tool_name_problem(name):
            raise ValueError(f"tools[{index}]: {problem}")
        if name in value[:index]:
            raise ValueError(f"tools[{index}]: {name!r} is listed twice")
    return value


Request = TypeVar("Request", bound=BaseModel)


def parse_request(value: Any, model: type[Request] = RunRequest) -> Request | str:  # type: ignore[assignment]
    """The request (a RunRequest, or `model`: a session's), or why it is
    not one: every invalid field with its message."""
    if isinstance(value, model):
        return value
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        return f"invalid {model.__name__}: " + validation_errors(exc)


def without_unknown_fields(model: type[BaseModel], value: Any) -> tuple[BaseModel, str] | None:
    """For runs started before unknown fields were refused: `value` validated
    with the fields `model` does not know left out, and the refusal those
    fields get now; None when `value` is refused for another reason too."""
    try:
        model.model_validate(value)
        return None
    except ValidationError as exc:
        errors, refusal = exc.errors(include_url=False, include_input=False), validation_errors(exc)
    if not errors or any(e["type"] != "extra_forbidden" for e in errors):
        return None
    kept = json.loads(json.dumps(value))  # a copy (the input is JSON)
    for error in errors:
        *parents, name = error["loc"]
        holder = kept
        for key in parents:
            holder = holder[key]
        holder.pop(name, None)
    try:
        return model.model_validate(kept), refusal
    except ValidationError:
        return None


def not_json_problem(what: str, exc: Exception) -> str:
    """Why a start's input could not be decoded, in the caller's terms. The
    strict decoder refuses a lone UTF-16 surrogate escape (`"\\ud800"` with no
    pair: valid JSON syntax, no Unicode text) with "unexpected end of hex
    escape" (or "lone leading surrogate in hex escape"), which sends a caller
    looking for a syntax error."""
    # The decoder's own message, not str(exc): that quotes the input, which may say anything.
    errors = exc.errors(include_input=False) if isinstance(exc, ValidationError) else []
    reason = str(errors[0].get("msg", "")) if errors else str(exc)
    if "surrogate" in reason or "hex escape" in reason:
        return (
            f"invalid {what}: a string holds a lone UTF-16 surrogate escape (such as \\ud800 without its pair), "
            "which is no Unicode character: send valid text (a JSON encoder given a real string never writes one)"
        )
    return f"invalid {what}: the input is not JSON ({type(exc).__name__}: {exc})"


def error_message(error: Any) -> str:
    """One pydantic error's message, without the "Value error, " that
    pydantic puts before a validator's own text."""
    return str(error["msg"]).removeprefix("Value error, ")


def validation_errors(exc: ValidationError, limit: int = 20) -> str:
    """`field.path: message` for each error of a pydantic validation, joined by '; '."""
    errors = exc.errors(include_url=False, include_input=False)
    parts = [f"{'.'.join(str(p) for p in e['loc']) or '(input)'}: {error_message(e)}" for e in errors[:limit]]
    if len(errors) > limit:
        parts.append(f"... and {len(errors) - limit} more")
    return "; ".join(parts)


class ResumeState(BaseModel):
    """State carried across continue-as-new at a turn boundary (a cell never
    spans two runs of the chain, so no sub-call is in flight)."""

    turn: int
    cells: int
    snapshot_key: str | None
    transcript_key: str | None
    pending: list[dict[str, str]]
    """Messages the next root turn appends to the transcript."""
    prompt_tokens: int
    usage: Usage
    ledger: dict
    children: list[ChildSummary]
    runs_below: int = 0
    warned_unseen: bool = False
    answer_sent_back: bool = False
    """An answer that did not validate against `answer_schema` was sent back."""
    errors_in_a_row: int = 0
    """Cells that failed in a row so far (`caps.max_errors`)."""
    history_key: str | None = None
    """Transcript of the compacted turns (workflows/compaction.py)."""
    compacted_turn: int = 0
    transcript_tokens: int = 0
    """Tokens of the transcript as the provider counted them at the last root call."""


def clip_noting_length(text: str, max_chars: int) -> str:
    """`text` cut to `max_chars` characters, saying how long it was (an
    error for the model; `summaries.clip` is the one-line form for the UI)."""
    if len(text) <= max_chars:
        return text
    return text[:max_chars] + f" ... [cut: {len(text):,} characters in all]"


def clip_utf8(text: str, max_bytes: int) -> str:
    """The longest prefix of `text` whose UTF-8 encoding fits `max_bytes`."""
    data = text.encode()
    if len(data) <= max_bytes:
        return text
    return data[:max_bytes].decode("utf-8", errors="ignore")


RunRequest.model_rebuild()
