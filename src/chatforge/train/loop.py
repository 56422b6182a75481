"""THE training loop: every stage (pretrain, SFT, LoRA, reward model, DPO, classifier) calls `train`.

A stage supplies a model, a batch source, a loss function and a `TrainConfig`; the loop owns the
rest: AdamW, the LR schedule, gradient accumulation, clipping, mixed precision, torch.compile,
DDP / FSDP, validation, best/last checkpoints, resume, Ctrl-C, logging and MFU.

Contract
--------
    result = train(model, train_source, loss_fn, cfg, out_dir, val_batches=None, sample_fn=None,
                   tokenizer=None, resume=False, params=None, save_fn=None)

- `model`: an `nn.Module` (on any device; the loop moves it to `cfg.device`). The loop wraps it
  (compile, DDP or FSDP) and passes the wrapped module to `loss_fn`.
- `train_source`: any object with
      next_batch() -> dict[str, Tensor]     # one micro-batch for THIS rank (CPU tensors are fine)
      state_dict() -> dict                  # JSON-serialisable data cursor
      load_state_dict(d) -> None
  Under torchrun the source is built with (rank, world_size) (see `runtime.init_distributed`) and
  returns its own slice of each global batch. All ranks advance in lockstep and only rank 0's
  cursor is saved, so a cursor must not depend on the rank (a step counter, a seeded RNG's state).
- `loss_fn(model, batch) -> (loss, n_tokens)`: `loss` is the MEAN loss over the `n_tokens`
  tokens (or examples) it covers; `n_tokens` is an int or a 0-dim tensor. The loop weights each
  micro-batch by `n_tokens`, so accumulated gradients equal the mean over every token of the
  optimizer step on every rank, whatever the padding or masking. It may return a third item, a
  dict of named metrics (means over the same `n_tokens`, e.g. DPO's reward accuracy): they are
  weighted like the loss, logged beside it, and as `val_NAME` after each validation.
- `val_batches`: an iterable of batches, re-iterated at each evaluation (a list, or an object
  whose `__iter__` starts over). Validation loss is the token-weighted mean of `loss_fn`;
  perplexity is exp(loss). Every rank evaluates all of it (FSDP needs every rank in a forward).
- `sample_fn(model) -> str`: called at each evaluation with the unwrapped model; the text is
  printed (rank 0). Optional.
- `tokenizer`: a `ChatTokenizer` or its folder, saved into model folders by the default `save_fn`.
- `params`: the parameters to train (default: those with `requires_grad`). AdamW decays only
  matrices (dim >= 2) that are not embeddings.
- `save_fn(folder, model, state_dict)`: writes a model folder (default: `model.folder.save_model`
  with `tokenizer`); `state_dict` is the full state on CPU (gathered from the shards under FSDP).

Outputs in `out_dir`: the best model (lowest validation loss; without validation, the final one)
as a model folder at the top; `last/` (model folder + `optimizer.safetensors` + `state.json`:
step, tokens, schedule, RNG states, data cursor), replaced atomically at each evaluation, every
`save_every` steps, at the end and on Ctrl-C / SIGTERM; `metrics.jsonl` (one JSON object a log
step: step, tokens, loss, lr, tokens_per_s, mfu, and val_loss / val_ppl on evaluation steps);
TensorBoard events in `tb/`. No pickle anywhere: weights and optimizer tensors are safetensors.

Distributed: `torchrun --nproc_per_node N -m chatforge pretrain ...` starts N ranks (nccl on GPUs,
gloo on CPU). The global batch is world_size x batch_size x accumulation; gradients are
all-reduced once per optimizer step (`no_sync` on the other micro-steps); rank 0 alone logs and
saves. `cfg.fsdp` shards parameters, gradients and optimizer state across ranks with FSDP2
(`torch.distributed.fsdp.fully_shard`, one unit per transformer block) for models that do not
fit one GPU; it also runs on CPU with gloo (slowly; it is for correctness there).
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Protocol

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from chatforge import files, runtime
from chatforge.errors import ChatforgeError
from chatforge.model import folder as model_folder
from chatforge.options import option
from chatforge.train import checkpoint
from chatforge.train.progress import Logger

SCHEDULES = ("cosine", "wsd", "constant")
PRECISIONS = ("auto", "fp32", "bf16")


class BatchSource(Protocol):
    def next_batch(self) -> dict[str, torch.Tensor]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], tuple]   # (loss, n) or (loss, n, metrics)


def _metrics(out: tuple) -> dict[str, Any]:
    """The optional third item of a `loss_fn` result: named metrics (means over its n)."""
    return out[2] if len(out) > 2 else {}


@dataclass
class TrainConfig:
    max_steps: int = 1000          # optimizer steps
    lr: float = 3e-4               # peak learning rate
    min_lr_ratio: float = 0.1      # the schedule ends at lr * min_lr_ratio
    warmup_steps: int = 100        # linear warm-up from 0
    schedule: str = "cosine"       # cosine | wsd (warmup-stable-decay) | constant
    decay_frac: float = 0.2        # wsd: the last fraction of steps that decays linearly
    weight_decay: float = 0.1      # AdamW, on non-embedding matrices only
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0         # max global gradient norm; 0 = off
    batch_size: int = 8            # sequences per micro-batch per rank
    seq_len: int = 256             # tokens per sequence (for tokens_per_step and MFU)
    tokens_per_step: int = 0       # target tokens per optimizer step (all ranks); 0 = one micro-batch each
    eval_every: int = 100          # steps between validations (and `last/` saves)
    save_every: int = 0            # extra `last/` saves every N steps; 0 = only at evaluations
    log_every: int = 10            # steps between metrics.jsonl lines
    early_stop_patience: int = 0   # stop after N evaluations without improvement; 0 = never
    precision: str = "auto"        # auto (bf16 where supported, measured faster) | fp32 | bf16
    compile: str = "auto"          # torch.compile: auto (long runs, when a backend exists) | on | off
    fsdp: bool = False             # shard with FSDP instead of DDP when distributed
    device: str = "auto"           # auto = cuda > mps > cpu
    seed: int = 1337
    extra: dict = field(default_factory=dict)  # stage-specific values, saved with the state

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ChatforgeError(f"invalid training option: {msg}")

        need(self.max_steps > 0, f"steps must be positive, got {self.max_steps}")
        need(self.lr > 0 and math.isfinite(self.lr), f"learning rate must be positive, got {self.lr}")
        need(0.0 <= self.min_lr_ratio <= 1.0, f"min lr ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(self.warmup_steps >= 0, f"warmup must be >= 0, got {self.warmup_steps}")
        need(self.schedule in SCHEDULES, f"schedule {self.schedule!r}; choose {', '.join(SCHEDULES)}")
        need(0.0 < self.decay_frac <= 1.0, f"decay fraction must be in (0, 1], got {self.decay_frac}")
        need(self.weight_decay >= 0, f"weight decay must be >= 0, got {self.weight_decay}")
        need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "AdamW betas must be in [0, 1)")
        need(self.grad_clip >= 0, f"gradient clip must be >= 0, got {self.grad_clip}")
        need(self.batch_size > 0, f"batch size must be positive, got {self.batch_size}")
        need(self.seq_len > 0, f"sequence length must be positive, got {self.seq_len}")
        need(self.tokens_per_step >= 0, f"tokens per step must be >= 0, got {self.tokens_per_step}")
        need(self.eval_every > 0 and self.log_every > 0, "eval-every and log-every must be positive")
        need(self.save_every >= 0 and self.early_stop_patience >= 0, "save-every and patience must be >= 0")
        need(self.precision in PRECISIONS, f"precision {self.precision!r}; choose {', '.join(PRECISIONS)}")
        if isinstance(self.compile, bool):   # older checkpoints saved a flag
            self.compile = "on" if self.compile else "off"
        need(self.compile in runtime.COMPILE_MODES,
             f"compile {self.compile!r}; choose {', '.join(runtime.COMPILE_MODES)}")

    def grad_accum(self, world_size: int = 1) -> int:
        """Micro-batches per optimizer step so that the global batch reaches `tokens_per_step`."""
        per_micro = self.batch_size * self.seq_len * world_size
        return max(1, math.ceil(self.tokens_per_step / per_micro)) if self.tokens_per_step else 1


@dataclass
class LoopOptions:
    """The training-loop options every training command takes (`--lr`, `--batch-size`, ...).

    A stage's config subclasses it and re-declares a field to change its default or help (SFT's
    `lr` is None: the method's own). `train_config` turns them into the loop's `TrainConfig` once
    the stage knows its step count and row length."""
    SECTION: ClassVar[str] = "training loop"

    steps: int | None = option(None, "optimizer steps (overrides --epochs)")
    lr: float | None = option(None, "peak learning rate")
    min_lr_ratio: float = option(0.1, "final learning rate as a fraction of the peak")
    warmup: int | None = option(None, "warm-up steps (default: 5%% of the steps, at most 200)")
    schedule: str = option("cosine", "learning-rate schedule after warm-up (wsd = warmup-stable-decay)",
                           choices=SCHEDULES)
    decay_frac: float = option(0.2, "wsd: fraction of the steps spent decaying")
    batch_size: int = option(8, "sequences per micro-batch per process")
    tokens_per_step: int = option(8192, "tokens per optimizer step over all processes (gradient accumulation "
                                        "reaches it)")
    weight_decay: float = option(0.1, "AdamW weight decay (matrices only)")
    grad_clip: float = option(1.0, "max gradient norm (0 = off)")
    eval_every: int = option(100, "steps between validations and checkpoints")
    save_every: int = option(0, "extra checkpoints every N steps (0 = at validations)")
    log_every: int = option(10, "steps between metrics.jsonl lines")
    early_stop: int = option(0, "stop after N validations without improvement (0 = never)")
    precision: str = option("auto", "auto = bf16 autocast where the hardware supports it (CUDA, AVX512-BF16/AMX "
                                    "CPUs)", choices=PRECISIONS)
    compile: str = option("auto", "torch.compile the model: auto = for runs of 300+ micro-batches when a backend "
                                  "(C++ compiler on CPU, triton on CUDA) exists; costs ~20 s once, then ~1.3x faster",
                          choices=runtime.COMPILE_MODES)
    fsdp: bool = option(False, "under torchrun, shard the model with FSDP instead of DDP")
    device: str = option("auto", "auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    seed: int = option(1337, "random seed (weights, data order, dropout)")
    resume: bool = option(False, "continue the run in --out from its last/ checkpoint")

    def accumulation(self, row_tokens: int) -> int:
        """Micro-batches per optimizer step for rows of `row_tokens` tokens (one process)."""
        return max(1, math.ceil(self.tokens_per_step / (self.batch_size * row_tokens))) if self.tokens_per_step else 1

    def train_config(self, steps: int, seq_len: int, lr: float, eval_every: int, compile: str | None = None,
                     **extra: Any) -> "TrainConfig":
        """The loop's config for a run of `steps` steps over `seq_len`-token rows at peak `lr`
        (`compile` overrides the option: stages whose batches change shape pass "off" for auto)."""
        warmup = self.warmup if self.warmup is not None else min(200, max(1, steps // 20))
        return TrainConfig(max_steps=steps, lr=lr, min_lr_ratio=self.min_lr_ratio, warmup_steps=warmup,
                           schedule=self.schedule, decay_frac=self.decay_frac, weight_decay=self.weight_decay,
                           grad_clip=self.grad_clip, batch_size=self.batch_size, seq_len=seq_len,
                           tokens_per_step=self.tokens_per_step, eval_every=eval_every, save_every=self.save_every,
                           log_every=self.log_every, early_stop_patience=self.early_stop, precision=self.precision,
                           compile=compile or self.compile, fsdp=self.fsdp, device=self.device, seed=self.seed, **extra)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """The multiplier of the peak LR at optimizer step `step` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    floor = cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        # Stable at the peak, then a linear decay over the last decay_frac of the run: a run can be
        # extended from any stable-phase checkpoint, which cosine does not allow.
        decay_start = max(cfg.warmup_steps, int(cfg.max_steps * (1 - cfg.decay_frac)))
        if step < decay_start:
            return 1.0
        progress = (step - decay_start) / max(1, cfg.max_steps - decay_start)
        return 1.0 - (1.0 - floor) * min(1.0, progress)
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class TrainResult:
    step: int                       # optimizer steps done
    tokens: int                     # tokens trained on (all ranks)
    train_loss: float | None        # last logged training loss
    val_loss: float | None          # last validation loss
    best_val_loss: float | None
    stopped_early: bool
    interrupted: bool
    seconds: float
    out_dir: Path


