"""The model-call loop's executor: litellm's request preparation runs on the
loop's thread for calls marked `inline_setup()`, on a pool thread otherwise."""

from __future__ import annotations

import asyncio
import threading

import pytest

from activities._model_loop import inline_setup, on_model_loop


async def _prepare(inline: bool, fail: bool = False) -> tuple[str, str]:
    def work() -> str:
        if fail:
            raise ValueError("bad request")
        return threading.current_thread().name

    loop_thread = threading.current_thread().name
    if inline:
        with inline_setup():
            return loop_thread, await asyncio.get_running_loop().run_in_executor(None, work)
    return loop_thread, await asyncio.get_running_loop().run_in_executor(None, work)


def test_marked_work_runs_on_the_loop_thread_and_the_rest_on_the_pool() -> None:
    loop_thread, ran_on = asyncio.run(on_model_loop(_prepare(inline=True)))
    assert loop_thread == "rlm-model-calls" and ran_on == loop_thread
    loop_thread, ran_on = asyncio.run(on_model_loop(_prepare(inline=False)))
    assert ran_on.startswith("rlm-model-setup") and ran_on != loop_thread


@pytest.mark.parametrize("inline", [True, False])
def test_a_failure_while_preparing_reaches_the_caller(inline: bool) -> None:
    with pytest.raises(ValueError, match="bad request"):
        asyncio.run(on_model_loop(_prepare(inline=inline, fail=True)))


def test_only_the_first_job_of_a_marked_call_runs_inline() -> None:
    # litellm prepares the request first; later jobs (aiohttp's DNS lookup)
    # may block, and must not stall every other call on the loop.
    async def two_jobs() -> tuple[str, str, str]:
        loop = asyncio.get_running_loop()
        with inline_setup():
            first = await loop.run_in_executor(None, lambda: threading.current_thread().name)
            second = await loop.run_in_executor(None, lambda: threading.current_thread().name)
        return threading.current_thread().name, first, second

    loop_thread, first, second = asyncio.run(on_model_loop(two_jobs()))
    assert first == loop_thread and second.startswith("rlm-model-setup")


def test_the_mark_does_not_leak_to_other_calls() -> None:
    async def both() -> list[tuple[str, str]]:
        return list(await asyncio.gather(_prepare(inline=True), _prepare(inline=False)))

    (_, first), (loop_thread, second) = asyncio.run(on_model_loop(both()))
    assert first == loop_thread and second != loop_thread
