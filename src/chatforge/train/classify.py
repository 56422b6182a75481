"""`chatforge classify train|predict`: a text classifier on a pretrained GPT backbone.

    chatforge classify train --base runs/demo/pretrain --data labelled.jsonl --out runs/demo/classify
    chatforge classify train --base runs/demo/pretrain --from-vader --out runs/demo/sentiment
    chatforge classify predict --model runs/demo/classify --text "the update broke my printer"

Input: JSONL lines `{"text": ..., "label": ...}` (labels are strings; `--label-field` picks
another key). A stratified held-out split (`--holdout`) is kept aside for the report.

Model: one layer's hidden states (`--layer`: 0 = the final output, L = the output of block L;
the blocks above it are never run), pooled over the text (`--pooling last`, the default: the last
token, the only one that has seen the whole text; or `mean`), feed a `ClassifierHead`
(model/heads.py). Texts are right-padded with the tokenizer's pad id (eos for pretrained ones
that have no pad token); pooling reads the attention mask, never the ids.
- `--method frozen`: the backbone stays fixed, so its features are computed once (a bf16 copy
  where the CPU has bf16) and cached in CACHE/features, per model weights, layer, pooling and
  text; later runs on the same base train only the head, in seconds.
- `--method lora`: LoRA adapters in the blocks that run (`--lora-layers N`: the top N only; the
  backward pass stops below them), batches of texts of similar length; merged when saved.
Either way the shared loop (`train/loop.py`) runs the optimisation. `--max-train N` trains on a
sample of the training split and keeps the held-out set of the full data, so runs of any size
compare with each other and with the baselines.

Measured on SmolLM2-135M-Instruct (30 blocks, imported from its GGUF) with `--from-vader`, held-out
3,827 sentences, on the shared 2-core CPU (seconds are wall time with the other jobs running):
frozen, last token of block 18, all 13,778 training sentences: accuracy 0.865 / macro-F1 0.864
(the final layer's mean, the old default, 0.80 with 4,000 sentences; with 4,000 the features of
the 8,264 texts took 141 s with `--threads 1`, a run on cached features 16 s); LoRA in blocks
11-18, 8,000 sentences, one epoch: 0.896 / 0.895 in 8.2 minutes; bag of words 0.792 / 0.792.

Report (printed and in `OUT/metrics.json`): accuracy and macro-F1 on the held-out split, next to
two baselines trained on the whole training split: the majority class, and a logistic regression
on word counts (`bow_logreg`, written here in torch; no sklearn), plus `bow_logreg_same_sample`
when `--max-train` sampled it; the validation scores (for choosing settings without looking at
the held-out set) and the seconds spent on features, training and evaluation.

Output folder: a model folder (`load_model` works: the backbone, LoRA merged) plus
`head.safetensors` and `classifier.json` (labels, layer, pooling, max length, metrics).

Real data: `--from-vader` reads `sentiment.jsonl` written by `chatforge data fetch --sources vader`
(`{"text", "score"}`: ~24k sentences - tweets, movie and product reviews, news - each rated by
10 people from -4 to +4, averaged). `vader_label` maps a score to "negative" (< -0.5) or
"positive" (> 0.5); sentences in between are dropped because the raters' mean is too close to
neutral to be a reliable label for a two-way task.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Iterator, Sequence

from chatforge import files
from chatforge.commands import add_parser, leaf, option_defaults, subcommands
from chatforge.errors import ChatforgeError
# The classifier itself (model, loading, prediction) is model code: the server's intent router
# loads it without the training code (model/classifier.py).
from chatforge.model.classifier import (CLASSIFIER_CONFIG, HEAD_WEIGHTS, TextClassifier, encode_texts,  # noqa: F401
                                        length_order, load_classifier, load_head, predict, predict_logits)

METRICS = "metrics.json"
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
    return files.cache_dir("sources", "vader", "sentiment.jsonl")


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


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread, then restore the caller's setting. For small ops (the baseline's
    L-BFGS, a head on cached features) the second thread's OpenMP hand-offs cost more than they
    save, and on a busy machine far more: measured with the vader baseline, 2.0 s on one thread
    against 19-29 s on two while other jobs ran (identical results)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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

    with one_thread():
        opt.step(closure)
        with torch.no_grad():
            return (torch.sparse.mm(featurize(test_texts), w) + b).argmax(-1).tolist()


# ---------------------------------------------------------------------------------------------
# Model


def pooled_features(backbone, ids, mask, specs: Sequence[tuple[int, str]], batch_size: int = 64,
                    precision: str = "fp32") -> dict:
    """{(layer, pooling): (N, C) float32 features} of every row, from one pass of the frozen backbone.

    Rows go longest first so that each batch is cut to its longest text. With `precision`
    "bf16" the pass runs on a bf16 copy of the weights: measured on this CPU (AVX512-BF16) ~1.5-2x
    the fp32 speed, and faster than autocast, which re-casts every weight at every call.
    """
    import copy

    import torch
    from tqdm import tqdm

    from chatforge.model.heads import layer_states, pool

    model = backbone
    if precision == "bf16":
        model = copy.deepcopy(backbone).to(torch.bfloat16)
    model.eval()
    device = next(model.parameters()).device
    lengths = mask.sum(1)
    layers = sorted({layer for layer, _ in specs})
    out = {spec: torch.zeros(len(ids), backbone.config.d_model) for spec in specs}
    quiet = os.environ.get("CHATFORGE_QUIET") == "1"
    with torch.no_grad(), tqdm(total=len(ids), desc="features", unit="text", file=sys.stderr,
                               disable=True if quiet else None) as bar:
        for rows in length_order(mask).split(batch_size):
            T = int(lengths[rows].max())
            states = layer_states(model, ids[rows, :T].to(device), layers)
            for layer, how in specs:
                out[(layer, how)][rows] = pool(states[layer], mask[rows, :T].to(device), how).float().cpu()
            bar.update(len(rows))
    return out


# ---------------------------------------------------------------------------------------------
# The feature cache: a frozen backbone gives a text the same features every time


FEATURE_CACHE_VERSION = 1


def model_fingerprint(folder: str | Path) -> str:
    """A hash of a model folder's config and weights: features cached under it belong to exactly
    these weights (a re-imported or retrained model gets new ones; a copied folder keeps them)."""
    import hashlib

    from chatforge.model.folder import CONFIG, WEIGHTS

    h = hashlib.sha256(f"chatforge-features-{FEATURE_CACHE_VERSION}".encode())
    for name in (CONFIG, WEIGHTS):
        with open(Path(folder) / name, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()[:20]


def row_keys(ids, mask):
    """(N,) int64: a 64-bit hash of each row's real token ids (the text as the model sees it,
    cut to max_len), the key of its features in the cache."""
    import hashlib

    import torch

    keys = []
    for row, n in zip(ids.tolist(), mask.sum(1).tolist()):
        digest = hashlib.blake2b(json.dumps(row[:n]).encode(), digest_size=8).digest()
        keys.append(int.from_bytes(digest, "little", signed=True))
    return torch.tensor(keys, dtype=torch.long)


FEATURE_CHUNK = 1024  # texts computed between two writes: an interrupted run keeps what it computed


def cached_features(backbone, ids, mask, specs: Sequence[tuple[int, str]], cache_dir: str | Path | None,
                    fingerprint: str, precision: str = "fp32", batch_size: int = 64) -> dict:
    """`pooled_features`, reusing those cached in `cache_dir` (None = no cache) and adding the new ones.

    Each (model, precision, layer, pooling) has a folder `CACHE_DIR/FINGERPRINT/PRECISION-layerL-POOLING/`
    of safetensors files, each holding `keys` (n,) and `features` (n, C) for up to FEATURE_CHUNK
    texts. A row is found by its `row_keys` hash, so a run on another subset of the texts
    computes only those it has not seen; files are only ever added (atomically), so an
    interrupted run keeps every finished chunk; an unreadable file is skipped.
    """
    import hashlib

    import torch
    from safetensors.torch import save

    if cache_dir is None:
        return pooled_features(backbone, ids, mask, specs, batch_size, precision)
    keys = row_keys(ids, mask).tolist()
    width = backbone.config.d_model
    folders = {spec: Path(cache_dir) / fingerprint / f"{precision}-layer{spec[0]}-{spec[1]}" for spec in specs}
    stored = {spec: _read_feature_cache(folder, width) for spec, folder in folders.items()}
    # A text is computed when any spec lacks it (then for all specs: one pass gives them all).
    missing = sorted({k for where, _ in stored.values() for k in keys if k not in where})
    if missing:
        print(f"classify: computing features of {len(missing)} texts with the frozen backbone "
              f"({len(set(keys)) - len(missing)} cached) ...", flush=True)
        first_row = {}
        for i, k in enumerate(keys):
            first_row.setdefault(k, i)
        for start in range(0, len(missing), FEATURE_CHUNK):
            chunk = missing[start:start + FEATURE_CHUNK]
            rows = torch.tensor([first_row[k] for k in chunk])
            new = pooled_features(backbone, ids[rows], mask[rows], specs, batch_size, precision)
            name = hashlib.blake2b(json.dumps(chunk).encode(), digest_size=10).hexdigest() + ".safetensors"
            for spec, folder in folders.items():
                folder.mkdir(parents=True, exist_ok=True)
                tensors = {"keys": torch.tensor(chunk, dtype=torch.long), "features": new[spec].contiguous()}
                files.write_bytes(folder / name, save(tensors, metadata={"format": "pt"}))
                where, parts = stored[spec]
                size = sum(len(p) for p in parts)
                where.update({k: size + j for j, k in enumerate(chunk)})
                parts.append(new[spec])
    out = {}
    for spec, (where, parts) in stored.items():
        rows = torch.tensor([where[k] for k in keys], dtype=torch.long)
        out[spec] = torch.cat(parts or [torch.zeros(0, width)]).float()[rows]
    return out


def _read_feature_cache(folder: Path, width: int) -> tuple[dict[int, int], list]:
    """({key: row of the parts put end to end}, [features of each file]) from a feature cache
    folder (see `cached_features`); empty if there is none; unreadable or misshapen files are skipped."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    where: dict[int, int] = {}
    parts: list = []
    size = 0
    for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        try:
            tensors = load_file(str(path))
            keys, feats = tensors["keys"].tolist(), tensors["features"]
        except (SafetensorError, OSError, KeyError, ValueError):
            continue
        if feats.shape != (len(keys), width):
            continue
        where.update({k: size + j for j, k in enumerate(keys)})
        parts.append(feats)
        size += len(keys)
    return where, parts


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


