"""`chatforge dpo`: align a chat model with preference pairs (the stage: `chatforge.train.dpo`)."""

from __future__ import annotations

import argparse

from chatforge.commands import add_config, config_from, exit_code, leaf
from chatforge.train.dpo import DPOConfig, run_dpo


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("examples:\n"
                     "  chatforge dpo --base runs/demo/sft --prefs runs/demo/prefs.jsonl --out runs/demo/dpo\n"
                     "  chatforge dpo --base runs/demo/sft --prefs runs/demo/feedback-data/preferences.jsonl "
                     "--out runs/demo/dpo --loss ipo --beta 0.5\n"
                     "  chatforge dpo ... --method full --lr 1e-6\n\n"
                     "make pairs with `chatforge prefs make` or `chatforge feedback export`")
    parser.add_argument("--base", default=None, help="model folder to start from, and the reference (e.g. runs/demo/sft)")
    parser.add_argument("--prefs", default=None, help="preference pairs: JSONL of {\"prompt\", \"chosen\", \"rejected\"}")
    parser.add_argument("--out", default=None, help="output folder (default: a `dpo` folder beside --base)")
    add_config(parser, DPOConfig)
    leaf(parser, run)


def run(args: argparse.Namespace) -> int:
    return exit_code(run_dpo(args.base, args.prefs, args.out, config_from(args, DPOConfig)))
