"""Retrieval quality: does the passage index put the right passage first?

    .venv/bin/python benchmarks/bench_retrieval.py                      # the demo's data and sources
    .venv/bin/python benchmarks/bench_retrieval.py --misses             # also list the questions missed
    .venv/bin/python benchmarks/bench_retrieval.py --data runs/x/data --cache ~/.cache/chatforge --before REV

Question sets (the first and third are exactly what the pipeline's `chatforge eval` runs):
- "val": the demo's validation Q&A (`DATA/qa_val.jsonl`) in the fetched default sources
  (`CACHE/sources/<name>` of `chatforge.pipeline.DEFAULTS`);
- "val-ans": the same, with the reference answer's first 20 words as the query: a check that
  the heading field does not drown out the passage text (questions rarely repeat a heading);
- "unseen": the held-out git FAQ's own Q&A pairs (`write_unseen_questions`) in that manual;
- "unseen+": the same questions in that manual plus all the default sources (harder: the
  manual must win against 20 MB of other documentation).
For each variant: hit@1 and hit@3 exactly as `chatforge eval` counts them (a top passage comes
from a gold document, `chatforge.eval.evaluate._gold_docs`), MRR over the first 10 passages, ans@3
(a top-3 passage of a gold document holds at least 80% of the reference answer's distinct
words: the passage the model must copy from, not just its document), the index's build time
(reading, splitting, indexing, saving) and size on disk, and the search time per question.

Variants: "before" is `chatforge/retrieval/` as of git revision `--before` (the
paragraph passages this benchmark was written to replace), loaded from git into this process;
the others are the current module with the heading field's weight set to 0 (structured passages
only) and to a few values around `HEADING_WEIGHT`. The last line is one JSON object:
{"bench": "retrieval", ...}.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

from chatforge.files import cache_dir
from chatforge.eval.metrics import rouge_l
from chatforge.eval.evaluate import _gold_docs, load_questions
from chatforge.retrieval import index as retrieval
from chatforge.pipeline import DEFAULTS, write_unseen_questions

BEFORE_REV = "e9d6d8992ba0df7789f26c7fe8f2dd75dce04ac6"   # the last paragraph-splitting version
WEIGHTS = (0.0, 0.5, 1.0, 2.0, 4.0)
MRR_DEPTH = 10
ANSWER_WORDS = 20          # "val-ans": the first words of the reference answer are the query


def module_at(rev: str) -> types.ModuleType | None:
    """retrieval.py as of git revision `rev`, as a module (None when git cannot show it)."""
    repo = Path(__file__).resolve().parents[1]
    try:
        code = subprocess.run(["git", "-C", str(repo), "show", f"{rev}:src/chatforge/infer/retrieval.py"],
                              check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"note: no 'before' variant: git show {rev} failed ({e})", file=sys.stderr)
        return None
    module = types.ModuleType("retrieval_before")
    sys.modules[module.__name__] = module      # dataclasses look their module up by name
    exec(compile(code, f"retrieval.py@{rev[:8]}", "exec"), module.__dict__)
    return module


def words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


def holds_answer(passage_text: str, reference: str) -> bool:
    ref = words(reference)
    return bool(ref) and len(ref & words(passage_text)) >= 0.8 * len(ref)


def build(module: types.ModuleType, docs: list[Path], folder: Path) -> tuple:
    """(index, build seconds, bytes on disk) of `module`'s index of `docs`, cached in `folder`."""
    t0 = time.perf_counter()
    index = module.PassageIndex.build(docs, folder)
    seconds = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return index, seconds, size


_built: dict = {}


def built(module: types.ModuleType, docs: list[Path], tmp: Path) -> tuple:
    """`build`, once per module and set of documents."""
    key = (module.__name__, tuple(docs))
    if key not in _built:
        _built[key] = build(module, docs, tmp / f"index-{len(_built)}")
    return _built[key]


def measure(index, questions: list[dict], misses: list | None = None) -> dict:
    """hit@1, hit@3, MRR@10, ans@3 and ms per search of `index` on `questions` (those with a gold doc)."""
    n = hit1 = hit3 = ans3 = 0
    rr = 0.0
    t0 = time.perf_counter()
    results = [index.search(q["question"], MRR_DEPTH) for q in questions]
    ms = (time.perf_counter() - t0) * 1000 / max(1, len(questions))
    for q, hits in zip(questions, results):
        gold = _gold_docs(index, q, rouge_l)
        if gold is None:
            continue
        n += 1
        rank = next((i for i, p in enumerate(hits) if p.doc in gold), None)
        hit1 += rank == 0
        hit3 += rank is not None and rank < 3
        rr += 0.0 if rank is None else 1.0 / (rank + 1)
        ans3 += any(p.doc in gold and holds_answer(p.text, q["reference"]) for p in hits[:3])
        if misses is not None and rank != 0:
            misses.append((q["question"], gold, rank, [p.source for p in hits[:3]]))
    if not n:
        return {"questions": 0}
    return {"questions": n, "hit@1": hit1 / n, "hit@3": hit3 / n, "mrr": rr / n, "ans@3": ans3 / n,
            "ms_per_query": ms}