# ---------------------------------------------------------------------------------------------
# Saving and loading


def _save_head(folder: Path, head_state: dict) -> None:
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in head_state.items()}
    files.write_bytes(folder / HEAD_WEIGHTS, save(tensors, metadata={"format": "pt"}))


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


def cap_training(fit_idx: list[int], val_idx: list[int], max_train: int, val_fraction: float,
                 seed: int) -> tuple[list[int], list[int]]:
    """At most `max_train` training examples (0 = all) and validation examples in the same
    proportion as before, seeded. Applied after the held-out split, so that the held-out set
    stays the one the baselines and any full run are measured on."""
    import random

    if not max_train or max_train >= len(fit_idx):
        return fit_idx, val_idx
    rng = random.Random(seed)
    n_val = max(1, round(max_train * val_fraction / (1 - val_fraction)))
    return sorted(rng.sample(fit_idx, max_train)), sorted(rng.sample(val_idx, min(n_val, len(val_idx))))


def length_groups(lengths: Sequence[int], batch_size: int, seed: int = 0) -> list[list[int]]:
    """Positions 0..n-1 in batches of `batch_size` texts of similar length (sorted by length, ties
    in a seeded random order, then cut), so that a batch cut to its longest text pads little.
    On the vader sentences (SmolLM2 tokenizer, batch 16) random batches hold 1.97x the real
    tokens, these 1.002x. The training loop's source shuffles the batches each epoch."""
    import random

    tiebreak = list(range(len(lengths)))
    random.Random(seed).shuffle(tiebreak)
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], tiebreak[i]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def lora_layer_targets(backbone, targets: Sequence[str], layer: int, top: int = 0) -> list[str]:
    """The LoRA targets (module-name suffixes) as the names of the layers to wrap: only in the
    blocks a classifier reading `layer` runs (adapters above it would never see a gradient), and
    with `top` > 0 only in the top `top` of those. Backpropagation then stops at the lowest
    adapted block, so fewer adapted blocks train faster."""
    import torch.nn as nn

    n_run = layer or len(backbone.layers)
    low = max(0, n_run - top) if top else 0
    if low == 0 and n_run == len(backbone.layers):
        return list(targets)
    blocks = tuple(f"layers.{i}." for i in range(low, n_run))
    chosen = [name for name, m in backbone.named_modules()
              if isinstance(m, nn.Linear) and name.startswith(blocks)
              and any(name == t or name.endswith("." + t) for t in targets)]
    return chosen or list(targets)  # none: let apply_lora say what the layers are called


