"""`chatforge reward train|score`: train a reward model on preference pairs, or score replies
with one (the stage: `chatforge.train.reward`)."""

from __future__ import annotations

import argparse
import json
import sys

from chatforge import files
from chatforge.commands import add_config, add_parser, config_from, exit_code, leaf, subcommands
from chatforge.errors import ChatforgeError
from chatforge.train.reward import (RewardConfig, load_reward_model, pair_accuracy, read_score_input,
                                    train_reward_model)


def configure(parser: argparse.ArgumentParser) -> None:
    sub = subcommands(parser)
    p = add_parser(sub, "train", "train a reward model (a scalar head on the backbone) on preference pairs",
                   "chatforge reward train --base runs/demo/sft --prefs runs/demo/prefs.jsonl --out runs/demo/reward")
    p.add_argument("--base", default=None, help="model folder whose backbone to use (e.g. runs/demo/sft)")
    p.add_argument("--prefs", default=None, help="preference pairs: JSONL of {\"prompt\", \"chosen\", \"rejected\"}")
    p.add_argument("--out", default=None, help="output folder (default: a `reward` folder beside --base)")
    add_config(p, RewardConfig)
    leaf(p, run_train)
    p = add_parser(sub, "score", "score replies with a reward model (higher is better)",
                   'chatforge reward score --model runs/demo/reward --prompt "How do I remove a package?" '
                   '--response "Run apt remove NAME." --response "I do not know."\n'
                   "  chatforge reward score --model runs/demo/reward --input runs/demo/prefs.jsonl")
    p.add_argument("--model", default=None, help="reward model folder written by `chatforge reward train`")
    p.add_argument("--prompt", default=None, help="the user's question (one user turn)")
    p.add_argument("--response", action="append", default=None, help="a reply to score (repeatable)")
    p.add_argument("--input", default=None,
                   help='JSONL of {"prompt", "response"} lines (each scored) or preference pairs '
                        '(both replies scored, pair accuracy printed)')
    p.add_argument("--out", default=None, help="write the scored lines here as JSONL (default: print them)")
    p.add_argument("--batch-size", type=int, default=16, help="conversations per forward pass")
    leaf(p, run_score)


def run_train(args: argparse.Namespace) -> int:
    report = train_reward_model(args.base, args.prefs, args.out, config_from(args, RewardConfig))
    print(f"reward model -> {report['out']}")
    return exit_code(report)


def run_score(args: argparse.Namespace) -> int:
    if not args.model:
        raise ChatforgeError("pass --model DIR: a folder written by `chatforge reward train`")
    if args.input and (args.prompt or args.response):
        raise ChatforgeError("give either --input FILE or --prompt with --response, not both")
    if args.input:
        records, items, n_pairs = read_score_input(args.input)
    elif args.prompt and args.response:
        records = [{"prompt": args.prompt, "response": r} for r in args.response]
        items, n_pairs = [(args.prompt, r) for r in args.response], 0
    else:
        raise ChatforgeError("pass --prompt TEXT with one or more --response TEXT, or --input FILE.jsonl")
    if args.batch_size < 1:
        raise ChatforgeError(f"--batch-size must be at least 1, got {args.batch_size}")
    scores = load_reward_model(args.model).score(items, args.batch_size).tolist()
    if n_pairs:
        for rec, c, r in zip(records, scores[0::2], scores[1::2]):
            rec.update(score_chosen=round(c, 4), score_rejected=round(r, 4))
    else:
        for rec, s in zip(records, scores):
            rec["score"] = round(s, 4)
    lines = [json.dumps(rec, ensure_ascii=False) for rec in records]
    if args.out:
        with files.atomic_open(args.out) as f:
            f.writelines(line + "\n" for line in lines)
    elif n_pairs:
        sys.stdout.writelines(line + "\n" for line in lines)
    else:
        for rec in records:
            print(f"{rec['score']:>9.4f}\t{rec['response']}")
    if n_pairs:
        longer = pair_accuracy([len(i[1]) for i in items[0::2]], [len(i[1]) for i in items[1::2]])
        print(f"pair accuracy {pair_accuracy(scores[0::2], scores[1::2]):.3f} on {n_pairs} pairs "
              f"(longer reply wins: {longer:.3f}, chance 0.500)", file=sys.stderr if not args.out else sys.stdout)
    return 0
