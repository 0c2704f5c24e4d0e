"""Model calls through real litellm against the scripted OpenAI-compatible server."""

from __future__ import annotations

from types import SimpleNamespace

import asyncio
import json
import re
import socket
import threading
import time
import urllib.request
from datetime import timedelta

import pytest
from temporalio.exceptions import ApplicationError

from activities._litellm_setup import litellm
from activities.llm import (
    price_unmapped_models,
    Completion,
    MissingApiKeyError,
    ModelConfigError,
    ModelRegistry,
    ModelSpec,
    UnknownModelError,
    complete,
    to_application_error,
)
from tests.fake_llm import FakeLLM
from tests.fixtures_llm import (
    FAKE_API_KEY_ENV,
    FAKE_USD_PER_INPUT_TOKEN,
    FAKE_USD_PER_OUTPUT_TOKEN,
    fake_registry,
    models_json,
)


def ask(spec: ModelSpec, prompt: str, **kwargs) -> Completion:
    return asyncio.run(complete(spec, [{"role": "user", "content": prompt}], **kwargs))


def failure(spec: ModelSpec, prompt: str, **kwargs) -> ApplicationError:
    with pytest.raises(Exception) as caught:
        ask(spec, prompt, **kwargs)
    return to_application_error(caught.value)


@pytest.fixture(params=["litellm", "direct"])
def client(request: pytest.FixtureRequest) -> str:
    """Each model-call behaviour must hold for both clients (ModelSpec.client)."""
    return request.param


@pytest.fixture
def root(llm: FakeLLM, client: str) -> ModelSpec:
    return fake_registry(llm, client=client).resolve("fake-root")


def test_completion_returns_text_usage_and_cost_from_overrides(llm: FakeLLM, root: ModelSpec) -> None:
    llm.add_rule("capital of France", "The capital of France is Paris.", name="paris")

    reply = ask(root, "What is the capital of France?")

    assert reply.text == "The capital of France is Paris."
    assert reply.model == "fake-root"
    assert reply.finish_reason == "stop"
    assert not reply.usage_estimated
    sent = llm.requests()[0]
    assert reply.prompt_tokens == max(1, len(sent.all_text) // 4) + 3  # as the server reported
    assert reply.completion_tokens == len(reply.text) // 4
    expected = reply.prompt_tokens * FAKE_USD_PER_INPUT_TOKEN + reply.completion_tokens * FAKE_USD_PER_OUTPUT_TOKEN
    assert reply.usd == pytest.approx(expected)
    assert llm.count("paris") == 1
    assert sent.model == "fake-root"
    assert sent.headers["Authorization"] == "Bearer test-key"
    assert sent.body["max_tokens"] == 1024  # the spec's max output: what a budget reserves


def test_stop_sequences_and_max_tokens_reach_the_server(llm: FakeLLM, client: str) -> None:
    spec = fake_registry(llm, stop=["\nUser:"], client=client).resolve("fake-sub")
    llm.add_rule(None, "```repl\nprint(1)\n```\nUser: REPL output: 1\nAssistant: FINAL(1)")

    reply = ask(spec, "go")
    assert reply.text == "```repl\nprint(1)\n```"
    assert llm.requests()[-1].body["stop"] == ["\nUser:"]

    cut = ask(spec, "go", max_tokens=2, stop=[])
    assert "stop" not in llm.requests()[-1].body
    assert cut.finish_reason == "length" and len(cut.text) == 11  # 2 tokens of 4 ASCII characters, rounded down


def test_more_than_four_stop_sequences_are_cut_to_four_on_both_clients(llm: FakeLLM, client: str) -> None:
    # litellm's completion() keeps the first 4 (`validate_openai_optional_params`,
    # unless `litellm.disable_stop_sequence_limit`): OpenAI refuses more with a 400.
    stops = ["s1", "s2", "s3", "s4", "s5", "s6"]
    spec = fake_registry(llm, stop=stops, client=client).resolve("fake-sub")
    llm.add_rule(None, "a s5 b")
    reply = ask(spec, "go")
    assert llm.requests()[-1].body["stop"] == stops[:4]
    assert reply.text == "a s5 b"


def test_content_null_is_an_empty_reply(llm: FakeLLM, root: ModelSpec) -> None:
    llm.add_rule(None, None)
    reply = ask(root, "say nothing")
    assert reply.text == ""
    assert reply.completion_tokens == 0
    assert reply.prompt_tokens > 0 and not reply.usage_estimated


def test_missing_usage_is_estimated_and_still_priced(llm: FakeLLM, root: ModelSpec) -> None:
    llm.add_rule(None, "word " * 200, usage=False)
    reply = ask(root, "count " * 400)
    assert reply.usage_estimated
    # Counted at the budget's upper bound (UTF-8 bytes + message overhead), never 0.
    assert reply.prompt_tokens >= len(("count " * 400).encode())
    assert reply.completion_tokens == len(("word " * 200).encode())
    assert reply.usd == pytest.approx(
        reply.prompt_tokens * FAKE_USD_PER_INPUT_TOKEN + reply.completion_tokens * FAKE_USD_PER_OUTPUT_TOKEN
    )


def _reply_with_usage(usage: dict):
    def reply(request) -> dict:
        return {
            "id": "chatcmpl-usage", "object": "chat.completion", "created": 0, "model": request.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "word " * 30}, "finish_reason": "stop"}],
            "usage": usage,
        }  # fmt: skip

    return reply


