"""Which models a worker can call, how, and at what price.

The worker's configuration (`ModelSpec`: litellm model, api_base, the NAME of
the env var holding the key, price and window overrides) stays on the worker.
Workflows only ever see `ModelInfo` (window, prices, prompt profile), which
goes into Temporal history and therefore holds no secrets.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from activities._litellm_setup import litellm
from activities._llm_errors import (
    MissingApiKeyError,
    ModelConfigError,
    UnknownModelError,
)
from activities.local_model import LOCAL_MODEL_NAME, local_model_spec
from activities.settings import is_loopback_host
from workflows.steps import ModelInfo  # the workflow's view of a model, defined once

LOCAL_MODEL_PORT_ENV = "RLM_LOCAL_MODEL_PORT"
DEFAULT_LOCAL_MODEL_PORT = 8090

__all__ = [
    "ModelInfo",
    "ModelRegistry",
    "ModelSpec",
    "api_key_for",
    "check_credentials",
    "fully_configured",
    "is_loopback",
    "model_info",
    "model_info_known",
]

DEFAULT_CONTEXT_WINDOW = 128_000
DEFAULT_MAX_OUTPUT_TOKENS = 4096
MODELS_FILE_ENV = "RLM_MODELS_FILE"
MODELS_JSON_ENV = "RLM_MODELS_JSON"
# OpenAI-compatible local servers ignore the key, but the openai client refuses
# to send a request without one.
_LOCAL_PLACEHOLDER_KEY = "not-needed"
DIRECT_PROVIDER = "rlm_direct"
"""litellm provider name of the direct client (activities/_direct_openai.py)."""

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HOW_TO_ADD = (
    f'add it to the JSON in {MODELS_FILE_ENV} (a file) or {MODELS_JSON_ENV} (inline), e.g. '
    '{"models": [{"name": "my-model", "litellm_model": "openai/my-model", '
    '"api_base": "http://127.0.0.1:8080/v1"}]}, or use a model name litellm knows such as "gpt-4o-mini"'
)


def direct_model(name: str) -> str:
    """The litellm model string of a server's model `name` on the direct client."""
    return f"{DIRECT_PROVIDER}/{name}"


