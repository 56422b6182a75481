"""Read a Hugging Face model folder (Llama, Mistral, Qwen2, Qwen3) as a chatforge `Checkpoint`.

    from chatforge.model.hf_import import read_hf_folder
    ckpt = read_hf_folder("path/to/SmolLM2-135M-Instruct")   # config.json + *.safetensors

The folder holds `config.json` and the weights as `model.safetensors`, or as shards listed in
`model.safetensors.index.json`. Only safetensors are read: a `pytorch_model.bin` is a pickle, and
loading one can execute code. HF names are chatforge's with a leading `model.` (the switches in
`GPTConfig` keep it so for Qwen2's biases and Qwen3's q/k norms), so the mapping is a prefix.

What is refused, with a message saying so: another `model_type`, an activation other than SiLU,
RoPE scaling of any kind, partial rotary embeddings, attention / MLP biases where the architecture
makes them optional (Llama, Mistral, Qwen3). A sliding window shorter than the context caps the
context at the window (see `importer.context_length`).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from chatforge.errors import ChatforgeError
from chatforge.model.gpt import GPTConfig
from chatforge.model.architectures import from_hf_model_type
from chatforge.model.checkpoint import Checkpoint, check_state, context_length

INDEX = "model.safetensors.index.json"


def _rope_theta(cfg: dict, where: str) -> float:
    """rope_theta, refusing any RoPE scaling. transformers 4 writes `rope_theta` and
    `rope_scaling`; transformers 5 writes `rope_parameters` ({"rope_type", "rope_theta", ...})."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    for d in (params, scaling):
        kind = d.get("rope_type", d.get("type", "default"))
        if kind not in ("default", None):
            raise ChatforgeError(f"{where}: RoPE scaling {kind!r} is not implemented by chatforge "
                                 "(only plain RoPE); this model cannot be imported")
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        raise ChatforgeError(f"{where}: partial rotary embeddings (partial_rotary_factor "
                             f"{cfg['partial_rotary_factor']}) are not supported")
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def _sliding_window(cfg: dict, arch: str) -> int | None:
    window = cfg.get("sliding_window")
    if not window:
        return None
    if arch == "mistral":
        return int(window)
    # Qwen: the window applies only when switched on (transformers 5 lists it per layer).
    if cfg.get("use_sliding_window") or "sliding_attention" in (cfg.get("layer_types") or []):
        return int(window)
    return None


def config_from_hf(cfg: dict, where: str, notes: list[str]) -> tuple[str, GPTConfig]:
    """(architecture, GPTConfig) from the fields of an HF config.json."""
    architecture = from_hf_model_type(cfg.get("model_type"), where)
    arch = architecture.name

    def need(key: str):
        if key not in cfg:
            raise ChatforgeError(f"{where}: config.json has no {key!r}; it is not a complete {arch} config")
        return cfg[key]

    if cfg.get("hidden_act", "silu") != "silu":
        raise ChatforgeError(f"{where}: activation {cfg['hidden_act']!r} is not supported (only silu / SwiGLU)")
    if cfg.get("mlp_bias"):
        raise ChatforgeError(f"{where}: MLP biases (mlp_bias) are not supported")
    # Qwen2 always has q/k/v biases; in the others `attention_bias` also adds one to o_proj.
    if not architecture.qkv_bias and cfg.get("attention_bias"):
        raise ChatforgeError(f"{where}: attention biases (attention_bias) are not supported for {arch}")
    d_model, n_head = int(need("hidden_size")), int(need("num_attention_heads"))
    head = cfg.get("head_dim")
    # An explicit head size only when it differs from d_model / n_head: the default keeps a plain
    # Llama config identical to a chatforge-trained one.
    head_size = int(head) if head and (d_model % n_head or int(head) != d_model // n_head) else None
    theta = _rope_theta(cfg, where)
    config = GPTConfig(
        vocab_size=int(need("vocab_size")), d_model=d_model, n_layer=int(need("num_hidden_layers")),
        n_head=n_head, n_kv_head=int(cfg.get("num_key_value_heads") or n_head),
        d_ff=int(need("intermediate_size")), rope_theta=theta, norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_seq_len=context_length(int(need("max_position_embeddings")), _sliding_window(cfg, arch), notes),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), head_size=head_size,
        **architecture.switches)
    return arch, config


def _weight_files(folder: Path) -> list[Path]:
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ChatforgeError(f"{index} is corrupt ({e}); re-download the model") from None
        shards = [folder / name for name in dict.fromkeys(weight_map.values())]
        missing = [p.name for p in shards if not p.is_file()]
        if missing:
            raise ChatforgeError(f"{folder}: shard(s) {', '.join(missing)} listed in {INDEX} are missing; "
                                 "download the whole model")
        return shards
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    if any((folder / n).exists() for n in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        raise ChatforgeError(f"{folder} holds only pickle weights (pytorch_model.bin), which chatforge never loads "
                             "(unpickling can execute code); convert them to safetensors first")
    raise ChatforgeError(f"{folder} has no model.safetensors or {INDEX}; it is not an HF model folder")


def _our_name(hf_name: str) -> str | None:
    """chatforge's name for an HF tensor name; None for tensors that are not weights."""
    if hf_name.endswith("rotary_emb.inv_freq"):       # old checkpoints store RoPE tables; we rebuild them
        return None
    return hf_name.removeprefix("model.")


def read_hf_folder(folder: str | Path) -> Checkpoint:
    """The checkpoint in an HF model folder (config.json + safetensors), as fp32 tensors."""
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise ChatforgeError(f"{folder} is not an HF model folder: config.json is missing")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ChatforgeError(f"{path} is not valid JSON ({e}); re-download the model") from None
    notes: list[str] = []
    arch, config = config_from_hf(cfg, str(folder), notes)
    state: dict[str, torch.Tensor] = {}
    types: Counter = Counter()
    for shard in _weight_files(folder):
        try:
            with safe_open(str(shard), framework="pt") as f:
                for hf_name in f.keys():
                    name = _our_name(hf_name)
                    if name is None or (name == "lm_head.weight" and config.tie_embeddings):
                        continue                     # a tied head saved anyway is the embedding again
                    t = f.get_tensor(hf_name)
                    types[str(t.dtype).removeprefix("torch.")] += 1
                    state[name] = t.float()
        except (SafetensorError, OSError) as e:
            raise ChatforgeError(f"{shard} is corrupt or truncated ({e}); re-download the model") from None
    state = check_state(config, state, str(folder),
                        lambda n: n if n.startswith("lm_head") else f"model.{n}")
    return Checkpoint(config, state, arch, folder, types, notes)
