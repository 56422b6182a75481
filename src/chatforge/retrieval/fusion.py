"""Retrieval modes: BM25, dense, or both fused by reciprocal rank; follow-up turns.

    retriever = load_retriever(["examples/my_docs"], mode="hybrid")
    hits = retriever.search("and how do I undo that?", k=3, history=["How do I amend a commit?"])

`Retriever` has `PassageIndex`'s interface (`search`, `passages`, `matching_docs`,
`doc_passages`, `best_in_docs`, ...; everything but `search` is the BM25 index's) and ranks by
its `mode`:
- "bm25": the BM25 index's score (words and headings; fast, exact on the documents' own words).
- "dense": cosine similarity of sentence embeddings (`retrieval/embed.py`, `retrieval/dense.py`):
  finds "I was charged twice" under "Refund policy".
- "hybrid": the dense cosine plus BM25_WEIGHT (0.1) x the BM25 score divided by the query's best
  BM25 score: dense decides, and the documents' exact words break its near-ties ("switch or
  case statement" finds the FAQ entry that names them). `fusion="rrf"` gives reciprocal-rank
  fusion instead, score = sum over the rankings of 1 / (RRF_K + rank) over each ranking's best
  RRF_DEPTH (Cormack et al. 2009; what Elasticsearch, Haystack and LlamaIndex ship). Measured,
  not assumed (README, "when to choose which retrieval"): on the demo's 19.6k passages RRF kept
  the title-worded validation at hit@3 1.000 but lost to dense alone on customer wording
  (0.683 vs 0.867 on the git FAQ set); the weighted sum keeps 1.000 there and reaches 0.900.
  Weights 0.05-0.3 all keep validation at 1.000; 0.1 was fixed before looking at the customer
  sets' scores for it.

Follow-ups ("and how do I undo that?"): `search(..., history=[earlier user turns])` also uses
the last earlier user turn, weighted `history_weight` (0.5) against the current one's 1: BM25
scores score(current) + 0.5 x score(earlier); dense scores each passage by the best of its cosine
to the current question and to the weighted sum of the two question vectors
(`DenseIndex.scores`), so a second question on a new topic keeps its own passages. Measured on
evalsets/followups.jsonl (git FAQ + example company, hit@3, last message alone -> with the
earlier turn): BM25 0.542 -> 0.833, dense 0.500 -> 0.958; on 107 second turns after an
unrelated question the earlier turn costs dense 0.944 -> 0.869 (weights 0.3 / 0.7: 0.833 /
0.917 on follow-ups, 0.907 / 0.822 unrelated).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterable, Sequence

import numpy as np
import torch

from chatforge.errors import ChatforgeError
from chatforge.options import option
from chatforge.retrieval.dense import DenseIndex, cache_folder, default_batch_size
from chatforge.retrieval.embed import (DEFAULT_MAX_TOKENS, DEFAULT_MODEL, LARGE_MODEL_MAX_PASSAGES, Embedder,
                                       default_model, resolve_model)
from chatforge.retrieval.index import PassageIndex, _resolved, default_cache_dir
from chatforge.retrieval.passages import Passage

MODES = ("bm25", "dense", "hybrid")
# "auto": BEST_MODE when the embedding model is there (fetched, or --embedding-model given), else
# BM25 with a note: a user without the model still gets an assistant.
DEFAULT_MODE = "auto"
BEST_MODE = "hybrid"             # the measured winner (README, "when to choose which retrieval")
RRF_K = 60                       # the constant of reciprocal-rank fusion (the usual 60)
RRF_DEPTH = 100                  # how deep each ranking is fused
BM25_WEIGHT = 0.1                # hybrid: weight of BM25 / max BM25 beside the cosine
FUSIONS = ("weighted", "rrf")
HISTORY_WEIGHT = 0.5             # weight of the earlier user turn in a follow-up's query


def rrf(rankings: Sequence[Sequence[int]], n: int, k: int = RRF_K) -> np.ndarray:
    """Reciprocal-rank fusion: (n,) scores, sum over `rankings` (lists of ids, best first) of
    1 / (k + rank), rank counted from 1; an id absent from a ranking gets nothing from it."""
    out = np.zeros(n, dtype=np.float64)
    for ranking in rankings:
        ids = np.asarray(ranking, dtype=np.int64)
        out[ids] += 1.0 / (k + np.arange(1, len(ids) + 1))
    return out


def _top(scores: np.ndarray, depth: int) -> np.ndarray:
    depth = min(depth, len(scores))
    top = np.argpartition(-scores, depth - 1)[:depth]
    return top[np.argsort(-scores[top], kind="stable")]


class Retriever:
    """A `PassageIndex` searched by BM25, dense vectors or both (see the module docstring)."""

    def __init__(self, index: PassageIndex, dense: Any | None = None, mode: str = "bm25",
                 history_weight: float = HISTORY_WEIGHT, rrf_k: int = RRF_K, rrf_depth: int = RRF_DEPTH,
                 fusion: str = "weighted", bm25_weight: float = BM25_WEIGHT):
        if fusion not in FUSIONS:
            raise ChatforgeError(f"unknown fusion {fusion!r}; choose one of {', '.join(FUSIONS)}")
        if mode not in MODES:
            raise ChatforgeError(f"unknown retrieval mode {mode!r}; choose one of {', '.join(MODES)}")
        if mode != "bm25" and dense is None:
            raise ChatforgeError(f"--retrieval {mode} needs the dense index (an embedding model)")
        self.index, self.dense, self.mode = index, dense, mode
        self.history_weight, self.rrf_k, self.rrf_depth = history_weight, rrf_k, rrf_depth
        self.fusion, self.bm25_weight = fusion, bm25_weight

    def __getattr__(self, name: str) -> Any:
        # Everything but ranking is the passage index's (passages, matching_docs, doc_passages, ...).
        if name == "index":
            raise AttributeError(name)
        return getattr(self.index, name)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def embedding_model(self) -> str | None:
        """The name of the embedding model's folder (None without the dense index)."""
        folder = getattr(getattr(self.dense, "embedder", None), "folder", None)
        return Path(folder).name if folder is not None else None

    def _queries(self, query: str, history: Sequence[str]) -> tuple[list[str], list[float]]:
        earlier = [h for h in history if h and h.strip()]
        if earlier and self.history_weight > 0:
            return [query, earlier[-1]], [1.0, self.history_weight]
        return [query], [1.0]

    def bm25_scores(self, texts: Sequence[str], weights: Sequence[float]) -> np.ndarray:
        return sum(w * self.index.scores(t) for t, w in zip(texts, weights))

    def scores(self, query: str, history: Sequence[str] = (), mode: str | None = None) -> np.ndarray:
        """Every passage's score for `query` (after the earlier user turns `history`) in `mode`
        (default the retriever's): BM25, cosine, or the fused score."""
        mode = mode or self.mode
        texts, weights = self._queries(query, history)
        if mode == "bm25":
            return self.bm25_scores(texts, weights)
        if self.dense is None:
            raise ChatforgeError(f"retrieval mode {mode} needs the dense index")
        dense = self.dense.scores(texts, weights)
        if mode == "dense":
            return dense
        bm25 = self.bm25_scores(texts, weights)
        if self.fusion == "weighted":
            top = float(bm25.max()) if len(bm25) else 0.0
            return dense + self.bm25_weight * bm25 / top if top > 0 else dense
        rankings = [_top(dense, self.rrf_depth)]
        if bm25.any():          # no query word in the documents: BM25 ranks nothing
            rankings.append(_top(bm25, self.rrf_depth)[: int(np.count_nonzero(bm25))])
        return rrf(rankings, len(dense), self.rrf_k)

    def search(self, query: str, k: int = 3, exclude_docs: Iterable[str] = (), history: Sequence[str] = (),
               mode: str | None = None) -> list[Passage]:
        """The `k` best passages for `query` (passages of `exclude_docs` left out), best first;
        `history`: the conversation's earlier user turns, oldest first (see the module docstring)."""
        scores = self.scores(query, history, mode)
        excluded = set(exclude_docs)
        candidates = None
        if excluded:
            candidates = [i for i, p in enumerate(self.index.passages) if p.doc not in excluded]
        return self.index._ranked(scores, candidates, k)


