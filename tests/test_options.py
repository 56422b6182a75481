"""Typed configs (`chatforge.options`) and the flags `chatforge.commands` generates from them."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from chatforge.commands import add_config, config_from
from chatforge.errors import ChatforgeError
from chatforge.model.lora import LoraConfig, PreferenceLora
from chatforge.options import build, defaults, flatten, group, option
from chatforge.train.dpo import DPOConfig
from chatforge.train.kto import KTOConfig


@dataclass
class Toy:
    size: int = option(4, "how big")
    mode: str = option("a", "which mode", choices=("a", "b"))
    fast: bool = option(False, "go fast")
    names: list[str] | None = option(None, "some names")
    lora: LoraConfig = group(PreferenceLora, "lora")


def parser_for(cls) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_config(p, cls)
    return p


def test_flags_round_trip_through_argparse():
    p = parser_for(Toy)
    args = p.parse_args(["--size", "7", "--mode", "b", "--fast", "--names", "x", "y", "--lora-rank", "16"])
    cfg = config_from(args, Toy)
    assert (cfg.size, cfg.mode, cfg.fast, cfg.names) == (7, "b", True, ["x", "y"])
    assert cfg.lora.rank == 16 and isinstance(cfg.lora, PreferenceLora) and cfg.lora.alpha == 16.0
    assert config_from(p.parse_args([]), Toy) == Toy()
    with pytest.raises(SystemExit):
        p.parse_args(["--mode", "c"])


def test_build_takes_flat_names_and_rejects_unknown_ones():
    cfg = build(Toy, {"size": 2, "lora-alpha": 8.0})
    assert cfg.size == 2 and cfg.lora.alpha == 8.0
    assert flatten(cfg)["lora_alpha"] == 8.0 and build(Toy, flatten(cfg)) == cfg
    with pytest.raises(ChatforgeError, match=r"unknown toy option\(s\) \['sise'\]; valid: .*size"):
        build(Toy, {"sise": 3}, "toy")
    with pytest.raises(ChatforgeError, match="--mode must be one of a, b"):
        build(Toy, {"mode": "z"})


def test_stage_configs_keep_the_documented_flag_names_and_defaults():
    d = defaults(DPOConfig)
    assert d["beta"] == 0.1 and d["loss"] == "sigmoid" and d["lora_rank"] == 8 and d["lora_dropout"] == 0.0
    assert d["lr"] is None and d["log_every"] == 1 and d["lora_save"] == "merged" and d["tokens_per_step"] == 0
    k = defaults(KTOConfig)
    assert k["desirable_weight"] == k["undesirable_weight"] == 1.0 and k["batch_size"] == 8
    flags = [a.option_strings[0] for a in parser_for(DPOConfig)._actions if a.option_strings]
    for flag in ("--lora-rank", "--lora-targets", "--lora-layers", "--lora-save", "--tokens-per-step", "--val-fraction",
                 "--early-stop", "--resume"):
        assert flag in flags
    with pytest.raises(ChatforgeError, match="batch-size must be at least 2"):
        build(KTOConfig, {"batch_size": 1})
    with pytest.raises(ChatforgeError, match="val-fraction"):
        DPOConfig(val_fraction=1.5)


def test_lora_targets_in_the_top_blocks():
    from chatforge.model.gpt import GPT, preset
    from chatforge.model.lora import lora_modules

    model = GPT(preset("tiny", n_layer=3, vocab_size=64))
    top1 = LoraConfig(targets="q_proj,down_proj", layers=1)
    assert top1.module_names(model) == ["layers.2.self_attn.q_proj", "layers.2.mlp.down_proj"]
    # A classifier reading block 2's output runs blocks 0-1 only: the top block it runs is 1.
    assert top1.module_names(model, runs=2) == ["layers.1.self_attn.q_proj", "layers.1.mlp.down_proj"]
    assert LoraConfig(targets="q_proj").module_names(model) == ["q_proj"]
    with pytest.raises(ChatforgeError, match="--lora-layers must be between 1 and the 3 blocks"):
        LoraConfig(layers=4).module_names(model)
    names = top1.module_names(model)
    params = top1.apply(model)
    assert sorted(lora_modules(model)) == sorted(names)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == len(params) == 4 and all(n.startswith("layers.2.") for n in trainable)
