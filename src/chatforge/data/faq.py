"""Question/answer pairs from FAQ documents in the formats the fetched sources ship.

    from chatforge.data.faq import extract_pairs
    pairs = extract_pairs(Path("gitfaq.txt"), text)   # [(question, answer), ...] or None

Known formats (detected from the file name first, then from the first lines of the text):

    Debian FAQ     the plain-text FAQ of the `debian-faq` package (debian-faq.en.txt[.gz]):
                   numbered headings "7.12. How do I put a package on hold?" at column 0, the
                   answer indented below. Sub-sections whose title is not a question ("8.1.1.
                   dpkg") are folded into the answer of the question they belong to.
    Python FAQ     reStructuredText (faq/*.rst.txt): section titles that are questions,
                   underlined with `---`/`===`; the answer is the body up to the next title.
    perlfaq        perlfaq1..9.pod: `=head2 How do I ...?` and the body up to the next =head.
    gitfaq         gitfaq.txt / gitfaq.adoc (asciidoc `[[anchor]]` + `Question?::` entries) or
                   the gitfaq.html that asciidoc renders (`<dt>`/`<dd>` pairs).

Answers come back as plain text with the markup stripped lightly (rst roles, pod formatting
codes, asciidoc inline markup); code blocks stay as indented text. Questions are one clean line.
Entries with an empty answer are skipped. Anything else returns `None`, after looking at little
more than the file name, so `extract_pairs` can be called on every input file of a build.
"""

from __future__ import annotations

import html
import re
import textwrap
from html.parser import HTMLParser
from pathlib import Path
from typing import Callable

from chatforge.data.clean import MD_FENCE, MD_HEADING, md_inline

Pairs = list[tuple[str, str]]


def extract_pairs(path: Path, text: str) -> Pairs | None:
    """The (question, answer) pairs of `text` if it is a FAQ in a known format, else None.

    `path` is only used to recognise the format (its name; a trailing `.gz` is ignored).
    A FAQ in which no entry has an answer is also `None`: it is then just a document.
    """
    parser = _detect(Path(path), text)
    if parser is None:
        return None
    # Non-breaking spaces appear in the rendered FAQs (e.g. "Chapter\xa01."); they would
    # defeat the layout rules below and are never wanted in training text.
    text = text.replace("\r\n", "\n").replace("\xa0", " ")
    pairs = []
    for q, a in parser(text):
        q = _one_line(q)
        a = _tidy(a)
        if q and a:
            pairs.append((q, a))
    return pairs or None


# ---------------------------------------------------------------------------------------------
# Format detection: cheap checks on the name and the first couple of kilobytes only.

def _detect(path: Path, text: str) -> Callable[[str], Pairs] | None:
    name = path.name.lower().removesuffix(".gz")
    head = text[:2000]
    if name.endswith(".pod"):
        if re.match(r"perlfaq\d+\.pod$", name) or re.search(r"^perlfaq\d+ - ", head, re.M):
            return _pod_pairs
        return None
    if name.startswith("gitfaq") or "gitfaq - Frequently asked questions" in head:
        if name.endswith((".html", ".htm", ".xhtml")):
            return _gitfaq_html_pairs
        if name.endswith((".txt", ".adoc", ".asciidoc")) or "." not in name:
            return _gitfaq_pairs
        return None
    if name.endswith((".rst", ".rst.txt")):
        folder = path.parent.name.lower()
        if "faq" in name or folder == "faq" or re.search(r"\bFAQ\b", head[:600]):
            return _rst_pairs
        return None
    if name.endswith(".txt") or "." not in name:
        if name.startswith("debian-faq") or "The Debian GNU/Linux FAQ" in head:
            return _debian_pairs
    if name.endswith((".md", ".markdown")):
        # A company's own FAQ is most often Markdown with one question per heading.
        if len(_MD_QUESTION.findall(text)) >= 2:
            return _md_pairs
    return None


# ---------------------------------------------------------------------------------------------
# Shared clean-up.

def _one_line(s: str) -> str:
    return " ".join(s.split())


def _tidy(s: str) -> str:
    """Drop trailing spaces, collapse runs of blank lines, strip the ends (keep indentation)."""
    lines = [line.rstrip() for line in s.split("\n")]
    out: list[str] = []
    for line in lines:
        if not line and (not out or not out[-1]):
            continue
        out.append(line)
    return textwrap.dedent("\n".join(out)).strip("\n").rstrip()


