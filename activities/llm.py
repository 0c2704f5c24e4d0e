"""Model calls: one litellm completion, priced and classified.

Everything the engine needs from a model call lives behind this module:

- `ModelRegistry` resolves a configured name (or any name litellm knows) to a
  worker-side `ModelSpec`, and gives workflows a secret-free `ModelInfo`.
- `complete()` makes one call (litellm `acompletion`, no retries of its own:
  the workflow retries, attempt by attempt) and returns text, tokens and USD.
  A count a reply does not report, or not believably (missing, negative,
  not finite, a prompt of 0 tokens), is counted at the budget's upper bound
  (`workflows.budget.token_bound`, flagged); `content: null` is "".
- `to_application_error()` maps any failure to a Temporal ApplicationError:
  configuration and request mistakes are non-retryable, transient failures
  retryable with the provider's Retry-After.

API keys come only from the worker's environment (named by
`ModelSpec.api_key_env`) and are never logged or returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import time

import structlog
from pydantic import BaseModel

from activities._direct_openai import complete_direct
from activities._litellm_setup import callbacks_registered, litellm, unlogged_call
from activities._model_loop import inline_setup, on_model_loop
from activities._llm_errors import (
    LLMError,
    MalformedReplyError,
    MissingApiKeyError,
    ModelCallError,
    ModelConfigError,
    UnknownModelError,
    classify,
    to_application_error,
)
from activities._model_registry import (
    DIRECT_PROVIDER,
    ModelInfo,
    ModelRegistry,
    ModelSpec,
    api_key_for,
    check_credentials,
    model_info,
    model_info_known,
)
from activities.local_model import embedded_server_down
from activities.terminal_text import without_surrogates
from workflows.budget import MAX_BELIEVABLE_TOKENS, messages_token_bound, token_bound

__all__ = [
    "Completion",
    "LLMError",
    "MalformedReplyError",
    "MissingApiKeyError",
    "ModelCallError",
    "ModelConfigError",
    "ModelInfo",
    "ModelRegistry",
    "ModelSpec",
    "UnknownModelError",
    "check_credentials",
    "complete",
    "model_info",
    "price_unmapped_models",
    "to_application_error",
]

log = structlog.get_logger(__name__)

# Beyond the HTTP timeout litellm enforces, a hard stop in case a provider
# SDK ignores it (a hung call would otherwise hold an activity slot forever).
_HARD_TIMEOUT_MARGIN_S = 5.0


class Completion(BaseModel):
    """The result of one model call."""

    text: str
    """Reply content; "" when the provider sent `content: null`."""
    prompt_tokens: int
    completion_tokens: int
    usd: float
    """Cost: the spec's price overrides, else litellm's pricing, else 0.0 (unknown price)."""
    model: str
    """The configured model name (ModelSpec.name)."""
    finish_reason: str | None
    """"stop", "length" (cut at max_tokens), ... as the provider reported it."""
    usage_estimated: bool
    """True when the provider sent no usage and the token counts are our upper bound."""


def price_unmapped_models(registry: ModelRegistry) -> None:
    """Enter every configured model litellm's price map lacks (`_enter_unmapped`).
    Workers call it before they poll, so the map changes before any thread
    reads it (a model litellm knows but does not price, used without
    configuration, is entered at its first call)."""
    prices: dict[str, set[tuple[float, float]]] = {}
    for spec in registry.specs:
        # The spec's prices, else litellm's for the model's own name (a direct
        # client's `openai/gpt-4o-mini` is priced as `rlm_direct/gpt-4o-mini`), else 0.
        info = model_info(spec)
        prices.setdefault(spec.routed_model, set()).add((info.usd_per_input_token, info.usd_per_output_token))
    for litellm_model, seen in prices.items():
        # Specs sharing a model at different prices: litellm's own figure is then nobody's.
        usd_in, usd_out = seen.pop() if len(seen) == 1 else (0.0, 0.0)
        _enter_unmapped(litellm_model, usd_in, usd_out)


# Models this process entered in litellm's price map; litellm's price for them is ours.
_ENTERED: set[str] = set()


def _enter_unmapped(litellm_model: str, usd_in: float = 0.0, usd_out: float = 0.0) -> None:
    """Put a model litellm's price map lacks into it, once per process: at its
    spec's prices (the worker's registry), else 0.

    litellm prices every reply itself (for its logging). For an unmapped model
    that fails the slow way, each call: an exception, a traceback string, a
    zero-cost diagnostic. That was ~0.5 ms of the ~4.5 ms of CPU litellm
    spends per call (bench: 2,000 calls at 32 in flight), on the thread every
    sub-call of the worker shares; a reply priced at 0 still costs litellm a
    zero-cost diagnostic (~0.15 ms), hence the spec's prices when it has them.
    Nothing we report changes: our price for such a model is its spec's
    override or 0 (`_price`), and `model_info` never reads these entries
    (litellm's info is cached as first looked up, before this).
    """
    if litellm_model in _ENTERED:
        return
    if model_info_known(litellm_model) or (provider := _provider(litellm_model)) is None:
        return
    entry = {"input_cost_per_token": usd_in, "output_cost_per_token": usd_out, "litellm_provider": provider, "mode": "chat"}
    litellm.register_model({litellm_model: entry}, add_to_provider_model_sets=False)
    _ENTERED.add(litellm_model)


# Providers whose request preparation reads only the spec and a static API key
# (no token endpoint, no cloud credential chain): prepared on the model loop.
_STATIC_KEY_PROVIDERS = frozenset({"openai", "hosted_vllm", "anthropic", DIRECT_PROVIDER})


@functools.lru_cache(maxsize=512)
def _provider(litellm_model: str) -> str | None:
    """litellm's provider for the model, or None (the call itself will say why)."""
    try:
        _, provider, _, _ = litellm.get_llm_provider(litellm_model)
    except Exception:  # noqa: BLE001 - "LLM Provider NOT provided" and friends
        return None
    return provider


def _prepared_without_io(litellm_model: str) -> bool:
    return _provider(litellm_model) in _STATIC_KEY_PROVIDERS


def _litellm_price(response: object) -> float | None:
    """The price litellm already put on the reply (`_hidden_params`), if any."""
    hidden = getattr(response, "_hidden_params", None)
    cost = hidden.get("response_cost") if isinstance(hidden, dict) else None
    return float(cost) if isinstance(cost, (int, float)) and math.isfinite(cost) and cost >= 0 else None


def _price(spec: ModelSpec, info: ModelInfo, response: object, prompt: int, output: int, estimated: bool) -> float:
    overridden = spec.usd_per_input_token is not None or spec.usd_per_output_token is not None
    # A model we entered in litellm's map is priced by its spec (0 without
    # overrides): pricing its reply again in litellm cost ~0.3 ms a call.
    if not overridden and not estimated and spec.routed_model not in _ENTERED:
        # litellm's own pricing knows cached-token discounts and tiered prices;
        # it priced the reply on arrival, so read that before pricing it again.
        if (cost := _litellm_price(response)) is not None and 0 < cost < math.inf:
            return cost
        try:
            cost = float(litellm.completion_cost(completion_response=response, model=spec.litellm_model))
            if 0 <= cost < math.inf:
                return cost
        except Exception:  # noqa: BLE001 - ModelNotMappedError for local/scripted models
            pass
    return prompt * info.usd_per_input_token + output * info.usd_per_output_token


def _usage_count(usage: object, name: str) -> int | None:
    """A token count the provider reported, or None when it sent none we can
    trust (missing, null, negative, not a finite number): such a count is
    estimated instead, so a reply never lowers what the budget counts."""
    value = getattr(usage, name, None)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not math.isfinite(value) or value < 0 or value > MAX_BELIEVABLE_TOKENS:
        return None
    return int(value)


def _reported_usage(spec: ModelSpec, info: ModelInfo, response: object) -> dict | None:
    """Usage sent with a reply we cannot use (a malformed one), priced; None
    (the attempt is charged its whole reservation) unless both counts are usable."""
    usage = getattr(response, "usage", None)
    prompt, output = _usage_count(usage, "prompt_tokens"), _usage_count(usage, "completion_tokens")
    if prompt is None or output is None or prompt == 0:
        return None
    usd = _price(spec, info, response, prompt, output, estimated=True)
    return {"prompt_tokens": prompt, "completion_tokens": output, "usd": usd}


async def complete(
    spec: ModelSpec,
    messages: list[dict],
    *,
    max_tokens: int | None = None,
    stop: list[str] | None = None,
    timeout_s: float = 120.0,
) -> Completion:
    """One chat completion. Raises an LLMError subclass (already classified) on failure.

    `max_tokens` defaults to the model's max output tokens (what a budget
    reserves); `stop` defaults to the spec's stop sequences. It runs on the
    model-call loop (activities/_model_loop.py), off the worker's own loop.
    """
    return await on_model_loop(_complete(spec, messages, max_tokens=max_tokens, stop=stop, timeout_s=timeout_s))


async def _complete(
    spec: ModelSpec, messages: list[dict], *, max_tokens: int | None, stop: list[str] | None, timeout_s: float
) -> Completion:
    check_credentials(spec)
    info = model_info(spec)
    key = api_key_for(spec)
    kwargs: dict = {
        "model": spec.routed_model,
        "messages": messages,
        "max_tokens": max_tokens or info.max_output_tokens,
        "timeout": timeout_s,
        "num_retries": 0,  # Temporal retries the activity
        "max_retries": 0,  # ... and the provider SDK must not retry either
        "drop_params": True,  # e.g. `stop` on models that reject it
    }
    if spec.api_base:
        kwargs["api_base"] = spec.api_base
    if key:
        kwargs["api_key"] = key
    if spec.temperature is not None:
        kwargs["temperature"] = spec.temperature
    stops = spec.stop if stop is None else stop
    if stops:
        kwargs["stop"] = list(stops)
    _enter_unmapped(spec.routed_model, info.usd_per_input_token, info.usd_per_output_token)
    setup = inline_setup() if _prepared_without_io(spec.routed_model) else contextlib.nullcontext()
    started = time.monotonic()
    try:
        with unlogged_call(), setup:
            async with asyncio.timeout(timeout_s + _HARD_TIMEOUT_MARGIN_S):
                if spec.sends_direct and not callbacks_registered():
                    response = await complete_direct(**kwargs)
                else:
                    response = await litellm.acompletion(**kwargs)
    except Exception as exc:
        error = classify(exc, model=spec.name, secrets=(key or "",))
        if error.error_type == "ModelConnectionError" and (down := embedded_server_down(spec.api_base)):
            # Our embedded server died: retrying cannot help until `rlm up` restarts it.
            error = ModelCallError(
                f"model '{spec.name}': LocalModelDown: {down}", error_type="LocalModelDown", non_retryable=True,
                model=spec.name,
            )
        log.warning("llm.call_failed", model=spec.name, error_type=error.error_type, retryable=not error.non_retryable)
        raise error from None  # the provider's raw exception may quote request details
    choices = getattr(response, "choices", None) or []
    if not choices or getattr(choices[0], "message", None) is None:
        raise MalformedReplyError(
            f"model '{spec.name}': MalformedReply: the reply has no choices/message -- will retry",
            model=spec.name,
            usage=_reported_usage(spec, info, response),
        )
    choice = choices[0]
    content = choice.message.content
    text = without_surrogates(content if isinstance(content, str) else ("" if content is None else str(content)))
    usage = getattr(response, "usage", None)
    prompt_tokens = _usage_count(usage, "prompt_tokens")
    completion_tokens = _usage_count(usage, "completion_tokens")
    # A count not reported (some local servers send none, some only one;
    # litellm fills a missing one with 0) or not believable (no prompt is 0
    # tokens, no text is): the most it can be, never less than was sent or received.
    prompt_unknown = not prompt_tokens
    reply_unknown = completion_tokens is None or (completion_tokens == 0 and bool(text))
    if prompt_unknown:
        prompt_tokens = messages_token_bound(messages)
    if reply_unknown:
        completion_tokens = token_bound(len(text.encode()))
    estimated = prompt_unknown or reply_unknown
    usd = _price(spec, info, response, prompt_tokens, completion_tokens, estimated)
    log.debug(
        "llm.call",
        model=spec.name,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        usd=usd,
        usage_estimated=estimated,
        ms=round((time.monotonic() - started) * 1000, 1),
    )
    return Completion(
        text=text,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        usd=usd,
        model=spec.name,
        finish_reason=getattr(choice, "finish_reason", None),
        usage_estimated=estimated,
    )
