"""A scripted OpenAI-compatible chat server for tests.

Tests drive the real litellm client (and through it the whole engine) against
this server: replies are chosen by rules on the request, every request is
logged, and each rule counts its hits, so a test can assert how many model
calls were made (for example that a crash repeated none).

The server is aiohttp on its own event loop in a daemon thread, bound to
127.0.0.1 on a free port. Delays are `asyncio.sleep`, so hundreds of slow
requests in parallel cost no threads.

    with FakeLLM() as fake:
        fake.add_rule("count the words", "```repl\\nprint(len(context.split()))\\n```")
        fake.add_rule(re.compile(r"secret"), "FINAL(42)", name="final")
        ...                       # point litellm at fake.url ("openai/<any-name>")
        assert fake.count("final") == 1

It bills like a provider: every request it does work for (a reply, a 5xx, a
reply that is late or whose connection it drops) adds its usage to
`billed()`, whether or not the client is still there to read it; a request
it refuses (401, 429, any 4xx) bills nothing. Tokens are counted as about
one per 4 ASCII characters and one per other character (CJK text is about a
token a character), so the count is realistic for any script.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

__all__ = ["Billed", "FakeLLM", "FakeRequest", "Rule", "message_text"]

Match = Callable[["FakeRequest"], bool] | str | re.Pattern[str] | None
Reply = str | dict | None | Callable[["FakeRequest"], "str | dict | None"]

_ERROR_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "permission_denied"),
    404: ("invalid_request_error", "model_not_found"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
}


def message_text(message: dict) -> str:
    """The text of one chat message (string content or a list of text parts)."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)


def _rough_tokens(text: str) -> int:
    """About one token per 4 ASCII characters, one per other character."""
    # Counted in C: a loop over the characters took ~10 ms for a 200K-character
    # prompt, which made this server the bottleneck of wide fan-outs.
    ascii_chars = len(text) if text.isascii() else len(text.encode("ascii", "ignore"))
    return ascii_chars // 4 + (len(text) - ascii_chars)


def _cut_to_tokens(text: str, max_tokens: int) -> str:
    """The longest prefix of `text` with at most `max_tokens` (`_rough_tokens`)."""
    low, high = 0, len(text)
    while low < high:
        mid = (low + high + 1) // 2
        if _rough_tokens(text[:mid]) <= max_tokens:
            low = mid
        else:
            high = mid - 1
    return text[:low]


