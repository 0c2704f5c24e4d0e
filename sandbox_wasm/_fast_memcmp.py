"""The pinned CPython build's `memcmp`, replaced by one that compares 32 bytes a step.

wasi-libc's `memcmp` is musl's byte loop: 0.7-0.9 GB/s in the guest, where
copies (`memory.copy`) run at ~6 GB/s. CPython compares strings and bytes with
it (`==`, `<`, `startswith`, dict keys of equal hash), and the snapshot checks
every large string it places in the context with `startswith`: after the
200-chunk cell of bench_vs_rlms that was 40 MB, 50-65 ms; with this loop
3.6-4 ms (~10 GB/s; a v128 loop measured the same, so no SIMD is needed).

The replacement returns what musl's does: the difference of the first unequal
bytes (as unsigned) or 0. Four 8-byte words are compared a step while 32 bytes
are left and all are equal; the step that differs, and the last < 32 bytes,
go byte by byte as before. Every load stays inside [l, l + n) and [r, r + n),
as the byte loop's do.

The build has no name section: `memcmp` is found by index and its body is
checked byte for byte before it is replaced (valid for the pinned sha256 only).
"""

from __future__ import annotations

import hashlib

import wasmtime

from ._wasm_binary import CODE_SECTION, leb, sections, uleb

# Function 327 (43 imported functions come first): the only (i32, i32, i32) ->
# i32 function of the build that behaves as memcmp on test buffers.
MEMCMP_FUNC = 327
IMPORTED_FUNCS = 43
_MUSL_MEMCMP = bytes.fromhex(
    "03017f017f017f02402002450d00034020002d0000220420012d00002205460440200041016a2100200141016a2101"
    "200241016b22020d010c020b0b200420056b21030b20030b"
)
_WORDS_MEMCMP_WAT = r"""(module
 (import "env" "memory" (memory 0))
 (func (param $l i32) (param $r i32) (param $n i32) (result i32)
  (block $tail
   (loop $words
    (br_if $tail (i32.lt_u (local.get $n) (i32.const 32)))
    (br_if $tail (i64.ne (i64.const 0) (i64.or
     (i64.or (i64.xor (i64.load align=1 (local.get $l)) (i64.load align=1 (local.get $r)))
             (i64.xor (i64.load offset=8 align=1 (local.get $l)) (i64.load offset=8 align=1 (local.get $r))))
     (i64.or (i64.xor (i64.load offset=16 align=1 (local.get $l)) (i64.load offset=16 align=1 (local.get $r)))
             (i64.xor (i64.load offset=24 align=1 (local.get $l)) (i64.load offset=24 align=1 (local.get $r)))))))
    (local.set $l (i32.add (local.get $l) (i32.const 32)))
    (local.set $r (i32.add (local.get $r) (i32.const 32)))
    (local.set $n (i32.sub (local.get $n) (i32.const 32)))
    (br $words)))
  (block $equal
   (loop $bytes
    (br_if $equal (i32.eqz (local.get $n)))
    (if (i32.ne (i32.load8_u (local.get $l)) (i32.load8_u (local.get $r)))
     (then (return (i32.sub (i32.load8_u (local.get $l)) (i32.load8_u (local.get $r))))))
    (local.set $l (i32.add (local.get $l) (i32.const 1)))
    (local.set $r (i32.add (local.get $r) (i32.const 1)))
    (local.set $n (i32.sub (local.get $n) (i32.const 1)))
    (br $bytes)))
  (i32.const 0)))"""


VERSION = hashlib.sha256(_WORDS_MEMCMP_WAT.encode()).hexdigest()[:16]
"""Part of the compiled module's cache key: a changed replacement compiles anew."""


class MemcmpNotFound(Exception):
    """The module's function MEMCMP_FUNC is not musl's memcmp (another build)."""


def with_fast_memcmp(wasm: bytes) -> bytes:
    """`wasm` with the body of MEMCMP_FUNC replaced by the word loop."""
    out = bytearray(wasm[:8])
    replaced = False
    for section_id, body in sections(wasm):
        if section_id == CODE_SECTION:
            body, replaced = _replace_body(body, MEMCMP_FUNC - IMPORTED_FUNCS, _MUSL_MEMCMP, words_memcmp_body())
        out += bytes([section_id]) + leb(len(body)) + body
    if not replaced:
        raise MemcmpNotFound(f"function {MEMCMP_FUNC} of the CPython module is not musl's memcmp")
    return bytes(out)


def words_memcmp_body() -> bytes:
    """The replacement's function body (locals and code), as in a code section."""
    tiny = wasmtime.wat2wasm(_WORDS_MEMCMP_WAT)
    for section_id, body in sections(tiny):
        if section_id == CODE_SECTION:
            _count, at = uleb(body, 0)
            size, at = uleb(body, at)
            return bytes(body[at:at + size])
    raise AssertionError("the replacement has no code section")


def _replace_body(code: bytes, position: int, expected: bytes, new: bytes) -> tuple[bytes, bool]:
    """The code section with function `position`'s body (defined functions
    only) replaced, if it is `expected`; else unchanged and False."""
    count, at = uleb(code, 0)
    if position >= count:
        return code, False
    for _ in range(position):
        size, at = uleb(code, at)
        at += size
    size, start = uleb(code, at)
    if code[start:start + size] != expected:
        return code, False
    return bytes(code[:at]) + leb(len(new)) + new + bytes(code[start + size:]), True
