"""`chatforge kto`: align a chat model with unpaired thumbs up and down (the stage: `chatforge.train.kto`)."""

from __future__ import annotations

import argparse

from chatforge.commands import add_config, config_from, exit_code, leaf
from chatforge.train.kto import KTOConfig, run_kto


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("examples:\n"
                     "  chatforge kto --base runs/demo/sft --data runs/demo/feedback-data/kto.jsonl --out runs/demo/kto\n"
                     "  chatforge kto ... --beta 0.1 --desirable-weight 1.33\n"
                     "  chatforge kto ... --method full --lr 1e-6\n\n"
                     "make rows from thumbs up and down with `chatforge feedback export`")
    parser.add_argument("--base", default=None, help="model folder to start from, and the reference (e.g. runs/demo/sft)")
    parser.add_argument("--data", default=None,
                        help="KTO rows: JSONL of {\"prompt\", \"completion\", \"label\"} (`chatforge feedback export`'s "
                             "kto.jsonl), or preference pairs (each gives a desirable and an undesirable row)")
    parser.add_argument("--out", default=None, help="output folder (default: a `kto` folder beside --base)")
    add_config(parser, KTOConfig)
    leaf(parser, run)


def run(args: argparse.Namespace) -> int:
    return exit_code(run_kto(args.base, args.data, args.out, config_from(args, KTOConfig)))
