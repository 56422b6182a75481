"""Model folders: save and load a model with its config and tokenizer, never executing code.

A model folder holds `model.safetensors` (weights), `config.json` (the `GPTConfig`),
`tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json`. Every file is written
atomically, so a crash or a full disk leaves the previous version intact.
This is model code (every command that loads a model comes here); the training state that
`--resume` needs lives in `train/checkpoint.py`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from chatforge import files
from chatforge.data.tokenizer import ChatTokenizer
from chatforge.errors import ChatforgeError
from chatforge.model.gpt import GPT, GPTConfig, rope_tables

WEIGHTS, CONFIG = "model.safetensors", "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def model_fingerprint(folder: str | Path, salt: str = "") -> str:
    """A hash of a model folder's config and weights (and `salt`): what is cached under it belongs
    to exactly these weights (a re-imported or retrained model gets a new one; a copy keeps it)."""
    h = hashlib.sha256(salt.encode())
    for name in (CONFIG, WEIGHTS):
        with open(Path(folder) / name, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()[:20]


def save_weights(path: Path, model: torch.nn.Module, state: dict[str, torch.Tensor] | None = None) -> None:
    """Write the model's state dict (or `state`) as safetensors, atomically; tied weights are stored once."""
    state = dict(model.state_dict() if state is None else state)
    if getattr(getattr(model, "config", None), "tie_embeddings", False):
        state.pop("lm_head.weight", None)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    with files.atomic_open(path, "wb") as f:
        # save_file wants a filename; write beside and copy in, keeping the rename atomic.
        tmp = Path(f.name + ".st")
        try:
            save_file(state, str(tmp), metadata={"format": "pt"})
            with open(tmp, "rb") as src:
                shutil.copyfileobj(src, f)
        finally:
            tmp.unlink(missing_ok=True)


def copy_tokenizer(tokenizer, out: Path) -> None:
    """Put the tokenizer files in `out`: from a `ChatTokenizer` or from a folder holding them."""
    if isinstance(tokenizer, (str, Path)):
        src = Path(tokenizer)
        for name in TOKENIZER_FILES:
            if (src / name).exists() and (src / name).resolve() != (out / name).resolve():
                files.write_bytes(out / name, (src / name).read_bytes())
    else:
        tokenizer.save(out)


def save_model(out: str | Path, model: GPT, tokenizer, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Save weights (`state`, default the model's), config and tokenizer into the folder `out`.

    The folder is created if missing; `tokenizer` may be None (weights and config only)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "module", model)          # unwrap DDP
    model = getattr(model, "_orig_mod", model)       # unwrap torch.compile
    save_weights(out / WEIGHTS, model, state)
    files.write_json(out / CONFIG, model.config.to_dict())
    if tokenizer is not None:
        copy_tokenizer(tokenizer, out)
    return out


def load_config(folder: str | Path) -> GPTConfig:
    folder = Path(folder)
    path = folder / CONFIG
    if not path.is_file():
        raise ChatforgeError(f"{folder} is not a model folder: {CONFIG} is missing "
                             "(point --model/--base at the output folder of pretrain or sft)")
    try:
        return GPTConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, TypeError) as e:
        raise ChatforgeError(f"{path} is corrupt ({e}); retrain or restore the checkpoint") from None


def load_weights(path: Path, model: torch.nn.Module, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None) -> None:
    """Load safetensors weights into `model`, with a clear error on missing/corrupt/mismatched files.

    With `dtype`, each floating tensor is converted as it is read and the model's parameters
    become those tensors (`assign`), so a model built on the meta device gets its weights
    without an fp32 copy ever existing whole beside them."""
    if not path.is_file():
        raise ChatforgeError(f"{path} is missing; the checkpoint is incomplete")
    try:
        if dtype is None:
            state = load_file(str(path), device=str(device))
        else:
            # The file is mapped once per tensor: the pages of the file a read touches count in
            # the process's resident size until it is unmapped, so reading every tensor through
            # one mapping took the 135M model's server to 1.1 GB (the whole 540 MB file mapped
            # beside the bf16 weights) before it had served anything.
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                names = list(f.keys())
            state = {}
            for name in names:
                with safe_open(str(path), framework="pt", device=str(device)) as f:
                    t = f.get_tensor(name)
                state[name] = t.to(dtype) if t.is_floating_point() else t
                del t                        # the file's fp32 tensor goes before the next is read
    except (SafetensorError, OSError, ValueError) as e:
        raise ChatforgeError(f"{path} is corrupt or truncated ({e}); retrain or restore the checkpoint") from None
    if getattr(getattr(model, "config", None), "tie_embeddings", False) and "embed_tokens.weight" in state:
        state.setdefault("lm_head.weight", state["embed_tokens.weight"])
    try:
        model.load_state_dict(state, strict=True, assign=dtype is not None)
    except RuntimeError as e:
        first = str(e).splitlines()[0:3]
        raise ChatforgeError(f"{path} does not match its config.json: {' '.join(first)}") from None
    if dtype is not None and getattr(model.config, "tie_embeddings", False):
        model.lm_head.weight = model.embed_tokens.weight     # assign replaced each with its own tensor


def load_tokenizer(folder: str | Path):
    return ChatTokenizer.load(folder)


def load_model(folder: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> tuple[GPT, "object"]:
    """Load (model, tokenizer) from a model folder; the model is in eval mode on `device`.

    `dtype` (say torch.bfloat16, for a server that runs in it): the weights are converted one
    tensor at a time as they are read, into a model built without weights (meta device). The
    default path builds the fp32 model and copies the file's tensors into it, which for the 135M
    demo model took the process to 1.3 GB at its peak (the model and the file's tensors side by
    side, 540 MB each) before a bf16 copy was even made."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ChatforgeError(f"model folder {folder} does not exist")
    config = load_config(folder)
    tokenizer = load_tokenizer(folder)
    if tokenizer.vocab_size != config.vocab_size:
        raise ChatforgeError(f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens but the model expects "
                             f"{config.vocab_size}; use the tokenizer the model was trained with")
    if dtype is None:
        model = GPT(config)
        load_weights(folder / WEIGHTS, model)
        return model.to(device).eval(), tokenizer
    with torch.device("meta"):
        model = GPT(config)
    load_weights(folder / WEIGHTS, model, device, dtype)
    # What the file does not hold is built again for real: the RoPE tables (cast like the
    # weights, as the engine's dtype copies do) and the MoE loss placeholder.
    cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
    model.rope_cos, model.rope_sin = cos.to(device, dtype), sin.to(device, dtype)
    for m in model.modules():
        if isinstance(getattr(m, "aux_loss", None), torch.Tensor) and m.aux_loss.is_meta:
            m.aux_loss = torch.zeros((), device=device)
    return model.eval(), tokenizer
