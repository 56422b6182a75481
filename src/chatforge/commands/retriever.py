"""`chatforge retriever train`: fine-tune the embedding model of dense retrieval on the company's
Q&A (the stage: `chatforge.train.retriever`)."""

from __future__ import annotations

import argparse

from chatforge.commands import add_config, add_parser, config_from, leaf, subcommands
from chatforge.train.retriever import RetrieverConfig, report_text, run_retriever


def configure(parser: argparse.ArgumentParser) -> None:
    sub = subcommands(parser)
    p = add_parser(sub, "train", "fine-tune the embedding model on the data folder's (question, passage) pairs",
                   "chatforge retriever train --data runs/demo/data --out runs/demo/retriever")
    p.add_argument("--data", default=None,
                   help="data folder from `chatforge data build` (qa_train.jsonl; qa_val.jsonl is held out)")
    p.add_argument("--out", default=None, help="output model folder (default: a `retriever` folder beside --data)")
    add_config(p, RetrieverConfig)
    leaf(p, run)


def run(args: argparse.Namespace) -> int:
    config = config_from(args, RetrieverConfig)
    report = run_retriever(args.data, args.out, config)
    if config.feedback:
        fb = report["feedback"]
        print(f"feedback: {fb['pairs']} of {fb['records']} replies copied from a passage, trained on")
    print(f"{report['pairs']} training pairs ({report['val_pairs']} held out), {report['steps']} steps, "
          f"{report['seconds']} s; dense retrieval before and after (BM25 beside):")
    print(report_text(report))
    out = report["out"]
    print(f"wrote {out} (use it with --retrieval dense --embedding-model {out})", flush=True)
    return 0
