"""Retrieval: answers grounded in the company's documents.

A small model cannot memorise a manual, so the assistant answers from passages retrieved for
each question. This module holds the passage index, the grounded prompt format and the grounded
SFT examples that teach a model that format.

    index = PassageIndex.load_or_build([Path("examples/my_docs")])   # cached in ~/.cache/chatforge/index
    hits = index.search("How do I reset my password?", k=3)         # [Passage(text, source, score), ...]
    messages = grounded_messages("How do I reset my password?", hits, tokenizer=tok)

Passages
--------
Documents are read with the data stage's readers (`chatforge.data.sources`, every format it
reads) and cut along their own structure:
- A FAQ (`Document.pairs`: Markdown `## Question?` FAQs, the Debian, Python, Perl and git FAQs)
  gives one passage per entry: its question is the passage's section and its whole answer the
  text, however long. JSONL/CSV question/answer files are read the same way. A FAQ in markup
  (Markdown, rst, POD) also gives its other sections (an introduction, "Contact") as below; a
  plain-text one (Debian, git) only its entries: outside them is a title page and a table of
  contents. Chat transcripts are not reference material and are not indexed.
- Other documents are cut into sections at their headings: for Markdown, reStructuredText, POD
  and HTML the headings the markup declares (`markup_headings`); for plain text a short
  one-line paragraph (at most 12 words, 16 when numbered like "1.2. Title") that starts with a
  capital or a digit, at the left margin, and does not end in . , ; or :, or a line underlined
  with === / --- . A section of at most MAX_WORDS (200) words is one passage; a longer one is
  cut between paragraphs into passages of about equal size, never more than MAX_WORDS (a single
  longer paragraph is cut between sentences). Numbered steps and bullet items in a row, with
  what is indented under them, stay in one block, and so does a paragraph ending in ":" with
  the one it introduces; a block is only cut when it alone is longer than MAX_WORDS.
- Each passage carries its document's `title` (the line under a NAME heading, as in POD and
  man pages, without its "name - " prefix; else the heading that opens the document) and its
  `section` (the nearest heading).
  `doc` is the document's source id ("<source name>/<relative path>", the same id the data
  stage writes in the `source` field of its JSONL lines) and `source`, the name shown to the
  model and the user, is "DOC > TITLE > SECTION" (a missing or repeated part left out).
Passage text is normalised and PII-scrubbed like the corpus.

Ranking
-------
BM25 (`bm25s`, Lucene variant) over lower-cased words of two or more characters, English
stopwords removed, Porter-stemmed, on two fields: the passage (title, section and text) and its
heading alone (title and section). A passage scores `bm25(passage) + HEADING_WEIGHT *
bm25(heading)`, so a question whose words are those of a heading (a FAQ question, a manual's
"Configuring the proxy") finds that section first. `benchmarks/bench_retrieval.py` measures
the choices (hit@1 / hit@3 on the demo's validation questions and the unseen git FAQ).

Index and cache
---------------
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
import gzip
import hashlib
import html
import json
import math
import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Sequence

import numpy as np

from chatforge import files
from chatforge.data.clean import MD_FENCE, MD_HEADING, md_inline, normalize, scrub_pii, strip_html, strip_markup
from chatforge.data.fetch import default_cache
from chatforge.data.sources import file_format, file_stats, iter_files, read_file
from chatforge.errors import ChatforgeError

GROUNDED_SYSTEM_PROMPT = (
    "You are a support assistant. Answer the question using only the context below. "
    "If the context does not contain the answer, say that you could not find it in the "
    "documentation. End your answer with the source you used, as (source: NAME)."
)
NOT_FOUND_REPLY = ("I could not find that in the documentation I have. "
                   "Please rephrase the question or contact a support agent.")
DEFAULT_CONTEXT_TOKENS = 320
MAX_WORDS = 200                      # longest prose passage (a FAQ entry is kept whole)
HEADING_WEIGHT = 1.0                 # weight of the heading field's BM25 score (bench_retrieval.py)
MIN_CUT_TOKENS = 16                  # a truncated passage shorter than this is dropped instead
INDEX_DIR = "index"                  # the indexes' folder inside chatforge's cache
FORMAT_VERSION = 2
# A reply's citation, "(source: NAME)"; NAME may hold balanced parentheses; "(Source: ...)" counts too.
_CITATION_TEXT = r"(?i:\(source:)[^()]*(?:\([^()]*\)[^()]*)*\)"
_CITATION = re.compile(r"\s*" + _CITATION_TEXT + r"\s*$")
# Generation from a grounded prompt ends with the first citation (`GenerationConfig.stop_after`):
# the prompt asks the answer to end there, and a model that goes on runs into the next passage's
# text. A line that starts like the context's own lines ("[1] (source: ...)", a plugin's
# "- [orders] (source: ...)") is context copied into the reply: its citations do not end it.
CITATION_END = r"(?m)^(?!(?:- )?\[[^\]\n]*\] \((?i:source:))[^\n]*?" + _CITATION_TEXT


@dataclass
class Passage:
    """A piece of a document: `text`, display `source`, BM25 `score` (0 until searched), `doc` id,
    its `section` heading and its document's `title`."""

    text: str
    source: str
    score: float = 0.0
    doc: str = ""
    section: str = ""
    id: int = -1      # position in the index
    title: str = ""

    @property
    def heading(self) -> str:
        """Title and section, as ranked in the heading field (a repeated part once)."""
        return " ".join(_distinct(self.title, self.section))


