"""`chatforge dpo`: Direct Preference Optimization of a chat model on preference pairs.

    chatforge dpo --base runs/demo/sft --prefs runs/demo/prefs.jsonl --out runs/demo/dpo
    chatforge dpo ... --method full --beta 0.1 --loss ipo
    chatforge dpo ... --resume                    # continue from runs/demo/dpo/last/

DPO (Rafailov et al., 2023) teaches the model to prefer the chosen reply of each pair over the
rejected one without a reward model or sampling. With pi the model being trained, pi_ref the model
it starts from, and log-probabilities summed over each reply's tokens,

    h = [log pi(chosen) - log pi_ref(chosen)] - [log pi(rejected) - log pi_ref(rejected)]

    sigmoid (DPO):   -log sigmoid(beta * h)
    hinge (SLiC):    max(0, 1 - beta * h)
    ipo (IPO):       (h' - 1 / (2 * beta))^2, with h' built from per-token means (each log-ratio
                     divided by its reply's length), as TRL computes IPO

averaged over the pairs (`dpo_losses`, pure functions). `beta` sets how far the model may move
from its start: the implicit reward of a reply is beta * (log pi - log pi_ref).

Data: `--prefs` JSONL read by `chatforge.data.prefs.read_preferences` (`chatforge feedback export`,
`chatforge prefs make`, or any file in TRL's preference formats). A seeded `--val-fraction` of
the questions, with all their pairs, is held out for validation. Each pair is one row: the prompt
once, then both replies, each reply attending only to the prompt and itself (`train/pairs.py`),
so the prompt's forward and backward work is done once per pair, and the LM head runs on reply
tokens only.

The reference: pi_ref's per-token log-probabilities of every reply are computed once, before
training, by the model as loaded from `--base` (before LoRA adapters are added or anything is
trained), and cached in `OUT/reference_logps.safetensors` with a fingerprint of the base weights,
the pairs and the precision: `--resume` and later runs on the same base and pairs reuse it. No
second copy of the model is ever in memory, with `--method lora` or `full`. The loop's work per
pair is then one forward and backward of one row, where TRL's DPOTrainer by default runs a
second forward of the reference at every step.

Logged in `OUT/metrics.jsonl` at every log step, and as `val_*` at every validation (the loop
counts pairs where other stages count tokens, so its `tokens` and `tokens_per_s` are pairs):
`loss`, `reward_accuracy` (the share of pairs whose chosen reward is higher), `reward_margin`
(mean chosen minus rejected reward), `rewards_chosen` / `rewards_rejected`, `logps_chosen` /
`logps_rejected` (the model's summed log-probabilities of each reply), and `kl`: the mean over
the replies' tokens of exp(d) - 1 - d with d = log pi_ref - log pi (Schulman's non-negative "k3"
estimator of KL(pi || pi_ref); the replies are not sampled from pi, so it measures how far the
model moved on these tokens rather than the exact KL of its own replies).

Methods: `--method lora` (default; adapters as in `chatforge sft`, merged into a plain model
folder when saved, `--lora-save adapter` also keeps them) or `full`. The output is a model
folder (`load_model` works on it), `metrics.jsonl`, `last/` for `--resume` and `dpo.json` (data
counts, options, the best validation's metrics).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from tqdm import tqdm

from chatforge import files, runtime
from chatforge.data.prefs import read_preferences, split_by_question
from chatforge.errors import ChatforgeError
from chatforge.model.folder import load_model, model_fingerprint
from chatforge.options import build, flatten, option
from chatforge.train import recipe
from chatforge.train.loop import train
from chatforge.train.pairs import (
    PairBatches,
    PreferenceOptions,
    ReplyLogProbs,
    encode_pairs,
    eval_pair_batches,
    length_batches,
    make_pair_batch,
    reply_token_logps,
    side_counts,
    side_sums,
)

LOSSES = ("sigmoid", "ipo", "hinge")
DEFAULT_LR = {"lora": 5e-5, "full": 1e-6}
REFERENCE_FILE = "reference_logps.safetensors"
REFERENCE_VERSION = 1


# ---------------------------------------------------------------------------------------------
# The losses (pure functions of per-pair log-probabilities)


def dpo_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, loss_type: str = "sigmoid",
               chosen_tokens=None, rejected_tokens=None):
    """(losses (B,), chosen rewards (B,), rejected rewards (B,)) from summed reply log-probs (B,).

    `chosen_tokens` / `rejected_tokens` (B,) are the replies' token counts, needed by "ipo".
    Rewards are beta * (log pi - log pi_ref), detached (they are reported, not optimised)."""

    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif loss_type == "hinge":
        losses = (1 - beta * h).clamp(min=0)
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the ipo loss needs the replies' token counts")
        mean_h = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (mean_h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}; choose one of {', '.join(LOSSES)}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def kl_k3(policy_logps, ref_logps, mask):
    """Mean over the tokens where `mask` is true of exp(d) - 1 - d, d = ref - policy (>= 0, 0 iff equal)."""
    d = (ref_logps - policy_logps.detach())[mask]
    return (d.exp() - 1 - d).mean() if d.numel() else d.new_zeros(())


def make_loss_fn(beta: float, loss_type: str):
    """The loop's loss: (mean loss over the batch's pairs, pairs, metrics) for a `ReplyLogProbs` model."""

    if loss_type not in LOSSES:
        raise ChatforgeError(f"--loss must be one of {', '.join(LOSSES)}, got {loss_type!r}")
    if not beta > 0:
        raise ChatforgeError(f"--beta must be positive, got {beta}")

    def loss_fn(model, batch: dict):
        logps = model(batch)                                       # (B, S) the policy's token log-probs
        policy_c, policy_r = side_sums(logps, batch)
        ref_c, ref_r = side_sums(batch["ref_logps"], batch)
        n_c, n_r = side_counts(batch)
        losses, reward_c, reward_r = dpo_losses(policy_c, policy_r, ref_c, ref_r, beta, loss_type, n_c, n_r)
        metrics = {"reward_accuracy": (reward_c > reward_r).float().mean(),
                   "reward_margin": (reward_c - reward_r).mean(),
                   "rewards_chosen": reward_c.mean(), "rewards_rejected": reward_r.mean(),
                   "logps_chosen": policy_c.detach().mean(), "logps_rejected": policy_r.detach().mean(),
                   "kl": kl_k3(logps, batch["ref_logps"], batch["reply_scored"])}
        return losses.mean(), len(losses), metrics
    return loss_fn


# ---------------------------------------------------------------------------------------------
# The reference log-probabilities, computed once


def reference_logps(model, examples, batch_size: int, pad_id: int, device, precision: str) -> list:
    """Per example, the log-probabilities (float32) of its scored reply tokens (chosen, then rejected)
    under `model` as it is now (eval mode, no gradients), in batches of similar length."""


    was_training = model.training
    model.eval().to(device)
    out: list = [None] * len(examples)
    groups = length_batches(examples, batch_size)
    with torch.no_grad(), runtime.autocast(device, precision):
        for group in tqdm(groups, desc="reference log-probs", unit="batch", disable=None):
            batch = make_pair_batch([examples[i] for i in group], pad_id)
            logps = reply_token_logps(model, {k: v.to(device) for k, v in batch.items()}).cpu()
            scored, B = batch["reply_scored"], len(group)
            for row, i in enumerate(group):
                out[i] = torch.cat([logps[row][scored[row]], logps[B + row][scored[B + row]]])
    model.train(was_training)
    return out


def reference_fingerprint(base: Path, examples, precision: str) -> str:
    """What the cached reference depends on: the base weights, every pair's tokens, the precision."""

    h = hashlib.sha256(f"chatforge-dpo-reference-{REFERENCE_VERSION}-{precision}-{model_fingerprint(base)}".encode())
    for e in examples:
        h.update(json.dumps([e.prompt, e.chosen, e.rejected, e.chosen_mask, e.rejected_mask]).encode())
    return h.hexdigest()[:24]


