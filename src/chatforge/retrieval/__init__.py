"""Retrieval: answers grounded in the company's documents.

A small model cannot memorise a manual, so the assistant answers from passages retrieved for
each question. The package holds, one concern a module:

- `passages.py`: documents cut along their own structure into `Passage`s (FAQ entries, manual
  sections, numbered steps kept together), each named "DOC > TITLE > SECTION".
- `index.py`: `PassageIndex`, BM25 over the passages (and their headings), cached in
  chatforge's cache folder under the inputs' fingerprint.
- `prompt.py`: the grounded prompt format ("Context: [1] (source: NAME) TEXT ... Question: ..."),
  the not-found reply and the citations that end an answer.
- `examples.py`: grounded SFT examples in that format, from Q&A pairs and from the documents'
  own sections (training data; `chatforge sft --docs` uses them).

    index = PassageIndex.load_or_build([Path("examples/my_docs")])   # cached in ~/.cache/chatforge/index
    hits = index.search("How do I reset my password?", k=3)         # [Passage(text, source, score), ...]
    messages = grounded_messages("How do I reset my password?", hits, tokenizer=tok)
"""

from chatforge.retrieval.index import PassageIndex, fingerprint, terms
from chatforge.retrieval.passages import MAX_WORDS, Passage, read_passages, source_name, split_passages
from chatforge.retrieval.prompt import (CITATION_END, DEFAULT_CONTEXT_TOKENS, GROUNDED_SYSTEM_PROMPT, NOT_FOUND_REPLY,
                                        cite, context_sources, format_context, grounded_messages, strip_citation)

__all__ = ["CITATION_END", "DEFAULT_CONTEXT_TOKENS", "GROUNDED_SYSTEM_PROMPT", "MAX_WORDS", "NOT_FOUND_REPLY",
           "Passage", "PassageIndex", "cite", "context_sources", "fingerprint", "format_context", "grounded_messages",
           "read_passages", "source_name", "split_passages", "strip_citation", "terms"]