# ---------------------------------------------------------------------------------------------
# Debian FAQ (plain text rendered from DocBook).

_DEB_HEADING = re.compile(r"^(\d+(?:\.\d+)+)\. (\S.*)$")
_DEB_CHAPTER = re.compile(r"^(?:Chapter|Appendix) \S+\. ")


def _debian_pairs(text: str) -> Pairs:
    lines = text.split("\n")
    # The table of contents repeats every heading at column 0; the body starts at "Chapter 1.".
    start = next((i for i, line in enumerate(lines) if line.startswith("Chapter 1.")), 0)
    sections: list[tuple[str, str, list[str]]] = []   # (number, title, body lines)
    body: list[str] | None = None
    i = start
    while i < len(lines):
        line = lines[i]
        m = _DEB_HEADING.match(line)
        if m:
            # A long title wraps onto more unindented lines, up to the first blank line.
            title = [m.group(2)]
            i += 1
            while i < len(lines) and lines[i].strip() and not lines[i][:1].isspace():
                title.append(lines[i])
                i += 1
            body = []
            sections.append((m.group(1), " ".join(title), body))
            continue
        if _DEB_CHAPTER.match(line):
            body = None                                  # chapter intros are not answers
        elif body is not None:
            body.append(line)
        i += 1

    return _debian_assemble(sections)


def _debian_assemble(sections: list[tuple[str, str, list[str]]]) -> Pairs:
    """Questions with their bodies; a non-question sub-section ("8.1.1. dpkg" under "8.1. What
    programs does Debian provide ...?") is appended to the answer of its parent question."""
    pairs: Pairs = []
    open_number: str | None = None
    for number, title, body_lines in sections:
        body = textwrap.dedent("\n".join(body_lines)).strip("\n")
        if "?" in title:
            pairs.append((title, body))
            open_number = number
        elif open_number is not None and number.startswith(open_number + "."):
            q, a = pairs[-1]
            pairs[-1] = (q, f"{a}\n\n{title}\n\n{body}")
        else:
            open_number = None
    return pairs


# ---------------------------------------------------------------------------------------------
# reStructuredText (the Python FAQ).

_RST_ADORN = re.compile(r"^([=\-~^\"'`#*+.:_])\1{2,}\s*$")
_RST_ROLE = re.compile(r":[\w.+-]+(?::[\w.+-]+)*:`([^`]+)`")
_RST_LINK = re.compile(r"`([^`<]+?)\s*<[^>`]+>`__?")
_RST_REF = re.compile(r"`([^`]+)`__?")
_RST_LITERAL = re.compile(r"``((?:(?!``)[\s\S])+?)``")
_RST_STRONG = re.compile(r"\*\*((?:(?!\*\*)[\s\S])+?)\*\*")
_RST_EMPH = re.compile(r"(?<![\w*])\*(\S(?:[^*]*?\S)?)\*(?![\w*])")
_RST_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::\s*(.*)$")
_RST_COMMENT = re.compile(r"^(\s*)\.\.(?:\s|$)")
# Directives whose content is prose: drop the directive line and keep the content unindented.
_RST_UNWRAP = {"note": "Note:", "warning": "Warning:", "seealso": "See also:", "important": "Important:",
               "tip": "Tip:", "caution": "Caution:", "attention": "Attention:", "hint": "Hint:",
               "versionadded": "New in version", "versionchanged": "Changed in version",
               "deprecated": "Deprecated since version", "only": "", "impl-detail": "",
               "admonition": ""}
# Directives whose content is code: keep the content as an indented block.
_RST_CODE = {"code-block", "code", "sourcecode", "doctest", "testcode", "productionlist"}


def _rst_role(m: re.Match) -> str:
    content = m.group(1)
    target = re.match(r"(.*?)\s*<[^>]*>$", content, re.S)
    if target and target.group(1):
        return target.group(1)
    content = content.lstrip("!")
    if content.startswith("~"):                          # :func:`~a.b.c` displays as c
        content = content[1:].rsplit(".", 1)[-1]
    return content


def _rst_inline(s: str, prose: bool = True) -> str:
    s = _RST_ROLE.sub(_rst_role, s)
    s = _RST_LINK.sub(r"\1", s)
    s = _RST_LITERAL.sub(r"\1", s)
    s = _RST_REF.sub(r"\1", s)
    if prose:
        s = _RST_STRONG.sub(r"\1", s)
        s = _RST_EMPH.sub(r"\1", s)
    return s


