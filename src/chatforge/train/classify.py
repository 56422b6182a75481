"""`chatforge classify train|predict`: a text classifier on a pretrained GPT backbone (the training).

    chatforge classify train --base runs/demo/pretrain --data labelled.jsonl --out runs/demo/classify
    chatforge classify train --base runs/demo/pretrain --from-vader --out runs/demo/sentiment
    chatforge classify predict --model runs/demo/classify --text "the update broke my printer"

    run_classify(base, data="labelled.jsonl", out="runs/demo/classify", method="lora")   # Python
    train_classifier(base, texts, labels, out, ClassifyConfig(layer=18))                 # texts in hand

Input: JSONL lines `{"text": ..., "label": ...}` (labels are strings; `--label-field` picks
another key), or the vader sentiment ratings (`--from-vader`); `data/labelled.py` reads both. A
stratified held-out split (`--holdout`) is kept aside for the report.

Model (`model/classifier.py`): one layer's hidden states (`--layer`: 0 = the final output, L = the
output of block L; the blocks above it are never run), pooled over the text (`--pooling last`, the
default: the last token, the only one that has seen the whole text; or `mean`), feed a
`ClassifierHead` (model/heads.py). Texts are right-padded with the tokenizer's pad id (eos for
pretrained ones that have no pad token); pooling reads the attention mask, never the ids.
- `--method frozen`: the backbone stays fixed, so its features are computed once (a bf16 copy
  where the CPU has bf16) and cached in CACHE/features, per model weights, layer, pooling and
  text (`model/features.py`); later runs on the same base train only the head, in seconds.
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
two baselines trained on the whole training split (`train/baselines.py`): the majority class, and
a logistic regression on word counts (`bow_logreg`), plus `bow_logreg_same_sample` when
`--max-train` sampled it; the validation scores (for choosing settings without looking at the
held-out set) and the seconds spent on features, training and evaluation.

Output folder: a model folder (`load_model` works: the backbone, LoRA merged) plus
`head.safetensors` and `classifier.json` (labels, layer, pooling, max length, metrics).
"""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from chatforge import files, runtime
from chatforge.data.chat_data import ShuffledBatches, length_groups
from chatforge.data.labelled import default_vader_path, read_labelled_jsonl, read_vader, stratified_split, subsample
from chatforge.errors import ChatforgeError
from chatforge.model.classifier import (
    CLASSIFIER_CONFIG,
    HEAD_WEIGHTS,
    TextClassifier,
    encode_texts,
    load_classifier,
    load_head,
    predict_logits,
)
from chatforge.model.features import FEATURE_SALT, cached_features, feature_cache_dir
from chatforge.model.folder import load_model, model_fingerprint
from chatforge.model.heads import POOLINGS
from chatforge.model.lora import LoraConfig
from chatforge.options import build, flatten, group, option
from chatforge.train import recipe
from chatforge.train.baselines import accuracy, bow_logreg, macro_f1, majority_baseline, one_thread
from chatforge.train.loop import LoopOptions, train

METHODS = ("frozen", "lora")
DEFAULT_LR = {"frozen": 1e-2, "lora": 1e-3}
METRICS = "metrics.json"


# ---------------------------------------------------------------------------------------------
# Options


@dataclass
class ClassifyLora(LoraConfig):
    """The classifier's adapters: a little dropout on their input."""
    dropout: float = option(0.05, "LoRA: dropout on the adapters' input")


@dataclass
class ClassifyConfig(LoopOptions):
    """`chatforge classify train`'s options besides the inputs (--base, --data / --from-vader, --out)."""
    method: str = option("frozen", "frozen: train the head on fixed features; lora: also LoRA adapters in the "
                                   "backbone", choices=METHODS)
    label_field: str = option("label", "the JSON key that holds the label")
    text_field: str = option("text", "the JSON key that holds the text")
    pooling: str = option("last", "how token features become one vector: the last token's (the one that has seen "
                                  "the whole text) or the mean of all", choices=POOLINGS)
    layer: int = option(0, "whose hidden states to pool: 0 = the final output, L = the output of block L (a middle "
                           "layer; the blocks above it are not run)")
    max_len: int = option(128, "tokens kept per text (the rest is cut)")
    max_examples: int = option(0, "use at most this many examples, seeded, before splitting (0 = all; changes the "
                                  "held-out set)")
    max_train: int = option(0, "train on at most this many examples (validation shrinks in proportion), seeded, "
                               "after the held-out split: the held-out set stays that of the full data (0 = all)")
    threads: int = option(0, "torch CPU threads (0 = torch's default, one a core); on a machine busy with other "
                             "jobs 1 can be several times faster (measured: LoRA steps ~8x)")
    feature_cache: str = option("", "folder of cached frozen-backbone features (default CACHE/features; off = no "
                                    "cache)")
    holdout: float = option(0.2, "fraction held out for the final report")
    val_fraction: float = option(0.1, "fraction of the rest used for validation")
    epochs: float = option(10.0, "passes over the training split (ignored with --steps)")
    head_dropout: float = option(0.1, "dropout before the classifier head")
    lora: LoraConfig = group(ClassifyLora, "lora")
    lr: float | None = option(None, "peak learning rate (default: 1e-2 frozen, 1e-3 lora)")
    batch_size: int = option(64, "examples per batch")
    tokens_per_step: int = option(0, "tokens per optimizer step (0 = one batch a step)")
    eval_every: int = option(0, "steps between validations (0 = once an epoch)")
    compile: str = option("auto", "torch.compile: auto = off here (the head is one small matrix; LoRA batches "
                                  "change length, and each new shape would compile again)",
                          choices=runtime.COMPILE_MODES)

    def __post_init__(self) -> None:
        if not 0 < self.holdout < 1:
            raise ChatforgeError(f"--holdout must be in (0, 1), got {self.holdout}")
        if not 0 <= self.val_fraction < 1:
            raise ChatforgeError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_train < 0 or self.max_examples < 0 or self.lora.layers < 0:
            raise ChatforgeError("--max-train, --max-examples and --lora-layers must be 0 (all) or positive")
        if self.threads < 0:
            raise ChatforgeError(f"--threads must be 0 (torch's default) or positive, got {self.threads}")