def save_reference(path: Path, values: list, fingerprint: str) -> None:

    lengths = torch.tensor([len(v) for v in values], dtype=torch.long)
    flat = torch.cat(values) if values else torch.zeros(0)
    files.write_bytes(path, save({"values": flat.float().contiguous(), "lengths": lengths},
                                 metadata={"format": "pt", "fingerprint": fingerprint}))


def load_reference(path: Path, fingerprint: str) -> list | None:
    """The cached values when `path` holds them for `fingerprint`, else None (missing, stale or damaged)."""

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("fingerprint") != fingerprint:
                return None
            flat, lengths = f.get_tensor("values"), f.get_tensor("lengths")
    except (SafetensorError, OSError, KeyError, ValueError):
        return None
    return list(flat.split(lengths.tolist()))


# ---------------------------------------------------------------------------------------------
# Options


@dataclass
class DPOConfig(PreferenceOptions):
    """`chatforge dpo`'s options (those of the rows and the loop: `PreferenceOptions`)."""
    beta: float = option(0.1, "how far the model may move from --base: larger keeps it closer")
    loss: str = option("sigmoid", "sigmoid: DPO; ipo: squared, per-token log-ratios; hinge: SLiC's max(0, 1 - beta h)",
                       choices=LOSSES)
    batch_size: int = option(8, "pairs per micro-batch")


# ---------------------------------------------------------------------------------------------
# The stage


