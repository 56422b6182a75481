"""Preference pairs as token batches: each prompt runs once, then both replies read its keys and values.

    examples, stats = encode_pairs(prefs, tokenizer, max_length=1024)
    source = PairBatches(examples, batch_size=8, pad_id=tokenizer.pad_id, seed=0)   # the loop's batch source
    logps = reply_token_logps(model, source.next_batch())                           # (2B, R) float32

A batch of B pairs (`chatforge.data.prefs.Preference`) is computed in two passes of the GPT:

1. the B prompts (right-padded) with plain causal attention; a `PrefixCache` keeps every layer's
   keys and values, with their gradients;
2. the 2B replies (rows 0..B-1 chosen, B..2B-1 rejected, right-padded), each row attending to
   its prompt's keys and values (padding hidden) and causally to itself, with RoPE positions
   continuing the prompt.

So the replies compute exactly what two separate passes over prompt+chosen and prompt+rejected
compute (the tests check it), with the prompt's work done once, and attention costs P^2 / 2 +
2 R (P + R) instead of 2 (P + R)^2: grounded prompts (passages and instructions) are several
times longer than their replies. (One row holding prompt, chosen and rejected under a
block mask computes the same, but CPU attention kernels then skip no block: measured here it
spent ~40% of a step in attention.)

The prompt is rendered with the chat template and its generation prompt (`<|im_start|>assistant\\n`),
each reply as the rest of `render_chat(prompt + reply)`: its content and `<|im_end|>`, the tokens
SFT learns too. (A pretrained tokenizer may merge the header's newline into the reply's first
token; the prompt is then where the two renderings part, as TRL takes it.) Too long pairs:
`max_length` bounds what the model sees at once, the prompt plus the longer reply; `truncate`
"left" cuts the prompt from the left to fit, "drop" drops the pair (both counted in `PairStats`).

Batch keys: `prompt_ids` (B, P), `prompt_len` (B,), `reply_ids` (2B, R), `reply_len` (2B,),
`reply_scored` (2B, R) (the reply tokens a log-probability is taken of: all but a header token a
pretrained tokenizer merged in), and `ref_logps` (2B, R) when reference values are given. Reply
token j is predicted by the position before it: the prompt's last position for j = 0. A reward
model reads each reply's last token, its `<|im_end|>`. Batches hold pairs of similar length
(sorted, then cut into batches that are shuffled as wholes each epoch), so they pad little.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from chatforge.data.chat_data import ShuffledBatches, length_groups
from chatforge.errors import ChatforgeError
from chatforge.model.heads import hidden_states
from chatforge.model.lora import LoraConfig, PreferenceLora
from chatforge.options import group, option
from chatforge.train.loop import LoopOptions


@dataclass
class PairExample:
    prompt: list[int]
    chosen: list[int]                  # reply tokens up to and including <|im_end|>
    rejected: list[int]
    chosen_mask: list[int] = field(default_factory=list)    # 1 = scored (all but a merged header token)
    rejected_mask: list[int] = field(default_factory=list)

    @property
    def length(self) -> int:
        """Tokens in its row."""
        return len(self.prompt) + len(self.chosen) + len(self.rejected)

    @property
    def pair_tokens(self) -> int:
        """Tokens of prompt+chosen and prompt+rejected as two sequences (what other trainers compute)."""
        return 2 * len(self.prompt) + len(self.chosen) + len(self.rejected)


@dataclass
class PairStats:
    kept: int = 0
    truncated: int = 0     # prompt cut from the left to fit
    dropped: int = 0       # a reply alone does not fit (or has nothing to score)

    def to_dict(self) -> dict:
        return {"kept": self.kept, "truncated": self.truncated, "dropped": self.dropped}


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def reply_span(ids: list[int], mask: list[int], start: int) -> tuple[list[int], list[int]]:
    """The reply's tokens from `start` to its last scored token (its <|im_end|>), and their mask."""
    end = max((i for i, m in enumerate(mask) if m), default=-1) + 1
    return ids[start:end], mask[start:end]