class ModelSpec(BaseModel):
    """How the worker calls one model. Holds no secret: only the NAME of the key's env var."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    """The name used in RunRequest and in guest code (`llm_query(..., model=name)`)."""
    litellm_model: str = Field(min_length=1)
    """litellm model string, e.g. "openai/gpt-4o-mini", "anthropic/claude-sonnet-4-5", "openai/qwen-local"."""
    api_base: str | None = None
    """Base URL of an OpenAI-compatible or self-hosted server; None: the provider's default."""
    api_key_env: str | None = None
    """Env var on the worker holding the API key; None: litellm's default for the provider
    (e.g. OPENAI_API_KEY); a model whose api_base is on loopback then needs no key."""
    usd_per_input_token: float | None = Field(default=None, ge=0)
    """Price override; None: litellm's cost map; unknown there too: 0 (tokens still counted)."""
    usd_per_output_token: float | None = Field(default=None, ge=0)
    """Price override for output tokens, same rules as `usd_per_input_token`."""
    context_window: int | None = Field(default=None, gt=0)
    """Input window in tokens; None: litellm's model info, else 128,000."""
    max_output_tokens: int | None = Field(default=None, gt=0)
    """Largest reply in tokens (sent as max_tokens); None: litellm's model info, else 4096."""
    prompt_profile: Literal["full", "compact"] = "full"
    """System prompt style: "full" for capable models, "compact" (few-shot, short) for small local ones."""
    stop: list[str] = []
    """Stop sequences sent with every call (e.g. "\\nUser:" for small models that role-play)."""
    temperature: float | None = None
    """Sampling temperature sent with every call; None = the provider's default."""
    client: Literal["auto", "litellm", "direct"] = "auto"
    """How the request is sent: "litellm", `litellm.acompletion` with its own
    provider client (the OpenAI SDK for `openai/` models); "direct", one
    aiohttp POST to `api_base` with litellm's reply types, prices and error
    mapping (activities/_direct_openai.py: ~1.1 ms of CPU per call on the
    worker's model loop against ~4.1 ms), for OpenAI-compatible servers:
    needs `api_base` and an `openai/` model; "auto", "direct" for an `openai/`
    model served on this machine (api_base on loopback: a local server, where
    a call's CPU is most of its cost), "litellm" for every other."""

    @model_validator(mode="before")
    @classmethod
    def _no_inline_keys(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            for field in ("api_key", "key", "secret", "token"):
                if field in data:
                    raise ValueError(
                        f"model '{data.get('name', '?')}': '{field}' is not allowed in model configuration; "
                        "put the key in an environment variable of the worker and name it in 'api_key_env'"
                    )
        return data

    @model_validator(mode="after")
    def _direct_needs_a_server(self) -> ModelSpec:
        if self.client == "direct" and (not self.api_base or not self.litellm_model.startswith("openai/")):
            raise ValueError(
                f"model '{self.name}': client 'direct' calls an OpenAI-compatible server: it needs 'api_base' "
                f"and an 'openai/...' litellm_model (got {self.litellm_model!r}, api_base {self.api_base!r})"
            )
        return self

    @property
    def sends_direct(self) -> bool:
        """Whether calls go out through the direct client (`client`, "auto" resolved)."""
        if self.client == "auto":
            return self.litellm_model.startswith("openai/") and is_loopback(self.api_base)
        return self.client == "direct"

    @property
    def routed_model(self) -> str:
        """The model string litellm is called with: `litellm_model`, or with the
        direct client `rlm_direct/<model>`, which litellm hands to our handler."""
        if self.sends_direct:
            return direct_model(self.litellm_model.removeprefix("openai/"))
        return self.litellm_model

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_NAME.match(value):
            raise ValueError(f"api_key_env must be an environment variable NAME such as OPENAI_API_KEY, got {value!r}")
        return value


def _litellm_info(litellm_model: str) -> dict[str, Any]:
    return dict(_cached_litellm_info(litellm_model))


@functools.lru_cache(maxsize=512)
def _cached_litellm_info(litellm_model: str) -> dict[str, Any]:
    # A miss scans litellm's whole price map (~0.2 ms); it runs once per call otherwise.
    try:
        return dict(litellm.get_model_info(litellm_model))
    except Exception:  # noqa: BLE001 - litellm raises several types for "not mapped"
        return {}


def model_info_known(litellm_model: str) -> bool:
    """True when litellm's map has the model (window, prices), as first looked up."""
    return bool(_cached_litellm_info(litellm_model))


def fully_configured(spec: ModelSpec) -> bool:
    """True when the spec itself gives window, output size and both prices, so
    `model_info` needs no lookup in litellm's map (clients check such models
    without importing litellm)."""
    return None not in (spec.context_window, spec.max_output_tokens, spec.usd_per_input_token, spec.usd_per_output_token)


def model_info(spec: ModelSpec) -> ModelInfo:
    """Window and prices of a model: the spec's overrides, then litellm's map, then defaults."""
    known = {} if fully_configured(spec) else _litellm_info(spec.litellm_model)
    window = spec.context_window or known.get("max_input_tokens") or known.get("max_tokens")
    output = spec.max_output_tokens or known.get("max_output_tokens") or known.get("max_tokens")
    in_price = spec.usd_per_input_token
    out_price = spec.usd_per_output_token
    return ModelInfo(
        name=spec.name,
        context_window=int(window or DEFAULT_CONTEXT_WINDOW),
        max_output_tokens=int(output or DEFAULT_MAX_OUTPUT_TOKENS),
        usd_per_input_token=float(in_price if in_price is not None else known.get("input_cost_per_token") or 0.0),
        usd_per_output_token=float(out_price if out_price is not None else known.get("output_cost_per_token") or 0.0),
        priced=(in_price is not None or known.get("input_cost_per_token") is not None)
        and (out_price is not None or known.get("output_cost_per_token") is not None),
        prompt_profile=spec.prompt_profile,
        stop=list(spec.stop),
    )


@functools.lru_cache(maxsize=256)
def is_loopback(api_base: str | None) -> bool:
    """True for an api_base on this machine (a local server that needs no key).
    Cached: every model call asks it several times (`sends_direct`), ~6 us each."""
    return bool(api_base) and is_loopback_host(urlparse(api_base).hostname or "")


def check_credentials(spec: ModelSpec, *, offline: bool = False) -> None:
    """Raise MissingApiKeyError naming the env var to set, if the worker lacks the model's key.
    `offline`: decide only what the configuration alone decides (no litellm
    import); a provider's default key is then left to the worker to check."""
    if spec.api_key_env is not None:
        if not os.environ.get(spec.api_key_env):
            raise MissingApiKeyError(
                f"model '{spec.name}': environment variable {spec.api_key_env} is not set on the worker; "
                f"export {spec.api_key_env}=<your key> before starting the worker",
                model=spec.name,
            )
        return
    if is_loopback(spec.api_base) or offline:
        return
    try:
        env = litellm.validate_environment(model=spec.litellm_model, api_base=spec.api_base)
    except Exception:  # noqa: BLE001 - providers litellm cannot check: let the call decide
        return
    missing = [k for k in env.get("missing_keys") or [] if "API_BASE" not in k or not spec.api_base]
    if not env.get("keys_in_environment") and missing:
        names = " or ".join(missing)
        raise MissingApiKeyError(
            f"model '{spec.name}' ({spec.litellm_model}): no API key; set {names} in the worker's environment "
            "(or name another variable in the model's api_key_env)",
            model=spec.name,
        )


def api_key_for(spec: ModelSpec) -> str | None:
    """The key to send: from the named env var; a placeholder for a local server with no
    api_key_env; else None, so litellm reads the provider's default env var."""
    if spec.api_key_env is not None:
        return os.environ.get(spec.api_key_env) or None
    if is_loopback(spec.api_base):
        # Never hand a provider's real key (OPENAI_API_KEY) to a local server.
        return _LOCAL_PLACEHOLDER_KEY
    if spec.sends_direct:
        # What litellm's OpenAI client would read; our handler reads nothing itself.
        return os.environ.get("OPENAI_API_KEY") or None
    return None


def _litellm_knows(name: str) -> bool:
    if name in litellm.model_cost:
        return True
    try:
        litellm.get_llm_provider(name)
    except Exception:  # noqa: BLE001 - "LLM Provider NOT provided" and friends
        return False
    return True


def _parse_models(text: str, source: str) -> list[ModelSpec]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelConfigError(f"{source}: not valid JSON ({exc}); expected {{\"models\": [...]}}") from exc
    items = data.get("models") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise ModelConfigError(f'{source}: expected {{"models": [{{"name": ..., "litellm_model": ...}}, ...]}}')
    specs = []
    for index, item in enumerate(items):
        try:
            specs.append(ModelSpec.model_validate(item))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'model'}: {e['msg']}" for e in exc.errors())
            raise ModelConfigError(f"{source}: model #{index}: {problems}") from exc
    return specs


