"""A text classifier on a GPT backbone: the model, its folder, prediction.

    model, tokenizer, meta = load_classifier("runs/demo/intents")
    predict("runs/demo/intents", ["where is my order?"])      # [("order_status", 0.97)]

`chatforge classify train` (train/classify.py) makes the folder: a model folder (the backbone,
LoRA merged) plus `head.safetensors` (a `ClassifierHead`, model/heads.py) and `classifier.json`
(labels, layer, pooling, max length, metrics). One layer's hidden states (`layer`: 0 = the final
output, L = the output of block L; the blocks above it never run), pooled over the text ("last":
the last real token, the only one that has seen the whole text; or "mean"), feed the head. Texts
are right-padded with the tokenizer's pad id; pooling reads the mask, never the ids.

This is model code, apart from the training: the server's intent router (infer/plugins.py)
loads and runs a classifier without importing training.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file

from chatforge import files
from chatforge.errors import ChatforgeError
from chatforge.model.folder import load_model
from chatforge.model.heads import ClassifierHead, hidden_states, pool

HEAD_WEIGHTS, CLASSIFIER_CONFIG = "head.safetensors", "classifier.json"


class TextClassifier(nn.Module):
    """A GPT backbone, pooled, then a `ClassifierHead`: (ids, mask) -> class logits."""

    def __init__(self, backbone: nn.Module, n_classes: int, pooling: str = "last", dropout: float = 0.1,
                 layer: int = 0):
        super().__init__()
        self.backbone, self.pooling, self.layer = backbone, pooling, layer
        self.head = ClassifierHead(backbone.config.d_model, n_classes, dropout)

    def features(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return pool(hidden_states(self.backbone, input_ids, self.layer), mask, self.pooling)

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(input_ids, mask))


def encode_texts(tokenizer, texts: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), both (N, T) with T the longest kept text: right-padded, cut to `max_len` tokens."""
    encoded = [ids[:max_len] or [tokenizer.eot_id] for ids in tokenizer.encode_batch(list(texts))]
    T = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), T), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), T), dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, :len(e)] = torch.tensor(e)
        mask[i, :len(e)] = 1
    return ids, mask


def length_order(mask: torch.Tensor) -> torch.Tensor:
    """Row indices, longest first: batches of neighbours pad little and are cut to their longest row."""
    return torch.argsort(mask.sum(1), descending=True, stable=True)


def predict_logits(model: nn.Module, data: dict, batch_size: int = 64, precision: str = "fp32") -> torch.Tensor:
    """Logits (float32) for every row of `data` (features, or input_ids + mask) with the model in
    eval mode; token rows go longest first (little padding) and come back in their own order.
    With `precision` "bf16" a bf16 copy of the model runs them."""
    model.eval()
    with torch.no_grad():
        if "features" in data:
            return torch.cat([model(f) for f in data["features"].split(batch_size)]).float()
        ids, mask = data["input_ids"], data["mask"]
        if precision == "bf16":
            model = copy.deepcopy(model).to(torch.bfloat16)
        logits = None
        for rows in length_order(mask).split(batch_size):
            T = int(mask[rows].sum(1).max())
            part = model(ids[rows, :T], mask[rows, :T]).float()
            if logits is None:
                logits = torch.zeros(len(ids), part.shape[-1], device=part.device)
            logits[rows] = part
        return logits


def load_head(folder: str | Path, head: nn.Module) -> None:
    """Load `head.safetensors` from a classifier folder into `head` (a `ClassifierHead`)."""
    path = Path(folder) / HEAD_WEIGHTS
    try:
        head.load_state_dict(load_file(str(path)))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ChatforgeError(f"{path} is missing, corrupt or of another shape ({e})") from None


def load_classifier(folder: str | Path) -> tuple[TextClassifier, object, dict]:
    """(TextClassifier in eval mode, tokenizer, classifier.json) from a folder `classify train` wrote."""
    folder = Path(folder)
    if not (folder / CLASSIFIER_CONFIG).is_file():
        raise ChatforgeError(f"{folder} is not a classifier folder ({CLASSIFIER_CONFIG} is missing); "
                             "train one with `chatforge classify train`")
    meta = files.read_json(folder / CLASSIFIER_CONFIG)
    backbone, tok = load_model(folder)
    model = TextClassifier(backbone, len(meta["labels"]), meta["pooling"], meta.get("head_dropout", 0.1),
                           meta.get("layer", 0))
    load_head(folder, model.head)
    return model.eval(), tok, meta


def predict(folder: str | Path, texts: Sequence[str], batch_size: int = 64) -> list[tuple[str, float]]:
    """(label, probability) for each text, with the classifier saved in `folder`."""
    model, tok, meta = load_classifier(folder)
    if not texts:
        return []
    ids, mask = encode_texts(tok, texts, meta["max_len"])
    probs = torch.softmax(predict_logits(model, {"input_ids": ids, "mask": mask}, batch_size).float(), -1)
    best = probs.max(-1)
    return [(meta["labels"][int(i)], float(p)) for p, i in zip(best.values, best.indices)]
