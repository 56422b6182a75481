"""Benchmark of `chatforge data build` on the fetched default corpus.

    .venv/bin/python benchmarks/bench_data.py              # the default sources in the cache
    .venv/bin/python benchmarks/bench_data.py --input DIR  # any folder instead

Measures the whole build (seconds, MB/s, peak resident memory) and the throughput of its
stages on the built corpus: normalisation, PII scrubbing and MinHash signatures. The peer
for the last one is datasketch's own per-shingle `MinHash.update` loop (the way its
documentation builds a signature); the ratio shows what batching the shingles buys. Prints
a table and, as its last line, one JSON object `{"bench": "data", ...}`.

Run `chatforge data fetch` first; sources still being fetched are simply not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from chatforge.data.build import DEFAULT_EXCLUDED, build, default_inputs
from chatforge.data.clean import normalize, scrub_pii
from chatforge.data.dedup import NearDedup


def peak_rss_mb() -> float:
    # ru_maxrss is in kilobytes on Linux (bytes on macOS).
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e6


def rate(fn, texts: list[str]) -> float:
    """MB/s of `fn` over `texts`."""
    start = time.perf_counter()
    for t in texts:
        fn(t)
    seconds = time.perf_counter() - start
    return sum(len(t.encode("utf-8")) for t in texts) / 1e6 / seconds


def datasketch_reference(text: str, num_perm: int) -> None:
    """A MinHash built the way datasketch's documentation shows: one update per shingle."""
    from datasketch import MinHash

    words = text.lower().split()
    m = MinHash(num_perm=num_perm)
    for i in range(max(1, len(words) - 4)):
        m.update(" ".join(words[i:i + 5]).encode("utf-8"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", default=None, help="inputs (default: the fetched default sources)")
    ap.add_argument("--sample-mb", type=float, default=2.0, help="corpus sample for the stage measurements")
    args = ap.parse_args()
    inputs = [Path(p) for p in args.input] if args.input else default_inputs()
    if not inputs:
        sys.exit("no fetched sources found: run `chatforge data fetch` (or pass --input)")
    os.environ.setdefault("CHATFORGE_QUIET", "1")
    rss_before = peak_rss_mb()

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "built"
        start, cpu_start = time.perf_counter(), time.process_time()
        report = build(inputs, out)
        seconds = time.perf_counter() - start
        cpu_seconds = time.process_time() - cpu_start   # steadier than wall time on a shared machine
        rss_build = peak_rss_mb()
        # A sample of built passages for the stage measurements.
        sample, size = [], 0
        with open(out / "corpus.jsonl", encoding="utf-8") as f:
            for line in f:
                text = json.loads(line)["text"]
                sample.append(text)
                size += len(text)
                if size > args.sample_mb * 1e6:
                    break

    mb = report["bytes_in"] / 1e6
    near = NearDedup(num_perm=64)
    stages = {
        "normalize": rate(normalize, sample),
        "scrub_pii": rate(scrub_pii, sample),
        "minhash (chatforge)": rate(near.signature, sample),
        "minhash (datasketch per-shingle)": rate(lambda t: datasketch_reference(t, 64), sample[:200]),
    }
    speedup = stages["minhash (chatforge)"] / stages["minhash (datasketch per-shingle)"]

    print(f"inputs: {', '.join(p.name for p in inputs)} (default excludes {', '.join(DEFAULT_EXCLUDED)})")
    print(f"{'source':<20} {'files':>6} {'passages':>9} {'pairs':>7} {'convs':>7} {'MB in':>8}")
    for name, s in report["sources"].items():
        print(f"{name:<20} {s['files']:>6} {s['documents']:>9} {s['pairs']:>7} {s['conversations']:>7} "
              f"{s['bytes_in'] / 1e6:>8.2f}")
    print()
    print(f"{'measure':<34} {'value':>12}")
    rows = [("input MB", f"{mb:.2f}"), ("build seconds", f"{seconds:.1f}"), ("build MB/s", f"{mb / seconds:.2f}"),
            ("build CPU seconds", f"{cpu_seconds:.1f}"), ("build MB per CPU second", f"{mb / cpu_seconds:.2f}"),
            ("peak RSS MB (whole process)", f"{rss_build:.0f}"),
            ("peak RSS MB before the build", f"{rss_before:.0f}")]
    rows += [(f"{k} MB/s", f"{v:.2f}") for k, v in stages.items()]
    rows.append(("minhash speed-up vs datasketch loop", f"{speedup:.1f}x"))
    for k, v in rows:
        print(f"{k:<34} {v:>12}")
    print()
    print("filters (kept/removed):", ", ".join(f"{k} {v['kept']}/{v['removed']}" for k, v in report["filters"].items()))
    print("PII:", ", ".join(f"{k} {v}" for k, v in report["pii"].items()))
    print("dedup:", report["dedup"], " outputs:", report["outputs"])
    print(json.dumps({
        "bench": "data", "inputs": [p.name for p in inputs], "mb_in": round(mb, 3), "seconds": round(seconds, 2),
        "mb_per_s": round(mb / seconds, 3),
        "cpu_seconds": round(cpu_seconds, 2), "mb_per_cpu_s": round(mb / cpu_seconds, 3), "peak_rss_mb": round(rss_build, 1),
        "passages": report["outputs"]["corpus"], "qa": report["outputs"]["qa"],
        "corpus_mb": round(report["sizes"].get("corpus.jsonl", 0) / 1e6, 3),
        "pii": report["pii"], "dedup": report["dedup"], "filters": report["filters"],
        "stage_mb_per_s": {k: round(v, 2) for k, v in stages.items()},
        "minhash_speedup_vs_datasketch_loop": round(speedup, 2),
    }))


if __name__ == "__main__":
    main()