def _distinct(*parts: str) -> list[str]:
    """The non-empty `parts`, each left out when it repeats the one before (case-insensitive)."""
    out: list[str] = []
    for p in parts:
        if p and (not out or p.lower() != out[-1].lower()):
            out.append(p)
    return out


def source_name(doc: str, title: str = "", section: str = "") -> str:
    """The name a passage is cited by: "DOC > TITLE > SECTION", a missing or repeated part left out."""
    return " > ".join([doc, *_distinct(title, section)])


# --------------------------------------------------------------------------- headings

_RST_UNDERLINE = re.compile(r"""^([=\-`:'"~^_*+#<>.])\1{2,}\s*$""")
_POD_HEAD = re.compile(r"^=head\d\s+(.+)", re.M)
_HTML_HEAD = re.compile(r"<(h[1-6]|title)\b[^>]*>(.*?)</\1\s*>", re.I | re.S)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def markup_headings(raw: str, fmt: str) -> set[str]:
    """The headings a Markdown, reStructuredText, POD or HTML source declares, as they read in
    the plain text `strip_markup` makes of it (whitespace collapsed, before `normalize`)."""
    found: list[str] = []
    lines = raw.replace("\r\n", "\n").split("\n")
    if fmt == "md":
        fenced = False
        for i, line in enumerate(lines):
            if MD_FENCE.match(line):
                fenced = not fenced
            elif not fenced:
                m = MD_HEADING.match(line)
                if m:
                    found.append(md_inline(m.group(1)))
                elif i and lines[i - 1].strip() and re.match(r"^(=+|-+)\s*$", line) and len(line.strip()) >= 3:
                    found.append(md_inline(lines[i - 1]))      # a setext heading
    elif fmt == "rst":
        for i in range(len(lines) - 1):
            title, under = lines[i], lines[i + 1]
            if not title.strip() or _RST_UNDERLINE.match(title) or not _RST_UNDERLINE.match(under):
                continue
            overlined = i > 0 and _RST_UNDERLINE.match(lines[i - 1]) is not None
            # A title is underlined at least as long as itself; only an overlined one is indented.
            if len(under.rstrip()) >= len(title.strip()) and (overlined or not title[0].isspace()):
                found.append(strip_markup(title, "rst"))
    elif fmt == "pod":
        found += [strip_markup(f"=head1 {m.group(1)}", "pod") for m in _POD_HEAD.finditer(raw)]
    elif fmt == "html":
        found += [strip_html(m.group(2)) if m.group(1).lower() != "title" else html.unescape(m.group(2))
                  for m in _HTML_HEAD.finditer(raw)]
    return {h for h in map(_one_line, found) if h}


