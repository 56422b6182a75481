"""Grounded SFT examples: training data in the grounded prompt format, made from Q&A pairs
and from the documents' own sections (`chatforge sft --docs`)."""

from __future__ import annotations

import random
import re
from dataclasses import replace
from typing import Any, Iterable

from chatforge.errors import ChatforgeError
from chatforge.retrieval.index import PassageIndex
from chatforge.retrieval.passages import SENTENCE_END, Passage, source_name
from chatforge.retrieval.prompt import (DEFAULT_CONTEXT_TOKENS, NOT_FOUND_REPLY, _context, _counter, cite,
                                        grounded_messages)


def without_heading(passage: Passage) -> Passage:
    """`passage` named by its document and title alone, as a passage cut from a manual without
    headings would be (same id and text)."""
    return replace(passage, source=source_name(passage.doc, passage.title), section="")


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
    for end in reversed([m.start() for m in SENTENCE_END.finditer(answer)]):
        if _norm(answer[:end]) in visible:
            return answer[:end].strip()
    return None


def _grams(text: str, n: int = 4) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def _norm(text: str) -> str:
    return " ".join(text.split())


def grounded_sft_examples(qa_pairs: Iterable[Any], index: PassageIndex, k: int = 3,
                          missing_fraction: float = 0.15, seed: int = 0,
                          max_context_tokens: int = DEFAULT_CONTEXT_TOKENS,
                          tokenizer: Any | None = None, hide_heading: float = 0.0,
                          hard_missing: float = 0.0) -> list[dict]:
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
    passages from OTHER documents only and reply NOT_FOUND_REPLY; a seeded `hard_missing` share of
    those instead get the best passages of ALL documents but the answer's own (and any passage
    that holds a third of the answer's word 4-grams): neighbouring entries on the same topic,
    which is what a customer's unanswered question finds, so that the model learns to refuse
    when the context is on topic but does not answer, not only when it is off topic. Pairs whose source is not
    indexed (chat transcripts) are skipped. Pairs are dicts as in qa_train.jsonl
    ({"messages", "source"}: the last user turn is the question, the last assistant turn the
    answer, earlier turns the history), {"question", "answer", "source"} dicts or
    (question, answer, source) tuples.
    A seeded `hide_heading` share of the answered examples show the answer's passage under its
    document's name alone (`without_heading`): a FAQ entry's heading is the question itself, and a
    model that only ever sees the answer under its own question learns to copy when a heading
    matches and to refuse otherwise, which fails on every manual.
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
        if i in missing and rng.random() < hard_missing:
            gold = index.best_in_docs(docs, f"{q}\n{a}")
            answer_grams = _grams(a)
            passages = [p for p in index.search(q, k + 4) if p.id != gold.id
                        and len(answer_grams & _grams(p.text)) < len(answer_grams) / 3][:k]
            reply = NOT_FOUND_REPLY
        elif i in missing:
            passages = index.search(q, k, exclude_docs=docs)
            reply = NOT_FOUND_REPLY
        else:
            passages = index.search(q, k)
            gold = index.best_in_docs(docs, f"{q}\n{a}")
            if rng.random() < hide_heading:
                passages = [without_heading(p) if p.id == gold.id else p for p in passages]
                gold = without_heading(gold)
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
    for sentence in SENTENCE_END.split(text):
        n = len(sentence.split())
        if out and count + n > max_words:
            break
        out.append(sentence)
        count += n
    reply = " ".join(out)
    return reply if count <= max_words else " ".join(reply.split()[:max_words])


def section_sft_examples(index: PassageIndex, n: int, k: int = 3, seed: int = 0,
                         max_context_tokens: int = DEFAULT_CONTEXT_TOKENS, tokenizer: Any | None = None,
                         max_reply_words: int = 120, exclude_docs: Iterable[str] = (),
                         hide_heading: float = 0.0) -> list[dict]:
    """Reading-comprehension examples made from the documents alone, in the grounded format.

    Q&A pairs are few (hundreds), while a small model needs thousands of examples to learn to
    find the passage that answers and copy from it. The first passage of each named section
    gives one: the question asks about the section (a heading that is a question is asked as it
    is; only names of two or more words that one document alone uses, questions first), the
    context holds the passage among `k` retrieved for that question (at a seeded position; first
    if the budget would cut it), and the reply is the passage's opening sentences, copied as they
    appear in the context (at most `max_reply_words` words), with its citation. Up to `n`
    passages are drawn (seeded) from documents not in `exclude_docs`; a passage that does not fit
    the budget whole is skipped. A seeded `hide_heading` share show the passage under its
    document's name alone (`without_heading`), so that the model learns to find the answer in
    the text, not in a heading that repeats the question. Each example: {"messages", "source",
    "missing": False}.
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
    # Ways customers ask about a topic; the topic is lower-cased half the time, as people type it.
    templates = ("What does the documentation say about {}?", "Tell me about {}.", "{}", "How does {} work?",
                 "What is {}?", "Can you explain {}?", "I have a question about {}.", "{}?",
                 "Where can I read about {}?", "Help with {} please")
    examples = []
    for gold in named:
        if len(examples) >= n:
            break
        section = gold.section.rstrip(":").strip()
        topic = section if rng.random() < 0.5 else section.lower()
        if section.endswith("?"):
            question = section
        elif section.lower().startswith("how to "):        # a manual's "How to check out ..."
            question = f"How do I {section[7:].rstrip('.')}?"
        else:
            question = rng.choice(templates).format(topic)
        text = " ".join(gold.text.split())
        if count(f"Context:\n[1] (source: {gold.source}) {text}") > max_context_tokens:
            continue
        passages = [p for p in index.search(question, k) if p.id != gold.id][:k - 1]
        shown = without_heading(gold) if rng.random() < hide_heading else gold
        passages.insert(rng.randint(0, len(passages)), shown)
        _keep_in_context(passages, shown, max_context_tokens, tokenizer)
        messages = grounded_messages(question, passages, max_context_tokens=max_context_tokens, tokenizer=tokenizer)
        reply = cite(_first_sentences(text, max_reply_words), shown.source)
        examples.append({"messages": messages + [{"role": "assistant", "content": reply}],
                         "source": gold.doc, "missing": False})
    return examples
