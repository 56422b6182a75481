"""Metrics against values computed directly with sacrebleu / rouge-score, and perplexity of fixed models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import sacrebleu
import torch
from rouge_score import rouge_scorer

from chatforge.errors import ChatforgeError
from chatforge.eval.metrics import bleu, hit_at_k, perplexity, rouge

HYPS = ["The refund reaches your card within five working days.",
        "Open the settings page and press reset.",
        "Port 8443 must be forwarded to the appliance."]
REFS = ["Refunds reach your card within five working days.",
        "Open Settings and press Reset password.",
        "Forward TCP port 8443 to the backup appliance."]


def test_bleu_matches_sacrebleu():
    assert bleu(HYPS, REFS) == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS]).score)
    assert bleu(REFS, REFS) == pytest.approx(100.0)
    assert bleu([], []) == 0.0
    with pytest.raises(ChatforgeError):
        bleu(HYPS, REFS[:2])


def test_rouge_matches_rouge_score():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    expected = {k: np.mean([scorer.score(r, h)[k].fmeasure for h, r in zip(HYPS, REFS)])
                for k in ("rouge1", "rouge2", "rougeL")}
    got = rouge(HYPS, REFS)
    assert set(got) == {"rouge1", "rouge2", "rougeL"}
    for k in expected:
        assert got[k] == pytest.approx(expected[k])
    # Known value: "the cat sat" vs "the cat sat down": P=1, R=3/4, F1=6/7.
    assert rouge(["the cat sat"], ["the cat sat down"])["rouge1"] == pytest.approx(6 / 7)
    # Stemming: "reaches" and "reach" are the same word.
    assert rouge(["refund reaches"], ["refund reach"])["rouge1"] == pytest.approx(1.0)


def test_hit_at_k():
    retrieved = [["a", "b", "c"], ["b", "a", "c"], ["c", "c", "b"], ["x", "y", "z"]]
    gold = ["a", "a", "a", None]
    assert hit_at_k(retrieved, gold, 1) == pytest.approx(1 / 3)
    assert hit_at_k(retrieved, gold, 2) == pytest.approx(2 / 3)
    assert hit_at_k(retrieved, gold, 3) == pytest.approx(2 / 3)
    assert hit_at_k(retrieved, [{"a", "c"}, ["b"], "b", "z"], 1) == pytest.approx(0.5)
    assert hit_at_k([["a"]], [None], 1) is None


class FixedLogits(torch.nn.Module):
    """A model whose logits ignore the input: uniform, or a fixed distribution."""

    def __init__(self, vocab: int, logits: torch.Tensor | None = None, max_seq_len: int = 16):
        super().__init__()
        self.config = type("Config", (), {"max_seq_len": max_seq_len, "vocab_size": vocab})()
        self.logits = torch.nn.Parameter(torch.zeros(vocab) if logits is None else logits)

    def forward(self, idx, targets=None):
        return self.logits.expand(*idx.shape, -1), None


def test_uniform_model_has_perplexity_vocab_size():
    tokens = np.random.default_rng(0).integers(0, 50, size=1000).astype(np.uint16)
    assert perplexity(FixedLogits(50), tokens, seq_len=16, max_batches=3) == pytest.approx(50.0, rel=1e-5)
    assert perplexity(FixedLogits(50), torch.tensor(tokens.astype(np.int64)), seq_len=8) == pytest.approx(50.0, rel=1e-5)


def test_perplexity_of_a_fixed_distribution():
    # p(token 0) = 0.5, p(token 1) = 0.5 (others ~0): on a stream of zeros and ones ppl = 2.
    logits = torch.full((10,), -1e9)
    logits[:2] = 0.0
    tokens = [0, 1] * 100
    assert perplexity(FixedLogits(10, logits), tokens, seq_len=10) == pytest.approx(2.0, rel=1e-5)
    # Batches of rows (inputs + next token) instead of a flat stream.
    batches = [torch.tensor([[0, 1, 0, 1], [1, 1, 0, 0]])]
    assert perplexity(FixedLogits(10, logits), batches) == pytest.approx(2.0, rel=1e-5)


def test_perplexity_needs_enough_tokens():
    with pytest.raises(ChatforgeError, match="validation tokens"):
        perplexity(FixedLogits(5), [1, 2, 3], seq_len=16)


def test_perplexity_of_a_real_gpt_is_finite_and_eval_mode_restored():
    from chatforge.model.gpt import GPT, preset

    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=300, max_seq_len=32))
    model.train()
    tokens = np.random.default_rng(1).integers(0, 300, size=500)
    ppl = perplexity(model, tokens, seq_len=32, max_batches=2, batch_size=2)
    assert math.isfinite(ppl) and 100 < ppl < 1000     # an untrained model is close to uniform (300)
    assert model.training


def test_grounded_precision_counts_copied_word_4grams():
    from chatforge.eval.metrics import grounded_counts, grounded_precision

    passage = "Run git gc to pack loose objects. It also prunes old reflog entries."
    # Copied verbatim (case and punctuation do not matter): every 4-gram is found.
    assert grounded_counts("run git GC, to pack loose objects", [passage]) == (4, 4)
    # Half invented: "to pack loose objects" is copied, "then reboot the server" is not.
    found, total = grounded_counts("to pack loose objects then reboot the server", [passage])
    assert (found, total) == (1, 5)
    # An n-gram must sit inside one passage, not span two.
    assert grounded_counts("gc to pack loose", ["gc to", "pack loose"]) == (0, 1)
    # Fewer than four words: nothing to measure, and pooling skips it.
    assert grounded_counts("git gc", [passage]) == (0, 0)
    pooled = grounded_precision(["run git gc to pack loose objects", "reboot the server right now", "ok"],
                                [[passage], [passage], [passage]])
    assert pooled == pytest.approx(4 / 6)
    assert grounded_precision(["ok"], [[passage]]) is None
    with pytest.raises(ChatforgeError, match="pair up"):
        grounded_precision(["a b c d"], [])
