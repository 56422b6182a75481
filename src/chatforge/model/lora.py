"""Low-rank adapters (LoRA) for any model built from `nn.Linear` layers, such as `GPT`.

LoRA (Hu et al., 2021) freezes a weight W and learns a low-rank update B @ A beside it:

    y = x W^T + (alpha / rank) * dropout(x) A^T B^T        A: (rank, in), B: (out, rank)

A starts random and B starts at zero, so a freshly wrapped model computes exactly what the base
model did; only A and B are trained (a few percent of the parameters), and `merge_lora` folds
B @ A back into W so that the result is a plain `GPT` again, with no inference cost.

    model = apply_lora(model, rank=8, alpha=16, dropout=0.05)   # wraps q/k/v/o and the MLP
    ... train the parameters with requires_grad ...
    save_lora(model, "runs/demo/sft")       # adapter.safetensors + adapter_config.json
    merge_lora(model)                       # plain GPT, save with folder.save_model

Parameter names keep the wrapped layer under `base_layer` (as PEFT does), so the adapter's
tensors are named `layers.0.self_attn.q_proj.lora_A.weight` and so on.

Speed: a wrapped layer runs as one autograd node (`_LoRAFunction`) that computes the same formula
with fewer passes over the activations, and under autocast it keeps its frozen base weight cast to
the autocast dtype (bf16) instead of casting it at every forward. Under `torch.compile` it is the
plain formula, which inductor fuses itself. `benchmarks/bench_sft.py` measures a LoRA step
against peft + TRL.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from chatforge import files
from chatforge.errors import ChatforgeError
from chatforge.options import option

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter.safetensors", "adapter_config.json"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class AdapterConfig:
    """What a model's adapters are (kept in `model.lora_config` and written to adapter_config.json)."""
    rank: int = 8
    alpha: float = 16.0        # the update is scaled by alpha / rank, so rank can change without retuning lr
    dropout: float = 0.0       # on the adapter's input only; the frozen path sees x unchanged
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))  # module-name suffixes

    def validate(self) -> None:
        if self.rank <= 0:
            raise ChatforgeError(f"LoRA rank must be positive, got {self.rank}")
        if self.alpha <= 0:
            raise ChatforgeError(f"LoRA alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ChatforgeError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ChatforgeError("LoRA needs at least one target module name (e.g. q_proj)")


@dataclass
class LoraConfig:
    """The `--lora-*` options of every command that trains adapters (sft, dpo, kto, ppo, reward,
    classify): what to adapt, and how. `apply(model)` adds the adapters."""
    SECTION: ClassVar[str] = "LoRA (with --method lora)"

    rank: int = option(8, "LoRA: rank of each adapter")
    alpha: float = option(16.0, "LoRA: the update is scaled by alpha / rank")
    dropout: float = option(0.0, "LoRA: dropout on the adapters' input")
    targets: str = option(",".join(DEFAULT_TARGETS), "LoRA: comma-separated names (suffixes) of the linear layers "
                                                     "to adapt")
    layers: int = option(0, "LoRA: adapt only the top N blocks (0 = all); the backward pass then stops below them")

    def target_list(self) -> list[str]:
        return [t.strip() for t in str(self.targets).split(",") if t.strip()]

    def module_names(self, model: nn.Module, runs: int = 0) -> list[str]:
        """The names of the layers to wrap: the targets in the top `layers` blocks (0 = every
        block) of the first `runs` blocks (0 = all; a classifier that reads an inner block's
        output runs only the blocks below it, and an adapter above would never see a gradient).
        Adapting only the top blocks means the backward pass stops at the lowest adapted one."""
        targets = self.target_list()
        n_layer = len(model.layers)
        n_run = runs or n_layer
        if not 0 <= self.layers <= n_run:
            raise ChatforgeError(f"--lora-layers must be between 1 and the {n_run} blocks the model runs "
                                 f"(0 = all), got {self.layers}")
        low = n_run - self.layers if self.layers else 0
        if low == 0 and n_run == n_layer:
            return targets
        blocks = tuple(f"layers.{i}." for i in range(low, n_run))
        chosen = [name for name, m in model.named_modules()
                  if isinstance(m, nn.Linear) and name.startswith(blocks) and _matches(name, targets)]
        return chosen or targets  # none: apply_lora says what the layers are called

    def apply(self, model: nn.Module, runs: int = 0) -> list[nn.Parameter]:
        """Add the adapters to `model` in place (everything else frozen); the trainable parameters."""
        apply_lora(model, self.rank, self.alpha, self.dropout, self.module_names(model, runs))
        return [p for p in model.parameters() if p.requires_grad]


@dataclass
class PreferenceLora(LoraConfig):
    """LoRA of the preference stages (dpo, kto, reward): dropout off by default."""
    dropout: float = option(0.0, "LoRA: dropout on the adapters' input (default 0, as TRL's preference trainers "
                                 "disable dropout: it would make the scores of the two replies noisy; drawing its "
                                 "mask cost ~15%% of a step)")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer computes in here: autocast's when it is on, else the input's."""
    kind = x.device.type
    if hasattr(torch, "get_autocast_dtype"):            # torch >= 2.4
        if torch.is_autocast_enabled(kind):
            return torch.get_autocast_dtype(kind)
    elif kind == "cpu" and torch.is_autocast_cpu_enabled():
        return torch.get_autocast_cpu_dtype()
    elif kind == "cuda" and torch.is_autocast_enabled():
        return torch.get_autocast_gpu_dtype()
    return x.dtype


def _keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """Dropout's keep mask, True with probability 1 - p. A bool tensor drawn in one kernel: a
    quarter of the memory of F.dropout's float mask, which it also scales in a second pass
    (measured, 2 threads: 13 ms against 34-42 ms for F.dropout on a 4096 x 576 input; a LoRA
    step of the 135M model draws 210 of them)."""
    return torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(1.0 - p)


class _LoRAFunction(torch.autograd.Function):
    """y = x W^T + b + k * ((x * keep) A^T) B^T, with k = scaling / (1 - dropout), as one autograd node.

    Every tensor arrives already in the compute dtype. Compared with the same formula written as
    separate ops (what autograd records for `base(x) + B(A(dropout(x))) * scaling`), this saves the
    passes over the (tokens, width) activations that dominated a CPU LoRA step: the dropout is a
    bool mask applied once, the scaling lands on the (tokens, rank) product, B's product is added
    into the base output in place (addmm), and in backward the input gradient is one addmm onto
    the adapter's part. The frozen weight W gets no gradient and x is not saved (W's backward needs
    only W). Measured on the 135M model (batch 8 x 512, bf16 autocast, 2 threads, both versions
    interleaved in one process on the shared machine): 55 against 50 tokens/s for a forward and
    backward; the rest of a step is the model's own (attention, norms, the loss).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, keep, k: float):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])                                        # (N, in)
        xd = x2 if keep is None else x2 * keep.view(x2.shape)                # (N, in)
        h = torch.mm(xd, lora_a.t()).mul_(k)                                 # (N, r)
        y = torch.nn.functional.linear(x2, weight, bias)                     # (N, out)
        y.addmm_(h, lora_b.t())
        ctx.save_for_backward(weight, lora_a, lora_b, xd, h, keep)
        ctx.k, ctx.shape = k, shape
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        weight, lora_a, lora_b, xd, h, keep = ctx.saved_tensors
        gy = gy.reshape(-1, gy.shape[-1])                                    # (N, out)
        g = torch.mm(gy, lora_b).mul_(ctx.k)                                 # (N, r): d loss / d (xd A^T)
        grad_a = torch.mm(g.t(), xd) if ctx.needs_input_grad[3] else None    # (r, in)
        grad_b = torch.mm(gy.t(), h) if ctx.needs_input_grad[4] else None    # (out, r)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(g, lora_a)                                     # (N, in)
            if keep is not None:
                grad_x.mul_(keep.view(grad_x.shape))
            grad_x = grad_x.addmm_(gy, weight).view(ctx.shape)
        return grad_x, None, None, grad_a, grad_b, None, None


