"""`chatforge.data.dedup`: exact and MinHash-LSH near-duplicate detection."""

from __future__ import annotations

import random

from chatforge.data.dedup import ExactDedup, NearDedup, normalize_key, shingle_hashes


def _doc(seed: int, n: int = 400) -> str:
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(5000)]
    return " ".join(rng.choice(vocab) for _ in range(n))


def test_exact_dedup_ignores_case_and_whitespace():
    d = ExactDedup()
    assert not d.seen("Restore a file\nfrom the console.")
    assert d.seen("  restore A FILE from   the console. ")
    assert not d.seen("Restore a folder from the console.")
    assert d.removed == 1
    assert normalize_key(" A\tB\n\nc ") == "a b c"


def test_near_dedup_finds_light_edits():
    near = NearDedup(threshold=0.85, num_perm=128)
    base = _doc(1)
    words = base.split()
    words[50] = "changed"
    words[300] = "edited"
    assert not near.seen(base)
    assert near.seen(" ".join(words))            # two words changed out of 400
    assert near.seen(base.upper())               # case does not matter
    assert not near.seen(_doc(2))                # an unrelated text
    assert near.removed == 2


def test_near_dedup_keeps_texts_below_the_threshold():
    near = NearDedup(threshold=0.85)
    base = _doc(3)
    words = base.split()
    half = words[:200] + _doc(4, 200).split()    # half of the text is new: Jaccard about 1/3
    assert not near.seen(base)
    assert not near.seen(" ".join(half))


def test_near_dedup_threshold_zero_is_off_and_short_texts_work():
    off = NearDedup(threshold=0)
    assert not off.seen("same text") and not off.seen("same text")
    near = NearDedup()
    assert not near.seen("short text")           # fewer words than the shingle size
    assert near.seen("Short  text")
    assert not near.seen("")
    assert len(shingle_hashes("a b c d e f g")) == 3
    assert len(shingle_hashes("a b")) == 1 and len(shingle_hashes("")) == 0


def test_near_dedup_is_deterministic():
    texts = [_doc(i % 7) + (" extra" if i % 3 == 0 else "") for i in range(30)]

    def run() -> list[bool]:
        near = NearDedup(threshold=0.85, num_perm=64)
        return [near.seen(t) for t in texts]

    first = run()
    assert first == run()
    assert sum(1 for x in first if not x) == 7
