"""Just enough of the wasm binary format to rewrite the pinned CPython module
(_boot_image.with_image_exports, _fast_memcmp.with_fast_memcmp)."""

from __future__ import annotations

from collections.abc import Iterator

CUSTOM_SECTION = 0
GLOBAL_SECTION = 6
EXPORT_SECTION = 7
CODE_SECTION = 10


def sections(wasm: bytes) -> Iterator[tuple[int, bytes]]:
    """(section id, section body) of a module, in order, after its 8-byte header."""
    position = 8
    while position < len(wasm):
        section_id = wasm[position]
        size, start = uleb(wasm, position + 1)
        yield section_id, wasm[start:start + size]
        position = start + size


def uleb(data: bytes, position: int) -> tuple[int, int]:
    """The unsigned LEB128 number at `position`, and the position after it."""
    value = shift = 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, position


def leb(value: int) -> bytes:
    """`value` (>= 0) as unsigned LEB128."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
