"""Passages: documents cut along their own structure, for retrieval.

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
"""

from __future__ import annotations

import gzip
import html
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Sequence

from chatforge.data.clean import MD_FENCE, MD_HEADING, md_inline, normalize, scrub_pii, strip_html, strip_markup
from chatforge.data.sources import file_format, iter_files, read_file

MAX_WORDS = 200                      # longest prose passage (a FAQ entry is kept whole)


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
_ADOC_HEADING = re.compile(r"^={1,5}\s+(\S.*?)\s*$")            # "== Title" (AsciiDoc, also Markdown-like)
_ADOC_ATTRIBUTE = re.compile(r"^\s*\[\[?[^\[\]\n]*\]\]?\s*$")      # "[[anchor]]", "[preface]"


def _adoc_heading(para: str) -> tuple[str, str] | None:
    """(heading, rest) when a paragraph opens with an AsciiDoc heading ("=== Title", under
    optional "[[anchor]]" / "[preface]" lines, as git's manuals write them), else None."""
    lines = para.split("\n")
    while len(lines) > 1 and _ADOC_ATTRIBUTE.match(lines[0]):
        lines = lines[1:]
    m = _ADOC_HEADING.match(lines[0])
    return (_one_line(m.group(1)), "\n".join(lines[1:])) if m and len(m.group(1).split()) <= 16 else None


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

SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_ITEM = re.compile(r"^\s*(?:\d{1,3}[.)]|[-*+\u2022]|\(?[a-z]\)|step\s+\d+[.:)]?)\s+\S", re.I)


def _words(text: str) -> int:
    return len(text.split())


def _indent(para: str) -> int:
    return len(para) - len(para.lstrip())


def _sentences(para: str, max_words: int) -> list[str]:
    """A paragraph's sentences (a sentence longer than `max_words` words cut at words)."""
    out = []
    for sentence in SENTENCE_END.split(para.strip()):
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
    # A plain-text document written in AsciiDoc declares its headings ("== Title"): only those
    # count, so a short line of a code listing is not taken for one.
    adoc = headings is None and sum(_adoc_heading(p) is not None for p in paragraphs) >= 2
    for i, para in enumerate(paragraphs):
        found: tuple[str, str] | None
        if headings is not None:
            line = _one_line(para)
            found = (line, "") if line in headings else None
            if found is None and _POD_HEAD.match(para) and len(line.split()) > 1:
                found = (line.split(None, 1)[1], "")    # strip_pod leaves a few "=head2 ..." lines
        else:
            found = _adoc_heading(para) if adoc else _text_heading(para, first=i == 0)
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