def _rst_titles(lines: list[str]) -> list[tuple[int, int, str, bool]]:
    """(first line, body start, underline char, overlined) of every section title."""
    titles = []
    for i in range(len(lines) - 1):
        title, under = lines[i], lines[i + 1]
        if not title.strip() or title[0].isspace() or _RST_ADORN.match(title):
            continue
        if not _RST_ADORN.match(under) or len(under.rstrip()) < len(title.rstrip()) - 1:
            continue
        over = i > 0 and lines[i - 1].strip() == under.strip()
        titles.append((i - 1 if over else i, i + 2, under[0], over))
    return titles


def _rst_pairs(text: str) -> Pairs:
    lines = text.split("\n")
    titles = _rst_titles(lines)
    # The question level is the underline used by the titles that are questions; other titles
    # at that level are entries too ("I try to use __spam and I get an error ...").
    question_chars = [ch for start, _, ch, over in titles if not over and "?" in lines[start]]
    level = max(set(question_chars), key=question_chars.count) if question_chars else None
    pairs: Pairs = []
    for n, (start, body_start, ch, over) in enumerate(titles):
        title = lines[start + 1] if over else lines[start]
        if over or not ("?" in title or ch == level):
            continue
        end = titles[n + 1][0] if n + 1 < len(titles) else len(lines)
        pairs.append((_rst_inline(title), _rst_body(lines[body_start:end])))
    return pairs


_LITERAL_MARK = "\x00"                                  # marks code lines while a body is built


def _rst_body(lines: list[str]) -> str:
    """Plain text of an rst body: directives resolved, inline markup stripped, code kept."""
    out: list[str] = []
    i = 0
    literal_indent: int | None = None                  # inside a literal (code) block
    while i < len(lines):
        line = lines[i]
        indent = len(line) - len(line.lstrip())
        if literal_indent is not None:
            if line.strip() and indent <= literal_indent:
                literal_indent = None
            else:
                out.append(_LITERAL_MARK + line)
                i += 1
                continue
        m = _RST_DIRECTIVE.match(line)
        if m or _RST_COMMENT.match(line):
            base = len((m or _RST_COMMENT.match(line)).group(1))
            block_end = i + 1
            while block_end < len(lines) and (not lines[block_end].strip()
                                             or len(lines[block_end]) - len(lines[block_end].lstrip()) > base):
                block_end += 1
            block = lines[i + 1:block_end]
            name = m.group(2).split(":")[-1] if m else ""
            if m and name in _RST_CODE:
                out.append("")
                code = textwrap.dedent("\n".join(b for b in block if not b.strip().startswith(":")))
                out.extend(_LITERAL_MARK + "    " + c for c in code.split("\n"))
            elif m and name in _RST_UNWRAP:
                label = " ".join(x for x in (_RST_UNWRAP[name], _rst_inline(m.group(3))) if x)
                if label:
                    out.append(" " * base + label)
                # The content is a body of its own; it comes back as plain text, so it is marked
                # to keep the inline pass below from stripping it a second time.
                inner = _rst_body(textwrap.dedent("\n".join(block)).split("\n"))
                out.extend(_LITERAL_MARK + line for line in inner.split("\n"))
            # everything else (index, contents, toctree, labels, comments...) is dropped
            i = block_end
            continue
        stripped = line.rstrip()
        if stripped.endswith("::"):
            # "Example::" introduces a literal block and reads as "Example:"; a lone "::" vanishes.
            literal_indent = indent
            stripped = stripped[:-1] if stripped.strip() != "::" else ""
        out.append(stripped)
        i += 1
    # Inline markup may wrap across lines (``a\nb``), so strip it per run of prose lines.
    text: list[str] = []
    run: list[str] = []
    for line in out + [_LITERAL_MARK]:
        if line.startswith(_LITERAL_MARK):
            if run:
                text.append(_rst_inline("\n".join(run)))
                run = []
            text.append(line[1:])
        else:
            run.append(line)
    return "\n".join(text[:-1])


# ---------------------------------------------------------------------------------------------
# Perl POD (perlfaq1..9).

_POD_CODE_START = re.compile(r"([A-Z])<(<+\s|)")
_POD_ENTITIES = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/", "quot": '"', "amp": "&"}


