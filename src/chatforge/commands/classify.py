"""`chatforge classify train|predict`: train / run a text classifier on a model's backbone (the
training: `chatforge.train.classify`; the classifier itself: `chatforge.model.classifier`)."""

from __future__ import annotations

import argparse

from chatforge.commands import add_config, add_parser, config_from, exit_code, leaf, subcommands
from chatforge.data.labelled import read_texts
from chatforge.errors import ChatforgeError
from chatforge.model.classifier import predict
from chatforge.train.classify import ClassifyConfig, run_classify


def configure(parser: argparse.ArgumentParser) -> None:
    sub = subcommands(parser)
    p = add_parser(sub, "train", "train a classifier head (optionally LoRA) on a model's backbone",
                   "chatforge classify train --base runs/demo/pretrain --from-vader --out runs/demo/sentiment")
    p.add_argument("--base", default=None, help="model folder whose backbone to use (e.g. runs/demo/pretrain)")
    p.add_argument("--data", default=None, help='JSONL file of {"text", "label"} lines')
    p.add_argument("--from-vader", nargs="?", const="default", default=None, metavar="FILE",
                   help="train on the vader human sentiment ratings instead of --data "
                        "(default file: CACHE/sources/vader/sentiment.jsonl from `chatforge data fetch`)")
    p.add_argument("--out", default=None, help="output folder (a model folder + head.safetensors + classifier.json)")
    add_config(p, ClassifyConfig)
    leaf(p, run_train)
    p = add_parser(sub, "predict", "print the label and probability of texts",
                   'chatforge classify predict --model runs/demo/sentiment --text "I love it"')
    p.add_argument("--model", default=None, help="classifier folder written by `classify train`")
    p.add_argument("--text", action="append", default=None, help="a text to classify (repeatable)")
    p.add_argument("--input", default=None, help='file of texts: JSONL with {"text"} lines, or one text a line')
    leaf(p, run_predict)


def run_train(args: argparse.Namespace) -> int:
    report = run_classify(args.base, args.data, args.out, config_from(args, ClassifyConfig), from_vader=args.from_vader)
    return exit_code(report)


def run_predict(args: argparse.Namespace) -> int:
    if not args.model:
        raise ChatforgeError("pass --model DIR: a folder written by `chatforge classify train`")
    texts = list(args.text or [])
    if args.input:
        texts += read_texts(args.input)
    if not texts:
        raise ChatforgeError("pass --text TEXT or --input FILE")
    for text, (label, prob) in zip(texts, predict(args.model, texts)):
        print(f"{label}\t{prob:.3f}\t{text}")
    return 0