_NUMBERED = re.compile(r"^\d+(\.\d+)*\.?\s")
_UNDERLINE = re.compile(r"^\s*([=\-~^*#+])\1{2,}\s*$")


def _text_heading(para: str, first: bool) -> tuple[str, str] | None:
    """(heading, the rest of the paragraph) when a plain-text paragraph opens with a heading:
    a line underlined with === or ---, or one short line at the left margin (the document's
    first paragraph may be indented: a centred title); else None."""
    lines = para.split("\n")
    if len(lines) >= 2 and _UNDERLINE.match(lines[1]) and lines[0].strip():
        return _one_line(lines[0]), "\n".join(lines[2:])
    if len(lines) != 1 or (para[:1].isspace() and not first):
        return None
    line = para.strip().lstrip("#").strip()
    numbered = bool(_NUMBERED.match(line))
    if not line or not (line[0].isupper() or line[0].isdigit()) or line.endswith((".", ",", ";", ":")):
        return None
    return (line, "") if len(line.split()) <= (16 if numbered else 12) and len(line) <= 120 else None


# --------------------------------------------------------------------------- splitting

_TOKEN = re.compile(r"(?u)\b\w\w+\b")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_ITEM = re.compile(r"^\s*(?:\d{1,3}[.)]|[-*+\u2022]|\(?[a-z]\)|step\s+\d+[.:)]?)\s+\S", re.I)


def _words(text: str) -> int:
    return len(text.split())


def _indent(para: str) -> int:
    return len(para) - len(para.lstrip())


def _sentences(para: str, max_words: int) -> list[str]:
    """A paragraph's sentences (a sentence longer than `max_words` words cut at words)."""
    out = []
    for sentence in _SENTENCE_END.split(para.strip()):
        words = sentence.split()
        out += [" ".join(words[i:i + max_words]) for i in range(0, len(words), max_words)]
    return out


def _blocks(paragraphs: list[str]) -> list[list[str]]:
    """Paragraphs grouped into blocks that are kept together: a run of numbered steps or bullet
    items with what is indented under them, and a paragraph ending in ":" with the next one."""
    blocks: list[list[str]] = []
    item_indent = -1                 # indentation of the current block's list items, -1: no list
    for para in paragraphs:
        item = _ITEM.match(para) is not None
        if blocks and (blocks[-1][-1].rstrip().endswith(":")
                       or item_indent >= 0 and (item or _indent(para) > item_indent)):
            blocks[-1].append(para)
            if item and item_indent < 0:
                item_indent = _indent(para)
            continue
        blocks.append([para])
        item_indent = _indent(para) if item else -1
    return blocks


