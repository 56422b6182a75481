"""Retrieval: answers grounded in the company's documents.

A small model cannot memorise a manual, so the assistant answers from passages retrieved for
each question. This module holds the passage index, the grounded prompt format and the grounded
SFT examples that teach a model that format.

    index = PassageIndex.load_or_build([Path("examples/my_docs")])   # cached beside the folder
    hits = index.search("How do I reset my password?", k=3)         # [Passage(text, source, score), ...]
    messages = grounded_messages("How do I reset my password?", hits, tokenizer=tok)

Passages
--------
Documents are read with `chatforge.data.sources.read_documents` (every format the data stage
reads). Prose is split at blank lines into paragraphs; a paragraph that is a single short line
(at most 12 words) starting with a capital letter or digit and not ending in . , ; or : (a
heading, or a FAQ question) starts a new section and names it.
Paragraphs of one section are grouped into passages of about 80-200 words (a longer paragraph is
cut at sentence ends). Q&A-pair documents (JSONL/CSV question/answer files) give one passage per
pair ("question\\nanswer"); conversations (chat transcripts) are not reference material and are
not indexed. Passage text is normalised and PII-scrubbed like the corpus.
Each passage has `doc` (the document's source id, "<source name>/<relative path>", the same id
the data stage writes in the `source` field of its JSONL lines) and `source`, the name shown to
the model and the user: "DOC > SECTION" when the section is known, else "DOC".

Index and cache
---------------
BM25 (`bm25s`, Lucene variant) over lower-cased words of two or more characters, English
stopwords removed, Porter-stemmed. `PassageIndex.build(paths, cache_dir)` writes
`CACHE/passages-<hash of the paths>/` atomically: bm25s's own files (numpy arrays and JSON, no
pickle), `passages.jsonl` and `meta.json` with a fingerprint of the inputs (every file's path,
size and mtime, plus the chunking settings). `load_or_build` reuses it while the fingerprint is
unchanged and rebuilds it otherwise. The default cache folder is `.chatforge-index/` beside the
first input path.

The prompt format (fixed: the SFT examples and every caller use it)
--------------------------------------------------------------------
    system:  GROUNDED_SYSTEM_PROMPT, i.e.
             "You are a support assistant. Answer the question using only the context below.
              If the context does not contain the answer, say that you could not find it in the
              documentation. End your answer with the source you used, as (source: NAME)."
    ...history turns, if any, unchanged...
    user:    "Context:\\n[1] (source: NAME) TEXT\\n[2] (source: NAME) TEXT\\n\\nQuestion: QUESTION"
             ("Context:\\n(none)\\n\\nQuestion: ..." when no passage is given)
             TEXT is the passage with its whitespace collapsed (one line per passage).

The context block (from "Context:" to the last passage) is kept within `max_context_tokens`
(default 320), counted with the tokenizer's `encode` when one is given, else as characters / 4.
Passages are added best first; the first one that does not fit whole is cut at a word boundary
(ending in "...") if at least 16 tokens are left, and the rest are dropped.

Reply conventions (the SFT examples; `strip_citation` removes the citation before scoring)
--------------------------------------------------------------------------------------------
    context holds the answer:   "ANSWER (source: NAME)"   NAME = source of the answer's passage
    context lacks the answer:   NOT_FOUND_REPLY, exactly, with no citation:
        "I could not find that in the documentation I have. Please rephrase the question or
         contact a support agent."
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from chatforge import files
from chatforge.data.clean import normalize, scrub_pii
from chatforge.data.sources import file_stats, read_documents
from chatforge.errors import ChatforgeError

GROUNDED_SYSTEM_PROMPT = (
    "You are a support assistant. Answer the question using only the context below. "
    "If the context does not contain the answer, say that you could not find it in the "
    "documentation. End your answer with the source you used, as (source: NAME)."
)
NOT_FOUND_REPLY = ("I could not find that in the documentation I have. "
                   "Please rephrase the question or contact a support agent.")
DEFAULT_CONTEXT_TOKENS = 320
MIN_WORDS, MAX_WORDS = 80, 200       # passage size target
MIN_CUT_TOKENS = 16                  # a truncated passage shorter than this is dropped instead
CACHE_NAME = ".chatforge-index"
FORMAT_VERSION = 1
_CITATION = re.compile(r"\s*\(source:[^()]*(?:\([^()]*\)[^()]*)*\)\s*$")


@dataclass
class Passage:
    """A piece of a document: `text`, display `source`, BM25 `score` (0 until searched), `doc` id."""

    text: str
    source: str
    score: float = 0.0
    doc: str = ""
    section: str = ""
    id: int = -1      # position in the index


# --------------------------------------------------------------------------- splitting

_TOKEN = re.compile(r"(?u)\b\w\w+\b")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _is_heading(para: str) -> bool:
    """A one-line paragraph of a few words, capitalised, without closing punctuation (or a question)."""
    para = para.lstrip("#").strip()
    if "\n" in para or not para or not (para[0].isupper() or para[0].isdigit()):
        return False
    words = para.split()
    return 0 < len(words) <= 12 and len(para) <= 100 and not para.rstrip().endswith((".", ",", ";", ":"))


def _split_long(para: str) -> list[str]:
    """Cut a paragraph of more than MAX_WORDS words into pieces at sentence ends (else at words)."""
    pieces, current = [], []
    for sentence in _SENTENCE_END.split(para):
        words = sentence.split()
        while len(words) > MAX_WORDS:            # a sentence longer than a passage: cut at words
            if current:
                pieces.append(" ".join(current))
                current = []
            pieces.append(" ".join(words[:MAX_WORDS]))
            words = words[MAX_WORDS:]
        if current and len(current) + len(words) > MAX_WORDS:
            pieces.append(" ".join(current))
            current = []
        current += words
    if current:
        pieces.append(" ".join(current))
    return pieces


def split_passages(text: str, doc: str) -> list[Passage]:
    """Passages of one document's plain text (see the module docstring for the rules)."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    out: list[Passage] = []
    section, group, count = "", [], 0

    def flush() -> None:
        nonlocal group, count
        if group:
            name = f"{doc} > {section}" if section else doc
            out.append(Passage("\n".join(group), name, doc=doc, section=section))
        group, count = [], 0

    for para in paragraphs:
        if _is_heading(para):
            flush()
            section = " ".join(para.lstrip("#").split())
            continue
        for piece in (_split_long(para) if len(para.split()) > MAX_WORDS else [para]):
            n = len(piece.split())
            if group and count >= MIN_WORDS or group and count + n > MAX_WORDS:
                flush()
            group.append(piece)
            count += n
    flush()
    return out