class LoRALinear(nn.Module):
    """An `nn.Linear` plus a trainable low-rank update; the wrapped layer is left untouched."""

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base_layer
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        w = base_layer.weight
        self.lora_A = nn.Linear(base_layer.in_features, rank, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Linear(rank, base_layer.out_features, bias=False, device=w.device, dtype=w.dtype)
        # A like a default Linear init, B zero: the update B @ A is zero until training moves B.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._cast: dict[str, tuple[tuple, torch.Tensor]] = {}   # frozen tensors in the compute dtype

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight, so code that reads `layer.weight` keeps working."""
        return self.base_layer.weight

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling  # (out, in)

    def _in_dtype(self, name: str, t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        """`t` in `dtype`. A frozen tensor's cast copy is kept and reused while the tensor is
        unchanged (same storage, same version counter): under bf16 autocast the base weights are
        cast once, not at every forward as autocast does for tensors that need no gradient."""
        if t is None or t.dtype == dtype:
            return t
        if t.requires_grad:
            return t.to(dtype)
        key = (t.data_ptr(), t._version, t.device, dtype)
        hit = self._cast.get(name)
        if hit is None or hit[0] != key:
            hit = self._cast[name] = (key, t.detach().to(dtype))
        return hit[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        frozen = not any(t is not None and t.requires_grad for t in (base.weight, base.bias))
        if torch.compiler.is_compiling() or not frozen or type(base.weight.data) is not torch.Tensor:
            # The plain formula: under torch.compile inductor fuses it (and the dropout) itself; a
            # base layer someone made trainable needs its weight gradient; sharded (FSDP) weights.
            return base(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling
        dtype = _compute_dtype(x)
        p = getattr(self.dropout, "p", 0.0) if self.training else 0.0
        keep = _keep_mask(x.shape, p, x.device) if p > 0 else None
        return _LoRAFunction.apply(x.to(dtype), self._in_dtype("weight", base.weight, dtype),
                                   self._in_dtype("bias", base.bias, dtype), self.lora_A.weight.to(dtype),
                                   self.lora_B.weight.to(dtype), keep, self.scaling / (1.0 - p))

    def __getstate__(self) -> dict:
        # A deep copy (the engine's bf16 copy of a model) should not drag the cast cache along.
        state = dict(self.__dict__)
        state["_cast"] = {}
        return state

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


def _matches(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               targets: list[str] | tuple[str, ...] | None = None) -> nn.Module:
    """Freeze every parameter of `model` and wrap the matching `nn.Linear` layers with adapters.

    `targets` are module-name suffixes (`q_proj`, or `self_attn.q_proj` for attention only).
    Modifies `model` in place and returns it; the adapter settings are kept in `model.lora_config`.
    """
    cfg = AdapterConfig(rank, float(alpha), float(dropout), list(targets or DEFAULT_TARGETS))
    cfg.validate()
    if lora_modules(model):
        raise ChatforgeError("this model already has LoRA adapters; merge or load them instead of adding more")
    chosen = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and _matches(name, cfg.targets)]
    if not chosen:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ChatforgeError(f"no linear layer matches the LoRA targets {cfg.targets}; "
                             f"the model's linear layers are named {', '.join(linear)}")
    # A tied head shares its weight with the embedding: merging into it would change the
    # embedding too, so the head is not a valid target when tied.
    if getattr(getattr(model, "config", None), "tie_embeddings", False) and "lm_head" in chosen:
        raise ChatforgeError("lm_head is tied to the token embedding and cannot take a LoRA adapter; "
                             "leave it out of --lora-targets")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in chosen:
        _set_child(model, name, LoRALinear(model.get_submodule(name), cfg.rank, cfg.alpha, cfg.dropout))
    model.lora_config = cfg
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and remove the wrappers (in place; returns `model`).

    Afterwards the model is the plain architecture again (same parameter names as before
    `apply_lora`), and all its parameters are trainable, as a freshly built model's are.
    """
    for name, m in lora_modules(model).items():
        with torch.no_grad():
            m.base_layer.weight += m.delta_weight().to(m.base_layer.weight.dtype)
        _set_child(model, name, m.base_layer)
    for p in model.parameters():
        p.requires_grad_(True)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The adapter tensors only (`...q_proj.lora_A.weight`, `...q_proj.lora_B.weight`), taken
    from `state` (a full state dict of the wrapped model) or from the model itself."""
    state = model.state_dict() if state is None else state
    return {k: v for k, v in state.items() if ".lora_A." in k or ".lora_B." in k}


def merged_state_dict(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The plain model's state dict with every adapter folded in, leaving `model` wrapped.

    `state` is a full state dict of the wrapped model (default: its current one), e.g. the copy
    the training loop hands to its save function. Merged weights are computed in fp32.
    """
    state = model.state_dict() if state is None else state
    out = {k: v for k, v in state.items() if ".lora_A." not in k and ".lora_B." not in k}
    for name, m in lora_modules(model).items():
        base = out.pop(f"{name}.base_layer.weight")
        delta = (state[f"{name}.lora_B.weight"].float() @ state[f"{name}.lora_A.weight"].float()) * m.scaling
        out[f"{name}.weight"] = (base.float() + delta.to(base.device)).to(base.dtype)
        if f"{name}.base_layer.bias" in out:     # Qwen2's q/k/v: the bias goes back under the plain name too
            out[f"{name}.bias"] = out.pop(f"{name}.base_layer.bias")
    return out


def save_lora(model: nn.Module, out: str | Path, state: dict[str, torch.Tensor] | None = None, **extra) -> Path:
    """Write `adapter.safetensors` and `adapter_config.json` into the folder `out`.

    The tensors come from `state` (a full state dict of the wrapped model) or the model itself;
    `extra` keys (e.g. `base="runs/demo/pretrain"`) are stored in the config for the reader.
    """
    cfg: AdapterConfig | None = getattr(model, "lora_config", None)
    if cfg is None or not lora_modules(model):
        raise ChatforgeError("the model has no LoRA adapters to save")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in lora_state_dict(model, state).items()}
    files.write_bytes(out / ADAPTER_WEIGHTS, save(state, metadata={"format": "pt"}))
    files.write_json(out / ADAPTER_CONFIG, {"format": "chatforge-lora", **asdict(cfg), **extra})
    return out


