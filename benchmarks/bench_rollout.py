"""Benchmark: PPO rollout sampling through chatforge's engine against HF `generate`, same model,
prompts, batch and sampling settings.

    .venv/bin/python benchmarks/bench_rollout.py [--model runs/demo/sft] [--data runs/demo/data] [--docs ...]
        [--new-tokens 48] [--repeats 3]

The model is the PPO starting point (default `runs/demo/sft`, SmolLM2-135M-Instruct + the demo's
LoRA SFT), wrapped with fresh LoRA adapters as `chatforge ppo` trains it, and the prompts are
what a PPO phase samples: FAQ questions of `qa_val.jsonl` in the grounded prompt format
(retrieval's passages, ~300-450 tokens). Sampling: temperature 1, no top-k / top-p (HF's
`top_k=50` default switched off), as PPO samples. Workloads: 8 prompts x 1 reply (PPO) and
4 prompts x 4 replies (GRPO, `num_return_sequences=4`), `--new-tokens` new tokens each, every row
generating all of them (no stop token on either side), so both count the same tokens.

chatforge: what `chatforge ppo` runs each phase, `rollouts.refresh_weights` (the policy's adapters
copied into the engine's bf16 copy of the policy; timed apart) then `Engine.generate` over that
copy (1 thread, its default on CPU), and the same with an fp32 copy (`--rollout-dtype fp32`). HF
gets the adapters merged into its weights (no adapter work at all: its fastest case). HF: `LlamaForCausalLM`
with the merged weights, `generate(do_sample=True)`, in fp32 and bf16, each with 1 thread and with
2. Runs are interleaved and the median of `--repeats` is reported (the machine is shared: compare
ratios). The speedup is against HF's fastest configuration.

The last line printed is one JSON object: {"bench": "rollout", ...}.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
from chatforge.files import cache_dir  # noqa: E402

DEFAULT_DOCS = [str(cache_dir("sources", s)) for s in ("debian-faq", "python-faq", "perl-faq")]


def grounded_prompts(tok, data: Path, docs: list[str], n: int, budget: int) -> list[list[int]]:
    """Token ids of the first `n` FAQ questions of qa_val.jsonl in the grounded prompt format."""
    from chatforge.retrieval import PassageIndex
    from chatforge.train.ppo import ground

    questions = []
    for line in (data / "qa_val.jsonl").read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if str(rec.get("source")).split("/")[0] in ("debian-faq", "python-faq", "perl-faq"):
            questions.append([m for m in rec["messages"] if m["role"] == "user"][-1:])
    index = PassageIndex.load_or_build([Path(d) for d in docs if Path(d).exists()])
    return [tok.render_chat(m, add_generation_prompt=True)[0] for m in ground(questions[:n], index, tok, budget)]


def hf_model(gpt, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaForCausalLM(LlamaConfig(**gpt.hf_config())).eval()
    hf.load_state_dict(gpt.hf_state_dict(), strict=False)
    hf.generation_config.eos_token_id = None           # every row generates every token
    return hf.to(dtype)


def hf_sample(hf, prompts: list[list[int]], n: int, new: int, threads: int, pad_id: int) -> int:
    from _generate_common import hf_generate

    return hf_generate(hf, prompts, new, threads, pad_id, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                       num_return_sequences=n, pad_token_id=pad_id).numel()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "runs" / "demo" / "sft"))
    ap.add_argument("--data", default=str(ROOT / "runs" / "demo" / "data"))
    ap.add_argument("--docs", nargs="*", default=DEFAULT_DOCS)
    ap.add_argument("--context-tokens", type=int, default=192, help="passage budget of each prompt")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lora-layers", type=int, default=8, help="adapters in the top N blocks (0 = all)")
    args = ap.parse_args()

    from chatforge.infer.engine import Engine, GenerationConfig
    from chatforge.model.folder import load_model
    from chatforge.model.lora import LoraConfig
    from chatforge.train.rollouts import refresh_weights

    torch.manual_seed(0)
    policy, tok = load_model(args.model)
    prompts = grounded_prompts(tok, Path(args.data), args.docs, 8, args.context_tokens)
    # The demo run's adapters: rank 8 in the top 8 blocks.
    LoraConfig(rank=8, alpha=16.0, dropout=0.0, layers=args.lora_layers).apply(policy)
    for name, p in policy.named_parameters():
        if "lora_B" in name:                 # a policy some steps into training: the adapters count
            torch.nn.init.normal_(p, std=1e-3)
    # The engines' models as `chatforge ppo` makes them (once, adapters included) and refreshes them
    # (every phase: the adapters).
    copies = {name: copy.deepcopy(policy).to(dtype).eval().requires_grad_(False)
              for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32))}
    engines = {name: Engine(m, tok, stop_ids=[], dtype=None) for name, m in copies.items()}
    plain = load_model(args.model)[0]
    refresh_weights(plain, policy)                      # the same merged weights for HF
    hfs = {"fp32": hf_model(plain, torch.float32), "bf16": hf_model(plain, torch.bfloat16)}
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads; {args.model} + LoRA r8 (top {args.lora_layers} blocks), "
          f"8 grounded prompts of "
          f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens, {args.new_tokens} new tokens, temperature 1")

    workloads = {"ppo 8x1": (prompts, 1), "grpo 4x4": (prompts[:4], 4)}
    runs: dict[str, dict[str, list[float]]] = {w: {} for w in workloads}
    refresh: dict[str, list[float]] = {"bf16": [], "fp32": []}
    for rep in range(args.repeats):
        for w, (ps, n) in workloads.items():
            for name, engine in engines.items():
                t = time.perf_counter()
                refresh_weights(copies[name], policy)
                refresh[name].append(time.perf_counter() - t)
                cfg = GenerationConfig(strategy="sample", max_new_tokens=args.new_tokens, num_return_sequences=n,
                                       seed=rep)
                t = time.perf_counter()
                tokens = sum(len(c.tokens) for r in engine.generate(ps, cfg) for c in r.completions)
                runs[w].setdefault(f"chatforge {name}", []).append(tokens / (time.perf_counter() - t))
            for name, hf in hfs.items():
                for th in sorted({1, threads}):
                    key = f"HF {name} {th}t"
                    if rep and th > 1 and statistics.median(runs[w].get(key, [1e9])) * 2 < statistics.median(
                            runs[w].get(f"HF {name} 1t", [0])):
                        continue      # under load a second thread waiting for a busy core: dropped
                    t = time.perf_counter()
                    tokens = hf_sample(hf, ps, n, args.new_tokens, th, tok.pad_id)
                    runs[w].setdefault(key, []).append(tokens / (time.perf_counter() - t))
            print(f"repeat {rep + 1}/{args.repeats} {w}: " + ", ".join(
                f"{k} {v[-1]:.1f}" for k, v in runs[w].items()), flush=True)

    summary = {"bench": "rollout", "model": args.model, "new_tokens": args.new_tokens, "threads": threads,
               "prompt_tokens": [min(map(len, prompts)), max(map(len, prompts))],
               "refresh_s": {k: round(statistics.median(v), 3) for k, v in refresh.items()}, "workloads": {}}
    print(f"\n{'workload':<10}{'implementation':<18}{'tokens/s':>10}")
    for w, by in runs.items():
        med = {k: statistics.median(v) for k, v in by.items()}
        hf_best = max((v, k) for k, v in med.items() if k.startswith("HF"))
        for k, v in med.items():
            print(f"{w:<10}{k:<18}{v:>10.1f}")
        speedup = med["chatforge bf16"] / hf_best[0]
        print(f"{w:<10}{'speedup':<18}{speedup:>10.2f}x  (chatforge bf16 over {hf_best[1]}; "
              f"fp32 over HF fp32: {med['chatforge fp32'] / max(v for k, v in med.items() if 'HF fp32' in k):.2f}x)")
        summary["workloads"][w] = {**{k: round(v, 1) for k, v in med.items()}, "hf_best": hf_best[1],
                                   "speedup": round(speedup, 2)}
    print(f"weight refresh per phase (the adapters copied into the engine's model): "
          + ", ".join(f"{k} {v:.2f} s" for k, v in summary["refresh_s"].items()))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
