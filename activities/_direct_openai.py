"""A lean HTTP client for OpenAI-compatible servers, with litellm's types.

A model configured with `"client": "direct"` is sent by this module: one POST
to `{api_base}/chat/completions` on one aiohttp session, the JSON reply read
into litellm's ModelResponse and priced by litellm's rule (`_stamp_price`),
a failure mapped by litellm's own `exception_type`, so the caller sees what
`litellm.acompletion` would have returned or raised (`complete_direct`).

It skips `litellm.acompletion` itself: its per-call machinery (parameter
mapping for every provider, logging objects, model-info lookups, response
metadata) doubled the CPU of a call on the worker's one model loop (1,000
calls of 200K characters at 32 in flight: 1.0-1.2 ms a call against
1.8-2.0 ms), and the calls of a wave wait for each other's share
(bench/README.md, twenty-fourth pass). With a litellm callback registered (an
operator's own logging) calls go through `acompletion`, to this module's
handler in litellm's `custom_provider_map`, so that they are logged.

Scope: plain (non-streaming) chat completions with text messages, which is
all the engine sends. Failures are raised so that litellm maps them like its
own: an HTTP error carries its status, body and headers (Retry-After), a
timeout is litellm's Timeout, a refused connection keeps aiohttp's error as
its cause (so it is known to have cost nothing).
"""

from __future__ import annotations

import asyncio
import atexit
import json
import threading
from typing import Any

import aiohttp
import pydantic_core

from activities._litellm_setup import litellm
from activities._model_registry import DIRECT_PROVIDER, direct_model
from workflows.budget import MAX_BELIEVABLE_TOKENS

__all__ = ["complete_direct", "register"]

# Request fields sent to the server (the ones litellm passes through to the
# handler after its own parameter mapping).
_SENT_PARAMS = ("max_tokens", "stop", "temperature")
_ERROR_BODY_CHARS = 100_000
# A chat completion of the largest window is a few MB of JSON; past this a
# reply is not one (a hostile or broken server), and is not held in memory.
MAX_REPLY_BYTES = 64 * 1024 * 1024


class DirectHTTPError(Exception):
    """An HTTP error reply; litellm maps it by `status_code` (429 ->
    RateLimitError, keeping `headers` for Retry-After)."""

    def __init__(self, status_code: int, message: str, headers: dict[str, str]) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.headers = headers


def _handler_class(module: Any) -> type:
    CustomLLM = module.CustomLLM  # noqa: N806 - a class from litellm

    class DirectChat(CustomLLM):
        """litellm's custom handler for the `rlm_direct/` models (calls that
        go through `acompletion`: see the module docstring)."""

        async def acompletion(  # noqa: PLR0913 - litellm's handler signature
            self, model, messages, api_base, custom_prompt_dict, model_response, print_verbose, encoding, api_key,
            logging_obj, optional_params, acompletion=None, litellm_params=None, logger_fn=None, headers=None,
            timeout=None, client=None,
        ):  # fmt: skip
            params = {k: optional_params[k] for k in _SENT_PARAMS if optional_params.get(k) is not None}
            return await _post(model_response, model, messages, api_base, api_key, params, timeout, headers)

    return DirectChat


async def complete_direct(
    model: str, messages: list[dict], *, timeout: float, api_base: str | None = None, api_key: str | None = None,
    **params: Any,
) -> Any:
    """What `litellm.acompletion(routed_model, ...)` returns for a
    `rlm_direct/` model, without its per-call machinery: a ModelResponse, or
    the exception litellm would raise (mapped by litellm's `exception_type`)."""
    from litellm.litellm_core_utils.exception_mapping_utils import exception_type
    from litellm.types.utils import ModelResponse
    from litellm.utils import validate_openai_optional_params

    model = model.removeprefix(f"{DIRECT_PROVIDER}/")
    sent = {k: v for k, v in params.items() if k in _SENT_PARAMS and v is not None}
    if "stop" in sent:  # litellm's completion() keeps OpenAI's first 4 (unless its limit is off)
        sent["stop"] = validate_openai_optional_params(stop=sent["stop"])
    try:
        return await _post(ModelResponse(), model, messages, api_base, api_key, sent, timeout, None)
    except Exception as exc:
        # As `acompletion` raises it: the mapped error has `exc` as its context
        # (or is `exc`), so whether a connection was ever made stays known.
        raise exception_type(model=model, original_exception=exc, custom_llm_provider=DIRECT_PROVIDER)  # noqa: B904


