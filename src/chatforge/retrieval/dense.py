"""The dense index: every passage's embedding as one matrix in memory, cached on disk.

    dense = DenseIndex.load_or_build(index, embedder, folder)   # folder: see `cache_folder`
    scores = dense.scores(["How do I undo my last commit?"])    # (N,) cosine similarities

A query is scored against all passages with one matrix-vector product (N x 384 float32: 10k
passages are 15 MB and ~1 ms on one thread; `benchmarks/bench_dense.py`). That stays fast to a
few hundred thousand passages (0.4 GB, ~20-40 ms a query); beyond that an approximate-nearest-
neighbour index is needed (FAISS HNSW or IVF-PQ in process, or pgvector beside the server's
PostgreSQL feedback store), which this module does not implement.

Caching: embedding is the expensive part (tens of passages a second a core), so each passage's
vector is computed once. The cache lives beside the BM25 index in chatforge's cache folder, in
`dense-<hash of the input paths>/` (not inside `passages-*/`, which a BM25 rebuild replaces
whole): `<model fingerprint>.npz` (float16 rows and a hash of each row's embedded text, in one file
written atomically), plus `meta.json` with the input paths. On a load, rows whose text is
unchanged are reused and only new or edited passages are embedded, so editing one document
re-embeds its passages only; another model (or a fine-tuned one, or another `max_tokens`) has
another fingerprint and its own file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from chatforge import files
from chatforge.retrieval.embed import Embedder, passage_text
from chatforge.retrieval.passages import Passage


def _key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:20]


def _read(path: Path, wanted: set[str]) -> tuple[dict[str, np.ndarray], int]:
    """(the cached vectors of `path` whose keys are `wanted`, how many rows the file holds);
    ({}, 0) when it is missing or damaged."""
    try:
        with np.load(path, allow_pickle=False) as z:
            keys, vectors = z["keys"].tolist(), z["vectors"]
    except (OSError, ValueError, KeyError):
        return {}, 0
    if len(keys) != len(vectors):
        return {}, 0
    return {k: vectors[i] for i, k in enumerate(keys) if k in wanted}, len(keys)


def cache_folder(root: Path, resolved_paths: Sequence[str]) -> Path:
    """The dense cache folder of one set of input paths (resolved, sorted) under `root`."""
    h = hashlib.sha256(json.dumps({"paths": list(resolved_paths)}).encode()).hexdigest()[:16]
    return root / f"dense-{h}"


def prune(root: Path) -> None:
    """Remove dense caches whose documents are all gone (as the BM25 cache prunes its own)."""
    for folder in root.glob("dense-*"):
        try:
            paths = files.read_json(folder / "meta.json")["paths"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if paths and not any(Path(p).exists() for p in paths):
            shutil.rmtree(folder, ignore_errors=True)


class DenseIndex:
    """Unit-length passage vectors (N, D) and the embedder that made them."""

    def __init__(self, matrix: np.ndarray, embedder: Embedder):
        self.matrix = np.ascontiguousarray(matrix, dtype=np.float32)
        self.embedder = embedder

    def __len__(self) -> int:
        return len(self.matrix)

    @staticmethod
    def texts(passages: Sequence[Passage]) -> list[str]:
        return [passage_text(p.heading, p.text) for p in passages]

    @classmethod
    def build(cls, passages: Sequence[Passage], embedder: Embedder, batch_size: int = 32) -> "DenseIndex":
        return cls(embedder.encode(cls.texts(passages), batch_size, progress=True), embedder)

    @classmethod
    def load_or_build(cls, passages: Sequence[Passage], embedder: Embedder, folder: Path | None,
                      paths: Sequence[str] = (), batch_size: int = 32) -> "DenseIndex":
        """The passages' vectors, from `folder`'s cache for every passage whose text it holds,
        embedded for the rest; the cache is then rewritten (atomically) when anything was new.
        `folder` None: no cache. A cache that cannot be read or written is ignored."""
        texts = cls.texts(passages)
        keys = [_key(t) for t in texts]
        fp = embedder.fingerprint()
        cached: dict[str, np.ndarray] = {}
        wanted = set(keys)
        current = False          # this folder's file holds exactly these passages' vectors
        if folder is not None:
            own = folder / f"{fp}.npz"
            cached, rows = _read(own, wanted)
            current = len(cached) == len(wanted) == rows
            # Then the other document sets' caches of the same model (the demo's documents with
            # and without the unseen manual share 19.5k passages).
            for path in sorted(folder.parent.glob(f"dense-*/{fp}.npz")):
                if len(cached) == len(wanted):
                    break
                if path != own:
                    cached.update(_read(path, wanted - set(cached))[0])
        todo = [i for i, k in enumerate(keys) if k not in cached]
        matrix = np.zeros((len(texts), embedder.dim), dtype=np.float32)
        for i, k in enumerate(keys):
            if k in cached:
                matrix[i] = cached[k]
        if todo:
            matrix[todo] = embedder.encode([texts[i] for i in todo], batch_size, progress=True)
        if folder is not None and not current:
            try:
                folder.mkdir(parents=True, exist_ok=True)
                with files.atomic_open(folder / f"{fp}.npz", "wb") as f:
                    np.savez(f, vectors=matrix.astype(np.float16), keys=np.asarray(keys))
                files.write_json(folder / "meta.json", {"paths": list(paths), "model": str(embedder.folder)})
                prune(folder.parent)
            except OSError:
                pass     # a read-only cache: the vectors in memory still work
        # float16 on disk halves the cache; renormalised so that scores are true cosines.
        matrix /= np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
        return cls(matrix, embedder)

    def query_vectors(self, texts: Sequence[str], weights: Sequence[float] | None = None) -> np.ndarray:
        """Unit query vectors (Q, D): the first text's own vector and, when there are more texts,
        the weighted sum of all their vectors (the current turn with weight 1, the earlier user
        turn with a smaller one), renormalised. One `encode` call for all texts."""
        vecs = self.embedder.encode(list(texts))
        if len(texts) == 1:
            return vecs
        w = np.ones(len(texts), dtype=np.float32) if weights is None else np.asarray(weights, dtype=np.float32)
        v = (vecs * w[:, None]).sum(0)
        return np.stack([vecs[0], v / max(float(np.linalg.norm(v)), 1e-12)])

    def scores(self, texts: Sequence[str], weights: Sequence[float] | None = None) -> np.ndarray:
        """Cosine similarity (N,) of every passage with the query `texts[0]`; with earlier turns
        (`texts[1:]`), each passage's best of its similarity to the question alone and to the
        question in context (`query_vectors`). The best of the two, not the context query alone:
        on the follow-up set both reach hit@3 0.958, but a second question on a new topic keeps
        its own passages (hit@3 0.869 against 0.822 with the context query alone, w = 0.5)."""
        return (self.matrix @ self.query_vectors(texts, weights).T).max(axis=1)


def default_batch_size() -> int:
    return int(os.environ.get("CHATFORGE_EMBED_BATCH", "32"))
