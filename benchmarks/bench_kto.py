"""KTO training speed on SmolLM2-135M with LoRA: chatforge against TRL's KTOTrainer, in one run.

    .venv/bin/python benchmarks/bench_kto.py [--model runs/base0/base] [--hf /tmp/kto-bench-hf]
                                             [--data runs/base0/data] [--rows 16] [--batch-size 4] [--quick]

Model: a chatforge folder of SmolLM2-135M-Instruct (`chatforge model import smollm2-135m-instruct`);
TRL trains its `chatforge export --format hf` (made into `--hf` when missing), and the run prints
the largest logit difference of the two to show they are the same model.

Data: `--rows` unpaired rows, the chosen (desirable) and rejected (undesirable) replies of the
first `--rows / 2` preference pairs that fit whole in 1024 tokens, as TRL's KTOTrainer unpairs a
preference file: `wrong_passage` pairs made from `--data` in the grounded prompt format
(`benchmarks/bench_align.py`'s helper), or `--prefs FILE`. Every configuration trains on exactly
these rows once (one epoch), `--batch-size` rows a step, each row's KL completion the one before
it in its batch, beta 0.1 and both weights 1.0 (TRL's defaults), LoRA rank 8, alpha 16 on
q/k/v/o/gate/up/down without dropout, AdamW at the same learning rate, bf16 autocast where the
CPU has native bf16, `--threads` threads.

Configurations: chatforge (`chatforge kto --method lora`: the reference's log-probabilities of
the rows and their KL completions computed once before training, each prompt run once for its
completion and its KL completion, the KL completions without gradients, the LM head on reply
tokens only); TRL `KTOTrainer` + PEFT
with its defaults (gradient checkpointing on, the reference run at every step with the adapter
off); TRL without gradient checkpointing; TRL without checkpointing and with
`precompute_ref_log_probs=True`. "TRL fastest" is the fastest TRL row of the run.

Timing as `bench_align.py` times it: from the data (tokenizing, adapters, reference pass) to the
end of the last optimizer step, with the model already loaded, in CPU seconds of the benchmark
process (on a shared machine wall time measures the other jobs as much; wall seconds and the
load average are printed beside). The last line is one JSON object: {"bench": "kto", ...}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_align import LORA, MAX_LENGTH, benchmark_pairs, lora_config  # noqa: E402
from bench_sft import load, logit_gap  # noqa: E402

from chatforge import runtime  # noqa: E402
from chatforge.data.unpaired import Unpaired  # noqa: E402
from chatforge.model.folder import load_model  # noqa: E402
from chatforge.model.lora import apply_lora  # noqa: E402
from chatforge.train import dpo, kto  # noqa: E402
from chatforge.train.loop import train  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LR = kto.DEFAULT_LR["lora"]


def unpaired_rows(prefs) -> list[Unpaired]:
    return [row for p in prefs for row in (Unpaired(p.prompt, p.chosen, True), Unpaired(p.prompt, p.rejected, False))]


def run_chatforge(folder: str, rows, batch_size: int, precision: str, seed: int) -> dict:
    """One epoch of `chatforge kto --method lora` on `rows`, in the order given (as TRL batches them)."""
    model, tok = load_model(folder)
    cpu = torch.device("cpu")
    start, start_cpu = time.perf_counter(), time.process_time()
    examples, _ = kto.encode_rows(rows, tok, MAX_LENGTH)
    groups = [list(range(i, min(i + batch_size, len(examples)))) for i in range(0, len(examples), batch_size)]
    pairs = [kto.with_mismatched([examples[i] for i in g], MAX_LENGTH) for g in groups]
    flat = [p for g in pairs for p in g]
    ref = dpo.reference_logps(model, flat, batch_size, tok.pad_id, cpu, precision)
    ref_s = time.process_time() - start_cpu
    ref_groups = [ref[g[0]:g[-1] + 1] for g in groups]
    torch.manual_seed(seed)
    apply_lora(model, LORA["rank"], LORA["alpha"], LORA["dropout"], LORA["targets"])
    o = kto.KTOConfig(precision=precision, compile="off", seed=seed, log_every=1, batch_size=batch_size)
    source = kto.KTOBatches(examples, groups, pairs, tok.pad_id, seed, ref_groups)
    steps = source.batches_per_epoch
    cfg = o.train_config(steps, MAX_LENGTH, LR, eval_every=steps)
    end: list[tuple[float, float]] = []

    def save(folder, m, state) -> None:   # the loop saves `last/` right after the final step
        end.append((time.perf_counter(), time.process_time()))

    module = kto.KTOLogProbs(model)
    params = [p for p in module.parameters() if p.requires_grad]
    with tempfile.TemporaryDirectory() as out:
        result = train(module, source, kto.make_loss_fn(), cfg, out, params=params, save_fn=save)
    return {"seconds": end[0][0] - start, "cpu_s": end[0][1] - start_cpu, "reference_cpu_s": round(ref_s, 1),
            "steps": result.step, "train_loss": result.train_loss}


def run_trl(hf_base, hf_tok, rows, batch_size: int, precision: str, checkpointing: bool, precompute: bool,
            seed: int) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import KTOConfig, KTOTrainer

    ends: list[tuple[float, float]] = []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            ends.append((time.perf_counter(), time.process_time()))

    dataset = Dataset.from_list([{k: v for k, v in r.to_record().items() if k in ("prompt", "completion", "label")}
                                 for r in rows])
    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = KTOConfig(output_dir=out, learning_rate=LR, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0,
                         per_device_train_batch_size=batch_size, num_train_epochs=1, max_length=MAX_LENGTH,
                         gradient_checkpointing=checkpointing, precompute_ref_log_probs=precompute,
                         bf16=precision == "bf16", use_cpu=True, seed=seed, data_seed=seed, lr_scheduler_type="cosine",
                         warmup_steps=0, weight_decay=0.1, adam_beta2=0.95, max_grad_norm=1.0, report_to="none",
                         save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0)
        model = copy.deepcopy(hf_base)
        start, start_cpu = time.perf_counter(), time.process_time()
        trainer = KTOTrainer(model=model, args=args, train_dataset=dataset, processing_class=hf_tok,
                             peft_config=lora_config("CAUSAL_LM"), callbacks=[Timer()])
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"seconds": ends[-1][0] - start, "cpu_s": ends[-1][1] - start_cpu, "steps": trainer.state.global_step,
            "train_loss": losses[-1] if losses else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "runs/base0/base"), help="chatforge folder of SmolLM2-135M-Instruct")
    ap.add_argument("--hf", default="/tmp/kto-bench-hf", help="its `chatforge export --format hf` (made when missing)")
    ap.add_argument("--prefs", default="", help="preference pairs to unpair (default: wrong_passage pairs of --data)")
    ap.add_argument("--data", default=str(ROOT / "runs/base0/data"), help="data folder, when --prefs is not given")
    ap.add_argument("--rows", type=int, default=16, help="rows trained on (one epoch), half desirable")
    ap.add_argument("--batch-size", type=int, default=4, help="rows per step (at least 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, both sides")
    ap.add_argument("--quick", action="store_true", help="8 rows in 2 steps of 4: a short run on a busy machine")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.quick:
        args.rows, args.batch_size = 8, 4
    if not Path(args.model, "config.json").is_file():
        raise SystemExit(f"{args.model} is not a model folder; run: chatforge model import smollm2-135m-instruct "
                         f"--out {args.model}")
    if not Path(args.hf, "config.json").is_file():
        subprocess.run([sys.executable, "-m", "chatforge", "export", "--model", args.model, "--format", "hf",
                        "--out", args.hf], check=True)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("CHATFORGE_QUIET", "1")

    _, tok = load_model(args.model)
    prefs = benchmark_pairs(Path(args.prefs or "/nonexistent"), Path(args.data), tok, (args.rows + 1) // 2)
    rows = unpaired_rows(prefs)[:args.rows]
    examples, _ = kto.encode_rows(rows, tok, MAX_LENGTH)
    tokens = sum(e.length for e in examples)
    precision = runtime.resolve_precision("auto", torch.device("cpu"))
    print(f"torch {torch.__version__}, {args.threads} threads, {precision}; {len(rows)} rows, batch {args.batch_size}: "
          f"mean prompt {sum(len(e.prompt) for e in examples) / len(examples):.0f} tokens, mean reply "
          f"{sum(len(e.completion) for e in examples) / len(examples):.0f}; {tokens:,} tokens", flush=True)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(args.hf, dtype=torch.float32)
    hf_tok = AutoTokenizer.from_pretrained(args.hf)
    gap = logit_gap(hf, args.model, examples[0].prompt[:64])
    print(f"same model: largest logit difference chatforge vs transformers (fp32) {gap:.2e}", flush=True)

    plan = [("chatforge", None, None), ("TRL defaults (grad. checkpointing)", True, False),
            ("TRL no checkpointing", False, False), ("TRL no checkpointing, precomputed reference", False, True)]
    results: dict[str, dict] = {}
    for name, ckpt, pre in plan:
        before = load()
        if ckpt is None:
            r = run_chatforge(args.model, rows, args.batch_size, precision, args.seed)
        else:
            r = run_trl(hf, hf_tok, rows, args.batch_size, precision, ckpt, pre, args.seed)
        r.update(rows_per_s=len(rows) / r["cpu_s"], load=[round(before, 2), round(load(), 2)])
        results[name] = r
        print(f"  {name}: {r['cpu_s']:.1f} CPU s ({r['seconds']:.1f} s wall), {r['rows_per_s']:.3f} rows/s, "
              f"{r['steps']} steps, last loss {r['train_loss']:.4f} (load {before:.1f} -> {load():.1f})", flush=True)

    fastest = max(v["rows_per_s"] for k, v in results.items() if k.startswith("TRL"))
    print(f"\n{'configuration':<48}{'CPU s':>8}{'wall s':>8}{'rows/s':>8}{'vs TRL fastest':>16}")
    ratios = {}
    for name, r in results.items():
        ratios[name] = round(r["rows_per_s"] / fastest, 2)
        print(f"{name:<48}{r['cpu_s']:>8.1f}{r['seconds']:>8.1f}{r['rows_per_s']:>8.3f}{ratios[name]:>15.2f}x")
    print(json.dumps({"bench": "kto", "model": "SmolLM2-135M-Instruct", "threads": args.threads, "precision": precision,
                      "rows": len(rows), "batch_size": args.batch_size, "tokens": tokens, "logit_gap_vs_hf": gap,
                      "rows_per_s": {k: round(r["rows_per_s"], 4) for k, r in results.items()},
                      "cpu_s": {k: round(r["cpu_s"], 1) for k, r in results.items()},
                      "wall_s": {k: round(r["seconds"], 1) for k, r in results.items()},
                      "load": {k: r["load"] for k, r in results.items()}, "vs_trl_fastest": ratios}))


if __name__ == "__main__":
    main()
