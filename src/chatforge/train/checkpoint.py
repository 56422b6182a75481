"""Training state for `--resume`: the optimizer, the loop's counters and the RNG, never pickled.

Tensors go to `optimizer.safetensors`, the rest to `state.json`, each written atomically, beside
the model folder that `chatforge.model.folder` writes (weights, config, tokenizer).
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
from chatforge.model.folder import WEIGHTS

# --- Training state for --resume (no pickle: tensors go to safetensors, the rest to JSON) ----------

OPTIMIZER, STATE = "optimizer.safetensors", "state.json"


def _flatten_optimizer(opt_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into safetensors-able tensors and a JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict] = {}
    for pid, slots in opt_state["state"].items():
        for key, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{key}"] = value.detach().contiguous().cpu()
            else:
                plain.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": opt_state["param_groups"], "plain": plain,
                     "ids": [str(pid) for pid in opt_state["state"]]}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict = {}
    for name, t in tensors.items():
        pid, key = name.rsplit(".", 1)
        state.setdefault(pid, {})[key] = t
    for pid, slots in meta["plain"].items():
        state.setdefault(pid, {}).update(slots)
    # Optimizer ids are ints for torch.optim, parameter names for distributed state dicts.
    state = {(int(pid) if pid.isdigit() else pid): slots for pid, slots in state.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def save_training_state(folder: str | Path, optimizer_state: dict, state: dict,
                        rng_tensors: dict[str, torch.Tensor]) -> None:
    """Write the optimizer (tensors as safetensors + JSON) and the loop's JSON `state` into `folder`.

    `rng_tensors` are the torch RNG states (uint8 tensors), stored beside the optimizer tensors.
    """
    folder = Path(folder)
    tensors, meta = _flatten_optimizer(optimizer_state)
    for name, t in rng_tensors.items():
        tensors[f"rng.{name}"] = t.contiguous().cpu()
    with files.atomic_open(folder / OPTIMIZER, "wb") as f:
        tmp = Path(f.name + ".st")
        try:
            save_file(tensors, str(tmp))
            with open(tmp, "rb") as src:
                shutil.copyfileobj(src, f)
        finally:
            tmp.unlink(missing_ok=True)
    files.write_json(folder / STATE, {**state, "optimizer": meta})


def load_training_state(folder: str | Path) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """(optimizer state dict, loop state, rng tensors) from `folder`; ChatforgeError if damaged."""
    folder = Path(folder)
    for name in (OPTIMIZER, STATE, WEIGHTS):
        if not (folder / name).is_file():
            raise ChatforgeError(f"cannot resume: {folder / name} is missing; the checkpoint is incomplete "
                                 "(start again without --resume)")
    try:
        state = json.loads((folder / STATE).read_text(encoding="utf-8"))
        tensors = load_file(str(folder / OPTIMIZER))
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError, OSError, ValueError) as e:
        raise ChatforgeError(f"cannot resume: the checkpoint in {folder} is corrupt or truncated ({e}); "
                             "delete it and start again without --resume") from None
    rng = {k[4:]: v for k, v in tensors.items() if k.startswith("rng.")}
    opt_tensors = {k: v for k, v in tensors.items() if not k.startswith("rng.")}
    meta = state.pop("optimizer", None)
    if meta is None:
        raise ChatforgeError(f"cannot resume: {folder / STATE} has no optimizer section; start again")
    return _unflatten_optimizer(opt_tensors, meta), state, rng