_sessions: dict[asyncio.AbstractEventLoop, aiohttp.ClientSession] = {}
_sessions_lock = threading.Lock()


def _session() -> aiohttp.ClientSession:
    loop = asyncio.get_running_loop()
    with _sessions_lock:
        session = _sessions.get(loop)
        if session is None or session.closed:
            # No connection cap of aiohttp's own: the run's concurrency cap rules.
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
            _sessions[loop] = session
            atexit.register(_close_soon, loop, session)
    return session


async def _post(  # noqa: PLR0913 - one request's parts
    model_response: Any, model: str, messages: list[dict], api_base: str | None, api_key: str | None,
    params: dict[str, Any], timeout: Any, headers: dict[str, str] | None,
) -> Any:
    """One chat completion POST, its reply read into `model_response`."""
    body = {"model": model, "messages": messages, **params}
    request_headers = {"Content-Type": "application/json", **(headers or {})}
    if api_key:
        request_headers["Authorization"] = f"Bearer {api_key}"
    seconds = timeout if isinstance(timeout, (int, float)) else None
    url = (api_base or "").rstrip("/") + "/chat/completions"
    try:
        # No redirects: the key must not follow one to another host.
        async with _session().post(
            url, data=_request_body(body), headers=request_headers, allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=seconds),
        ) as reply:  # fmt: skip
            if 300 <= reply.status < 400:
                raise litellm.BadRequestError(
                    message=f"the server answered HTTP {reply.status}, a redirect to "
                    f"{reply.headers.get('Location', '?')!r}; set api_base to the final URL "
                    "(redirects are not followed: the API key would go with them)",
                    model=model, llm_provider=DIRECT_PROVIDER,
                )  # fmt: skip
            raw = await _bounded_body(reply)
            if reply.status >= 400:
                text = (raw or b"")[:_ERROR_BODY_CHARS].decode("utf-8", errors="replace")
                raise DirectHTTPError(reply.status, _error_message(text), dict(reply.headers))
    except asyncio.TimeoutError as exc:  # aiohttp's own timeouts are TimeoutErrors too
        raise litellm.Timeout(
            message=f"no reply within {seconds} s", model=model, llm_provider=DIRECT_PROVIDER
        ) from exc
    except aiohttp.ClientError as exc:
        raise litellm.APIConnectionError(
            message=f"Connection error: {exc}", llm_provider=DIRECT_PROVIDER, model=model
        ) from exc
    return _fill(model_response, raw, model)


def _request_body(body: dict[str, Any]) -> bytes:
    """The request as JSON. pydantic-core's encoder writes a 200K-character
    prompt in ~0.2 ms, `json.dumps` in ~1 ms: the model loop does this for
    every call, one after another (bench/README.md, twelfth pass). A string
    that is not valid Unicode (a lone surrogate) is escaped by `json`, as before."""
    try:
        return pydantic_core.to_json(body)
    except pydantic_core.PydanticSerializationError:
        return json.dumps(body).encode()


async def _bounded_body(reply: aiohttp.ClientResponse) -> bytes | None:
    """The reply's body, or None once it passes MAX_REPLY_BYTES (read no further)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in reply.content.iter_any():
        size += len(chunk)
        if size > MAX_REPLY_BYTES:
            reply.close()
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _error_message(text: str) -> str:
    """The provider's own message from an OpenAI-style error body, else the body."""
    try:
        error = json.loads(text).get("error")
    except (ValueError, AttributeError):
        return text
    if isinstance(error, dict):
        parts = [str(error.get(k)) for k in ("message", "code", "type") if error.get(k)]
        return " ".join(parts) or text
    return str(error) if error else text


