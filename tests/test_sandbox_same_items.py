"""A stored list is unchanged only while it holds the very objects it held:
past HOST_MIN items the host compares the guest's two pointer arrays
(sandbox_wasm/_same_items.py, guest/rlm_same_items.py). The layout logic on
a buffer standing for guest memory; the rest on real wasmtime: the host's
answers against the item-by-item walk over random changes, forged messages,
and snapshots that restore exactly what changed."""

from __future__ import annotations

import ctypes
import random
import struct

import pytest

from sandbox_wasm import ReplSession, SandboxLimits
from sandbox_wasm._same_items import same_items
from sandbox_wasm.guest.rlm_same_items import HOST_MIN
from tests.test_sandbox_context_spans import packed_spans
from tests.test_sandbox_snapshot_splits import prose

LIMITS = SandboxLimits(cell_timeout_s=60.0, memory_bytes=1024**3)
LIST_TYPE, TUPLE_TYPE = 0x1000, 0x2000


class FakeMemory:
    """A buffer standing for guest memory: a list at 64 (items at 1024), a tuple at 4096."""

    def __init__(self, list_items: list[int], tuple_items: list[int], list_type=LIST_TYPE, tuple_type=TUPLE_TYPE):
        self.buffer = ctypes.create_string_buffer(8192)
        struct.pack_into("<IIiI", self.buffer, 64, 1, list_type, len(list_items), 1024)
        struct.pack_into(f"<{len(list_items)}I", self.buffer, 1024, *list_items)
        struct.pack_into(f"<IIi{len(tuple_items)}I", self.buffer, 4096, 1, tuple_type, len(tuple_items), *tuple_items)

    def address(self, ptr: int, length: int) -> int:
        if ptr < 0 or length < 0 or ptr + length > len(self.buffer):
            raise IndexError("out of bounds")
        return ctypes.addressof(self.buffer) + ptr

    def same(self) -> bool:
        return same_items(self.address, 64, 4096, LIST_TYPE, TUPLE_TYPE)


@pytest.mark.parametrize("list_items, tuple_items, expected", [
    ([7, 8, 9], [7, 8, 9], True),
    ([7, 8, 9], [7, 9, 8], False),
    ([7, 8, 9], [7, 8], False),
    ([7, 8], [7, 8, 9], False),
    ([], [], True),
    (list(range(100, 400)), list(range(100, 400)), True),
    (list(range(100, 400)), list(range(100, 399)) + [0], False),  # the last pointer differs
])
def test_the_pointer_arrays_are_compared(list_items, tuple_items, expected):
    assert FakeMemory(list_items, tuple_items).same() is expected


def test_objects_of_other_types_or_sizes_are_not_the_same():
    assert not same_items(FakeMemory([1], [1], list_type=TUPLE_TYPE).address, 64, 4096, LIST_TYPE, TUPLE_TYPE)
    assert not same_items(FakeMemory([1], [1], tuple_type=LIST_TYPE).address, 64, 4096, LIST_TYPE, TUPLE_TYPE)
    negative = FakeMemory([], [])
    struct.pack_into("<i", negative.buffer, 64 + 8, -1)
    struct.pack_into("<i", negative.buffer, 4096 + 8, -1)
    assert not negative.same()


def test_ranges_past_the_memory_are_refused():
    past = FakeMemory([1, 2], [1, 2])
    struct.pack_into("<I", past.buffer, 64 + 12, 8190)  # the item array runs off the end
    with pytest.raises(IndexError):
        past.same()
    with pytest.raises(IndexError):
        same_items(past.address, 8190, 4096, LIST_TYPE, TUPLE_TYPE)


CHANGES = [
    "pass",
    "items[k] = items[k]",
    "items[k] = (' ' + items[k])[1:]",  # equal, not the same object
    "items[k], items[k + 1] = items[k + 1], items[k]",
    "items.reverse(); items.reverse()",
    "items.append(items.pop())",  # the same items, the array reallocated or not
    "items.insert(0, items.pop())",
    "items.append('x'); items.pop(0)",
    "items.sort()",
    "items[k:k + 3] = items[k:k + 3]",
    "items[k:k + 3] = items[k + 1:k + 4]",
    "del items[k]; items.append(shape[k])",
    "items[:] = reversed(items)",
    "items *= 1",
]


