"""Benchmark: chatforge's inference engine against HF `generate` and llama.cpp, three parts in one run.

    .venv/bin/python benchmarks/bench_generate.py [--only small|135m|demo] [the parts' options]

Each part is its own script, with its own options and documentation:
- `bench_generate_small.py` (`--only small`): a 13.8M random-weight model against HF `generate`,
  greedy and beam search at batch 1 and 8, peak memory, the batch-1 ceiling;
- `bench_generate_135m.py` (`--only 135m`): SmolLM2-135M-Instruct (imported) against HF, short and
  grounded prompts, bf16 / fp32 / 2 threads;
- `bench_generate_demo.py` (`--only demo`): the demo assistant run by chatforge (fp32, bf16, int8,
  int4), llama.cpp and HF, then `chatforge serve` against llama.cpp's servers.
Without `--only`, all three run (a part whose model is missing says so and is skipped); this
command takes every part's options, so each documented command line works here too. Their shared
helpers are in `_generate_common.py`.

The last line printed is one JSON object: {"bench": "generate", ...} with every part's figures.
"""

from __future__ import annotations

import argparse
import json

import bench_generate_135m
import bench_generate_demo
import bench_generate_small
from _generate_common import add_common_options, finish_common

PARTS = {"small": bench_generate_small, "135m": bench_generate_135m, "demo": bench_generate_demo}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_options(ap)
    ap.add_argument("--only", choices=list(PARTS), default=None, help="run one of the three parts")
    for part in PARTS.values():
        part.add_options(ap)
    args = finish_common(ap.parse_args())
    summary: dict = {"bench": "generate"}
    for name, part in PARTS.items():
        if args.only in (None, name):
            summary.update(part.run(args))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
