"""`chatforge classify train|predict`: a text classifier on a pretrained GPT backbone.

    chatforge classify train --base runs/demo/pretrain --data labelled.jsonl --out runs/demo/classify
    chatforge classify train --base runs/demo/pretrain --from-vader --out runs/demo/sentiment
    chatforge classify predict --model runs/demo/classify --text "the update broke my printer"

Input: JSONL lines `{"text": ..., "label": ...}` (labels are strings; `--label-field` picks
another key). A stratified held-out split (`--holdout`) is kept aside for the report.

Model: the backbone's final hidden states, mean-pooled over the text's tokens (or the last
token's, `--pooling last`), feed a `ClassifierHead` (model/heads.py). `--method frozen` keeps the
backbone fixed: its features are computed once and only the head trains, which is fast on a
CPU. `--method lora` also trains LoRA adapters in the backbone (slower; merged when saved).
Either way the shared loop (`train/loop.py`) runs the optimisation.

Report (printed and in `OUT/metrics.json`): accuracy and macro-F1 on the held-out split, next to
two baselines trained on the same split: the majority class, and a logistic regression on word
counts (`bow_logreg`, written here in torch; no sklearn).

Output folder: a model folder (`load_model` works: the backbone, LoRA merged) plus
`head.safetensors` and `classifier.json` (labels, pooling, max length, metrics).

Real data: `--from-vader` reads `sentiment.jsonl` written by `chatforge data fetch --sources vader`
(`{"text", "score"}`: ~24k sentences - tweets, movie and product reviews, news - each rated by
10 people from -4 to +4, averaged). `vader_label` maps a score to "negative" (< -0.5) or
"positive" (> 0.5); sentences in between are dropped because the raters' mean is too close to
neutral to be a reliable label for a two-way task.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Sequence

from chatforge import files
from chatforge.cli import add_parser, leaf, subcommands
from chatforge.errors import ChatforgeError

HEAD_WEIGHTS, CLASSIFIER_CONFIG, METRICS = "head.safetensors", "classifier.json", "metrics.json"
VADER_NEGATIVE, VADER_POSITIVE = -0.5, 0.5


# ---------------------------------------------------------------------------------------------
# Data


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
    from chatforge.data.fetch import default_cache

    return default_cache() / "sources" / "vader" / "sentiment.jsonl"


def stratified_split(labels: Sequence[str], fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """(train, held-out) indices; each label keeps its share in the held-out part (at least one)."""
    import random

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


# ---------------------------------------------------------------------------------------------
# Metrics and baselines (pure functions over label ids)


def accuracy(pred: Sequence[int], gold: Sequence[int]) -> float:
    return sum(p == g for p, g in zip(pred, gold)) / max(1, len(gold))


def macro_f1(pred: Sequence[int], gold: Sequence[int], n_classes: int) -> float:
    """Mean over classes of F1 = 2TP / (2TP + FP + FN); a class absent from both counts as 0."""
    scores = []
    for c in range(n_classes):
        tp = sum(p == c and g == c for p, g in zip(pred, gold))
        fp = sum(p == c and g != c for p, g in zip(pred, gold))
        fn = sum(p != c and g == c for p, g in zip(pred, gold))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / n_classes


def majority_baseline(train_y: Sequence[int], n: int) -> list[int]:
    """Predict the most frequent training label for all `n` items."""
    return [Counter(train_y).most_common(1)[0][0]] * n


WORD = re.compile(r"[a-z0-9']+|[^\sa-z0-9]")


def words(text: str) -> list[str]:
    """Lower-cased words and single punctuation marks (`!` and `:(` carry sentiment)."""
    return WORD.findall(text.lower())


def bow_logreg(train_texts: Sequence[str], train_y: Sequence[int], test_texts: Sequence[str],
               n_classes: int, min_count: int = 2, l2: float = 1e-4, steps: int = 300) -> list[int]:
    """Multinomial logistic regression on log(1 + word counts), full-batch L-BFGS with L2.

    The classic strong baseline for short texts: if a transformer cannot beat it, its features
    are not worth their cost.
    """
    import torch
    import torch.nn.functional as F

    counts = Counter(w for t in train_texts for w in words(t))
    vocab = {w: i for i, w in enumerate(sorted(w for w, c in counts.items() if c >= min_count))}

    def featurize(texts: Sequence[str]) -> torch.Tensor:
        # Sparse (N, V): a dense matrix of 20k texts x 10k words would take gigabytes.
        rows, cols, vals = [], [], []
        for r, t in enumerate(texts):
            for w, c in Counter(words(t)).items():
                if w in vocab:
                    rows.append(r)
                    cols.append(vocab[w])
                    vals.append(math.log1p(c))
        return torch.sparse_coo_tensor([rows, cols], vals, (len(texts), len(vocab)), dtype=torch.float32,
                                       check_invariants=True).coalesce()

    x, y = featurize(train_texts), torch.tensor(list(train_y))
    w = torch.zeros(len(vocab), n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(torch.sparse.mm(x, w) + b, y) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (torch.sparse.mm(featurize(test_texts), w) + b).argmax(-1).tolist()


# ---------------------------------------------------------------------------------------------
# Model


def encode_texts(tokenizer, texts: Sequence[str], max_len: int):
    """(ids, mask), both (N, T) with T the longest kept text: right-padded, cut to `max_len` tokens."""
    import torch

    encoded = [ids[:max_len] or [tokenizer.eot_id] for ids in tokenizer.encode_batch(list(texts))]
    T = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), T), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), T), dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, :len(e)] = torch.tensor(e)
        mask[i, :len(e)] = 1
    return ids, mask


def _classifier_class():
    """`TextClassifier`, defined on first use so that `--help` does not import torch."""
    import torch.nn as nn

    from chatforge.model.heads import ClassifierHead, hidden_states, pool

    class TextClassifier(nn.Module):
        """A GPT backbone, pooled, then a `ClassifierHead`: (ids, mask) -> class logits."""

        def __init__(self, backbone: nn.Module, n_classes: int, pooling: str = "mean", dropout: float = 0.1):
            super().__init__()
            self.backbone, self.pooling = backbone, pooling
            self.head = ClassifierHead(backbone.config.d_model, n_classes, dropout)

        def features(self, input_ids, mask):
            return pool(hidden_states(self.backbone, input_ids), mask, self.pooling)

        def forward(self, input_ids, mask):
            return self.head(self.features(input_ids, mask))

    return TextClassifier


def backbone_features(backbone, ids, mask, pooling: str, batch_size: int = 64):
    """Pooled features of every row, computed once with the frozen backbone (rows sorted by length
    so that each batch is cut to its longest text and little time goes to padding)."""
    import torch

    from chatforge.model.heads import hidden_states, pool

    backbone.eval()
    lengths = mask.sum(1)
    order = torch.argsort(lengths, descending=True)
    out = torch.zeros(len(ids), backbone.config.d_model)
    with torch.no_grad():
        for start in range(0, len(ids), batch_size):
            rows = order[start:start + batch_size]
            T = int(lengths[rows].max())
            h = hidden_states(backbone, ids[rows, :T])
            out[rows] = pool(h, mask[rows, :T], pooling).float()
    return out


def classification_loss(logits, labels):
    """Mean cross-entropy over the batch's examples."""
    import torch.nn.functional as F

    return F.cross_entropy(logits.float(), labels)


