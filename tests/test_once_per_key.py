"""OncePerKey: what keeps a re-run cell from calling a model or tool twice."""

from __future__ import annotations

import asyncio

import pytest

from workflows.once_per_key import OncePerKey


def test_asks_while_running_share_one_step_and_later_asks_are_remembered() -> None:
    async def scenario() -> None:
        once: OncePerKey[str] = OncePerKey()
        started: list[str] = []
        gate = asyncio.Event()

        async def step(key: str) -> str:
            started.append(key)
            await gate.wait()
            return f"answer {key}"

        first = once.ask("a", lambda: step("a"))
        second = once.ask("a", lambda: step("a"))
        other = once.ask("b", lambda: step("b"))
        gate.set()
        assert await asyncio.gather(first, second, other) == ["answer a", "answer a", "answer b"]
        assert await once.ask("a", lambda: step("a")) == "answer a"
        assert started == ["a", "b"]

    asyncio.run(scenario())


def test_a_failed_or_cancelled_step_is_started_again() -> None:
    async def scenario() -> None:
        once: OncePerKey[str] = OncePerKey()
        attempts: list[int] = []

        async def flaky() -> str:
            attempts.append(1)
            if len(attempts) == 1:
                raise RuntimeError("worker lost")
            return "ok"

        with pytest.raises(RuntimeError, match="worker lost"):
            await once.ask("k", flaky)
        assert await once.ask("k", flaky) == "ok"
        assert len(attempts) == 2

        blocked = asyncio.Event()
        hung = once.ask("slow", blocked.wait)
        once.cancel_running()
        with pytest.raises(asyncio.CancelledError):
            await hung
        blocked.set()
        assert await once.ask("slow", blocked.wait) is True

    asyncio.run(scenario())