@dataclass
class Billed:
    """What the server billed: requests it did work for and their tokens."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class FakeRequest:
    """One chat-completion request as the server received it."""

    model: str
    """The `model` field of the body (litellm strips the `openai/` prefix)."""
    messages: list[dict]
    body: dict
    """The whole JSON body (max_tokens, stop, ...)."""
    headers: dict[str, str]
    matched_rule: Rule | None = None
    """The rule that answered, or None when no rule matched (the 500 case)."""
    received_at: float = field(default_factory=time.monotonic)
    """When the server received it (`time.monotonic()`): gaps between retries."""
    generation: int = 0
    """The `reset()` it came after: its work and bill belong to that test."""

    @property
    def last_text(self) -> str:
        """Text of the last message, whatever its role."""
        return message_text(self.messages[-1]) if self.messages else ""

    @property
    def last_user_text(self) -> str:
        """Text of the last message with role `user` ('' if there is none)."""
        for message in reversed(self.messages):
            if message.get("role") == "user":
                return message_text(message)
        return ""

    @property
    def all_text(self) -> str:
        """Text of every message, joined by newlines."""
        return "\n".join(message_text(m) for m in self.messages)


@dataclass(eq=False)
class Rule:
    """A scripted answer: when `match` fits a request, reply with `reply`."""

    match: Match
    reply: Reply
    delay_s: float = 0.0
    status: int = 200
    headers: dict[str, str] | None = None
    usage: bool = True
    name: str | None = None
    model: str | None = None
    """Only requests for this model name (the body's `model`) match."""
    times: int | None = None
    """Answer at most this many requests, then stop matching (None: forever)."""
    hold: threading.Event | None = None
    """When given, requests wait (without blocking the server) until it is set."""
    drop: bool = False
    """Do the work (and bill it), then close the connection without answering."""
    hits: int = field(default=0, init=False)

    def matches(self, request: FakeRequest) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        if self.model is not None and request.model != self.model:
            return False
        if self.match is None:
            return True
        if isinstance(self.match, str):
            return self.match in request.last_text
        if isinstance(self.match, re.Pattern):
            return self.match.search(request.all_text) is not None
        return bool(self.match(request))

    def __repr__(self) -> str:
        return f"Rule(name={self.name!r}, status={self.status}, hits={self.hits})"


class FakeLLM:
    """Scripted OpenAI-compatible server; see the module docstring."""

    def __init__(self, *, api_key: str | None = None, models: list[str] | None = None) -> None:
        """`api_key`: when set, requests without `Authorization: Bearer <api_key>`
        get a 401 like a real provider. `models`: ids listed by GET /v1/models."""
        self.api_key = api_key
        self.models = list(models or ["fake-root", "fake-sub"])
        self.url = ""
        self.port = 0
        self._rules: list[Rule] = []
        self._log: list[FakeRequest] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._ids = itertools.count(1)
        self._billed = Billed()
        self._working = 0  # requests matched and not yet answered (or dropped)
        # Since the last reset(): a test's late replies (a 60 s delay its run
        # stopped waiting for) must not hold up or bill into the next test.
        self._generation = 0
        self._working_now = 0
        self._peak_working = 0
        self._abandoned = 0  # held requests whose client closed the connection
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    # -- scripting ---------------------------------------------------------

    def add_rule(
        self,
        match: Match,
        reply: Reply,
        *,
        delay_s: float = 0.0,
        status: int = 200,
        headers: dict[str, str] | None = None,
        usage: bool = True,
        name: str | None = None,
        model: str | None = None,
        times: int | None = None,
        hold: threading.Event | None = None,
        drop: bool = False,
    ) -> Rule:
        """Add a rule; the newest matching rule answers.

        `match`: callable(FakeRequest) -> bool; a substring of the LAST
        message's text; a compiled regex searched in all message text; or None
        (every request). `reply`: content text; None (content null); a dict
        (the whole response body, or the error body when status != 200); or a
        callable(FakeRequest) returning one of those. `status` != 200 answers
        with an OpenAI-style error whose message is the reply text. `drop`:
        bill the request, then close the connection without a response.
        """
        rule = Rule(match, reply, delay_s, status, dict(headers or {}), usage, name, model, times, hold, drop)
        with self._lock:
            self._rules.append(rule)
        return rule

    def requests(self, model: str | None = None) -> list[FakeRequest]:
        """Requests received so far (oldest first), optionally for one model."""
        with self._lock:
            return [r for r in self._log if model is None or r.model == model]

    def count(self, rule_or_name: Rule | str | None = None) -> int:
        """Requests answered by a rule (or by all rules with that name); all requests for None."""
        with self._lock:
            return self._count_locked(rule_or_name)

    def wait_for_count(self, n: int, rule_or_name: Rule | str | None = None, timeout_s: float = 30.0) -> int:
        """Block until `count(rule_or_name) >= n`; raises TimeoutError naming the shortfall."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._count_locked(rule_or_name) >= n, timeout_s):
                raise TimeoutError(
                    f"fake LLM: waited {timeout_s}s for {n} requests on {rule_or_name!r}, "
                    f"got {self._count_locked(rule_or_name)}"
                )
            return self._count_locked(rule_or_name)

    def billed(self) -> Billed:
        """What the server billed so far (see the module docstring)."""
        with self._lock:
            return Billed(self._billed.requests, self._billed.prompt_tokens, self._billed.completion_tokens)

    def abandoned(self) -> int:
        """Held requests whose client closed the connection (not billed)."""
        with self._lock:
            return self._abandoned

    def wait_abandoned(self, count: int, timeout_s: float = 30.0) -> None:
        """Block until `count` held requests were abandoned by their client."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._abandoned >= count, timeout_s):
                raise TimeoutError(f"fake LLM: {self._abandoned} of {count} held request(s) abandoned after {timeout_s}s")

    def wait_idle(self, timeout_s: float = 30.0) -> None:
        """Block until no request received since the last `reset()` is being
        worked on (late replies included), so `billed()` is final for them."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._working_now == 0, timeout_s):
                raise TimeoutError(f"fake LLM: {self._working_now} request(s) still in progress after {timeout_s}s")

    @property
    def peak_in_flight(self) -> int:
        """Most requests matched and not yet answered at once since the last reset."""
        with self._lock:
            return self._peak_working

    def take_peak_in_flight(self) -> int:
        """`peak_in_flight`, then start counting the peak afresh (rules and log kept)."""
        with self._lock:
            peak, self._peak_working = self._peak_working, self._working
            return peak

    def reset(self) -> None:
        """Forget all rules, the request log and the bill; requests still in
        progress finish, billed to no one that asks."""
        with self._lock:
            self._generation += 1
            self._working_now = 0
            self._rules.clear()
            self._log.clear()
            self._billed = Billed()
            self._abandoned = 0
            self._peak_working = self._working

    def _count_locked(self, rule_or_name: Rule | str | None) -> int:
        if rule_or_name is None:
            return len(self._log)
        if isinstance(rule_or_name, Rule):
            return rule_or_name.hits
        return sum(r.hits for r in self._rules if r.name == rule_or_name)

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> FakeLLM:
        if self._thread is not None:
            return self
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._serve())
            except BaseException as exc:  # noqa: BLE001 - reported to start()
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, name="fake-llm", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure or not self.port:
            raise RuntimeError(f"fake LLM server did not start: {failure[0] if failure else 'timeout'}")
        return self

    def stop(self) -> None:
        if self._thread is None or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._thread = None
        self._loop = None

    def __enter__(self) -> FakeLLM:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def _serve(self) -> None:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        for prefix in ("/v1", ""):
            app.router.add_post(prefix + "/chat/completions", self._chat)
            app.router.add_get(prefix + "/models", self._models)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        # A deep backlog: hundreds of clients connect at once in fan-out tests.
        site = web.TCPSite(self._runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{self.port}/v1"

    # -- HTTP handlers -----------------------------------------------------

    async def _models(self, _request: web.Request) -> web.Response:
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in self.models]
        return web.json_response({"object": "list", "data": data})

    async def _chat(self, http_request: web.Request) -> web.Response:
        try:
            body = await http_request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "request body is not JSON")
        request = FakeRequest(
            model=str(body.get("model", "")),
            messages=list(body.get("messages") or []),
            body=body,
            headers=dict(http_request.headers),
        )
        if body.get("stream"):
            self._record(request, None)
            return _error(400, "fake LLM: streaming is not supported; send stream=false")
        if self.api_key is not None and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            self._record(request, None)
            return _error(401, "Incorrect API key provided.")
        with self._lock:
            rule = next((r for r in reversed(self._rules) if r.matches(request)), None)
            request.generation = self._generation
            if rule is not None:
                rule.hits += 1
                self._working += 1
                self._working_now += 1
                self._peak_working = max(self._peak_working, self._working)
            request.matched_rule = rule
            self._log.append(request)
            self._changed.notify_all()
        if rule is None:
            return _error(500, f"fake LLM: no rule matches the prompt ending {request.last_text[-300:]!r}")
        try:
            return await self._answer(rule, request, http_request)
        finally:
            with self._lock:
                self._working -= 1
                if request.generation == self._generation:
                    self._working_now -= 1
                self._changed.notify_all()

    def _record(self, request: FakeRequest, rule: Rule | None) -> None:
        with self._lock:
            request.matched_rule = rule
            self._log.append(request)
            self._changed.notify_all()

    def _bill(self, request: FakeRequest, prompt_tokens: int, completion_tokens: int) -> None:
        with self._lock:
            if request.generation != self._generation:
                return  # an earlier test's late reply
            self._billed.requests += 1
            self._billed.prompt_tokens += prompt_tokens
            self._billed.completion_tokens += completion_tokens

    async def _answer(self, rule: Rule, request: FakeRequest, http_request: web.Request) -> web.Response:
        if rule.delay_s > 0:
            await asyncio.sleep(rule.delay_s)
        while rule.hold is not None and not rule.hold.is_set():
            if http_request.transport is None or http_request.transport.is_closing():
                # The client gave up (a cancelled call): a provider stops here.
                with self._lock:
                    self._abandoned += request.generation == self._generation
                    self._changed.notify_all()
                return web.Response(status=499)
            # Polling keeps the server's loop free; 5 ms is far below model latency.
            await asyncio.sleep(0.005)
        try:
            reply = rule.reply(request) if callable(rule.reply) else rule.reply
        except Exception as exc:  # noqa: BLE001 - a broken test callback must be visible
            return _error(500, f"fake LLM: reply callback of {rule!r} raised {exc!r}")
        if rule.status != 200:
            if rule.status >= 500:
                self._bill(request, _prompt_tokens(request), 0)  # it read the prompt, then failed
            if isinstance(reply, dict):
                return web.json_response(reply, status=rule.status, headers=rule.headers)
            return _error(rule.status, reply or f"scripted error {rule.status}", rule.headers)
        if isinstance(reply, dict):
            usage = reply.get("usage") or {}
            # A scripted reply may carry usage no provider should send (null, negative, partial).
            counts = [usage.get(name) for name in ("prompt_tokens", "completion_tokens")]
            self._bill(request, *(int(c) if isinstance(c, int) and c > 0 else 0 for c in counts))
            response = web.json_response(reply, headers=rule.headers)
        else:
            body = self._completion(request, reply)
            self._bill(request, body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"])
            if not rule.usage:
                del body["usage"]
            response = web.json_response(body, headers=rule.headers)
        if rule.drop:
            # The work is done and billed; the client never gets the answer.
            if http_request.transport is not None:
                http_request.transport.close()
        return response

    def _completion(self, request: FakeRequest, text: str | None) -> dict:
        finish_reason = "stop"
        if text is not None:
            # Behave like a real server: cut at a stop sequence, honour max_tokens.
            stops = request.body.get("stop") or []
            for stop in [stops] if isinstance(stops, str) else stops:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            max_tokens = request.body.get("max_tokens") or request.body.get("max_completion_tokens")
            if isinstance(max_tokens, int) and _rough_tokens(text) > max_tokens:
                text, finish_reason = _cut_to_tokens(text, max_tokens), "length"
        prompt_tokens = _prompt_tokens(request)
        # As a real tokenizer: any text is at least one token.
        completion_tokens = max(1, _rough_tokens(text)) if text else 0
        body: dict[str, Any] = {
            "id": f"chatcmpl-fake-{next(self._ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": finish_reason,
                }
            ],
        }
        body["usage"] = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        return body


def _prompt_tokens(request: FakeRequest) -> int:
    return max(1, _rough_tokens(request.all_text)) + 3 * len(request.messages)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    kind, code = _ERROR_TYPES.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.json_response(body, status=status, headers=headers)