def _pack(blocks: list[list[str]], max_words: int) -> list[str]:
    """The texts of one section's passages: the whole section when it fits in `max_words`, else
    consecutive blocks in passages of about equal size; a block too long alone is cut between
    its paragraphs, and a paragraph too long alone between its sentences."""
    units: list[tuple[str, int, int]] = []     # (text, words, paragraph number): the pieces packed
    for block in blocks:
        text = "\n".join(block)
        if _words(text) <= max_words:
            units.append((text, _words(text), len(units)))
            continue
        for para in block:
            number = len(units)
            pieces = [para] if _words(para) <= max_words else _sentences(para, max_words)
            units += [(piece, _words(piece), number) for piece in pieces]
    # Cut points that minimise the sum of squared shortfalls (max_words - passage words): few,
    # full passages of about equal size, and no short leftover at the end (word-wrap's rule).
    ends = [0]
    for _, n, _ in units:
        ends.append(ends[-1] + n)
    cost, cut = [0.0] + [math.inf] * len(units), [0] * (len(units) + 1)
    for j in range(1, len(units) + 1):
        i = j - 1
        while i >= 0 and (ends[j] - ends[i] <= max_words or i == j - 1):
            c = cost[i] + (max_words - (ends[j] - ends[i])) ** 2
            if c < cost[j]:
                cost[j], cut[j] = c, i
            i -= 1
    bounds, j = [], len(units)
    while j > 0:
        bounds.append((cut[j], j))
        j = cut[j]
    passages = [units[i:j] for i, j in reversed(bounds)]
    out = []
    for group in passages:
        text = group[0][0]
        for (piece, _, number), (_, _, before) in zip(group[1:], group):
            text += (" " if number == before else "\n") + piece    # sentences of one paragraph: one line
        out.append(text)
    return out


def _paragraphs(text: str) -> list[str]:
    return [p.rstrip() for p in re.split(r"\n[ \t]*\n", text) if p.strip()]


def _sections(paragraphs: list[str], headings: Collection[str] | None) -> list[tuple[str, list[str]]]:
    """[(heading, body paragraphs)] in order; the text before the first heading has heading ""."""
    sections: list[tuple[str, list[str]]] = [("", [])]
    for i, para in enumerate(paragraphs):
        found: tuple[str, str] | None
        if headings is not None:
            line = _one_line(para)
            found = (line, "") if line in headings else None
            if found is None and _POD_HEAD.match(para) and len(line.split()) > 1:
                found = (line.split(None, 1)[1], "")    # strip_pod leaves a few "=head2 ..." lines
        else:
            found = _text_heading(para, first=i == 0)
        if found is None:
            sections[-1][1].append(para)
            continue
        heading, rest = found
        sections.append((heading, [rest] if rest.strip() else []))
    return sections


def _title(sections: list[tuple[str, list[str]]], doc: str) -> str:
    """The document's title: the line under a NAME heading (POD, man pages) without its
    "name - " prefix, else the heading that opens the document, else ""."""
    for heading, body in sections:
        if heading == "NAME" and body:
            name = _one_line(body[0])
            stem = Path(doc).name.split(".")[0]
            return name.split(" - ", 1)[1] if name.lower().startswith(stem.lower() + " - ") else name
    return sections[1][0] if len(sections) > 1 and not sections[0][1] else ""


def split_passages(text: str, doc: str, headings: Collection[str] | None = None,
                   max_words: int = MAX_WORDS) -> list[Passage]:
    """Passages of one document's plain text (see the module docstring for the rules).

    `headings`: the headings its markup declares (`markup_headings`, whitespace collapsed); None
    for plain text, whose headings are recognised by their look.
    """
    sections = _sections(_paragraphs(text), headings)
    title = _title(sections, doc)
    out: list[Passage] = []
    for heading, body in sections:
        if heading == "NAME" and title and _one_line(body[0] if body else "").endswith(title):
            body = body[1:]                       # POD's NAME line is the title, not content
        for piece in _pack(_blocks(body), max_words) if body else ():
            out.append(Passage(piece, source_name(doc, title, heading), doc=doc, section=heading, title=title))
    return out


# --------------------------------------------------------------------------- reading

def _clean(text: str) -> str:
    return scrub_pii(normalize(text))[0]


def _raw_text(path: Path) -> str:
    """A file's text for finding its headings (the readers have already judged it readable)."""
    data = path.read_bytes()
    if path.name.lower().endswith(".gz"):
        data = gzip.decompress(data)
    return data.decode("utf-8-sig", errors="replace")


