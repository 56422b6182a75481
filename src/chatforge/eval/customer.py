"""Retrieval on the hand-written evaluation sets: customer-worded questions and follow-ups.

    from chatforge.eval.customer import customer_rows
    print(customer_rows(cache, out_dir=Path("runs/demo/eval-customer")))

The sets in the repository's `evalsets/` (see its README) are asked against their documents:
`customer-gitfaq` against the fetched git FAQ (the unseen manual), `customer-company` against
`examples/my_docs`, `followups` against both, `manual-git` (its customer- and title-worded halves
apart) against the fetched Git manual, each in BM25, dense and hybrid mode (dense and
hybrid only when the embedding model is there), follow-ups also with the last message alone.
Hit@k is on passages (`retrieval.hits`). The pipeline prints these rows at the end of the demo;
`OUT/hits.json` keeps them. Seconds: the sets' documents are 240 passages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from chatforge import files
from chatforge.retrieval.fusion import auto_mode, load_retriever
from chatforge.retrieval.hits import hits_table, load_questions, retrieval_hits

ROOT = Path(__file__).resolve().parents[3]         # the repository (evalsets/ and examples/ live there)
SETS = {"customer-gitfaq": ("git-faq",), "customer-company": ("my_docs",), "followups": ("git-faq", "my_docs"),
        "manual-git": ("git-manual",)}
# A set whose lines carry a "style" is scored per style (the manual's customer- and title-worded halves).


def customer_rows(cache: Path, out_dir: Path | None = None, model: str | None = None,
                  root: Path = ROOT) -> str | None:
    """The table of hit@1 / hit@3 per set and mode (None when the sets or documents are missing)."""
    where = {"git-faq": Path(cache) / "sources" / "git-faq", "my_docs": root / "examples" / "my_docs",
             "git-manual": Path(cache) / "sources" / "git-manual"}
    if not (root / "evalsets").is_dir() or not all(where[d].is_dir() for d in SETS["followups"]):
        return None
    dense = auto_mode(model) != "bm25"
    modes = ("bm25", "dense", "hybrid") if dense else ("bm25",)
    results: dict[str, Any] = {}
    lines = []
    for name, docs in SETS.items():
        path = root / "evalsets" / f"{name}.jsonl"
        if not path.is_file() or not all(where[d].is_dir() for d in docs):
            continue
        qs = load_questions(path)
        retriever = load_retriever([where[d] for d in docs], mode="hybrid" if dense else "bm25", model=model)
        styles = sorted({q["style"] for q in qs if q.get("style")})
        for style in styles or [None]:
            key = f"{name}, {style}" if style else name
            results[key] = retrieval_hits(retriever, [q for q in qs if q.get("style") == style], modes)
            lines.append(hits_table(results[key], f"{key} ({len(retriever)} passages, {retriever.embedding_model})"))
        if any(q["history"] for q in qs):
            results[f"{name}-last-message-only"] = retrieval_hits(retriever, qs, modes, last_message_only=True)
            lines.append(hits_table(results[f"{name}-last-message-only"], f"{name}, last message only"))
    if out_dir is not None and results:
        files.write_json(Path(out_dir) / "hits.json", results)
    return "\n".join(lines) if lines else None


def main() -> None:     # python -m chatforge.eval.customer: the rows alone
    print(customer_rows(files.cache_dir()) or "evalsets/ or the fetched git-faq is missing")


if __name__ == "__main__":
    main()