def test_the_host_answers_as_the_walk_does():
    cell = (
        "import random, rlm_channel, rlm_same_items\n"
        "from _operator import is_not\n"
        "check = rlm_same_items.SameItems(rlm_channel.Channel())\n"
        "rng = random.Random(5)\n"
        f"changes = {CHANGES!r}\n"
        "wrong, answers = [], []\n"
        "for n in (rlm_same_items.HOST_MIN - 1, rlm_same_items.HOST_MIN, 6_000):\n"
        "    shape = tuple('item %d' % i for i in range(n))\n"
        "    for trial in range(60):\n"
        "        items, k, change = list(shape), rng.randrange(100, n - 4), changes[trial % len(changes)]\n"
        "        exec(change)\n"
        "        walk = len(items) == len(shape) and not any(map(is_not, items, shape))\n"
        "        answers.append(walk)\n"
        "        if check.same(items, shape) is not walk: wrong.append((n, change))\n"
        "(check.by_host(), wrong, answers.count(True), answers.count(False))"
    )
    with ReplSession(limits=LIMITS).start() as session:
        result = session.run_cell(cell)
    assert result.error is None, result.traceback
    by_host, wrong, same, changed = eval(result.value_repr)
    assert by_host is True and wrong == []
    assert same >= 30 and changed >= 90  # both answers were given, many times


def test_forged_messages_get_false_and_the_repl_goes_on():
    cell = (
        "import struct, rlm_channel\n"
        "ch = rlm_channel.Channel()\n"
        "items = ['a%d' % i for i in range(5_000)]\nshape = tuple(items)\n"
        "L, T = id(list), id(tuple)\n"
        # A list head forged in a bytes object (its text starts 16 bytes in):
        # the item array far past the memory, then a size past it.
        "far = struct.pack('<IIiI', 1, L, 5_000, 0xFFFF0000)\n"
        "huge = struct.pack('<IIiI', 1, L, 2**31 - 1, id(shape) + 12)\n"
        "forged = [['same_items', -1, id(shape), L, T], ['same_items', 2**40, 2**40, L, T],\n"
        "          ['same_items', id(items), id(shape), T, L], ['same_items', id(shape), id(shape), L, T],\n"
        "          ['same_items', id(far) + 16, id(shape), L, T], ['same_items', id(huge) + 16, id(shape), L, T],\n"
        "          ['same_items', 2**32 - 4, id(shape), L, T]]\n"
        "answers = [ch.request(m) for m in forged]\n"
        "(answers, ch.request(['same_items', id(items), id(shape), L, T]))"
    )
    with ReplSession(limits=LIMITS).start() as session:
        result = session.run_cell(cell)
        assert result.error is None, result.traceback
        assert result.value_repr == "(%r, [True])" % ([[False]] * 7)
        assert session.run_cell("len(items)").value_repr == "5000"


def test_a_long_list_changed_in_place_restores_as_changed(tmp_path):
    spans = packed_spans(tmp_path, [prose(random.Random(3), 6_000)])
    with ReplSession(limits=LIMITS).start() as session:
        session.load_context(spans, "str")
        session.wait_context_index()
        session.run_cell("lines = context.split('\\n')\nnumbers = list(range(6_000))\nsteady = list(numbers)")
        assert int(session.run_cell("len(lines)").value_repr) >= HOST_MIN
        first = session.snapshot()
        unchanged = session.snapshot()
        assert unchanged.unchanged and unchanged.new_records == {}
        # Equal to what each replaced, none the same object: only identity tells.
        changed = session.run_cell(
            "class Tagged(str):\n    pass\n"
            "lines[100] = Tagged(lines[100])\nlines[200] = (' ' + lines[200])[1:]\nnumbers[7] = 7.0")
        assert changed.error is None
        second = session.snapshot()
        records = {**first.new_records, **second.new_records}
    with ReplSession(limits=LIMITS).start() as other:
        other.load_context(spans, "str")
        other.restore(second.data, records)
        check = other.run_cell("(type(lines[100]).__name__, lines == context.split('\\n'), type(numbers[7]).__name__,"
                               " numbers == list(range(6_000)), steady == numbers)")
        assert check.value_repr == "('Tagged', True, 'float', True, True)"


def test_a_long_list_context_changed_in_place_is_put_back(tmp_path):
    docs = [f"document {i}" for i in range(HOST_MIN + 100)]
    with ReplSession(limits=LIMITS).start() as session:
        session.load_context(packed_spans(tmp_path, docs), "list")
        assert session.run_cell("context.reverse(); context.reverse()").restored_names == []
        assert session.run_cell("context[4_000] = (' ' + context[4_000])[1:]").restored_names == ["context"]
        assert session.run_cell("context[0], context[1] = context[1], context[0]").restored_names == ["context"]
        assert session.run_cell("context[:2] + context[4_000:4_001]").value_repr == \
            repr(["document 0", "document 1", "document 4000"])