def _no_decay_names(model: nn.Module) -> set[str]:
    names = set()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.Embedding):
            names.add(f"{mod_name}.weight" if mod_name else "weight")
    return names


def make_optimizer(model: nn.Module, train_names: set[str], cfg: TrainConfig,
                   device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not norms, biases or embeddings).

    Fused (one kernel over all parameters) on CUDA and CPU: measured 3-4x faster than the default
    foreach implementation on CPU for the `small` preset (~6% of a training step). Not with FSDP,
    whose sharded parameters take the default path."""
    skip = _no_decay_names(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if name in train_names:
            (decay if p.dim() >= 2 and name not in skip else no_decay).append(p)
    if not decay and not no_decay:
        raise ChatforgeError("nothing to train: no parameter requires a gradient")
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    extra = {"fused": True} if device.type in ("cuda", "cpu") and not cfg.fsdp else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, **extra)


def _wrap(model: nn.Module, cfg: TrainConfig, device: torch.device, compiled: bool) -> nn.Module:
    """compile, then DDP or FSDP when distributed."""
    if cfg.fsdp and runtime.is_distributed():
        from torch.distributed.fsdp import fully_shard  # lazy: ~0.55 s, only multi-process FSDP runs

        # One FSDP unit per block (gathered just in time), then the root (embeddings, head).
        for block in getattr(model, "layers", []):
            fully_shard(block)
        fully_shard(model)
    if compiled:
        model = torch.compile(model)
    if runtime.is_distributed() and not cfg.fsdp:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def _grad_sync(wrapped: nn.Module, raw: nn.Module, cfg: TrainConfig, on: bool):
    """A context in which backward all-reduces gradients only if `on` (the last micro-step)."""
    if cfg.fsdp and runtime.is_distributed():
        raw.set_requires_gradient_sync(on)
        return contextlib.nullcontext()
    if hasattr(wrapped, "no_sync") and not on:
        return wrapped.no_sync()
    return contextlib.nullcontext()


def _full_state(raw: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> tuple[dict, dict]:
    """(model state, optimizer state), full and on CPU; under FSDP every rank must call this."""
    if cfg.fsdp and runtime.is_distributed():
        # lazy: ~0.8 s to import, only multi-process FSDP runs
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(raw, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in raw.state_dict().items()}, optimizer.state_dict()


def _load_optimizer(raw: nn.Module, optimizer: torch.optim.Optimizer, state: dict, cfg: TrainConfig) -> None:
    if cfg.fsdp and runtime.is_distributed():
        # lazy: ~0.8 s to import, only multi-process FSDP runs
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(raw, optimizer, state, options=StateDictOptions(full_state_dict=True))
        return
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError) as e:
        raise ChatforgeError(f"cannot resume: the saved optimizer does not match this model ({e}); "
                             "resume with the same model and options, or start again") from None


def _rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    np_state = np.random.get_state()
    plain = {"python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
             "numpy": [np_state[0], np_state[1].tolist(), *[float(x) if isinstance(x, float) else int(x)
                                                              for x in np_state[2:]]]}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    return plain, tensors


def _set_rng_state(plain: dict, tensors: dict[str, torch.Tensor]) -> None:
    v, state, gauss = plain["python"]
    random.setstate((v, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


def evaluate(model: nn.Module, batches: Iterable[dict], loss_fn: LossFn, device: torch.device,
             precision: str = "fp32") -> float:
    """Token-weighted mean of `loss_fn` over `batches` (model in eval mode, no gradients)."""
    return evaluate_metrics(model, batches, loss_fn, device, precision)[0]


def evaluate_metrics(model: nn.Module, batches: Iterable[dict], loss_fn: LossFn, device: torch.device,
                     precision: str = "fp32") -> tuple[float, dict[str, float]]:
    """(loss, metrics): token-weighted means of `loss_fn`'s loss and metrics over `batches`."""
    was_training = model.training
    model.eval()
    total, count, sums = 0.0, 0.0, {}
    with torch.no_grad(), runtime.autocast(device, precision):
        for batch in batches:
            out = loss_fn(model, {k: v.to(device, non_blocking=True) for k, v in batch.items()})
            n = float(out[1])
            total += float(out[0]) * n
            count += n
            for k, v in _metrics(out).items():
                sums[k] = sums.get(k, 0.0) + float(v) * n
    model.train(was_training)
    if count == 0:
        raise ChatforgeError("the validation set produced no tokens; give it more data or a shorter --seq-len")
    return total / count, {k: v / count for k, v in sums.items()}


