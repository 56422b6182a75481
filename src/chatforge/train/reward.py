"""`chatforge reward train|score`: a reward model, a scalar score of how good a reply is.

    chatforge reward train --base runs/demo/sft --prefs runs/demo/prefs.jsonl --out runs/demo/reward
    chatforge reward train ... --method freeze --freeze-top 0     # the backbone fixed: the head alone, in seconds
    chatforge reward score --model runs/demo/reward --prompt "How do I remove a package?" \\
        --response "Run apt remove PACKAGE." --response "I don't know."
    chatforge reward score --model runs/demo/reward --input runs/demo/prefs.jsonl   # scores and pair accuracy

From Python (what PPO calls):

    rm = load_reward_model("runs/demo/reward")                    # safetensors + JSON, no code runs
    rm.score([(prompt_messages, "reply text"), [...whole conversation...]])   # -> (N,) float32 tensor
    rm.score_ids([prompt_ids + reply_ids])                         # rendered chat ids, see `score_ids`

Model: the backbone of `--base` (a GPT) reads the conversation, rendered with the chat template
as SFT renders it; its final hidden state at the reply's last token (`<|im_end|>`, the only
position that has seen the whole reply) goes through a `RewardHead` (model/heads.py), one linear
layer, to a score. Only differences of scores mean anything.

Training: Bradley-Terry on each preference pair, loss = -log sigmoid(score(chosen) - score(rejected))
(`bradley_terry`), averaged over the pairs, on the shared training loop. Pairs come from
`chatforge.data.prefs.read_preferences` and are laid out as DPO lays them out (`train/pairs.py`:
the prompt once, each reply seeing only the prompt and itself), so one forward gives both scores.
A seeded `--holdout` share of the questions (with all their pairs) is kept for the report, and
`--val-fraction` of the rest for validation (the best checkpoint).

Methods: `lora` (default: adapters as in `chatforge sft`, merged when saved, plus the head),
`full` (every weight), `freeze` (only the top `--freeze-top` blocks, the final norm and the head;
`--freeze-top 0` trains the head alone, on features the fixed backbone computes once).

Report (printed, and in `reward.json`): held-out pair accuracy (the share of pairs whose chosen
reply scores higher) beside a length baseline (the longer reply wins, ties count half) and
chance (0.5), overall and per `kind` when the pairs carry one (`chatforge prefs make` writes it).

Output folder: a model folder (the backbone, adapters merged) plus `reward_head.safetensors` and
`reward.json` (format, max length, method, metrics), loaded by `load_reward_model`.

Options: `RewardConfig`; from Python, `train_reward_model(base, prefs, out, method="freeze", ...)`
with the flags' names. The commands are `chatforge.commands.reward`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file

from chatforge import files, runtime
from chatforge.data.chat_data import ShuffledBatches
from chatforge.data.prefs import parse_preference, prompt_messages, read_preferences, split_by_question
from chatforge.errors import ChatforgeError
from chatforge.model.folder import load_model
from chatforge.model.heads import RewardHead, hidden_states
from chatforge.model.lora import LoraConfig, PreferenceLora
from chatforge.options import build, flatten, group, option
from chatforge.train import recipe
from chatforge.train.loop import LoopOptions, train
from chatforge.train.pairs import (
    TRUNCATE,
    PairBatches,
    encode_pairs,
    eval_pair_batches,
    length_batches,
    make_pair_batch,
    reply_end_states,
)

HEAD_WEIGHTS, REWARD_CONFIG = "reward_head.safetensors", "reward.json"
FORMAT = "chatforge-reward"
METHODS = ("lora", "full", "freeze")
DEFAULT_LR = {"lora": 5e-4, "full": 1e-5, "freeze": 1e-4}
HEAD_ONLY_LR = 1e-2


# ---------------------------------------------------------------------------------------------
# The model


def bradley_terry(chosen, rejected):
    """Per-pair loss -log sigmoid(chosen - rejected) of (B,) scores."""
    return -F.logsigmoid(chosen - rejected)


class RewardModel(nn.Module):
    """A GPT backbone and a `RewardHead`: a conversation ending in a reply -> one score."""

    def __init__(self, backbone: nn.Module, tokenizer=None, max_length: int = 1024):
        super().__init__()
        self.backbone, self.tokenizer, self.max_length = backbone, tokenizer, max_length
        self.head = RewardHead(backbone.config.d_model)

    def forward(self, batch: dict) -> torch.Tensor:
        """(B, 2) scores of each pair's chosen and rejected reply, from a pair batch (`train/pairs.py`)."""
        return self.head(self.reply_states(batch))

    def reply_states(self, batch: dict) -> torch.Tensor:
        """(B, 2, C) final hidden states at each reply's last token."""
        return reply_end_states(self.backbone, batch)

    @torch.no_grad()
    def score_ids(self, sequences: Sequence[Sequence[int]], batch_size: int = 16) -> torch.Tensor:
        """(N,) float32 scores of conversations given as token ids, as `render_chat(messages)`
        gives them, ending with the reply's `<|im_end|>` (the newline `render_chat` puts after it
        is dropped; when the last token is not `<|im_end|>`, as in an engine rollout's prompt +
        completion tokens, it is appended). Sequences longer than `max_length` keep their last
        `max_length` tokens. Runs in eval mode on the model's device."""
        if self.tokenizer is None:
            raise ChatforgeError("this reward model has no tokenizer; load it with load_reward_model(folder)")
        end, newline = self.tokenizer.im_end_id, self.tokenizer.encode("\n")
        rows = []
        for seq in sequences:
            seq = [int(t) for t in seq]
            if len(seq) > len(newline) and seq[-len(newline):] == newline and seq[-len(newline) - 1] == end:
                seq = seq[:-len(newline)]
            elif not seq or seq[-1] != end:
                seq.append(end)
            rows.append(seq[-self.max_length:])
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        out = torch.zeros(len(rows), dtype=torch.float32)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))   # batches of similar length
        for start in range(0, len(order), batch_size):
            group = order[start:start + batch_size]
            T = max(len(rows[i]) for i in group)
            ids = torch.full((len(group), T), self.tokenizer.pad_id, dtype=torch.long)
            for b, i in enumerate(group):
                ids[b, :len(rows[i])] = torch.tensor(rows[i])
            # Right padding and causal attention: no real token sees the padding after it.
            hidden = hidden_states(self.backbone, ids.to(device))
            last = torch.tensor([len(rows[i]) - 1 for i in group], device=device)
            out[group] = self.head(hidden[torch.arange(len(group), device=device), last]).float().cpu()
        self.train(was_training)
        return out

    def score(self, conversations: Sequence, batch_size: int = 16) -> torch.Tensor:
        """(N,) float32 scores. Each item is a conversation ending with the assistant's reply
        (a list of {"role", "content"}), or a (prompt, reply) pair: prompt a string (one user
        turn) or messages, reply a string."""
        if self.tokenizer is None:
            raise ChatforgeError("this reward model has no tokenizer; load it with load_reward_model(folder)")
        rendered = []
        for item in conversations:
            if isinstance(item, tuple):
                prompt, reply = item
                prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
                item = [*prompt, {"role": "assistant", "content": reply}]
            if not item or item[-1].get("role") != "assistant":
                raise ChatforgeError("a conversation to score must end with the assistant's reply")
            rendered.append(self.tokenizer.render_chat(item)[0])
        return self.score_ids(rendered, batch_size)


