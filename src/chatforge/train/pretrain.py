"""`chatforge pretrain`: train a GPT on a corpus's text, from scratch or from a local checkpoint.

    chatforge pretrain --data runs/demo/data --tokenizer runs/demo/tokenizer --preset small \\
        --max-tokens 1500000 --out runs/demo/pretrain
    chatforge pretrain ... --resume                     # continue from runs/demo/pretrain/last/
    chatforge pretrain ... --init-from runs/old/pretrain  # continue a trained model on new text
    torchrun --nproc_per_node 2 -m chatforge pretrain ...  # data-parallel (DDP; --fsdp to shard)

    run_pretrain("runs/demo/data", "runs/demo/pretrain", tokenizer="runs/demo/tokenizer", preset="tiny")

`PretrainConfig` holds the options and their defaults (`commands/pretrain.py` makes the flags).

The text is tokenized once into memory-mapped shards (`chatforge.data.shards`, cached); each
micro-batch is random windows of `--seq-len` tokens, drawn from a seeded generator so that a run
and its resumption see the same data. The training itself is `chatforge.train.loop.train`.
The best model (lowest validation loss) is written to `--out` as a model folder.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chatforge import runtime
from chatforge.data import shards
from chatforge.data.tokenizer import ChatTokenizer
from chatforge.errors import ChatforgeError
from chatforge.infer.engine import Engine, GenerationConfig
from chatforge.model import folder as model_folder
from chatforge.model.gpt import GPT, PRESETS, preset
from chatforge.options import build, flatten, option
from chatforge.train.loop import LoopOptions, train

DEFAULT_OUT = "runs/default/pretrain"


@dataclass
class PretrainConfig(LoopOptions):
    """`chatforge pretrain`'s options besides --data and --out (the loop's: `LoopOptions`)."""
    tokenizer: str | None = option(None, "tokenizer folder (default: the --init-from model's tokenizer)")
    preset: str = option("small", "model size: tiny, small, base, large")
    init_from: str | None = option(None, "start from this model folder (its shapes win over --preset)")
    max_tokens: int = option(1_500_000, "training tokens (ignored with --steps)")
    seq_len: int = option(256, "tokens per training window (<= the model's context)")
    eval_tokens: int = option(65536, "validation tokens used at each evaluation")
    dropout: float = option(0.0, "dropout (new models only)")
    n_experts: int = option(0, "mixture of experts: experts per layer (0 = dense)")
    experts_per_token: int = option(2, "mixture of experts: experts each token uses")
    sample_prompt: str = option("The", "prompt of the sample printed at each validation")
    steps: int | None = option(None, "optimizer steps (overrides --max-tokens)")
    lr: float = option(1e-3, "peak learning rate")

    def __post_init__(self) -> None:
        if self.preset not in PRESETS and not self.init_from:
            raise ChatforgeError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if not self.lr > 0:
            raise ChatforgeError(f"--lr must be positive, got {self.lr}")


class RandomWindows:
    """Random `seq_len + 1`-token windows of a token array, `batch_size` per rank per call.

    Call i draws the GLOBAL batch (world_size x batch_size starts) from a generator seeded with
    (seed, i), and this rank takes its rows: so the data depends only on the call count (the
    cursor), and N ranks see exactly what one process with an N times larger batch sees.
    """

    def __init__(self, tokens, batch_size: int, seq_len: int, seed: int, rank: int = 0, world_size: int = 1):
        if len(tokens) < seq_len + 1:
            raise ChatforgeError(f"only {len(tokens)} training tokens, fewer than one window of {seq_len + 1}; "
                                 "add text or lower --seq-len")
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.calls = 0

    def next_batch(self) -> dict:
        rng = np.random.default_rng([self.seed, self.calls])
        self.calls += 1
        starts = rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size * self.world_size)
        mine = starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        rows = np.stack([self.tokens[s:s + self.seq_len + 1] for s in mine]).astype(np.int64)
        return {"input_ids": torch.from_numpy(rows[:, :-1]), "labels": torch.from_numpy(rows[:, 1:])}

    def state_dict(self) -> dict:
        return {"calls": self.calls, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.calls = int(state["calls"])


def validation_batches(tokens, batch_size: int, seq_len: int, max_tokens: int) -> list[dict]:
    """Consecutive, non-overlapping windows from the start of the validation tokens."""
    n_windows = min((len(tokens) - 1) // seq_len, max(1, max_tokens // seq_len))
    if n_windows < 1:
        raise ChatforgeError(f"the validation split has {len(tokens)} tokens, fewer than one window of "
                             f"{seq_len + 1}; add text or lower --seq-len")
    rows = np.stack([tokens[i * seq_len:i * seq_len + seq_len + 1] for i in range(n_windows)]).astype(np.int64)
    rows = torch.from_numpy(rows)
    return [{"input_ids": b[:, :-1], "labels": b[:, 1:]} for b in rows.split(batch_size)]


def lm_loss(model, batch: dict):
    """Next-token cross-entropy (plus the MoE balance term), over every label that is not -100."""
    _, loss = model(batch["input_ids"], batch["labels"])
    return loss, (batch["labels"] != -100).sum()


def greedy_sample(model, tokenizer, prompt: str, max_new_tokens: int = 32) -> str:
    """A short greedy continuation through the inference engine, to watch the model learn.

    Greedy alone makes an early model loop ("the the the", blank lines), which hides what it
    has learned; a repetition penalty and no repeated 3-grams keep the sample readable while
    it stays deterministic (no random numbers are drawn, so resuming is unaffected)."""
    was_training = model.training
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, repetition_penalty=1.3, no_repeat_ngram_size=3,
                           truncate_prompt=True)
    try:
        # The live model, not a bf16 copy: it changes every step (and an FSDP model cannot be copied).
        out = Engine(model, tokenizer, dtype=None).generate([tokenizer.encode(prompt) or [tokenizer.eot_id]], cfg)
        return prompt + (out[0].text or "")
    finally:
        model.train(was_training)


def _same_vocabulary(a: Path, b: Path) -> bool:
    """Do two tokenizer folders map text to the same ids (same vocabulary, merges, specials)?"""
    def key(folder: Path):
        d = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        return d.get("model"), [(t.get("id"), t.get("content")) for t in d.get("added_tokens", [])]
    try:
        return key(a) == key(b)
    except (OSError, json.JSONDecodeError):
        return False


def _model_and_tokenizer(o: PretrainConfig):
    """(model, tokenizer, tokenizer folder): a fresh preset model, or --init-from's."""
    tok_dir = Path(o.tokenizer) if o.tokenizer else None
    if o.init_from:
        init = Path(o.init_from)
        model, init_tok = model_folder.load_model(init)
        if tok_dir is None:
            return model.train(), init_tok, init
        tok = ChatTokenizer.load(tok_dir)
        if tok.vocab_size != model.config.vocab_size or not _same_vocabulary(tok_dir, init):
            raise ChatforgeError(f"the tokenizer in {tok_dir} ({tok.vocab_size} tokens) is not the one {init} was "
                                 f"trained with ({model.config.vocab_size} tokens); drop --tokenizer to use the "
                                 "checkpoint's, or start from scratch without --init-from")
        return model.train(), tok, tok_dir
    if tok_dir is None:
        raise ChatforgeError("--tokenizer is required (a folder from `chatforge tokenizer train`)")
    if not (tok_dir / "tokenizer.json").is_file():
        raise ChatforgeError(f"{tok_dir} has no tokenizer.json; train one with `chatforge tokenizer train`")
    tok = ChatTokenizer.load(tok_dir)
    cfg = preset(o.preset, vocab_size=tok.vocab_size, dropout=o.dropout, n_experts=o.n_experts,
                 experts_per_token=o.experts_per_token)
    return GPT(cfg), tok, tok_dir


