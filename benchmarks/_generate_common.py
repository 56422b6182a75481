"""What the generation benchmarks share (bench_generate_small.py, bench_generate_135m.py,
bench_generate_demo.py and its worker, bench_kernels.py, bench_rollout.py): HF `generate` on the
same weights, timing helpers, the batch-1 ceiling of the weight matmuls, the read bandwidth, and
the command line every part takes (`--new-tokens`, `--repeats`, `--quick`).

Not a benchmark itself; `benchmarks/bench_generate.py` runs the parts together.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Callable

import torch


def add_common_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=None, help="rounds of timing (default 3; 2 with --quick)")
    ap.add_argument("--quick", action="store_true", help="2 rounds, 1 request per client")


def run_main(doc: str, add_options: Callable[[argparse.ArgumentParser], None],
             run: Callable[[argparse.Namespace], dict]) -> None:
    """One part's command line: its options beside the common ones; the last line printed is one
    JSON object, {"bench": "generate", ...} (as bench_generate.py prints for all the parts)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    add_common_options(ap)
    add_options(ap)
    args = finish_common(ap.parse_args())
    print(json.dumps({"bench": "generate", **run(args)}))


def finish_common(args: argparse.Namespace) -> argparse.Namespace:
    if args.repeats is None:
        args.repeats = 2 if args.quick else 3
    return args


def fmt(v: float | None, width: int, digits: int) -> str:
    return f"{v:>{width}.{digits}f}" if v is not None else f"{'n/a':>{width}}"


def hf_twin(model, pad_id: int):
    """HF LlamaForCausalLM with `model`'s weights, never stopping early (no end token): it
    generates as many tokens as asked."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaForCausalLM(LlamaConfig(**model.hf_config())).eval()
    hf.load_state_dict(model.hf_state_dict(), strict=False)
    hf.generation_config.pad_token_id = pad_id
    hf.generation_config.eos_token_id = None
    return hf


def hf_generate(hf, prompts: list[list[int]], new: int, threads: int, pad_id: int, **sampling) -> torch.Tensor:
    """HF `generate` on left-padded `prompts` with `threads` threads: the new tokens, every row
    `new` of them (bench_rollout uses it too)."""
    L = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, **sampling)
    finally:
        torch.set_num_threads(before)
    return out[:, L:]


def mean_time(fn, calls: int, tries: int = 3) -> float:
    """Seconds per call: the mean over `calls` calls in a row, the best of `tries` such runs (a mean
    over a stretch, as a decode rate is, but the stretch least disturbed by other jobs)."""
    fn()
    best = float("inf")
    for _ in range(tries):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t) / calls)
    return best


def roofline(model, repeats: int = 30, kinds: tuple[str, ...] = ("fp32", "bf16", "int8")) -> dict:
    """The floor of one batch-1 decode step on this machine: only the model's weight matmuls
    (every linear layer and the LM head, one token row), nothing else. No implementation that
    keeps the weights in a given dtype can decode faster than 1 / this time. int8 is torch's
    weight-only int8 kernel (`_weight_int8pack_mm`, bf16 activations), when this build has it."""
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    before = torch.get_num_threads()
    out = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("int8", None)):
            if name not in kinds:
                continue
            if dtype is None:
                if not hasattr(torch, "_weight_int8pack_mm"):
                    continue
                packed = []
                for w in weights:
                    scale = w.abs().amax(1).clamp(min=1e-8) / 127
                    packed.append(((w / scale[:, None]).round().to(torch.int8), scale.to(torch.bfloat16)))
                xs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=torch.bfloat16) for w in weights}

                def step():
                    for q, sc in packed:
                        torch._weight_int8pack_mm(xs[q.shape[1]], q, sc)
            else:
                ws = [w.to(dtype) for w in weights]
                xs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=dtype) for w in ws}

                def step():
                    for w in ws:
                        torch.nn.functional.linear(xs[w.shape[1]], w)
            for _ in range(3):
                step()
            t = time.perf_counter()
            for _ in range(repeats):
                step()
            out[f"{name}_{threads}t"] = repeats / (time.perf_counter() - t)
    torch.set_num_threads(before)
    return out


def memory_bandwidth(threads: int, mib: int = 512, repeats: int = 5) -> float:
    """Read bandwidth, bytes/s: the best of `repeats` sums of a `mib` MiB fp32 tensor (far larger
    than the caches) with `threads` torch threads."""
    x = torch.ones(mib * 2 ** 20 // 4)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x.sum()
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            x.sum()
            best = min(best, time.perf_counter() - t)
    finally:
        torch.set_num_threads(before)
    return x.numel() * 4 / best