class _StopFlag:
    """Ctrl-C / SIGTERM set a flag checked between steps (a half-done optimizer step is never
    saved); a second signal interrupts at once."""

    def __init__(self) -> None:
        self.set = False
        self._old: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        if self.set:
            raise KeyboardInterrupt
        self.set = True

    def __enter__(self) -> "_StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _batch_width(batch: dict[str, torch.Tensor]) -> int:
    t = batch.get("input_ids", next(iter(batch.values())))
    return int(t.shape[-1])


def train(model: nn.Module, train_source: BatchSource, loss_fn: LossFn, cfg: TrainConfig,
          out_dir: str | Path, val_batches: Iterable[dict] | None = None,
          sample_fn: Callable[[nn.Module], str] | None = None, tokenizer: Any = None, resume: bool = False,
          params: Iterable[nn.Parameter] | None = None,
          save_fn: Callable[[Path, nn.Module, dict], None] | None = None) -> TrainResult:
    """Train `model` for `cfg.max_steps` optimizer steps; see the module docstring."""
    out_dir = Path(out_dir)
    rank, world = runtime.init_distributed()
    master = rank == 0
    device = runtime.pick_device(cfg.device)
    precision = runtime.resolve_precision(cfg.precision, device)
    accum = cfg.grad_accum(world)
    if save_fn is None:
        def save_fn(folder: Path, m: nn.Module, state: dict) -> None:
            model_folder.save_model(folder, m, tokenizer, state=state)

    raw = model.to(device)
    raw.train()
    chosen = {id(p) for p in (params if params is not None else raw.parameters()) if p.requires_grad}
    train_names = {n for n, p in raw.named_parameters() if id(p) in chosen}

    step, tokens, best, bad_evals, opt_state = 0, 0, math.inf, 0, None
    if resume:
        last = out_dir / "last"
        if not last.is_dir() and (out_dir / ".last.old").is_dir():
            # A crash between atomic_dir's two renames leaves the previous checkpoint here.
            last = out_dir / ".last.old"
        if not last.is_dir():
            raise ChatforgeError(f"cannot resume: {last} does not exist; run without --resume first")
        opt_state, state, rng = checkpoint.load_training_state(last)
        model_folder.load_weights(last / model_folder.WEIGHTS, raw, device)
        step, tokens = state["step"], state["tokens"]
        best = state["best_val_loss"] if state["best_val_loss"] is not None else math.inf
        bad_evals = state["bad_evals"]
        train_source.load_state_dict(state["data"])
        _set_rng_state(state["rng"], rng)
    else:
        torch.manual_seed(cfg.seed + rank)

    compiled = runtime.resolve_compile(cfg.compile, device, (cfg.max_steps - step) * accum)
    wrapped = _wrap(raw, cfg, device, compiled)
    optimizer = make_optimizer(raw, train_names, cfg, device)
    if opt_state is not None:
        _load_optimizer(raw, optimizer, opt_state, cfg)
    trained = [p for group in optimizer.param_groups for p in group["params"]]

    def save_last() -> None:
        model_state, optim_state = _full_state(raw, optimizer, cfg)
        if not master:
            return
        plain_rng, rng_tensors = _rng_state()
        state = {"step": step, "tokens": tokens, "best_val_loss": None if math.isinf(best) else best,
                 "bad_evals": bad_evals, "data": train_source.state_dict(), "rng": plain_rng,
                 "world_size": world, "config": asdict(cfg)}
        with files.atomic_dir(out_dir / "last") as tmp:
            save_fn(tmp, raw, model_state)
            checkpoint.save_training_state(tmp, optim_state, state, rng_tensors)

    def save_best() -> None:
        model_state, _ = _full_state(raw, optimizer, cfg)
        if master:
            save_fn(out_dir, raw, model_state)

    flops = raw.flops_per_token(cfg.seq_len) if hasattr(raw, "flops_per_token") else None
    log = Logger(out_dir, master, total=cfg.max_steps, start=step, flops_per_token=flops,
                 peak=runtime.matmul_peak(device, precision) if master and flops else None)
    log.info(f"training on {device} x{world} ({precision}{', compiled' if compiled else ''}"
             f"{', FSDP' if cfg.fsdp and world > 1 else ''}): {cfg.batch_size} x {cfg.seq_len} tokens "
             f"x {accum} accumulation x {world} ranks per step, steps {step}->{cfg.max_steps}")

    val_loss, train_loss, stopped_early, interrupted = None, None, False, False
    t_start = time.perf_counter()
    with _StopFlag() as stop:
        while step < cfg.max_steps:
            factor = lr_factor(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * factor
            loss_sum = torch.zeros((), device=device)
            n_sum, grad_norm, metric_sums = 0.0, None, {}
            for micro in range(accum):
                batch = {k: v.to(device, non_blocking=True) for k, v in train_source.next_batch().items()}
                with _grad_sync(wrapped, raw, cfg, micro == accum - 1):
                    with runtime.autocast(device, precision):
                        out = loss_fn(wrapped, batch)
                    loss, n = out[0], float(out[1])
                    # Sum of per-token losses: normalised below by the step's token count.
                    (loss * n).backward()
                loss_sum += loss.detach().float() * n
                n_sum += n
                for k, v in _metrics(out).items():
                    metric_sums[k] = metric_sums.get(k, 0.0) + (v.detach().float() if torch.is_tensor(v) else v) * n
            # One all-reduce for the token count, the loss, the stop flag and the metrics.
            names = sorted(metric_sums)
            n_all, loss_all, stop_all, *metric_all = runtime.all_reduce_sum(
                [n_sum, float(loss_sum), float(stop.set), *[float(metric_sums[k]) for k in names]], device)
            if n_all > 0:
                # DDP/FSDP averaged the gradients over ranks; turn that into a per-token mean.
                scale = world / n_all
                for p in trained:
                    if p.grad is not None:
                        p.grad.mul_(scale)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(trained, cfg.grad_clip)) if cfg.grad_clip else None
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += int(n_all)
            train_loss = loss_all / max(n_all, 1.0)
            log.step(step, tokens, int(n_all))
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                log.record(step, tokens, loss=train_loss, lr=cfg.lr * factor, grad_norm=grad_norm,
                           **{k: v / max(n_all, 1.0) for k, v in zip(names, metric_all)})

            evaluate_now = val_batches is not None and (step % cfg.eval_every == 0 or step == cfg.max_steps)
            if evaluate_now:
                val_loss, val_metrics = evaluate_metrics(wrapped if cfg.fsdp else raw, val_batches, loss_fn, device,
                                                         precision)
                improved = val_loss < best
                best, bad_evals = (val_loss, 0) if improved else (best, bad_evals + 1)
                log.record(step, tokens, val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50.0)),
                           **{f"val_{k}": v for k, v in val_metrics.items()})
                if improved:
                    save_best()
                if sample_fn is not None and (master or cfg.fsdp):
                    text = sample_fn(raw)
                    log.info(f"sample @ step {step}: {text!r}")
                stopped_early = bool(cfg.early_stop_patience) and bad_evals >= cfg.early_stop_patience
            if stop_all:
                interrupted = True
            if evaluate_now or interrupted or stopped_early or step == cfg.max_steps or (
                    cfg.save_every and step % cfg.save_every == 0):
                save_last()
            if interrupted or stopped_early:
                log.info("interrupted: saved last/; continue with --resume" if interrupted
                         else f"early stop: no improvement in {bad_evals} evaluations")
                break
    if val_batches is None:
        save_best()
    log.close()
    return TrainResult(step=step, tokens=tokens, train_loss=train_loss, val_loss=val_loss,
                       best_val_loss=None if math.isinf(best) else best, stopped_early=stopped_early,
                       interrupted=interrupted, seconds=time.perf_counter() - t_start, out_dir=out_dir)
