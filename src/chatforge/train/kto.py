"""KTO: aligning a chat model on unpaired thumbs (prompt, reply, good or bad), the loss and its training.

    from chatforge.train.kto import run_kto
    report = run_kto("runs/demo/sft", "runs/demo/feedback-data/kto.jsonl", "runs/demo/kto", beta=0.1)

(`chatforge kto` is the command: `commands/kto.py`. The options are `KTOConfig`: those DPO shares,
`train.pairs.PreferenceOptions`, plus the loss's weights.)

KTO (Ethayarajh et al., 2024) needs no pairs: each row is one reply with a label, desirable (a
thumbs up, a correction) or undesirable (a thumbs down). With pi the model trained, pi_ref the
model it starts from, r = log pi(y|x) - log pi_ref(y|x) a reply's summed log-ratio and z a
batch's estimate of KL(pi || pi_ref), each row's loss is

    desirable:    desirable_weight   * (1 - sigmoid(beta * (r - z)))
    undesirable:  undesirable_weight * (1 - sigmoid(beta * (z - r)))

averaged over the batch's rows (`kto_losses`, a pure function), as TRL's `KTOTrainer` computes
it (its defaults: beta 0.1, both weights 1.0; tests/test_kto.py checks equality within 1e-5).
z is estimated as TRL does (`kl_estimate`): each row's prompt is paired with the completion of
the row before it in its batch (the first with the last's), and z is the batch mean of the
log-ratios of these mismatched replies, detached and clamped at 0. The mismatched rows are fixed
when the batches are made (batches of similar length, shuffled as wholes each epoch), so their
reference values are computed once with the others.

Layout: one row per (prompt, completion, mismatched completion), the pair layout of
`train/pairs.py` with the completion as the "chosen" side and the mismatched one as the
"rejected" side: the prompt's forward and backward run once for both, and the mismatched
completions run without gradients (`kto_token_logps`: z is detached, so their backward would
compute only zeros). The reference's
log-probabilities are computed once before training by the model as loaded (no second copy in
memory, with LoRA or full training) and cached in `OUT/reference_logps.safetensors` (the DPO
stage's cache and helpers, `train/dpo.py`).

Logged in `OUT/metrics.jsonl` (the loop counts rows where other stages count tokens): `loss`,
`kl` (z), `reward_accuracy` (the share of rows on their label's side: r > z for desirable,
r < z for undesirable), `rewards_desirable` / `rewards_undesirable` (the mean beta * r of each
kind in a batch, 0 in a batch without that kind), `logps` (the mean summed log-probability of
the replies). The output is a model folder, `metrics.jsonl`, `last/` for `--resume` and
`kto.json` (counts, options, the best validation's metrics), as `chatforge dpo` writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from chatforge import files, runtime
from chatforge.data.chat_data import ShuffledBatches, length_groups
from chatforge.data.prefs import split_by_question
from chatforge.data.unpaired import read_unpaired
from chatforge.errors import ChatforgeError
from chatforge.model.folder import load_model
from chatforge.model.heads import hidden_states
from chatforge.options import build, flatten, option
from chatforge.train import dpo, recipe
from chatforge.train.loop import train
from chatforge.train.pairs import (
    PairExample,
    PairStats,
    PreferenceOptions,
    PrefixCache,
    common_prefix,
    encode_all,
    make_pair_batch,
    reply_attention_mask,
    reply_span,
    side_sums,
)

DEFAULT_LR = dpo.DEFAULT_LR
# TRL's KTOConfig defaults.
DEFAULT_BETA = 0.1
DEFAULT_DESIRABLE_WEIGHT = 1.0
DEFAULT_UNDESIRABLE_WEIGHT = 1.0


# ---------------------------------------------------------------------------------------------
# The loss (pure functions of summed reply log-probabilities)


def kl_estimate(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """z: the batch mean of the mismatched replies' log-ratios, detached, at least 0."""
    return (policy_kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


def kto_losses(policy_logps: torch.Tensor, ref_logps: torch.Tensor, labels: torch.Tensor, kl: torch.Tensor,
               beta: float = DEFAULT_BETA, desirable_weight: float = DEFAULT_DESIRABLE_WEIGHT,
               undesirable_weight: float = DEFAULT_UNDESIRABLE_WEIGHT) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted losses (B,), rewards beta * r (B,), detached) from summed reply log-probs (B,),
    boolean `labels` (B,) (True = desirable) and the batch's KL estimate `kl` (0-dim)."""
    ratio = policy_logps - ref_logps
    # Desirable rows gain as r rises above z, undesirable ones as it falls below.
    sign = labels.to(ratio.dtype) * 2 - 1
    losses = 1 - torch.sigmoid(beta * sign * (ratio - kl))
    weights = torch.where(labels, desirable_weight, undesirable_weight).to(ratio.dtype)
    return weights * losses, beta * ratio.detach()


