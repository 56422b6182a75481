"""Text cleaning for the data stage: normalisation, markup stripping and quality filters.

    normalize(text)            Unicode NFC, mojibake repair (ftfy), whitespace
    strip_markup(text, fmt)    plain text from "html", "md", "rst", "pod" (anything else: as is)
    scrub_pii(text)            see `chatforge.data.pii` (re-exported here)
    FilterConfig / check_quality(text, config) -> name of the failed filter or None

Everything here is a pure function of its input, so `chatforge data build` can stream
documents through it one at a time. Markup is stripped *lightly*: the goal is readable text
for a language model and a passage index, not a faithful renderer. Code blocks keep their
indentation; headings stay as their own paragraphs.
"""

from __future__ import annotations

import html.entities
import re
import textwrap
import unicodedata
from dataclasses import dataclass
from html.parser import HTMLParser

import ftfy

from chatforge.data.pii import PII_TYPES, scrub_pii  # noqa: F401  (part of this module's API)

# --------------------------------------------------------------------------- normalisation

# Unicode spaces that NFC keeps but a tokenizer should see as a plain space, and invisible
# characters that only split words (zero-width space, BOM, soft hyphen).
_SPACES = dict.fromkeys(map(ord, "\u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
                                 "\u2007\u2008\u2009\u200a\u202f\u205f\u3000"), " ")
_SPACES.update(dict.fromkeys(map(ord, "\u200b\ufeff\u00ad"), None))
# C0/C1 controls except tab and newline (form feeds in old manuals, stray escapes, NULs).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_TRAILING_WS = re.compile(r"[ \t]+$", re.M)
_MANY_BLANKS = re.compile(r"\n{3,}")
_INNER_RUNS = re.compile(r"(?<=\S) {2,}(?=\S)")


# HTML entities were already decoded by the HTML reader: a literal "&amp;" in text stays.
# Line breaks are ours to handle (so line counts do not change under ftfy).
_FTFY = ftfy.TextFixerConfig(unescape_html=False, fix_line_breaks=False, explain=False)


def _fix_unicode(text: str) -> str:
    """ftfy on the lines that need it: it is the slowest step, and an ASCII line holds no mojibake."""
    lines = text.split("\n")
    todo = [i for i, line in enumerate(lines) if not line.isascii()]
    fixed = ftfy.fix_text("\n".join(lines[i] for i in todo), _FTFY).split("\n")
    if len(fixed) != len(todo):   # defensive: fall back to one line at a time
        fixed = [ftfy.fix_text(lines[i], _FTFY) for i in todo]
    for i, line in zip(todo, fixed):
        lines[i] = line
    return "\n".join(lines)


def normalize(text: str) -> str:
    """Repair and normalise `text`: mojibake, NFC, spaces, line ends, blank lines.

    Paragraph breaks (one blank line) survive; runs of blank lines collapse to one. Lines that
    start with spaces (code, indented examples) keep their indentation and inner alignment;
    elsewhere runs of spaces inside a line collapse to one. Tabs become spaces (tab stops of 8,
    as terminals and most manuals assume).
    """
    if not text.isascii():
        text = _fix_unicode(text)
        text = unicodedata.normalize("NFC", text).translate(_SPACES)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if "\t" in text:
        text = text.expandtabs(8)
    text = _CONTROL.sub("", text)
    text = _TRAILING_WS.sub("", text)
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if line[:1] != " " and "  " in line:
            lines[i] = _INNER_RUNS.sub(" ", line)
    text = textwrap.dedent("\n".join(lines))
    return _MANY_BLANKS.sub("\n\n", text).strip("\n")


# --------------------------------------------------------------------------- HTML

_BLOCK_TAGS = frozenset(
    "address article aside blockquote body caption dd details div dl dt fieldset figcaption figure "
    "footer form h1 h2 h3 h4 h5 h6 header hr html li main nav ol p pre section summary table tbody "
    "td tfoot th thead title tr ul".split())
_SKIP_TAGS = frozenset(("script", "style", "noscript", "template", "svg", "head"))


