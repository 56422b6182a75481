"""`chatforge tokenizer train`: a byte-level BPE tokenizer with a ChatML template, trained on a
built corpus (the work: `chatforge.data.tokenizer.train_on_corpus`)."""

from __future__ import annotations

import argparse

from chatforge.commands import add_parser, leaf, subcommands
from chatforge.data.tokenizer import DEFAULT_MODEL_MAX_LENGTH, DEFAULT_VOCAB_SIZE, train_on_corpus
from chatforge.errors import ChatforgeError


def configure(parser: argparse.ArgumentParser) -> None:
    sub = subcommands(parser)
    p = add_parser(sub, "train", "train a byte-level BPE tokenizer with a ChatML chat template on a built corpus",
                   "chatforge tokenizer train --data runs/demo/data --vocab-size 8192 --out runs/demo/tokenizer")
    p.add_argument("--data", default=None,
                   help="folder written by `chatforge data build` (train.jsonl, val.jsonl, qa_train.jsonl)")
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                   help="largest number of token ids, special tokens and the 256 bytes included")
    p.add_argument("--out", default=None, help="output folder; None means a `tokenizer` folder beside --data")
    p.add_argument("--min-frequency", type=int, default=2, help="a pair must occur this often to be merged")
    p.add_argument("--max-bytes", type=int, default=0,
                   help="train on at most this many bytes of text; 0 means all of it")
    p.add_argument("--model-max-length", type=int, default=DEFAULT_MODEL_MAX_LENGTH,
                   help="`model_max_length` written for HF transformers (the model's context length)")
    leaf(p, run_train)


def run_train(args: argparse.Namespace) -> int:
    if not args.data:
        raise ChatforgeError("pass --data DIR: the folder written by `chatforge data build`")
    r = train_on_corpus(args.data, args.vocab_size, args.out, min_frequency=args.min_frequency,
                        max_bytes=args.max_bytes, model_max_length=args.model_max_length)
    tok, tpb = r["tokenizer"], r["tokens_per_byte"]
    note = "" if tok.vocab_size == args.vocab_size else \
        f" (asked for {args.vocab_size}: the text has no more pairs seen {args.min_frequency}+ times)"
    print(f"tokenizer: {tok.vocab_size} tokens{note}, trained in {r['seconds']:.1f}s -> {r['out']}")
    print(f"validation: {tpb:.4f} tokens/byte ({1 / tpb:.2f} bytes/token)" if tpb == tpb else
          "validation: no val.jsonl text, tokens/byte not measured")
    return 0