def make_loss_fn(beta: float = DEFAULT_BETA, desirable_weight: float = DEFAULT_DESIRABLE_WEIGHT,
                 undesirable_weight: float = DEFAULT_UNDESIRABLE_WEIGHT):
    """The loop's loss: (mean loss over the batch's rows, rows, metrics) for a `KTOLogProbs` model."""


    if not beta > 0:
        raise ChatforgeError(f"--beta must be positive, got {beta}")
    if not (desirable_weight > 0 and undesirable_weight > 0):
        raise ChatforgeError(f"--desirable-weight and --undesirable-weight must be positive, got "
                             f"{desirable_weight} and {undesirable_weight}")

    def loss_fn(model, batch: dict):
        logps = model(batch)                                # (2B, R): the rows' replies, then the mismatched ones
        policy, policy_kl = side_sums(logps, batch)
        ref, ref_kl = side_sums(batch["ref_logps"], batch)
        labels = batch["label"]
        kl = kl_estimate(policy_kl.detach(), ref_kl)
        losses, rewards = kto_losses(policy, ref, labels, kl, beta, desirable_weight, undesirable_weight)
        good, bad = labels.float(), (~labels).float()
        metrics = {"kl": kl,
                   "reward_accuracy": ((rewards / beta > kl) == labels).float().mean(),
                   "rewards_desirable": (rewards * good).sum() / good.sum().clamp(min=1),
                   "rewards_undesirable": (rewards * bad).sum() / bad.sum().clamp(min=1),
                   "logps": policy.detach().mean()}
        return losses.mean(), len(losses), metrics
    return loss_fn


# ---------------------------------------------------------------------------------------------
# The forward pass


