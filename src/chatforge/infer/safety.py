"""Reply safety: every reply is PII-scrubbed and blocked-term filtered before anyone sees it.

    guard = ReplyFilter(blocked=load_blocked_terms("blocked.txt"), action="mask")
    guard.apply("Mail bob@example.com").text        # 'Mail <EMAIL>'
    stream = guard.stream()                         # for replies that arrive in pieces
    shown = [stream.push(p) for p in pieces] + [stream.finish()]

What it does
- PII: the data stage's `scrub_pii` (the same placeholders as the training corpus: `<EMAIL>`,
  `<PHONE>`, `<CARD>`, `<IP>`, `<IBAN>`, `<SECRET_URL>`), so the model cannot leak personal data it
  memorised or echo it back from a document.
- Blocked terms (`--blocked-terms FILE`): one term a line; `/.../` around a line makes it a regular
  expression; blank lines and lines starting with `#` are skipped. Literal terms match
  case-insensitively as whole words. With `action="mask"` each match becomes `*`s of its length;
  with `action="refuse"` a reply with any match is replaced by the refusal text.

Streaming (`SafeStream`): the text is released a word at a time, never inside a word, so an
e-mail address or a URL split across generated pieces is whole when it is scrubbed; after a word
with a digit in it only at a sentence or line end, because the PII that spans spaces (phone, card
and IBAN numbers) is made of digit groups: "call +44 20 7946 0958" shows "call " at once and the
number only when it is complete. With a blocked term that could span a space (several words, or
any /regex/) the text is released a sentence at a time instead. A cut is only made where
scrubbing the text before it gives exactly the start of scrubbing the whole buffer, i.e. where
no match spans the cut. A reply without sentence ends is released in chunks once it is long,
keeping a tail longer than any PII string. In refuse mode nothing is released until the reply is
complete, because a later blocked term turns the whole reply into the refusal.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from chatforge.data.clean import scrub_pii
from chatforge.errors import ChatforgeError

ACTIONS = ("mask", "refuse")
DEFAULT_REFUSAL = "I'm sorry, I can't help with that."
# A sentence or line ends here: after a newline, or after . ! ? (and closing quotes/brackets)
# followed by whitespace. The whitespace must be present: "john." may still become "john.doe@...".
_BOUNDARY = re.compile(r"\n|[.!?][\"')\]]*\s")
_SPACE = re.compile(r"\s")
_WORD = re.compile(r"(\S+)\s+")                       # a word and the space after it
_DIGIT = re.compile(r"\d")
# A literal single-word blocked term as `compile_term` writes it: word characters and escaped
# punctuation, between optional \b. Anything else might match across a space.
_ONE_WORD = re.compile(r"(\\b)?(\w|\\[^\s\w\\ ])+(\\b)?")


def _scrub(text: str) -> tuple[str, Counter]:
    return scrub_pii(text)


def load_blocked_terms(path: str | Path) -> list[re.Pattern]:
    """Read a blocked-terms file (see the module docstring); errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ChatforgeError(f"blocked-terms file {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ChatforgeError(f"{path} is not UTF-8 text; save the blocked terms as UTF-8") from None
    patterns = []
    for no, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            patterns.append(compile_term(line))
        except re.error as e:
            raise ChatforgeError(f"{path}, line {no}: {line!r} is not a valid regular expression ({e})") from None
    return patterns


def compile_term(term: str) -> re.Pattern:
    """`/regex/` -> that regex; anything else -> the literal term as a case-insensitive whole word."""
    if len(term) > 2 and term.startswith("/") and term.endswith("/"):
        return re.compile(term[1:-1], re.IGNORECASE)
    escaped = re.escape(term)
    # \b only makes sense next to a word character ("C++" has none at its end).
    left = r"\b" if re.match(r"\w", term) else ""
    right = r"\b" if re.search(r"\w$", term) else ""
    return re.compile(left + escaped + right, re.IGNORECASE)


@dataclass
class Filtered:
    """The outcome of filtering one text."""

    text: str
    pii: Counter = field(default_factory=Counter)   # placeholder type -> how many
    blocked: int = 0                                # blocked-term matches
    refused: bool = False                           # the text was replaced by the refusal


class ReplyFilter:
    """PII scrubbing plus blocked terms, configured once and applied to every reply."""

    def __init__(self, blocked: list[re.Pattern] | None = None, action: str = "mask",
                 refusal: str = DEFAULT_REFUSAL, scrub_pii: bool = True):
        if action not in ACTIONS:
            raise ChatforgeError(f"blocked-terms action must be one of {', '.join(ACTIONS)}, got {action!r}")
        self.blocked = list(blocked or [])
        self.action, self.refusal, self.scrub_pii = action, refusal, scrub_pii
        # Streaming may cut between words unless a blocked term could span them.
        self.word_cuts = all(_ONE_WORD.fullmatch(p.pattern) for p in self.blocked)

    def apply(self, text: str) -> Filtered:
        """Filter a complete text."""
        pii: Counter = Counter()
        if self.scrub_pii:
            text, pii = _scrub(text)
        hits = 0
        for pattern in self.blocked:
            text, n = pattern.subn(lambda m: "*" * len(m.group(0)), text)
            hits += n
        if hits and self.action == "refuse":
            return Filtered(self.refusal, pii, hits, refused=True)
        return Filtered(text, pii, hits)

    def stream(self, max_buffer: int = 240, keep_tail: int = 80) -> "SafeStream":
        return SafeStream(self, max_buffer, keep_tail)


class SafeStream:
    """Filters text that arrives in pieces; `push` and `finish` return the text safe to show now.

    `pii`, `blocked` and `refused` add up what was found so far.
    """

    def __init__(self, guard: ReplyFilter, max_buffer: int = 240, keep_tail: int = 80):
        self.guard = guard
        self.max_buffer = max_buffer     # past this, release at a space even without a sentence end
        self.keep_tail = keep_tail       # ... but keep this much back (longer than any PII string)
        self.buffer = ""
        self.pii: Counter = Counter()
        self.blocked = 0
        self.refused = False

    def push(self, piece: str) -> str:
        self.buffer += piece
        if self.guard.action == "refuse" and self.guard.blocked:
            return ""                    # the whole reply decides (see the module docstring)
        cut = self._safe_cut()
        return self._release(cut) if cut else ""

    def finish(self) -> str:
        return self._release(len(self.buffer)) if self.buffer else ""

    def _release(self, cut: int) -> str:
        out = self.guard.apply(self.buffer[:cut])
        self.buffer = self.buffer[cut:]
        self.pii += out.pii
        self.blocked += out.blocked
        self.refused = self.refused or out.refused
        return out.text

    def _safe_cut(self) -> int:
        """The furthest boundary in the buffer where cutting cannot split a match (0 = none)."""
        buf = self.buffer
        cuts = [m.end() for m in _BOUNDARY.finditer(buf)]
        if self.guard.word_cuts:
            cuts += [m.end() for m in _WORD.finditer(buf) if not _DIGIT.search(m.group(1))]
        if len(buf) > self.max_buffer:
            cuts += [m.end() for m in _SPACE.finditer(buf, 0, len(buf) - self.keep_tail)]
        if not cuts:
            return 0
        whole = self.guard.apply(buf).text
        for cut in sorted(set(cuts), reverse=True):
            if whole.startswith(self.guard.apply(buf[:cut]).text):
                return cut
        return 0