# --------------------------------------------------------------------------- reading

def _clean(text: str) -> str:
    return scrub_pii(normalize(text))[0]


def read_passages(paths: Sequence[Path]) -> list[Passage]:
    """Every passage of the documents under `paths`, in a deterministic order."""
    passages: list[Passage] = []
    for d in read_documents(list(paths)):
        if d.kind == "conversation":
            continue
        if d.kind == "pairs":
            for q, a in d.pairs or ():
                passages.append(Passage(_clean(f"{q.strip()}\n{a.strip()}"), d.source, doc=d.source))
        elif d.text.strip():
            passages += split_passages(_clean(d.text), d.source)
    return passages


# --------------------------------------------------------------------------- BM25

@functools.lru_cache(maxsize=None)
def _stopwords() -> frozenset[str]:
    from bm25s.stopwords import STOPWORDS_EN
    return frozenset(STOPWORDS_EN)


@functools.lru_cache(maxsize=1)
def _stemmer() -> Callable[[str], str]:
    from nltk.stem.porter import PorterStemmer   # nltk comes with rouge-score
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
    return {"version": FORMAT_VERSION, "stem": stem, "words": [MIN_WORDS, MAX_WORDS], "files": file_stats(paths)}


def default_cache_dir(paths: Sequence[Path]) -> Path:
    first = Path(paths[0]).expanduser().resolve()
    return first.parent / CACHE_NAME


