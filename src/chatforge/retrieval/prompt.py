"""The grounded prompt format and its citations (fixed: the SFT examples and every caller use it).

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

import re
from typing import Any, Callable, Sequence

from chatforge.retrieval.passages import Passage

GROUNDED_SYSTEM_PROMPT = (
    "You are a support assistant. Answer the question using only the context below. "
    "If the context does not contain the answer, say that you could not find it in the "
    "documentation. End your answer with the source you used, as (source: NAME)."
)
NOT_FOUND_REPLY = ("I could not find that in the documentation I have. "
                   "Please rephrase the question or contact a support agent.")
DEFAULT_CONTEXT_TOKENS = 320
MIN_CUT_TOKENS = 16                  # a truncated passage shorter than this is dropped instead
_CITATION_TEXT = r"(?i:\(source:)[^()]*(?:\([^()]*\)[^()]*)*\)"
_CITATION = re.compile(r"\s*" + _CITATION_TEXT + r"\s*$")
# Generation from a grounded prompt ends with the first citation (`GenerationConfig.stop_after`):
# the prompt asks the answer to end there, and a model that goes on runs into the next passage's
# text. A line that starts like the context's own lines ("[1] (source: ...)", a plugin's
# "- [orders] (source: ...)") is context copied into the reply: its citations do not end it.
CITATION_END = r"(?m)^(?!(?:- )?\[[^\]\n]*\] \((?i:source:))[^\n]*?" + _CITATION_TEXT


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


def prompt_question(user_content: str) -> str:
    """The question of a grounded prompt's user turn ("Context: ...\\n\\nQuestion: Q" -> "Q"), as
    the server stores what the model saw; any other text unchanged."""
    if user_content.startswith("Context:"):
        _, sep, question = user_content.rpartition("\nQuestion: ")
        if sep:
            return question.strip()
    return user_content.strip()


_CONTEXT_LINE = re.compile(r"(?m)^\[\d+\] \(source: ([^()\n]*(?:\([^()\n]*\)[^()\n]*)*)\) ")


def context_sources(user_content: str) -> list[str]:
    """The passages' NAMEs in a grounded user turn's context block, in order (what a reply to it
    may cite; nested parentheses one level deep, as citations are parsed)."""
    context = user_content.rpartition("\n\nQuestion: ")[0] if user_content.startswith("Context:") else ""
    return list(dict.fromkeys(m.group(1) for m in _CONTEXT_LINE.finditer(context) if m.group(1).strip()))


def cite(answer: str, source: str) -> str:
    """`answer` with its citation: "ANSWER (source: NAME)"."""
    return f"{answer.strip()} (source: {source})"


def strip_citation(reply: str) -> str:
    """`reply` without a final "(source: ...)" citation (for scoring against plain references)."""
    return _CITATION.sub("", reply).strip()


# --------------------------------------------------------------------------- SFT examples
