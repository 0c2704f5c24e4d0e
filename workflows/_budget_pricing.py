"""Pricing of model calls for the budget ledger (pure arithmetic)."""

from __future__ import annotations

from workflows._budget_models import LedgerError, Spend


def worst_case(
    prompt_tokens: int, max_output_tokens: int, usd_in: float, usd_out: float
) -> Spend:
    """The most one model call can use: all of its max output tokens.

    `usd_in` / `usd_out` are prices per token (litellm's `input_cost_per_token`,
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