def feature_cache_dir(option: str) -> Path | None:
    """--feature-cache: "" = CACHE/features, "off" = no cache, else the folder given."""
    if option == "off":
        return None
    if option:
        return Path(option)
    return files.cache_dir("features")


def train_classifier(base: str | Path, texts: Sequence[str], labels: Sequence[str], out: str | Path,
                     **options) -> dict:
    """Train a classifier on `base` and evaluate it on a held-out split; returns the report."""
    import random
    import time

    import torch

    from chatforge.data.chat_data import ShuffledBatches
    from chatforge.model.heads import POOLINGS
    from chatforge.model.lora import apply_lora
    from chatforge.model.folder import load_model
    from chatforge import runtime
    from chatforge.train.loop import train
    from chatforge.train.sft import loop_config

    started = time.time()
    o = {**default_train_options(), **options}
    out = Path(out)
    if o["method"] not in ("frozen", "lora"):
        raise ChatforgeError(f"--method must be frozen or lora, got {o['method']!r}")
    if o["pooling"] not in POOLINGS:
        raise ChatforgeError(f"--pooling must be one of {', '.join(POOLINGS)}, got {o['pooling']!r}")
    if not 0 < o["holdout"] < 1:
        raise ChatforgeError(f"--holdout must be in (0, 1), got {o['holdout']}")
    if o["max_train"] < 0 or o["lora_layers"] < 0:
        raise ChatforgeError("--max-train and --lora-layers must be 0 (all) or positive")
    names = sorted(set(labels))
    y = [names.index(v) for v in labels]
    train_idx, test_idx = stratified_split(labels, o["holdout"], o["seed"])
    fit_idx, val_idx = stratified_split([labels[i] for i in train_idx], o["val_fraction"], o["seed"] + 1)
    fit_idx, val_idx = [train_idx[i] for i in fit_idx], [train_idx[i] for i in val_idx]
    fit_idx, val_idx = cap_training(fit_idx, val_idx, o["max_train"], o["val_fraction"], o["seed"] + 2)
    if not fit_idx or not val_idx or not test_idx:
        raise ChatforgeError(f"{len(texts)} examples are too few to split into train, validation and held-out parts")

    backbone, tok = load_model(base)
    n_layer = backbone.config.n_layer
    if not 0 <= o["layer"] < n_layer:
        raise ChatforgeError(f"--layer must be 0 (the final output) or a block number 1..{n_layer - 1} "
                             f"of this {n_layer}-layer model, got {o['layer']}")
    device = runtime.pick_device(o["device"])
    precision = runtime.resolve_precision(o["precision"], device)
    ids, mask = encode_texts(tok, texts, o["max_len"])
    target = torch.tensor(y)
    spec = (o["layer"], o["pooling"])
    cache_dir = feature_cache_dir(o["feature_cache"])
    fingerprint = model_fingerprint(base) if cache_dir else ""

    def frozen_features(rows: list[int]):
        """The base backbone's pooled features of these rows (cached across runs)."""
        index = torch.tensor(rows)
        return cached_features(backbone.to(device), ids[index], mask[index], [spec], cache_dir, fingerprint,
                               precision, o["batch_size"])[spec]

    torch.manual_seed(o["seed"])
    model = TextClassifier(backbone, len(names), o["pooling"], o["head_dropout"], o["layer"])
    feature_start = time.time()
    if o["method"] == "frozen":
        used = sorted(set(fit_idx) | set(val_idx) | set(test_idx))
        feats = torch.zeros(len(texts), backbone.config.d_model)
        feats[used] = frozen_features(used)
        model.head.set_feature_stats(feats[fit_idx])
        data = {"features": feats, "labels": target}
        trained = model.head
    else:
        # Standardise with the base model's features of (up to 2000) training texts.
        sample = sorted(random.Random(o["seed"]).sample(fit_idx, min(2000, len(fit_idx))))
        model.head.set_feature_stats(frozen_features(sample))
        targets = [t.strip() for t in str(o["lora_targets"]).split(",") if t.strip()]
        apply_lora(backbone, o["lora_rank"], o["lora_alpha"], o["lora_dropout"],
                   lora_layer_targets(backbone, targets, o["layer"], o["lora_layers"]))
        data = {"input_ids": ids, "mask": mask, "labels": target}
        trained = model
    feature_seconds = time.time() - feature_start

    def rows(index) -> dict:
        batch = {k: v[index] for k, v in data.items()}
        if "mask" in batch:  # cut the batch to its longest text
            T = int(batch["mask"].sum(1).max())
            batch["input_ids"], batch["mask"] = batch["input_ids"][:, :T], batch["mask"][:, :T]
        return batch

    fit, val = torch.tensor(fit_idx), torch.tensor(val_idx)
    if o["method"] == "frozen":  # fixed-size feature vectors: plain shuffled batches
        source = ShuffledBatches(len(fit), o["batch_size"], lambda i: rows(fit[i]), seed=o["seed"])
        val_batches = [rows(b) for b in val.split(o["batch_size"])]
    else:  # token rows: batches of similar lengths, shuffled as wholes
        lengths = mask.sum(1)
        groups = length_groups(lengths[fit].tolist(), o["batch_size"], o["seed"])
        source = ShuffledBatches(len(groups), 1, lambda i: rows(fit[groups[int(i[0])]]), seed=o["seed"])
        val_batches = [rows(val[g]) for g in length_groups(lengths[val].tolist(), o["batch_size"])]
    steps = o["steps"] or max(1, math.ceil(o["epochs"] * source.batches_per_epoch))
    lr = o["lr"] if o["lr"] is not None else (1e-2 if o["method"] == "frozen" else 1e-3)
    # `--compile auto` stays eager here: the frozen head is one small matrix, and LoRA batches
    # change length from batch to batch (each new shape would compile again).
    loop_options = {**o, "compile": "off" if o["compile"] == "auto" else o["compile"]}
    cfg = loop_config(loop_options, steps, o["max_len"], lr, o["eval_every"] or min(steps, source.batches_per_epoch))
    meta = {"labels": names, "pooling": o["pooling"], "layer": o["layer"], "max_len": o["max_len"],
            "method": o["method"], "head_dropout": o["head_dropout"], "base": str(base), "_backbone": backbone}
    print(f"classify ({o['method']}, layer {o['layer'] or 'final'}, {o['pooling']} pooling): {len(names)} labels, "
          f"{len(fit_idx)} train / {len(val_idx)} val / {len(test_idx)} held-out examples, {steps} steps at lr {lr:g}")
    out.mkdir(parents=True, exist_ok=True)
    with one_thread() if o["method"] == "frozen" else contextlib.nullcontext():
        result = train(trained, source, classify_loss, cfg, out, val_batches=val_batches, tokenizer=tok,
                       resume=o["resume"], save_fn=_save_fn(o["method"], out, tok, meta))

    # Validation and held-out evaluation of the best checkpoint, the latter next to the baselines.
    eval_start = time.time()
    if o["method"] == "frozen":  # the backbone is the base one: only the best head is needed
        best = model.head.cpu()
        load_head(out, best)
    else:
        best, _, _ = load_classifier(out)

    def predicted(rows: list[int]) -> list[int]:
        index = torch.tensor(rows)
        if o["method"] == "frozen":
            with one_thread():
                return predict_logits(best, {"features": feats[index]}).argmax(-1).tolist()
        return predict_logits(best.to(device), {"input_ids": ids[index].to(device), "mask": mask[index].to(device)},
                              o["batch_size"], precision).argmax(-1).tolist()

    def scores(pred: list[int], rows: list[int]) -> dict:
        gold = [y[i] for i in rows]
        return {"accuracy": round(accuracy(pred, gold), 4), "macro_f1": round(macro_f1(pred, gold, len(names)), 4)}

    test_texts = [texts[i] for i in test_idx]
    preds = {"model": predicted(test_idx),
             "majority": majority_baseline([y[i] for i in train_idx], len(test_idx)),
             "bow_logreg": bow_logreg([texts[i] for i in train_idx], [y[i] for i in train_idx], test_texts, len(names))}
    if len(fit_idx) + len(val_idx) < len(train_idx):
        # The model saw a sample of the training split: the baseline on that same sample, too.
        seen = fit_idx + val_idx
        preds["bow_logreg_same_sample"] = bow_logreg([texts[i] for i in seen], [y[i] for i in seen], test_texts,
                                                     len(names))
    metrics = {name: scores(p, test_idx) for name, p in preds.items()}
    validation = scores(predicted(val_idx), val_idx)
    eval_seconds = time.time() - eval_start
    report = {"base": str(base), "method": o["method"], "layer": o["layer"], "pooling": o["pooling"],
              "precision": precision, "labels": names, "counts": {n: labels.count(n) for n in names},
              "split": {"train": len(fit_idx), "val": len(val_idx), "held_out": len(test_idx)},
              "steps": result.step, "best_val_loss": result.best_val_loss, "validation": validation,
              "seconds": {"features": round(feature_seconds, 1), "train": round(result.seconds, 1),
                          "evaluation": round(eval_seconds, 1), "total": round(time.time() - started, 1)},
              "held_out": metrics, "interrupted": result.interrupted}
    meta["metrics"] = metrics
    files.write_json(out / CLASSIFIER_CONFIG, {k: v for k, v in meta.items() if not k.startswith("_")})
    files.write_json(out / METRICS, report)
    print(f"validation ({len(val_idx)} examples): accuracy {validation['accuracy']:.4f}, "
          f"macro-F1 {validation['macro_f1']:.4f}")
    print(format_metrics(metrics, len(test_idx)))
    print("seconds: " + ", ".join(f"{k} {v}" for k, v in report["seconds"].items()))
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
    from chatforge.train.sft import _set_default, add_lora_options

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
    p.add_argument("--pooling", default="last", choices=["mean", "last"],
                   help="how token features become one vector: the last token's (the one that has seen "
                        "the whole text) or the mean of all")
    p.add_argument("--layer", type=int, default=0,
                   help="whose hidden states to pool: 0 = the final output, L = the output of block L "
                        "(a middle layer; the blocks above it are not run)")
    p.add_argument("--max-len", type=int, default=128, help="tokens kept per text (the rest is cut)")
    p.add_argument("--max-examples", type=int, default=0,
                   help="use at most this many examples, seeded, before splitting (0 = all; changes the held-out set)")
    p.add_argument("--max-train", type=int, default=0,
                   help="train on at most this many examples (validation shrinks in proportion), seeded, after "
                        "the held-out split: the held-out set stays that of the full data (0 = all)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0 = torch's default, one a core); on a machine busy with other "
                        "jobs 1 can be several times faster (measured: LoRA steps ~8x)")
    p.add_argument("--feature-cache", default="",
                   help="folder of cached frozen-backbone features (default CACHE/features; off = no cache)")
    p.add_argument("--holdout", type=float, default=0.2, help="fraction held out for the final report")
    p.add_argument("--val-fraction", type=float, default=0.1, help="fraction of the rest used for validation")
    p.add_argument("--epochs", type=float, default=10.0, help="passes over the training split (ignored with --steps)")
    p.add_argument("--head-dropout", type=float, default=0.1, help="dropout before the classifier head")
    add_lora_options(p, dropout=0.05)
    add_loop_options(p, lr=None)
    _set_default(p, "steps", None, "optimizer steps (overrides --epochs)")
    _set_default(p, "lr", None, "peak learning rate (default: 1e-2 frozen, 1e-3 lora)")
    _set_default(p, "batch_size", 64, "examples per batch")
    _set_default(p, "tokens_per_step", 0, "tokens per optimizer step (0 = one batch a step)")
    _set_default(p, "eval_every", 0, "steps between validations (0 = once an epoch)")
    _set_default(p, "compile", "auto", "torch.compile: auto = off here (the head is one small matrix; LoRA "
                                        "batches change length, and each new shape would compile again)")


def default_train_options() -> dict:
    return option_defaults(add_train_options)


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
    skip = ("base", "data", "out", "from_vader", "label_field", "text_field", "max_examples", "threads")
    known = default_train_options()    # built once, not once per option
    options = {k: v for k, v in vars(args).items() if k in known and k not in skip}
    if args.threads < 0:
        raise ChatforgeError(f"--threads must be 0 (torch's default) or positive, got {args.threads}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
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
