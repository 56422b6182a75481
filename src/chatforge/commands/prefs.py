"""`chatforge prefs make`: preference pairs generated from the company's Q&A (the work:
`chatforge.train.make_pairs`)."""

from __future__ import annotations

import argparse

from chatforge.commands import add_config, add_parser, config_from, leaf, subcommands
from chatforge.train.make_pairs import PrefsConfig, make_preferences


def configure(parser: argparse.ArgumentParser) -> None:
    sub = subcommands(parser)
    p = add_parser(sub, "make", "generate preference pairs from the data folder's Q&A and the documents",
                   "chatforge prefs make --model runs/demo/sft --data runs/demo/data "
                   "--docs ~/.cache/chatforge/sources/debian-faq --out runs/demo/prefs.jsonl")
    p.add_argument("--model", default=None, help="model folder whose own answers become rejected replies")
    p.add_argument("--data", default=None, help="data folder from `chatforge data build` (its qa_train.jsonl)")
    p.add_argument("--docs", nargs="*", default=None,
                   help="documents the answers are grounded in (default: the inputs the data folder's report.json lists)")
    p.add_argument("--out", default=None, help="output JSONL file (default: prefs.jsonl in the data folder's parent)")
    add_config(p, PrefsConfig)
    leaf(p, run_make)


def run_make(args: argparse.Namespace) -> int:
    counts = make_preferences(args.model, args.data, args.docs, args.out, config_from(args, PrefsConfig))
    pairs = counts["pairs"]
    print(f"{pairs['total']} pairs from {counts['questions']} questions ({counts['answerable']} answerable, "
          f"{counts['not_in_documents']} asked without their documents): "
          + ", ".join(f"{k} {v}" for k, v in pairs.items() if k != "total"))
    if counts.get("invented_origin"):
        print("invented replies: " + ", ".join(f"{k} {v}" for k, v in counts["invented_origin"].items()))
    print("skipped: " + ", ".join(f"{k} {v}" for k, v in counts["skipped"].items()))
    print(f"-> {counts['out']} ({counts['seconds']} s)")
    return 0
