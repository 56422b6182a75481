"""Evaluation metrics: BLEU, ROUGE, retrieval hit@k and perplexity.

Scales follow the libraries that define them, so figures compare with published ones:
- `bleu`: sacrebleu corpus BLEU, 0-100 (default 13a tokenisation, one reference per hypothesis).
- `rouge`: rouge-score F1 (Porter stemming), averaged over the pairs, 0-1.
- `hit_at_k`: the fraction of questions (0-1) whose gold source is among the top k retrieved.
- `perplexity`: exp(mean next-token negative log-likelihood) over windows of held-out tokens.
- `grounded_precision`: the share (0-1) of an answer's word 4-grams that occur in the passages it
  was given, pooled over the answers: 1.0 means every run of four words was copied from the
  context, so what it measures is invention, not correctness.
"""

from __future__ import annotations

import math
import re
from typing import Any, Collection, Iterable, Sequence

import numpy as np
import sacrebleu
import torch
import torch.nn.functional as F
from rouge_score import rouge_scorer

from chatforge.errors import ChatforgeError


def _check_pairs(hyps: Sequence[str], refs: Sequence[str]) -> None:
    if len(hyps) != len(refs):
        raise ChatforgeError(f"{len(hyps)} hypotheses but {len(refs)} references; they must pair up")


def bleu(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Corpus BLEU (0-100) of `hyps` against one reference each; 0.0 for no pairs."""
    _check_pairs(hyps, refs)
    if not hyps:
        return 0.0
    return float(sacrebleu.corpus_bleu(list(hyps), [list(refs)]).score)


def rouge(hyps: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 (0-1, stemmed) over the pairs: {"rouge1", "rouge2", "rougeL"}."""
    _check_pairs(hyps, refs)
    keys = ("rouge1", "rouge2", "rougeL")
    if not hyps:
        return {k: 0.0 for k in keys}
    scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=True)
    totals = dict.fromkeys(keys, 0.0)
    for h, r in zip(hyps, refs):
        scores = scorer.score(r, h)   # rouge-score takes (target, prediction)
        for k in keys:
            totals[k] += scores[k].fmeasure
    return {k: totals[k] / len(hyps) for k in keys}


def rouge_l(hyp: str, ref: str) -> float:
    """ROUGE-L F1 of one pair (used to find the passage closest to a reference)."""
    return rouge([hyp], [ref])["rougeL"]


def hit_at_k(retrieved_sources_per_question: Sequence[Sequence[str]],
             gold_source: Sequence[str | Collection[str] | None], k: int) -> float | None:
    """Fraction of questions whose gold source is among their first `k` retrieved sources.

    `gold_source[i]` is the gold source of question i, a collection of acceptable ones, or None
    (no gold known: the question is left out). None when no question has a gold source.
    """
    if len(retrieved_sources_per_question) != len(gold_source):
        raise ChatforgeError("hit_at_k needs one list of retrieved sources per gold source")
    if k < 1:
        raise ChatforgeError(f"k must be >= 1, got {k}")
    hits = total = 0
    for retrieved, gold in zip(retrieved_sources_per_question, gold_source):
        if gold is None:
            continue
        accept = {gold} if isinstance(gold, str) else set(gold)
        total += 1
        hits += any(s in accept for s in list(retrieved)[:k])
    return hits / total if total else None


