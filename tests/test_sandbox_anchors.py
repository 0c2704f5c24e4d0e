"""The anchors a large document is indexed by, and the search the guest
runs for them in each value it looks up (pure logic, run on the host)."""

from __future__ import annotations

import random

from sandbox_wasm.guest.rlm_anchors import ANCHOR_LEN, MIN_INDEXED_DOC, anchor_index, first_anchor


def _first_by_loop(value: str, prefix: str, followers: str, begin: int) -> int:
    """What an anchor is, said plainly: `prefix` followed by one of
    `followers` (by anything, when there are none)."""
    for pos in range(begin, len(value) + 1):
        if value.startswith(prefix, pos):
            after = pos + len(prefix)
            if not followers:
                return pos if prefix else -1
            if after < len(value) and value[after] in followers:
                return pos
    return -1


def test_the_first_anchor_is_the_first_place_the_anchor_pattern_holds():
    rng = random.Random(6)
    found = 0
    for _ in range(20_000):
        # Characters a regex gives meaning to among the letters.
        alphabet = rng.choice(["ab", "abc;,.", "x]^-\\y", "i;,.q ", "a.*+?()[]{}|$"])
        value = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        prefix = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 3)))
        followers = rng.choice(["", "".join(rng.sample(alphabet, min(3, len(alphabet))))])
        begin = rng.randint(0, 65)
        expected = _first_by_loop(value, prefix, followers, begin)
        assert first_anchor(value, [prefix, followers], begin) == expected, (value, prefix, followers, begin)
        found += expected >= 0
    assert found > 2_000


def test_every_indexed_anchor_is_where_the_search_finds_one():
    rng = random.Random(8)
    words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(2, 9))) for _ in range(2_000)]
    text = " ".join(rng.choice(words) + rng.choice(["", "", "", ",", ".", ";"]) for _ in range(40_000))
    assert len(text) >= MIN_INDEXED_DOC
    anchor, table = anchor_index(text)
    positions = sorted(p for v in table.values() for p in (v if isinstance(v, list) else [v]))
    assert len(positions) > 20
    limit = len(text) - ANCHOR_LEN
    for here, after in zip(positions, positions[1:] + [None]):
        assert first_anchor(text, anchor, here) == here
        # Past one indexed anchor, the search finds the next (or, past the
        # last, none that starts a full window).
        following = first_anchor(text, anchor, here + 1)
        assert following == after if after is not None else (following == -1 or following > limit)
