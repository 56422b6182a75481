"""The classifier: metrics and baselines, vader labels, train / predict through the CLI, bad input."""

from __future__ import annotations

import json
import random

import pytest
import torch

from chatforge.cli import main
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.model.heads import ClassifierHead, RewardHead, ValueHead, hidden_states, pool
from chatforge.model.folder import save_model
from chatforge.train.classify import (accuracy, bow_logreg, load_classifier, macro_f1, majority_baseline, predict,
                                      read_vader, stratified_split, vader_label)

GOOD = ["works perfectly", "arrived quickly and works great", "is excellent, thank you", "solved my problem",
        "is fast and reliable", "made me very happy", "is the best purchase this year", "is wonderful"]
BAD = ["broke after one day", "never arrived", "is slow and crashes", "is terrible, I want a refund",
       "stopped working", "made me angry", "is the worst purchase this year", "keeps failing"]
THINGS = ["The printer", "My new laptop", "This keyboard", "The router", "The update", "Your app", "The charger",
          "The monitor", "This phone", "The service"]


def reviews(n: int, seed: int = 0) -> list[dict]:
    """Short product reviews from real phrases; 60% positive so the majority class is a real baseline."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        positive = rng.random() < 0.6
        out.append({"text": f"{rng.choice(THINGS)} {rng.choice(GOOD if positive else BAD)}.",
                    "label": "positive" if positive else "negative"})
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from chatforge.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("clf")
    texts = [r["text"] for r in reviews(300, seed=9)]
    tok = train_tokenizer(texts, 400, root / "tok")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, max_seq_len=64, d_model=48, n_layer=2, n_head=4,
                          n_kv_head=2, d_ff=96))
    return save_model(root / "base", model, tok)


def test_metrics_and_majority():
    gold = [0, 0, 0, 1, 1, 2]
    pred = [0, 0, 1, 1, 1, 1]
    assert accuracy(pred, gold) == pytest.approx(4 / 6)
    # F1: class 0 = 2*2/(4+0+1) = 0.8; class 1 = 2*2/(4+2+0) = 2/3; class 2 = 0.
    assert macro_f1(pred, gold, 3) == pytest.approx((0.8 + 2 / 3 + 0) / 3)
    assert majority_baseline([1, 0, 1, 1], 3) == [1, 1, 1]


def test_bow_logreg_learns_words():
    data = reviews(200, seed=1)
    texts, y = [d["text"] for d in data], [int(d["label"] == "positive") for d in data]
    pred = bow_logreg(texts[:150], y[:150], texts[150:], 2)
    assert accuracy(pred, y[150:]) > 0.95


def test_stratified_split_keeps_shares():
    labels = ["a"] * 80 + ["b"] * 20
    train, held = stratified_split(labels, 0.25, seed=3)
    assert sorted(train + held) == list(range(100)) and not set(train) & set(held)
    assert sum(labels[i] == "b" for i in held) == 5 and len(held) == 25
    assert stratified_split(labels, 0.25, seed=3) == (train, held)


def test_vader_labels(tmp_path):
    assert vader_label(-2.1) == "negative" and vader_label(1.3) == "positive"
    assert vader_label(0.2) is None and vader_label(-0.5) is None  # the ambiguous middle is dropped
    path = tmp_path / "sentiment.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"text": "I love this!", "score": 2.7},
                                                       {"text": "meh", "score": 0.1},
                                                       {"text": "Awful.", "score": -3.0}]) + "\n")
    assert read_vader(path) == (["I love this!", "Awful."], ["positive", "negative"])


def test_heads_shapes_and_pooling():
    h = torch.arange(24, dtype=torch.float32).view(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.equal(pool(h, mask, "mean")[0], h[0, :2].mean(0))
    assert torch.equal(pool(h, mask, "last")[0], h[0, 1]) and torch.equal(pool(h, mask, "last")[1], h[1, 2])
    assert ClassifierHead(4, 3)(h[:, 0]).shape == (2, 3)
    assert RewardHead(4)(h[:, 0]).shape == (2,)
    v = ValueHead(4)
    assert v(h).shape == (2, 3) and torch.equal(v(h), torch.zeros(2, 3))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, max_seq_len=16, d_model=16, n_layer=1, n_head=2, n_kv_head=1, d_ff=32))
    ids = torch.randint(0, 32, (2, 5))
    assert hidden_states(model, ids).shape == (2, 5, 16)


@pytest.mark.e2e
def test_cli_train_beats_majority_and_predicts(base, tmp_path, capsys):
    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in reviews(400)), encoding="utf-8")
    out = tmp_path / "clf"
    assert main(["classify", "train", "--base", str(base), "--data", str(data), "--out", str(out),
                 "--epochs", "15", "--precision", "fp32"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    held = report["held_out"]
    assert held["model"]["accuracy"] > held["majority"]["accuracy"] + 0.15, held
    assert held["model"]["macro_f1"] > held["majority"]["macro_f1"]
    capsys.readouterr()
    assert main(["classify", "predict", "--model", str(out), "--text", "The router broke after one day.",
                 "--text", "The router works perfectly."]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == ["negative", "positive"]
    assert all(0.5 <= float(line.split("\t")[1]) <= 1.0 for line in lines)
    inputs = tmp_path / "in.txt"
    inputs.write_text("The update keeps failing.\n", encoding="utf-8")
    assert predict(out, ["The update keeps failing."])[0][0] == "negative"
    assert main(["classify", "predict", "--model", str(out), "--input", str(inputs)]) == 0
    assert capsys.readouterr().out.startswith("negative\t")


@pytest.mark.e2e
def test_lora_classifier_saves_a_loadable_folder(base, tmp_path):
    from chatforge.model.folder import load_model

    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in reviews(120)), encoding="utf-8")
    out = tmp_path / "lora"
    assert main(["classify", "train", "--base", str(base), "--data", str(data), "--out", str(out),
                 "--method", "lora", "--steps", "8", "--precision", "fp32", "--lora-rank", "2"]) == 0
    model, _ = load_model(out)  # the backbone, adapters merged: a plain model folder
    assert isinstance(model, GPT)
    clf, _, meta = load_classifier(out)
    assert meta["method"] == "lora" and meta["labels"] == ["negative", "positive"]
    assert (out / "last" / "state.json").is_file()


def test_bad_input_exits_2(base, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": "a"}\n{"text": "no label"}\n', encoding="utf-8")
    assert main(["classify", "train", "--base", str(base), "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    assert main(["classify", "train", "--base", str(tmp_path / "nope"), "--data", str(bad)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["classify", "predict", "--model", str(tmp_path), "--text", "hi"]) == 2
    assert "not a classifier folder" in capsys.readouterr().err