def cached_reference(out: Path, base: Path, model, examples: list, batch_size: int, pad_id: int, device,
                     precision: str, stage: str) -> torch.Tensor:
    """The reference log-probabilities of `examples` (`reference_logps`), from `OUT/REFERENCE_FILE`
    when it was computed for the same base, examples and precision, else computed and saved there.
    Called before anything is trained or added: the model as loaded IS the reference."""
    fingerprint = reference_fingerprint(base, examples, precision)
    ref = load_reference(out / REFERENCE_FILE, fingerprint)
    if ref is None:
        ref = reference_logps(model, examples, batch_size, pad_id, device, precision)
        save_reference(out / REFERENCE_FILE, ref, fingerprint)
    else:
        print(f"{stage}: reference log-probabilities from {out / REFERENCE_FILE}")
    return ref


def run_dpo(base: str | Path, prefs: str | Path, out: str | Path | None = None, config: DPOConfig | None = None,
            **options: Any) -> dict:
    """DPO-train `base` on the pairs in `prefs` into `out`; returns the report (also `OUT/dpo.json`).

    `config` holds the options (default: `DPOConfig()`); `options` change some by their flat
    names (`beta=0.1`, `loss="ipo"`, `lora_rank=16`, ...)."""
    o = build(DPOConfig, {**(flatten(config) if config else {}), **options}, "dpo")
    if not base:
        raise ChatforgeError("pass --base DIR: the model folder to align (e.g. the output of `chatforge sft`)")
    if not prefs:
        raise ChatforgeError("pass --prefs FILE.jsonl: preference pairs from `chatforge prefs make` "
                             "or `chatforge feedback export`")
    base, out = Path(base), Path(out) if out else Path(base).parent / "dpo"
    loss_fn = make_loss_fn(o.beta, o.loss)

    pairs = read_preferences(prefs)
    model, tok = load_model(base)
    max_length = min(o.max_length, model.config.max_seq_len)
    encoded, stats = encode_pairs(pairs, tok, max_length, o.truncate)
    train_idx, val_idx = split_by_question(pairs, o.val_fraction, o.seed)
    train_ex = [encoded[i] for i in train_idx if encoded[i] is not None]
    val_ex = [encoded[i] for i in val_idx if encoded[i] is not None]
    if not train_ex:
        raise ChatforgeError(f"no pair of {prefs} fits in --max-length {max_length} tokens; raise it or use --truncate left")

    device = runtime.pick_device(o.device)
    precision = runtime.resolve_precision(o.precision, device)
    out.mkdir(parents=True, exist_ok=True)
    ref = cached_reference(out, base, model, train_ex + val_ex, o.batch_size, tok.pad_id, device, precision, "dpo")
    ref_train, ref_val = ref[:len(train_ex)], ref[len(train_ex):]

    recipe.prepare(model, o.method, o.lora, o.seed)
    policy = ReplyLogProbs(model)
    params = [p for p in policy.parameters() if p.requires_grad]
    source = PairBatches(train_ex, o.batch_size, tok.pad_id, seed=o.seed, ref=ref_train)
    steps = recipe.steps(o, o.epochs, source.batches_per_epoch, max_length)
    lr = recipe.learning_rate(o, DEFAULT_LR, o.method)
    cfg = o.train_config(steps, max_length, lr, o.eval_every or max(1, steps // 4),
                         compile="off" if o.compile == "auto" else o.compile)
    val_batches = eval_pair_batches(val_ex, o.batch_size, tok.pad_id, ref_val) if val_ex else None
    n_train = sum(p.numel() for p in params)
    print(f"dpo ({o.method}, {o.loss} loss, beta {o.beta:g}): {len(train_ex)} train / {len(val_ex)} val pairs "
          f"(truncated {stats.truncated}, dropped {stats.dropped}), training {n_train / 1e6:.2f}M of "
          f"{model.num_params() / 1e6:.2f}M parameters for {steps} steps at lr {lr:g}")
    result = train(policy, source, loss_fn, cfg, out, val_batches=val_batches, tokenizer=tok, resume=o.resume,
                   params=params, save_fn=recipe.save_fn(out, tok, base, o.method, o.lora_save, inner="model"))
    report = {"base": str(base), "prefs": str(prefs), "method": o.method, "loss": o.loss, "beta": o.beta,
              "lr": lr, "steps": result.step, "max_length": max_length, "pairs": stats.to_dict(),
              "train_pairs": len(train_ex), "val_pairs": len(val_ex), "trainable_parameters": n_train,
              **recipe.run_summary(out, result), **recipe.lora_report(o.method, o.lora)}
    files.write_json(out / "dpo.json", report)
    if report["validation"]:
        v = report["validation"]
        print(f"validation (step {report['best_step']}): loss {v['loss']:.4f}, reward accuracy "
              f"{v['reward_accuracy']:.3f}, margin {v['reward_margin']:.3f}, kl {v['kl']:.4f} -> {out}")
    return report