def read_passages(paths: Sequence[Path]) -> list[Passage]:
    """Every passage of the documents under `paths`, in a deterministic order."""
    passages: list[Passage] = []
    for f in iter_files(list(paths)):
        fmt = file_format(f.path.name)
        headings: set[str] | None = None
        for d in read_file(f):
            if d.kind == "conversation" or not (d.text.strip() or d.pairs):
                continue
            if d.kind in ("text", "faq") and fmt in ("md", "rst", "pod", "html") and headings is None:
                headings = {_one_line(_clean(h)) for h in markup_headings(_raw_text(f.path), fmt)}
            if d.pairs:
                passages += _faq_passages(d.source, _clean(d.text), d.pairs, headings)
            else:
                passages += split_passages(_clean(d.text), d.source, headings)
    return passages


def _fold(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def _faq_passages(doc: str, text: str, pairs: list[tuple[str, str]], headings: set[str] | None) -> list[Passage]:
    """One passage per FAQ entry (the question its section, the whole answer its text), then,
    when the markup declares the headings, the sections that are not entries (an introduction)."""
    title = _title(_sections(_paragraphs(text), headings), doc) if text else ""
    out = []
    for q, a in pairs:
        q, a = _one_line(_clean(q)), _clean(a).strip()
        if q and a:
            out.append(Passage(a, source_name(doc, title, q), doc=doc, section=q, title=title))
    if headings is not None and text:
        # Plain-text FAQs (Debian, git) are left at their entries: their headings are guessed,
        # and what lies outside the entries is a title page and a table of contents.
        questions = {_fold(p.section) for p in out}
        out += [p for p in split_passages(text, doc, headings) if _fold(p.section) not in questions]
    return out


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
    return {"version": FORMAT_VERSION, "stem": stem, "max_words": MAX_WORDS, "files": file_stats(paths)}


def default_cache_dir() -> Path:
    """Where indexes are cached without `cache_dir`: CHATFORGE_CACHE/index (~/.cache/chatforge/index)."""
    return default_cache() / INDEX_DIR


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
    import bm25s

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
        import bm25s

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


def _shown_text(user_content: str, gold: Passage) -> str:
    """The answer's passage as a grounded prompt shows it (cut ones without their "..."), or ""."""
    mark = f"(source: {gold.source}) "
    for line in user_content.split("\n"):
        head, sep, text = line.partition(mark)
        if sep and head.startswith("[") and head.rstrip().endswith("]"):
            return text[:-3] if text.endswith("...") else text
    return ""


def copyable_answer(answer: str, shown: str) -> str | None:
    """`answer` if the prompt shows all of it, else its longest run of whole sentences from the
    start that the prompt shows, else None. Whitespace does not count (the context collapses it).

    A grounded reply must be copied from its context: an answer that runs on past a cut-off
    passage would teach the model to invent the rest.
    """
    visible = _norm(shown)
    if not visible:
        return None
    if _norm(answer) in visible:
        return answer.strip()
    for end in reversed([m.start() for m in _SENTENCE_END.finditer(answer)]):
        if _norm(answer[:end]) in visible:
            return answer[:end].strip()
    return None


def _norm(text: str) -> str:
    return " ".join(text.split())


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
    passage's source. When ANSWER is a verbatim part of its document (FAQ answers are) and the
    budget cut the passage, ANSWER is cut back to the whole sentences the prompt shows
    (`copyable_answer`), and a pair whose answer the prompt does not show at all gets no example:
    the reply is copied from the context, never continued past it. An answer written in other
    words than the document's (a support team's own Q&A) is kept whole. A seeded `missing_fraction` of the examples (rounded) instead get `k`
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
        messages = grounded_messages(q, passages, history=history,
                                     max_context_tokens=max_context_tokens, tokenizer=tokenizer)
        if i not in missing:
            answer = a
            if _norm(a) in _norm(gold.text):   # the answer is a verbatim part of its document
                answer = copyable_answer(a, _shown_text(messages[-1]["content"], gold))
                if answer is None:
                    continue
            reply = cite(answer, gold.source)
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
