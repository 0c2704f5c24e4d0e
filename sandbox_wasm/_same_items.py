"""Does a guest list still hold a guest tuple's objects? Compared on the host.

The snapshot's unchanged check (guest/rlm_snapshot) compares a stored list
with the tuple of its items it kept, item by item with `is`: exact, but in
the guest ~0.25 us an item, 76 ms over the 308K lines of a 100 MB text, most
of a small cell's snapshot. What it compares is two arrays of pointers in the
guest's own memory: the list's item array and the tuple's inline items. The
guest sends both objects' addresses (`id`) and the host compares the arrays
with memcmp (~0.03 ms for those 308K lines). Exact: the tuple holds its items,
so none of their addresses is reused while it lives.

The layout is CPython's on wasm32 (4-byte pointers and sizes): a PyObject is
a refcount and a type pointer, a PyVarObject adds its size, a list then
points to its items, a tuple holds them inline. Each object's type pointer is
checked against the addresses of `list` and `tuple` the guest sends, and the
guest tries the message on lists with a known answer before it trusts it
(guest/rlm_same_items.py). Every range is checked against the memory's size:
the addresses come from guest code.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable

_LIST_HEAD = struct.Struct("<IIiI")  # refcount, type, size, item array
_TUPLE_HEAD = struct.Struct("<IIi")  # refcount, type, size; items follow
_POINTER = 4


def _libc_memcmp() -> Callable[[int, int, int], int] | None:
    try:
        memcmp = ctypes.CDLL(None).memcmp
    except (OSError, AttributeError):  # no C library to load by that name
        return None
    memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
    memcmp.restype = ctypes.c_int
    return memcmp


_MEMCMP = _libc_memcmp()

Address = Callable[[int, int], int]
"""(guest pointer, length) -> the host address of that range; raises if it is out of bounds."""


def same_items(address: Address, list_at: int, tuple_at: int, list_type: int, tuple_type: int) -> bool:
    """True if the list at `list_at` holds, in order, the objects of the tuple at `tuple_at`."""
    _, kind, size, items = _LIST_HEAD.unpack(ctypes.string_at(address(list_at, _LIST_HEAD.size), _LIST_HEAD.size))
    _, tkind, tsize = _TUPLE_HEAD.unpack(ctypes.string_at(address(tuple_at, _TUPLE_HEAD.size), _TUPLE_HEAD.size))
    if kind != list_type or tkind != tuple_type or size != tsize or size < 0:
        return False
    length = size * _POINTER
    if length == 0:
        return True
    left, right = address(items, length), address(tuple_at + _TUPLE_HEAD.size, length)
    if _MEMCMP is not None:
        return _MEMCMP(left, right, length) == 0
    return ctypes.string_at(left, length) == ctypes.string_at(right, length)