GROUNDING_N = 4   # word n-gram size of grounded precision: long enough that chance matches are rare


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _ngrams(words: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def grounded_counts(answer: str, passages: Sequence[str], n: int = GROUNDING_N) -> tuple[int, int]:
    """(word n-grams of `answer` found in `passages`, all word n-grams of `answer`).

    Words are lower-cased runs of letters, digits and underscores, so punctuation and spacing do
    not count; an n-gram must sit inside one passage. An answer of fewer than n words has none.
    """
    grams = _ngrams(_words(answer), n)
    if not grams:
        return 0, 0
    seen: set[tuple[str, ...]] = set()
    for p in passages:
        seen.update(_ngrams(_words(p), n))
    return sum(g in seen for g in grams), len(grams)


def grounded_precision(answers: Sequence[str], passages: Sequence[Sequence[str]],
                       n: int = GROUNDING_N) -> float | None:
    """The share of all answers' word n-grams that occur in the passages each answer was given.

    Pooled over the n-grams (a long answer weighs more than a short one); None when no answer has
    n words (nothing to measure). Callers leave out fixed replies such as "not in the documents".
    """
    if len(answers) != len(passages):
        raise ChatforgeError(f"{len(answers)} answers but {len(passages)} passage lists; they must pair up")
    found = total = 0
    for a, ps in zip(answers, passages):
        f, t = grounded_counts(a, ps, n)
        found, total = found + f, total + t
    return found / total if total else None


# --------------------------------------------------------------------------- perplexity

def _windows(tokens: Any, seq_len: int, batch_size: int, max_batches: int | None) -> Iterable[Any]:
    """Batches (B, seq_len + 1) of non-overlapping windows, spread evenly over `tokens`."""
    n = (len(tokens) - 1) // seq_len
    if n < 1:
        raise ChatforgeError(f"only {len(tokens)} validation tokens: need more than seq_len={seq_len} "
                             "to measure perplexity (add validation text or lower --seq-len)")
    starts = np.arange(n) * seq_len
    if max_batches is not None and n > max_batches * batch_size:
        # Evenly spaced windows represent the whole split better than the first few.
        pick = np.linspace(0, n - 1, max_batches * batch_size).round().astype(np.int64)
        starts = starts[np.unique(pick)]
    for i in range(0, len(starts), batch_size):
        rows = [np.asarray(tokens[s:s + seq_len + 1], dtype=np.int64) for s in starts[i:i + batch_size]]
        yield torch.from_numpy(np.stack(rows))


def perplexity(model: Any, data: Any, seq_len: int | None = None, max_batches: int | None = 50,
               batch_size: int = 8) -> float:
    """exp(mean next-token NLL) of `model` on `data`.

    `data` is either a 1-D sequence of token ids (a `val.bin` memmap, an array, a list, a tensor),
    cut into non-overlapping windows of `seq_len` + 1 tokens (at most `max_batches` batches of
    `batch_size`, spread evenly), or an iterable of (B, L) token batches (each row is inputs plus
    the next token). The mean is over every predicted token. `seq_len` defaults to the model's
    context (`model.config.max_seq_len`).
    """
    ctx = getattr(getattr(model, "config", None), "max_seq_len", None)
    seq_len = seq_len or ctx
    if seq_len is None:
        raise ChatforgeError("perplexity needs seq_len (the model has no config.max_seq_len)")
    if ctx is not None:
        seq_len = min(seq_len, ctx)
    one_d = (isinstance(data, (list, np.ndarray, torch.Tensor)) and np.ndim(data) == 1)
    batches = _windows(data, seq_len, batch_size, max_batches) if one_d else data
    device = next(iter(model.parameters()), torch.empty(0)).device
    was_training = getattr(model, "training", False)
    model.eval()
    nll, count = 0.0, 0
    try:
        with torch.inference_mode():
            for b, batch in enumerate(batches):
                if max_batches is not None and not one_d and b >= max_batches:
                    break
                batch = torch.as_tensor(np.asarray(batch) if not isinstance(batch, torch.Tensor) else batch)
                batch = batch.to(device=device, dtype=torch.long)
                logits, _ = model(batch[:, :-1])
                targets = batch[:, 1:]
                nll += F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                                       reduction="sum").item()
                count += targets.numel()
    finally:
        model.train(was_training)
    if count == 0:
        raise ChatforgeError("no validation tokens to measure perplexity on")
    return math.exp(nll / count)
