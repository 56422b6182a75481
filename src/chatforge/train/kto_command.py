"""`chatforge kto`: the command line of KTO training (the loss and the stage: `train/kto.py`).

    chatforge kto --base runs/demo/sft --data runs/demo/feedback-data/kto.jsonl --out runs/demo/kto
    chatforge kto ... --beta 0.1 --desirable-weight 1.0 --undesirable-weight 1.0   # TRL's defaults
    chatforge kto ... --resume                    # continue from runs/demo/kto/last/

Only argparse lives here; torch is imported when the command runs.
"""

from __future__ import annotations

import argparse
from typing import Any

from chatforge.cli import leaf, option_defaults


def add_options(p: argparse.ArgumentParser) -> None:
    from chatforge.train.pretrain import add_loop_options
    from chatforge.train.sft import NO_DROPOUT_HELP, _set_default, add_lora_options

    p.add_argument("--base", default=None, help="model folder to start from, and the reference (e.g. runs/demo/sft)")
    p.add_argument("--data", default=None,
                   help="KTO rows: JSONL of {\"prompt\", \"completion\", \"label\"} (`chatforge feedback export`'s "
                        "kto.jsonl), or preference pairs (each gives a desirable and an undesirable row)")
    p.add_argument("--out", default=None, help="output folder (default: a `kto` folder beside --base)")
    p.add_argument("--beta", type=float, default=0.1,
                   help="how far the model may move from --base: larger keeps it closer")
    p.add_argument("--desirable-weight", type=float, default=1.0,
                   help="weight of the desirable rows' losses (raise it when they are the fewer)")
    p.add_argument("--undesirable-weight", type=float, default=1.0,
                   help="weight of the undesirable rows' losses (raise it when they are the fewer)")
    p.add_argument("--method", default="lora", choices=("lora", "full"),
                   help="lora: low-rank adapters; full: all weights")
    add_lora_options(p, dropout=0.0, save=True, dropout_help=NO_DROPOUT_HELP)
    p.add_argument("--max-length", type=int, default=1024,
                   help="most tokens the model reads at once, prompt plus reply (capped at the model's context)")
    p.add_argument("--truncate", default="left", choices=["left", "drop"],
                   help="too-long rows: cut the prompt from the left, or drop them")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of the questions (with all their rows) held out for validation (0 = none)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the training rows (ignored with --steps)")
    add_loop_options(p, lr=None)
    _set_default(p, "steps", None, "optimizer steps (overrides --epochs)")
    _set_default(p, "lr", None, "peak learning rate (default: 5e-5 lora, 1e-6 full)")
    _set_default(p, "batch_size", 8, "rows per micro-batch (at least 2: the KL term is estimated from the others)")
    _set_default(p, "tokens_per_step", 0, "rows per optimizer step x --max-length (0 = one micro-batch a step)")
    _set_default(p, "eval_every", 0, "steps between validations and checkpoints (0 = four times a run)")
    _set_default(p, "log_every", 1, "steps between metrics.jsonl lines")
    _set_default(p, "compile", "auto", "torch.compile: auto = off here (every batch has its own length)")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("examples:\n"
                     "  chatforge kto --base runs/demo/sft --data runs/demo/feedback-data/kto.jsonl --out runs/demo/kto\n"
                     "  chatforge kto ... --beta 0.1 --desirable-weight 1.33\n"
                     "  chatforge kto ... --method full --lr 1e-6\n\n"
                     "make rows from thumbs up and down with `chatforge feedback export`")
    add_options(parser)
    leaf(parser, run)


def default_options() -> dict[str, Any]:
    return option_defaults(add_options)


def run_kto(base, data, out=None, **options: Any) -> dict:
    """`chatforge kto` from Python: `train.kto.run_kto` with the command's defaults for the
    options not given (by their Python names: `beta=0.1`, ...); returns the report."""
    from chatforge.errors import ChatforgeError
    from chatforge.train import kto

    o = default_options()
    unknown = set(options) - set(o)
    if unknown:
        raise ChatforgeError(f"unknown kto option(s) {sorted(unknown)}; valid: {', '.join(sorted(o))}")
    return kto.run_kto(base, data, out, {**o, **options})


def run(args: argparse.Namespace) -> int:
    options = {k: v for k, v in vars(args).items() if not k.startswith("_") and k not in ("config", "base", "data", "out")}
    report = run_kto(args.base, args.data, args.out, **options)
    return 130 if report["interrupted"] else 0