def encode_pair(pref, tokenizer, max_length: int, truncate: str = "left") -> tuple[PairExample | None, str]:
    """(example or None, "kept" / "truncated" / "dropped") for one `Preference`."""
    prompt = tokenizer.render_chat(pref.prompt, add_generation_prompt=True)[0]
    ids_c, mask_c = tokenizer.render_chat(pref.conversation("chosen"))
    ids_r, mask_r = tokenizer.render_chat(pref.conversation("rejected"))
    p = min(len(prompt), common_prefix(prompt, ids_c), common_prefix(prompt, ids_r))
    chosen, chosen_mask = reply_span(ids_c, mask_c, p)
    rejected, rejected_mask = reply_span(ids_r, mask_r, p)
    if p == 0 or not any(chosen_mask) or not any(rejected_mask):
        return None, "dropped"
    excess = p + max(len(chosen), len(rejected)) - max_length
    cut = 0
    if excess > 0:
        # At least one prompt token must stay: it predicts the replies' first tokens.
        if truncate != "left" or excess > p - 1:
            return None, "dropped"
        cut = excess
    return PairExample(prompt[cut:p], chosen, rejected, chosen_mask, rejected_mask), "truncated" if cut else "kept"


def encode_all(items: Sequence, encode_one, tokenizer, max_length: int, truncate: str = "left") -> tuple[list, PairStats]:
    """`encode_one(item, tokenizer, max_length, truncate) -> (example or None, "kept" | "truncated"
    | "dropped")` over every item (None where dropped, so indices still match `items`) and the
    counts: preference pairs (`encode_pair`) and KTO's unpaired rows alike."""
    if truncate not in ("left", "drop"):
        raise ChatforgeError(f"truncate must be 'left' or 'drop', got {truncate!r}")
    if max_length < 8:
        raise ChatforgeError(f"the maximum length must be at least 8 tokens, got {max_length}")
    stats, out = PairStats(), []
    for item in items:
        example, what = encode_one(item, tokenizer, max_length, truncate)
        setattr(stats, what, getattr(stats, what) + 1)
        out.append(example)
    return out, stats


def encode_pairs(prefs: Sequence, tokenizer, max_length: int,
                 truncate: str = "left") -> tuple[list[PairExample | None], PairStats]:
    """Every pair encoded (None where dropped, so indices still match `prefs`) and the counts."""
    return encode_all(prefs, encode_pair, tokenizer, max_length, truncate)


# ---------------------------------------------------------------------------------------------
# Batches


