"""`chatforge model info` and `chatforge model import` (the work: `chatforge.model.gpt`,
`chatforge.model.importer`).

    chatforge model info --preset small --vocab-size 8192
    chatforge model info --model runs/demo/pretrain
    chatforge model import SmolLM2-135M-Instruct.Q4_1.gguf --out runs/x/base   # a GGUF file
    chatforge model import path/to/hf_model_folder --out runs/x/base            # an HF model folder
    chatforge model import smollm2-135m-instruct --out runs/x/base              # a fetched model source

`info` prints parameters and FLOPs per token of a preset or a saved model. `import` turns a
pretrained Llama / Mistral / Qwen2 / Qwen3 checkpoint into an ordinary chatforge model folder
that every command takes (`chatforge.model.importer`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from chatforge.commands import add_parser, leaf, subcommands
from chatforge.data.fetch import SOURCES, model_file
from chatforge.errors import ChatforgeError
from chatforge.model.folder import load_config
from chatforge.model.gpt import GPT, PRESETS, preset
from chatforge.model.importer import import_model


def configure(parser: argparse.ArgumentParser) -> None:
    sub = subcommands(parser)
    p = add_parser(sub, "info", "print a model's shape, parameter count and training FLOPs per token",
                   "chatforge model info --preset small")
    p.add_argument("--preset", default="small", help="preset name: tiny, small, base or large")
    p.add_argument("--preset-all", action="store_true", help="list every preset")
    p.add_argument("--vocab-size", type=int, default=None, help="vocabulary size (default: the preset's typical one)")
    p.add_argument("--model", default=None, help="a saved model folder instead of a preset")
    leaf(p, run_info)

    p = add_parser(sub, "import", "turn a pretrained GGUF file or HF model folder into a chatforge model folder",
                   "chatforge model import SmolLM2-135M-Instruct.Q4_1.gguf --out runs/x/base")
    p.add_argument("source", nargs="?", default=None, metavar="SRC",
                   help="a .gguf file, an HF model folder (config.json + safetensors), or the name of a "
                        "model source `chatforge data fetch` fetched (e.g. smollm2-135m-instruct)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="output model folder (replaced atomically if it is a model folder); "
                        "default: models/<name of SRC>")
    p.add_argument("--cache", metavar="DIR", default=None,
                   help="cache of `chatforge data fetch`, for SRC given as a source name "
                        "(default: $CHATFORGE_CACHE, else ~/.cache/chatforge)")
    leaf(p, run_import)


def run_info(args: argparse.Namespace) -> int:
    rows = []
    if args.model:
        rows.append((str(args.model), load_config(args.model)))
    else:
        names = list(PRESETS) if args.preset_all else [args.preset]
        overrides = {"vocab_size": args.vocab_size} if args.vocab_size else {}
        rows = [(n, preset(n, **overrides)) for n in names]
    print(f"{'model':<12} {'params':>10} {'non-emb':>10} {'vocab':>6} {'layers':>6} {'d_model':>7} "
          f"{'heads':>7} {'ctx':>5} {'GFLOP/token':>12}")
    for name, cfg in rows:
        with torch.device("meta"):  # no memory: shapes only
            m = GPT(cfg)
        print(f"{name:<12} {m.num_params() / 1e6:>9.2f}M {m.num_params(True) / 1e6:>9.2f}M {cfg.vocab_size:>6} "
              f"{cfg.n_layer:>6} "
              f"{cfg.d_model:>7} {cfg.n_head}/{cfg.n_kv_head:<5} {cfg.max_seq_len:>5} "
              f"{m.flops_per_token() / 1e9:>12.3f}")
    print("FLOPs per token are for training (forward + backward) at the full context length.")
    return 0


def run_import(args: argparse.Namespace) -> int:
    if not args.source:
        raise ChatforgeError("give the checkpoint to import: chatforge model import SRC --out DIR "
                             "(SRC: a .gguf file, an HF model folder or a fetched model source)")
    src = Path(args.source).expanduser()
    if not src.exists():
        if args.source in SOURCES:
            src = model_file(args.source, Path(args.cache).expanduser() if args.cache else None)
        else:
            raise ChatforgeError(f"{args.source} does not exist; pass a .gguf file, an HF model folder or a "
                                 "model source name (chatforge data fetch --list)")
    out = Path(args.out) if args.out else Path("models") / (src.stem if src.is_file() else src.name)
    print(f"importing {src} ...", flush=True)
    result = import_model(src, out)
    print(result.summary())
    return 0
