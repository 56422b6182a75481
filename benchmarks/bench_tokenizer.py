"""Tokenizer benchmark: compression (tokens per byte) and training time per vocabulary size.

    python benchmarks/bench_tokenizer.py --data runs/demo/data            # a `chatforge data build` folder
    python benchmarks/bench_tokenizer.py --files '~/.cache/chatforge/sources/**/*.rst.txt' ...

With --files, every text file is one document and every 20th file (sorted by path) is held out
for validation. For each vocabulary size it trains `chatforge`'s tokenizer and reports training
seconds and validation tokens per byte. Side by side, at one size, it also reports:
- the stock GPT-4 split pattern (`\\s*[\\r\\n]+`: a run of line breaks is one piece) trained on the
  same text, i.e. what chatforge's one-line-break-per-piece rule costs in compression;
- encoding speed of `ChatTokenizer.encode_batch` against `transformers.AutoTokenizer` loaded
  from the same folder (same Rust core: the ratio is chatforge's wrapper overhead).
The last line is one JSON object for collecting results across commits.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from chatforge.data.tokenizer import (
    SPECIAL_TOKENS,
    ChatTokenizer,
    _new_tokenizer,
    read_training_texts,
    tokens_per_byte,
    train_tokenizer,
)

GPT4_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def load_texts(args: argparse.Namespace) -> tuple[list[str], list[str], str]:
    if args.data:
        data = Path(args.data)
        train = list(read_training_texts(data))
        val = [json.loads(line)["text"] for line in open(data / "val.jsonl", encoding="utf-8") if line.strip()]
        return train, val, f"built data folder {data}"
    # Real paths: packages often symlink doc folders, and a file seen twice could land in both splits.
    paths = sorted({os.path.realpath(p) for g in args.files for p in glob.glob(os.path.expanduser(g), recursive=True)})
    if not paths:
        sys.exit("no input: pass --data DIR or --files GLOB ...")
    docs = [Path(p).read_text(encoding="utf-8", errors="replace") for p in paths]
    train = [d for i, d in enumerate(docs) if i % 20 != 19]
    val = [d for i, d in enumerate(docs) if i % 20 == 19]
    return train, val, f"{len(paths)} raw files ({', '.join(args.files)})"


def capped(texts: list[str], max_bytes: int) -> list[str]:
    out, used = [], 0
    for t in texts:
        if max_bytes and used >= max_bytes:
            break
        out.append(t)
        used += len(t.encode("utf-8"))
    return out


def train_gpt4_pattern(texts: list[str], vocab_size: int) -> ChatTokenizer:
    """The same tokenizer but with the stock GPT-4 split pattern (a peer for compression only)."""
    from tokenizers import Regex, pre_tokenizers, trainers

    tok = _new_tokenizer()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GPT4_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return ChatTokenizer(tok)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="a `chatforge data build` folder")
    ap.add_argument("--files", nargs="*", default=[], help="globs of raw text files (when there is no --data)")
    ap.add_argument("--vocab", type=int, nargs="*", default=[4096, 8192, 16384], help="vocabulary sizes")
    ap.add_argument("--max-bytes", type=int, default=12_000_000, help="cap on training text (0: all)")
    ap.add_argument("--peer-vocab", type=int, default=8192, help="size for the side-by-side comparisons")
    args = ap.parse_args()
    os.environ.setdefault("CHATFORGE_QUIET", "1")

    train, val, what = load_texts(args)
    train = capped(train, args.max_bytes)
    train_mb = sum(len(t.encode()) for t in train) / 1e6
    val_mb = sum(len(t.encode()) for t in val) / 1e6
    print(f"text: {what}\ntraining {train_mb:.1f} MB in {len(train)} documents, validation {val_mb:.2f} MB "
          f"in {len(val)} documents; {os.cpu_count()} CPUs")

    rows = []
    print(f"{'vocab':>7} {'train s':>8} {'tokens/byte':>12} {'bytes/token':>12}")
    for v in args.vocab:
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            tok = train_tokenizer(train, v, d)
            secs = time.perf_counter() - t0
            tpb = tokens_per_byte(tok, val)
            rows.append({"vocab": tok.vocab_size, "train_s": round(secs, 2), "tokens_per_byte": round(tpb, 4)})
            print(f"{tok.vocab_size:>7} {secs:>8.1f} {tpb:>12.4f} {1 / tpb:>12.2f}")
            if v == args.peer_vocab:
                ours_tpb = tpb
                peer = {}
                # Compression against the stock GPT-4 pattern.
                t0 = time.perf_counter()
                gpt4 = train_gpt4_pattern(train, v)
                peer["gpt4_pattern_train_s"] = round(time.perf_counter() - t0, 2)
                peer["gpt4_pattern_tokens_per_byte"] = round(tokens_per_byte(gpt4, val), 4)
                # Encoding speed against transformers on the same folder.
                from transformers import AutoTokenizer

                hf = AutoTokenizer.from_pretrained(d)
                t0 = time.perf_counter()
                ours_ids = tok.encode_batch(val)
                ours_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                hf_ids = hf(val, add_special_tokens=False)["input_ids"]
                hf_s = time.perf_counter() - t0
                peer["encode_same_ids_as_hf"] = ours_ids == [list(x) for x in hf_ids]
                peer["encode_mb_per_s"] = round(val_mb / ours_s, 2)
                peer["hf_encode_mb_per_s"] = round(val_mb / hf_s, 2)
                peer["encode_speed_ratio_vs_hf"] = round(hf_s / ours_s, 2)

    g = peer["gpt4_pattern_tokens_per_byte"]
    print(f"\nat vocab {args.peer_vocab}: stock GPT-4 pattern {g:.4f} tokens/byte "
          f"(ours {ours_tpb:.4f}: {100 * (ours_tpb / g - 1):+.1f}% tokens), trained in {peer['gpt4_pattern_train_s']:.1f}s")
    print(f"encoding validation: chatforge {peer['encode_mb_per_s']:.2f} MB/s, transformers "
          f"{peer['hf_encode_mb_per_s']:.2f} MB/s (ratio {peer['encode_speed_ratio_vs_hf']:.2f}x), "
          f"same ids: {peer['encode_same_ids_as_hf']}")
    print(json.dumps({"bench": "tokenizer", "text": what, "train_mb": round(train_mb, 2),
                      "val_mb": round(val_mb, 2), "rows": rows, **peer,
                      "ours_vs_gpt4_pattern_tokens": round(ours_tpb / g, 4)}))


if __name__ == "__main__":
    main()
