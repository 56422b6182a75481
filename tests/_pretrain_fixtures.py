"""Small real-text fixtures for the training tests: English prose from the Python standard
library's own docstrings (written by people, on disk everywhere), a data folder in the shape
`chatforge data build` writes, and a tiny tokenizer trained on it."""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path

MODULES = ["argparse", "collections", "csv", "difflib", "email", "functools", "heapq", "json", "logging",
           "pathlib", "pickle", "queue", "random", "shutil", "string", "tarfile", "textwrap", "threading",
           "unittest", "zipfile", "asyncio", "subprocess", "socket", "datetime", "decimal", "fractions"]


def prose(max_chars: int = 200_000) -> list[str]:
    """Paragraphs of documentation text: module, class and function docstrings."""
    docs: list[str] = []
    for name in MODULES:
        mod = importlib.import_module(name)
        for obj in [mod, *(v for _, v in sorted(vars(mod).items()) if inspect.isclass(v) or inspect.isfunction(v))]:
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 80 and doc not in docs:
                docs.append(doc)
    out, total = [], 0
    for d in docs:
        if total > max_chars:
            break
        out.append(d)
        total += len(d)
    return out


def make_data(folder: Path, max_chars: int = 200_000) -> Path:
    """A data folder with train.jsonl / val.jsonl ({"text", "source"} lines), 90/10."""
    docs = prose(max_chars)
    folder.mkdir(parents=True, exist_ok=True)
    split = max(1, len(docs) // 10)
    for name, part in (("val", docs[:split]), ("train", docs[split:])):
        with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for d in part:
                f.write(json.dumps({"text": d, "source": "python-docstrings"}) + "\n")
    return folder


def make_tokenizer(folder: Path, vocab_size: int = 512):
    from chatforge.data.tokenizer import train_tokenizer

    return train_tokenizer(prose(100_000), vocab_size, folder)
