"""What the checkpoint readers share: the `Checkpoint` they return, the context rule, the check
that a state dict is exactly what a config needs.

`gguf_import.read_gguf` and `hf_import.read_hf_folder` each turn a source into a `Checkpoint` (a
`GPTConfig` plus a state dict under chatforge's parameter names, fp32); `importer.py` dispatches
to them and writes the model folder. Apart from `importer.py` so that the readers and the
dispatcher do not import each other.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from chatforge.errors import ChatforgeError
from chatforge.model.gpt import GPT, GPTConfig


@dataclass
class Checkpoint:
    """A pretrained model read from a source, ready to be written as a chatforge model folder."""

    config: GPTConfig
    state: dict[str, torch.Tensor]               # chatforge parameter names -> fp32 tensors
    architecture: str                            # as the source names it (llama, qwen2, ...)
    source: Path
    source_types: Counter = field(default_factory=Counter)   # stored type -> tensor count
    notes: list[str] = field(default_factory=list)            # what was adapted, for the user

    @property
    def num_params(self) -> int:
        tied = self.config.tie_embeddings
        return sum(t.numel() for name, t in self.state.items() if not (tied and name == "lm_head.weight"))


def context_length(context: int, sliding_window: int | None, notes: list[str]) -> int:
    """The max_seq_len to give the model: the source's context, or its sliding attention window
    when that is shorter (within the window, full attention computes exactly what sliding-window
    attention does; beyond it, it would not, so the context stops there)."""
    if sliding_window and sliding_window < context:
        notes.append(f"the model attends through a sliding window of {sliding_window} tokens; its context "
                     f"is capped at {sliding_window} (from {context}), within which chatforge computes the same")
        return sliding_window
    return context


def expected_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter a model with `config` has, with its shape (no memory: a meta model)."""
    with torch.device("meta"):
        model = GPT(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_state(config: GPTConfig, state: dict[str, torch.Tensor], where: str,
                source_name: Callable[[str], str] = lambda n: n) -> dict[str, torch.Tensor]:
    """`state` completed for a tied head and checked against `config`: every tensor present,
    each of the right shape, none left over. `source_name` turns a chatforge name into the
    source's own name for the messages."""
    state = dict(state)
    if config.tie_embeddings and "embed_tokens.weight" in state:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    emb = state.get("embed_tokens.weight")
    if emb is not None and emb.shape[0] != config.vocab_size:
        raise ChatforgeError(f"{where}: vocabulary/embedding mismatch: the metadata declares {config.vocab_size} "
                             f"tokens but {source_name('embed_tokens.weight')} has {emb.shape[0]} rows; "
                             "the file is inconsistent (re-download or re-convert it)")
    shapes = expected_shapes(config)
    missing = [n for n in shapes if n not in state]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ChatforgeError(f"{where}: missing tensor(s) {', '.join(source_name(n) for n in missing[:3])}{more}; "
                             "the checkpoint is incomplete or not of the architecture it claims")
    extra = [n for n in state if n not in shapes]
    if extra:
        more = f" (and {len(extra) - 3} more)" if len(extra) > 3 else ""
        raise ChatforgeError(f"{where}: unsupported tensor(s) {', '.join(source_name(n) for n in extra[:3])}{more}: "
                             "this variant of the architecture is not supported by chatforge")
    for name, shape in shapes.items():
        if tuple(state[name].shape) != shape:
            raise ChatforgeError(f"{where}: {source_name(name)} has shape {tuple(state[name].shape)}, "
                                 f"but the model's metadata implies {shape}; the file is inconsistent")
    return state