def load_reward_model(folder: str | Path, device: str = "cpu"):
    """The `RewardModel` saved in `folder` by `chatforge reward train`, in eval mode on `device`.
    Reads safetensors and JSON only."""
    folder = Path(folder)
    if not (folder / REWARD_CONFIG).is_file():
        raise ChatforgeError(f"{folder} is not a reward model folder ({REWARD_CONFIG} is missing); "
                             "train one with `chatforge reward train`")
    try:
        meta = json.loads((folder / REWARD_CONFIG).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ChatforgeError(f"{folder / REWARD_CONFIG} is corrupt ({e}); train the reward model again") from None
    if meta.get("format") != FORMAT:
        raise ChatforgeError(f"{folder / REWARD_CONFIG} is not a chatforge reward model (format {meta.get('format')!r})")
    backbone, tok = load_model(folder)
    model = RewardModel(backbone, tok, int(meta.get("max_length", 1024)))
    try:
        model.head.load_state_dict(load_file(str(folder / HEAD_WEIGHTS)))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ChatforgeError(f"{folder / HEAD_WEIGHTS} is missing, corrupt or of another shape ({e})") from None
    model.meta = meta
    return model.to(device).eval()


def reward_loss(model, batch: dict):
    """The loop's loss: (mean Bradley-Terry loss, pairs, metrics). `model` is a `RewardModel` given
    pair batches, or its head alone given the fixed backbone's features {"features": (B, 2, C)}."""
    scores = (model(batch["features"]) if "features" in batch else model(batch)).float()
    chosen, rejected = scores[:, 0], scores[:, 1]
    metrics = {"accuracy": (chosen > rejected).float().mean(), "margin": (chosen - rejected).detach().mean(),
               "rewards_chosen": chosen.detach().mean(), "rewards_rejected": rejected.detach().mean()}
    return bradley_terry(chosen, rejected).mean(), len(scores), metrics


# ---------------------------------------------------------------------------------------------
# Evaluation


def pair_accuracy(chosen: Sequence[float], rejected: Sequence[float]) -> float:
    """Share of pairs whose chosen score is higher; a tie counts half (chance is 0.5)."""
    wins = sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected))
    return wins / max(1, len(chosen))


