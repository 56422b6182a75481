"""Small heads that sit on a GPT backbone's final hidden states instead of its LM head.

- `ClassifierHead`: pooled features -> class logits (text classification, `chatforge classify`).
- `ValueHead`: per-token hidden state -> a scalar (PPO's value function).
- `RewardHead`: pooled features -> one scalar score (a reward model for preference data).

`hidden_states(model, idx, layer=0)` returns the backbone's final, normalised hidden states
(B, T, C), or a middle layer's (`layer_states` gives several layers from one forward pass and
skips the blocks above the deepest); `pool(hidden, mask, how)` turns them into one vector per
sequence. Heads are kept tiny on purpose: the backbone carries the knowledge, the head only
reads it out.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

POOLINGS = ("mean", "last")


class _Enough(Exception):
    """Raised by a hook once the deepest wanted layer has run: the layers above it are skipped."""


def layer_states(model: nn.Module, idx: torch.Tensor, layers: Sequence[int], **forward_kwargs) -> dict[int, torch.Tensor]:
    """Hidden states (B, T, C) of several layers in one forward pass: {layer: states}.

    Layer 0 is the model's final output (after the last block and the final norm, what the LM
    head reads); layer L in 1..n_layer-1 is the residual stream after block L (a middle layer,
    not normalised). Hooks catch the states while the GPT's own forward runs, so LoRA wrappers,
    masks and positions behave exactly as in training; the forward stops after the deepest layer
    asked for (a middle layer costs only the blocks below it), and with layer 0 `last_only=True`
    keeps the LM head's work to one position.
    """
    n_layer = len(model.layers)
    wanted = sorted(set(layers))
    if not wanted or any(not 0 <= layer < n_layer for layer in wanted):
        raise ValueError(f"layers must be in 0..{n_layer - 1} (0 = the final output), got {list(layers)}")
    # Without layer 0 the forward can stop at the deepest layer asked for; with it, every block
    # runs anyway and only the one-position LM head is left after the final norm.
    stop_at = None if wanted[0] == 0 else wanted[-1]
    caught: dict[int, torch.Tensor] = {}

    def catcher(layer: int):
        def hook(_module, _inputs, out):
            caught[layer] = out
            if layer == stop_at:
                raise _Enough
        return hook

    handles = [(model.norm if layer == 0 else model.layers[layer - 1]).register_forward_hook(catcher(layer))
               for layer in wanted]
    try:
        model(idx, last_only=True, **forward_kwargs)
    except _Enough:
        pass
    finally:
        for h in handles:
            h.remove()
    return caught


def hidden_states(model: nn.Module, idx: torch.Tensor, layer: int = 0, **forward_kwargs) -> torch.Tensor:
    """One layer's hidden states (B, T, C); layer 0 (the default) is the final, normalised output.
    See `layer_states`."""
    return layer_states(model, idx, [layer], **forward_kwargs)[layer]


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """One vector per sequence from (B, T, C) hidden states and a (B, T) mask of real tokens.

    "mean" averages the real tokens; "last" takes the last real token (with causal attention it
    is the only position that has seen the whole text). Padding must be on the right.
    """
    mask = mask.to(hidden.dtype)
    if how == "mean":
        return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
    if how == "last":
        last = (mask.sum(1).long() - 1).clamp(min=0)                     # (B,)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"unknown pooling {how!r}; choose one of {POOLINGS}")


class ClassifierHead(nn.Module):
    """Standardise, dropout, one linear layer: pooled features (B, C) -> class logits (B, n_classes).

    Pooled features of a small backbone differ between texts by little compared with their
    common offset, so each feature is first standardised with the training set's mean and
    standard deviation (`set_feature_stats`; saved with the head as buffers).
    """

    def __init__(self, d_model: int, n_classes: int, dropout: float = 0.1):
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(d_model))
        self.register_buffer("feature_std", torch.ones(d_model))
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(d_model, n_classes)
        nn.init.normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)

    @torch.no_grad()
    def set_feature_stats(self, features: torch.Tensor) -> None:
        """Take the per-feature mean and standard deviation of (N, C) training features."""
        self.feature_mean.copy_(features.float().mean(0))
        self.feature_std.copy_(features.float().std(0).clamp(min=1e-6))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = (features - self.feature_mean) / self.feature_std
        return self.proj(self.dropout(x.to(self.proj.weight.dtype)))


class ValueHead(nn.Module):
    """Per-token scalar: hidden states (B, T, C) -> values (B, T). Starts at zero output."""

    def __init__(self, d_model: int):
        super().__init__()
        self.proj = nn.Linear(d_model, 1)
        # Zero init: the first PPO updates see value 0 everywhere rather than noise.
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden).squeeze(-1)


class RewardHead(nn.Module):
    """Sequence scalar: pooled features (B, C) -> scores (B,). Only score differences matter."""

    def __init__(self, d_model: int):
        super().__init__()
        self.proj = nn.Linear(d_model, 1)
        nn.init.normal_(self.proj.weight, std=1.0 / (d_model + 1) ** 0.5)
        nn.init.zeros_(self.proj.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features).squeeze(-1)