class PassageIndex:
    """BM25 over the passages of a set of documents. Build with `build` or `load_or_build`."""

    def __init__(self, passages: list[Passage], retriever: Any, stem: bool = True):
        self.passages, self.retriever, self.stem = passages, retriever, stem
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
    def from_passages(cls, passages: list[Passage], stem: bool = True) -> "PassageIndex":
        import bm25s

        if not passages:
            raise ChatforgeError("no passages to index: the documents hold no text "
                                 "(give folders or files of .txt, .md, .rst, .html, ... with --docs)")
        retriever = bm25s.BM25()
        retriever.index([terms(p.text, stem) for p in passages], show_progress=False)
        return cls(passages, retriever, stem)

    @staticmethod
    def _folder(paths: Sequence[Path], cache_dir: Path | None, stem: bool) -> Path:
        paths = [Path(p).expanduser() for p in paths]
        cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(paths)
        key = _hash({"paths": sorted(str(p.resolve()) for p in paths), "stem": stem})[:16]
        return cache_dir / f"passages-{key}"

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
        """Read, split and index the documents under `paths`; save the index in `cache_dir`."""
        paths = cls._check_paths(paths)
        fp = fingerprint(paths, stem)
        index = cls.from_passages(read_passages(paths), stem)
        folder = cls._folder(paths, cache_dir, stem)
        try:
            with files.atomic_dir(folder) as tmp:
                index.retriever.save(str(tmp / "bm25"), show_progress=False)
                with files.atomic_open(tmp / "passages.jsonl") as f:
                    for p in index.passages:
                        f.write(json.dumps({"text": p.text, "source": p.source, "doc": p.doc,
                                            "section": p.section}, ensure_ascii=False) + "\n")
                files.write_json(tmp / "meta.json", {"fingerprint": fp, "passages": len(index)})
        except OSError:
            # A read-only place for the cache: the index in memory still works, it is just not
            # cached, and the next run builds it again.
            pass
        return index

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "PassageIndex":
        import bm25s

        folder = Path(folder)
        meta = files.read_json(folder / "meta.json")
        passages = []
        with open(folder / "passages.jsonl", encoding="utf-8") as f:
            for line in f:
                d = json.loads(line)
                passages.append(Passage(d["text"], d["source"], doc=d["doc"], section=d.get("section", "")))
        retriever = bm25s.BM25.load(str(folder / "bm25"), load_corpus=False)
        return cls(passages, retriever, meta["fingerprint"]["stem"])

    @classmethod
    def load_or_build(cls, paths: Sequence[str | os.PathLike], cache_dir: str | os.PathLike | None = None,
                      stem: bool = True) -> "PassageIndex":
        """The cached index when its inputs are unchanged, else a fresh `build`."""
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
        """BM25 score of every passage for `query` (zeros when no query term is in the index)."""
        vocab = self.retriever.vocab_dict
        q = [t for t in terms(query, self.stem) if t in vocab]
        if not q:
            return np.zeros(len(self.passages), dtype=np.float32)
        return np.asarray(self.retriever.get_scores(q), dtype=np.float32)

    def _ranked(self, scores: np.ndarray, candidates: Iterable[int] | None, k: int) -> list[Passage]:
        ids = np.arange(len(scores)) if candidates is None else np.fromiter(candidates, dtype=np.int64)
        # Stable sort on -score: ties keep document order, so results are deterministic.
        order = ids[np.argsort(-scores[ids], kind="stable")][:k]
        out = []
        for i in order:
            p = self.passages[int(i)]
            out.append(Passage(p.text, p.source, float(scores[i]), p.doc, p.section, p.id))
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

def _counter(tokenizer: Any | None) -> Callable[[str], int]:
    if tokenizer is not None:
        return lambda s: len(tokenizer.encode(s))
    return lambda s: (len(s) + 3) // 4


def _cut(line: str, budget: int, count: Callable[[str], int]) -> str | None:
    """The longest word prefix of `line` + "..." within `budget` tokens (binary search), or None."""
    words = line.split(" ")
    lo, hi = 0, len(words)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(" ".join(words[:mid]) + "...") <= budget:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo]) + "..." if lo > 0 else None


def _context(passages: Sequence[Passage], max_context_tokens: int, tokenizer: Any | None) -> tuple[str, int]:
    """(the "Context:" block, how many passages it holds, whole or cut)."""
    count = _counter(tokenizer)
    block = "Context:"
    used = count(block)
    n = 0
    for p in passages:
        header = f"\n[{n + 1}] (source: {p.source}) "
        text = " ".join(p.text.split())   # one line per passage: compact and unambiguous
        cost = count(header + text)
        if used + cost <= max_context_tokens:
            block, used, n = block + header + text, used + cost, n + 1
            continue
        left = max_context_tokens - used - count(header)
        cut = _cut(text, left, count) if left >= MIN_CUT_TOKENS else None
        if cut is not None:
            block, n = block + header + cut, n + 1
        break
    return (block if n else block + "\n(none)"), n


