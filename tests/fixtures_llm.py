"""Fixtures for model calls: one scripted model server per test session.

- `fake_llm` (session): the running FakeLLM; rules and log persist across tests.
- `llm` (function): the same server, reset (no rules, empty log) for this test.
- `fake_registry(fake)`, `fake_model_specs(url)`, `models_json(url)`: model
  configuration pointing at the server, for in-process code and (as
  RLM_MODELS_JSON) for worker subprocesses.

The models are "fake-root" and "fake-sub" (litellm "openai/fake-root", ...),
priced at 1e-6 / 2e-6 USD per input / output token so budget tests can use
USD. The server demands the key FAKE_LLM_API_KEY_VALUE, which the fixture
exports as FAKE_LLM_API_KEY (subprocesses started later inherit it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest

from activities.llm import ModelRegistry, ModelSpec
from tests.fake_llm import FakeLLM

__all__ = [
    "FAKE_API_KEY_ENV",
    "FAKE_API_KEY_VALUE",
    "FAKE_USD_PER_INPUT_TOKEN",
    "FAKE_USD_PER_OUTPUT_TOKEN",
    "fake_model_specs",
    "fake_registry",
    "models_json",
]

FAKE_API_KEY_ENV = "FAKE_LLM_API_KEY"
FAKE_API_KEY_VALUE = "test-key"
FAKE_USD_PER_INPUT_TOKEN = 1e-6
FAKE_USD_PER_OUTPUT_TOKEN = 2e-6
FAKE_MODEL_NAMES = ("fake-root", "fake-sub")


def fake_model_specs(fake_url: str, **overrides: object) -> list[ModelSpec]:
    """ModelSpecs for "fake-root" and "fake-sub" at `fake_url`; `overrides` apply to both."""
    specs = []
    for name in FAKE_MODEL_NAMES:
        fields: dict = {
            "name": name,
            "litellm_model": f"openai/{name}",
            "api_base": fake_url,
            "api_key_env": FAKE_API_KEY_ENV,
            "usd_per_input_token": FAKE_USD_PER_INPUT_TOKEN,
            "usd_per_output_token": FAKE_USD_PER_OUTPUT_TOKEN,
            "context_window": 128_000,
            "max_output_tokens": 1024,
        }
        fields.update(overrides)
        specs.append(ModelSpec(**fields))
    return specs


def models_json(fake_url: str, **overrides: object) -> str:
    """The fake models as RLM_MODELS_JSON text, for a worker in another process."""
    return json.dumps({"models": [s.model_dump(mode="json") for s in fake_model_specs(fake_url, **overrides)]})


def fake_registry(fake: FakeLLM | str, **overrides: object) -> ModelRegistry:
    """A ModelRegistry whose "fake-root" / "fake-sub" call the given server (or URL)."""
    url = fake if isinstance(fake, str) else fake.url
    return ModelRegistry(fake_model_specs(url, **overrides))


@pytest.fixture(scope="session")
def fake_llm() -> Iterator[FakeLLM]:
    """The scripted model server, started once per session on 127.0.0.1."""
    previous = os.environ.get(FAKE_API_KEY_ENV)
    os.environ[FAKE_API_KEY_ENV] = FAKE_API_KEY_VALUE
    with FakeLLM(api_key=FAKE_API_KEY_VALUE, models=list(FAKE_MODEL_NAMES)) as fake:
        yield fake
    if previous is None:
        os.environ.pop(FAKE_API_KEY_ENV, None)
    else:
        os.environ[FAKE_API_KEY_ENV] = previous


@pytest.fixture
def llm(fake_llm: FakeLLM) -> FakeLLM:
    """The session's model server with no rules and an empty request log."""
    fake_llm.reset()
    return fake_llm