@pytest.mark.parametrize(
    "usage",
    [
        {"completion_tokens": 150},
        {"prompt_tokens": None, "completion_tokens": 150, "total_tokens": 150},
        {"prompt_tokens": -5000, "completion_tokens": 150, "total_tokens": -4850},
        {"prompt_tokens": 0, "completion_tokens": 150, "total_tokens": 150},
    ],
    ids=["prompt-missing", "prompt-null", "prompt-negative", "prompt-zero"],
)
def test_a_prompt_count_the_reply_leaves_out_or_gets_wrong_is_estimated(llm: FakeLLM, root: ModelSpec, usage) -> None:
    """A provider that reports only some usage (or a negative count) must not
    lower what the budget counts: the prompt is counted at its upper bound."""
    llm.add_rule(None, _reply_with_usage(usage))
    prompt = "count " * 700
    reply = ask(root, prompt)
    assert reply.usage_estimated
    assert reply.prompt_tokens >= len(prompt.encode())
    assert reply.completion_tokens == 150
    assert reply.usd == pytest.approx(
        reply.prompt_tokens * FAKE_USD_PER_INPUT_TOKEN + 150 * FAKE_USD_PER_OUTPUT_TOKEN
    )


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": 40},
        {"prompt_tokens": 40, "completion_tokens": -7},
        {"prompt_tokens": 40, "completion_tokens": None},
        {"prompt_tokens": 40, "completion_tokens": 0},
    ],
    ids=["reply-missing", "reply-negative", "reply-null", "reply-zero-for-text"],
)
def test_a_reply_count_left_out_or_wrong_is_estimated(llm: FakeLLM, root: ModelSpec, usage) -> None:
    llm.add_rule(None, _reply_with_usage(usage))
    reply = ask(root, "hello")
    assert reply.usage_estimated and reply.prompt_tokens == 40
    assert reply.completion_tokens == len(("word " * 30).encode())
    assert reply.usd > 0


CONTEXT_MESSAGE = "This model's maximum context length is 8192 tokens. However, your messages resulted in 9000 tokens."


def _error_body(message: str, code: str) -> dict:
    return {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}


@pytest.mark.parametrize(
    ("status", "reply", "headers", "error_type", "non_retryable", "delay_s"),
    [
        (401, "Incorrect API key provided.", None, "ModelAuthError", True, None),
        (403, "You may not use this model.", None, "ModelAuthError", True, None),
        (404, "The model `fake-root` does not exist.", None, "ModelNotFound", True, None),
        (400, CONTEXT_MESSAGE, None, "ContextWindowExceeded", True, None),
        (400, _error_body("prompt too long", "context_length_exceeded"), None, "ContextWindowExceeded", True, None),
        (400, _error_body("rejected by our safety system", "content_policy_violation"), None,
         "ContentPolicyViolation", True, None),
        (400, "Unrecognized request argument supplied: foo", None, "ModelBadRequest", True, None),
        (429, "Rate limit reached, slow down.", {"Retry-After": "7"}, "ModelRateLimited", False, 7.0),
        (429, "You exceeded your current quota, please check your plan.", None, "ModelQuotaExceeded", True, None),
        (500, "The server had an error.", None, "ModelServerError", False, None),
        (503, "Overloaded.", {"retry-after-ms": "1500"}, "ModelServerError", False, 1.5),
    ],
)
def test_provider_errors_map_to_temporal_errors(
    llm: FakeLLM, root: ModelSpec, status, reply, headers, error_type, non_retryable, delay_s
) -> None:
    llm.add_rule(None, reply, status=status, headers=headers)

    error = failure(root, "hello")

    assert error.type == error_type
    assert error.non_retryable is non_retryable
    expected_delay = None if delay_s is None else timedelta(seconds=delay_s)
    assert error.next_retry_delay == expected_delay
    assert "model 'fake-root'" in error.message and "\n" not in error.message
    assert llm.count() == 1, "litellm / the OpenAI SDK must not retry on their own"


