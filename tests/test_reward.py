"""Reward model: Bradley-Terry on hand values, pair rows score what single conversations score,
training (LoRA, head alone, full) beats the length baseline on held-out questions, the folder loads
without code, `score` for PPO, and the `reward train|score` commands."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _align_fixtures import synthetic_pairs, tiny_model_folder, write_jsonl  # noqa: E402

from chatforge.commands.main import main  # noqa: E402
from chatforge.data.prefs import Preference, parse_preference  # noqa: E402
from chatforge.errors import ChatforgeError  # noqa: E402
from chatforge.model.folder import load_model  # noqa: E402
from chatforge.train import reward  # noqa: E402
from chatforge.train.pairs import encode_pairs, make_pair_batch  # noqa: E402


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("reward") / "base")


@pytest.fixture(scope="module")
def prefs_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("prefs") / "prefs.jsonl", synthetic_pairs(96))


def options(**kw) -> dict:
    return {**dict(steps=30, batch_size=8, precision="fp32", device="cpu", warmup=2, seed=0, lr=1e-2), **kw}


def test_bradley_terry_and_accuracy_on_hand_values():
    losses = reward.bradley_terry(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0]))
    assert losses.tolist() == pytest.approx([math.log1p(math.exp(-2.0)), math.log(2)])
    assert reward.pair_accuracy([1.0, 0.0, 2.0, 1.0], [0.0, 0.0, 3.0, 1.0]) == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)
    prefs = [Preference([{"role": "user", "content": "q"}], "long reply", "short", {"kind": "a"}),
             Preference([{"role": "user", "content": "q"}], "ok", "longer", {"kind": "b"})]
    report = reward.held_out_report([1.0, 1.0], [0.0, 2.0], prefs)
    assert report["all"] == {"pairs": 2, "model": 0.5, "longer_wins": 0.5, "chance": 0.5}
    assert report["by_kind"]["a"]["model"] == 1.0 and report["by_kind"]["b"]["longer_wins"] == 0.0


def test_pair_rows_score_what_a_single_conversation_scores(base):
    backbone, tok = load_model(base)
    torch.manual_seed(0)
    model = reward.RewardModel(backbone, tok).eval()
    prefs = [parse_preference(p) for p in synthetic_pairs(5)]
    examples, _ = encode_pairs(prefs, tok, 200)
    with torch.no_grad():
        scores = model(make_pair_batch(examples, tok.pad_id))
    singles = model.score([(p.prompt, p.chosen) for p in prefs] + [p.conversation("rejected") for p in prefs])
    assert torch.allclose(scores[:, 0], singles[:5], atol=1e-5) and torch.allclose(scores[:, 1], singles[5:], atol=1e-5)
    # Rollout ids (prompt + completion without the stop token) get their <|im_end|> appended.
    ids = tok.render_chat(prefs[0].conversation("chosen"))[0]
    end = len(ids) - ids[::-1].index(tok.im_end_id)
    assert model.score_ids([ids[:end - 1], ids, ids[:end]]).tolist() == pytest.approx([singles[0].item()] * 3, abs=1e-5)
    with pytest.raises(ChatforgeError, match="end with the assistant's reply"):
        model.score([[{"role": "user", "content": "hi"}]])


def test_lora_reward_model_beats_the_length_baseline(base, prefs_file, tmp_path):
    out = tmp_path / "rm"
    report = reward.train_reward_model(base, prefs_file, out, **options())
    held = report["held_out"]["all"]
    assert held["longer_wins"] == 0.5 and held["chance"] == 0.5      # same-length replies: length says nothing
    assert held["model"] >= 0.9, report
    assert report["split"]["held_out"] > 0 and report["steps"] == 30
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "accuracy" in rows[0] and "margin" in rows[0] and any("val_accuracy" in r for r in rows)
    # The folder: safetensors and JSON only; it loads and scores.
    assert sorted(p.name for p in out.iterdir() if p.is_file() and p.suffix not in (".jsonl",)) == sorted(
        ["config.json", "model.safetensors", "reward.json", "reward_head.safetensors", "reward_report.json",
         "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"])
    rm = reward.load_reward_model(out)
    assert rm.meta["format"] == "chatforge-reward" and rm.meta["metrics"]["all"]["model"] == held["model"]
    good, poor = rm.score([("Is my router working?", "Your router is working and good."),
                           ("Is my router working?", "Your router is working and poor.")]).tolist()
    assert good > poor
    load_model(out)     # also a plain model folder (the backbone, adapters merged)


def test_head_alone_on_cached_features_and_full(base, prefs_file, tmp_path):
    report = reward.train_reward_model(base, prefs_file, tmp_path / "head", **options(method="freeze", steps=60,
                                                                                      lr=None))
    assert report["head_only"] and report["lr"] == reward.HEAD_ONLY_LR and report["held_out"]["all"]["model"] >= 0.9
    report = reward.train_reward_model(base, prefs_file, tmp_path / "full", **options(method="full", steps=10, lr=3e-3))
    assert report["held_out"]["all"]["pairs"] > 0
    reward.load_reward_model(tmp_path / "full")


def test_config_defaults_and_checks(base, prefs_file):
    from chatforge.options import build, defaults

    d = defaults(reward.RewardConfig)
    assert (d["method"], d["epochs"], d["holdout"], d["lr"], d["tokens_per_step"], d["lora_dropout"]) == \
        ("lora", 2.0, 0.2, None, 0, 0.0)
    assert build(reward.RewardConfig, {"method": "freeze"}).head_only
    assert not build(reward.RewardConfig, {"method": "freeze", "freeze_top": 1}).head_only
    for options, why in [({"holdout": 0}, "--holdout must be in"), ({"freeze_top": -1}, "--freeze-top"),
                         ({"method": "adapter"}, "--method must be one of lora, full, freeze")]:
        with pytest.raises(ChatforgeError, match=why):
            build(reward.RewardConfig, options)
    with pytest.raises(ChatforgeError, match="does not exist"):
        reward.train_reward_model(base.parent / "nowhere", prefs_file)


def test_loader_errors(base, tmp_path):
    with pytest.raises(ChatforgeError, match="not a reward model folder"):
        reward.load_reward_model(base)
    folder = tmp_path / "rm"
    folder.mkdir()
    (folder / "reward.json").write_text('{"format": "something-else"}')
    with pytest.raises(ChatforgeError, match="not a chatforge reward model"):
        reward.load_reward_model(folder)


def test_commands(base, prefs_file, tmp_path, capsys):
    out = tmp_path / "cli-rm"
    assert main(["reward", "train", "--base", str(base), "--prefs", str(prefs_file), "--out", str(out),
                 "--steps", "4", "--precision", "fp32", "--method", "freeze"]) == 0
    printed = capsys.readouterr().out
    assert "longer wins" in printed and f"reward model -> {out}" in printed
    assert main(["reward", "score", "--model", str(out), "--prompt", "Is my phone working?",
                 "--response", "Your phone is working and good.", "--response", "No."]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[1].endswith("\tNo.")
    assert main(["reward", "score", "--model", str(out), "--input", str(prefs_file), "--out", str(tmp_path / "s.jsonl")]) == 0
    assert "pair accuracy" in capsys.readouterr().out
    scored = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(scored) == 96 and {"score_chosen", "score_rejected"} <= set(scored[0])
    responses = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "Is my agent working?", "response": "Yes."}])
    assert main(["reward", "score", "--model", str(out), "--input", str(responses)]) == 0
    assert capsys.readouterr().out.strip().endswith("\tYes.")
    # Errors that say what to fix.
    assert main(["reward", "score", "--model", str(out)]) == 2
    assert "--prompt TEXT with one or more --response" in capsys.readouterr().err
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "response": ""}])
    assert main(["reward", "score", "--model", str(out), "--input", str(bad)]) == 2
    assert "bad.jsonl:1:" in capsys.readouterr().err
    assert main(["reward", "train", "--prefs", str(prefs_file)]) == 2
    assert "pass --base DIR" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["reward", "train", "--help"])
    assert "example:\n  chatforge reward train --base" in capsys.readouterr().out
