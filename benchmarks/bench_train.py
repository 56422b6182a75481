"""Training speed: chatforge's GPT vs HF `LlamaForCausalLM` on the same shape, in one process.

    .venv/bin/python benchmarks/bench_train.py [--rounds 5] [--loss-steps 25]

Shape: the 13.8M-parameter Llama (d=384, 6 layers, 6 heads, 6 KV heads, d_ff 1024, vocab 8192,
tied embeddings), batch 8 x 256 tokens. One "step" = forward + backward + AdamW step. The rows
run interleaved (A B C A B C ...) and each figure is the median step time, because this machine
is shared and noisy: compare the ratios, not the absolute numbers. MFU is against the fp32 and
bf16 matmul peaks measured at the start of the same run.

Rows: HF and chatforge at fp32 and bf16 autocast with the same fused AdamW, eager and under
`torch.compile` (chatforge's training loop compiles runs of 300+ micro-batches by default, see
`runtime.resolve_compile`; HF compiled is shown too, so the gain is not mistaken for the model's
own), HF with torch's default (foreach) AdamW (the out-of-the-box peer), and chatforge's default
configuration (what `chatforge pretrain` runs on a long run: `precision=auto`, fused AdamW,
compiled). Compile time is reported per compiled row, not counted in tokens/s.
Then a short real-text run (Python's own docstrings) from the same initial weights and batches:
validation loss at equal tokens, chatforge default vs HF fp32, must agree within 1%.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import inspect
import json
import pkgutil
import statistics
import sys
import tempfile
import time
import warnings

import torch

from chatforge.model.gpt import GPT, GPTConfig
from chatforge import runtime

SHAPE = dict(vocab_size=8192, max_seq_len=256, d_model=384, n_layer=6, n_head=6, n_kv_head=6, d_ff=1024,
             tie_embeddings=True)
BATCH, SEQ = 8, 256


def hf_twin(model: GPT):
    import transformers

    transformers.logging.set_verbosity_error()
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**model.hf_config(), attn_implementation="sdpa"))
    hf.load_state_dict(model.hf_state_dict(), strict=False)
    return hf.train()


def make_step(kind: str, model, precision: str, fused: bool = True, compiled: bool = False):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=fused, foreach=None if fused else True)
    if compiled:
        model = torch.compile(model)

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        with runtime.autocast(torch.device("cpu"), precision):
            if kind == "hf":
                loss = model(input_ids=x, labels=y).loss
            else:
                loss = model(x[:, :-1] if y is None else x, y)[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return step


def speed(rounds: int) -> tuple[list[dict], dict]:
    torch.manual_seed(0)
    cf = GPT(GPTConfig(**SHAPE)).train()
    hf = hf_twin(cf)
    cpu = torch.device("cpu")
    prec = runtime.resolve_precision("auto", cpu)
    comp = runtime.resolve_compile("auto", cpu, runtime.COMPILE_MIN_MICRO_STEPS)
    default_name = f"chatforge default ({prec}{', compiled' if comp else ''})"
    rows = {  # name -> (model kind, precision, step function)
        "HF fp32, foreach AdamW": ("hf", "fp32", make_step("hf", hf, "fp32", fused=False)),
        "HF fp32": ("hf", "fp32", make_step("hf", hf, "fp32")),
        "chatforge fp32": ("cf", "fp32", make_step("cf", cf, "fp32")),
        "HF fp32 compiled": ("hf", "fp32", make_step("hf", hf, "fp32", compiled=True)),
        "chatforge fp32 compiled": ("cf", "fp32", make_step("cf", cf, "fp32", compiled=True)),
        "HF bf16": ("hf", "bf16", make_step("hf", hf, "bf16")),
        "chatforge bf16": ("cf", "bf16", make_step("cf", cf, "bf16")),
        "HF bf16 compiled": ("hf", "bf16", make_step("hf", hf, "bf16", compiled=True)),
        "chatforge bf16 compiled": ("cf", "bf16", make_step("cf", cf, "bf16", compiled=True)),
        default_name: ("cf", prec, make_step("cf", cf, prec, compiled=comp)),
    }
    x = torch.randint(0, SHAPE["vocab_size"], (BATCH, SEQ + 1))
    times: dict[str, list[float]] = {name: [] for name in rows}
    warmup: dict[str, float] = {}
    for r in range(rounds + 2):
        for name, (kind, _, step) in rows.items():
            # HF shifts labels itself; chatforge takes inputs and next-token targets.
            args = (x[:, :-1], x[:, :-1]) if kind == "hf" else (x[:, :-1], x[:, 1:])
            t = time.perf_counter()
            step(*args)
            if r == 0:
                warmup[name] = time.perf_counter() - t
            elif r > 1:  # rounds 0-1 warm up (compilation, allocator, oneDNN kernel choice)
                times[name].append(time.perf_counter() - t)
    peaks = {p: runtime.matmul_peak(torch.device("cpu"), p) for p in ("fp32", "bf16")}
    flops = cf.flops_per_token(SEQ)
    out = []
    for name, (kind, precision, _) in rows.items():
        tps = BATCH * SEQ / statistics.median(times[name])
        out.append({"name": name, "precision": precision, "tokens_per_s": tps, "first_step_s": warmup[name],
                    "mfu_fp32_peak": tps * flops / peaks["fp32"], "mfu_bf16_peak": tps * flops / peaks["bf16"]})
    return out, peaks


def real_text(max_chars: int = 1_500_000) -> list[str]:
    """English prose on every machine with Python: the standard library's docstrings."""
    import importlib

    docs, total = [], 0
    for mod in sorted(m.name for m in pkgutil.iter_modules() if m.module_finder.path.endswith(("python3.11", "lib")))[:400]:
        if mod.startswith(("_", "antigravity", "this", "idlelib", "tkinter", "turtle")):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m = importlib.import_module(mod)
        except Exception:  # noqa: BLE001 - optional modules may fail to import; skip them
            continue
        for obj in [m, *vars(m).values()]:
            doc = inspect.getdoc(obj) if inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isfunction(obj) else None
            if doc and len(doc) > 200:
                docs.append(doc)
                total += len(doc)
        if total > max_chars:
            break
    return list(dict.fromkeys(docs))


