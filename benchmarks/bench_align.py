"""Alignment training speed on the 135M model: chatforge DPO and reward model against TRL, in one run.

    .venv/bin/chatforge model import smollm2-135m-instruct --out /tmp/smol135
    .venv/bin/chatforge prefs make --model runs/demo/sft --data runs/demo/data --out runs/align/prefs.jsonl \\
        --max-questions 300 --context-tokens 512
    .venv/bin/python benchmarks/bench_align.py [--model /tmp/smol135] [--gguf FILE] [--prefs runs/align/prefs.jsonl]
                                              [--pairs 32] [--batch-size 4] [--threads 1] [--quick]

Model: SmolLM2-135M-Instruct. chatforge trains the folder `chatforge model import` wrote from the
GGUF file (~/.cache/chatforge/sources/smollm2-135m-instruct/); TRL trains the same GGUF file as
transformers loads it, as `benchmarks/bench_sft.py` prepares both sides (its helpers are reused).
The run prints the largest logit difference of the two to show that they are the same model.

Data: the first `--pairs` preference pairs of `--prefs` whose prompt and longer reply fit in 1024
tokens (TRL's default `max_length`, so neither side cuts anything), in the grounded prompt format
(`chatforge prefs make` on the demo data; without the file, `wrong_passage` pairs are made from
`--data` in a few seconds). Every configuration trains on exactly these pairs once (one epoch),
`--batch-size` pairs a step, LoRA rank 8, alpha 16 on q/k/v/o/gate/up/down without dropout (TRL's preference
trainers disable dropout by default, and chatforge's dpo and reward default to none), AdamW at
the same learning rate, bf16 autocast where the CPU has native bf16, `--threads` threads.

Configurations:
- DPO, sigmoid loss, beta 0.1: chatforge (`chatforge dpo --method lora`: the reference's
  log-probabilities computed once before training, each prompt run once and both replies
  reading its keys and values, the LM head on reply tokens only) against TRL `DPOTrainer` + PEFT with its
  defaults (gradient checkpointing on, the reference run at every step with the adapter off) and
  TRL fastest (gradient checkpointing off); `--trl-precompute` adds TRL with
  `precompute_ref_log_probs=True`.
- Reward model: chatforge (`chatforge reward train --method lora`) against TRL `RewardTrainer` +
  PEFT (a sequence-classification head) with its defaults (gradient checkpointing on) and
  gradient checkpointing off.

Timing: from the data (tokenizing, adapters) to the end of the last optimizer step, with the
model already loaded; it includes chatforge's reference pass and TRL's reference forwards.
Nothing is saved while timed. The machine is shared with other jobs (its load average went from
2 to 9 during one run), and wall time then measures them as much as the code: on one thread
(`--threads 1`, the default) the process's own CPU time is the work it did, and equals the wall
time on a quiet machine. So pairs/s and tokens/s are per CPU-second of the benchmark process;
wall seconds and the load average are printed beside them. (With 2 threads on a busy 2-core
machine every operation waits for the thread whose core is taken, which hurts many small
operations more than few large ones, and ratios swung between runs.) tokens/s counts each pair as
its two sequences, prompt + chosen and prompt + rejected (what TRL computes on; chatforge
computes the prompt once), the same count for every row, so tokens/s ratios equal pairs/s
ratios. The last line is one JSON object: {"bench": "align", ...}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sft import load, load_hf, logit_gap  # noqa: E402  (the SFT benchmark's preparation)

from chatforge.data.prefs import read_preferences  # noqa: E402
from chatforge.model.folder import load_model  # noqa: E402
from chatforge.model.lora import LoraConfig as ChatforgeLora  # noqa: E402
from chatforge.options import build  # noqa: E402
from chatforge import runtime  # noqa: E402
from chatforge.train import dpo, reward  # noqa: E402
from chatforge.train.loop import train  # noqa: E402
from chatforge.train.pairs import PairBatches, ReplyLogProbs, encode_pairs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MAX_LENGTH = 1024
LORA = ChatforgeLora(rank=8, alpha=16.0, dropout=0.0)     # every default target: q/k/v/o/gate/up/down


def default_gguf() -> str:
    from chatforge.files import cache_dir

    return str(cache_dir("sources", "smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf"))


# ---------------------------------------------------------------------------------------------
# Data


def benchmark_pairs(path: Path, data: Path, tok, n: int) -> list:
    """The first `n` pairs of `path` that fit whole in MAX_LENGTH (made from `data` when `path` is missing)."""
    if not path.is_file():
        from chatforge.train.make_pairs import make_preferences

        print(f"{path} is missing: making wrong_passage pairs from {data}", flush=True)
        path = Path(tempfile.mkdtemp()) / "prefs.jsonl"
        make_preferences(None, data, None, path, kinds=["wrong_passage"], max_questions=4 * n, context_tokens=512,
                         retrieval="bm25")
    out = []
    for pref in read_preferences(path):
        (example,), stats = encode_pairs([pref], tok, MAX_LENGTH, truncate="drop")
        if example is not None and not stats.truncated:
            out.append(pref)
            if len(out) == n:
                return out
    raise SystemExit(f"only {len(out)} pairs of {path} fit in {MAX_LENGTH} tokens; lower --pairs")


def hf_records(prefs) -> list[dict]:
    return [{k: v for k, v in p.to_record().items() if k in ("prompt", "chosen", "rejected")} for p in prefs]


# ---------------------------------------------------------------------------------------------
# chatforge


def run_chatforge(folder: str, prefs, batch_size: int, precision: str, stage: str, seed: int) -> dict:
    """One epoch of `chatforge dpo` (stage "dpo") or `chatforge reward train` (stage "reward"), LoRA."""
    model, tok = load_model(folder)
    cpu = torch.device("cpu")
    start, start_cpu = time.perf_counter(), time.process_time()
    examples, _ = encode_pairs(prefs, tok, MAX_LENGTH)
    ref_s = 0.0
    if stage == "dpo":
        config = dpo.DPOConfig
        ref = dpo.reference_logps(model, examples, batch_size, tok.pad_id, cpu, precision)
        ref_s = time.process_time() - start_cpu
        module, loss_fn, lr = ReplyLogProbs(model), dpo.make_loss_fn(0.1, "sigmoid"), dpo.DEFAULT_LR["lora"]
    else:
        config, ref = reward.RewardConfig, None
        torch.manual_seed(seed)
        module = reward.RewardModel(model, tok, MAX_LENGTH)
        loss_fn, lr = reward.reward_loss, reward.DEFAULT_LR["lora"]
    torch.manual_seed(seed)
    LORA.apply(model)
    # What the command runs with, but for these settings.
    o = build(config, {"precision": precision, "compile": "off", "seed": seed, "log_every": 1,
                       "batch_size": batch_size})
    source = PairBatches(examples, batch_size, tok.pad_id, seed=seed, ref=ref)
    steps = source.batches_per_epoch
    cfg = o.train_config(steps, MAX_LENGTH, lr, eval_every=steps)
    end: list[tuple[float, float]] = []

    def save(folder, m, state) -> None:   # the loop saves `last/` right after the final step
        end.append((time.perf_counter(), time.process_time()))

    params = [p for p in module.parameters() if p.requires_grad]
    with tempfile.TemporaryDirectory() as out:
        result = train(module, source, loss_fn, cfg, out, params=params, save_fn=save)
    return {"seconds": end[0][0] - start, "cpu_s": end[0][1] - start_cpu, "reference_cpu_s": round(ref_s, 1),
            "steps": result.step, "train_loss": result.train_loss}


# ---------------------------------------------------------------------------------------------
# TRL


def lora_config(task_type: str):
    from peft import LoraConfig

    return LoraConfig(r=LORA.rank, lora_alpha=LORA.alpha, lora_dropout=LORA.dropout,
                      target_modules=LORA.target_list(), task_type=task_type)


def run_trl(hf_base, hf_tok, prefs, batch_size: int, precision: str, stage: str, checkpointing: bool,
            seed: int, precompute: bool = False) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback

    ends: list[tuple[float, float]] = []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            ends.append((time.perf_counter(), time.process_time()))

    common = dict(per_device_train_batch_size=batch_size, num_train_epochs=1, max_length=MAX_LENGTH,
                  gradient_checkpointing=checkpointing, bf16=precision == "bf16", use_cpu=True, seed=seed,
                  data_seed=seed, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.1, adam_beta2=0.95,
                  max_grad_norm=1.0, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
                  dataloader_num_workers=0)
    dataset = Dataset.from_list(hf_records(prefs))
    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if stage == "dpo":
            from trl import DPOConfig, DPOTrainer

            args = DPOConfig(output_dir=out, learning_rate=dpo.DEFAULT_LR["lora"], beta=0.1, loss_type=["sigmoid"],
                             precompute_ref_log_probs=precompute, **common)
            model = copy.deepcopy(hf_base)
            start, start_cpu = time.perf_counter(), time.process_time()
            trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=hf_tok,
                                 peft_config=lora_config("CAUSAL_LM"), callbacks=[Timer()])
        else:
            from transformers import AutoModelForSequenceClassification
            from trl import RewardConfig, RewardTrainer

            args = RewardConfig(output_dir=out, learning_rate=reward.DEFAULT_LR["lora"], **common)
            config = copy.deepcopy(hf_base.config)
            config.num_labels, config.pad_token_id = 1, hf_tok.pad_token_id or hf_tok.eos_token_id
            torch.manual_seed(seed)
            model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
            state = {k: v for k, v in hf_base.state_dict().items() if k.startswith("model.")}
            model.load_state_dict(state, strict=False)      # the backbone; the score head stays new
            start, start_cpu = time.perf_counter(), time.process_time()
            trainer = RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=hf_tok,
                                    peft_config=lora_config("SEQ_CLS"), callbacks=[Timer()])
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"seconds": ends[-1][0] - start, "cpu_s": ends[-1][1] - start_cpu, "steps": trainer.state.global_step,
            "train_loss": losses[-1] if losses else None}


# ---------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="/tmp/smol135", help="the imported model folder (chatforge model import)")
    ap.add_argument("--gguf", default=default_gguf(), help="the GGUF file it was imported from (for transformers)")
    ap.add_argument("--prefs", default=str(ROOT / "runs/align/prefs.jsonl"), help="preference pairs (prefs make)")
    ap.add_argument("--data", default=str(ROOT / "runs/demo/data"), help="data folder, when --prefs is missing")
    ap.add_argument("--pairs", type=int, default=32, help="pairs trained on (one epoch)")
    ap.add_argument("--batch-size", type=int, default=4, help="pairs per step, both sides")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, both sides (see Timing above)")
    ap.add_argument("--stages", default="dpo,reward", help="dpo, reward or both")
    ap.add_argument("--trl-precompute", action="store_true", help="also TRL DPO with precompute_ref_log_probs")
    ap.add_argument("--quick", action="store_true",
                    help="8 pairs in 4 steps of 2: a short run on a busy machine (TRL without gradient checkpointing "
                         "held 18 GB at batch 4 and was killed for memory beside other jobs)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.quick:
        args.pairs, args.batch_size = 8, 2
    if not Path(args.model, "config.json").is_file():
        raise SystemExit(f"{args.model} is not a model folder; run: chatforge model import smollm2-135m-instruct "
                         f"--out {args.model}")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("CHATFORGE_QUIET", "1")
    stages = [s for s in args.stages.split(",") if s]

    _, tok = load_model(args.model)
    prefs = benchmark_pairs(Path(args.prefs), Path(args.data), tok, args.pairs)
    examples, _ = encode_pairs(prefs, tok, MAX_LENGTH)
    pair_tokens = sum(e.pair_tokens for e in examples)
    row_tokens = sum(e.length for e in examples)
    precision = runtime.resolve_precision("auto", torch.device("cpu"))
    prompt = sum(len(e.prompt) for e in examples) / len(examples)
    reply = sum(len(e.chosen) + len(e.rejected) for e in examples) / (2 * len(examples))
    print(f"torch {torch.__version__}, {args.threads} threads, {precision}; {len(prefs)} pairs of {args.prefs}, "
          f"batch {args.batch_size}: mean prompt {prompt:.0f} tokens, mean reply {reply:.0f}; {pair_tokens:,} tokens "
          f"as two sequences a pair, {row_tokens:,} with each prompt once", flush=True)

    hf, hf_tok = load_hf(args.gguf)
    gap = logit_gap(hf, args.model, examples[0].prompt[:64])
    print(f"same model: largest logit difference chatforge vs transformers (fp32) {gap:.2e}", flush=True)

    plan = []
    for stage in stages:
        plan += [(stage, "chatforge", "cf", None), (stage, "TRL defaults (grad. checkpointing)", "trl", True),
                 (stage, "TRL fastest (no checkpointing)", "trl", False)]
        if stage == "dpo" and args.trl_precompute:
            plan.append((stage, "TRL no checkpointing, precomputed reference", "trl-pre", False))
    results: dict[str, dict] = {}
    for stage, name, kind, ckpt in plan:
        before = load()
        if kind == "cf":
            r = run_chatforge(args.model, prefs, args.batch_size, precision, stage, args.seed)
        else:
            r = run_trl(hf, hf_tok, prefs, args.batch_size, precision, stage, ckpt, args.seed, kind == "trl-pre")
        r.update(pairs_per_s=len(prefs) / r["cpu_s"], tokens_per_s=pair_tokens / r["cpu_s"],
                 load=[round(before, 2), round(load(), 2)])
        results[f"{stage}: {name}"] = r
        print(f"  {stage}: {name}: {r['cpu_s']:.1f} CPU s ({r['seconds']:.1f} s wall), {r['pairs_per_s']:.3f} pairs/s, "
              f"{r['tokens_per_s']:.0f} tok/s, {r['steps']} steps, last loss {r['train_loss']:.4f} "
              f"(load {before:.1f} -> {load():.1f})", flush=True)

    print(f"\n{'configuration':<50}{'CPU s':>8}{'wall s':>8}{'pairs/s':>9}{'tok/s':>8}{'vs TRL fastest':>16}")
    summary_ratio = {}
    for stage in stages:
        rows = {k: v for k, v in results.items() if k.startswith(stage + ":")}
        fastest = max(v["pairs_per_s"] for k, v in rows.items() if "TRL" in k)
        for name, r in rows.items():
            ratio = r["pairs_per_s"] / fastest
            summary_ratio[name] = round(ratio, 2)
            print(f"{name:<50}{r['cpu_s']:>8.1f}{r['seconds']:>8.1f}{r['pairs_per_s']:>9.3f}{r['tokens_per_s']:>8.0f}"
                  f"{ratio:>15.2f}x")
    summary = {"bench": "align", "model": "SmolLM2-135M-Instruct", "threads": args.threads, "precision": precision,
               "pairs": len(prefs), "batch_size": args.batch_size, "pair_tokens": pair_tokens, "row_tokens": row_tokens,
               "logit_gap_vs_hf": gap,
               "pairs_per_s": {k: round(r["pairs_per_s"], 4) for k, r in results.items()},
               "tokens_per_s": {k: round(r["tokens_per_s"], 1) for k, r in results.items()},
               "cpu_s": {k: round(r["cpu_s"], 1) for k, r in results.items()},
               "wall_s": {k: round(r["seconds"], 1) for k, r in results.items()},
               "load": {k: r["load"] for k, r in results.items()}, "vs_trl_fastest": summary_ratio}
    print(json.dumps(summary))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
