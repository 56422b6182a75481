"""`chatforge ppo`: align a chat model against a reward model with PPO or GRPO (the stage: `chatforge.train.ppo`)."""

from __future__ import annotations

import argparse

from chatforge.commands import add_config, config_from, exit_code, leaf
from chatforge.train.ppo import PPOConfig, run_ppo


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("examples:\n"
                     "  chatforge ppo --policy runs/demo/sft --reward runs/demo/reward --prompts questions.jsonl "
                     "--docs my_docs/ --out runs/demo/ppo\n"
                     "  chatforge ppo ... --algo grpo --samples 4 --max-new-tokens 48\n"
                     "  chatforge ppo ... --resume\n\n"
                     'prompts: one JSON object a line: {"question": "How do I ...?"}, {"prompt": ...} or\n'
                     '  {"messages": [...]}\n'
                     "reward model: chatforge reward train --base runs/demo/sft --prefs prefs.jsonl "
                     "--out runs/demo/reward")
    parser.add_argument("--policy", default=None, help="model folder to start from and stay near (e.g. runs/demo/sft)")
    parser.add_argument("--reward", default=None, help="reward model folder from `chatforge reward train`")
    parser.add_argument("--prompts", default=None,
                        help='JSONL of {"messages": [...]}, {"prompt": ...} or {"question": ...} lines to sample '
                             'replies to')
    parser.add_argument("--out", default=None, help="output folder (default: a `ppo` folder beside --policy)")
    # No --lora-dropout: PPO's ratios need the forward the replies were sampled with.
    add_config(parser, PPOConfig, skip=("lora_dropout",))
    leaf(parser, run)


def run(args: argparse.Namespace) -> int:
    return exit_code(run_ppo(args.policy, args.reward, args.prompts, args.out, config_from(args, PPOConfig)))
