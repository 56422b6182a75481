"""Model folders: save and load a model with its config and tokenizer, never executing code.

A model folder holds `model.safetensors` (weights), `config.json` (the `GPTConfig`),
`tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json`. Every file is written
atomically, so a crash or a full disk leaves the previous version intact.
This is model code (every command that loads a model comes here); the training state that
`--resume` needs lives in `train/checkpoint.py`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from chatforge import files
from chatforge.errors import ChatforgeError
from chatforge.model.gpt import GPT, GPTConfig

WEIGHTS, CONFIG = "model.safetensors", "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


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


def load_weights(path: Path, model: torch.nn.Module, device: str | torch.device = "cpu") -> None:
    """Load safetensors weights into `model`, with a clear error on missing/corrupt/mismatched files."""
    if not path.is_file():
        raise ChatforgeError(f"{path} is missing; the checkpoint is incomplete")
    try:
        state = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise ChatforgeError(f"{path} is corrupt or truncated ({e}); retrain or restore the checkpoint") from None
    if getattr(getattr(model, "config", None), "tie_embeddings", False) and "embed_tokens.weight" in state:
        state.setdefault("lm_head.weight", state["embed_tokens.weight"])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0:3]
        raise ChatforgeError(f"{path} does not match its config.json: {' '.join(first)}") from None


def load_tokenizer(folder: str | Path):
    from chatforge.data.tokenizer import ChatTokenizer

    return ChatTokenizer.load(folder)


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, "object"]:
    """Load (model, tokenizer) from a model folder; the model is in eval mode on `device`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ChatforgeError(f"model folder {folder} does not exist")
    config = load_config(folder)
    tokenizer = load_tokenizer(folder)
    if tokenizer.vocab_size != config.vocab_size:
        raise ChatforgeError(f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens but the model expects "
                             f"{config.vocab_size}; use the tokenizer the model was trained with")
    model = GPT(config)
    load_weights(folder / WEIGHTS, model)
    return model.to(device).eval(), tokenizer