def test_wrong_key_is_an_auth_error_that_never_shows_the_key(
    llm: FakeLLM, client: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RLM_TEST_WRONG_KEY", "sk-wrong-secret-0123456789")
    spec = fake_registry(llm, api_key_env="RLM_TEST_WRONG_KEY", client=client).resolve("fake-root")
    error = failure(spec, "hello")
    assert error.type == "ModelAuthError" and error.non_retryable
    assert "sk-wrong-secret" not in error.message and "sk-wrong-secret" not in json.dumps(error.details, default=str)


def test_slow_model_times_out_retryably(llm: FakeLLM, root: ModelSpec) -> None:
    release = threading.Event()
    llm.add_rule(None, "late", hold=release)
    try:
        error = failure(root, "hello", timeout_s=0.3)
    finally:
        release.set()
    assert error.type == "ModelTimeout" and not error.non_retryable


def test_unreachable_server_is_a_retryable_connection_error(llm: FakeLLM, client: str) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    spec = fake_registry(f"http://127.0.0.1:{closed_port}/v1", client=client).resolve("fake-root")
    with pytest.raises(Exception) as failed:
        ask(spec, "hello")
    error = to_application_error(failed.value)
    assert error.type == "ModelConnectionError" and not error.non_retryable
    assert error.details[0]["billable"] is False, "a connection never made costs nothing"


def test_a_host_the_direct_client_cannot_resolve_costs_nothing() -> None:
    # aiohttp says so with subclasses of ClientConnectorError (DNS, TLS, proxy);
    # the litellm client's httpx says ConnectError for all of them.
    import aiohttp

    from activities._direct_openai import DIRECT_PROVIDER

    key = SimpleNamespace(host="no-such-host.invalid", port=443, ssl=True)
    try:
        try:
            raise aiohttp.ClientConnectorDNSError(key, OSError(-2, "Name or service not known"))
        except aiohttp.ClientError as exc:
            raise litellm.APIConnectionError(message=f"Connection error: {exc}", llm_provider=DIRECT_PROVIDER,
                                             model="m") from exc  # fmt: skip
    except Exception as exc:  # noqa: BLE001
        error = to_application_error(exc)
    assert error.type == "ModelConnectionError" and error.details[0]["billable"] is False


def test_a_connection_dropped_after_sending_may_have_cost_its_price(llm: FakeLLM, root: ModelSpec) -> None:
    llm.add_rule(None, "never seen", drop=True)
    error = failure(root, "hello")
    assert error.type == "ModelConnectionError" and not error.non_retryable
    assert error.details[0]["billable"] is True, "the server had the request: it may have billed it"


def test_the_direct_client_follows_no_redirect_and_reads_no_huge_reply(
    llm: FakeLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    from activities import _direct_openai

    spec = fake_registry(llm, client="direct").resolve("fake-root")
    # A redirect (where the key would follow) is an error reply, not followed.
    llm.add_rule("go elsewhere", "moved", status=307, headers={"Location": llm.url + "/chat/completions"})
    error = failure(spec, "go elsewhere")
    assert llm.count() == 1 and error.type == "ModelBadRequest" and error.non_retryable
    assert "HTTP 307, a redirect to" in error.message and "set api_base to the final URL" in error.message
    # A reply past the cap is a malformed reply, however it ends.
    monkeypatch.setattr(_direct_openai, "MAX_REPLY_BYTES", 4_096)
    llm.add_rule("be long", "x" * 10_000)
    error = failure(spec, "be long")
    assert error.type == "MalformedReply" and not error.non_retryable


def test_a_long_prompt_of_any_script_arrives_as_sent(llm: FakeLLM, root: ModelSpec) -> None:
    # Lines, quotes, backslashes, accents, CJK and an emoji: what JSON must escape or carry as UTF-8.
    prompt = "chunk 7:\n" + ('Zoë said "naïve" \\ 東京 \t \U0001F600\n' * 8_000)
    llm.add_rule("chunk 7:", "read")
    assert ask(root, prompt).text == "read"
    assert llm.requests()[-1].messages[-1]["content"] == prompt


def test_the_direct_client_escapes_what_is_not_unicode() -> None:
    import json

    from activities._direct_openai import _request_body

    body = {"model": "m", "messages": [{"role": "user", "content": "é\n東京"}], "temperature": 0.2}
    assert json.loads(_request_body(body)) == body
    # A lone surrogate cannot be UTF-8: escaped as json.dumps escapes it, not an error.
    odd = {"model": "m", "messages": [{"role": "user", "content": "a\ud800b"}]}
    assert json.loads(_request_body(odd)) == odd


def test_unmatched_prompt_fails_loudly_naming_the_prompt(llm: FakeLLM, root: ModelSpec) -> None:
    error = failure(root, "a prompt nobody scripted")
    assert error.type == "ModelServerError"
    assert "no rule matches" in error.message and "a prompt nobody scripted" in error.message


def test_unknown_model_name_is_non_retryable_and_says_how_to_add_one(llm: FakeLLM) -> None:
    registry = fake_registry(llm)
    with pytest.raises(UnknownModelError) as caught:
        registry.resolve("no-such-model")
    error = to_application_error(caught.value)
    assert error.type == "UnknownModel" and error.non_retryable
    assert "'no-such-model'" in error.message
    assert "fake-root, fake-sub" in error.message and "RLM_MODELS_JSON" in error.message


def test_litellm_model_names_resolve_without_configuration() -> None:
    spec = ModelRegistry().resolve("gpt-4o-mini")
    assert spec.litellm_model == "gpt-4o-mini"
    assert ModelRegistry().resolve("openai/any-deployment").litellm_model == "openai/any-deployment"


def test_missing_key_env_var_fails_before_any_request(llm: FakeLLM) -> None:
    spec = fake_registry(llm, api_key_env="RLM_TEST_UNSET_KEY").resolve("fake-root")
    llm.add_rule(None, "never sent")
    with pytest.raises(MissingApiKeyError) as caught:
        ask(spec, "hello")
    error = to_application_error(caught.value)
    assert error.type == "MissingApiKey" and error.non_retryable
    assert "RLM_TEST_UNSET_KEY" in error.message
    assert llm.count() == 0


def test_provider_default_key_is_checked_by_litellm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    registry = ModelRegistry()
    with pytest.raises(MissingApiKeyError, match="OPENAI_API_KEY"):
        registry.check_credentials(registry.resolve("gpt-4o-mini"))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    registry.check_credentials(registry.resolve("gpt-4o-mini"))


def test_local_server_without_key_needs_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with FakeLLM() as local:  # a keyless local server, like llama.cpp
        local.add_rule(None, "hi from local")
        spec = ModelSpec(name="qwen", litellm_model="openai/qwen-local", api_base=local.url)
        ModelRegistry([spec]).check_credentials(spec)
        reply = ask(spec, "hello")
    assert reply.text == "hi from local"
    assert reply.usd == 0.0 and reply.prompt_tokens > 0  # unknown price: free, tokens still counted


def test_two_hundred_concurrent_requests_are_in_flight_at_once(llm: FakeLLM, root: ModelSpec) -> None:
    release = threading.Event()
    rule = llm.add_rule(re.compile(r"item \d+"), lambda r: "echo " + r.last_user_text, hold=release)

    def release_when_all_arrived() -> None:
        llm.wait_for_count(200, rule, timeout_s=60)
        release.set()

    releaser = threading.Thread(target=release_when_all_arrived)
    releaser.start()

    async def fan_out() -> list[Completion]:
        calls = [complete(root, [{"role": "user", "content": f"item {i}"}]) for i in range(200)]
        return await asyncio.gather(*calls)

    started = time.monotonic()
    try:
        replies = asyncio.run(fan_out())
    finally:
        release.set()
        releaser.join()
    elapsed = time.monotonic() - started
    assert [r.text for r in replies] == [f"echo item {i}" for i in range(200)]
    assert llm.count(rule) == 200
    print(f"\n200 concurrent calls through litellm: {elapsed:.2f} s")


def test_a_late_reply_of_an_earlier_test_neither_holds_up_nor_bills_the_next() -> None:
    """The scripted server is shared by the session's tests: a request still
    worked on when the next test resets it (a 60 s delay its run stopped
    waiting for) made that test's `wait_idle` time out, and would have been
    billed to it."""
    release = threading.Event()
    with FakeLLM() as server:
        server.add_rule(None, "late", hold=release)
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
        post = urllib.request.Request(server.url + "/chat/completions", body, {"Content-Type": "application/json"})
        replies: list[bytes] = []
        caller = threading.Thread(target=lambda: replies.append(urllib.request.urlopen(post, timeout=30).read()))
        caller.start()
        try:
            server.wait_for_count(1, timeout_s=30)
            server.reset()  # the next test
            server.wait_idle(timeout_s=0.5)  # nothing of its own in progress
        finally:
            release.set()
            caller.join()
        assert b"late" in replies[0]  # the earlier test's request did finish (and was billed then)
        assert server.billed().requests == 0
        server.wait_idle(timeout_s=0.5)


def test_known_model_is_priced_from_the_litellm_cost_map(llm: FakeLLM) -> None:
    prices = litellm.model_cost["gpt-4o-mini"]
    info = ModelRegistry().info("gpt-4o-mini")
    assert info.usd_per_input_token == prices["input_cost_per_token"] > 0
    assert info.usd_per_output_token == prices["output_cost_per_token"] > 0
    assert info.context_window == prices["max_input_tokens"]
    assert info.max_output_tokens == prices["max_output_tokens"]

    # The real price list applied to a real reply; the scripted server stands in for OpenAI.
    llm.add_rule(None, "priced " * 50)
    spec = ModelSpec(name="mini", litellm_model="openai/gpt-4o-mini", api_base=llm.url, api_key_env=FAKE_API_KEY_ENV)
    reply = ask(spec, "price me " * 100)
    expected = reply.prompt_tokens * info.usd_per_input_token + reply.completion_tokens * info.usd_per_output_token
    assert reply.usd == pytest.approx(expected) and reply.usd > 0


def test_unknown_models_get_default_window_and_zero_price() -> None:
    info = ModelRegistry([ModelSpec(name="x", litellm_model="openai/x-local")]).info("x")
    assert (info.context_window, info.max_output_tokens) == (128_000, 4096)
    assert (info.usd_per_input_token, info.usd_per_output_token) == (0.0, 0.0)
    overridden = ModelSpec(name="y", litellm_model="gpt-4o-mini", usd_per_input_token=0.5, context_window=1000)
    info = ModelRegistry([overridden]).info("y")
    assert info.usd_per_input_token == 0.5 and info.context_window == 1000
    assert info.usd_per_output_token == litellm.model_cost["gpt-4o-mini"]["output_cost_per_token"]


def test_a_model_litellm_does_not_price_costs_what_its_spec_says_call_after_call(llm: FakeLLM, client: str) -> None:
    # complete() gives litellm a price of 0 for a model its map lacks (litellm
    # prices every reply for its own logging, slowly when it cannot). That
    # entry must never become our price: not for a spec with overrides, not
    # for another spec of the same litellm model without them (on the direct
    # client the entry is under `rlm_direct/...`: "free" was billed at
    # "priced"'s prices until that name was the one checked).
    llm.add_rule(None, "fine " * 20)
    name = f"openai/unmapped-{time.monotonic_ns()}"
    priced = ModelSpec(
        name="priced", litellm_model=name, api_base=llm.url, api_key_env=FAKE_API_KEY_ENV,
        usd_per_input_token=1e-6, usd_per_output_token=2e-6, client=client,
    )
    free = ModelSpec(name="free", litellm_model=name, api_base=llm.url, api_key_env=FAKE_API_KEY_ENV, client=client)
    for _ in range(2):
        reply = ask(priced, "hello " * 50)
        assert reply.usd == pytest.approx(reply.prompt_tokens * 1e-6 + reply.completion_tokens * 2e-6) and reply.usd > 0
        reply = ask(free, "hello " * 50)
        assert reply.usd == 0.0 and reply.prompt_tokens > 0
    info = ModelRegistry([free]).info("free")
    assert (info.context_window, info.max_output_tokens) == (128_000, 4096)
    assert (info.usd_per_input_token, info.usd_per_output_token) == (0.0, 0.0)


def test_a_worker_enters_its_unmapped_models_in_litellms_map_before_any_call(llm: FakeLLM, client: str) -> None:
    # Done at worker start (worker.py), so litellm's map never changes while
    # another thread reads it; a model litellm prices itself is left alone.
    name = f"openai/unmapped-{time.monotonic_ns()}"
    registry = ModelRegistry([
        ModelSpec(name="u", litellm_model=name, api_base=llm.url, client=client),
        ModelSpec(name="m", litellm_model="gpt-4o-mini", usd_per_input_token=0.5),
    ])
    known = dict(litellm.model_cost["gpt-4o-mini"])
    price_unmapped_models(registry)
    entry = litellm.model_cost[registry.resolve("u").routed_model]  # `rlm_direct/...` on the direct client
    assert (entry["input_cost_per_token"], entry["output_cost_per_token"]) == (0.0, 0.0)
    assert litellm.model_cost["gpt-4o-mini"] == known
    info = registry.info("u")
    assert (info.context_window, info.usd_per_input_token) == (128_000, 0.0)


def test_an_unmapped_model_enters_litellms_map_at_its_specs_prices(llm: FakeLLM, client: str) -> None:
    # litellm then prices its replies as we do (no zero-cost diagnostics per
    # call); specs that share the model at different prices leave it at 0.
    priced, shared = f"openai/priced-{time.monotonic_ns()}", f"openai/shared-{time.monotonic_ns()}"
    registry = ModelRegistry([
        ModelSpec(name="p", litellm_model=priced, api_base=llm.url, usd_per_input_token=1e-6, usd_per_output_token=3e-6,
                  client=client),
        ModelSpec(name="s1", litellm_model=shared, api_base=llm.url, usd_per_input_token=1e-6, client=client),
        ModelSpec(name="s2", litellm_model=shared, api_base=llm.url, usd_per_input_token=2e-6, client=client),
    ])  # fmt: skip
    price_unmapped_models(registry)
    entry = litellm.model_cost[registry.resolve("p").routed_model]
    assert (entry["input_cost_per_token"], entry["output_cost_per_token"]) == (1e-6, 3e-6)
    entry = litellm.model_cost[registry.resolve("s1").routed_model]
    assert (entry["input_cost_per_token"], entry["output_cost_per_token"]) == (0.0, 0.0)
    # Each spec is still billed at its own prices.
    assert (registry.info("s1").usd_per_input_token, registry.info("s2").usd_per_input_token) == (1e-6, 2e-6)


def test_a_direct_client_model_litellm_knows_keeps_its_price_under_the_routed_name() -> None:
    # litellm prices a direct reply under `rlm_direct/<model>`; a model it
    # knows as `openai/<model>` is entered there at the known prices.
    spec = ModelSpec(name="mini-direct", litellm_model="openai/gpt-4o-mini", api_base="http://127.0.0.1:9/v1",
                     client="direct")  # fmt: skip
    price_unmapped_models(ModelRegistry([spec]))
    known = litellm.get_model_info("gpt-4o-mini")
    entry = litellm.model_cost[spec.routed_model]
    assert known["input_cost_per_token"] > 0
    assert entry["input_cost_per_token"] == known["input_cost_per_token"]
    assert entry["output_cost_per_token"] == known["output_cost_per_token"]


def test_registry_reads_file_then_inline_json(tmp_path, llm: FakeLLM) -> None:
    models_file = tmp_path / "models.json"
    old = [{"name": "fake-root", "litellm_model": "openai/old"}, {"name": "a", "litellm_model": "b/c"}]
    models_file.write_text(json.dumps({"models": old}))
    registry = ModelRegistry.from_env({"RLM_MODELS_FILE": str(models_file), "RLM_MODELS_JSON": models_json(llm.url)})
    assert registry.names == ["a", "fake-root", "fake-sub", "local"]
    assert registry.resolve("fake-root").litellm_model == "openai/fake-root"  # inline wins
    assert registry.info("fake-sub").usd_per_output_token == FAKE_USD_PER_OUTPUT_TOKEN
    # The embedded local model is always known, on its configured port.
    assert ModelRegistry.from_env({}).names == ["local"]
    local = ModelRegistry.from_env({"RLM_LOCAL_MODEL_PORT": "9123"}).resolve("local")
    assert local.api_base == "http://127.0.0.1:9123/v1" and local.temperature == 0.0


@pytest.mark.parametrize(
    ("inline", "expected"),
    [
        ("{not json", "not valid JSON"),
        ('{"models": {"name": "x"}}', "expected"),
        ('{"models": [{"name": "x"}]}', "model #0: litellm_model: Field required"),
        ('{"models": [{"name": "x", "litellm_model": "y", "api_key": "sk-1"}]}', "api_key_env"),
        ('{"models": [{"name": "x", "litellm_model": "y", "api_key_env": "sk-123"}]}', "variable NAME"),
        ('{"models": [{"name": "x", "litellm_model": "openai/y", "client": "direct"}]}', "needs 'api_base'"),
        ('{"models": [{"name": "x", "litellm_model": "anthropic/y", "api_base": "http://h/v1", "client": "direct"}]}',
         "an 'openai/...' litellm_model"),
        ('{"models": [{"name": "x", "litellm_model": "openai/y", "client": "httpx"}]}', "client"),
    ],
)
def test_bad_model_configuration_names_the_problem(inline: str, expected: str) -> None:
    with pytest.raises(ModelConfigError, match="RLM_MODELS_JSON") as caught:
        ModelRegistry.from_env({"RLM_MODELS_JSON": inline})
    assert expected in str(caught.value)


def test_models_file_that_cannot_be_read_is_named(tmp_path) -> None:
    with pytest.raises(ModelConfigError, match="RLM_MODELS_FILE=.*missing.json"):
        ModelRegistry.from_env({"RLM_MODELS_FILE": str(tmp_path / "missing.json")})


def test_other_failures_are_retryable_and_application_errors_pass_through() -> None:
    error = to_application_error(RuntimeError("socket exploded\nsecond line"))
    assert error.type == "ModelCallFailed" and not error.non_retryable and "\n" not in error.message
    original = ApplicationError("already mapped", type="X", non_retryable=True)
    assert to_application_error(original) is original


def test_fake_server_scripting_rules(llm: FakeLLM, root: ModelSpec) -> None:
    llm.add_rule(None, "fallback", name="any")
    llm.add_rule(lambda r: r.model == "fake-root" and "twice" in r.last_user_text, "first two", times=2, name="t")
    llm.add_rule(re.compile(r"SECRET-\d+"), lambda r: {"choices": [], "object": "chat.completion"}, name="raw")

    assert [ask(root, "say it twice").text for _ in range(3)] == ["first two", "first two", "fallback"]
    assert (llm.count("t"), llm.count("any"), llm.count()) == (2, 1, 3)
    error = failure(root, "the SECRET-42 code")  # a full-body override with no choices
    assert error.type == "MalformedReply" and not error.non_retryable
    assert llm.requests()[-1].matched_rule.name == "raw"
    assert [r.model for r in llm.requests(model="fake-root")] == ["fake-root"] * 4
    with urllib.request.urlopen(llm.url + "/models", timeout=5) as listing:
        assert [m["id"] for m in json.load(listing)["data"]] == ["fake-root", "fake-sub"]


def test_a_huge_provider_message_is_classified_in_linear_time() -> None:
    # 1 MB of word characters made the class-name prefix regex backtrack
    # quadratically (minutes of CPU per failed call); now it is cut first.
    error = to_application_error(RuntimeError("E" * 1_000_000 + "Error: boom"))
    assert error.type == "ModelCallFailed" and len(error.message) <= 700


def test_the_direct_client_sends_without_acompletion_while_no_callback_listens(llm: FakeLLM, monkeypatch) -> None:
    """litellm's per-call machinery (~2.5 ms of CPU a call on the one model
    loop) is skipped for `"client": "direct"`; the reply and a mapped failure
    are litellm's types all the same (the parametrized tests above)."""
    from activities import llm as llm_module

    def refuse(**kwargs):
        raise AssertionError("acompletion called for a direct model")

    monkeypatch.setattr(llm_module, "litellm", SimpleNamespace(acompletion=refuse, model_cost=litellm.model_cost,
                                                               completion_cost=litellm.completion_cost))
    llm.add_rule("lean", "sent lean")
    for spec in (fake_registry(llm, client="direct").resolve("fake-root"),
                 fake_registry(llm).resolve("fake-root")):  # "auto": the scripted server is on loopback
        reply = ask(spec, "lean please")
        assert reply.text == "sent lean" and reply.prompt_tokens > 0
    with pytest.raises(Exception, match="acompletion called"):  # the litellm client does call it
        ask(fake_registry(llm, client="litellm").resolve("fake-root"), "lean please")


@pytest.mark.parametrize(
    ("litellm_model", "api_base", "client", "direct"),
    [
        ("openai/qwen", "http://127.0.0.1:8080/v1", "auto", True),
        ("openai/qwen", "http://localhost:8080/v1", "auto", True),
        ("openai/qwen", "http://[::1]:8080/v1", "auto", True),
        ("openai/qwen", "http://127.0.0.1:8080/v1", "litellm", False),  # asked for by name
        ("openai/qwen", "https://vllm.internal:8000/v1", "auto", False),  # another host: litellm's client
        ("openai/qwen", "http://127.0.0.1.evil.example/v1", "auto", False),  # names that only look local
        ("openai/qwen", "http://localhost.evil.example/v1", "auto", False),
        ("openai/qwen", "https://vllm.internal:8000/v1", "direct", True),
        ("openai/gpt-4o-mini", None, "auto", False),  # the provider's own API
        ("anthropic/claude-sonnet-4-5", "http://127.0.0.1:8080", "auto", False),  # not OpenAI's API
        ("gpt-4o-mini", None, "auto", False),
    ],
)
def test_auto_sends_a_server_on_this_machine_direct_and_every_other_model_through_litellm(
    litellm_model: str, api_base: str | None, client: str, direct: bool
) -> None:
    spec = ModelSpec(name="m", litellm_model=litellm_model, api_base=api_base, client=client)
    assert spec.sends_direct is direct
    assert spec.routed_model.startswith("rlm_direct/") is direct
    assert ModelSpec.model_validate_json(spec.model_dump_json()).sends_direct is direct  # as a worker reads it


def test_a_callback_an_operator_registers_still_sees_every_call(llm: FakeLLM, root: ModelSpec) -> None:
    # Calls skip litellm's logging pipeline only while nothing listens to it.
    from litellm.integrations.custom_logger import CustomLogger

    from activities._litellm_setup import _CALLBACK_LISTS, _internal_call_flag, unlogged_call

    seen: list[str] = []

    costs: list[float] = []

    class Listener(CustomLogger):
        async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):
            seen.append(response_obj.choices[0].message.content)
            costs.append(kwargs.get("response_cost"))

    flag = _internal_call_flag()
    assert flag is not None, "litellm's internal-call flag moved: calls pay for logging again"
    with unlogged_call():
        assert flag.get() is True
    llm.add_rule("logged", "heard")
    # Prices litellm knows for this model (whatever an earlier test entered).
    provider = root.routed_model.split("/")[0]
    previous = litellm.model_cost.get(root.routed_model)
    litellm.register_model({root.routed_model: {
        "input_cost_per_token": 1e-6, "output_cost_per_token": 3e-6, "litellm_provider": provider, "mode": "chat",
    }})  # fmt: skip
    listener = Listener()
    litellm.callbacks.append(listener)
    try:
        with unlogged_call():
            assert flag.get() is False
        reply = ask(root, "logged please")
        assert reply.text == "heard"
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)  # litellm delivers success events from a task of its own
    finally:
        # litellm copies a callback into its per-event lists on the first call.
        for name in _CALLBACK_LISTS:
            while listener in (getattr(litellm, name, None) or []):
                getattr(litellm, name).remove(listener)
        if previous is None:
            litellm.model_cost.pop(root.routed_model, None)
        else:
            litellm.model_cost[root.routed_model] = previous
    # Heard once, and (turn_off_message_logging) without the reply's text.
    assert len(seen) == 1 and "heard" not in seen[0]
    # Priced as litellm prices it, whichever client sent it (the direct one
    # stamps the price itself, from the same map entry).
    assert costs == [pytest.approx(reply.prompt_tokens * 1e-6 + reply.completion_tokens * 3e-6)]
