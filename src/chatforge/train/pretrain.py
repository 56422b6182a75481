"""`chatforge pretrain`: train a GPT on a corpus's text, from scratch or from a local checkpoint.

    chatforge pretrain --data runs/demo/data --tokenizer runs/demo/tokenizer --preset small \\
        --max-tokens 1500000 --out runs/demo/pretrain
    chatforge pretrain ... --resume                     # continue from runs/demo/pretrain/last/
    chatforge pretrain ... --init-from runs/old/pretrain  # continue a trained model on new text
    torchrun --nproc_per_node 2 -m chatforge pretrain ...  # data-parallel (DDP; --fsdp to shard)

The text is tokenized once into memory-mapped shards (`chatforge.data.shards`, cached); each
micro-batch is random windows of `--seq-len` tokens, drawn from a seeded generator so that a run
and its resumption see the same data. The training itself is `chatforge.train.loop.train`.
The best model (lowest validation loss) is written to `--out` as a model folder.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from chatforge.commands import leaf
from chatforge.errors import ChatforgeError


def add_loop_options(p: argparse.ArgumentParser, lr: float = 1e-3, steps: int | None = None) -> None:
    """The training-loop options (`TrainConfig`), shared by every training command."""
    p.add_argument("--steps", type=int, default=steps, help="optimizer steps (overrides --max-tokens)")
    p.add_argument("--lr", type=float, default=lr, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final learning rate as a fraction of the peak")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: 5%% of the steps, at most 200)")
    p.add_argument("--schedule", default="cosine", choices=["cosine", "wsd", "constant"],
                   help="learning-rate schedule after warm-up (wsd = warmup-stable-decay)")
    p.add_argument("--decay-frac", type=float, default=0.2, help="wsd: fraction of the steps spent decaying")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch per process")
    p.add_argument("--tokens-per-step", type=int, default=8192,
                   help="tokens per optimizer step over all processes (gradient accumulation reaches it)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (matrices only)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0 = off)")
    p.add_argument("--eval-every", type=int, default=100, help="steps between validations and checkpoints")
    p.add_argument("--save-every", type=int, default=0, help="extra checkpoints every N steps (0 = at validations)")
    p.add_argument("--log-every", type=int, default=10, help="steps between metrics.jsonl lines")
    p.add_argument("--early-stop", type=int, default=0,
                   help="stop after N validations without improvement (0 = never)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto = bf16 autocast where the hardware supports it (CUDA, AVX512-BF16/AMX CPUs)")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="torch.compile the model: auto = for runs of 300+ micro-batches when a backend "
                        "(C++ compiler on CPU, triton on CUDA) exists; costs ~20 s once, then ~1.3x faster")
    p.add_argument("--fsdp", action="store_true", help="under torchrun, shard the model with FSDP instead of DDP")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--seed", type=int, default=1337, help="random seed (weights, data order, dropout)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last/ checkpoint")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("example:\n  chatforge pretrain --data runs/demo/data --tokenizer runs/demo/tokenizer "
                     "--preset small --max-tokens 1500000 --out runs/demo/pretrain")
    p = parser
    p.add_argument("--data", default=None, help="data folder from `chatforge data build` (train.jsonl, val.jsonl)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer folder (default: the --init-from model's tokenizer)")
    p.add_argument("--preset", default="small", help="model size: tiny, small, base, large")
    p.add_argument("--out", default="runs/default/pretrain", help="output folder (the best model + last/)")
    p.add_argument("--init-from", default=None, help="start from this model folder (its shapes win over --preset)")
    p.add_argument("--max-tokens", type=int, default=1_500_000, help="training tokens (ignored with --steps)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per training window (<= the model's context)")
    p.add_argument("--eval-tokens", type=int, default=65536, help="validation tokens used at each evaluation")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout (new models only)")
    p.add_argument("--n-experts", type=int, default=0, help="mixture of experts: experts per layer (0 = dense)")
    p.add_argument("--experts-per-token", type=int, default=2, help="mixture of experts: experts each token uses")
    p.add_argument("--sample-prompt", default="The", help="prompt of the sample printed at each validation")
    add_loop_options(p)
    leaf(p, run)


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
        import numpy as np
        import torch

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
    import numpy as np
    import torch

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
    from chatforge.infer.engine import Engine, GenerationConfig

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


def _model_and_tokenizer(args: argparse.Namespace):
    """(model, tokenizer, tokenizer folder): a fresh preset model, or --init-from's."""
    from chatforge.data.tokenizer import ChatTokenizer
    from chatforge.model.gpt import GPT, PRESETS, preset
    from chatforge.model import folder as model_folder

    tok_dir = Path(args.tokenizer) if args.tokenizer else None
    if args.init_from:
        init = Path(args.init_from)
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
    if args.preset not in PRESETS:
        raise ChatforgeError(f"unknown preset {args.preset!r}; choose one of {', '.join(PRESETS)}")
    tok = ChatTokenizer.load(tok_dir)
    cfg = preset(args.preset, vocab_size=tok.vocab_size, dropout=args.dropout, n_experts=args.n_experts,
                 experts_per_token=args.experts_per_token)
    return GPT(cfg), tok, tok_dir


