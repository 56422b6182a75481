"""Export a LoRA adapter alone, for engines that load it on top of a base model exported once.

    chatforge sft --base runs/x/base ... --out runs/x/sft --method lora --lora-save adapter
    chatforge export --model runs/x/base --format hf --out runs/x/export/base-hf             # the base, once
    chatforge export --model runs/x/sft --format peft --base-export runs/x/export/base-hf \\
        --out runs/x/export/adapter                                                        # PEFT, vLLM
    chatforge export --model runs/x/base --format gguf --quant q8_0 --out runs/x/export/base-q8_0
    chatforge export --model runs/x/sft --format gguf-lora --base-export runs/x/export/base-q8_0 \\
        --out runs/x/export/adapter-gguf                                                   # llama.cpp, Ollama

The adapter comes from a model folder that `chatforge sft` / `dpo --method lora --lora-save
adapter` wrote: `adapter.safetensors` (tensors `layers.0.self_attn.q_proj.lora_A.weight`, ...)
and `adapter_config.json` (rank, alpha, dropout, targets, and `base`: the folder it was trained
on). Its base is that folder, not the merged model beside the adapter.

`--format peft` writes PEFT's layout: `adapter_config.json` (peft_type LORA, `r`, `lora_alpha`,
`lora_dropout`, `target_modules`, `bias` none, task CAUSAL_LM) and `adapter_model.safetensors`,
tensors named `base_model.model.<HF module>.lora_A.weight` / `.lora_B.weight`. chatforge's
parameter names are HF Llama / Qwen's without the leading `model.` (`GPT.hf_state_dict`), its
LoRA computes the same `W x + (alpha / r) B A x` as PEFT's, and training never fuses q/k/v (only
the engine's inference copy does), so the tensors go in unchanged under the HF module names.
`target_modules` is the list of layer names (`q_proj`, ...) when every block is adapted, else the
full module names (`--lora-layers N` adapts the top N blocks only). transformers + peft, and vLLM
(`--enable-lora --lora-modules NAME=DIR`), load it on the base's `--format hf` folder.

`--format gguf-lora` writes llama.cpp's adapter GGUF: `general.type` adapter, `adapter.type`
lora, `adapter.lora.alpha`, the base's architecture, and per adapted matrix the tensors
`<GGUF name of the base weight>.lora_a` (A, r x in) and `.lora_b` (B, out x r); for `llama` files
B's rows of attn_q / attn_k are permuted as the base's rows are (gguf_export.permute_qk; the
update B A then has the base weight's row order). Stored f32 (default: adapters are small), f16
or bf16. With `--base-export` (the base's `--format gguf` folder or file) an Ollama `Modelfile`
is written: `FROM` the base file, `ADAPTER` the adapter, and the template, system message and
parameters of the ordinary Modelfile.

Before writing, the adapter is checked against its base when that folder is still there: every
weight of the model folder must equal the base's, the adapted ones up to the adapter's update
(in the stored precision). An adapter that does not reproduce the model (a base retrained at the
same path) is refused, since on the engine it would silently give another model.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from chatforge import files
from chatforge.errors import ChatforgeError
from chatforge.model.folder import WEIGHTS, load_config
from chatforge.model.gguf_export import gguf_architecture, permute_qk, write_tensors
from chatforge.model.gpt import GPT
from chatforge.model.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter_config

ADAPTER_QUANTS = ("f32", "f16", "bf16")
PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"


@dataclass
class Adapter:
    """A chatforge LoRA adapter as saved beside a model: per adapted module, A (r, in) and B (out, r)."""

    folder: Path
    rank: int
    alpha: float
    dropout: float
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]      # chatforge module name -> (A, B)
    base: Path | None
    notes: list[str] = field(default_factory=list)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def no_adapter_message(folder: Path) -> str:
    return (f"{folder} holds no LoRA adapter (no adapter.safetensors / adapter_config.json): it is a merged "
            "model or a full fine-tune. Export it whole with --format hf or gguf, or train with "
            "`chatforge sft --method lora --lora-save adapter` (dpo takes the same option) to keep the adapter")


def read_adapter(folder: str | Path, config) -> Adapter:
    """The adapter saved in the model folder `folder`, checked against the model's `config`
    (a `GPTConfig`): every adapted module exists there with those shapes."""
    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG).is_file() and not (folder / ADAPTER_WEIGHTS).is_file():
        raise ChatforgeError(no_adapter_message(folder))
    meta = read_adapter_config(folder)
    try:
        rank, alpha, dropout = int(meta["rank"]), float(meta["alpha"]), float(meta.get("dropout", 0.0))
    except (KeyError, TypeError, ValueError) as e:
        raise ChatforgeError(f"{folder / ADAPTER_CONFIG} lacks the LoRA settings ({e}); save the adapter again") from None
    try:
        state = load_file(str(folder / ADAPTER_WEIGHTS))
    except (SafetensorError, OSError, ValueError) as e:
        raise ChatforgeError(f"{folder / ADAPTER_WEIGHTS} is missing or corrupt ({e}); save the adapter again") from None
    if config.n_experts:
        raise ChatforgeError("a mixture-of-experts model has no HF / llama.cpp equivalent; its adapter cannot be "
                             "exported")
    with torch.device("meta"):           # shapes only, no memory
        linears = {n: m for n, m in GPT(config).named_modules() if isinstance(m, torch.nn.Linear)}
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key in state:
        name, sep, rest = key.partition(".lora_A.")
        if not sep:
            name, sep, rest = key.partition(".lora_B.")
        if not sep or rest != "weight":
            raise ChatforgeError(f"{folder / ADAPTER_WEIGHTS} holds {key}, which is not a LoRA tensor")
        if name not in modules:
            a, b = state.get(f"{name}.lora_A.weight"), state.get(f"{name}.lora_B.weight")
            if a is None or b is None:
                raise ChatforgeError(f"{folder / ADAPTER_WEIGHTS} has only one of lora_A / lora_B for {name}; "
                                     "save the adapter again")
            layer = linears.get(name)
            if layer is None:
                raise ChatforgeError(f"the adapter of {folder} adapts {name}, which this model does not have")
            want = ((rank, layer.in_features), (layer.out_features, rank))
            if (tuple(a.shape), tuple(b.shape)) != want:
                raise ChatforgeError(f"the adapter of {folder}: {name} has A {tuple(a.shape)} and B {tuple(b.shape)}, "
                                     f"expected {want[0]} and {want[1]} (rank {rank})")
            modules[name] = (a, b)
    if not modules:
        raise ChatforgeError(f"{folder / ADAPTER_WEIGHTS} holds no tensors; save the adapter again")
    order = list(linears)                # the model's own order: blocks first, then the head
    modules = dict(sorted(modules.items(), key=lambda kv: order.index(kv[0])))
    base = Path(meta["base"]) if meta.get("base") else None
    return Adapter(folder, rank, alpha, dropout, modules, base)


def check_against_base(adapter: Adapter, folder: Path) -> None:
    """Refuse an adapter that does not turn its base into the model saved in `folder` (see the
    module docstring); note it when the base folder is gone and cannot be checked."""
    if adapter.base is None:
        adapter.notes.append("the adapter does not name its base folder; make sure the base you export is the model "
                             "it was trained on")
        return
    if not (adapter.base / WEIGHTS).is_file():
        adapter.notes.append(f"the adapter's base {adapter.base} is not there any more: it was not checked, and the "
                             "engine needs that base exported (--format hf / gguf)")
        return
    ours, theirs = load_config(folder), load_config(adapter.base)
    if ours.max_seq_len > theirs.max_seq_len:
        # `sft --seq-len` above the base's context extends it (RoPE only, no weight changes).
        adapter.notes.append(f"the fine-tune's context ({ours.max_seq_len} tokens) is longer than its base's "
                             f"({theirs.max_seq_len}), which the base's export records: give the engine the longer "
                             f"one (vLLM --max-model-len {ours.max_seq_len}, llama.cpp -c {ours.max_seq_len})")
    with safe_open(str(folder / WEIGHTS), framework="pt") as merged, \
            safe_open(str(adapter.base / WEIGHTS), framework="pt") as base:
        if set(merged.keys()) != set(base.keys()):
            raise ChatforgeError(f"{folder} and its adapter's base {adapter.base} hold different weights; the base "
                                 "is another model than the one the adapter was trained on")
        for key in merged.keys():  # noqa: SIM118 - a safetensors file, not a dict
            m, b = merged.get_tensor(key), base.get_tensor(key)
            if m.shape != b.shape:
                raise ChatforgeError(f"{key} is {tuple(m.shape)} in {folder} but {tuple(b.shape)} in the adapter's "
                                     f"base {adapter.base}; the base is another model")
            name = key.removesuffix(".weight")
            if name not in adapter.modules:
                if not torch.equal(m, b):
                    raise ChatforgeError(_changed(adapter, folder, key))
                continue
            a_, b_ = adapter.modules[name]
            expected = b.float() + (b_.float() @ a_.float()) * adapter.scaling
            # The merged weight was rounded to its stored dtype once: allow a few of its steps.
            eps = torch.finfo(m.dtype).eps if m.dtype.is_floating_point else 0.0
            tol = 4 * eps * float(expected.abs().max()) + 1e-6
            if float((m.float() - expected).abs().max()) > tol:
                raise ChatforgeError(_changed(adapter, folder, key))


def _changed(adapter: Adapter, folder: Path, key: str) -> str:
    return (f"the adapter in {folder} does not reproduce its model from the base {adapter.base} ({key} differs): the "
            "base folder changed after training (e.g. retrained at the same path). Served on that base, the adapter "
            "would give another model; export the merged model (--format hf / gguf) or retrain the adapter")


# ---- PEFT ---------------------------------------------------------------------------------------

def hf_module(name: str) -> str:
    """The HF module name of a chatforge module (`GPT.hf_state_dict`'s naming)."""
    return name if name.startswith("lm_head") else f"model.{name}"


def target_modules(adapter: Adapter, config) -> list[str]:
    """PEFT's `target_modules`: layer names when every block's layer of that name is adapted,
    else the exact HF module names (PEFT matches an entry as the module name or its suffix)."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in adapter.modules})
    per_leaf = Counter(n.rsplit(".", 1)[-1] for n in adapter.modules)
    everywhere = all(per_leaf[leaf] == (1 if leaf == "lm_head" else config.n_layer) for leaf in leaves)
    return leaves if everywhere else [hf_module(n) for n in adapter.modules]


def peft_config(adapter: Adapter, config, base_name: str | None) -> dict:
    alpha = int(adapter.alpha) if float(adapter.alpha).is_integer() else adapter.alpha
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
        "r": adapter.rank, "lora_alpha": alpha, "lora_dropout": adapter.dropout,
        "target_modules": target_modules(adapter, config), "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "modules_to_save": None, "init_lora_weights": True,
        "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
        "layers_pattern": None,
    }


_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def write_peft(adapter: Adapter, config, out: Path, quant: str = "f32", base_name: str | None = None) -> list[Path]:
    """Write PEFT's adapter folder into `out`; returns the files written."""
    if quant not in ADAPTER_QUANTS:
        raise ChatforgeError(f"--format peft stores the adapter as {', '.join(ADAPTER_QUANTS)}, not {quant}")
    dtype = _DTYPES[quant]
    state = {}
    for name, (a, b) in adapter.modules.items():
        prefix = f"base_model.model.{hf_module(name)}"
        state[f"{prefix}.lora_A.weight"] = a.to(dtype).contiguous()
        state[f"{prefix}.lora_B.weight"] = b.to(dtype).contiguous()
    save_file(state, str(out / PEFT_WEIGHTS), metadata={"format": "pt"})
    os.chmod(out / PEFT_WEIGHTS, 0o666 & ~files._umask())     # safetensors creates it private
    files.write_json(out / PEFT_CONFIG, peft_config(adapter, config, base_name))
    return [out / PEFT_CONFIG, out / PEFT_WEIGHTS]


# ---- llama.cpp ----------------------------------------------------------------------------------

def gguf_lora_tensors(adapter: Adapter, config, quant: str):
    """(GGUF name, data, GGML type) of every adapter tensor: `<base tensor>.lora_a` / `.lora_b`."""
    arch = gguf_architecture(config)
    names = arch.gguf_tensor_names(config.n_layer)
    qtype = gguf.GGMLQuantizationType[quant.upper()]
    for name, (a, b) in adapter.modules.items():
        if name == "lm_head" and config.tie_embeddings:
            raise ChatforgeError("the adapter changes lm_head, which is tied to the token embedding")
        gname = names.get_name(f"{hf_module(name)}.weight", try_suffixes=(".weight",))
        if gname is None:
            raise ChatforgeError(f"{name} has no GGUF name for the {arch.gguf_name} architecture; the adapter cannot be exported")
        a_np = a.to(torch.float32).numpy()
        b_np = b.to(torch.float32).numpy()
        # llama.cpp's llama files hold q/k rows permuted; B carries the rows of the update B A.
        if arch.gguf_permuted_qk and gname.endswith("attn_q.weight"):
            b_np = permute_qk(b_np, config.n_head)
        elif arch.gguf_permuted_qk and gname.endswith("attn_k.weight"):
            b_np = permute_qk(b_np, config.n_kv_head)
        # PyTorch's (rows, cols) is GGML's ne = [cols, rows]: A is ne [in, r], B ne [r, out], as
        # llama.cpp checks them against the base weight's ne [in, out].
        for suffix, data in ((".lora_a", a_np), (".lora_b", b_np)):
            yield gname + suffix, gguf.quants.quantize(np.ascontiguousarray(data), qtype), qtype


def write_gguf_lora(adapter: Adapter, config, path: Path, quant: str = "f32", name: str = "adapter") -> Counter:
    """Write the adapter as llama.cpp's LoRA GGUF `path`; returns the count of tensors per type."""
    if quant not in ADAPTER_QUANTS:
        raise ChatforgeError(f"--format gguf-lora stores the adapter as {', '.join(ADAPTER_QUANTS)}, not {quant}")
    writer = gguf.GGUFWriter(str(path), gguf_architecture(config).gguf_name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(adapter.alpha))
    return write_tensors(writer, gguf_lora_tensors(adapter, config, quant))


# ---- the base's export --------------------------------------------------------------------------

def find_base_export(path: str | Path, fmt: str, adapter: Adapter, marker: str) -> Path:
    """The base's export named by `--base-export`: for peft its HF folder, for gguf-lora its GGUF
    file (or the folder holding it). It must be an export of the adapter's own base."""
    path = Path(path)
    want = "hf" if fmt == "peft" else "gguf"
    how = f"chatforge export --model {adapter.base or 'BASE'} --format {want}"
    if not path.exists():
        raise ChatforgeError(f"--base-export {path} does not exist; export the adapter's base first: {how}")
    folder = path.parent if path.is_file() else path
    if not (folder / marker).is_file():
        raise ChatforgeError(f"--base-export {path} is not a folder chatforge export wrote; export the base: {how}")
    info = json.loads((folder / marker).read_text(encoding="utf-8"))
    if info.get("format") != want:
        raise ChatforgeError(f"--base-export {path} is a --format {info.get('format')} export; --format {fmt} needs "
                             f"the base's --format {want} export: {how}")
    if adapter.base is not None and Path(info.get("source", "")).resolve() != adapter.base.resolve():
        raise ChatforgeError(f"--base-export {path} was exported from {info.get('source')}, but the adapter was "
                             f"trained on {adapter.base}; export that base: {how}")
    if want == "hf":
        return folder
    if path.is_file():
        if path.suffix != ".gguf":
            raise ChatforgeError(f"--base-export {path} is not a .gguf file")
        return path
    found = sorted(folder.glob("*.gguf"))
    if len(found) != 1:
        raise ChatforgeError(f"--base-export {path} holds {len(found)} .gguf files; name the base's file itself")
    return found[0]


def relative_ref(target: Path, start: Path) -> str:
    """`target` as a Modelfile path: relative to `start` (the Modelfile's folder) where possible."""
    try:
        rel = os.path.relpath(target.resolve(), start.resolve())
    except ValueError:                   # another drive (Windows)
        return str(target.resolve())
    return rel if rel.startswith("..") else f"./{rel}"
