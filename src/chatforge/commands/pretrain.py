"""`chatforge pretrain`: pretrain a GPT from scratch or continue a local checkpoint (the stage:
`chatforge.train.pretrain`)."""

from __future__ import annotations

import argparse

from chatforge.commands import add_config, config_from, exit_code, leaf
from chatforge.train.pretrain import DEFAULT_OUT, PretrainConfig, run_pretrain


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("examples:\n"
                     "  chatforge pretrain --data runs/demo/data --tokenizer runs/demo/tokenizer --preset small "
                     "--max-tokens 1500000 --out runs/demo/pretrain\n"
                     "  chatforge pretrain ... --resume                      # continue from OUT/last/\n"
                     "  chatforge pretrain ... --init-from runs/old/pretrain  # continue a trained model on new text\n"
                     "  torchrun --nproc_per_node 2 -m chatforge pretrain ...  # data-parallel (DDP; --fsdp to shard)")
    parser.add_argument("--data", default=None,
                        help="data folder from `chatforge data build` (train.jsonl, val.jsonl)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="output folder (the best model + last/)")
    add_config(parser, PretrainConfig)
    leaf(parser, run)


def run(args: argparse.Namespace) -> int:
    return exit_code(run_pretrain(args.data, args.out, config_from(args, PretrainConfig)))