def loss_check(steps: int) -> dict:
    from chatforge.data.tokenizer import train_tokenizer

    docs = real_text()
    with tempfile.TemporaryDirectory() as tmp:
        tok = train_tokenizer(docs, SHAPE["vocab_size"], tmp)
    ids = torch.tensor([t for d in tok.encode_batch(docs) for t in (*d, tok.eot_id)])
    split = int(len(ids) * 0.9)
    train_ids, val_ids = ids[:split], ids[split:]
    gen = torch.Generator().manual_seed(0)
    batches = [train_ids[s:s + SEQ + 1] for s in torch.randint(0, split - SEQ - 1, (steps * BATCH,), generator=gen)]
    batches = [torch.stack(batches[i * BATCH:(i + 1) * BATCH]) for i in range(steps)]
    n_val = min(16, (len(val_ids) - 1) // SEQ)
    val = torch.stack([val_ids[i * SEQ:i * SEQ + SEQ + 1] for i in range(n_val)])

    torch.manual_seed(0)
    cf = GPT(GPTConfig(**SHAPE)).train()
    hf = hf_twin(cf)
    cpu = torch.device("cpu")
    precision = runtime.resolve_precision("auto", cpu)
    compiled = runtime.resolve_compile("auto", cpu, runtime.COMPILE_MIN_MICRO_STEPS)
    results = {}
    for name, kind, model, prec in (("chatforge default", "cf", cf, precision), ("HF fp32", "hf", hf, "fp32")):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0, fused=True)
        run = torch.compile(model) if kind == "cf" and compiled else model
        for b in batches:
            with runtime.autocast(cpu, prec):
                loss = run(input_ids=b[:, :-1], labels=b[:, :-1]).loss if kind == "hf" else run(b[:, :-1], b[:, 1:])[1]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        model.eval()
        with torch.no_grad():  # evaluated in fp32 for both
            if kind == "hf":
                results[name] = model(input_ids=val[:, :-1], labels=val[:, :-1]).loss.item()
            else:
                results[name] = model(val[:, :-1], val[:, 1:])[1].item()
    rel = abs(results["chatforge default"] - results["HF fp32"]) / results["HF fp32"]
    return {"train_tokens": steps * BATCH * SEQ, "val_tokens": n_val * SEQ, "tokenizer_vocab": tok.vocab_size,
            "val_loss_chatforge_default": results["chatforge default"], "val_loss_hf_fp32": results["HF fp32"],
            "rel_diff": rel, "within_1pct": rel < 0.01}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="timed steps per row (after two warm-up rounds)")
    ap.add_argument("--loss-steps", type=int, default=25, help="steps of the real-text loss check (0 = skip)")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; shape {SHAPE}, batch {BATCH}x{SEQ}")
    rows, peaks = speed(args.rounds)
    by = {r["name"]: r["tokens_per_s"] for r in rows}
    default_name = next(n for n in by if n.startswith("chatforge default"))
    print("first step (includes compilation): " + ", ".join(f"{r['name']} {r['first_step_s']:.1f} s" for r in rows
                                                           if "compiled" in r["name"]))
    print(f"matmul peak: fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s")
    print(f"{'configuration':<32} {'tokens/s':>9} {'MFU fp32 pk':>11} {'MFU bf16 pk':>11}")
    for r in rows:
        print(f"{r['name']:<32} {r['tokens_per_s']:>9,.0f} {100 * r['mfu_fp32_peak']:>10.0f}% "
              f"{100 * r['mfu_bf16_peak']:>10.0f}%")
    ratios = {
        "fp32_vs_hf_fp32": by["chatforge fp32"] / by["HF fp32"],
        "bf16_vs_hf_bf16": by["chatforge bf16"] / by["HF bf16"],
        "fp32_compiled_vs_hf_fp32": by["chatforge fp32 compiled"] / by["HF fp32"],
        "bf16_compiled_vs_hf_bf16": by["chatforge bf16 compiled"] / by["HF bf16"],
        "fp32_compiled_vs_hf_fp32_compiled": by["chatforge fp32 compiled"] / by["HF fp32 compiled"],
        "bf16_compiled_vs_hf_bf16_compiled": by["chatforge bf16 compiled"] / by["HF bf16 compiled"],
        "default_vs_hf_fp32": by[default_name] / by["HF fp32"],
        "default_vs_hf_fp32_foreach": by[default_name] / by["HF fp32, foreach AdamW"],
        "fp32_vs_hf_fp32_foreach": by["chatforge fp32"] / by["HF fp32, foreach AdamW"],
    }
    for k, v in ratios.items():
        print(f"ratio {k:<28} {v:.2f}x")
    loss = loss_check(args.loss_steps) if args.loss_steps else {}
    if loss:
        print(f"validation loss after {loss['train_tokens']:,} tokens: chatforge default "
              f"{loss['val_loss_chatforge_default']:.4f} vs HF fp32 {loss['val_loss_hf_fp32']:.4f} "
              f"({100 * loss['rel_diff']:.2f}% apart, {'OK' if loss['within_1pct'] else 'NOT'} within 1%)")
    print(json.dumps({"bench": "train", "shape": SHAPE, "batch": [BATCH, SEQ],
                      "peak_gflops": {k: round(v / 1e9, 1) for k, v in peaks.items()},
                      "tokens_per_s": {r["name"]: round(r["tokens_per_s"], 1) for r in rows},
                      "mfu_fp32_peak": {r["name"]: round(r["mfu_fp32_peak"], 3) for r in rows},
                      "ratios": {k: round(v, 3) for k, v in ratios.items()}, "loss_check": loss}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