def run(args: argparse.Namespace) -> int:
    import torch

    from chatforge.data import shards
    from chatforge.model.gpt import PRESETS
    from chatforge import runtime
    from chatforge.train.loop import TrainConfig, train

    if not args.data:
        raise ChatforgeError("--data is required (a folder from `chatforge data build`)")
    if args.preset not in PRESETS and not args.init_from:
        raise ChatforgeError(f"unknown preset {args.preset!r}; choose one of {', '.join(PRESETS)}")
    if args.lr <= 0:
        raise ChatforgeError(f"--lr must be positive, got {args.lr}")
    rank, world = runtime.init_distributed()
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model, tok, tok_dir = _model_and_tokenizer(args)
    if args.seq_len > model.config.max_seq_len:
        raise ChatforgeError(f"--seq-len {args.seq_len} is longer than the model's context "
                             f"({model.config.max_seq_len}); lower --seq-len")

    # Rank 0 tokenizes (or finds the cache); the others wait and then read the same shards.
    folder = shards.build_shards(args.data, tok_dir, tokenizer=tok) if rank == 0 else None
    if world > 1:
        torch.distributed.barrier()
        folder = shards.build_shards(args.data, tok_dir, tokenizer=tok)
    train_tokens = shards.load_tokens(folder, "train")
    val_tokens = shards.load_tokens(folder, "val")

    tokens_per_micro = args.batch_size * args.seq_len * world
    accum = max(1, math.ceil(args.tokens_per_step / tokens_per_micro)) if args.tokens_per_step else 1
    steps = args.steps or max(1, math.ceil(args.max_tokens / (tokens_per_micro * accum)))
    warmup = args.warmup if args.warmup is not None else min(200, max(1, steps // 20))
    cfg = TrainConfig(max_steps=steps, lr=args.lr, min_lr_ratio=args.min_lr_ratio, warmup_steps=warmup,
                      schedule=args.schedule, decay_frac=args.decay_frac, weight_decay=args.weight_decay,
                      grad_clip=args.grad_clip, batch_size=args.batch_size, seq_len=args.seq_len,
                      tokens_per_step=args.tokens_per_step, eval_every=args.eval_every,
                      save_every=args.save_every, log_every=args.log_every,
                      early_stop_patience=args.early_stop, precision=args.precision, compile=args.compile,
                      fsdp=args.fsdp, device=args.device, seed=args.seed)
    source = RandomWindows(train_tokens, args.batch_size, args.seq_len, args.seed, rank, world)
    val = validation_batches(val_tokens, args.batch_size, args.seq_len, args.eval_tokens)
    if rank == 0:
        print(f"pretrain: {model.num_params() / 1e6:.2f}M parameters, {len(train_tokens):,} training tokens, "
              f"{steps} steps x {tokens_per_micro * accum:,} tokens = {steps * tokens_per_micro * accum:,} tokens")
    result = train(model, source, lm_loss, cfg, args.out, val_batches=val, tokenizer=tok_dir, resume=args.resume,
                   sample_fn=lambda m: greedy_sample(m, tok, args.sample_prompt))
    if rank == 0:
        if result.val_loss is not None:
            print(f"validation loss {result.val_loss:.4f}, perplexity {math.exp(min(result.val_loss, 50)):.2f} "
                  f"(best {result.best_val_loss:.4f}); {result.tokens:,} tokens in {result.seconds:.0f}s")
        if not (args.fsdp and world > 1):  # a sharded model samples only with every rank
            print(f"sample: {greedy_sample(model, tok, args.sample_prompt)!r}")
        print(f"model -> {args.out}")
    if world > 1:
        torch.distributed.destroy_process_group()
    return 130 if result.interrupted else 0
