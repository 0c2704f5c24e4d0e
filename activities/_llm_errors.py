"""Model-call errors: our own error types and the one mapping to Temporal errors.

Temporal owns retries (litellm runs with `num_retries=0`), so each failure is
classified exactly once, here: a mistake in configuration or request
(bad key, unknown model, prompt over the window, refused content) is
non-retryable with a message naming the fix; anything that may pass on its
own (rate limit, timeout, 5xx, connection) is retryable, honouring the
provider's Retry-After.

Each failure also says whether the provider may have billed it (`billable`):
a request refused before any work (429, 401, 400, 404, a connection that was
never made, a check before sending) costs nothing; a timeout, a connection
dropped after sending, a 5xx or a malformed reply may have cost its full
price. The workflow charges the budget by that (workflows/model_attempts.py).
"""

from __future__ import annotations

import re
from datetime import timedelta
from email.utils import parsedate_to_datetime
from time import time as _now
from typing import TYPE_CHECKING

from activities._litellm_setup import litellm_exceptions as _E
from activities.terminal_text import without_surrogates

if TYPE_CHECKING:
    from temporalio.exceptions import ApplicationError

__all__ = [
    "LLMError",
    "MalformedReplyError",
    "MissingApiKeyError",
    "ModelCallError",
    "ModelConfigError",
    "UnknownModelError",
    "classify",
    "to_application_error",
]

_MAX_MESSAGE_CHARS = 600
# A provider asking for more than this is treated as "retry at the policy's pace".
_MAX_RETRY_AFTER_S = 600.0


class LLMError(Exception):
    """Base of every model-call error raised by activities.llm."""

    error_type = "ModelCallFailed"
    non_retryable = False
    billable = False
    """May the provider have billed the attempt? Errors raised before a request
    is sent are not; provider failures set it per instance."""

    def __init__(
        self,
        message: str,
        *,
        model: str | None = None,
        retry_after_s: float | None = None,
        usage: dict | None = None,
    ) -> None:
        super().__init__(message)
        self.model = model
        self.retry_after_s = retry_after_s
        self.usage = usage
        """Usage the provider reported with the failed reply, if any
        (prompt_tokens, completion_tokens, usd)."""


class UnknownModelError(LLMError, KeyError):
    """A model name neither configured nor known to litellm."""

    error_type = "UnknownModel"
    non_retryable = True

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class MissingApiKeyError(LLMError):
    """The worker's environment lacks the API key a model needs."""

    error_type = "MissingApiKey"
    non_retryable = True


class ModelConfigError(LLMError, ValueError):
    """RLM_MODELS_FILE / RLM_MODELS_JSON is unreadable or invalid."""

    error_type = "ModelConfigError"
    non_retryable = True


class MalformedReplyError(LLMError):
    """The provider answered 200 but with no usable choice (retryable: often transient)."""

    error_type = "MalformedReply"
    billable = True  # it answered: the work was done


class ModelCallError(LLMError):
    """A classified provider failure; `error_type` and `non_retryable` set per instance."""

    def __init__(
        self,
        message: str,
        *,
        error_type: str,
        non_retryable: bool,
        model: str | None = None,
        retry_after_s: float | None = None,
        status_code: int | None = None,
        billable: bool = True,
    ) -> None:
        super().__init__(message, model=model, retry_after_s=retry_after_s)
        self.error_type = error_type
        self.non_retryable = non_retryable
        self.status_code = status_code
        self.billable = billable


_CONTEXT_HINTS = re.compile(
    r"context[_ ]length|context window|maximum context|prompt is too long|too many tokens|"
    r"input is too long|exceeds the context",
    re.IGNORECASE,
)
_POLICY_HINTS = re.compile(r"content[_ ]policy|content[_ ]filter|safety system", re.IGNORECASE)
_CONNECTION_HINTS = re.compile(r"connection error|connection refused|cannot connect|name or service not known", re.I)
_QUOTA_HINTS = re.compile(r"insufficient_quota|exceeded your current quota|billing", re.IGNORECASE)