def format_context(passages: Sequence[Passage], max_context_tokens: int = DEFAULT_CONTEXT_TOKENS,
                   tokenizer: Any | None = None) -> str:
    """The "Context:" block: numbered passages with their sources, within the token budget."""
    return _context(passages, max_context_tokens, tokenizer)[0]


def grounded_messages(question: str, passages: Sequence[Passage], system: str | None = None,
                      history: Sequence[dict] | None = None, max_context_tokens: int = DEFAULT_CONTEXT_TOKENS,
                      tokenizer: Any | None = None) -> list[dict]:
    """The conversation for one grounded question (see the module docstring for the format)."""
    context = format_context(passages, max_context_tokens, tokenizer)
    return [{"role": "system", "content": GROUNDED_SYSTEM_PROMPT if system is None else system},
            *[{"role": m["role"], "content": m["content"]} for m in history or ()],
            {"role": "user", "content": f"{context}\n\nQuestion: {question.strip()}"}]


def cite(answer: str, source: str) -> str:
    """`answer` with its citation: "ANSWER (source: NAME)"."""
    return f"{answer.strip()} (source: {source})"


def strip_citation(reply: str) -> str:
    """`reply` without a final "(source: ...)" citation (for scoring against plain references)."""
    return _CITATION.sub("", reply).strip()


# --------------------------------------------------------------------------- SFT examples

def _qa(item: Any) -> tuple[str, str, str | None, list[dict]]:
    """(question, answer, source, history) from a {"messages", "source"} or {"question", "answer"} dict."""
    if isinstance(item, (tuple, list)):
        q, a, *rest = item
        return q, a, rest[0] if rest else None, []
    if "messages" in item:
        msgs = item["messages"]
        last_a = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        last_q = max(i for i, m in enumerate(msgs[:last_a]) if m["role"] == "user")
        history = [m for m in msgs[:last_q] if m["role"] != "system"]
        return msgs[last_q]["content"], msgs[last_a]["content"], item.get("source"), history
    return item["question"], item["answer"], item.get("source"), []


def _keep_in_context(passages: list[Passage], gold: Passage, max_context_tokens: int, tokenizer: Any | None) -> None:
    """Move the answer's passage first (in place) if the token budget would cut it off."""
    position = next(j for j, p in enumerate(passages) if p.id == gold.id)
    if position >= _context(passages, max_context_tokens, tokenizer)[1]:
        passages.insert(0, passages.pop(position))


def grounded_sft_examples(qa_pairs: Iterable[Any], index: PassageIndex, k: int = 3,
                          missing_fraction: float = 0.15, seed: int = 0,
                          max_context_tokens: int = DEFAULT_CONTEXT_TOKENS,
                          tokenizer: Any | None = None) -> list[dict]:
    """SFT examples in the grounded format from Q&A pairs.

    For each pair whose `source` names indexed documents (see `PassageIndex.matching_docs`):
    retrieve `k` passages with the question; the answer's passage is the passage of those
    documents that best matches question + answer. Normal examples make sure it is in the context
    (if retrieval missed it, it replaces the last hit, at a seeded random position; if the token
    budget would cut it off, it moves first) and reply "ANSWER (source: NAME)" with NAME that
    passage's source. A seeded `missing_fraction` of the examples (rounded) instead get `k`
    passages from OTHER documents only and reply NOT_FOUND_REPLY. Pairs whose source is not
    indexed (chat transcripts) are skipped. Pairs are dicts as in qa_train.jsonl
    ({"messages", "source"}: the last user turn is the question, the last assistant turn the
    answer, earlier turns the history), {"question", "answer", "source"} dicts or
    (question, answer, source) tuples.
    Each example: {"messages": [system, *history, user, assistant], "source": doc, "missing": bool}.
    """
    if not 0 <= missing_fraction <= 1:
        raise ChatforgeError(f"missing_fraction must be in [0, 1], got {missing_fraction}")
    rng = random.Random(seed)
    usable = []
    for item in qa_pairs:
        q, a, source, history = _qa(item)
        docs = index.matching_docs(source) if source else []
        if docs and q.strip() and a.strip():
            usable.append((q, a, docs, history))
    n_missing = round(missing_fraction * len(usable))
    missing = set(rng.sample(range(len(usable)), n_missing))
    examples = []
    for i, (q, a, docs, history) in enumerate(usable):
        if i in missing:
            passages = index.search(q, k, exclude_docs=docs)
            reply = NOT_FOUND_REPLY
        else:
            passages = index.search(q, k)
            gold = index.best_in_docs(docs, f"{q}\n{a}")
            if all(p.id != gold.id for p in passages):
                passages = passages[:k - 1]
                passages.insert(rng.randint(0, len(passages)), gold)
            _keep_in_context(passages, gold, max_context_tokens, tokenizer)
            reply = cite(a, gold.source)
        messages = grounded_messages(q, passages, history=history,
                                     max_context_tokens=max_context_tokens, tokenizer=tokenizer)
        examples.append({"messages": messages + [{"role": "assistant", "content": reply}],
                         "source": docs[0] if i in missing else gold.doc, "missing": i in missing})
    return examples


