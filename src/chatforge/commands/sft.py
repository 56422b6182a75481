"""`chatforge sft`: fine-tune a model to chat (the stage: `chatforge.train.sft`)."""

from __future__ import annotations

import argparse

from chatforge.commands import add_config, config_from, exit_code, leaf
from chatforge.train.sft import SFTConfig, run_sft


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("examples:\n"
                     "  chatforge sft --base runs/demo/pretrain --data runs/demo/data --out runs/demo/sft\n"
                     "  chatforge sft ... --method lora --lora-rank 8 --lora-save adapter\n"
                     "  chatforge sft ... --method freeze --freeze-top 2\n"
                     "  chatforge sft ... --resume                 # continue from runs/demo/sft/last/")
    parser.add_argument("--base", default=None, help="model folder to start from (the output of `chatforge pretrain`)")
    parser.add_argument("--data", default=None,
                        help="data folder from `chatforge data build` (qa_train.jsonl, qa_val.jsonl)")
    parser.add_argument("--out", default=None, help="output folder (default: an `sft` folder beside --base)")
    add_config(parser, SFTConfig)
    leaf(parser, run)


def run(args: argparse.Namespace) -> int:
    return exit_code(run_sft(args.base, args.data, args.out, config_from(args, SFTConfig)))
