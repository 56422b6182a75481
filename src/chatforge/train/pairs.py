"""Preference pairs as token rows: the prompt once, then both replies, each seeing only the prompt and itself.

    examples, stats = encode_pairs(prefs, tokenizer, max_length=1024)
    source = PairBatches(examples, batch_size=8, pad_id=tokenizer.pad_id, seed=0)   # the loop's batch source
    logps = reply_token_logps(model, source.next_batch())                           # (B, S) float32

One row holds one pair (`chatforge.data.prefs.Preference`):

    [prompt: P tokens][chosen reply: C tokens][rejected reply: R tokens][padding]

- RoPE positions: prompt 0..P-1, chosen P..P+C-1, rejected P..P+R-1 (each reply continues the prompt);
- attention (`pair_attention_mask`): causal, and no reply token sees the other reply.
So one forward pass computes exactly what two passes over prompt+chosen and prompt+rejected
compute (the tests check it), with the prompt's work done once. Grounded prompts (passages and
instructions) are several times longer than their replies, so this is most of the saving over
padding the two sequences separately, as TRL does.

The prompt is rendered with the chat template and its generation prompt (`<|im_start|>assistant\\n`),
each reply as the rest of `render_chat(prompt + reply)`: its content and `<|im_end|>`, the tokens
SFT learns too. (A pretrained tokenizer may merge the header's newline into the reply's first
token; the prompt is then where the two renderings part, as TRL takes it.) Too long pairs:
`max_length` bounds what the model sees at once, the prompt plus the longer reply; `truncate`
"left" cuts the prompt from the left to fit, "drop" drops the pair (both counted in `PairStats`).

Scored tokens: every reply token is predicted by the position before it; for the first token of
either reply that is the prompt's last position. A batch lists them as `score_pos` (B, S) (the
predicting position), `score_ids` (B, S) (the token) and `score_side` (B, S): 1 chosen,
2 rejected, 0 padding. `ends` (B, 2) are the positions of each reply's last token, its
`<|im_end|>`, where a reward model reads its score. Batches hold pairs of similar length
(sorted, then cut into batches that are shuffled as wholes each epoch), so they pad little.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from chatforge.data.chat_data import ShuffledBatches
from chatforge.errors import ChatforgeError

PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, 3   # the `branch` of each row position


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


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _reply(ids: list[int], mask: list[int], start: int) -> tuple[list[int], list[int]]:
    """The reply's tokens from `start` to its last scored token (its <|im_end|>), and their mask."""
    end = max((i for i, m in enumerate(mask) if m), default=-1) + 1
    return ids[start:end], mask[start:end]


def encode_pair(pref, tokenizer, max_length: int, truncate: str = "left") -> tuple[PairExample | None, str]:
    """(example or None, "kept" / "truncated" / "dropped") for one `Preference`."""
    prompt = tokenizer.render_chat(pref.prompt, add_generation_prompt=True)[0]
    ids_c, mask_c = tokenizer.render_chat(pref.conversation("chosen"))
    ids_r, mask_r = tokenizer.render_chat(pref.conversation("rejected"))
    p = min(len(prompt), _common_prefix(prompt, ids_c), _common_prefix(prompt, ids_r))
    chosen, chosen_mask = _reply(ids_c, mask_c, p)
    rejected, rejected_mask = _reply(ids_r, mask_r, p)
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


def encode_pairs(prefs: Sequence, tokenizer, max_length: int,
                 truncate: str = "left") -> tuple[list[PairExample | None], PairStats]:
    """Every pair encoded (None where dropped, so indices still match `prefs`) and the counts."""
    if truncate not in ("left", "drop"):
        raise ChatforgeError(f"truncate must be 'left' or 'drop', got {truncate!r}")
    if max_length < 8:
        raise ChatforgeError(f"the maximum length must be at least 8 tokens, got {max_length}")
    stats, out = PairStats(), []
    for pref in prefs:
        example, what = encode_pair(pref, tokenizer, max_length, truncate)
        setattr(stats, what, getattr(stats, what) + 1)
        out.append(example)
    return out, stats


# ---------------------------------------------------------------------------------------------
# Batches


def pair_attention_mask(branch: torch.Tensor) -> torch.Tensor:
    """(B, T) branch ids -> (B, 1, T, T) boolean mask, True = may attend.

    Causal; prompt tokens are seen by both replies, a reply token only by its own reply; padding
    sees earlier padding only (never an empty row, which would make attention NaN).
    """
    T = branch.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=branch.device).tril()
    q, k = branch.unsqueeze(2), branch.unsqueeze(1)                          # (B, T, 1), (B, 1, T)
    allowed = (k == q) | ((k == PROMPT) & (q != PAD))
    return (allowed & causal).unsqueeze(1)