def make_pair_batch(examples: Sequence[PairExample], pad_id: int,
                    ref: Sequence[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """One batch of pairs (see the module docstring for the keys). `ref`: per example, a tensor of
    its scored tokens' values (chosen, then rejected), put in `ref_logps` (2B, R): the DPO
    reference's per-token log-probabilities."""
    B = len(examples)
    P = max(len(e.prompt) for e in examples)
    R = max(max(len(e.chosen), len(e.rejected)) for e in examples)
    prompt_ids = torch.full((B, P), pad_id, dtype=torch.long)
    reply_ids = torch.full((2 * B, R), pad_id, dtype=torch.long)
    reply_scored = torch.zeros((2 * B, R), dtype=torch.bool)
    reply_len = torch.zeros(2 * B, dtype=torch.long)
    for b, e in enumerate(examples):
        prompt_ids[b, :len(e.prompt)] = torch.tensor(e.prompt)
        for row, reply, mask in ((b, e.chosen, e.chosen_mask), (B + b, e.rejected, e.rejected_mask)):
            reply_ids[row, :len(reply)] = torch.tensor(reply)
            reply_scored[row, :len(reply)] = torch.tensor(mask, dtype=torch.bool)
            reply_len[row] = len(reply)
    batch = {"prompt_ids": prompt_ids, "prompt_len": torch.tensor([len(e.prompt) for e in examples]),
             "reply_ids": reply_ids, "reply_len": reply_len, "reply_scored": reply_scored}
    if ref is not None:
        values = [v if isinstance(v, torch.Tensor) else torch.tensor(v) for v in ref]
        ref_logps = torch.zeros((2 * B, R), dtype=values[0].dtype)
        for b, e in enumerate(examples):
            n = sum(e.chosen_mask)
            ref_logps[b][reply_scored[b]] = values[b][:n]
            ref_logps[B + b][reply_scored[B + b]] = values[b][n:]
        batch["ref_logps"] = ref_logps
    return batch


def length_batches(examples: Sequence[PairExample], batch_size: int, seed: int = 0) -> list[list[int]]:
    """Indices in batches of pairs of similar length (ties in a seeded order)."""
    return length_groups([e.length for e in examples], batch_size, seed)


class PairBatches(ShuffledBatches):
    """The training loop's source of pair batches: length-sorted batches, shuffled as wholes each epoch."""

    def __init__(self, examples: Sequence[PairExample], batch_size: int, pad_id: int, seed: int = 0,
                 ref: Sequence[torch.Tensor] | None = None, shuffle: bool = True):
        self.examples, self.groups = list(examples), length_batches(examples, batch_size, seed)

        def fetch(index: torch.Tensor) -> dict:
            group = self.groups[int(index[0])]
            return make_pair_batch([self.examples[i] for i in group], pad_id,
                                   None if ref is None else [ref[i] for i in group])
        super().__init__(len(self.groups), 1, fetch, seed, shuffle)


def eval_pair_batches(examples: Sequence[PairExample], batch_size: int, pad_id: int,
                      ref: Sequence[torch.Tensor] | None = None) -> list[dict[str, torch.Tensor]]:
    """Every pair once, in length-sorted batches (validation)."""
    return [make_pair_batch([examples[i] for i in group], pad_id, None if ref is None else [ref[i] for i in group])
            for group in length_batches(examples, batch_size)]


# ---------------------------------------------------------------------------------------------
# Forward passes


class PrefixCache:
    """The GPT's KV-cache interface (`update(layer_idx, k, v) -> (k_all, v_all)`, `pos`) used for the
    two passes: the first records each layer's keys and values, the second puts them in front of
    each reply row's own (row r reads prompt r mod B), gradients and all."""

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.recording, self.pos = True, 0

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.recording:
            self.keys[layer_idx], self.values[layer_idx] = k, v
            return k, v
        pk, pv = self.keys[layer_idx], self.values[layer_idx]
        times = k.shape[0] // pk.shape[0]
        return torch.cat([pk.repeat(times, 1, 1, 1), k], 2), torch.cat([pv.repeat(times, 1, 1, 1), v], 2)


def reply_attention_mask(prompt_len: torch.Tensor, P: int, R: int, times: int = 2) -> torch.Tensor:
    """(times * B, 1, R, P + R) boolean mask of the reply pass, True = may attend: a reply row sees
    its prompt's real tokens (not the prompt padding) and its own earlier tokens."""
    real = torch.arange(P, device=prompt_len.device)[None, :] < prompt_len[:, None]            # (B, P)
    causal = torch.ones(R, R, dtype=torch.bool, device=prompt_len.device).tril()
    prompt_part = real.repeat(times, 1)[:, None, None, :].expand(-1, 1, R, P)
    reply_part = causal[None, None].expand(real.shape[0] * times, 1, R, R)
    return torch.cat([prompt_part, reply_part], dim=3)


def two_pass_states(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt states (B, P, C), reply states (2B, R, C)): the GPT's final, normalised hidden states
    of the two passes (see the module docstring)."""
    prompt_ids, reply_ids, prompt_len = batch["prompt_ids"], batch["reply_ids"], batch["prompt_len"]
    (B, P), R = prompt_ids.shape, reply_ids.shape[1]
    cache = PrefixCache()
    positions = torch.arange(P, device=prompt_ids.device).expand(B, P)
    prompt_states = hidden_states(model, prompt_ids, cache=cache, positions=positions)
    cache.recording = False
    reply_positions = prompt_len.repeat(2)[:, None] + torch.arange(R, device=reply_ids.device)[None, :]
    reply_states = hidden_states(model, reply_ids, cache=cache, positions=reply_positions,
                                 attn_mask=reply_attention_mask(prompt_len, P, R))
    return prompt_states, reply_states


def reply_token_logps(model: nn.Module, batch: dict) -> torch.Tensor:
    """(2B, R) log-probabilities (float32, or float64 for a float64 model) of the scored reply tokens
    (0 elsewhere); rows 0..B-1 the chosen replies, B..2B-1 the rejected ones.

    The LM head runs on the scored positions only: the prompt's positions need no logits."""
    prompt_states, reply_states = two_pass_states(model, batch)
    B = prompt_states.shape[0]
    rows = torch.arange(2 * B, device=reply_states.device)
    last_prompt = prompt_states[rows % B, batch["prompt_len"].repeat(2) - 1]                      # (2B, C)
    # Reply token j is predicted by the state before it: the prompt's last one for j = 0.
    before = torch.cat([last_prompt[:, None], reply_states[:, :-1]], dim=1)                       # (2B, R, C)
    keep = batch["reply_scored"]
    logits = model.lm_head(before[keep])                                                           # (N, vocab)
    # At least float32 (bf16 logits under autocast are widened; a float64 model stays float64).
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logps = -F.cross_entropy(logits, batch["reply_ids"][keep], reduction="none")
    return torch.zeros(keep.shape, dtype=logps.dtype, device=logps.device).masked_scatter(keep, logps)


def reply_end_states(model: nn.Module, batch: dict) -> torch.Tensor:
    """(B, 2, C) final hidden states at each pair's chosen and rejected reply's last token."""
    _, reply_states = two_pass_states(model, batch)
    rows = torch.arange(reply_states.shape[0], device=reply_states.device)
    ends = reply_states[rows, batch["reply_len"] - 1]                                              # (2B, C)
    return torch.stack(ends.chunk(2), dim=1)


def side_sums(values: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair sums of (2B, R) reply-token values over the chosen and over the rejected reply: ((B,), (B,))."""
    summed = (values * batch["reply_scored"]).sum(1)
    return summed.chunk(2)


def side_counts(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Scored tokens of each reply: ((B,), (B,)) float."""
    return batch["reply_scored"].sum(1).float().chunk(2)


class ReplyLogProbs(nn.Module):
    """A GPT whose forward gives the scored reply tokens' log-probabilities of a pair batch.

    What the training loop trains for DPO: the loop wraps this module (DDP), so the whole
    forward, LM head included, runs inside the wrapper."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict) -> torch.Tensor:
        return reply_token_logps(self.model, batch)


ALIGN_METHODS = ("lora", "full")
TRUNCATE = ("left", "drop")


@dataclass
class PreferenceOptions(LoopOptions):
    """The options DPO and KTO share: how the model trains on rows of (prompt, reply) and
    which of them are held out. Their configs add the loss's own."""
    method: str = option("lora", "lora: low-rank adapters; full: all weights", choices=ALIGN_METHODS)
    lora: LoraConfig = group(PreferenceLora, "lora")
    lora_save: str = option("merged", "LoRA: merged = a plain model folder; adapter = that plus adapter.safetensors",
                            choices=("merged", "adapter"))
    max_length: int = option(1024, "most tokens the model reads at once, the prompt plus the longer reply (capped "
                                   "at the model's context)")
    truncate: str = option("left", "too-long rows: cut the prompt from the left, or drop them", choices=TRUNCATE)
    val_fraction: float = option(0.1, "share of the questions (with all their rows) held out for validation "
                                      "(0 = none)")
    epochs: float = option(1.0, "passes over the training rows (ignored with --steps)")
    lr: float | None = option(None, "peak learning rate (default: 5e-5 lora, 1e-6 full)")
    tokens_per_step: int = option(0, "rows per optimizer step x --max-length (0 = one micro-batch a step; e.g. "
                                     "4 x batch x max-length accumulates 4 micro-batches)")
    eval_every: int = option(0, "steps between validations and checkpoints (0 = four times a run)")
    log_every: int = option(1, "steps between metrics.jsonl lines")
    compile: str = option("auto", "torch.compile: auto = off here (every batch has its own length, and each new "
                                  "shape would compile again)", choices=("auto", "on", "off"))

    def __post_init__(self) -> None:
        if not 0 <= self.val_fraction < 1:
            raise ChatforgeError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.epochs <= 0 and not self.steps:
            raise ChatforgeError(f"--epochs must be positive, got {self.epochs}")

