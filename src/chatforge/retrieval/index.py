"""The passage index: BM25 over passages, cached under its inputs' fingerprint.

-------
BM25 (`bm25s`, Lucene variant) over lower-cased words of two or more characters, English
stopwords removed, Porter-stemmed, on two fields: the passage (title, section and text) and its
heading alone (title and section). A passage scores `bm25(passage) + HEADING_WEIGHT *
bm25(heading)`, so a question whose words are those of a heading (a FAQ question, a manual's
"Configuring the proxy") finds that section first. `benchmarks/bench_retrieval.py` measures
the choices (hit@1 / hit@3 on the demo's validation questions and the unseen git FAQ).

The index is a cache, kept in chatforge's cache folder, never beside the documents (which may
be read-only): `DIR/passages-<hash>/` with DIR = `cache_dir` when given (`--index-cache`), else
`$CHATFORGE_CACHE/index`, else `~/.cache/chatforge/index` (the cache `chatforge data fetch`
uses). The hash names the input paths; the folder holds bm25s's own files (numpy arrays and
JSON, no pickle) for both fields, `passages.jsonl` and `meta.json` with the input paths and a
fingerprint of the inputs (every file's path, size and mtime, plus the chunking settings).
`PassageIndex.load_or_build` reuses it while the fingerprint is unchanged and rebuilds it in
place (atomically) otherwise; a build also removes the cached indexes whose documents are all
gone. When the cache folder cannot be written the index still works from memory and is rebuilt
on the next run.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from chatforge import files
from chatforge.data.sources import file_stats
from chatforge.errors import ChatforgeError
from chatforge.retrieval.passages import MAX_WORDS, Passage, read_passages

HEADING_WEIGHT = 1.0                 # weight of the heading field's BM25 score (bench_retrieval.py)
INDEX_DIR = "index"                  # the indexes' folder inside chatforge's cache
FORMAT_VERSION = 2
_TOKEN = re.compile(r"(?u)\b\w\w+\b")


@functools.lru_cache(maxsize=None)
def _stopwords() -> frozenset[str]:
    # lazy: bm25s costs ~0.2 s, and chatforge.retrieval is imported by every chat even with retrieval off
    from bm25s.stopwords import STOPWORDS_EN
    return frozenset(STOPWORDS_EN)


@functools.lru_cache(maxsize=1)
def _stemmer() -> Callable[[str], str]:
    from nltk.stem.porter import PorterStemmer  # lazy: ~1.4 s to import; nltk comes with rouge-score
    return functools.lru_cache(maxsize=200_000)(PorterStemmer().stem)


def terms(text: str, stem: bool = True) -> list[str]:
    """The BM25 terms of `text`: lower-cased words of 2+ characters, no stopwords, stemmed."""
    words = [w for w in _TOKEN.findall(text.lower()) if w not in _stopwords()]
    if stem:
        st = _stemmer()
        words = [st(w) for w in words]
    return words


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def fingerprint(paths: Sequence[Path], stem: bool = True) -> dict:
    """What an index depends on: every input file's path, size and mtime, and the settings."""
    return {"version": FORMAT_VERSION, "stem": stem, "max_words": MAX_WORDS, "files": file_stats(paths)}


def default_cache_dir() -> Path:
    """Where indexes are cached without `cache_dir`: CHATFORGE_CACHE/index (~/.cache/chatforge/index)."""
    return files.cache_dir(INDEX_DIR)


def _resolved(paths: Sequence[str | os.PathLike]) -> list[str]:
    return sorted(str(Path(p).expanduser().resolve()) for p in paths)


def _prune(root: Path) -> None:
    """Remove the cached indexes whose documents are all gone (a deleted folder, a test's
    temporary one), so that the cache does not grow without bound."""
    for folder in root.glob("passages-*"):
        try:
            paths = files.read_json(folder / "meta.json")["paths"]
        except (OSError, ValueError, KeyError, TypeError):
            continue      # not ours, or being replaced right now
        if paths and not any(Path(p).exists() for p in paths):
            shutil.rmtree(folder, ignore_errors=True)


