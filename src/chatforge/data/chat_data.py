"""Supervised fine-tuning data: chat examples -> token ids + labels -> packed rows -> batches.

1. `read_chat_records(path)` / `read_chat_jsonl(path)`: lines `{"messages": [{"role", "content"}, ...], "source"?}` or
   `{"prompt", "completion"}` (the data stage's `qa_train.jsonl` / `qa_val.jsonl`). A malformed
   line is a `ChatforgeError` naming `file:line`.
2. `tokenize_examples(conversations, tokenizer, seq_len)`: each conversation is rendered with
   the tokenizer's ChatML template (`render_chat` -> ids and a mask that is 1 on assistant
   content and its `<|im_end|>`). The model reads `ids[:-1]` and is scored on `labels = ids[1:]`,
   with -100 wherever the mask is 0: the loss counts assistant tokens only, never the user's.
   An example longer than `seq_len` is cut from the left (earlier turns and the start of the
   prompt go; the final reply stays whole) or, when even the final reply does not fit, dropped.
   Both are counted in the returned `TokenizeStats`.
3. `pack(examples, seq_len)`: several examples share one fixed-length row (first-fit
   decreasing), so little compute is spent on padding (`PackedRows.padding_fraction`). Each row
   keeps a segment id per token and RoPE positions that restart at 0 for every example;
   `attention_mask(segments)` builds the (B, 1, T, T) block-diagonal causal mask, so no token
   attends across examples and a packed example computes exactly what it would alone.
   `pack(..., bucket_size=B)` buckets by length instead: one example per row, rows sorted
   longest first, and each batch is B neighbouring rows cut to its longest example, with no
   mask at all (plain causal attention: padding only follows the example). SDPA's fused
   causal kernel takes no mask, so buckets win on long rows (~1.7x per token at 1024-token
   rows here); at 512 tokens the two cost about the same.
4. `PackedBatches`: the training loop's batch source (`next_batch()`, `state_dict()`,
   `load_state_dict()`): rows shuffled per epoch from a seed, with a cursor so that `--resume`
   continues with the very next batch. Its base `ShuffledBatches` serves any indexable data
   (the classifier uses it too). `eval_batches(rows, batch_size)` for validation.
   `length_groups(lengths, batch_size)` batches unpacked texts of similar length (the classifier,
   the preference and KTO stages).

A batch is a dict of tensors, named as the pretraining batches are: `input_ids` (B, T),
`labels` (B, T) with -100 where nothing is scored, and the `GPT.forward` keywords `positions`
(B, T) and, for packed rows, `attn_mask` (B, 1, T, T).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from chatforge import files
from chatforge.errors import ChatforgeError

ROLES = ("system", "user", "assistant")
IGNORE = -100


# ---------------------------------------------------------------------------------------------
# Reading


def parse_chat_record(obj: object) -> list[dict]:
    """The messages of one JSON record; raises ValueError with a short reason when malformed."""
    if not isinstance(obj, dict):
        raise ValueError("expected a JSON object")
    if "messages" in obj:
        messages = obj["messages"]
    elif "prompt" in obj and "completion" in obj:
        if not isinstance(obj["prompt"], str) or not isinstance(obj["completion"], str):
            raise ValueError('"prompt" and "completion" must be strings')
        messages = [{"role": "user", "content": obj["prompt"]},
                    {"role": "assistant", "content": obj["completion"]}]
    else:
        raise ValueError('expected {"messages": [...]} or {"prompt": ..., "completion": ...}')
    if not isinstance(messages, list) or not messages:
        raise ValueError('"messages" must be a non-empty list')
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise ValueError(f'message {i} must be {{"role": one of {"/".join(ROLES)}, "content": a string}}')
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant message: there is nothing to learn from this example")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_chat_records(path: str | Path) -> list[dict]:
    """Every record of a chat JSONL file as `{"messages": [...], "source": str | None}`."""
    out = []
    for lineno, obj in files.iter_jsonl(path, "run `chatforge data build` or point --data at its output"):
        try:
            messages = parse_chat_record(obj)
        except ValueError as e:
            raise ChatforgeError(f"{path}:{lineno}: {e}") from None
        source = obj.get("source")
        out.append({"messages": messages, "source": source if isinstance(source, str) else None})
    return out


def read_chat_jsonl(path: str | Path) -> list[list[dict]]:
    """Every conversation (its list of messages) in a JSONL file; blank lines are skipped."""
    return [r["messages"] for r in read_chat_records(path)]


# ---------------------------------------------------------------------------------------------
# Tokenising


@dataclass
class Example:
    ids: list[int]     # model input: rendered ids without the last token
    labels: list[int]  # next token where it is assistant text, else -100; same length as ids


@dataclass
class TokenizeStats:
    kept: int = 0
    truncated: int = 0   # cut from the left to fit
    dropped: int = 0     # the final reply alone does not fit (or there is nothing to learn)

    def to_dict(self) -> dict:
        return {"kept": self.kept, "truncated": self.truncated, "dropped": self.dropped}


def make_labels(ids: list[int], mask: list[int]) -> Example:
    """Shift by one: position t is scored on ids[t+1], only where that token is assistant text."""
    return Example(ids=list(ids[:-1]), labels=[t if m else IGNORE for t, m in zip(ids[1:], mask[1:])])


def last_reply_start(mask: list[int]) -> int:
    """Index of the first token of the final assistant reply (the last run of 1s in the mask)."""
    i = len(mask) - 1
    while i >= 0 and not mask[i]:
        i -= 1
    while i > 0 and mask[i - 1]:
        i -= 1
    return i


def fit_example(ids: list[int], mask: list[int], seq_len: int, truncate: str = "left") -> tuple[Example | None, str]:
    """Fit one rendered conversation into `seq_len` inputs: (example or None, "kept"/"truncated"/"dropped")."""
    if not any(mask[1:]):
        return None, "dropped"
    excess = len(ids) - (seq_len + 1)  # seq_len inputs need seq_len + 1 rendered tokens
    if excess <= 0:
        return make_labels(ids, mask), "kept"
    # Cutting `excess` tokens from the left must leave the token before the final reply, which
    # is the input that predicts the reply's first token.
    if truncate != "left" or excess > last_reply_start(mask) - 1:
        return None, "dropped"
    return make_labels(ids[excess:], mask[excess:]), "truncated"


def tokenize_examples(conversations: Iterable[list[dict]], tokenizer, seq_len: int,
                      truncate: str = "left") -> tuple[list[Example], TokenizeStats]:
    """Render, label and fit every conversation; `truncate` is "left" or "drop"."""
    if truncate not in ("left", "drop"):
        raise ChatforgeError(f"truncate must be 'left' or 'drop', got {truncate!r}")
    stats, out = TokenizeStats(), []
    for messages in conversations:
        ids, mask = tokenizer.render_chat(messages)
        example, what = fit_example(list(ids), list(mask), seq_len, truncate)
        setattr(stats, what, getattr(stats, what) + 1)
        if example is not None:
            out.append(example)
    return out, stats


# ---------------------------------------------------------------------------------------------
# Packing


@dataclass
class PackedRows:
    """Fixed-length rows, each holding whole examples back to back, then padding."""

    ids: torch.Tensor        # (N, T) long
    labels: torch.Tensor     # (N, T) long, -100 on prompts and padding
    positions: torch.Tensor  # (N, T) long, restarting at 0 for each example
    segments: torch.Tensor   # (N, T) long, 0, 1, 2... per example in the row; -1 on padding
    n_examples: int = 0
    stats: dict = field(default_factory=dict)
    bucket_size: int = 0     # > 0: one example per row, longest first, batched in groups of this size

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def padding_fraction(self) -> float:
        if self.bucket_size:   # of the batches as trimmed to their longest row
            lengths = (self.segments >= 0).sum(1).tolist()
            groups = [lengths[i:i + self.bucket_size] for i in range(0, len(lengths), self.bucket_size)]
            total = sum(len(g) * max(g) for g in groups)
            return 1.0 - sum(lengths) / total if total else 0.0
        total = self.segments.numel()
        return float((self.segments < 0).sum()) / total if total else 0.0

    @property
    def n_target_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of example indices whose lengths sum to at most `capacity` (deterministic)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(capacity - n)
    return bins


def length_groups(lengths: Sequence[int], batch_size: int, seed: int = 0) -> list[list[int]]:
    """Positions 0..n-1 in batches of `batch_size` texts of similar length (sorted by length, ties
    in a seeded random order, then cut), so that a batch cut to its longest text pads little.
    On the vader sentences (SmolLM2 tokenizer, batch 16) random batches hold 1.97x the real
    tokens, these 1.002x. The training loop's source shuffles the batches each epoch."""
    tiebreak = list(range(len(lengths)))
    random.Random(seed).shuffle(tiebreak)
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], tiebreak[i]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def pack(examples: list[Example], seq_len: int, pad_id: int, stats: TokenizeStats | None = None,
         bucket_size: int = 0) -> PackedRows:
    """Pack examples (each at most `seq_len` long) into rows of exactly `seq_len` tokens; with
    `bucket_size`, one example per row, longest first (length bucketing, see the module docstring)."""
    if not examples:
        raise ChatforgeError("no SFT examples left to train on (all empty or too long); "
                             "check the data or raise --seq-len")
    if bucket_size:
        bins = [[i] for i in sorted(range(len(examples)), key=lambda i: -len(examples[i].ids))]
    else:
        bins = first_fit_decreasing([len(e.ids) for e in examples], seq_len)
    N = len(bins)
    ids = torch.full((N, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((N, seq_len), IGNORE, dtype=torch.long)
    positions = torch.zeros((N, seq_len), dtype=torch.long)
    segments = torch.full((N, seq_len), -1, dtype=torch.long)
    for r, members in enumerate(bins):
        at = 0
        for s, i in enumerate(members):
            e, n = examples[i], len(examples[i].ids)
            ids[r, at:at + n] = torch.tensor(e.ids)
            labels[r, at:at + n] = torch.tensor(e.labels)
            positions[r, at:at + n] = torch.arange(n)
            segments[r, at:at + n] = s
            at += n
        positions[r, at:] = torch.arange(seq_len - at)  # padding: harmless positions, never scored
    rows = PackedRows(ids, labels, positions, segments, n_examples=len(examples), bucket_size=bucket_size)
    rows.stats = {**(stats.to_dict() if stats else {}), "rows": N, "seq_len": seq_len,
                  "packing": f"bucketed by {bucket_size}" if bucket_size else "packed",
                  "padding_fraction": round(rows.padding_fraction, 4), "target_tokens": rows.n_target_tokens}
    return rows


def attention_mask(segments: torch.Tensor) -> torch.Tensor:
    """(B, T) segment ids -> (B, 1, T, T) boolean mask: causal and within the same segment.

    Padding (segment -1) attends to earlier padding only, so no row of the mask is all False
    (which would make attention produce NaN); its outputs are never scored.
    """
    T = segments.shape[1]
    same = segments.unsqueeze(2) == segments.unsqueeze(1)                       # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    return (same & causal).unsqueeze(1)


def make_batch(rows: PackedRows, index: torch.Tensor | list[int]) -> dict[str, torch.Tensor]:
    index = torch.as_tensor(index, dtype=torch.long)
    segments = rows.segments[index]
    if rows.bucket_size:   # one example per row: cut to the longest, plain causal attention
        T = int((segments >= 0).sum(1).max())
        return {"input_ids": rows.ids[index, :T], "labels": rows.labels[index, :T],
                "positions": rows.positions[index, :T]}
    return {"input_ids": rows.ids[index], "labels": rows.labels[index], "positions": rows.positions[index],
            "attn_mask": attention_mask(segments)}


# ---------------------------------------------------------------------------------------------
# Batch sources


class ShuffledBatches:
    """Endless batches of `n_items` items for the training loop, reshuffled each epoch.

    `fetch(index)` turns a (b,) tensor of item indices into a batch. Deterministic from `seed`;
    `state_dict()` is the cursor (epoch and offset), so a resumed run sees exactly the batches
    an uninterrupted one would have.
    """

    def __init__(self, n_items: int, batch_size: int, fetch: Callable[[torch.Tensor], dict],
                 seed: int = 0, shuffle: bool = True):
        if batch_size <= 0:
            raise ChatforgeError(f"batch size must be positive, got {batch_size}")
        if n_items <= 0:
            raise ChatforgeError("no training examples: the data set is empty")
        self.n_items, self.batch_size, self.fetch = n_items, batch_size, fetch
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.offset = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n_items)
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.n_items, generator=g)

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.n_items / self.batch_size)

    def next_batch(self) -> dict[str, torch.Tensor]:
        # The last batch of an epoch may be short rather than mixing epochs: each epoch shows
        # every item exactly once.
        index = self._order[self.offset:self.offset + self.batch_size]
        self.offset += len(index)
        if self.offset >= self.n_items:
            self.epoch, self.offset = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        return self.fetch(index)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self.seed = int(state.get("seed", self.seed))
        self._order = self._permutation(self.epoch)


class PackedBatches(ShuffledBatches):
    """The SFT batch source: shuffled packed rows (see `ShuffledBatches`)."""

    def __init__(self, rows: PackedRows, batch_size: int, seed: int = 0, shuffle: bool = True):
        self.rows = rows
        if not rows.bucket_size:
            super().__init__(len(rows), batch_size, lambda index: make_batch(rows, index), seed, shuffle)
            return
        if batch_size != rows.bucket_size:
            raise ChatforgeError(f"rows bucketed in groups of {rows.bucket_size} cannot be served {batch_size} at a time")
        # The groups of neighbouring rows are the items: shuffled per epoch, never split.
        groups = [list(range(i, min(i + batch_size, len(rows)))) for i in range(0, len(rows), batch_size)]
        super().__init__(len(groups), 1, lambda index: make_batch(rows, groups[int(index[0])]), seed, shuffle)


def eval_batches(rows: PackedRows, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Every row once, in order: the validation set as a list of batches (for bucketed rows,
    `batch_size` should be their bucket size: the batches are then the buckets)."""
    return [make_batch(rows, list(range(i, min(i + batch_size, len(rows)))))
            for i in range(0, len(rows), batch_size)]
