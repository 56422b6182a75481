"""Weight-only 8- and 4-bit linear layers on PyTorch's own CPU kernels.

    qmodel = quantize_model(model, "int8")            # a new model; `model` is left as it is
    qmodel = quantize_model(model, "int4", group_size=32)

Decoding one token reads every weight once, so at batch 1 a decode step costs about the bytes of
the weights (the engine's docstring and benchmarks/bench_generate_demo.py measure it). Fewer bits per
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
many (a prefill, a perplexity batch) a layer dequantizes its weight for the call and runs a
dense bf16 matmul instead, keeping nothing extra in memory. int8 does so from 64 rows on. int4
from 128 (`INT4_DENSE_ROWS`): its kernel costs ~2.4x a dense bf16 matmul per row, but unpacking
the codes costs about a 100-row dense matmul (the demo model's shapes, 1 thread: the 3072 x 576
gate/up projection at 598 rows 14.6 ms in the kernel against 2.3 ms to dequantize + 6.3 ms dense;
at 96-128 rows the two were even). Keeping a dense bf16 copy instead would save the unpacking
(3.8 ms on top of 12.5 ms of dense matmuls per block at 598 rows) but cost 2 bytes a weight:
269 MB more for the demo model, whose int4 layers hold 84 MB (codes, scales, zero points), the
memory int4 is for. Per call the layer holds one chunk of `DENSE_CHUNK` output rows
dequantized (fp32 + bf16, 6 bytes a weight: 14 MB of the LM head at width 576). The unpacking
reads the kernel's packed layout (which depends on the CPU's vector width); it is checked against
the kernel once (`_int4_layout`), and a build whose layout it does not know keeps the kernel for
every row count. The quantized model keeps the GPT interface (`forward`, `config`), so the
engine, evaluation and the server use it unchanged; it is for inference only (no gradients
through the packed weights).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from chatforge.errors import ChatforgeError
from chatforge.model.fuse import fuse_projections
from chatforge.runtime import give_back_memory

MODES = ("int8", "int4")
COMPUTE = torch.bfloat16      # the kernels' fast path
DENSE_ROWS = 64               # int8: from this many rows on, dequantize and run a dense matmul
INT4_DENSE_ROWS = 128         # int4: the same (its unpacking costs more, so the crossover is later)
DENSE_CHUNK = 4096            # output rows dequantized at a time: the LM head's transient stays ~14 MB


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T (+ bias), q int8 per output row."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach()
        qweight = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
        scales = []
        # A block of output rows at a time: the whole LM head of a 135M model in fp32 (and its
        # rounded copy) was 230 MB of temporaries beside the weights (scales are per row, so
        # blocks give the same codes).
        for i in range(0, weight.shape[0], 4096):
            w = weight[i:i + 4096].to(torch.float32, copy=True)      # divided in place below
            # The scale is rounded to its stored dtype first, so each weight is rounded against
            # the scale the kernel will use: at most half a step off.
            scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).to(COMPUTE).float()
            qweight[i:i + 4096] = w.div_(scale[:, None]).round_().clamp_(-128, 127)
            scales.append(scale)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", torch.cat(scales).to(COMPUTE))
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
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def dequantized(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """W (or its output rows start:stop, start a multiple of the packing block) in fp32, as
        the kernel computes it: (q - 8) * scale + zero."""
        stop = self.out_features if stop is None else min(stop, self.out_features)
        K, g = self.in_features, self.group_size
        codes = _unpack_int4(self.packed, K, start, stop, *_int4_layout())
        scale, zero = self.qparams[:, start:stop].float().unbind(-1)                   # (K / g, n) each
        # In place on the fp32 codes: one pass each (a broadcast bf16 multiply was 10x slower).
        codes.view(K // g, g, -1).mul_(scale[:, None]).add_((zero - 8 * scale)[:, None])
        return codes.T                                                                  # (n, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(COMPUTE).contiguous()              # the kernel needs it
        if x2.shape[0] >= INT4_DENSE_ROWS and _int4_layout() is not None:
            # Output rows a chunk at a time, so a large layer (the LM head in a perplexity batch)
            # never holds its whole weight dequantized (fp32 + bf16: 6 bytes a weight).
            step = DENSE_CHUNK // _int4_layout()[0] * _int4_layout()[0]
            parts = [x2 @ self.dequantized(i, i + step).to(COMPUTE).T for i in range(0, self.out_features, step)]
            y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.qparams.to(COMPUTE))
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


def _unpack_int4(packed: torch.Tensor, K: int, start: int, stop: int, block: int, interleaved: bool) -> torch.Tensor:
    """Output rows start:stop of `_convert_weight_to_int4pack_for_cpu`'s bytes as (K, n) fp32 codes 0..15.

    The kernel's layout: each block of `block` output rows is stored k-major, two codes a byte.
    With AVX-512 (block 64) and AVX2 (block 32) byte j of a row holds outputs j (low nibble) and
    j + block/2 (high); without vector units, and in a last block shorter than `block`, outputs
    2j and 2j + 1 (`interleaved`)."""
    flat = packed.view(-1)[start * K // 2:stop * K // 2]
    n = stop - start
    full = n - n % block
    codes = torch.empty(K, n)
    for cols, size, inter in ((slice(0, full), block, interleaved), (slice(full, n), n - full, True)):
        if cols.stop == cols.start:
            continue
        part = flat[cols.start * K // 2:cols.stop * K // 2].view(-1, K, size // 2)
        lo, hi = (part & 15).transpose(0, 1), (part >> 4).transpose(0, 1)          # (K, blocks, size / 2)
        out = codes[:, cols].view(K, -1, size)
        if inter:
            pairs = out.view(K, -1, size // 2, 2)
            pairs[..., 0], pairs[..., 1] = lo, hi
        else:
            out[..., :size // 2], out[..., size // 2:] = lo, hi
    return codes


def _int4_layout() -> tuple[int, bool] | None:
    """(block, interleaved) of this torch build's packed int4 layout, or None when it is none of
    the known ones (then int4 layers always use the kernel). Found once by packing known codes."""
    global _INT4_LAYOUT
    if _INT4_LAYOUT is False:
        # 144 rows: whole blocks and a shorter last one, for either block size.
        q = torch.randint(0, 16, (144, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        _INT4_LAYOUT = None
        for block, interleaved in ((64, False), (32, False), (32, True)):
            if torch.equal(_unpack_int4(packed, 64, 0, 144, block, interleaved).T, q.float()):
                _INT4_LAYOUT = (block, interleaved)
                break
    return _INT4_LAYOUT


_INT4_LAYOUT: tuple[int, bool] | None | bool = False      # False: not probed yet


def quantize_model(model: nn.Module, mode: str, group_size: int = 32, fuse: bool = False,
                   inplace: bool = False) -> nn.Module:
    """A copy of `model` with every `nn.Linear` stored in `mode` ("int8" or "int4").

    The copy shares the tensors it does not replace (embeddings, norms) with `model`, so the
    original's weights are neither changed nor duplicated. `fuse` joins q/k/v and gate/up into one layer
    each before quantizing (`model/fuse.py`; the engine does): the codes and scales are
    those of the separate layers side by side, as scales are per output row (int4: per row and
    group), and a decode step makes 4 quantized matmuls per block instead of 7."""
    if mode not in MODES:
        raise ChatforgeError(f"unknown quantization {mode!r}; choose one of {', '.join(MODES)}")
    if group_size not in (32, 64, 128, 256):
        raise ChatforgeError(f"group_size must be 32, 64, 128 or 256, got {group_size}")
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise ChatforgeError("int8/int4 weights use PyTorch's CPU kernels; run the quantized model on the CPU")
    if inplace:
        # The caller hands the model over (a server's engine): each layer's full-precision
        # weights go as soon as its quantized layer is in, never all of them beside the codes.
        clone = model
    else:
        # Copy the modules, not the tensors: every parameter and buffer maps to itself.
        memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
        clone = copy.deepcopy(model, memo)

    # A block at a time (then what is left: the LM head), each block's freed full-precision
    # weights handed back before the next: fusing and quantizing the whole model at once kept
    # them resident beside the codes (the int8 server's peak 787 MiB; a block at a time 5xx).
    for root in [*getattr(clone, "layers", []), clone]:
        if fuse and root is not clone:
            fuse_projections(root)  # new concatenated tensors; `model`'s are untouched
        # The parents only: a list of every module would keep each replaced layer alive to the end.
        for parent in [m for m in root.modules() if any(isinstance(c, nn.Linear) for c in m.children())]:
            for name, child in list(parent.named_children()):
                if not isinstance(child, nn.Linear):
                    continue
                if mode == "int4" and child.in_features % group_size == 0:
                    layer = Int4Linear(child, group_size)
                else:
                    layer = Int8Linear(child)
                setattr(parent, name, layer)
        if inplace:
            give_back_memory()
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