class ModelRegistry:
    """The models a worker can call, by configured name; litellm names work without configuration."""

    def __init__(self, specs: Iterable[ModelSpec] = ()) -> None:
        self._specs: dict[str, ModelSpec] = {}
        for spec in specs:
            self._specs[spec.name] = spec  # later sources override earlier ones

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ModelRegistry:
        """Models from the file named by RLM_MODELS_FILE, then RLM_MODELS_JSON (inline, wins on clashes)."""
        env = os.environ if environ is None else environ
        specs: list[ModelSpec] = []
        if path := env.get(MODELS_FILE_ENV):
            try:
                text = Path(path).read_text(encoding="utf-8")
            except OSError as exc:
                raise ModelConfigError(f"{MODELS_FILE_ENV}={path}: cannot read it ({exc.strerror})") from exc
            specs += _parse_models(text, f"{MODELS_FILE_ENV}={path}")
        if inline := env.get(MODELS_JSON_ENV):
            specs += _parse_models(inline, MODELS_JSON_ENV)
        if not any(spec.name == LOCAL_MODEL_NAME for spec in specs):
            # The embedded local model (`rlm up` with the `local` extra) is always known.
            port = int(env.get(LOCAL_MODEL_PORT_ENV) or DEFAULT_LOCAL_MODEL_PORT)
            specs.append(ModelSpec(**local_model_spec(port)))
        return cls(specs)

    @property
    def names(self) -> list[str]:
        """Configured model names, sorted."""
        return sorted(self._specs)

    @property
    def specs(self) -> list[ModelSpec]:
        """Configured models, by name."""
        return [self._specs[name] for name in self.names]

    def resolve(self, name: str) -> ModelSpec:
        """The spec for a configured name, or an implicit one for a name litellm knows."""
        if spec := self._specs.get(name):
            return spec
        if name and _litellm_knows(name):
            return ModelSpec(name=name, litellm_model=name)
        configured = ", ".join(self.names) or "none"
        raise UnknownModelError(
            f"unknown model '{name}': not configured on this worker (configured: {configured}) "
            f"and not a model litellm knows; {_HOW_TO_ADD}",
            model=name,
        )

    def unknown_fields(self, fields: Mapping[str, str]) -> str | None:
        """`field: unknown model 'x'; known: ...` for each field (e.g.
        `models.sub`) naming a model this worker cannot call, joined by
        '; '; None when every name resolves."""
        problems = [
            f"{field}: unknown model {name!r}" for field, name in fields.items() if not self._knows(name)
        ]
        if not problems:
            return None
        shown = self.names[:20]
        known = ", ".join(shown) + (f" and {len(self.names) - 20} more" if len(self.names) > 20 else "")
        return "; ".join(problems) + (
            f"; known: {known or 'none configured'} (configured on this worker), or a model name "
            "litellm knows such as 'gpt-4o-mini'"
        )

    def _knows(self, name: str) -> bool:
        return bool(name) and (name in self._specs or _litellm_knows(name))

    def info(self, name: str) -> ModelInfo:
        """What the workflow may know about a model (window, prices, prompt style)."""
        return model_info(self.resolve(name))

    def check_credentials(self, spec: ModelSpec) -> None:
        """Raise MissingApiKeyError naming the env var to set when the key is missing."""
        check_credentials(spec)
