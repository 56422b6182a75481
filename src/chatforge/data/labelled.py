"""Labelled texts for a classifier: JSONL `{"text", "label"}` files, the vader sentiment ratings,
plain text files to classify, and the seeded splits and samples `chatforge classify` makes.

    texts, labels = read_labelled_jsonl("intents.jsonl")                 # label_field="label"
    texts, labels = read_vader(default_vader_path())                      # `data fetch --sources vader`
    train, held_out = stratified_split(labels, 0.2, seed=0)              # indices

Vader (`sentiment.jsonl`, `{"text", "score"}`): ~24k sentences - tweets, movie and product
reviews, news - each rated by 10 people from -4 to +4, averaged. `vader_label` maps a score to
"negative" (< -0.5) or "positive" (> 0.5); sentences in between are dropped because the raters'
mean is too close to neutral to be a reliable label for a two-way task.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Sequence

from chatforge import files
from chatforge.errors import ChatforgeError

VADER_NEGATIVE, VADER_POSITIVE = -0.5, 0.5


def read_labelled_jsonl(path: str | Path, label_field: str = "label",
                        text_field: str = "text") -> tuple[list[str], list[str]]:
    """(texts, labels) from `{"text", "label"}` lines; a bad line is an error naming file:line."""
    texts, labels = [], []
    hint = f"pass --data FILE.jsonl with {{\"text\", \"{label_field}\"}} lines"
    for lineno, rec in files.iter_jsonl(path, hint):
        if not isinstance(rec, dict) or not isinstance(rec.get(text_field), str) or rec.get(label_field) is None:
            raise ChatforgeError(f"{path}:{lineno}: expected {{\"{text_field}\": a string, "
                                 f"\"{label_field}\": a label}} (see --label-field)")
        texts.append(rec[text_field])
        labels.append(str(rec[label_field]))
    if len(set(labels)) < 2:
        raise ChatforgeError(f"{path}: a classifier needs at least two different labels, found {sorted(set(labels))}")
    return texts, labels


def vader_label(score: float, negative: float = VADER_NEGATIVE, positive: float = VADER_POSITIVE) -> str | None:
    """Human mean rating (-4..4) -> "negative" / "positive", or None for the ambiguous middle."""
    if score < negative:
        return "negative"
    if score > positive:
        return "positive"
    return None


def read_vader(path: str | Path) -> tuple[list[str], list[str]]:
    """(texts, labels) from the fetched vader `sentiment.jsonl` (`{"text", "score"}` lines)."""
    texts, labels = [], []
    for lineno, rec in files.iter_jsonl(path, "run `chatforge data fetch --sources vader` first"):
        try:
            label = vader_label(float(rec["score"]))
            text = rec["text"]
        except (KeyError, TypeError, ValueError):
            raise ChatforgeError(f"{path}:{lineno}: expected {{\"text\", \"score\"}}") from None
        if label is not None and isinstance(text, str) and text.strip():
            texts.append(text)
            labels.append(label)
    return texts, labels


def default_vader_path() -> Path:
    """CACHE/sources/vader/sentiment.jsonl, where `chatforge data fetch --sources vader` puts it."""
    return files.cache_dir("sources", "vader", "sentiment.jsonl")


def read_texts(path: str | Path) -> list[str]:
    """The texts of a file to classify: JSONL with `{"text"}` lines (.jsonl), else one text a line."""
    path = Path(path)
    if not path.is_file():
        raise ChatforgeError(f"{path} does not exist")
    texts = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    rec = json.loads(line)
                    texts.append(rec["text"] if isinstance(rec["text"], str) else str(rec["text"]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ChatforgeError(f'{path}:{lineno}: expected a JSON object with "text"') from None
            else:
                texts.append(line.rstrip("\n"))
    return texts


def stratified_split(labels: Sequence[str], fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """(train, held-out) indices; each label keeps its share in the held-out part (at least one)."""
    rng = random.Random(seed)
    by_label: dict[str, list[int]] = {}
    for i, y in enumerate(labels):
        by_label.setdefault(y, []).append(i)
    train, held = [], []
    for y in sorted(by_label):
        idx = by_label[y]
        rng.shuffle(idx)
        k = max(1, round(len(idx) * fraction)) if len(idx) > 1 else 0
        held += idx[:k]
        train += idx[k:]
    return sorted(train), sorted(held)


def subsample(texts: list[str], labels: list[str], n: int, seed: int) -> tuple[list[str], list[str]]:
    """At most `n` (texts, labels) pairs, a seeded sample in their order (0 = all)."""
    if not n or n >= len(texts):
        return texts, labels
    keep = sorted(random.Random(seed).sample(range(len(texts)), n))
    return [texts[i] for i in keep], [labels[i] for i in keep]
