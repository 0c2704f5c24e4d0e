"""Snapshots in whole runs (real worker, Temporal, S3, WASM REPL): values
derived from the context are not stored, an unchanged REPL uploads nothing,
and a cold cell restores everything from storage."""

from __future__ import annotations

import asyncio
import random

from activities.object_store import ObjectStore
from activities.runtime import run_key
from tests.fixtures_llm import fake_registry
from tests.run_harness import ROOT, isolated, repl, request, start, worker_and_pool


def prose(chars: int) -> str:
    rng = random.Random(11)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(4000)]
    parts, size = [], 0
    while size < chars:
        line = " ".join(rng.choice(words) for _ in range(12)) + rng.choice([".\n", ", ", "; "])
        parts.append(line)
        size += len(line)
    return "".join(parts)


def test_snapshots_store_what_changed_and_restore_cold(settings, context_store, llm, object_store: ObjectStore):
    ctx = context_store.put_value(prose(2_000_000))
    pools = []
    llm.add_rule(
        "Turn 1 of",
        repl(
            """
chunks = [context[i:i + 100_000] for i in range(0, len(context), 100_000)]
prompts = ["Summarize:\\n" + c + "\\nBe brief." for c in chunks]
made = "".join(reversed(chunks[0]))
print(len(chunks))
"""
        ),
        model=ROOT,
        name="turn1",
    )
    llm.add_rule("Turn 2 of", repl("print(len(prompts), len(made))"), model=ROOT, name="turn2")

    def turn3(_request):
        pools[0].close()  # the next cell is cold: a new instance restores from storage
        return repl(
            "ok = (''.join(chunks) == context, prompts[3] == 'Summarize:\\n' + chunks[3] + '\\nBe brief.',"
            " made == ''.join(reversed(chunks[0])))\nFINAL(str(ok))"
        )

    llm.add_rule("Turn 3 of", turn3, model=ROOT, name="turn3")
    s = isolated(settings)

    async def go():
        async with worker_and_pool(s, fake_registry(llm, context_window=1_000_000)) as (client, pool):
            pools.append(pool)
            handle = await start(client, s, request("Check the chunks.", ctx))
            return handle.id, await asyncio.wait_for(handle.result(), 120)

    workflow_id, result = asyncio.run(go())
    assert result.status == "completed", result.reason
    assert result.answer == "(True, True, True)"
    # Cell 1: a manifest and one pack (only `made`, 100 KB; chunks and prompts
    # are references). Cell 2 changed nothing: no upload. Cell 3 added `ok`.
    prefix = run_key(workflow_id, "snapshots")
    assert object_store.count(prefix) == 3
    stored = sum(o.size for o in object_store.client.list_objects(object_store.bucket, prefix, recursive=True))
    assert stored < 300_000  # the 2 MB of chunks and 2 MB of prompts are not in it


def test_a_trap_restores_large_values_from_storage_not_a_host_copy(settings, context_store, llm):
    # Idle REPLs held a copy of their large values on the worker, outside the
    # guest memory budget; they are read back from storage when a cell traps.
    ctx = context_store.put_value(prose(300_000))
    pools, held = [], []
    llm.add_rule(
        "Turn 1 of",
        repl("made = ''.join(reversed(context[:200_000]))\nnote = 'n' * 50_000\nprint(len(made))"),
        model=ROOT,
        name="turn1",
    )

    def turn2(_request):
        held.append(pools[0].idle_record_bytes)
        return repl("import os\nos._exit(3)")

    llm.add_rule("Turn 2 of", turn2, model=ROOT, name="turn2")
    llm.add_rule(
        "Turn 3 of",
        repl("FINAL(str((made == ''.join(reversed(context[:200_000])), len(note))))"),
        model=ROOT,
        name="turn3",
    )
    s = isolated(settings)

    async def go():
        async with worker_and_pool(s, fake_registry(llm, context_window=1_000_000)) as (client, pool):
            pools.append(pool)
            handle = await start(client, s, request("Keep the values.", ctx))
            return await asyncio.wait_for(handle.result(), 120)

    result = asyncio.run(go())
    assert result.status == "completed", result.reason
    assert held == [0]  # the idle session after turn 1 held no copy
    assert result.answer == "(True, 50000)"
    turn3 = next(r for r in llm.requests() if r.matched_rule is not None and r.matched_rule.name == "turn3")
    assert "restored from the last snapshot" in turn3.all_text


def test_lines_filtered_and_joined_are_not_stored_and_restore_cold(settings, context_store, llm,
                                                                    object_store: ObjectStore):
    """The usual way through a text: split it into lines, keep some, join
    them into prompts. None of it is stored again; a cold cell has it all."""
    ctx = context_store.put_value(prose(2_000_000))
    pools = []
    llm.add_rule(
        "Turn 1 of",
        repl(
            """
lines = context.split("\\n")
hits = [line for line in lines if " a" in line]
prompts = ["Which of these matter?\\n" + "\\n".join(hits[i:i + 40]) + "\\nAnswer briefly." for i in range(0, len(hits), 40)]
print(len(lines), len(hits), len(prompts))
"""
        ),
        model=ROOT,
        name="turn1",
    )

    def turn2(_request):
        pools[0].close()  # the next cell is cold: a new instance restores from storage
        return repl(  # made again inside a function: nothing new and large left to store
            "def check():\n"
            "    again = [l for l in context.split('\\n') if ' a' in l]\n"
            "    return (lines == context.split('\\n'), hits == again, len(hits) > 1_000,\n"
            "            prompts[5] == 'Which of these matter?\\n' + '\\n'.join(again[200:240]) + '\\nAnswer briefly.')\n"
            "FINAL(str(check()))"
        )

    llm.add_rule("Turn 2 of", turn2, model=ROOT, name="turn2")
    s = isolated(settings)

    async def go():
        async with worker_and_pool(s, fake_registry(llm, context_window=1_000_000)) as (client, pool):
            pools.append(pool)
            handle = await start(client, s, request("Find what matters.", ctx))
            return handle.id, await asyncio.wait_for(handle.result(), 120)

    workflow_id, result = asyncio.run(go())
    assert result.status == "completed", result.reason
    assert result.answer == "(True, True, True, True)"
    prefix = run_key(workflow_id, "snapshots")
    stored = sum(o.size for o in object_store.client.list_objects(object_store.bucket, prefix, recursive=True))
    # The kept lines' indices (~20 KB) and references: not the 2 MB of
    # lines, the ~1 MB kept, nor the ~1.7 MB of prompts.
    assert stored < 100_000, stored