class _TextExtractor(HTMLParser):
    """Collects the visible text of an HTML page; block tags become paragraph breaks."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0       # depth inside <script>/<style>/... whose text is not visible
        self.pre = 0        # depth inside <pre>: whitespace is kept as written
        self.pre_text: list[str] = []
        self.title: str | None = None
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in _SKIP_TAGS:
            self.skip += 1
        elif tag == "title":
            self._in_title = True
        elif tag == "br":
            self.parts.append("\n")
        elif tag in _BLOCK_TAGS or tag == "pre":
            self.parts.append("\n\n")
            if tag == "pre":
                self.pre += 1
            elif tag == "li":
                self.parts[-1] = "\n- "   # list items on consecutive lines
            elif tag in ("td", "th"):
                self.parts[-1] = " | "

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP_TAGS:
            self.skip = max(0, self.skip - 1)
        elif tag == "title":
            self._in_title = False
        elif tag == "pre":
            self.pre = max(0, self.pre - 1)
            if not self.pre:
                # Code, indented like a Markdown code block so that it still reads as code;
                # a newline right after <pre> is not content.
                code = "".join(self.pre_text).strip("\n")
                self.pre_text = []
                code = "\n".join("    " + line if line.strip() else "" for line in code.split("\n"))
                self.parts.append("\x00PRE" + code + "\x00\n\n")
        elif tag in _BLOCK_TAGS and tag not in ("td", "th", "li"):
            self.parts.append("\n\n")

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title = (self.title or "") + data
            return
        if self.skip:
            return
        if self.pre:
            self.pre_text.append(data)
        else:
            self.parts.append(re.sub(r"\s+", " ", data))


def strip_html(page: str) -> str:
    """The visible text of an HTML page: no scripts or styles, blocks as paragraphs."""
    parser = _TextExtractor()
    parser.feed(page.replace("\x00", ""))   # NUL marks <pre> blocks below
    parser.close()
    raw = "".join(parser.parts)
    # Lines outside <pre> lose leading spaces (HTML does not show them); <pre> blocks keep them.
    out: list[str] = []
    for piece in raw.split("\x00"):
        if piece.startswith("PRE"):
            out.append(piece[3:])
        else:
            out.append(re.sub(r" *\n *", "\n", piece))
    text = "".join(out)
    body = re.sub(r"\n{3,}", "\n\n", text).strip()
    title = (parser.title or "").strip()
    if title and not body.startswith(title):
        body = f"{title}\n\n{body}"
    return body


# --------------------------------------------------------------------------- Markdown

MD_FENCE = re.compile(r"^\s*(```|~~~)")
MD_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
_MD_SETEXT = re.compile(r"^(=+|-+)\s*$")
_MD_RULE = re.compile(r"^\s*([-*_])(\s*\1){2,}\s*$")
_MD_REFDEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s+\S+.*$")
_MD_IMAGE = re.compile(r"!\[([^\]]*)\]\([^)]*\)")
_MD_LINK = re.compile(r"\[([^\]]+)\]\((?:[^()]|\([^)]*\))*\)")
_MD_REFLINK = re.compile(r"\[([^\]]+)\]\[[^\]]*\]")
_MD_CODE = re.compile(r"`+([^`\n]+?)`+")
# Underscore emphasis only around words with a space inside: __init__ is a name, not bold.
_MD_STRONG = re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*|(?<!\w)__(?=\S)([^_\n]*?\s[^_\n]*?)(?<=\S)__(?!\w)")
_MD_EMPH = re.compile(r"(?<![\w*])\*(?=\S)([^*\n]+?)(?<=\S)\*(?![\w*])|(?<![\w_])_(?=[^\s_])([^_\n]+?)(?<=\S)_(?![\w_])")
_MD_TABLE_RULE = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")
_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9-]*(\s[^<>]*)?/?>")


def md_inline(line: str) -> str:
    """One line of Markdown without its inline markup (links, images, tags, code, emphasis)."""
    line = _MD_IMAGE.sub(r"\1", line)
    line = _MD_LINK.sub(r"\1", line)
    line = _MD_REFLINK.sub(r"\1", line)
    line = _TAG.sub("", line)
    # Inline code last among the link rules, first among emphasis: `a_b_c` must stay intact.
    spans: list[str] = []

    def keep(m: re.Match) -> str:
        spans.append(m.group(1))
        return f"\x00{len(spans) - 1}\x00"

    line = _MD_CODE.sub(keep, line)
    line = _MD_STRONG.sub(lambda m: m.group(1) or m.group(2), line)
    line = _MD_EMPH.sub(lambda m: m.group(1) or m.group(2), line)
    if spans:
        line = re.sub(r"\x00(\d+)\x00", lambda m: spans[int(m.group(1))], line)
    return line


def strip_markdown(text: str) -> str:
    """Markdown to plain text: headings, emphasis, links and fences go; code stays indented."""
    out: list[str] = []
    in_fence = False
    for line in text.split("\n"):
        if MD_FENCE.match(line):
            in_fence = not in_fence
            out.append("")
            continue
        if in_fence:
            out.append("    " + line if line.strip() else "")
            continue
        if line.startswith(("    ", "\t")):        # indented code block: verbatim
            out.append(line)
            continue
        m = MD_HEADING.match(line)
        if m:
            out.extend(("", md_inline(m.group(1)), ""))
            continue
        if (_MD_SETEXT.match(line) and out and out[-1].strip()) or _MD_RULE.match(line) \
                or _MD_REFDEF.match(line) or _MD_TABLE_RULE.match(line):
            out.append("")
            continue
        stripped = line.lstrip()
        while stripped.startswith(">"):           # block quotes
            stripped = stripped[1:].lstrip()
            line = stripped
        out.append(md_inline(line))
    return "\n".join(out)


# --------------------------------------------------------------------------- reStructuredText

_RST_ADORNMENT = re.compile(r"""^([!-/:-@\[-`{-~])\1{2,}\s*$""")
# Table borders: grid "+----+====+" and simple "=====  ======"; their rows lose the pipes.
_RST_TABLE_BORDER = re.compile(r"^\s*(\+[-=]+)+\+\s*$|^\s*=+( +=+)+\s*$")
_RST_TABLE_ROW = re.compile(r"^\s*\|(.*)\|\s*$")
_RST_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::\s*(.*)$")
_RST_COMMENT = re.compile(r"^\s*\.\.(\s+(?!\w[\w:-]*::)|$)")
_RST_TARGET = re.compile(r"^\s*\.\.\s+(_[^:]+|\[[^\]]+\]|\|[^|]+\|):")
_RST_ROLE = re.compile(r":[\w:.+-]+:`(?:([^`<]*?)\s*<[^`>]*>|([^`]*))`")
_RST_LINK = re.compile(r"`([^`<]+?)\s*<[^`>]*>`__?")
_RST_LITERAL = re.compile(r"``(.+?)``")
_RST_INTERP = re.compile(r"(?<![\w`])`([^`]+)`(?:__?)?(?![\w`])")
_RST_STRONG = re.compile(r"(?<![\w*])\*\*(?=\S)(.+?)(?<=\S)\*\*(?![\w*])")
_RST_EMPH = re.compile(r"(?<![\w*])\*(?=\S)([^*\n]+?)(?<=\S)\*(?![\w*])")
# Directives whose body is prose worth keeping; the others (toctree, index, image...) are
# navigation or layout and are dropped with their options.
_RST_KEEP_BODY = frozenset("note warning tip hint important caution attention danger error admonition "
                           "seealso versionadded versionchanged deprecated topic sidebar rubric centered "
                           "function method class attribute data exception module describe option envvar".split())
_RST_CODE_DIRECTIVES = frozenset("code-block code sourcecode doctest testcode productionlist".split())
_RST_OPTION = re.compile(r"^\s*:[\w -]+:(\s.*)?$")


def _rst_role(m: re.Match) -> str:
    if m.group(1) is not None:
        return m.group(1)
    text = m.group(2)
    if text.startswith("~"):   # Sphinx shows only the last part of ~os.path.join
        return text[1:].rsplit(".", 1)[-1]
    return text.lstrip("!")


def strip_rst(text: str) -> str:
    """reStructuredText to plain text: adornments, comments, roles and link targets go.

    Literal blocks (after "::" or a code directive) are kept verbatim with their indentation.
    """
    out: list[str] = []
    skip_indent: int | None = None     # inside a dropped directive/comment: skip deeper lines
    literal_indent: int | None = None  # inside a literal block: keep deeper lines verbatim
    pending_literal: int | None = None  # the previous paragraph announced a literal block
    options = False                     # right after a directive: its ":option:" lines follow
    body: list[int] | None = None       # [directive indent, body indent] of a kept directive
    for line in text.split("\n"):
        indent = len(line) - len(line.lstrip())
        if not line.strip():
            out.append("")
            continue
        if skip_indent is not None:
            if indent > skip_indent:
                continue
            skip_indent = None
        if options:
            options = False
            if _RST_OPTION.match(line):
                options = True
                continue
        if body is not None:
            if indent <= body[0]:
                body = None
            else:
                if body[1] < 0:
                    body[1] = indent
                line = " " * body[0] + line[min(indent, body[1]):]
                indent = len(line) - len(line.lstrip())
        if pending_literal is not None:
            literal_indent = pending_literal if indent > pending_literal else None
            pending_literal = None
        if literal_indent is not None:
            if indent > literal_indent:
                out.append(line)
                continue
            literal_indent = None
        if _RST_ADORNMENT.match(line) or _RST_TABLE_BORDER.match(line):
            out.append("")
            continue
        row = _RST_TABLE_ROW.match(line)
        if row:
            cells = [c.strip() for c in row.group(1).split("|")]
            line = " | ".join(c for c in cells if c)
            if not line:
                continue
        m = _RST_DIRECTIVE.match(line)
        if m:
            name, arg = m.group(2).split(":")[-1], m.group(3)
            options = True
            if name in _RST_CODE_DIRECTIVES:
                pending_literal = indent
                out.append("")
            elif name in _RST_KEEP_BODY:
                out.append(m.group(1) + _rst_inline(arg) if arg else "")
                body = [indent, -1]   # its body reads as ordinary paragraphs
            else:
                skip_indent = indent
            continue
        if _RST_TARGET.match(line) or _RST_COMMENT.match(line):
            skip_indent = indent
            continue
        if line.rstrip().endswith("::"):
            # "Example::" introduces a literal block: keep one colon, drop the marker.
            head = line.rstrip()[:-2].rstrip()
            line = head + ":" if head.strip() else ""
            pending_literal = indent
        out.append(_rst_inline(line))
    return "\n".join(out)


def _rst_inline(line: str) -> str:
    if "`" in line:
        line = _RST_ROLE.sub(_rst_role, line)
        line = _RST_LINK.sub(r"\1", line)
        line = _RST_LITERAL.sub(r"\1", line)
        line = _RST_INTERP.sub(r"\1", line)
    if "*" in line:
        line = _RST_STRONG.sub(r"\1", line)
        line = _RST_EMPH.sub(r"\1", line)
    return line


# --------------------------------------------------------------------------- POD

_POD_CODE = re.compile(r"([A-Z])<([^<>]*)>")
_POD_CODE_MULTI = re.compile(r"([A-Z])(<{2,})\s+(.+?)\s+(>{2,})", re.S)
_POD_ESCAPES = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/", "quot": '"', "amp": "&", "apos": "'"}


def _pod_escape(body: str) -> str:
    """E<lt>, E<eacute> (HTML names), E<233>, E<0xE9>, E<0351> (octal)."""
    if body in _POD_ESCAPES:
        return _POD_ESCAPES[body]
    if body in html.entities.name2codepoint:
        return chr(html.entities.name2codepoint[body])
    try:
        if body.lower().startswith("0x"):
            return chr(int(body, 16))
        if body.startswith("0") and len(body) > 1:
            return chr(int(body, 8))
        return chr(int(body))
    except ValueError:
        return ""


def _pod_code(letter: str, body: str) -> str:
    if letter == "E":
        return _pod_escape(body)
    if letter in "XZ":
        return ""
    if letter == "L":
        # L<text|target>, L<name/"section">, L<perlfunc>: show the text, else the name.
        if "|" in body:
            return body.split("|", 1)[0]
        return body.replace('/"', ": ").strip('"/').replace('"', "")
    return body


def _pod_inline(para: str) -> str:
    if "<<" in para:
        para = _POD_CODE_MULTI.sub(lambda m: _pod_code(m.group(1), m.group(3)), para)
    for _ in range(8):  # innermost codes first; nesting deeper than this is not real POD
        new = _POD_CODE.sub(lambda m: _pod_code(m.group(1), m.group(2)), para)
        if new == para:
            break
        para = new
    return para


def strip_pod(text: str) -> str:
    """Perl POD to plain text: commands become headings/items; formatting codes go.

    Verbatim (indented) paragraphs are code and are kept exactly.
    """
    out: list[str] = []
    in_pod = not text.lstrip().startswith(("#!", "package ", "use "))
    skipping = False  # inside =begin FORMAT ... =end (HTML/LaTeX for other formatters)
    for para in re.split(r"\n[ \t]*\n", text):
        if para.startswith("="):
            cmd, _, rest = para[1:].partition(" ")
            cmd = cmd.split("\n", 1)[0]
            rest = rest.strip()
            if cmd == "cut":
                in_pod = False
            elif cmd in ("pod", "over", "back", "encoding", "for"):
                in_pod = True
            elif cmd == "begin":
                skipping = not rest.lower().startswith(("text", "pod"))
            elif cmd == "end":
                skipping = False
            elif cmd.startswith("head"):
                in_pod = True
                out.append(_pod_inline(rest))
            elif cmd == "item":
                out.append("- " + _pod_inline(rest.lstrip("*").strip()) if rest not in ("*", "") else "-")
            continue
        if not in_pod or skipping:
            continue
        if para[:1] in (" ", "\t"):
            out.append(para)
        else:
            if out and out[-1] == "-":       # "=item *" followed by its paragraph
                out[-1] = "- " + _pod_inline(para)
            else:
                out.append(_pod_inline(para))
    return "\n\n".join(p for p in out if p)


def strip_markup(text: str, fmt: str) -> str:
    """Plain text from markup `fmt` ("html", "md", "rst", "pod"); other formats are returned as is."""
    if fmt == "html":
        return strip_html(text)
    if fmt == "md":
        return strip_markdown(text)
    if fmt == "rst":
        return strip_rst(text)
    if fmt == "pod":
        return strip_pod(text)
    return text


# --------------------------------------------------------------------------- quality filters

@dataclass(frozen=True)
class FilterConfig:
    """Thresholds of the quality filters (the CLI options of `chatforge data build`).

    The defaults were tuned on the fetched default corpus (Python, Perl and Debian manuals):
    prose has an alphabetic ratio around 0.9 and the most code-heavy 1% of passages about
    0.55-0.75, all kept; what falls below 0.35 is tables of numbers (perlhist, perlebcdic),
    ASCII-art package tables and dumps. The repeated-lines filter then removes tables of
    contents and traces (perltoc, perldebguts); lines without a letter or digit (borders,
    rules, braces) do not count as repeats.
    """

    min_chars: int = 64            # shorter passages carry too little to learn from
    max_chars: int = 32_000        # longer after chunking = one enormous line (a blob or dump)
    min_alpha_ratio: float = 0.35  # letters / non-space characters
    max_dup_line_ratio: float = 0.35  # characters in repeated lines / all line characters


FILTERS = ("too_short", "too_long", "non_text", "repeated_lines")
_ASCII_LETTERS = bytes(range(65, 91)) + bytes(range(97, 123))
_ASCII_SPACE = b" \t\n\r\x0b\x0c"
_ASCII_RUNS = re.compile(r"[\x00-\x7f]+")
_HAS_ALNUM = re.compile(r"[^\W_]")


def alpha_ratio(text: str) -> float:
    """Letters divided by non-whitespace characters (1.0 for an empty text)."""
    if text.isascii():
        b = text.encode("ascii")
        visible = len(b.translate(None, _ASCII_SPACE))
        letters = len(b) - len(b.translate(None, _ASCII_LETTERS))
    else:
        b = text.encode("ascii", "ignore")
        rest = _ASCII_RUNS.sub("", text)   # usually a small part: count it char by char
        visible = len(b.translate(None, _ASCII_SPACE)) + sum(1 for c in rest if not c.isspace())
        letters = len(b) - len(b.translate(None, _ASCII_LETTERS)) + sum(1 for c in rest if c.isalpha())
    return letters / visible if visible else 1.0


def dup_line_ratio(text: str) -> float:
    """Share of characters (of lines with a letter or digit) in lines that already appeared above.

    Lines without any letter or digit (table borders, "-----" rules, "}") repeat in every
    manual; they are layout, not repeated content, and are not counted.
    """
    seen: set[str] = set()
    total = dup = 0
    for line in text.split("\n"):
        line = line.strip()
        if not line or not _HAS_ALNUM.search(line):
            continue
        total += len(line)
        if line in seen:
            dup += len(line)
        else:
            seen.add(line)
    return dup / total if total else 0.0


def check_quality(text: str, config: FilterConfig = FilterConfig()) -> str | None:
    """The name of the first filter (in `FILTERS` order) that rejects `text`, or None to keep it."""
    n = len(text)
    if n < config.min_chars:
        return "too_short"
    if n > config.max_chars:
        return "too_long"
    if alpha_ratio(text) < config.min_alpha_ratio:
        return "non_text"
    if "\n" in text and dup_line_ratio(text) > config.max_dup_line_ratio:
        return "repeated_lines"
    return None