def load_retriever(paths: Sequence[str | os.PathLike], cache_dir: str | os.PathLike | None = None,
                   mode: str = DEFAULT_MODE, model: str | os.PathLike | None = None,
                   history_weight: float = HISTORY_WEIGHT, max_tokens: int | None = None,
                   threads: int | None = None) -> Retriever:
    """The passage index of `paths` (cached, `PassageIndex.load_or_build`) searched in `mode`;
    for "dense" and "hybrid" with the embedding `model` (a folder or a fetched source name;
    default `embed.default_model`: all-mpnet-base-v2 for up to 2,000 passages when fetched, else
    all-minilm-l6-v2), its passage vectors cached beside the index."""
    if mode == "auto":
        mode = auto_mode(model)
    if mode not in MODES:
        raise ChatforgeError(f"unknown retrieval mode {mode!r}; choose one of auto, {', '.join(MODES)}")
    index = PassageIndex.load_or_build(paths, cache_dir)
    if mode == "bm25":
        return Retriever(index, None, mode, history_weight)

    if threads:
        torch.set_num_threads(threads)
    if model is None:
        model = default_model(len(index))
        if model != DEFAULT_MODEL:
            print(f"dense retrieval: {model} for {len(index):,} passages (at most {LARGE_MODEL_MAX_PASSAGES:,}; "
                  f"{DEFAULT_MODEL} above; --embedding-model to choose)", file=sys.stderr)
    embedder = Embedder.load(model, max_tokens=max_tokens or DEFAULT_MAX_TOKENS)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    resolved = _resolved(paths)
    dense = DenseIndex.load_or_build(index.passages, embedder, cache_folder(root, resolved), resolved,
                                     default_batch_size())
    return Retriever(index, dense, mode, history_weight)