def _pod_code(letter: str, content: str) -> str:
    if letter in "XZ":
        return ""
    if letter == "E":
        if content.isdigit():
            return chr(int(content))
        if content.lower().startswith("0x"):
            return chr(int(content, 16))
        return _POD_ENTITIES.get(content, html.unescape(f"&{content};"))
    if letter == "L":
        if "|" in content:
            return content.split("|", 1)[0]
        if "://" in content:
            return content
        page, _, section = content.partition("/")
        section = section.strip('"')
        if page and section:
            return f"{section} in {page}"
        return section or page.strip('"')
    return content                                       # C, B, I, F, S: just the text


def _pod_inline(s: str) -> str:
    """Replace pod formatting codes (nested, and the `C<< x >>` form) by their text."""
    out: list[str] = []
    pos = 0
    while True:
        m = _POD_CODE_START.search(s, pos)
        if not m:
            out.append(s[pos:])
            return "".join(out)
        out.append(s[pos:m.start()])
        letter, extra = m.group(1), m.group(2)
        if extra:                                         # C<< ... >>: ends at the same count of >
            count = 1 + len(extra.rstrip())
            close = re.compile(r"\s" + ">" * count)
            end = close.search(s, m.end())
            if not end:
                out.append(s[m.start():])
                return "".join(out)
            content, pos = s[m.end():end.start()], end.end()
        else:
            depth, j = 1, m.end()
            while j < len(s) and depth:
                if s[j] == "<" and j > 0 and s[j - 1].isupper() and (j < 2 or not s[j - 2].isalpha()):
                    depth += 1
                elif s[j] == ">":
                    depth -= 1
                j += 1
            if depth:                                     # unbalanced: leave the rest as it is
                out.append(s[m.start():])
                return "".join(out)
            content, pos = s[m.end():j - 1], j
        out.append(_pod_code(letter, _pod_inline(content)))


def _pod_pairs(text: str) -> Pairs:
    paragraphs = re.split(r"\n(?:[ \t]*\n)+", text)
    pairs: Pairs = []
    question: str | None = None
    answer: list[str] = []
    skipping = False                                      # inside =begin ... =end of another format

    def close() -> None:
        if question is not None:
            pairs.append((question, "\n\n".join(answer)))

    for para in paragraphs:
        if not para.strip():
            continue
        if skipping:
            if para.startswith("=end"):
                skipping = False
            continue
        if para.startswith("="):
            command, _, rest = para.partition(" ")
            command = command.split("\n", 1)[0]
            rest = _one_line(rest)
            if command.startswith("=head"):
                close()
                question, answer = (_pod_inline(rest), []) if command == "=head2" else (None, [])
            elif command == "=item":
                answer.append("* " + _pod_inline(rest) if rest not in ("*", "") else "*")
            elif command == "=begin" and not rest.startswith("text"):
                skipping = True
            # =over, =back, =cut, =pod, =for, =encoding: layout only
            continue
        if question is None:
            continue
        if para[:1].isspace():                            # verbatim paragraph: code, kept as is
            answer.append(para.rstrip())
        else:
            prose = _pod_inline(para.strip())
            if answer and answer[-1] == "*":              # "=item *" then its paragraph
                answer[-1] = "* " + prose
            else:
                answer.append(prose)
    close()
    return pairs


# ---------------------------------------------------------------------------------------------
# gitfaq as asciidoc (gitfaq.txt / gitfaq.adoc).

_ADOC_ANCHOR = re.compile(r"^\[\[[^\]]*\]\]\s*$")
_ADOC_QUESTION = re.compile(r"^(\S.*?)::\s*$")
_ADOC_LISTING = re.compile(r"^(-{4,}|\.{4,})\s*$")


def _adoc_inline(s: str) -> str:
    s = re.sub(r"linkgit:([\w.-]+)\[(\d+)\]", r"\1(\2)", s)
    s = re.sub(r"<<[^,>]*,\s*([^>]+)>>", r"\1", s)
    s = re.sub(r"<<([^>]+)>>", r"\1", s)
    s = re.sub(r"`([^`]+)`", r"\1", s)
    return s