def _first_sentences(text: str, max_words: int) -> str:
    """The longest run of whole sentences from the start of `text` within `max_words` words
    (at least the first `max_words` words when the first sentence alone is longer)."""
    out: list[str] = []
    count = 0
    for sentence in _SENTENCE_END.split(text):
        n = len(sentence.split())
        if out and count + n > max_words:
            break
        out.append(sentence)
        count += n
    reply = " ".join(out)
    return reply if count <= max_words else " ".join(reply.split()[:max_words])


def section_sft_examples(index: PassageIndex, n: int, k: int = 3, seed: int = 0,
                         max_context_tokens: int = DEFAULT_CONTEXT_TOKENS, tokenizer: Any | None = None,
                         max_reply_words: int = 120, exclude_docs: Iterable[str] = ()) -> list[dict]:
    """Reading-comprehension examples made from the documents alone, in the grounded format.

    Q&A pairs are few (hundreds), while a small model needs thousands of examples to learn to
    find the passage that answers and copy from it. The first passage of each named section
    gives one: the question asks about the section (a heading that is a question is asked as it
    is; only names of two or more words that one document alone uses, questions first), the
    context holds the passage among `k` retrieved for that question (at a seeded position; first
    if the budget would cut it), and the reply is the passage's opening sentences, copied as they
    appear in the context (at most `max_reply_words` words), with its citation. Up to `n`
    passages are drawn (seeded) from documents not in `exclude_docs`; a passage that does not fit
    the budget whole is skipped. Each example: {"messages", "source", "missing": False}.
    """
    rng = random.Random(seed)
    skip = set(exclude_docs)
    # A section name several documents share ("Examples", "Removed") does not say which passage
    # answers: only names unique to one document are asked about, questions ("How do I ...?") first.
    docs_of: dict[str, set] = {}
    for p in index.passages:
        docs_of.setdefault(p.section.lower(), set()).add(p.doc)
    # The first passage of each section: later ones continue it and do not answer from their start.
    first: dict[tuple[str, str], Passage] = {}
    for p in index.passages:
        first.setdefault((p.doc, p.section), p)
    named = [p for p in first.values() if p.section and p.doc not in skip and len(p.text.split()) >= 20
             and len(docs_of[p.section.lower()]) == 1 and len(p.section.split()) >= 2]
    rng.shuffle(named)
    named.sort(key=lambda p: not p.section.endswith("?"))
    count = _counter(tokenizer)
    templates = ("What does the documentation say about {}?", "Tell me about {}.", "{}", "How does {} work?")
    examples = []
    for gold in named:
        if len(examples) >= n:
            break
        section = gold.section.rstrip(":").strip()
        question = section if section.endswith("?") else rng.choice(templates).format(section)
        text = " ".join(gold.text.split())
        if count(f"Context:\n[1] (source: {gold.source}) {text}") > max_context_tokens:
            continue
        passages = [p for p in index.search(question, k) if p.id != gold.id][:k - 1]
        passages.insert(rng.randint(0, len(passages)), gold)
        _keep_in_context(passages, gold, max_context_tokens, tokenizer)
        messages = grounded_messages(question, passages, max_context_tokens=max_context_tokens, tokenizer=tokenizer)
        reply = cite(_first_sentences(text, max_reply_words), gold.source)
        examples.append({"messages": messages + [{"role": "assistant", "content": reply}],
                         "source": gold.doc, "missing": False})
    return examples