# (error type, non-retryable, fix) per kind of failure.
_KINDS: dict[str, tuple[str, bool, str]] = {
    "auth": ("ModelAuthError", True, "check the API key in the worker's environment and its access to this model"),
    "not_found": ("ModelNotFound", True, "check the model name and api_base in the model configuration"),
    "context": ("ContextWindowExceeded", True, "send a shorter prompt (split the text into smaller chunks)"),
    "policy": ("ContentPolicyViolation", True, "rephrase the request; the provider refused its content"),
    "quota": ("ModelQuotaExceeded", True, "add credit or raise the quota with the provider"),
    "bad_request": ("ModelBadRequest", True, "fix the request parameters or the model configuration"),
    "unknown_model": ("UnknownModel", True, "configure the model (RLM_MODELS_FILE / RLM_MODELS_JSON)"),
    "rate_limit": ("ModelRateLimited", False, "will retry; lower concurrency if it persists"),
    "timeout": ("ModelTimeout", False, "will retry; raise the call timeout if the model is slow"),
    "server": ("ModelServerError", False, "will retry; the provider failed"),
    "connection": ("ModelConnectionError", False, "will retry; check that api_base is reachable from the worker"),
    "malformed": ("MalformedReply", False, "will retry; the provider's reply had no usable content"),
    "other": ("ModelCallFailed", False, "will retry"),
}


# Kinds of failure where the provider refused the request before doing any
# work: it bills nothing for them.
_REFUSED_BEFORE_WORK = frozenset(
    {"auth", "not_found", "context", "policy", "quota", "bad_request", "unknown_model", "rate_limit"}
)
# Exceptions (by class name, theirs or a base class's, anywhere in the chain)
# that mean no connection was made, so the request never left: httpx / aiohttp
# (whose DNS, TLS and proxy failures are subclasses of ClientConnectorError) / the OS.
_NOT_CONNECTED = frozenset({"ConnectError", "ConnectTimeout", "ClientConnectorError", "ConnectionRefusedError"})


def _never_connected(exc: BaseException) -> bool:
    seen: set[int] = set()
    inner: BaseException | None = exc
    while inner is not None and id(inner) not in seen:
        if any(cls.__name__ in _NOT_CONNECTED for cls in type(inner).__mro__):
            return True
        seen.add(id(inner))
        inner = inner.__cause__ or inner.__context__ or getattr(inner, "original_exception", None)
    return False


def _billable(kind: str, exc: BaseException) -> bool:
    """May the provider have billed this failed request? When in doubt, yes."""
    if kind in _REFUSED_BEFORE_WORK:
        return False
    return not (kind == "connection" and _never_connected(exc))


def _status(exc: BaseException) -> int | None:
    status = getattr(exc, "status_code", None)
    return status if isinstance(status, int) else None


def _kind(exc: BaseException) -> str:
    # The provider's error code ("context_length_exceeded", "insufficient_quota")
    # is often more telling than its message.
    text = " ".join(str(x) for x in (exc, getattr(exc, "code", None), getattr(exc, "type", None)) if x)
    status = _status(exc)
    if isinstance(exc, _E.ContextWindowExceededError) or (status == 400 and _CONTEXT_HINTS.search(text)):
        return "context"
    if isinstance(exc, _E.ContentPolicyViolationError) or (status == 400 and _POLICY_HINTS.search(text)):
        return "policy"
    if isinstance(exc, _E.LiteLLMUnknownProvider) or "LLM Provider NOT provided" in text:
        return "unknown_model"
    if isinstance(exc, (_E.AuthenticationError, _E.PermissionDeniedError)) or status in (401, 403):
        return "auth"
    if isinstance(exc, _E.NotFoundError) or status == 404:
        return "not_found"
    if isinstance(exc, _E.RateLimitError) or status == 429:
        return "quota" if _QUOTA_HINTS.search(text) else "rate_limit"
    if isinstance(exc, _E.Timeout) or status == 408 or isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, (_E.APIConnectionError, ConnectionError)) or _CONNECTION_HINTS.search(text):
        # litellm reports a refused connection as InternalServerError "Connection error."
        return "connection"
    if isinstance(exc, (_E.InternalServerError, _E.ServiceUnavailableError, _E.BadGatewayError)):
        return "server"
    if status is not None and status >= 500:
        return "server"
    if isinstance(exc, (_E.BadRequestError, _E.UnprocessableEntityError)) or (status and 400 <= status < 500):
        return "quota" if status == 402 else "bad_request"
    return "other"