def question_sets(data: Path, cache: Path, tmp: Path) -> list[tuple[str, list[dict], list[Path]]]:
    """[(name, questions, documents)]: see the module docstring."""
    sources = [cache / "sources" / s for s in DEFAULTS["run"]["sources"] if (cache / "sources" / s).is_dir()]
    unseen = cache / "sources" / DEFAULTS["run"]["unseen"]
    sets = []
    if (data / "qa_val.jsonl").is_file() and sources:
        val = load_questions(data / "qa_val.jsonl")
        sets.append(("val", val, sources))
        # The answer's opening words as the query: ranking on the passage text, not on headings.
        sets.append(("val-ans", [dict(q, question=" ".join(q["reference"].split()[:ANSWER_WORDS])) for q in val],
                     sources))
    if unseen.is_dir() and write_unseen_questions(unseen, tmp / "unseen.jsonl"):
        unseen_qs = load_questions(tmp / "unseen.jsonl")
        sets.append(("unseen", unseen_qs, [unseen]))
        if sources:
            sets.append(("unseen+", unseen_qs, sources + [unseen]))
    if not sets:
        raise SystemExit(f"nothing to measure: build the demo data ({data}/qa_val.jsonl, `chatforge pipeline "
                         f"--until build`) and fetch the sources into {cache} (`chatforge data fetch`)")
    return sets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="runs/demo/data", help="data folder whose qa_val.jsonl holds the questions")
    ap.add_argument("--cache", default=None, help="chatforge cache with the fetched sources (default: $CHATFORGE_CACHE "
                                                  "or ~/.cache/chatforge)")
    ap.add_argument("--before", default=BEFORE_REV, help="git revision of the 'before' variant")
    ap.add_argument("--misses", action="store_true", help="list the questions whose top passage is not from a gold doc")
    args = ap.parse_args()
    cache = Path(args.cache).expanduser() if args.cache else cache_dir()
    before = module_at(args.before)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for set_name, questions, docs in question_sets(Path(args.data), cache, tmp):
            if before is not None:
                index, seconds, size = built(before, docs, tmp)
                rows.append({"set": set_name, "variant": f"before ({args.before[:8]})", "passages": len(index),
                             "build_s": seconds, "index_mb": size / 1e6, **measure(index, questions)})
            index, seconds, size = built(retrieval, docs, tmp)
            for w in WEIGHTS:
                index.heading_weight = w
                misses: list = []
                chosen = w == retrieval.HEADING_WEIGHT
                name = "structure" + (f" + heading x{w:g}" if w else ", no heading field") + (" *" if chosen else "")
                rows.append({"set": set_name, "variant": name, "passages": len(index), "build_s": seconds,
                             "index_mb": size / 1e6, "heading_weight": w, "chosen": chosen,
                             **measure(index, questions, misses if chosen else None)})
                if chosen and args.misses:
                    for question, gold, rank, top in misses:
                        print(f"[{set_name}] miss (gold rank {rank}): {question[:90]}\n    gold {gold}")
                        for source in top:
                            print(f"    got  {source[:110]}")

    cols = ["passages", "build_s", "index_mb", "hit@1", "hit@3", "mrr", "ans@3", "ms_per_query"]
    print(f"{'set':<8} {'variant':<34}" + "".join(f"{c:>13}" for c in cols))
    for r in rows:
        cells = "".join(f"{r[c]:>13.3f}" if isinstance(r.get(c), float) else f"{r.get(c, '-'):>13}" for c in cols)
        print(f"{r['set']:<8} {r['variant']:<34}{cells}")
    print("(* = HEADING_WEIGHT, the default; hit@k as `chatforge eval` counts it; ans@3: a top-3 passage "
          "holds the reference answer)")

    def pick(set_name: str, chosen: bool) -> dict:
        for r in rows:
            if r["set"] == set_name and (r.get("chosen") if chosen else r["variant"].startswith("before")):
                return {k: r[k] for k in ("passages", "build_s", "index_mb", "hit@1", "hit@3", "mrr", "ans@3",
                                          "ms_per_query") if k in r}
        return {}

    summary = {"bench": "retrieval", "heading_weight": retrieval.HEADING_WEIGHT, "before_rev": args.before,
               **{f"{s}_{which}": pick(s, which == "now") for s in ("val", "val-ans", "unseen", "unseen+") for which in ("before", "now")},
               "variants": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