def read_adapter_config(folder: str | Path) -> dict:
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        raise ChatforgeError(f"{folder} holds no LoRA adapter: {ADAPTER_CONFIG} is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ChatforgeError(f"{path} is corrupt ({e}); save the adapter again") from None


def load_lora(model: nn.Module, path: str | Path) -> nn.Module:
    """Add the adapter saved in folder `path` to `model` (wrapping it if needed) and load its weights."""
    folder = Path(path)
    if folder.is_file():  # accept the safetensors file itself
        folder = folder.parent
    meta = read_adapter_config(folder)
    if not lora_modules(model):
        apply_lora(model, meta["rank"], meta["alpha"], meta.get("dropout", 0.0), meta["targets"])
    try:
        state = load_file(str(folder / ADAPTER_WEIGHTS))
    except (SafetensorError, OSError, ValueError) as e:
        raise ChatforgeError(f"{folder / ADAPTER_WEIGHTS} is missing or corrupt ({e})") from None
    expected = set(lora_state_dict(model))
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
        raise ChatforgeError(f"{folder / ADAPTER_WEIGHTS} does not fit this model "
                             f"(missing {missing}, unexpected {unexpected}); was it trained on another base?")
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # same names, other shapes: another rank or another model size
        raise ChatforgeError(f"{folder / ADAPTER_WEIGHTS} does not fit this model: {str(e).splitlines()[-1].strip()}") from None
    return model