def _gitfaq_pairs(text: str) -> Pairs:
    lines = text.split("\n")
    pairs: Pairs = []
    question: str | None = None
    answer: list[str] = []
    in_listing = False
    i = 0
    while i < len(lines):
        line = lines[i]
        if in_listing:
            if _ADOC_LISTING.match(line):
                in_listing = False
                answer.append("")
            else:
                answer.append("    " + line.replace("\t", "    ") if line.strip() else "")
            i += 1
            continue
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        is_section = (line.strip() and line != "+" and re.match(r"^[-=~^]{3,}\s*$", nxt)
                      and len(nxt.strip()) == len(line.strip()))
        if _ADOC_ANCHOR.match(line) or is_section or (
                _ADOC_QUESTION.match(line) and (i == 0 or not lines[i - 1].strip()
                                                or _ADOC_ANCHOR.match(lines[i - 1]))):
            if question is not None:
                pairs.append((question, "\n".join(answer)))
                question, answer = None, []
            if is_section:
                i += 2
                continue
            if _ADOC_ANCHOR.match(line):
                i += 1
                continue
            question = _adoc_inline(_ADOC_QUESTION.match(line).group(1))
            i += 1
            continue
        if question is not None:
            if _ADOC_LISTING.match(line):
                in_listing = True
                answer.append("")
            elif line.strip() == "+":                     # asciidoc list continuation: new paragraph
                answer.append("")
            else:
                answer.append(_adoc_inline(line.strip()))
        i += 1
    if question is not None:
        pairs.append((question, "\n".join(answer)))
    return pairs


# ---------------------------------------------------------------------------------------------
# gitfaq as the HTML asciidoc renders (`<dt class="hdlist1">` question, `<dd>` answer).

class _DlistParser(HTMLParser):
    _BLOCKS = {"p", "div", "dd", "ul", "ol", "li", "pre", "br", "table", "tr"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.pairs: Pairs = []
        self._where: str | None = None                    # "dt" or "dd" while inside one
        self._depth = 0                                   # nesting of <dl> inside the answer
        self._pre = 0
        self._skip = 0                                    # inside <script>/<style>
        self._q: list[str] = []
        self._a: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style"):
            self._skip += 1
        elif tag == "dt" and self._depth == 0 and ("class", "hdlist1") in attrs:
            self._flush()
            self._where = "dt"
        elif tag == "dd" and self._where == "dt" and self._depth == 0:
            self._where = "dd"
        elif self._where == "dd":
            if tag == "dl":
                self._depth += 1
            if tag == "pre":
                self._pre += 1
            if tag in self._BLOCKS:
                self._a.append("\n\n")
            if tag == "li":
                self._a.append("* ")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style"):
            self._skip = max(0, self._skip - 1)
        elif self._where == "dd":
            if tag == "dl":
                if self._depth == 0:
                    self._flush()
                else:
                    self._depth -= 1
            elif tag == "pre":
                self._pre = max(0, self._pre - 1)
                self._a.append("\n\n")
            elif tag == "dd" and self._depth == 0:
                self._flush()
            elif tag in self._BLOCKS:
                self._a.append("\n\n")

    def handle_data(self, data: str) -> None:
        if self._skip:
            return
        if self._where == "dt":
            self._q.append(data)
        elif self._where == "dd":
            if self._pre:
                self._a.append(textwrap.indent(data.strip("\n").replace("\t", "    "), "    ", lambda _: True))
            else:
                self._a.append(re.sub(r"[ \t]*\n[ \t]*", "\n", data))

    def _flush(self) -> None:
        if self._where == "dd" and self._q:
            answer = re.sub(r"\n{3,}", "\n\n", "".join(self._a))
            paras = [p if p.startswith("    ") else _one_line(p) for p in answer.split("\n\n")]
            self.pairs.append(("".join(self._q), "\n\n".join(p for p in paras if p.strip())))
        self._where, self._q, self._a, self._depth, self._pre = None, [], [], 0, 0


def _gitfaq_html_pairs(text: str) -> Pairs:
    parser = _DlistParser()
    parser.feed(text)
    parser.close()
    parser._flush()
    return parser.pairs


# ---------------------------------------------------------------------------------------------
# Markdown FAQs: `## Question?` headings, each answered by the text up to the next heading.

_MD_QUESTION = re.compile(r"^#{1,6}\s+.+\?\s*#*\s*$", re.M)


def _md_pairs(text: str) -> Pairs:
    pairs: Pairs = []
    question: str | None = None
    body: list[str] = []
    in_code = False

    def flush() -> None:
        if question is not None:
            pairs.append((question, "\n".join(body)))

    for line in text.split("\n"):
        if MD_FENCE.match(line):
            in_code = not in_code
            continue                      # the fence itself goes; its lines stay, indented
        if in_code:
            body.append("    " + line)
            continue
        m = MD_HEADING.match(line)
        if m:
            flush()
            title = md_inline(m.group(1))
            question, body = (title, []) if title.endswith("?") else (None, [])
            continue
        if question is not None:
            body.append(md_inline(line))
    flush()
    return pairs
