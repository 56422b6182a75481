"""Benchmark: how fast can batch-1 decoding of the demo assistant be with the kernels chatforge can use?

    .venv/bin/python benchmarks/bench_kernels.py [--model runs/demo/sft] [--gguf-dir runs/demo/export]
        [--threads 1] [--context 600]

At batch 1 a decode step streams every weight once, so its floor is the time its linear layers
take with the fastest kernel at hand, plus attention over the cached keys and values. This script
times, on the demo model's own layer shapes (every linear layer of the model, the LM head
included, each with its own weights, one row in), each kernel PyTorch offers for the job, and
bitsandbytes' 4-bit one when it is importable:

- bf16: `nn.Linear` on oneDNN with the weight prepacked (`model/fuse.py`, the engine's path);
  fp32 `F.linear` for reference;
- int8: `aten._weight_int8pack_mm` (weight-only, the engine's `--quant int8`), and, for reference,
  `quantized.linear_dynamic` (fbgemm/x86: the activations are quantized to 8 bits per call, so not
  weight-only) and `torch._int_mm` (int8 x int8, activations already quantized: the matmul alone);
- int4: `aten._weight_int4pack_mm_for_cpu` (the engine's `--quant int4`), bitsandbytes' nf4
  `gemv_4bit` (CPU, AVX512-BF16);
- attention: `scaled_dot_product_attention` of one query over `--context` cached positions, per
  layer, in the engine's cache dtype (fp32).

Beside them: the read bandwidth of this machine at the same thread count (the streaming
ceiling), and llama.cpp's own decode step on the demo's GGUF exports (f16, q8_0, q4_0; llama-cpp-
python in a child process, `--context` tokens of real text, then 64 greedy tokens, its own timer).
The table gives, per precision, the floor = fastest weight-only kernel over all layers + attention,
what is left of llama.cpp's whole step once the floor is spent, and the floor against the
ceiling. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from _generate_common import mean_time, memory_bandwidth  # noqa: E402


def best_time(fn) -> float:
    """Seconds per call of `fn`: the best of 5 means over 10 calls in a row."""
    return mean_time(fn, 10, 5)


def layer_shapes(cfg) -> list[tuple[int, int]]:
    """(out, in) of every linear layer a decode step runs, q/k/v and gate/up fused as the engine does."""
    qkv = (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim
    block = [(qkv, cfg.d_model), (cfg.d_model, cfg.n_head * cfg.head_dim), (2 * cfg.d_ff, cfg.d_model),
             (cfg.d_model, cfg.d_ff)]
    return block * cfg.n_layer + [(cfg.vocab_size, cfg.d_model)]


def kernels() -> dict:
    """name -> (precision, bytes per weight, make(out, in) -> state, call(state, x_bf16, x_fp32))."""
    def bf16(o, i):
        return torch.ops.mkldnn._reorder_linear_weight(torch.randn(o, i, dtype=torch.bfloat16), 1)

    def w8(o, i):
        return torch.randint(-127, 128, (o, i), dtype=torch.int8), torch.rand(o, dtype=torch.bfloat16)

    def dyn8(o, i):
        w = torch.randn(o, i)
        q = torch.quantize_per_channel(w, w.abs().amax(1) / 127, torch.zeros(o, dtype=torch.long), 0, torch.qint8)
        return torch.ops.quantized.linear_prepack(q, None)

    def int_mm(o, i):
        return torch.randint(-127, 128, (o, i), dtype=torch.int8).t()

    def w4(o, i):
        codes = torch.randint(0, 16, (o, i), dtype=torch.int32)
        return (torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1),
                torch.rand(i // 32, o, 2, dtype=torch.bfloat16))

    out = {
        "fp32 F.linear": ("fp32", 4, lambda o, i: torch.randn(o, i), lambda s, xb, xf: F.linear(xf, s)),
        "bf16 oneDNN prepacked": ("bf16", 2, bf16,
                                  lambda s, xb, xf: torch.ops.mkldnn._linear_pointwise(xb, s, None, "none", [], "")),
        "int8 _weight_int8pack_mm": ("int8", 1, w8, lambda s, xb, xf: torch.ops.aten._weight_int8pack_mm(xb, *s)),
        "int8 linear_dynamic (x86; not weight-only)": ("int8*", 1, dyn8,
                                                       lambda s, xb, xf: torch.ops.quantized.linear_dynamic(xf, s, True)),
        "int8 torch._int_mm (matmul alone)": ("int8*", 1, int_mm,
                                              lambda s, xb, xf: torch._int_mm(xb.to(torch.int8), s)),
        "int4 _weight_int4pack_mm_for_cpu": ("int4", 0.5 + 4 / 32, w4,
                                             lambda s, xb, xf: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, s[0], 32, s[1])),
    }
    try:
        import bitsandbytes.functional as bnbf

        def nf4(o, i):
            return bnbf.quantize_4bit(torch.randn(o, i, dtype=torch.bfloat16), blocksize=64, quant_type="nf4")

        out["int4 bitsandbytes nf4 gemv_4bit"] = ("int4", 0.5 + 4 / 64, nf4,
                                                  lambda s, xb, xf: bnbf.gemv_4bit(xb, s[0].t(), state=s[1]))
    except ImportError:
        print("bitsandbytes is not installed: its 4-bit kernel is left out (pip install bitsandbytes)")
    return out


def time_kernel(make, call, shapes: list[tuple[int, int]]) -> float:
    """Seconds for one row through every layer of `shapes`, each layer with its own weights."""
    states = [make(o, i) for o, i in shapes]
    xs = {i: (torch.randn(1, i, dtype=torch.bfloat16), torch.randn(1, i)) for _, i in shapes}

    def step():
        for (_, i), s in zip(shapes, states):
            call(s, *xs[i])
    return best_time(step)


def llama_cpp_step(gguf: Path, threads: int, context: int, text_ids: list[int]) -> float | None:
    """Seconds per decode step of llama.cpp on `gguf` after `context` tokens (a child process)."""
    code = (
        "import json, sys; sys.path.insert(0, %r); from _llamacpp import LlamaRun; from pathlib import Path\n"
        "run = LlamaRun(Path(%r), %d, %d, %d); ids = %r\n"
        "best = max(run.generate(ids, 64)['engine_decode_tok_s'] for _ in range(3)); print(json.dumps(best))"
    ) % (str(ROOT / "benchmarks"), str(gguf), threads, context + 80, context + 8, text_ids)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if r.returncode != 0:
        print(f"llama.cpp on {gguf.name} failed: {r.stderr.strip().splitlines()[-1:]}")
        return None
    return 1.0 / json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "runs/demo/sft"), help="the demo assistant (its shapes and text)")
    ap.add_argument("--gguf-dir", default=str(ROOT / "runs/demo/export"),
                    help="its GGUF exports DIR/f16, DIR/q8_0, DIR/q4_0 (llama.cpp's side; skipped when missing)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--context", type=int, default=600, help="cached positions the new token attends to")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from chatforge.model.folder import load_config, load_tokenizer

    cfg = load_config(args.model)
    shapes = layer_shapes(cfg)
    weights = sum(o * i for o, i in shapes)
    bandwidth = memory_bandwidth(args.threads)
    print(f"{args.model}: {len(shapes)} linear layers, {weights / 1e6:.1f}M weights; read bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s ({args.threads} thread{'s' * (args.threads > 1)})", flush=True)

    rows = []
    with torch.inference_mode():
        for name, (prec, per_weight, make, call) in kernels().items():
            try:
                t = time_kernel(make, call, shapes)
            except (RuntimeError, NotImplementedError) as e:
                print(f"{name}: not available here ({str(e).splitlines()[0][:120]})")
                continue
            rows.append({"kernel": name, "precision": prec, "ms": t * 1e3,
                         "gb_s": weights * per_weight / t / 1e9})
            print(f"  {name:45s} {t * 1e3:7.2f} ms for all layers  {rows[-1]['gb_s']:5.1f} GB/s", flush=True)
        q = torch.randn(1, cfg.n_head, 1, cfg.head_dim)
        caches = [torch.randn(1, cfg.n_kv_head, args.context, cfg.head_dim) for _ in range(2 * cfg.n_layer)]
        gqa = {"enable_gqa": True} if cfg.n_kv_head != cfg.n_head else {}
        attention = best_time(lambda: [F.scaled_dot_product_attention(q, caches[2 * i], caches[2 * i + 1], **gqa)
                                       for i in range(cfg.n_layer)])
    print(f"  {'attention over ' + str(args.context) + ' positions (fp32 cache)':45s} {attention * 1e3:7.2f} ms "
          f"for all layers", flush=True)

    tok = load_tokenizer(args.model)
    text = " ".join(json.loads(line)["text"] for line in open(Path(args.model).parent / "data" / "val.jsonl"))
    text_ids = tok.encode(text)[:args.context]
    peers = {"bf16": "f16", "int8": "q8_0", "int4": "q4_0"}
    table = {}
    print(f"\n{'precision':10s} {'fastest weight-only kernel':34s} {'floor ms':>9s} {'ceiling ms':>10s} "
          f"{'llama.cpp':>10s} {'step ms':>8s} {'floor/step':>10s}")
    for prec, peer in peers.items():
        mine = [r for r in rows if r["precision"] == prec]
        if not mine:
            continue
        best = min(mine, key=lambda r: r["ms"])
        floor = best["ms"] + attention * 1e3
        per_weight = {"bf16": 2, "int8": 1, "int4": 0.5 + 4 / 32}[prec]   # int4: with its group scales
        ceiling = weights * per_weight / bandwidth * 1e3
        found = sorted((Path(args.gguf_dir) / peer).glob("*.gguf"))
        step = llama_cpp_step(found[0], args.threads, args.context, text_ids) * 1e3 if found else None
        table[prec] = {"kernel": best["kernel"], "floor_ms": round(floor, 2), "ceiling_ms": round(ceiling, 2),
                       "llama_cpp": peer, "llama_cpp_step_ms": None if step is None else round(step, 2),
                       "floor_over_llama_cpp_step": None if step is None else round(floor / step, 2)}
        print(f"{prec:10s} {best['kernel']:34s} {floor:9.2f} {ceiling:10.2f} {peer:>10s} "
              f"{'-' if step is None else f'{step:.2f}':>8s} {'-' if step is None else f'{floor / step:.2f}':>10s}",
              flush=True)
    print("\nfloor = the fastest weight-only kernel through every linear layer + attention; a decode step also "
          "runs norms, RoPE, residuals, the cache writes and the sampling loop. floor/step > 1: even with those "
          "free, that precision cannot reach llama.cpp's step with these kernels.")
    print(json.dumps({"bench": "kernels", "threads": args.threads, "context": args.context,
                      "bandwidth_gb_s": round(bandwidth / 1e9, 1), "kernels": rows,
                      "attention_ms": round(attention * 1e3, 2), "precisions": table}))


if __name__ == "__main__":
    main()
