"""Benchmark: importing the SmolLM2-135M-Instruct GGUF (98 MB, Q4_1) against transformers' loader.

    .venv/bin/python benchmarks/bench_import.py [--gguf FILE.gguf] [--repeats 3]

Without --gguf the file comes from `chatforge data fetch --sources smollm2-135m-instruct` (fetched
into the usual cache if it is not there yet). Each workload runs in a fresh child process (so
that neither one's allocations or caches help the other), interleaved, --repeats times; the
median is reported:
- `chatforge read`: open the GGUF, dequantize every tensor (`read_gguf`) and load them into a
  `GPT`: the same end state as the peer, a model in memory.
- `chatforge import`: the whole `chatforge model import` (read, tokenizer from the metadata,
  write the fp32 model folder of ~540 MB atomically, fsync included).
- `chatforge load`: `load_model` of the imported folder, what every later command pays.
- `transformers`: `AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=float32)`.
Libraries are imported before the clock starts in each child (their import time is not part of
the work). Memory: the rise of the child's peak resident set size (Linux VmHWM, reset through
/proc/self/clear_refs after the imports) above its resident size at the start of the work.

The last line printed is one JSON object: {"bench": "import", ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKLOADS = ["chatforge read", "chatforge import", "chatforge load", "transformers"]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def child(workload: str, gguf_path: Path, out: Path) -> None:
    """In a fresh process: run one workload, print {"seconds", "peak_rise_mib"} as JSON."""
    import torch

    from chatforge.data.gguf_tokenizer import tokenizer_from_gguf  # noqa: F401  (imported before the clock)
    from chatforge.model.folder import load_model
    from chatforge.model.gguf_import import open_gguf, read_gguf
    from chatforge.model.gpt import GPT
    from chatforge.model.importer import import_model

    if workload == "transformers":
        from transformers import AutoModelForCausalLM

    def run():
        if workload == "chatforge read":
            ckpt = read_gguf(open_gguf(gguf_path), gguf_path)
            model = GPT(ckpt.config)
            model.load_state_dict(ckpt.state)
            return model
        if workload == "chatforge import":
            return import_model(gguf_path, out)
        if workload == "chatforge load":
            return load_model(out)
        return AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                    dtype=torch.float32)

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                  # reset the peak-RSS mark to the current size
    before = _status_kib("VmRSS")
    t0 = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    del result
    print(json.dumps({"seconds": seconds, "peak_rise_mib": (peak - before) / 1024}))


def run_child(workload: str, gguf_path: Path, out: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", workload, str(gguf_path), str(out)],
                          capture_output=True, text=True, env={**os.environ, "CHATFORGE_QUIET": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"{workload} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def find_gguf(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    from chatforge.data.fetch import fetch, model_file

    fetch(["smollm2-135m-instruct"], log=lambda m: print(m, file=sys.stderr))
    return model_file("smollm2-135m-instruct")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", default=None, help="the GGUF file (default: the fetched SmolLM2-135M-Instruct)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), Path(args.child[2]))
        return

    import torch

    gguf_path = find_gguf(args.gguf).resolve()
    work = Path(tempfile.mkdtemp(prefix="bench_import."))
    out = work / "model"
    print(f"{gguf_path.name}: {gguf_path.stat().st_size / 1e6:.1f} MB, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.repeats} runs each (fresh process per run)", flush=True)
    runs: dict[str, list[dict]] = {w: [] for w in WORKLOADS}
    try:
        for i in range(args.repeats):
            for w in WORKLOADS:                      # interleaved; "import" writes what "load" reads
                r = run_child(w, gguf_path, out)
                runs[w].append(r)
                print(f"  run {i + 1}: {w:<17} {r['seconds']:6.2f} s  peak RSS +{r['peak_rise_mib']:.0f} MiB",
                      flush=True)
        folder_mb = sum(p.stat().st_size for p in out.iterdir()) / 1e6
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = {w: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "peak_rise_mib")} for w, rs in runs.items()}
    peer = med["transformers"]
    print(f"\n{'workload':<18}{'seconds':>9}{'x transformers':>16}{'peak RSS rise MiB':>19}")
    for w, m in med.items():
        print(f"{w:<18}{m['seconds']:>9.2f}{peer['seconds'] / m['seconds']:>15.2f}x{m['peak_rise_mib']:>19.0f}")
    print(f"(x transformers > 1: faster than transformers' GGUF loading; the imported folder is {folder_mb:.0f} MB)")
    summary = {"bench": "import", "gguf": gguf_path.name, "gguf_mb": round(gguf_path.stat().st_size / 1e6, 1),
               "threads": torch.get_num_threads(), "repeats": args.repeats, "folder_mb": round(folder_mb, 1)}
    for w, m in med.items():
        key = w.replace(" ", "_")
        summary[f"{key}_s"] = round(m["seconds"], 2)
        summary[f"{key}_peak_rise_mib"] = round(m["peak_rise_mib"], 1)
    summary["read_speedup_vs_transformers"] = round(peer["seconds"] / med["chatforge read"]["seconds"], 2)
    summary["import_speedup_vs_transformers"] = round(peer["seconds"] / med["chatforge import"]["seconds"], 2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
