"""`chatforge model info`: parameters and FLOPs per token of a preset or a saved model.

    chatforge model info --preset small --vocab-size 8192
    chatforge model info --model runs/demo/pretrain
"""

from __future__ import annotations

import argparse

from chatforge.cli import add_parser, leaf, subcommands


def configure(parser: argparse.ArgumentParser) -> None:
    sub = subcommands(parser)
    p = add_parser(sub, "info", "print a model's shape, parameter count and training FLOPs per token",
                   "chatforge model info --preset small")
    p.add_argument("--preset", default="small", help="preset name: tiny, small, base or large")
    p.add_argument("--preset-all", action="store_true", help="list every preset")
    p.add_argument("--vocab-size", type=int, default=None, help="vocabulary size (default: the preset's typical one)")
    p.add_argument("--model", default=None, help="a saved model folder instead of a preset")
    leaf(p, run_info)


def run_info(args: argparse.Namespace) -> int:
    from chatforge.model.gpt import GPT, PRESETS, preset
    from chatforge.model.folder import load_config

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
        import torch

        with torch.device("meta"):  # no memory: shapes only
            m = GPT(cfg)
        print(f"{name:<12} {m.num_params() / 1e6:>9.2f}M {m.num_params(True) / 1e6:>9.2f}M {cfg.vocab_size:>6} "
              f"{cfg.n_layer:>6} "
              f"{cfg.d_model:>7} {cfg.n_head}/{cfg.n_kv_head:<5} {cfg.max_seq_len:>5} "
              f"{m.flops_per_token() / 1e9:>12.3f}")
    print("FLOPs per token are for training (forward + backward) at the full context length.")
    return 0