def _fill(model_response: Any, raw: bytes | None, model: str) -> Any:
    """The reply's choice and usage in litellm's ModelResponse; a reply that is
    not a chat completion (or too large to be one) leaves it without choices:
    a malformed reply, retried and charged as one."""
    from litellm.types.utils import Choices, Message, Usage

    try:
        data = json.loads(raw)  # type: ignore[arg-type] - None raises TypeError
        first = data["choices"][0]
        message = first["message"]
        content = _content_text(message.get("content"))
        finish_reason = first.get("finish_reason")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        model_response.choices = []
        return model_response
    model_response.choices = [
        Choices(
            index=0, finish_reason=finish_reason if isinstance(finish_reason, str) else None,
            message=Message(content=content, role="assistant"),
        )
    ]  # fmt: skip
    usage = data.get("usage")
    if isinstance(usage, dict):
        # 0 is "not reported": activities.llm then counts the most it can be.
        model_response.usage = Usage(**{name: _count(usage.get(name)) for name in _USAGE_FIELDS})
    model_response.model = data.get("model") or model
    if isinstance(data.get("id"), str):
        model_response.id = data["id"]
    _stamp_price(model_response, model)
    return model_response


_USAGE_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens")


def _content_text(content: Any) -> str | None:
    """A message's text: a string, null, or (as some servers send) a list of
    parts whose text parts are joined; anything else is not a chat reply."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(part, dict) for part in content):
        return "".join(part["text"] for part in content if isinstance(part.get("text"), str))
    raise TypeError(f"message content is a {type(content).__name__}")


def _count(value: Any) -> int:
    """A usage count as sent, or 0 (not reported) for one that is not a
    believable count: a string, NaN, infinite, negative, above any model's."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0
    return int(value) if 0 <= value <= MAX_BELIEVABLE_TOKENS else 0


def _stamp_price(model_response: Any, model: str) -> None:
    """Put the reply's price where litellm looks first (`_hidden_params`).

    litellm prices every reply for its logging; for a reply that carries a
    price it takes it as is instead of running its cost calculator (~7% of
    the worker's GIL time with 100 runs at once). The price is litellm's own
    rule on the entry the worker made for this model from its spec
    (`activities.llm._enter_unmapped`); without an entry litellm prices it.
    """
    entry = litellm.model_cost.get(direct_model(model))
    usage = getattr(model_response, "usage", None)
    if not entry or usage is None:
        return
    model_response._hidden_params["response_cost"] = (  # noqa: SLF001 - litellm's documented carrier
        usage.prompt_tokens * float(entry.get("input_cost_per_token") or 0.0)
        + usage.completion_tokens * float(entry.get("output_cost_per_token") or 0.0)
    )


def _close_soon(loop: asyncio.AbstractEventLoop, session: aiohttp.ClientSession) -> None:
    """At exit: close the session on its loop (quietly, if the loop still runs)."""
    if loop.is_closed() or not loop.is_running() or session.closed:
        return
    try:
        asyncio.run_coroutine_threadsafe(session.close(), loop).result(timeout=1.0)
    except Exception:  # noqa: BLE001 - the process is ending either way
        pass


_registered = threading.Lock()


def register(module: Any) -> None:
    """Put the handler in litellm's custom provider map (once, keeping any
    handler an operator registered). `module` is litellm, just imported."""
    with _registered:
        providers = list(getattr(module, "custom_provider_map", None) or [])
        if any(entry.get("provider") == DIRECT_PROVIDER for entry in providers):
            return
        providers.append({"provider": DIRECT_PROVIDER, "custom_handler": _handler_class(module)()})
        module.custom_provider_map = providers
