"""Retrieval hit@k per retrieval mode, on passages: did the top k hold the gold passage?

    from chatforge.retrieval.hits import retrieval_hits
    retrieval_hits(retriever, questions, modes=("bm25", "dense", "hybrid"))
    # {"bm25": {"hit@1": .., "hit@3": .., "n": ..}, "dense": {...}, "hybrid": {...}}

A question's `source` (a string or a list of them) names its gold: a passage as retrieval cites
it ("DOC > TITLE > SECTION", the evaluation sets in evalsets/ do so), or a document id (any
passage of the document counts, as `eval.evaluate._gold_docs` scores; with a "section", as the
manual's questions give, any passage of that section). A source naming nothing
indexed leaves the question out. Follow-ups (`history`) are searched with their earlier user
turns, and, for comparison, with the last message alone (`last_message_only`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from chatforge import files
from chatforge.errors import ChatforgeError


def gold_ids(index: Any, source: str | Sequence[str] | None, section: str | None = None) -> set[int] | None:
    """The ids of the passages `source` names (see the module docstring), None when none; with a
    `section` (a manual's questions name one), only its passages of those."""
    if not source:
        return None
    names = [source] if isinstance(source, str) else list(source)
    by_name: dict[str, list[int]] = getattr(index, "_by_source_cache", None) or {}
    if not by_name:
        for p in index.passages:
            by_name.setdefault(p.source, []).append(p.id)
        try:
            index._by_source_cache = by_name
        except AttributeError:
            pass
    out: set[int] = set()
    for name in names:
        doc, _, rest = name.partition(" > ")
        if rest and name in by_name:
            out.update(by_name[name])
            continue
        docs = index.matching_docs(doc)
        if rest:    # a passage name under another path of the same document ("my_docs/x" vs "docs/x")
            out.update(i for d in docs for i in by_name.get(f"{d} > {rest}", ()))
        else:
            out.update(p.id for d in docs for p in index.doc_passages(d))
    if section:
        out = {i for i in out if index.passages[i].section.strip().lower() == section.strip().lower()}
    return out or None


def _user_turns(history: Sequence[dict]) -> list[str]:
    return [m["content"] for m in history if m.get("role") == "user"]


def retrieval_hits(retriever: Any, questions: Sequence[dict], modes: Sequence[str] = ("bm25",),
                   ks: Sequence[int] = (1, 3), last_message_only: bool = False) -> dict:
    """{mode: {"hit@K": share, "n": questions scored}} for each mode the retriever can rank by.

    `questions`: dicts with "question", "source" and optionally "history" (as `eval.evaluate.load_questions`
    returns them). With `last_message_only`, follow-ups are searched without their history.
    """
    out: dict[str, dict] = {}
    golds = [gold_ids(retriever, q.get("source"), q.get("section")) for q in questions]
    scored = [(q, g) for q, g in zip(questions, golds) if g]
    for mode in modes:
        counts = {k: 0 for k in ks}
        for q, gold in scored:
            history = [] if last_message_only else _user_turns(q.get("history") or [])
            if hasattr(retriever, "mode"):
                hits = retriever.search(q["question"], max(ks), history=history, mode=mode)
            else:           # a plain PassageIndex: BM25 on the last message
                hits = retriever.search(q["question"], max(ks))
            ids = [p.id for p in hits]
            for k in ks:
                counts[k] += any(i in gold for i in ids[:k])
        n = len(scored)
        out[mode] = {**{f"hit@{k}": (counts[k] / n if n else None) for k in ks}, "n": n}
    return out


def hits_table(rows: dict[str, dict], title: str = "") -> str:
    """{mode: {"hit@1", "hit@3", "n"}} as a small text table."""
    lines = [f"{title or 'retrieval':<28}{'hit@1':>8}{'hit@3':>8}{'n':>6}"]
    for mode, r in rows.items():
        h1, h3 = r.get("hit@1"), r.get("hit@3")
        lines.append(f"{mode:<28}{'-' if h1 is None else f'{h1:.3f}':>8}{'-' if h3 is None else f'{h3:.3f}':>8}"
                     f"{r.get('n', 0):>6}")
    return "\n".join(lines)


def load_questions(path: str | Path) -> list[dict]:
    """Questions for hit@k from a JSONL file: `{"question", "source"[, "history"]}` lines (evalsets/)
    or chat records `{"messages": [...], "source"}` (the data folder's qa_val.jsonl: the first user
    turn is the question). Lines without a question are skipped; a malformed line is an error."""
    out = []
    for lineno, obj in files.iter_jsonl(path, 'expected {"question", "source"} or {"messages", "source"} lines'):
        if not isinstance(obj, dict):
            raise ChatforgeError(f"{path}:{lineno}: expected a JSON object")
        if isinstance(obj.get("question"), str):
            out.append({"question": obj["question"], "source": obj.get("source"), "history": obj.get("history") or [],
                        "section": obj.get("section"), "style": obj.get("style")})
        elif isinstance(obj.get("messages"), list):
            users = [m for m in obj["messages"] if isinstance(m, dict) and m.get("role") == "user"]
            if users and isinstance(users[0].get("content"), str):
                out.append({"question": users[0]["content"], "source": obj.get("source"), "history": []})
    return out
