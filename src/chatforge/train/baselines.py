"""What a classifier is measured against: accuracy and macro-F1, the majority class, and a
logistic regression on word counts (pure functions over label ids).

    pred = bow_logreg(train_texts, train_y, test_texts, n_classes)
    accuracy(pred, gold), macro_f1(pred, gold, n_classes)

The bag-of-words regression is the classic strong baseline for short texts: if a transformer
cannot beat it, its features are not worth their cost. It is written here in torch (full-batch
L-BFGS with L2 on log(1 + counts)), with no sklearn.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections import Counter
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F


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
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def bow_logreg(train_texts: Sequence[str], train_y: Sequence[int], test_texts: Sequence[str],
               n_classes: int, min_count: int = 2, l2: float = 1e-4, steps: int = 300) -> list[int]:
    """Multinomial logistic regression on log(1 + word counts), full-batch L-BFGS with L2:
    the predicted class of each test text."""
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