def _bm25(docs: list[list[str]]) -> Any | None:
    """A bm25s index of tokenised `docs` (None when no doc has a term: bm25s cannot index that)."""
    import bm25s  # lazy: ~0.2 s, only when an index is built (see _stopwords)

    if not any(docs):
        return None
    retriever = bm25s.BM25()
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)     # 0/0 for empty headings: scored 0
        retriever.index(docs, show_progress=False)
    return retriever


def _bm25_scores(retriever: Any | None, query: list[str], n: int) -> np.ndarray:
    q = [t for t in query if retriever is not None and t in retriever.vocab_dict]
    if not q:
        return np.zeros(n, dtype=np.float32)
    return np.asarray(retriever.get_scores(q), dtype=np.float32)


class PassageIndex:
    """BM25 over the passages of a set of documents. Build with `build` or `load_or_build`."""

    def __init__(self, passages: list[Passage], retriever: Any, stem: bool = True,
                 heading_retriever: Any | None = None, heading_weight: float = HEADING_WEIGHT):
        self.passages, self.retriever, self.stem = passages, retriever, stem
        self.heading_retriever, self.heading_weight = heading_retriever, heading_weight
        self._by_doc: dict[str, list[int]] = {}
        for i, p in enumerate(passages):
            p.id = i
            self._by_doc.setdefault(p.doc, []).append(i)

    def __len__(self) -> int:
        return len(self.passages)

    @property
    def docs(self) -> list[str]:
        return list(self._by_doc)

    # ---- building and caching ----------------------------------------------------------------

    @classmethod
    def from_passages(cls, passages: list[Passage], stem: bool = True,
                      heading_weight: float = HEADING_WEIGHT) -> "PassageIndex":
        """An index of `passages` in memory: the passage field is heading + text, the heading
        field the heading alone."""
        if not passages:
            raise ChatforgeError("no passages to index: the documents hold no text "
                                 "(give folders or files of .txt, .md, .rst, .html, ... with --docs)")
        body = _bm25([terms(f"{p.heading}\n{p.text}", stem) for p in passages])
        heading = _bm25([terms(p.heading, stem) for p in passages])
        return cls(passages, body, stem, heading, heading_weight)

    @staticmethod
    def _folder(paths: Sequence[Path], cache_dir: str | os.PathLike | None, stem: bool) -> Path:
        root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        # One folder per set of inputs: a change of their files or of the settings rebuilds it in place.
        return root / f"passages-{_hash({'paths': _resolved(paths), 'stem': stem})[:16]}"

    @staticmethod
    def _check_paths(paths: Sequence[str | os.PathLike]) -> list[Path]:
        if not paths:
            raise ChatforgeError("no documents given for retrieval; pass files or folders (--docs)")
        out = [Path(p).expanduser() for p in paths]
        for p in out:
            if not p.exists():
                raise ChatforgeError(f"document path {p} does not exist; pass existing files or folders")
        return out

    @classmethod
    def build(cls, paths: Sequence[str | os.PathLike], cache_dir: str | os.PathLike | None = None,
              stem: bool = True) -> "PassageIndex":
        """Read, split and index the documents under `paths`; save the index under `cache_dir`
        (None: chatforge's cache, see `default_cache_dir`)."""
        paths = cls._check_paths(paths)
        fp = fingerprint(paths, stem)
        index = cls.from_passages(read_passages(paths), stem)
        folder = cls._folder(paths, cache_dir, stem)
        try:
            with files.atomic_dir(folder) as tmp:
                index.retriever.save(str(tmp / "bm25"), show_progress=False)
                if index.heading_retriever is not None:
                    index.heading_retriever.save(str(tmp / "bm25-heading"), show_progress=False)
                with files.atomic_open(tmp / "passages.jsonl") as f:
                    for p in index.passages:
                        f.write(json.dumps({"text": p.text, "source": p.source, "doc": p.doc,
                                            "section": p.section, "title": p.title}, ensure_ascii=False) + "\n")
                files.write_json(tmp / "meta.json", {"fingerprint": fp, "paths": _resolved(paths),
                                                     "passages": len(index)})
            _prune(folder.parent)
        except OSError:
            # A cache folder that cannot be written: the index in memory still works, it is just
            # not cached, and the next run builds it again.
            pass
        return index

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "PassageIndex":
        import bm25s  # lazy: ~0.2 s, only when an index is loaded (see _stopwords)

        folder = Path(folder)
        meta = files.read_json(folder / "meta.json")
        passages = []
        with open(folder / "passages.jsonl", encoding="utf-8") as f:
            for line in f:
                d = json.loads(line)
                passages.append(Passage(d["text"], d["source"], doc=d["doc"], section=d["section"], title=d["title"]))
        retriever = bm25s.BM25.load(str(folder / "bm25"), load_corpus=False)
        heading = None
        if (folder / "bm25-heading").is_dir():
            heading = bm25s.BM25.load(str(folder / "bm25-heading"), load_corpus=False)
        return cls(passages, retriever, meta["fingerprint"]["stem"], heading)

    @classmethod
    def load_or_build(cls, paths: Sequence[str | os.PathLike], cache_dir: str | os.PathLike | None = None,
                      stem: bool = True) -> "PassageIndex":
        """The cached index when its inputs are unchanged, else a fresh `build` (`cache_dir`
        None: chatforge's cache folder)."""
        paths = cls._check_paths(paths)
        folder = cls._folder(paths, cache_dir, stem)
        try:
            meta = files.read_json(folder / "meta.json")
            if meta.get("fingerprint") == fingerprint(paths, stem):
                return cls.load(folder)
        except (OSError, ValueError, KeyError):
            pass   # missing or damaged cache: rebuild it
        return cls.build(paths, cache_dir, stem)

    # ---- search ------------------------------------------------------------------------------

    def scores(self, query: str) -> np.ndarray:
        """The score of every passage for `query`: BM25 on the passage plus `heading_weight` times
        BM25 on its heading (zeros when no query term is in the index)."""
        q = terms(query, self.stem)
        n = len(self.passages)
        out = _bm25_scores(self.retriever, q, n)
        if self.heading_weight:
            out = out + self.heading_weight * _bm25_scores(self.heading_retriever, q, n)
        return out

    def _ranked(self, scores: np.ndarray, candidates: Iterable[int] | None, k: int) -> list[Passage]:
        ids = np.arange(len(scores)) if candidates is None else np.fromiter(candidates, dtype=np.int64)
        # Stable sort on -score: ties keep document order, so results are deterministic.
        order = ids[np.argsort(-scores[ids], kind="stable")][:k]
        out = []
        for i in order:
            p = self.passages[int(i)]
            out.append(Passage(p.text, p.source, float(scores[i]), p.doc, p.section, p.id, p.title))
        return out

    def search(self, query: str, k: int = 3, exclude_docs: Iterable[str] = ()) -> list[Passage]:
        """The `k` best passages for `query`, best first (passages of `exclude_docs` left out)."""
        scores = self.scores(query)
        excluded = set(exclude_docs)
        candidates = None
        if excluded:
            candidates = [i for i, p in enumerate(self.passages) if p.doc not in excluded]
        return self._ranked(scores, candidates, k)

    def doc_passages(self, doc: str) -> list[Passage]:
        return [self.passages[i] for i in self._by_doc.get(doc, ())]

    def matching_docs(self, source: str) -> list[str]:
        """The indexed doc ids a `source` field names, in index order.

        A source matches a doc when they are equal, when one is the other's path under another
        source name ("docs/faq.md" vs "my_docs/faq.md"), or when it names a whole source
        ("git-faq" matches every "git-faq/..." doc).
        """
        if source in self._by_doc:
            return [source]
        source = source.strip("/")
        tail = source.split("/", 1)[-1]
        return [doc for doc in self._by_doc
                if doc.startswith(source + "/") or doc.endswith("/" + source) or source.endswith("/" + doc)
                or ("/" in source and doc.split("/", 1)[-1] == tail)]

    def find_doc(self, source: str) -> str | None:
        """The first indexed doc id that `source` names (see `matching_docs`), or None."""
        docs = self.matching_docs(source)
        return docs[0] if docs else None

    def best_in_docs(self, docs: Iterable[str], query: str) -> Passage | None:
        """The passage of `docs` that matches `query` best (the first one on a tie), or None."""
        ids = [i for d in docs for i in self._by_doc.get(d, ())]
        if not ids:
            return None
        return self._ranked(self.scores(query), sorted(ids), 1)[0]


# --------------------------------------------------------------------------- prompt format

