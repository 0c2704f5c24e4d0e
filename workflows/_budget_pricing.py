"""Pricing of model calls for the budget ledger (pure arithmetic)."""

from __future__ import annotations

from collections.abc import Iterable

from workflows._budget_models import LedgerError, Spend

# Tokens a chat template may add around one message: special tokens, the role
# name and newlines (under 16 in the templates we know), plus a default system
# prompt that some templates insert once per request (Qwen2.5's, Llama 3.1's
# date header: under 48). Counting it per message keeps the bound additive.
TOKENS_PER_MESSAGE = 64
MAX_BELIEVABLE_TOKENS = 10**12
"""More tokens than any model reads or writes in one call: a count a server
reports above it is a broken or hostile server's (1.7e308 overflowed a run's
totals and failed the workflow), estimated as a missing one is."""


def token_bound(utf8_bytes: int, messages: int = 0) -> int:
    """The most tokens `utf8_bytes` of text in `messages` chat messages can be.

    Why bytes bound tokens for any text: byte-level BPE (GPT, Llama 3, Qwen)
    and SentencePiece with byte fallback (Llama 2, Mistral) make every token
    out of at least one byte of the text, so a text never has more tokens than
    UTF-8 bytes; only the template's own tokens come on top. Characters do not
    bound tokens (CJK text is about one token per character, three bytes each,
    and an emoji may be several tokens). This is the one token estimate of the
    code base: reservations use it, and so does a reply without usage.
    """
    if utf8_bytes < 0 or messages < 0:
        raise LedgerError(f"token_bound: need utf8_bytes >= 0 and messages >= 0, got {utf8_bytes}, {messages}")
    return utf8_bytes + messages * TOKENS_PER_MESSAGE


def messages_token_bound(messages: Iterable[dict]) -> int:
    """`token_bound` of chat messages ({"role", "content"} with string content)."""
    count, size = 0, 0
    for message in messages:
        count += 1
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text parts carry text
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        size += len(content.encode("utf-8")) if isinstance(content, str) else 0
    return token_bound(size, count)


def worst_case(
    prompt_tokens: int, max_output_tokens: int, usd_in: float, usd_out: float
) -> Spend:
    """The most one model call can use: all of its max output tokens.

    `prompt_tokens` is an upper bound (`token_bound`). `usd_in` / `usd_out` are
    prices per token (litellm's `input_cost_per_token`,
    `output_cost_per_token`); 0 for an unknown price (tokens and the call still count).
    """
    for name, value in (
        ("prompt_tokens", prompt_tokens),
        ("max_output_tokens", max_output_tokens),
        ("usd_in", usd_in),
        ("usd_out", usd_out),
    ):
        if value < 0:
            raise LedgerError(f"worst_case: {name} must be >= 0, got {value!r}")
    return Spend(
        usd=prompt_tokens * usd_in + max_output_tokens * usd_out,
        tokens=prompt_tokens + max_output_tokens,
        calls=1,
    )


def actual(prompt_tokens: int, completion_tokens: int, usd: float) -> Spend:
    """What one finished model call used."""
    return Spend(usd=usd, tokens=prompt_tokens + completion_tokens, calls=1)


def equal_share(index: int, size: int) -> float:
    """`share` for child `index` (0-based) of a batch of `size` granted in order,
    so that every child of the batch gets the same slice: 1 / (size - index)."""
    if not 0 <= index < size:
        raise LedgerError(f"equal_share: need 0 <= index < size, got index={index}, size={size}")
    return 1.0 / (size - index)


def money_cap_problem(max_usd: float | None, unpriced: list[str], field: str = "caps.max_usd") -> str | None:
    """Why a money cap (the request's `field`) cannot hold over these models, or None.

    A model with no known price counts $0 a call, so `max_usd` would let its
    calls run without limit: a cap that silently does not bind is refused
    rather than trusted (a free model is priced 0 in its configuration)."""
    if max_usd is None or not unpriced:
        return None
    names = ", ".join(repr(n) for n in unpriced)
    return (
        f"{field}: cannot limit model {names}: it has no known price, so its calls would count $0; "
        "give it usd_per_input_token and usd_per_output_token in the models configuration "
        "(RLM_MODELS_JSON or RLM_MODELS_FILE; 0 for a free model), or cap tokens or calls instead"
    )