def auto_mode(model: str | os.PathLike | None = None) -> str:
    """BEST_MODE when the embedding model can be loaded, else "bm25" (saying so on stderr)."""
    try:
        resolve_model(model)
    except ChatforgeError as e:
        if model is not None:
            raise
        print(f"note: retrieval falls back to BM25: {e}", file=sys.stderr)
        return "bm25"
    return BEST_MODE


@dataclass
class RetrievalOptions:
    """The retrieval options of every command that retrieves (`--retrieval`, `--embedding-model`);
    a stage's config takes them as `group(RetrievalOptions)`."""
    SECTION: ClassVar[str] = "retrieval"

    retrieval: str = option(DEFAULT_MODE, f"how passages are found: bm25 (words), dense (sentence embeddings) or "
                                          f"hybrid (the cosine plus a tenth of the normalised BM25 score); auto: "
                                          f"{BEST_MODE} when the embedding model is fetched, else bm25",
                            choices=("auto", *MODES))
    embedding_model: str | None = option(None, "embedding model for dense/hybrid retrieval: a model folder (e.g. "
                                               "one `chatforge retriever train` wrote) or a fetched source; default: "
                                               "the one the model's answer.json names (a retriever the "
                                               "continual-learning round kept), else all-mpnet-base-v2 for up to "
                                               "2,000 passages when fetched, all-minilm-l6-v2 beyond",
                                         metavar="NAME|DIR")


def from_args(args: Any, paths: Sequence[str | os.PathLike],
              cache_dir: str | os.PathLike | None = None, default_model: str | os.PathLike | None = None) -> Retriever:
    """`load_retriever` with `RetrievalOptions` (a config holding them, or parsed arguments; BM25
    for one without them).
    `default_model`: the embedding model when --embedding-model is not given (the one the served
    model's answer settings name, `AnswerSettings.embedding_model_for`)."""
    return load_retriever(paths, cache_dir, getattr(args, "retrieval", "bm25"),
                          getattr(args, "embedding_model", None) or default_model)


def search_turn(index: Any, query: str, k: int, conversation: Sequence[dict] = (),
                exclude_docs: Iterable[str] = ()) -> list[Passage]:
    """The `k` passages for a conversation's new user turn `query`: a `Retriever` also uses the
    earlier user turns of `conversation` (chat messages); a plain `PassageIndex` the turn alone."""
    if isinstance(index, Retriever):
        history = [m["content"] for m in conversation if m.get("role") == "user" and isinstance(m.get("content"), str)]
        return index.search(query, k, exclude_docs, history=history)
    return index.search(query, k, exclude_docs)
