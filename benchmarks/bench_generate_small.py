"""Benchmark: chatforge's inference engine against HF `generate` on a small random-weight model.

    .venv/bin/python benchmarks/bench_generate_small.py [--new-tokens 128] [--prompt-len 32] [--repeats 3] [--bf16]

(`benchmarks/bench_generate.py --only small` runs the same; the 135M model and the demo assistant
are bench_generate_135m.py and bench_generate_demo.py.)

The small model is the 13.8M Llama shape (d_model 384, 6 layers, 6 heads, 6 KV heads, d_ff 1024,
vocab 8192, tied embeddings), random weights; the same weights go into HF `LlamaForCausalLM`.
Workloads: batch 1 and batch 8, greedy and beam search with 4 beams, 128 new tokens, no stop
token (both sides generate every token). tokens/s counts the returned new tokens (batch x 128;
for beam search the best sequence of each prompt, not every beam). The engine runs in fp32 here
(`dtype="float32"`), the same weights as HF; with --bf16 it is also timed with bf16 weights (not
HF-exact, so an extra column, not the headline speedup).

Timing: chatforge and HF run in this one process, interleaved (c, h, h, c, h, h, ...), and the
median of the repeats is reported; the machine is shared, so absolute figures drift but ratios
hold. HF runs both with 1 thread and with torch's default; the speedup is against the faster of
the two, since the engine itself uses 1 thread for these models.

Memory: torch's CPU allocator keeps no statistics (and tracemalloc does not see torch), so each
workload is also run once in a fresh child process that reports how far its peak resident set
size (Linux `VmHWM`, reset through /proc/self/clear_refs after loading the model and a 2-token
warm-up) rose above the resident size before generating: the extra memory the generation needed
(KV cache, activations, buffers), to within the allocator's page granularity.

Ceiling: after the workloads, the weight matmuls of one batch-1 decode step are timed alone
(fp32, bf16 and weight-only int8; 1 and 2 threads). At batch 1 decoding streams every weight
once per token, so this is about the fastest any implementation with those weights can go here.

The last line printed is one JSON object: {"bench": "generate", ...}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch
from _generate_common import hf_twin, roofline, run_main
from _llamacpp import status_kib

SHAPE = dict(vocab_size=8192, d_model=384, n_layer=6, n_head=6, n_kv_head=6, d_ff=1024, max_seq_len=512,
             tie_embeddings=True)
WORKLOADS = [("greedy", 1), ("greedy", 8), ("beam4", 1), ("beam4", 8)]


def build(seed: int = 0):
    """The chatforge model and an HF LlamaForCausalLM with the same weights."""
    from chatforge.model.gpt import GPT, GPTConfig

    torch.manual_seed(seed)
    model = GPT(GPTConfig(**SHAPE)).eval()
    return model, hf_twin(model, pad_id=0)


def prompts(batch: int, length: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(batch * 1000 + length)
    return torch.randint(1, SHAPE["vocab_size"], (batch, length), generator=g)


def run_chatforge(engine, ids: torch.Tensor, kind: str, new: int) -> int:
    from chatforge.infer.engine import GenerationConfig

    cfg = (GenerationConfig(max_new_tokens=new) if kind == "greedy"
           else GenerationConfig(strategy="beam", num_beams=4, max_new_tokens=new))
    out = engine.generate(ids.tolist(), cfg)
    return sum(len(r.tokens) for r in out)


def run_hf(hf, ids: torch.Tensor, kind: str, new: int, threads: int | None = None) -> int:
    beams = 1 if kind == "greedy" else 4
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                          do_sample=False, num_beams=beams)
    torch.set_num_threads(before)
    return (out.shape[1] - ids.shape[1]) * ids.shape[0]


def timed(fn) -> tuple[float, int]:
    t = time.perf_counter()
    n = fn()
    return time.perf_counter() - t, n


def memory_child(impl: str, kind: str, batch: int, new: int, plen: int) -> None:
    """In a fresh process: print the peak RSS growth (KiB) of one generation."""
    from chatforge.infer.engine import Engine

    model, hf = build()
    engine = Engine(model, stop_ids=[], dtype="float32")
    ids = prompts(batch, plen)
    run = (lambda n: run_chatforge(engine, ids, kind, n)) if impl == "chatforge" else (lambda n: run_hf(hf, ids, kind, n))
    run(2)  # warm-up: lazy initialisation is not generation memory
    import gc

    gc.collect()
    # Reset the kernel's peak-RSS mark (VmHWM), else loading the model (two copies of the
    # weights for a moment) is the peak and every generation shows 0 growth.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status_kib("VmRSS")
    run(new)
    print(status_kib("VmHWM") - before)


def peak_memory_mib(impl: str, kind: str, batch: int, new: int, plen: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--memory-child", impl, kind, str(batch), str(new), str(plen)],
                         capture_output=True, text=True, check=True, env={**os.environ, "CHATFORGE_QUIET": "1"})
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def run(args: argparse.Namespace) -> dict:
    """The 13.8M random-weight model: the table above the JSON's top-level keys."""
    from chatforge.infer.engine import Engine

    model, hf = build()
    engine = Engine(model, stop_ids=[], dtype="float32")
    engine_bf16 = Engine(model, stop_ids=[], dtype="bfloat16") if args.bf16 else None
    print(f"model: {model.num_params() / 1e6:.1f}M parameters, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens")
    results: dict[str, dict] = {}
    n_threads = torch.get_num_threads()
    for kind, batch in WORKLOADS:
        ids = prompts(batch, args.prompt_len)
        run_chatforge(engine, ids, kind, 4), run_hf(hf, ids, kind, 4)  # warm-up
        if engine_bf16 is not None:
            run_chatforge(engine_bf16, ids, kind, 4)
        cf, hf1, hfn, cf16 = [], [], [], []
        for _ in range(args.repeats):
            t, n = timed(lambda: run_chatforge(engine, ids, kind, args.new_tokens))
            cf.append(n / t)
            if engine_bf16 is not None:
                t, n = timed(lambda: run_chatforge(engine_bf16, ids, kind, args.new_tokens))
                cf16.append(n / t)
            t, n = timed(lambda: run_hf(hf, ids, kind, args.new_tokens, threads=1))
            hf1.append(n / t)
            t, n = timed(lambda: run_hf(hf, ids, kind, args.new_tokens))
            hfn.append(n / t)
        key = f"{kind}_b{batch}"
        r = results[key] = {"chatforge_tok_s": statistics.median(cf), "hf_1thread_tok_s": statistics.median(hf1),
                            f"hf_{n_threads}threads_tok_s": statistics.median(hfn)}
        # The ratio is against HF's better thread setting, so the engine's own thread choice
        # (1 thread for a small model) is not what makes the difference.
        r["hf_tok_s"] = max(r["hf_1thread_tok_s"], r[f"hf_{n_threads}threads_tok_s"])
        r["speedup"] = r["chatforge_tok_s"] / r["hf_tok_s"]
        bf16 = ""
        if cf16:
            r["chatforge_bf16_tok_s"] = statistics.median(cf16)
            bf16 = f", chatforge bf16 {r['chatforge_bf16_tok_s']:.0f}"
        print(f"  {key}: chatforge {r['chatforge_tok_s']:.0f} tok/s{bf16}, HF {r['hf_1thread_tok_s']:.0f} (1 thread) / "
              f"{r[f'hf_{n_threads}threads_tok_s']:.0f} ({n_threads} threads)", flush=True)
        if not args.no_memory:
            for impl in ("chatforge", "hf"):
                results[key][f"{impl}_peak_mib"] = peak_memory_mib(impl, kind, batch, args.new_tokens, args.prompt_len)

    print(f"\n{'workload':<12}{'chatforge tok/s':>16}{'HF best tok/s':>15}{'speedup':>9}"
          f"{'chatforge MiB':>15}{'HF MiB':>9}")
    for key, r in results.items():
        mem = (f"{r['chatforge_peak_mib']:>15.1f}{r['hf_peak_mib']:>9.1f}" if "hf_peak_mib" in r else "")
        bf16 = f"   (bf16: {r['chatforge_bf16_tok_s']:.0f} tok/s)" if "chatforge_bf16_tok_s" in r else ""
        print(f"{key:<12}{r['chatforge_tok_s']:>16.0f}{r['hf_tok_s']:>15.0f}{r['speedup']:>8.2f}x{mem}{bf16}")
    roof = roofline(model)
    hf_b1 = results["greedy_b1"]["hf_tok_s"]
    print("\nbatch-1 ceiling: the weight matmuls alone of one decode step, in tokens/s (x HF greedy b1):")
    print("  " + ", ".join(f"{k} {v:.0f} ({v / hf_b1:.1f}x)" for k, v in roof.items()))
    scaling = results["greedy_b8"]["chatforge_tok_s"] / results["greedy_b1"]["chatforge_tok_s"]
    print(f"\nbatch 8 / batch 1 greedy throughput (chatforge): {scaling:.1f}x")
    print("memory: peak RSS growth during one generation, in a fresh process per workload")
    summary = {"new_tokens": args.new_tokens, "prompt_len": args.prompt_len,
               "threads": torch.get_num_threads(), "batch8_over_batch1_greedy": round(scaling, 2),
               "batch1_ceiling_tok_s": {k: round(v, 1) for k, v in roof.items()}}
    for key, r in results.items():
        for name, value in r.items():
            summary[f"{key}_{name}"] = round(value, 2)
    return summary


def add_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--no-memory", action="store_true", help="skip the per-workload memory child processes")
    ap.add_argument("--bf16", action="store_true", help="also time the engine with a bfloat16 copy of the weights")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--memory-child"]:          # peak_memory_mib's child process
        impl, kind, batch, new, plen = sys.argv[2:7]
        memory_child(impl, kind, int(batch), int(new), int(plen))
    else:
        run_main(__doc__, add_options, run)