def make_pair_batch(examples: Sequence[PairExample], pad_id: int,
                    ref: Sequence[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """One batch of pairs (see the module docstring for the keys). `ref`: per example, a float
    tensor of its scored tokens' values (chosen then rejected, as `score_side` orders them), put
    in `ref_logps` (B, S): the DPO reference's per-token log-probabilities."""
    B = len(examples)
    T = max(e.length for e in examples)
    S = max(sum(e.chosen_mask) + sum(e.rejected_mask) for e in examples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    positions = torch.zeros((B, T), dtype=torch.long)
    branch = torch.full((B, T), PAD, dtype=torch.long)
    score_pos = torch.zeros((B, S), dtype=torch.long)
    score_ids = torch.zeros((B, S), dtype=torch.long)
    score_side = torch.zeros((B, S), dtype=torch.long)
    ends = torch.zeros((B, 2), dtype=torch.long)
    ref_logps = None
    if ref is not None:
        ref_logps = torch.zeros((B, S), dtype=ref[0].dtype if isinstance(ref[0], torch.Tensor) else torch.float32)
    for b, e in enumerate(examples):
        P = len(e.prompt)
        row = [*e.prompt, *e.chosen, *e.rejected]
        ids[b, :len(row)] = torch.tensor(row)
        positions[b, :P] = torch.arange(P)
        branch[b, :P] = PROMPT
        s = 0
        start = P
        for side, reply, mask in ((CHOSEN, e.chosen, e.chosen_mask), (REJECTED, e.rejected, e.rejected_mask)):
            n = len(reply)
            positions[b, start:start + n] = torch.arange(P, P + n)
            branch[b, start:start + n] = side
            for j, (token, scored) in enumerate(zip(reply, mask)):
                if scored:
                    # The first reply token is predicted by the prompt's last position.
                    score_pos[b, s] = P - 1 if j == 0 else start + j - 1
                    score_ids[b, s], score_side[b, s] = token, side
                    s += 1
            ends[b, side - 1] = start + n - 1
            start += n
        positions[b, start:] = torch.arange(T - start)     # padding: harmless positions, never scored
        if ref is not None:
            ref_logps[b, :s] = ref[b] if isinstance(ref[b], torch.Tensor) else torch.tensor(ref[b])
    batch = {"input_ids": ids, "positions": positions, "attn_mask": pair_attention_mask(branch),
             "score_pos": score_pos, "score_ids": score_ids, "score_side": score_side, "ends": ends}
    if ref_logps is not None:
        batch["ref_logps"] = ref_logps
    return batch


def length_batches(examples: Sequence[PairExample], batch_size: int, seed: int = 0) -> list[list[int]]:
    """Indices in batches of pairs of similar length (ties in a seeded order)."""
    from chatforge.train.classify import length_groups

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


def final_states(model: nn.Module, batch: dict) -> torch.Tensor:
    """The GPT's final, normalised hidden states (B, T, C) of a pair batch."""
    from chatforge.model.heads import hidden_states

    return hidden_states(model, batch["input_ids"], positions=batch["positions"], attn_mask=batch["attn_mask"])


def reply_token_logps(model: nn.Module, batch: dict) -> torch.Tensor:
    """(B, S) log-probabilities (float32, or float64 for a float64 model) of the scored reply tokens
    (0 on padding).

    The LM head runs on the scored positions only: the prompt's positions, most of a row, need
    no logits."""
    hidden = final_states(model, batch)
    side = batch["score_side"]
    keep = side > 0
    rows = torch.arange(side.shape[0], device=side.device).unsqueeze(1).expand_as(side)
    logits = model.lm_head(hidden[rows[keep], batch["score_pos"][keep]])              # (N, vocab)
    # At least float32 (bf16 logits under autocast are widened; a float64 model stays float64).
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logps = -F.cross_entropy(logits, batch["score_ids"][keep], reduction="none")
    return torch.zeros(side.shape, dtype=logps.dtype, device=logps.device).masked_scatter(keep, logps)


def side_sums(values: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair sums of (B, S) token values over the chosen and over the rejected reply: ((B,), (B,))."""
    side = batch["score_side"]
    return (values * (side == CHOSEN)).sum(1), (values * (side == REJECTED)).sum(1)


def side_counts(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Scored tokens of each reply: ((B,), (B,)) float."""
    side = batch["score_side"]
    return (side == CHOSEN).sum(1).float(), (side == REJECTED).sum(1).float()


class ReplyLogProbs(nn.Module):
    """A GPT whose forward gives the scored reply tokens' log-probabilities of a pair batch.

    What the training loop trains for DPO: the loop wraps this module (DDP), so the whole
    forward, LM head included, runs inside the wrapper."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict) -> torch.Tensor:
        return reply_token_logps(self.model, batch)