def run_pretrain(data: str | Path, out: str | Path | None = None, config: PretrainConfig | None = None,
                 **options: Any) -> dict:
    """Pretrain on the data folder `data` into `out` (default runs/default/pretrain); returns
    {"steps", "tokens", "val_loss", "best_val_loss", "seconds", "interrupted"}.

    `config` holds the options (default: `PretrainConfig()`); `options` change some by their
    flat names (`preset="tiny"`, `tokenizer="runs/demo/tokenizer"`, `steps=100`, ...). Under
    torchrun every rank calls it; rank 0 alone prints and saves."""
    o = build(PretrainConfig, {**(flatten(config) if config else {}), **options}, "pretrain")
    if not data:
        raise ChatforgeError("--data is required (a folder from `chatforge data build`)")
    out = Path(out or DEFAULT_OUT)
    rank, world = runtime.init_distributed()
    torch.manual_seed(o.seed)  # the same initial weights on every rank
    model, tok, tok_dir = _model_and_tokenizer(o)
    if o.seq_len > model.config.max_seq_len:
        raise ChatforgeError(f"--seq-len {o.seq_len} is longer than the model's context "
                             f"({model.config.max_seq_len}); lower --seq-len")

    # Rank 0 tokenizes (or finds the cache); the others wait and then read the same shards.
    folder = shards.build_shards(data, tok_dir, tokenizer=tok) if rank == 0 else None
    if world > 1:
        torch.distributed.barrier()
        folder = shards.build_shards(data, tok_dir, tokenizer=tok)
    train_tokens = shards.load_tokens(folder, "train")
    val_tokens = shards.load_tokens(folder, "val")

    tokens_per_micro = o.batch_size * o.seq_len * world
    accum = max(1, math.ceil(o.tokens_per_step / tokens_per_micro)) if o.tokens_per_step else 1
    steps = o.steps or max(1, math.ceil(o.max_tokens / (tokens_per_micro * accum)))
    cfg = o.train_config(steps, o.seq_len, o.lr, o.eval_every)
    source = RandomWindows(train_tokens, o.batch_size, o.seq_len, o.seed, rank, world)
    val = validation_batches(val_tokens, o.batch_size, o.seq_len, o.eval_tokens)
    if rank == 0:
        print(f"pretrain: {model.num_params() / 1e6:.2f}M parameters, {len(train_tokens):,} training tokens, "
              f"{steps} steps x {tokens_per_micro * accum:,} tokens = {steps * tokens_per_micro * accum:,} tokens")
    result = train(model, source, lm_loss, cfg, out, val_batches=val, tokenizer=tok_dir, resume=o.resume,
                   sample_fn=lambda m: greedy_sample(m, tok, o.sample_prompt))
    if rank == 0:
        if result.val_loss is not None:
            print(f"validation loss {result.val_loss:.4f}, perplexity {math.exp(min(result.val_loss, 50)):.2f} "
                  f"(best {result.best_val_loss:.4f}); {result.tokens:,} tokens in {result.seconds:.0f}s")
        if not (o.fsdp and world > 1):  # a sharded model samples only with every rank
            print(f"sample: {greedy_sample(model, tok, o.sample_prompt)!r}")
        print(f"model -> {out}")
    if world > 1:
        torch.distributed.destroy_process_group()
    return {"steps": result.step, "tokens": result.tokens, "val_loss": result.val_loss,
            "best_val_loss": result.best_val_loss, "seconds": round(result.seconds, 1),
            "interrupted": result.interrupted}
