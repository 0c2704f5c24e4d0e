"""The guest's memcmp, replaced by a word loop (sandbox_wasm/_fast_memcmp.py), on real wasmtime."""

from __future__ import annotations

import random

import pytest
import wasmtime

from sandbox_wasm import ReplSession, SandboxLimits
from sandbox_wasm._fast_memcmp import IMPORTED_FUNCS, MEMCMP_FUNC, MemcmpNotFound, with_fast_memcmp, words_memcmp_body
from sandbox_wasm._runtime import verified_wasm_path
from sandbox_wasm._wasm_binary import CODE_SECTION, leb, sections, uleb

# The replacement alone, exported beside its memory, to call it on any buffers.
_HARNESS_WAT = """(module
 (memory (export "memory") 1)
 (func (export "memcmp") (param i32 i32 i32) (result i32) unreachable))"""


def _reference(left: bytes, right: bytes) -> int:
    """musl's memcmp: the difference of the first unequal bytes, or 0."""
    for a, b in zip(left, right):
        if a != b:
            return a - b
    return 0


@pytest.fixture(scope="module")
def memcmp():
    # The harness's body swapped for the replacement, as the pinned module's is.
    wasm = wasmtime.wat2wasm(_HARNESS_WAT)
    out = bytearray(wasm[:8])
    new = words_memcmp_body()
    for section_id, body in sections(wasm):
        if section_id == CODE_SECTION:
            body = leb(1) + leb(len(new)) + new
        out += bytes([section_id]) + leb(len(body)) + body
    engine = wasmtime.Engine()
    store = wasmtime.Store(engine)
    exports = wasmtime.Instance(store, wasmtime.Module(engine, bytes(out)), []).exports(store)
    memory, function = exports["memory"], exports["memcmp"]

    def call(left: bytes, right: bytes, left_at: int = 0, right_at: int = 4096) -> int:
        memory.write(store, left, left_at)
        memory.write(store, right, right_at)
        result = function(store, left_at, right_at, len(left))
        return result - (1 << 32) if result >= 1 << 31 else result

    return call, store, function


def test_it_answers_as_musl_at_every_length_offset_and_first_difference(memcmp):
    call, _store, _function = memcmp
    rng = random.Random(7)
    for size in [*range(0, 70), 95, 96, 97, 127, 128, 129, 1000]:
        base = bytes(rng.randrange(256) for _ in range(size))
        assert call(base, base) == 0
        for where in {0, size // 3, size - 1, *range(max(0, size - 33), size)} if size else ():
            for other in (0x00, 0x01, 0x7F, 0x80, 0xFF):
                if base[where] == other:
                    continue
                changed = base[:where] + bytes([other]) + base[where + 1:]
                # Unaligned starts too: the loop loads words at any address.
                for left_at, right_at in ((0, 4096), (3, 4101), (1, 8192)):
                    assert call(base, changed, left_at, right_at) == _reference(base, changed), (size, where)
                    assert call(changed, base, left_at, right_at) == _reference(changed, base), (size, where)


def test_it_reads_nothing_past_its_length(memcmp):
    call, store, function = memcmp
    # Equal up to the end of memory: a load past the length would trap.
    assert call(b"x" * 64, b"x" * 64, 65536 - 64, 65536 - 128) == 0
    assert function(store, 65536, 65536, 0) == 0
    call(b"x" * 64, b"x" * 64, 65536 - 64, 0)
    with pytest.raises(wasmtime.Trap):
        function(store, 65536 - 16, 0, 17)  # equal until past memory: traps as the byte loop does


def test_the_pinned_module_gets_it_in_place_of_musls_byte_loop():
    wasm = with_fast_memcmp(verified_wasm_path().read_bytes())
    code = next(body for section_id, body in sections(wasm) if section_id == CODE_SECTION)
    _count, at = uleb(code, 0)
    for _ in range(MEMCMP_FUNC - IMPORTED_FUNCS):
        size, at = uleb(code, at)
        at += size
    size, at = uleb(code, at)
    assert code[at:at + size] == words_memcmp_body()


def test_a_module_without_musls_memcmp_is_refused():
    with pytest.raises(MemcmpNotFound):
        with_fast_memcmp(wasmtime.wat2wasm(_HARNESS_WAT))


def test_guest_comparisons_agree_with_the_host():
    code = """
import random
rng = random.Random(11)
results = []
for size in (0, 1, 31, 32, 33, 64, 100, 4096):
    base = bytes(rng.randrange(256) for _ in range(size))
    for where in range(0, size, max(1, size // 9)):
        for other in (0, 1, 127, 128, 255):
            changed = base[:where] + bytes([other]) + base[where + 1:]
            text, changed_text = base.decode('latin-1'), changed.decode('latin-1')
            results.append((base < changed, base == changed, changed > base,
                            text < changed_text, text == changed_text, text.startswith(changed_text[:where + 1])))
long = 'ab' * 3_000_000
results.append((long == 'ab' * 3_000_000, long == 'ab' * 2_999_999 + 'ac', long.startswith(long[:5_000_001])))
digest = repr(results)
"""
    host: dict = {}
    exec(code, host)
    with ReplSession(limits=SandboxLimits(cell_timeout_s=30.0, memory_bytes=256 * 1024**2)).start() as session:
        result = session.run_cell(code + f"print(len(results), digest == {host['digest']!r})")
        assert result.error is None
        assert result.output.strip() == f"{len(host['results'])} True"