# ---------------------------------------------------------------------------------------------
# Pieces


def classification_loss(logits, labels):
    """Mean cross-entropy over the batch's examples."""
    return F.cross_entropy(logits.float(), labels)


def classify_loss(model, batch: dict):
    """The loop's loss: on precomputed features (frozen backbone) or on token ids (LoRA)."""
    if "features" in batch:
        logits = model(batch["features"])
    else:
        logits = model(batch["input_ids"], batch["mask"])
    return classification_loss(logits, batch["labels"]), batch["labels"].numel()


def cap_training(fit_idx: list[int], val_idx: list[int], max_train: int, val_fraction: float,
                 seed: int) -> tuple[list[int], list[int]]:
    """At most `max_train` training examples (0 = all) and validation examples in the same
    proportion as before, seeded. Applied after the held-out split, so that the held-out set
    stays the one the baselines and any full run are measured on."""
    if not max_train or max_train >= len(fit_idx):
        return fit_idx, val_idx
    rng = random.Random(seed)
    n_val = max(1, round(max_train * val_fraction / (1 - val_fraction)))
    return sorted(rng.sample(fit_idx, max_train)), sorted(rng.sample(val_idx, min(n_val, len(val_idx))))


# ---------------------------------------------------------------------------------------------
# The stage


def train_classifier(base: str | Path, texts: Sequence[str], labels: Sequence[str], out: str | Path,
                     config: ClassifyConfig | None = None, **options: Any) -> dict:
    """Train a classifier on `base` and evaluate it on a held-out split; returns the report (also
    `OUT/metrics.json`). `config` holds the options (default: `ClassifyConfig()`); `options`
    change some by their flat names (`method="lora"`, `layer=18`, `max_train=4000`, ...)."""
    started = time.time()
    o = build(ClassifyConfig, {**(flatten(config) if config else {}), **options}, "classify")
    out = Path(out)
    names = sorted(set(labels))
    y = [names.index(v) for v in labels]
    train_idx, test_idx = stratified_split(labels, o.holdout, o.seed)
    fit_idx, val_idx = stratified_split([labels[i] for i in train_idx], o.val_fraction, o.seed + 1)
    fit_idx, val_idx = [train_idx[i] for i in fit_idx], [train_idx[i] for i in val_idx]
    fit_idx, val_idx = cap_training(fit_idx, val_idx, o.max_train, o.val_fraction, o.seed + 2)
    if not fit_idx or not val_idx or not test_idx:
        raise ChatforgeError(f"{len(texts)} examples are too few to split into train, validation and held-out parts")

    backbone, tok = load_model(base)
    n_layer = backbone.config.n_layer
    if not 0 <= o.layer < n_layer:
        raise ChatforgeError(f"--layer must be 0 (the final output) or a block number 1..{n_layer - 1} "
                             f"of this {n_layer}-layer model, got {o.layer}")
    device = runtime.pick_device(o.device)
    precision = runtime.resolve_precision(o.precision, device)
    ids, mask = encode_texts(tok, texts, o.max_len)
    target = torch.tensor(y)
    spec = (o.layer, o.pooling)
    cache_dir = feature_cache_dir(o.feature_cache)
    fingerprint = model_fingerprint(base, salt=FEATURE_SALT) if cache_dir else ""

    def frozen_features(rows: list[int]):
        """The base backbone's pooled features of these rows (cached across runs)."""
        index = torch.tensor(rows)
        return cached_features(backbone.to(device), ids[index], mask[index], [spec], cache_dir, fingerprint,
                               precision, o.batch_size)[spec]

    torch.manual_seed(o.seed)
    model = TextClassifier(backbone, len(names), o.pooling, o.head_dropout, o.layer)
    feature_start = time.time()
    if o.method == "frozen":
        used = sorted(set(fit_idx) | set(val_idx) | set(test_idx))
        feats = torch.zeros(len(texts), backbone.config.d_model)
        feats[used] = frozen_features(used)
        model.head.set_feature_stats(feats[fit_idx])
        data = {"features": feats, "labels": target}
        trained = model.head
    else:
        # Standardise with the base model's features of (up to 2000) training texts.
        sample = sorted(random.Random(o.seed).sample(fit_idx, min(2000, len(fit_idx))))
        model.head.set_feature_stats(frozen_features(sample))
        # Adapters only in the blocks that run: those above --layer would never see a gradient.
        o.lora.apply(backbone, runs=o.layer)
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
    if o.method == "frozen":  # fixed-size feature vectors: plain shuffled batches
        source = ShuffledBatches(len(fit), o.batch_size, lambda i: rows(fit[i]), seed=o.seed)
        val_batches = [rows(b) for b in val.split(o.batch_size)]
    else:  # token rows: batches of similar lengths, shuffled as wholes
        lengths = mask.sum(1)
        groups = length_groups(lengths[fit].tolist(), o.batch_size, o.seed)
        source = ShuffledBatches(len(groups), 1, lambda i: rows(fit[groups[int(i[0])]]), seed=o.seed)
        val_batches = [rows(val[g]) for g in length_groups(lengths[val].tolist(), o.batch_size)]
    steps = recipe.steps(o, o.epochs, source.batches_per_epoch, o.max_len)
    lr = recipe.learning_rate(o, DEFAULT_LR, o.method)
    # `--compile auto` stays eager here: the frozen head is one small matrix, and LoRA batches
    # change length from batch to batch (each new shape would compile again).
    cfg = o.train_config(steps, o.max_len, lr, o.eval_every or min(steps, source.batches_per_epoch),
                         compile="off" if o.compile == "auto" else o.compile)
    meta = {"labels": names, "pooling": o.pooling, "layer": o.layer, "max_len": o.max_len,
            "method": o.method, "head_dropout": o.head_dropout, "base": str(base)}
    print(f"classify ({o.method}, layer {o.layer or 'final'}, {o.pooling} pooling): {len(names)} labels, "
          f"{len(fit_idx)} train / {len(val_idx)} val / {len(test_idx)} held-out examples, {steps} steps at lr {lr:g}")
    out.mkdir(parents=True, exist_ok=True)
    with one_thread() if o.method == "frozen" else contextlib.nullcontext():
        result = train(trained, source, classify_loss, cfg, out, val_batches=val_batches, tokenizer=tok,
                       resume=o.resume, save_fn=recipe.head_save_fn(out, tok, backbone, o.method, o.method == "frozen",
                                                                     HEAD_WEIGHTS, CLASSIFIER_CONFIG, meta))

    # Validation and held-out evaluation of the best checkpoint, the latter next to the baselines.
    eval_start = time.time()
    if o.method == "frozen":  # the backbone is the base one: only the best head is needed
        best = model.head.cpu()
        load_head(out, best)
    else:
        best, _, _ = load_classifier(out)

    def predicted(rows: list[int]) -> list[int]:
        index = torch.tensor(rows)
        if o.method == "frozen":
            with one_thread():
                return predict_logits(best, {"features": feats[index]}).argmax(-1).tolist()
        return predict_logits(best.to(device), {"input_ids": ids[index].to(device), "mask": mask[index].to(device)},
                              o.batch_size, precision).argmax(-1).tolist()

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
    report = {"base": str(base), "method": o.method, "layer": o.layer, "pooling": o.pooling,
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


def run_classify(base: str | Path, data: str | Path | None = None, out: str | Path | None = None,
                 config: ClassifyConfig | None = None, from_vader: str | Path | bool | None = None,
                 **options: Any) -> dict:
    """`chatforge classify train`: read the labelled texts of `data` (or the vader ratings:
    `from_vader` True / "default" for CACHE/sources/vader/sentiment.jsonl, or a file), then
    `train_classifier` into `out` (default: a `classify` folder beside `base`)."""
    o = build(ClassifyConfig, {**(flatten(config) if config else {}), **options}, "classify")
    if not base:
        raise ChatforgeError("pass --base DIR: a model folder (e.g. the output of `chatforge pretrain`)")
    if not Path(base).is_dir():
        raise ChatforgeError(f"model folder {base} does not exist; run `chatforge pretrain` first")
    if from_vader:
        texts, labels = read_vader(default_vader_path() if from_vader in (True, "default") else from_vader)
    elif data:
        texts, labels = read_labelled_jsonl(data, o.label_field, o.text_field)
    else:
        raise ChatforgeError("pass --data FILE.jsonl (or --from-vader)")
    texts, labels = subsample(texts, labels, o.max_examples, o.seed)
    out = Path(out) if out else Path(base).parent / "classify"
    if o.threads:
        torch.set_num_threads(o.threads)
    report = train_classifier(base, texts, labels, out, o)
    print(f"classifier -> {out}")
    return report