def held_out_report(chosen_scores: Sequence[float], rejected_scores: Sequence[float], prefs: Sequence) -> dict:
    """Model accuracy beside the length baseline (longer reply wins) and chance, overall and per kind."""
    def block(idx: list[int]) -> dict:
        return {"pairs": len(idx),
                "model": round(pair_accuracy([chosen_scores[i] for i in idx], [rejected_scores[i] for i in idx]), 4),
                "longer_wins": round(pair_accuracy([len(prefs[i].chosen) for i in idx],
                                                   [len(prefs[i].rejected) for i in idx]), 4),
                "chance": 0.5}
    report = {"all": block(list(range(len(prefs))))}
    kinds: dict[str, list[int]] = {}
    for i, p in enumerate(prefs):
        if isinstance(p.meta.get("kind"), str):
            kinds.setdefault(p.meta["kind"], []).append(i)
    if len(kinds) > 1 or (kinds and sum(map(len, kinds.values())) < len(prefs)):
        report["by_kind"] = {k: block(v) for k, v in sorted(kinds.items())}
    return report


def format_report(report: dict) -> str:
    rows = [("all", report["all"])] + [(f"  {k}", v) for k, v in report.get("by_kind", {}).items()]
    lines = [f"held-out pairs{'':<12}{'pairs':>7}{'model':>9}{'longer wins':>13}{'chance':>8}"]
    for name, r in rows:
        lines.append(f"{name:<26}{r['pairs']:>7}{r['model']:>9.3f}{r['longer_wins']:>13.3f}{r['chance']:>8.2f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Training


def backbone_features(model, examples, batch_size: int, pad_id: int, device, precision: str):
    """(N, 2, C) float32 hidden states at each pair's reply ends, from the fixed backbone."""
    out = torch.zeros(len(examples), 2, model.backbone.config.d_model)
    model.eval().to(device)
    with torch.no_grad(), runtime.autocast(device, precision):
        for rows in length_batches(examples, batch_size):
            batch = make_pair_batch([examples[i] for i in rows], pad_id)
            out[rows] = model.reply_states({k: v.to(device) for k, v in batch.items()}).float().cpu()
    return out


def pair_scores(model, examples, batch_size: int, pad_id: int, device, precision: str = "fp32"):
    """(N, 2) float32 scores of each pair's chosen and rejected reply, in the order of `examples`."""
    out = torch.zeros(len(examples), 2)
    model.eval().to(device)
    with torch.no_grad(), runtime.autocast(device, precision):
        for rows in length_batches(examples, batch_size):
            batch = make_pair_batch([examples[i] for i in rows], pad_id)
            out[rows] = model({k: v.to(device) for k, v in batch.items()}).float().cpu()
    return out


@dataclass
class RewardConfig(LoopOptions):
    """`chatforge reward train`'s options (the loop's: `LoopOptions`, some defaults changed)."""
    method: str = option("lora", "lora: adapters + head; full: every weight; freeze: the top --freeze-top blocks "
                                 "+ head", choices=METHODS)
    freeze_top: int = option(0, "freeze: blocks that train (0 = the head alone, on features computed once)")
    lora: LoraConfig = group(PreferenceLora, "lora")
    max_length: int = option(1024, "most tokens read at once, the prompt plus the longer reply (capped at the "
                                   "model's context)")
    truncate: str = option("left", "too-long pairs: cut the prompt from the left, or drop them", choices=TRUNCATE)
    holdout: float = option(0.2, "share of the questions held out for the report")
    val_fraction: float = option(0.1, "share of the other questions used for validation")
    epochs: float = option(2.0, "passes over the training pairs (ignored with --steps)")
    lr: float | None = option(None, "peak learning rate (default: 5e-4 lora, 1e-5 full, 1e-4 freeze, 1e-2 head alone)")
    batch_size: int = option(8, "pairs per batch")
    tokens_per_step: int = option(0, "0 = one batch a step")
    eval_every: int = option(0, "steps between validations (0 = four times a run)")
    log_every: int = option(1, "steps between metrics.jsonl lines")
    compile: str = option("auto", "torch.compile: auto = off here (batches change length)",
                          choices=("auto", "on", "off"))

    def __post_init__(self) -> None:
        if not 0 < self.holdout < 1 or not 0 <= self.val_fraction < 1:
            raise ChatforgeError("--holdout must be in (0, 1) and --val-fraction in [0, 1)")
        if self.freeze_top < 0:
            raise ChatforgeError(f"--freeze-top must be 0 (the head alone) or more blocks, got {self.freeze_top}")
        if self.epochs <= 0 and not self.steps:
            raise ChatforgeError(f"--epochs must be positive, got {self.epochs}")

    @property
    def head_only(self) -> bool:
        """The backbone fixed: the head alone trains, on features computed once."""
        return self.method == "freeze" and self.freeze_top == 0


def train_reward_model(base: str | Path, prefs: str | Path, out: str | Path | None = None,
                       config: RewardConfig | None = None, **options: Any) -> dict:
    """Train a reward model on `base` from the pairs in `prefs` into `out` (default: a `reward`
    folder beside `base`); returns the report. `config` holds the options (default:
    `RewardConfig()`); `options` change some by their flat names (`method="freeze"`, ...)."""
    started = time.time()
    o = build(RewardConfig, {**(flatten(config) if config else {}), **options}, "reward")
    if not base:
        raise ChatforgeError("pass --base DIR: the model folder whose backbone to use (e.g. runs/demo/sft)")
    if not Path(base).is_dir():
        raise ChatforgeError(f"model folder {base} does not exist")
    if not prefs:
        raise ChatforgeError("pass --prefs FILE.jsonl: pairs from `chatforge prefs make` or "
                             "`chatforge feedback export`")
    out = Path(out) if out else Path(base).parent / "reward"
    pairs = read_preferences(prefs)
    rest, held_idx = split_by_question(pairs, o.holdout, o.seed)
    fit_local, val_local = split_by_question([pairs[i] for i in rest], o.val_fraction, o.seed + 1)
    fit_idx, val_idx = [rest[i] for i in fit_local], [rest[i] for i in val_local]

    backbone, tok = load_model(base)
    max_length = min(o.max_length, backbone.config.max_seq_len)
    encoded, stats = encode_pairs(pairs, tok, max_length, o.truncate)
    fit_idx, val_idx, held_idx = ([i for i in idx if encoded[i] is not None] for idx in (fit_idx, val_idx, held_idx))
    if not fit_idx or not held_idx:
        raise ChatforgeError(f"{prefs}: {len(pairs)} pairs ({stats.dropped} too long for --max-length {max_length}) "
                             "are too few to split into training and held-out questions; give more pairs")
    device = runtime.pick_device(o.device)
    precision = runtime.resolve_precision(o.precision, device)
    head_only = o.head_only

    torch.manual_seed(o.seed)   # the head's weights, then LoRA's A matrices (no reseed between them)
    model = RewardModel(backbone, tok, max_length)
    feature_start = time.time()
    if head_only:
        recipe.freeze_below_top(backbone, 0)
        feats = backbone_features(model, [e for e in encoded if e is not None], o.batch_size, tok.pad_id, device,
                                  precision)
        row = {i: j for j, i in enumerate(i for i, e in enumerate(encoded) if e is not None)}
        fit = torch.tensor([row[i] for i in fit_idx])
        source = ShuffledBatches(len(fit), o.batch_size, lambda index: {"features": feats[fit[index]]}, seed=o.seed)
        val_batches = [{"features": feats[[row[i] for i in val_idx]]}] if val_idx else None
        trained = model.head
    else:
        if o.method == "lora":
            o.lora.apply(backbone)
        elif o.method == "freeze":
            recipe.freeze_below_top(backbone, o.freeze_top)
        source = PairBatches([encoded[i] for i in fit_idx], o.batch_size, tok.pad_id, seed=o.seed)
        val_batches = eval_pair_batches([encoded[i] for i in val_idx], o.batch_size, tok.pad_id) if val_idx else None
        trained = model
    feature_seconds = time.time() - feature_start
    steps = recipe.steps(o, o.epochs, source.batches_per_epoch, max_length)
    lr = recipe.learning_rate(o, {**DEFAULT_LR, "head": HEAD_ONLY_LR}, "head" if head_only else o.method)
    cfg = o.train_config(steps, max_length, lr, o.eval_every or max(1, steps // 4),
                         compile="off" if o.compile == "auto" else o.compile)
    meta = {"format": FORMAT, "version": 1, "max_length": max_length, "base": str(base), "method": o.method,
            "head_only": head_only, "pooling": "last token of the reply (<|im_end|>)"}
    params = [p for p in trained.parameters() if p.requires_grad]
    print(f"reward ({o.method}{', head only' if head_only else ''}): {len(fit_idx)} train / {len(val_idx)} val / "
          f"{len(held_idx)} held-out pairs (truncated {stats.truncated}, dropped {stats.dropped}), training "
          f"{sum(p.numel() for p in params) / 1e6:.2f}M parameters for {steps} steps at lr {lr:g}")
    out.mkdir(parents=True, exist_ok=True)
    save = recipe.head_save_fn(out, tok, backbone, o.method, head_only, HEAD_WEIGHTS, REWARD_CONFIG, meta)
    result = train(trained, source, reward_loss, cfg, out, val_batches=val_batches, tokenizer=tok,
                   resume=o.resume, params=params, save_fn=save)

    eval_start = time.time()
    best = load_reward_model(out, str(device))
    if head_only:     # the backbone did not change: its features are the ones computed above
        with torch.no_grad():
            scores = best.head(feats[[row[i] for i in held_idx]].to(device)).float().cpu()
    else:
        scores = pair_scores(best, [encoded[i] for i in held_idx], o.batch_size, tok.pad_id, device, precision)
    chosen, rejected = scores[:, 0].tolist(), scores[:, 1].tolist()
    metrics = held_out_report(chosen, rejected, [pairs[i] for i in held_idx])
    report = {"base": str(base), "prefs": str(prefs), "method": o.method, "head_only": head_only,
              "precision": precision, "pairs": stats.to_dict(),
              "split": {"train": len(fit_idx), "val": len(val_idx), "held_out": len(held_idx)},
              "steps": result.step, "lr": lr, "best_val_loss": result.best_val_loss, "held_out": metrics,
              "seconds": {"features": round(feature_seconds, 1), "train": round(result.seconds, 1),
                          "evaluation": round(time.time() - eval_start, 1), "total": round(time.time() - started, 1)},
              "interrupted": result.interrupted, "out": str(out)}
    files.write_json(out / REWARD_CONFIG, {**meta, "metrics": metrics})
    files.write_json(out / "reward_report.json", report)
    print(format_report(metrics))
    return report


def read_score_input(path: str) -> tuple[list[dict], list[tuple], int]:
    """(records, items to score, pairs) of a `reward score --input` file: a pair line gives two
    items (chosen, then rejected), a {"prompt", "response"} line one."""
    records, items, n_pairs = [], [], 0
    for lineno, obj in files.iter_jsonl(path):
        try:
            if isinstance(obj, dict) and "response" in obj and "chosen" not in obj:
                if not isinstance(obj["response"], str) or not obj["response"].strip():
                    raise ValueError('"response" must be a non-empty string')
                items.append((prompt_messages(obj.get("prompt")), obj["response"]))
            else:
                pref = parse_preference(obj)
                items += [(pref.prompt, pref.chosen), (pref.prompt, pref.rejected)]
                n_pairs += 1
        except (ValueError, TypeError) as e:
            raise ChatforgeError(f"{path}:{lineno}: {e} (expected {{\"prompt\", \"response\"}} or a preference pair)") from None
        records.append(obj)
    if not records:
        raise ChatforgeError(f"{path} holds no lines to score")
    if n_pairs and n_pairs != len(records):
        raise ChatforgeError(f"{path} mixes preference pairs and single responses; score them in separate files")
    return records, items, n_pairs