def classify_loss(model, batch: dict):
    """The loop's loss: on precomputed features (frozen backbone) or on token ids (LoRA)."""
    if "features" in batch:
        logits = model(batch["features"])
    else:
        logits = model(batch["input_ids"], batch["mask"])
    return classification_loss(logits, batch["labels"]), batch["labels"].numel()


def predict_logits(model, data: dict, batch_size: int = 64):
    """Logits for every row of `data` (features, or input_ids + mask) with the model in eval mode."""
    import torch

    model.eval()
    with torch.no_grad():
        if "features" in data:
            return torch.cat([model(f) for f in data["features"].split(batch_size)])
        parts = []
        for ids, mask in zip(data["input_ids"].split(batch_size), data["mask"].split(batch_size)):
            T = int(mask.sum(1).max())
            parts.append(model(ids[:, :T], mask[:, :T]))
        return torch.cat(parts)


# ---------------------------------------------------------------------------------------------
# Saving and loading


def _save_head(folder: Path, head_state: dict) -> None:
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in head_state.items()}
    files.write_bytes(folder / HEAD_WEIGHTS, save(tensors, metadata={"format": "pt"}))


def load_classifier(folder: str | Path):
    """(TextClassifier in eval mode, tokenizer, classifier.json) from a folder `classify train` wrote."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from chatforge.model.folder import load_model

    folder = Path(folder)
    if not (folder / CLASSIFIER_CONFIG).is_file():
        raise ChatforgeError(f"{folder} is not a classifier folder ({CLASSIFIER_CONFIG} is missing); "
                             "train one with `chatforge classify train`")
    meta = files.read_json(folder / CLASSIFIER_CONFIG)
    backbone, tok = load_model(folder)
    model = _classifier_class()(backbone, len(meta["labels"]), meta["pooling"], meta.get("head_dropout", 0.1))
    try:
        model.head.load_state_dict(load_file(str(folder / HEAD_WEIGHTS)))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ChatforgeError(f"{folder / HEAD_WEIGHTS} is missing, corrupt or of another shape ({e})") from None
    return model.eval(), tok, meta


def predict(folder: str | Path, texts: Sequence[str], batch_size: int = 64) -> list[tuple[str, float]]:
    """(label, probability) for each text, with the classifier saved in `folder`."""
    import torch

    model, tok, meta = load_classifier(folder)
    if not texts:
        return []
    ids, mask = encode_texts(tok, texts, meta["max_len"])
    probs = torch.softmax(predict_logits(model, {"input_ids": ids, "mask": mask}, batch_size).float(), -1)
    best = probs.max(-1)
    return [(meta["labels"][int(i)], float(p)) for p, i in zip(best.values, best.indices)]


# ---------------------------------------------------------------------------------------------
# Training


def _save_fn(method: str, out: Path, tokenizer, meta: dict):
    """The loop's save function: at the top of `out` a classifier folder (backbone model folder,
    LoRA merged, + head + classifier.json); in `last/` the raw trained module, for --resume."""
    from chatforge.model.lora import merged_state_dict
    from chatforge.model import folder as model_folder

    backbone_saved = []  # the frozen backbone never changes: write it at the first save only

    def save(folder: Path, model, state: dict) -> None:
        if Path(folder).resolve() != out.resolve():
            # Clones: a tied embedding appears twice in the state and safetensors refuses shared memory.
            model_folder.save_weights(Path(folder) / model_folder.WEIGHTS, model, {k: v.clone() for k, v in state.items()})
            return
        if method == "frozen":
            _save_head(folder, state)
            if not backbone_saved:
                model_folder.save_model(folder, meta["_backbone"], tokenizer)
                backbone_saved.append(True)
        else:
            _save_head(folder, {k[5:]: v for k, v in state.items() if k.startswith("head.")})
            backbone_state = {k[9:]: v for k, v in state.items() if k.startswith("backbone.")}
            model_folder.save_model(folder, model.backbone, tokenizer,
                                  state=merged_state_dict(model.backbone, backbone_state))
        files.write_json(Path(folder) / CLASSIFIER_CONFIG, {k: v for k, v in meta.items() if not k.startswith("_")})
    return save


def train_classifier(base: str | Path, texts: Sequence[str], labels: Sequence[str], out: str | Path,
                     **options) -> dict:
    """Train a classifier on `base` and evaluate it on a held-out split; returns the report."""
    import torch

    from chatforge.data.chat_data import ShuffledBatches
    from chatforge.model.heads import POOLINGS
    from chatforge.model.lora import apply_lora
    from chatforge.model.folder import load_model
    from chatforge.train.loop import train
    from chatforge.train.sft import loop_config

    o = {**default_train_options(), **options}
    out = Path(out)
    if o["method"] not in ("frozen", "lora"):
        raise ChatforgeError(f"--method must be frozen or lora, got {o['method']!r}")
    if o["pooling"] not in POOLINGS:
        raise ChatforgeError(f"--pooling must be one of {', '.join(POOLINGS)}, got {o['pooling']!r}")
    if not 0 < o["holdout"] < 1:
        raise ChatforgeError(f"--holdout must be in (0, 1), got {o['holdout']}")
    names = sorted(set(labels))
    y = [names.index(v) for v in labels]
    train_idx, test_idx = stratified_split(labels, o["holdout"], o["seed"])
    fit_idx, val_idx = stratified_split([labels[i] for i in train_idx], o["val_fraction"], o["seed"] + 1)
    fit_idx, val_idx = [train_idx[i] for i in fit_idx], [train_idx[i] for i in val_idx]
    if not fit_idx or not val_idx or not test_idx:
        raise ChatforgeError(f"{len(texts)} examples are too few to split into train, validation and held-out parts")

    backbone, tok = load_model(base)
    ids, mask = encode_texts(tok, texts, o["max_len"])
    target = torch.tensor(y)
    torch.manual_seed(o["seed"])
    model = _classifier_class()(backbone, len(names), o["pooling"], o["head_dropout"])
    if o["method"] == "frozen":
        print(f"classify: computing features of {len(texts)} texts with the frozen backbone ...")
        feats = backbone_features(backbone, ids, mask, o["pooling"])
        model.head.set_feature_stats(feats[fit_idx])
        data = {"features": feats, "labels": target}
        trained = model.head
    else:
        # Standardise with the base model's features of (up to 2000) training texts.
        sample = torch.tensor(fit_idx[:2000])
        model.head.set_feature_stats(backbone_features(backbone, ids[sample], mask[sample], o["pooling"]))
        targets = [t.strip() for t in str(o["lora_targets"]).split(",") if t.strip()]
        apply_lora(backbone, o["lora_rank"], o["lora_alpha"], o["lora_dropout"], targets)
        data = {"input_ids": ids, "mask": mask, "labels": target}
        trained = model

    def rows(index) -> dict:
        batch = {k: v[index] for k, v in data.items()}
        if "mask" in batch:  # cut the batch to its longest text
            T = int(batch["mask"].sum(1).max())
            batch["input_ids"], batch["mask"] = batch["input_ids"][:, :T], batch["mask"][:, :T]
        return batch

    fit, val = torch.tensor(fit_idx), torch.tensor(val_idx)
    source = ShuffledBatches(len(fit), o["batch_size"], lambda i: rows(fit[i]), seed=o["seed"])
    val_batches = [rows(b) for b in val.split(o["batch_size"])]
    steps = o["steps"] or max(1, math.ceil(o["epochs"] * source.batches_per_epoch))
    lr = o["lr"] if o["lr"] is not None else (1e-2 if o["method"] == "frozen" else 1e-3)
    cfg = loop_config(o, steps, o["max_len"], lr, o["eval_every"] or min(steps, source.batches_per_epoch))
    meta = {"labels": names, "pooling": o["pooling"], "max_len": o["max_len"], "method": o["method"],
            "head_dropout": o["head_dropout"], "base": str(base), "_backbone": backbone}
    print(f"classify ({o['method']}): {len(names)} labels, {len(fit_idx)} train / {len(val_idx)} val / "
          f"{len(test_idx)} held-out examples, {steps} steps at lr {lr:g}")
    out.mkdir(parents=True, exist_ok=True)
    result = train(trained, source, classify_loss, cfg, out, val_batches=val_batches, tokenizer=tok,
                   resume=o["resume"], save_fn=_save_fn(o["method"], out, tok, meta))

    # Held-out evaluation of the best checkpoint, next to the two baselines.
    best, _, _ = load_classifier(out)
    test = torch.tensor(test_idx)
    if o["method"] == "frozen":
        logits = predict_logits(best.head, {"features": feats[test]})
    else:
        logits = predict_logits(best, {"input_ids": ids[test], "mask": mask[test]})
    gold = [y[i] for i in test_idx]
    preds = {"model": logits.argmax(-1).tolist(),
             "majority": majority_baseline([y[i] for i in train_idx], len(test_idx)),
             "bow_logreg": bow_logreg([texts[i] for i in train_idx], [y[i] for i in train_idx],
                                      [texts[i] for i in test_idx], len(names))}
    metrics = {name: {"accuracy": round(accuracy(p, gold), 4), "macro_f1": round(macro_f1(p, gold, len(names)), 4)}
               for name, p in preds.items()}
    report = {"base": str(base), "method": o["method"], "labels": names,
              "counts": {n: labels.count(n) for n in names},
              "split": {"train": len(fit_idx), "val": len(val_idx), "held_out": len(test_idx)},
              "steps": result.step, "best_val_loss": result.best_val_loss, "seconds": round(result.seconds, 1),
              "held_out": metrics, "interrupted": result.interrupted}
    meta["metrics"] = metrics
    files.write_json(out / CLASSIFIER_CONFIG, {k: v for k, v in meta.items() if not k.startswith("_")})
    files.write_json(out / METRICS, report)
    print(format_metrics(metrics, len(test_idx)))
    return report


def format_metrics(metrics: dict, n: int) -> str:
    lines = [f"held-out ({n} examples)   accuracy  macro-F1"]
    for name, m in metrics.items():
        lines.append(f"  {name:<22} {m['accuracy']:>8.4f}  {m['macro_f1']:>8.4f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The command


def add_train_options(p: argparse.ArgumentParser) -> None:
    from chatforge.train.pretrain import add_loop_options
    from chatforge.train.sft import DEFAULT_LORA_TARGETS, _set_default

    p.add_argument("--base", default=None, help="model folder whose backbone to use (e.g. runs/demo/pretrain)")
    p.add_argument("--data", default=None, help='JSONL file of {"text", "label"} lines')
    p.add_argument("--from-vader", nargs="?", const="default", default=None, metavar="FILE",
                   help="train on the vader human sentiment ratings instead of --data "
                        "(default file: CACHE/sources/vader/sentiment.jsonl from `chatforge data fetch`)")
    p.add_argument("--out", default=None, help="output folder (a model folder + head.safetensors + classifier.json)")
    p.add_argument("--method", default="frozen", choices=["frozen", "lora"],
                   help="frozen: train the head on fixed features; lora: also LoRA adapters in the backbone")
    p.add_argument("--label-field", default="label", help="the JSON key that holds the label")
    p.add_argument("--text-field", default="text", help="the JSON key that holds the text")
    p.add_argument("--pooling", default="mean", choices=["mean", "last"], help="how token features become one vector")
    p.add_argument("--max-len", type=int, default=128, help="tokens kept per text (the rest is cut)")
    p.add_argument("--max-examples", type=int, default=0, help="use at most this many examples, seeded (0 = all)")
    p.add_argument("--holdout", type=float, default=0.2, help="fraction held out for the final report")
    p.add_argument("--val-fraction", type=float, default=0.1, help="fraction of the rest used for validation")
    p.add_argument("--epochs", type=float, default=10.0, help="passes over the training split (ignored with --steps)")
    p.add_argument("--head-dropout", type=float, default=0.1, help="dropout before the classifier head")
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA: rank")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA: scale numerator")
    p.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA: dropout on the adapters' input")
    p.add_argument("--lora-targets", default=DEFAULT_LORA_TARGETS, help="LoRA: comma-separated layer names")
    add_loop_options(p, lr=None)
    _set_default(p, "steps", None, "optimizer steps (overrides --epochs)")
    _set_default(p, "lr", None, "peak learning rate (default: 1e-2 frozen, 1e-3 lora)")
    _set_default(p, "batch_size", 64, "examples per batch")
    _set_default(p, "tokens_per_step", 0, "tokens per optimizer step (0 = one batch a step)")
    _set_default(p, "eval_every", 0, "steps between validations (0 = once an epoch)")


def default_train_options() -> dict:
    p = argparse.ArgumentParser(add_help=False)
    add_train_options(p)
    return vars(p.parse_args([]))


def configure(parser: argparse.ArgumentParser) -> None:
    sub = subcommands(parser)
    p = add_parser(sub, "train", "train a classifier head (optionally LoRA) on a model's backbone",
                   "chatforge classify train --base runs/demo/pretrain --from-vader --out runs/demo/sentiment")
    add_train_options(p)
    leaf(p, run_train)
    p = add_parser(sub, "predict", "print the label and probability of texts",
                   'chatforge classify predict --model runs/demo/sentiment --text "I love it"')
    p.add_argument("--model", default=None, help="classifier folder written by `classify train`")
    p.add_argument("--text", action="append", default=None, help="a text to classify (repeatable)")
    p.add_argument("--input", default=None, help='file of texts: JSONL with {"text"} lines, or one text a line')
    leaf(p, run_predict)


def _subsample(texts: list[str], labels: list[str], n: int, seed: int) -> tuple[list[str], list[str]]:
    import random

    if not n or n >= len(texts):
        return texts, labels
    keep = sorted(random.Random(seed).sample(range(len(texts)), n))
    return [texts[i] for i in keep], [labels[i] for i in keep]


def run_train(args: argparse.Namespace) -> int:
    if not args.base:
        raise ChatforgeError("pass --base DIR: a model folder (e.g. the output of `chatforge pretrain`)")
    if not Path(args.base).is_dir():
        raise ChatforgeError(f"model folder {args.base} does not exist; run `chatforge pretrain` first")
    if args.from_vader:
        texts, labels = read_vader(default_vader_path() if args.from_vader == "default" else args.from_vader)
    elif args.data:
        texts, labels = read_labelled_jsonl(args.data, args.label_field, args.text_field)
    else:
        raise ChatforgeError("pass --data FILE.jsonl (or --from-vader)")
    texts, labels = _subsample(texts, labels, args.max_examples, args.seed)
    out = Path(args.out) if args.out else Path(args.base).parent / "classify"
    skip = ("base", "data", "out", "from_vader", "label_field", "text_field", "max_examples")
    options = {k: v for k, v in vars(args).items() if k in default_train_options() and k not in skip}
    report = train_classifier(args.base, texts, labels, out, **options)
    print(f"classifier -> {out}")
    return 130 if report["interrupted"] else 0


def _read_inputs(path: Path) -> list[str]:
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


def run_predict(args: argparse.Namespace) -> int:
    if not args.model:
        raise ChatforgeError("pass --model DIR: a folder written by `chatforge classify train`")
    texts = list(args.text or [])
    if args.input:
        texts += _read_inputs(Path(args.input))
    if not texts:
        raise ChatforgeError("pass --text TEXT or --input FILE")
    for text, (label, prob) in zip(texts, predict(args.model, texts)):
        print(f"{label}\t{prob:.3f}\t{text}")
    return 0