def retry_after_seconds(exc: BaseException) -> float | None:
    """Seconds from a Retry-After / retry-after-ms header on the failed response, if any."""
    headers: dict[str, str] = {}
    response = getattr(exc, "response", None)
    for source in (
        getattr(response, "headers", None),
        getattr(exc, "litellm_response_headers", None),
        getattr(exc, "headers", None),
    ):
        if source:
            headers.update({str(k).lower(): str(v) for k, v in dict(source).items()})
    try:
        if "retry-after-ms" in headers:
            seconds = float(headers["retry-after-ms"]) / 1000.0
        elif "retry-after" in headers:
            value = headers["retry-after"].strip()
            try:
                seconds = float(value)
            except ValueError:
                seconds = parsedate_to_datetime(value).timestamp() - _now()
        else:
            return None
    except (TypeError, ValueError, OverflowError):
        return None
    if seconds != seconds or seconds < 0:  # NaN or in the past
        return None
    return min(seconds, _MAX_RETRY_AFTER_S)


def _one_line(text: str, secrets: tuple[str, ...] = ()) -> str:
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    # A provider's message may be megabytes: cut it before any regex (the
    # prefix pattern below backtracks on long runs of word characters).
    text = text[: _MAX_MESSAGE_CHARS * 4]
    # litellm prefixes messages with its exception class names; they say nothing here.
    text = re.sub(r"(litellm\.\w+:\s*|\w+Error:\s*|OpenAIException\s*-\s*)", "", text)
    text = " ".join(text.split())
    return text if len(text) <= _MAX_MESSAGE_CHARS else text[: _MAX_MESSAGE_CHARS - 3] + "..."


def classify(exc: BaseException, *, model: str | None = None, secrets: tuple[str, ...] = ()) -> LLMError:
    """Turn any exception from a model call into an LLMError with a one-line message.

    `model` is the configured model name to mention; `secrets` are values
    (API keys) to scrub from the provider's message.
    """
    if isinstance(exc, LLMError):
        return exc
    kind = _kind(exc)
    error_type, non_retryable, fix = _KINDS[kind]
    status = _status(exc)
    # A provider's text may hold a lone surrogate: it must still fit a Temporal failure.
    detail = without_surrogates(_one_line(str(exc) or type(exc).__name__, secrets))
    where = f"model '{model}'" if model else "model call"
    status_text = f" (HTTP {status})" if status else ""
    retry_after = None if non_retryable else retry_after_seconds(exc)
    message = f"{where}: {error_type}{status_text}: {detail} -- {fix}"
    return ModelCallError(
        message,
        error_type=error_type,
        non_retryable=non_retryable,
        model=model,
        retry_after_s=retry_after,
        status_code=status,
        billable=_billable(kind, exc),
    )


def to_application_error(exc: BaseException, *, model: str | None = None, sent: bool = True) -> ApplicationError:
    """The Temporal error for a failed model call (see the module docstring).

    Raise it from an activity: `raise to_application_error(e) from e`. Pass
    `sent=False` for a failure before the request was sent (it cost nothing).
    """
    # Imported here: client commands check models through this module and
    # must not pay for importing the Temporal SDK (~70 ms) to do it.
    from temporalio.exceptions import ApplicationError

    if isinstance(exc, ApplicationError):
        return exc
    error = classify(exc, model=model)
    delay = None
    if error.retry_after_s is not None and not error.non_retryable:
        delay = timedelta(seconds=error.retry_after_s)
    details = {
        "model": error.model,
        "status_code": getattr(error, "status_code", None),
        # Read by the workflow to charge the attempt (workflows/model_attempts.py).
        "billable": sent and error.billable,
        "usage": error.usage,
    }
    return ApplicationError(
        str(error),
        details,
        type=error.error_type,
        non_retryable=error.non_retryable,
        next_retry_delay=delay,
    )