def kto_token_logps(model: nn.Module, batch: dict) -> torch.Tensor:
    """(2B, R) log-probabilities of the scored reply tokens, as `pairs.reply_token_logps` gives
    them: rows 0..B-1 the completions, B..2B-1 the mismatched ones. The prompt runs once; the
    mismatched completions run after the others without gradients (z is detached: their
    backward would only compute zeros)."""

    prompt_ids, reply_ids, prompt_len = batch["prompt_ids"], batch["reply_ids"], batch["prompt_len"]
    (B, P), R = prompt_ids.shape, reply_ids.shape[1]
    cache = PrefixCache()
    prompt_states = hidden_states(model, prompt_ids, cache=cache,
                                  positions=torch.arange(P, device=prompt_ids.device).expand(B, P))
    cache.recording = False
    last_prompt = prompt_states[torch.arange(B, device=prompt_ids.device), prompt_len - 1]          # (B, C)
    positions = prompt_len[:, None] + torch.arange(R, device=reply_ids.device)[None, :]
    mask = reply_attention_mask(prompt_len, P, R, times=1)

    def logps(ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        states = hidden_states(model, ids, cache=cache, positions=positions, attn_mask=mask)
        # Reply token j is predicted by the state before it: the prompt's last one for j = 0.
        before = torch.cat([last_prompt[:, None], states[:, :-1]], dim=1)
        logits = model.lm_head(before[keep])
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        values = -F.cross_entropy(logits, ids[keep], reduction="none")
        return torch.zeros(keep.shape, dtype=values.dtype, device=values.device).masked_scatter(keep, values)

    own = logps(reply_ids[:B], batch["reply_scored"][:B])
    with torch.no_grad():
        other = logps(reply_ids[B:], batch["reply_scored"][B:])
    return torch.cat([own, other.to(own.dtype)])


class KTOLogProbs(nn.Module):
    """What the loop trains: a GPT whose forward is `kto_token_logps` of a KTO batch."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict) -> torch.Tensor:
        return kto_token_logps(self.model, batch)


# ---------------------------------------------------------------------------------------------
# Rows as tokens, and batches with their mismatched completions


@dataclass
class KTOExample:
    prompt: list[int]
    completion: list[int]              # reply tokens up to and including <|im_end|>
    mask: list[int] = field(default_factory=list)   # 1 = scored (all but a merged header token)
    label: bool = True

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.completion)


def encode_row(row, tokenizer, max_length: int, truncate: str = "left") -> tuple[KTOExample | None, str]:
    """(example or None, "kept" / "truncated" / "dropped") for one `Unpaired` row, rendered as
    `train/pairs.py` renders a pair's side."""
    prompt = tokenizer.render_chat(row.prompt, add_generation_prompt=True)[0]
    ids, mask = tokenizer.render_chat(row.conversation())
    p = min(len(prompt), common_prefix(prompt, ids))
    completion, completion_mask = reply_span(ids, mask, p)
    if p == 0 or not any(completion_mask):
        return None, "dropped"
    excess = p + len(completion) - max_length
    cut = 0
    if excess > 0:
        if truncate != "left" or excess > p - 1:    # one prompt token must stay: it predicts the first reply token
            return None, "dropped"
        cut = excess
    return KTOExample(prompt[cut:p], completion, completion_mask, bool(row.label)), "truncated" if cut else "kept"


def encode_rows(rows: Sequence, tokenizer, max_length: int,
                truncate: str = "left") -> tuple[list[KTOExample | None], PairStats]:
    """Every row encoded (None where dropped, so indices match `rows`) and the counts."""
    return encode_all(rows, encode_row, tokenizer, max_length, truncate)


def kto_groups(examples: Sequence[KTOExample], batch_size: int, seed: int = 0) -> list[list[int]]:
    """Batches of rows of similar length; a last batch of one row joins the one before (alone,
    its mismatched completion would be its own)."""
    groups = length_groups([e.length for e in examples], batch_size, seed)
    if len(groups) > 1 and len(groups[-1]) == 1:
        groups[-2] += groups.pop()
    return groups


def with_mismatched(examples: Sequence[KTOExample], max_length: int) -> list[PairExample]:
    """The pair-layout rows of one batch: row i's prompt with its completion, and with the
    completion of row i - 1 (row 0: the last row's), cut to `max_length` as TRL's collator cuts."""
    out = []
    for i, e in enumerate(examples):
        other = examples[i - 1]
        room = max(1, max_length - len(e.prompt))
        out.append(PairExample(e.prompt, e.completion, other.completion[:room], e.mask, other.mask[:room]))
    return out


def make_kto_batch(examples: Sequence[KTOExample], pairs: Sequence[PairExample], pad_id: int,
                   ref: Sequence[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    batch = make_pair_batch(pairs, pad_id, ref)
    batch["label"] = torch.tensor([e.label for e in examples], dtype=torch.bool)
    return batch


class KTOBatches:
    """The loop's batch source: fixed batches (`kto_groups`), shuffled as wholes each epoch."""

    def __init__(self, examples: Sequence[KTOExample], groups: list[list[int]], pairs: list[list[PairExample]],
                 pad_id: int, seed: int = 0, ref: list[list[torch.Tensor]] | None = None, shuffle: bool = True):
        def fetch(index: torch.Tensor) -> dict:
            g = int(index[0])
            return make_kto_batch([examples[i] for i in groups[g]], pairs[g], pad_id, None if ref is None else ref[g])
        self._source = ShuffledBatches(len(groups), 1, fetch, seed, shuffle)
        self.batches_per_epoch = len(groups)

    def next_batch(self) -> dict[str, torch.Tensor]:
        return self._source.next_batch()

    def state_dict(self) -> dict:
        return self._source.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._source.load_state_dict(state)


# ---------------------------------------------------------------------------------------------
# The stage


@dataclass
class KTOConfig(PreferenceOptions):
    """`chatforge kto`'s options: the loss's, plus those DPO shares (`PreferenceOptions`)."""
    beta: float = option(DEFAULT_BETA, "how far the model may move from --base: larger keeps it closer")
    desirable_weight: float = option(DEFAULT_DESIRABLE_WEIGHT, "weight of the desirable rows' losses (raise it when "
                                                               "they are the fewer)")
    undesirable_weight: float = option(DEFAULT_UNDESIRABLE_WEIGHT, "weight of the undesirable rows' losses (raise it "
                                                                   "when they are the fewer)")
    batch_size: int = option(8, "rows per micro-batch (at least 2: the KL term is estimated from the others)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_size < 2:
            raise ChatforgeError(f"--batch-size must be at least 2: KTO estimates its KL term from the other rows of "
                                 f"a batch, got {self.batch_size}")


def run_kto(base: str | Path, data: str | Path, out: str | Path | None = None, config: KTOConfig | None = None,
            **options: Any) -> dict:
    """KTO-train `base` on the rows in `data` into `out`; returns the report (also `OUT/kto.json`).

    `config` holds the options (default: `KTOConfig()`); `options` change some by their flat
    names (`beta=0.1`, `lora_rank=16`, ...)."""
    o = build(KTOConfig, {**(flatten(config) if config else {}), **options}, "kto")
    if not base:
        raise ChatforgeError("pass --base DIR: the model folder to align (e.g. the output of `chatforge sft`)")
    if not data:
        raise ChatforgeError("pass --data FILE.jsonl: KTO rows from `chatforge feedback export` (kto.jsonl), "
                             "or preference pairs")
    base, out = Path(base), Path(out) if out else Path(base).parent / "kto"
    loss_fn = make_loss_fn(o.beta, o.desirable_weight, o.undesirable_weight)

    rows = read_unpaired(data)
    model, tok = load_model(base)
    max_length = min(o.max_length, model.config.max_seq_len)
    encoded, stats = encode_rows(rows, tok, max_length, o.truncate)
    train_idx, val_idx = split_by_question(rows, o.val_fraction, o.seed)
    train_ex = [encoded[i] for i in train_idx if encoded[i] is not None]
    val_ex = [encoded[i] for i in val_idx if encoded[i] is not None]
    if len(train_ex) < 2:
        raise ChatforgeError(f"{len(train_ex)} training row(s) of {data} fit in --max-length {max_length} tokens; "
                             "KTO needs at least two (raise --max-length, lower --val-fraction or add rows)")
    groups = kto_groups(train_ex, o.batch_size, o.seed)
    val_groups = kto_groups(val_ex, o.batch_size) if len(val_ex) >= 2 else []
    pairs = [with_mismatched([train_ex[i] for i in g], max_length) for g in groups]
    val_pairs = [with_mismatched([val_ex[i] for i in g], max_length) for g in val_groups]
    flat = [p for g in pairs + val_pairs for p in g]

    device = runtime.pick_device(o.device)
    precision = runtime.resolve_precision(o.precision, device)
    out.mkdir(parents=True, exist_ok=True)
    ref = dpo.cached_reference(out, base, model, flat, o.batch_size, tok.pad_id, device, precision, "kto")
    ref_groups, start = [], 0
    for g in pairs + val_pairs:
        ref_groups.append(ref[start:start + len(g)])
        start += len(g)

    recipe.prepare(model, o.method, o.lora, o.seed)
    policy = KTOLogProbs(model)
    params = [p for p in policy.parameters() if p.requires_grad]
    source = KTOBatches(train_ex, groups, pairs, tok.pad_id, o.seed, ref_groups[:len(groups)])
    steps = recipe.steps(o, o.epochs, source.batches_per_epoch, max_length)
    lr = recipe.learning_rate(o, DEFAULT_LR, o.method)
    cfg = o.train_config(steps, max_length, lr, o.eval_every or max(1, steps // 4),
                         compile="off" if o.compile == "auto" else o.compile)
    val_batches = [make_kto_batch([val_ex[i] for i in g], p, tok.pad_id, r)
                   for g, p, r in zip(val_groups, val_pairs, ref_groups[len(groups):])] or None
    n_desirable = sum(e.label for e in train_ex)
    n_train = sum(p.numel() for p in params)
    print(f"kto ({o.method}, beta {o.beta:g}, weights {o.desirable_weight:g} / {o.undesirable_weight:g}): "
          f"{len(train_ex)} train rows ({n_desirable} desirable) / {len(val_ex)} val (truncated {stats.truncated}, "
          f"dropped {stats.dropped}), training {n_train / 1e6:.2f}M of {model.num_params() / 1e6:.2f}M parameters "
          f"for {steps} steps at lr {lr:g}")
    result = train(policy, source, loss_fn, cfg, out, val_batches=val_batches, tokenizer=tok, resume=o.resume,
                   params=params, save_fn=recipe.save_fn(out, tok, base, o.method, o.lora_save, inner="model"))
    report = {"base": str(base), "data": str(data), "method": o.method, "beta": o.beta,
              "desirable_weight": o.desirable_weight, "undesirable_weight": o.undesirable_weight,
              "lr": lr, "steps": result.step, "max_length": max_length, "rows": stats.to_dict(),
              "train_rows": len(train_ex), "train_desirable": n_desirable, "val_rows": len(val_ex),
              "trainable_parameters": n_train,
              **recipe.run_summary(out, result), **recipe.lora_report(o.method, o.lora)}
    files.write_json(out / "kto.json", report)
    if report["validation"]:
        v = report["validation"]
        print(f"validation (step {report['best_step']}): loss {v['loss']:.4f}, reward accuracy "
              f"{v['reward_accuracy']:.3f}, kl {v['kl']:.4f} -> {out}")
    return report
