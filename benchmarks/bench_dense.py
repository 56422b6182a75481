"""Dense retrieval's cost beside BM25: query latency, document embedding speed, memory.

    .venv/bin/python benchmarks/bench_dense.py                     # 10k passages of the fetched docs
    .venv/bin/python benchmarks/bench_dense.py --passages 2000 --doc-sample 200 --max-tokens 256,128

On one thread (`--threads`), over `--passages` passages of the fetched python-docs, perl-docs
and debian-reference (`chatforge data fetch`; the embedding model `--sources all-minilm-l6-v2`):
- query latency (p50 / p95 over `--queries` customer-worded questions from evalsets/) of BM25
  (`PassageIndex.search`), dense (`Retriever` in "dense" mode: embedding the question + the
  matrix product + top-k) and hybrid (both + reciprocal-rank fusion); the ratio dense / BM25;
- document embedding: passages/s over `--doc-sample` passages for each `--max-tokens` and
  precision (bf16 weights where the CPU computes bf16, and fp32), batch 16;
- peak resident memory after each phase (ru_maxrss) and the matrix size.
The passage vectors of the latency test are random unit vectors: the search cost does not depend
on their values, and embedding 10k passages would take minutes (the embedding rows give that
cost). A readable table, then one JSON line `{"bench": "dense", ...}`.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from chatforge.files import cache_dir
from chatforge.retrieval.dense import DenseIndex
from chatforge.retrieval.embed import Embedder, _native_bf16
from chatforge.retrieval.fusion import Retriever
from chatforge.retrieval.index import PassageIndex
from chatforge.retrieval.passages import read_passages

ROOT = Path(__file__).resolve().parent.parent
DOC_SOURCES = ["python-docs", "perl-docs", "debian-reference"]


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def percentiles(ms: list[float]) -> tuple[float, float]:
    ms = sorted(ms)
    return statistics.median(ms), ms[min(len(ms) - 1, int(round(0.95 * (len(ms) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=None, help="chatforge cache with the fetched sources and model")
    ap.add_argument("--model", default="all-minilm-l6-v2", help="embedding model (folder or fetched source)")
    ap.add_argument("--passages", type=int, default=10_000)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--doc-sample", type=int, default=300)
    ap.add_argument("--max-tokens", default="256,128")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cache = Path(args.cache) if args.cache else cache_dir()
    dirs = [cache / "sources" / s for s in DOC_SOURCES if (cache / "sources" / s).is_dir()]
    if not dirs:
        sys.exit(f"no fetched docs in {cache}/sources; run `chatforge data fetch` first")
    rng = random.Random(args.seed)
    passages = read_passages(dirs)
    passages = rng.sample(passages, min(args.passages, len(passages)))
    questions = [json.loads(line)["question"] for name in ("customer-gitfaq", "customer-company")
                 for line in open(ROOT / "evalsets" / f"{name}.jsonl", encoding="utf-8")][: args.queries]
    rows: list[dict] = []
    out: dict = {"bench": "dense", "threads": args.threads, "passages": len(passages), "queries": len(questions)}
    mem0 = peak_mb()

    # --- query latency -------------------------------------------------------------------------
    t = time.perf_counter()
    index = PassageIndex.from_passages(passages)
    out["bm25_build_s"] = round(time.perf_counter() - t, 2)
    out["peak_mb_bm25"] = round(peak_mb())
    embedder = Embedder.load(args.model, cache)
    vecs = np.random.default_rng(args.seed).standard_normal((len(passages), embedder.dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    retriever = Retriever(index, DenseIndex(vecs, embedder), "dense")
    out["matrix_mb"] = round(vecs.nbytes / 2**20, 1)
    for q in questions[:5]:                                        # warm-up (kernels, caches)
        retriever.search(q, 3, mode="hybrid")
    for mode in ("bm25", "dense", "hybrid"):
        ms = []
        for q in questions:
            t = time.perf_counter()
            retriever.search(q, 3, mode=mode)
            ms.append((time.perf_counter() - t) * 1000)
        p50, p95 = percentiles(ms)
        out[f"{mode}_p50_ms"], out[f"{mode}_p95_ms"] = round(p50, 2), round(p95, 2)
        rows.append({"what": f"query {mode}", "p50 ms": p50, "p95 ms": p95})
    out["dense_over_bm25_p95"] = round(out["dense_p95_ms"] / max(out["bm25_p95_ms"], 1e-9), 2)
    out["peak_mb_query"] = round(peak_mb())

    # --- document embedding --------------------------------------------------------------------
    sample = DenseIndex.texts(rng.sample(passages, min(args.doc_sample, len(passages))))
    for max_tokens in [int(x) for x in args.max_tokens.split(",")]:
        for precision in ("bf16", "fp32"):
            if precision == "bf16" and not _native_bf16():
                continue                                           # emulated bf16: slower, not a choice
            emb = Embedder.load(args.model, cache, max_tokens=max_tokens, precision=precision)
            emb.encode(sample[:16], 16)
            t = time.perf_counter()
            emb.encode(sample, 16)
            rate = len(sample) / (time.perf_counter() - t)
            key = f"embed_{precision}_{max_tokens}_per_s"
            out[key] = round(rate, 1)
            rows.append({"what": f"embed {precision} {max_tokens} tok", "passages/s": rate,
                         "20k passages min": 20_000 / rate / 60})
    out["peak_mb_embed"] = round(peak_mb())
    out["peak_mb_start"] = round(mem0)

    print(f"{len(passages)} passages, {len(questions)} queries, {args.threads} thread(s); matrix {out['matrix_mb']} MB")
    for r in rows:
        cells = "  ".join(f"{k} {v:.2f}" for k, v in r.items() if k != "what")
        print(f"{r['what']:<26} {cells}")
    print(f"peak memory: {out['peak_mb_bm25']} MB after BM25, {out['peak_mb_query']} MB after queries, "
          f"{out['peak_mb_embed']} MB after embedding")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
