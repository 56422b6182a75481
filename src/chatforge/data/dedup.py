"""Deduplication for the data stage: exact (hash of normalised text) and near (MinHash LSH).

    exact = ExactDedup()
    near = NearDedup(threshold=0.85, num_perm=64)
    for text in texts:
        if exact.seen(text) or near.seen(text):
            continue          # a duplicate of an earlier text: drop it
        keep(text)

Both keep the *first* occurrence, so the result depends only on the input order (which the
readers make deterministic). Memory stays small: exact keeps a 16-byte digest per text, near
keeps one MinHash signature (num_perm x 4 bytes) per kept text plus the LSH band tables; the
texts themselves are never held.

Near-duplicates are found on word 5-gram shingles of the lower-cased text. LSH candidates are
confirmed with the signatures' estimated Jaccard similarity, so a band collision below the
threshold does not remove anything.
"""

from __future__ import annotations

import hashlib
import re
import zlib

import numpy as np
from datasketch import MinHash, MinHashLSH

_WORD = re.compile(r"\w+")


def normalize_key(text: str) -> str:
    """The text as dedup compares it: case-folded, whitespace collapsed."""
    return " ".join(text.casefold().split())


def text_digest(text: str) -> bytes:
    """16-byte digest of the normalised text."""
    return hashlib.blake2b(normalize_key(text).encode("utf-8"), digest_size=16).digest()


class ExactDedup:
    """Remembers digests of normalised texts; `seen(text)` is True for a repeat."""

    def __init__(self) -> None:
        self._digests: set[bytes] = set()
        self.removed = 0

    def seen(self, text: str) -> bool:
        d = text_digest(text)
        if d in self._digests:
            self.removed += 1
            return True
        self._digests.add(d)
        return False


def shingle_hashes(text: str, n: int = 5) -> np.ndarray:
    """32-bit hashes of the word n-grams of `text` (one shingle for texts under n words)."""
    words = _WORD.findall(text.lower())
    if not words:
        return np.zeros(0, dtype=np.uint64)
    # Hash each word once (crc32: stable across runs, unlike hash()), then mix n consecutive
    # word hashes with numpy instead of building n-gram strings.
    w = np.fromiter((zlib.crc32(x.encode("utf-8")) for x in words), dtype=np.uint64, count=len(words))
    if len(w) < n:
        n = len(w)
    k = np.uint64(0x9E3779B97F4A7C15)
    h = np.zeros(len(w) - n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i in range(n):
            h = h * k + w[i: len(w) - n + 1 + i]
    return h >> np.uint64(32)


def _identity(x: int) -> int:
    return int(x)


class NearDedup:
    """MinHash-LSH near-duplicate detector; `seen(text)` is True when an earlier text is similar.

    threshold: estimated Jaccard similarity of word 5-gram sets at or above which a text is a
    duplicate (0 disables near-dedup). num_perm: MinHash permutations (more = more precise,
    slower; 64 is plenty at a threshold of 0.85).
    """

    def __init__(self, threshold: float = 0.85, num_perm: int = 64, ngram: int = 5, seed: int = 1) -> None:
        self.threshold = threshold
        self.ngram = ngram
        self.removed = 0
        self.enabled = threshold > 0
        if self.enabled:
            self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
            # Copying a template is much cheaper than seeding new permutations for every text.
            self._template = MinHash(num_perm=num_perm, seed=seed, hashfunc=_identity)
            self._signatures: list[np.ndarray] = []

    def signature(self, text: str) -> MinHash:
        m = self._template.copy()
        m.update_batch(shingle_hashes(text, self.ngram))
        return m

    def seen(self, text: str) -> bool:
        if not self.enabled:
            return False
        m = self.signature(text)
        for key in self._lsh.query(m):
            if float(np.mean(self._signatures[key] == m.hashvalues)) >= self.threshold:
                self.removed += 1
                return True
        key = len(self._signatures)
        self._signatures.append(m.hashvalues.copy())
        self._lsh.insert(key, m, check_duplication=False)
        return False
