"""Weight-only 8- and 4-bit linear layers on PyTorch's own CPU kernels.

    qmodel = quantize_model(model, "int8")            # a new model; `model` is left as it is
    qmodel = quantize_model(model, "int4", group_size=32)

Decoding one token reads every weight once, so at batch 1 a decode step costs about the bytes of
the weights (the engine's docstring and benchmarks/bench_generate.py measure it). Fewer bits per
weight make each step cheaper; activations stay in floating point ("weight-only"):

- int8: one int8 per weight, one scale per output row (symmetric, absmax / 127), multiplied by
  `aten._weight_int8pack_mm`. On the 135M model's LM head (49152 x 576, batch 1, 1 thread) it ran
  2.6 ms against 4.6 ms in bf16 and 10.7 ms in fp32.
- int4: 4 bits per weight in groups of `group_size` along the input, each group with its own
  scale and zero point (asymmetric, min/max over 15 steps), packed by
  `aten._convert_weight_to_int4pack_for_cpu` and multiplied by `aten._weight_int4pack_mm_for_cpu`:
  1.3 ms on the same LM head. A weight w becomes q in 0..15 with w ~ (q - 8) * scale + zero.

Every `nn.Linear` is replaced (attention, MLP, the LM head); embeddings and norms keep their
precision. A layer whose shape the int4 kernel cannot take (input not a multiple of the group
size) falls back to int8. The layers compute in bfloat16 whatever the model's dtype (inputs are
cast, outputs cast back): both kernels have a fast path for bf16 activations only; with fp32
activations they were 10-100x slower than a dense fp32 matmul. They are made for few rows: with
many (a prefill, a perplexity batch) an int8 layer dequantizes its weight and runs a dense
matmul instead (at 64+ rows that was faster, even counting the dequantization), while int4 has
no such way out and its prefill runs ~2.5x slower than bf16 (512 rows of the 1536 x 576 MLP
projection: 8.7 ms against 3.5 ms). The quantized model keeps the GPT interface
(`forward`, `config`), so the engine, evaluation and the server use it unchanged; it is for
inference only (no gradients through the packed weights).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from chatforge.errors import ChatforgeError

MODES = ("int8", "int4")
COMPUTE = torch.bfloat16      # the kernels' fast path
DENSE_ROWS = 64               # int8: from this many rows on, dequantize and run a dense matmul


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T (+ bias), q int8 per output row."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        # The scale is rounded to its stored dtype first, so each weight is rounded against the
        # scale the kernel will use: at most half a step off.
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).to(COMPUTE).float()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("qweight", (w / scale[:, None]).round().clamp(-128, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(COMPUTE))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scale.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(COMPUTE).contiguous()
        scale = self.scale.to(COMPUTE)            # (a no-op unless someone cast the model)
        if x2.shape[0] >= DENSE_ROWS:
            y = x2 @ (self.qweight.to(COMPUTE) * scale[:, None]).T
        else:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, scale)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


class Int4Linear(nn.Module):
    """y = x @ W.T (+ bias) with W stored as 4-bit groups of `group_size` inputs (see module docs)."""

    def __init__(self, linear: nn.Linear, group_size: int):
        super().__init__()
        w = linear.weight.detach().float()
        N, K = w.shape
        groups = w.view(N, K // group_size, group_size)
        lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        # Scale and zero point rounded to their stored dtype before the weights are rounded
        # against them (as for int8): w ~ (q - 8) * scale + zero, at most half a step off.
        scale = ((hi - lo).clamp(min=1e-6) / 15).to(COMPUTE).float()
        zero = (lo + 8 * scale).to(COMPUTE).float()
        q = ((groups - zero) / scale + 8).round().clamp(0, 15).to(torch.int32).view(N, K)
        self.in_features, self.out_features, self.group_size = K, N, group_size
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        # (K / group_size, N, 2): the kernel's layout of each group's scale and zero point.
        qparams = torch.cat([scale, zero], dim=-1).transpose(0, 1).contiguous()
        self.register_buffer("qparams", qparams.to(COMPUTE))
        self._q = q                                  # kept only for `dequantized` in tests; dropped below
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def dequantized(self) -> torch.Tensor:
        N, K, g = self.out_features, self.in_features, self.group_size
        scale, zero = self.qparams.float().transpose(0, 1).unbind(-1)                # (N, K / g) each
        q = self._q.view(N, K // g, g).float()
        return ((q - 8) * scale[..., None] + zero[..., None]).view(N, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(COMPUTE).contiguous()              # the kernel needs it
        qparams = self.qparams.to(COMPUTE)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, qparams).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


def quantize_model(model: nn.Module, mode: str, group_size: int = 32, keep_dequantized: bool = False,
                   fuse: bool = False) -> nn.Module:
    """A copy of `model` with every `nn.Linear` stored in `mode` ("int8" or "int4").

    The copy shares the tensors it does not replace (embeddings, norms) with `model`, so the
    original's weights are neither changed nor duplicated. `keep_dequantized` keeps the int4
    codes for `Int4Linear.dequantized` (tests). `fuse` joins q/k/v and gate/up into one layer
    each before quantizing (`model/inference.py`; the engine does): the codes and scales are
    those of the separate layers side by side, as scales are per output row (int4: per row and
    group), and a decode step makes 4 quantized matmuls per block instead of 7."""
    if mode not in MODES:
        raise ChatforgeError(f"unknown quantization {mode!r}; choose one of {', '.join(MODES)}")
    if group_size not in (32, 64, 128, 256):
        raise ChatforgeError(f"group_size must be 32, 64, 128 or 256, got {group_size}")
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise ChatforgeError("int8/int4 weights use PyTorch's CPU kernels; run the quantized model on the CPU")
    # Copy the modules, not the tensors: every parameter and buffer maps to itself.
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    clone = copy.deepcopy(model, memo)
    if fuse:
        from chatforge.model.inference import fuse_projections

        fuse_projections(clone)     # new concatenated tensors; `model`'s are untouched
    for parent in list(clone.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            if mode == "int4" and child.in_features % group_size == 0:
                layer = Int4Linear(child, group_size)
                if not keep_dequantized:
                    del layer._q
            else:
                layer = Int8Linear(child)
            setattr(parent, name, layer)
    clone.quantization = mode
    return clone.eval().requires_grad_(False)


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as stored (packed codes, scales, unquantized tensors)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
