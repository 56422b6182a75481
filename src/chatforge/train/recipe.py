"""What every training stage does around the loop, written once: the method's learning rate,
the number of steps, adding LoRA, and saving the best model merged (or with its adapter).

    params = recipe.prepare(model, cfg.method, cfg.lora)          # LoRA added, or every weight
    steps = recipe.steps(cfg, cfg.epochs, source.batches_per_epoch, row_tokens)
    save = recipe.save_fn(out, tok, base, cfg.method, cfg.lora_save, inner="model")
    save = recipe.head_save_fn(out, tok, backbone, cfg.method, head_only, "head.safetensors", "classifier.json", meta)

A stage keeps what is its own (data, loss, batches, report); its config (`SFTConfig`,
`DPOConfig`, ...) holds its options, `LoopOptions` the loop's and `LoraConfig` the adapters'.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save as safetensors_bytes

from chatforge import files
from chatforge.errors import ChatforgeError
from chatforge.model import folder as model_folder
from chatforge.model.lora import LoraConfig, merged_state_dict, save_lora
from chatforge.train.loop import LoopOptions


def learning_rate(cfg: LoopOptions, defaults: dict[str, float], method: str) -> float:
    """`--lr`, else the method's default (adapters start from zero and take a larger one)."""
    return cfg.lr if cfg.lr is not None else defaults[method]


def steps(cfg: LoopOptions, epochs: float, batches_per_epoch: int, row_tokens: int) -> int:
    """`--steps`, else enough optimizer steps for `epochs` passes over the training batches."""
    if cfg.steps:
        return cfg.steps
    if epochs <= 0:
        raise ChatforgeError(f"--epochs must be positive, got {epochs}")
    return max(1, math.ceil(epochs * batches_per_epoch / cfg.accumulation(row_tokens)))


def prepare(model: nn.Module, method: str, lora: LoraConfig, seed: int, runs: int = 0) -> list[nn.Parameter]:
    """Set `model` up for `method` ("lora": adapters added, the rest frozen; otherwise every
    weight trains) and return the parameters to train. Seeded: LoRA's A matrices are random."""
    torch.manual_seed(seed)
    if method == "lora":
        return lora.apply(model, runs)
    return [p for p in model.parameters() if p.requires_grad]


def freeze_below_top(model: nn.Module, n_top: int, keep: tuple[nn.Module, ...] = (), least: int = 0) -> list[nn.Parameter]:
    """The `--method freeze` of SFT and the reward model: every parameter of `model` (a GPT) frozen
    but the top `n_top` blocks with the final norm (none of them for 0) and the `keep` modules (SFT's
    LM head). Returns the trainable parameters; `least` is the smallest --freeze-top accepted."""
    n_layer = len(model.layers)
    if not least <= n_top <= n_layer:
        raise ChatforgeError(f"--freeze-top must be between {least} and the model's {n_layer} blocks, got {n_top}")
    for p in model.parameters():
        p.requires_grad_(False)
    for module in [*model.layers[n_layer - n_top:], model.norm] if n_top else []:
        module.requires_grad_(True)
    for module in keep:
        module.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def _save_resume_weights(folder: Path, module: nn.Module, state: dict) -> None:
    """`last/`: the trained module's own weights, which `--resume` loads back. Clones: a tied
    embedding appears twice in the state and safetensors refuses shared memory."""
    model_folder.save_weights(Path(folder) / model_folder.WEIGHTS, module, {k: v.clone() for k, v in state.items()})


def _save_plain_model(folder: Path, gpt: nn.Module, tokenizer, state: dict, method: str) -> None:
    """A plain model folder of `gpt` with `state`, LoRA adapters merged into the weights."""
    model_folder.save_model(folder, gpt, tokenizer, state=merged_state_dict(gpt, state) if method == "lora" else state)


def save_fn(out: Path, tokenizer, base: Path, method: str, lora_save: str = "merged", inner: str = ""):
    """The loop's save function. At the top of `out` a plain model folder (adapters merged, and
    with `lora_save="adapter"` the adapter beside it, its config naming `base`); in `last/` the
    trained module's own weights, adapters unmerged, which `--resume` loads back. `inner` names
    the GPT inside the trained module when the stage wraps it (DPO's `ReplyLogProbs`: "model";
    weights outside it, such as PPO's value head, stay in `last/` only)."""

    def save(folder: Path, module: nn.Module, state: dict) -> None:
        if Path(folder).resolve() != out.resolve():
            if not inner:
                model_folder.save_model(folder, module, tokenizer, state=state)
            else:
                _save_resume_weights(folder, module, state)
            return
        gpt = module.get_submodule(inner) if inner else module
        plain = {k.removeprefix(inner + "."): v for k, v in state.items() if k.startswith(inner + ".")} \
            if inner else state
        _save_plain_model(folder, gpt, tokenizer, plain, method)
        if method == "lora" and lora_save == "adapter":
            save_lora(gpt, folder, state=plain, base=str(Path(base).resolve()))
    return save


def head_save_fn(out: Path, tokenizer, backbone: nn.Module, method: str, head_only: bool, head_file: str,
                 config_file: str, meta: dict):
    """The loop's save function of a stage that trains a head on a model's backbone (the
    classifier; the reward model's head is saved the same way). At the top of `out`: the backbone
    as a plain model folder (adapters merged with method "lora"), the head's weights in
    `head_file` and `meta` (its keys that do not start with "_") in `config_file`; in `last/` the
    trained module's own weights, which `--resume` loads back. With `head_only` the trained
    module IS the head and the backbone never changes: it is written once. Otherwise the module
    has `.backbone` and `.head`."""
    backbone_saved = []

    def save(folder: Path, module: nn.Module, state: dict) -> None:
        folder = Path(folder)
        if folder.resolve() != Path(out).resolve():
            _save_resume_weights(folder, module, state)
            return
        if head_only:
            head = state
            if not backbone_saved:
                model_folder.save_model(folder, backbone, tokenizer)
                backbone_saved.append(True)
        else:
            head = {k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")}
            body = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
            _save_plain_model(folder, backbone, tokenizer, body, method)
        tensors = {k: v.detach().contiguous().cpu() for k, v in head.items()}
        files.write_bytes(folder / head_file, safetensors_bytes(tensors, metadata={"format": "pt"}))
        files.write_json(folder / config_file, {k: v for k, v in meta.items() if not k.startswith("_")})
    return save


def best_validation(out: Path) -> dict:
    """The metrics of the validation with the lowest loss in `OUT/metrics.jsonl` (the saved model's)."""
    best: dict = {}
    path = out / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if "val_loss" in row and (not best or row["val_loss"] < best["val_loss"]):
                best = row
    return best


def run_summary(out: Path, result) -> dict:
    """The end of a stage's report: the best validation's metrics (without `val_`) and step, the
    seconds the loop took and whether it was interrupted (`result`: what `loop.train` returned)."""
    best = best_validation(out)
    return {"validation": {k.removeprefix("val_"): v for k, v in best.items() if k.startswith("val_")},
            "best_step": best.get("step"), "seconds": round(result.seconds, 1), "interrupted": result.interrupted}


def lora_report(method: str, lora: LoraConfig) -> dict:
    """The adapters' settings for a stage's JSON record (empty for other methods)."""
    if method != "lora":
        return {}
    return {"lora": {"lora_rank": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
                     "lora_targets": lora.targets, "lora_layers": lora.layers}}
