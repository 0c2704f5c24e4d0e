"""What a sub-call item asks for, checked before it waits for a slot: the
model it goes to, the prompt it sends and the most it may cost, or the
answer that refuses it without calling anything. Pure logic."""

from __future__ import annotations

from dataclasses import dataclass

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from workflows.budget import Spend, token_bound, worst_case
    from workflows.request import MAX_QUESTION_CHARS, RunRequest
    from workflows.steps import ModelInfo, SubcallAnswer, SubcallBatch, SubcallItem

# English text averages about 4 bytes per token: a prompt whose bytes / 4
# pass the model's window cannot fit, so it is refused before anything is read
# or sent. A typical size, not a bound (budgets reserve `token_bound`); the
# provider has the last word, and its refusal costs nothing.
TYPICAL_BYTES_PER_TOKEN = 4


@dataclass(frozen=True)
class LlmPlan:
    """An `llm_query` item checked and priced."""

    model: str
    info: ModelInfo
    item: SubcallItem
    """With the run's context appended when a child falls back to a call."""
    max_out: int
    prompt_tokens: int
    """An upper bound (`token_bound`)."""
    worst: Spend
    """One attempt's reservation."""


def pick_model(request: RunRequest, batch: SubcallBatch, kind: str) -> str | SubcallAnswer:
    """The model a batch's items go to, or why none may."""
    allowed = request.models.allowed()
    if batch.model is None:
        if kind == "rlm":
            return request.models.root_at(request.depth + 1)
        return request.models.sub_model()
    if batch.model not in allowed:
        return SubcallAnswer(
            error=f"Error: model {batch.model!r} is not configured for this run; "
            f"choose one of {allowed} or omit model="
        )
    return batch.model


def plan_llm_call(
    request: RunRequest, models: dict[str, ModelInfo], batch: SubcallBatch, item: SubcallItem
) -> LlmPlan | SubcallAnswer:
    """What the call will send and may cost, or why it is not made."""
    model = pick_model(request, batch, "llm")
    if isinstance(model, SubcallAnswer):
        return model
    info = models[model]
    max_out = min(info.max_output_tokens, request.limits.sub_max_output_tokens or 4096)
    if batch.kind == "rlm" and item.context is None:
        # At the depth cap a child falls back to a plain call over the same context.
        item = item.model_copy(update={"context": request.context})
    size = prompt_bytes(item)
    if size // TYPICAL_BYTES_PER_TOKEN + max_out > info.context_window:
        return SubcallAnswer(
            error=f"Error: this prompt is {size:,} bytes, about {size // TYPICAL_BYTES_PER_TOKEN:,} "
            f"tokens, more than model {model!r} takes ({info.context_window:,} tokens with {max_out:,} for "
            "the reply); split it into smaller chunks"
        )
    prompt_tokens = token_bound(size, 1)
    worst = worst_case(prompt_tokens, max_out, info.usd_per_input_token, info.usd_per_output_token)
    return LlmPlan(model, info, item, max_out, prompt_tokens, worst)


def prompt_bytes(item: SubcallItem) -> int:
    """UTF-8 bytes of the prompt the llm_call activity will send for `item`."""
    size = item.text_ref.size if item.text_ref is not None else len((item.text or "").encode())
    if item.context is not None:
        # The activity appends the context after "\n\n", documents joined by "\n\n".
        size += item.context.total_bytes + 2 * item.context.doc_count
    return size


def refuse_text(kind: str, item: SubcallItem) -> SubcallAnswer | None:
    """An error string for a question no call should be made for."""
    what = "rlm_query question" if kind == "rlm" else "llm_query prompt"
    if item.text_chars == 0 or (item.text is not None and not item.text.strip()):
        return SubcallAnswer(error=f"Error: the {what} is empty; ask something")
    if kind == "rlm" and (item.text is None or item.text_chars > MAX_QUESTION_CHARS):
        return SubcallAnswer(
            error=f"Error: the {what} has {item.text_chars:,} characters, at most {MAX_QUESTION_CHARS:,}; "
            "pass long text as context= and ask a short question about it"
        )
    return None
