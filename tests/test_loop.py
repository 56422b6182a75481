"""The shared training loop: config validation, schedule, optimizer groups, learning on real text,
resume, Ctrl-C / SIGTERM, a failed save, early stopping, gradient accumulation and logging."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _pretrain_fixtures import make_data, make_tokenizer  # noqa: E402

from chatforge.data.shards import build_shards, load_tokens  # noqa: E402
from chatforge.errors import ChatforgeError  # noqa: E402
from chatforge.model.gpt import GPT, GPTConfig  # noqa: E402
from chatforge.model import folder as model_folder  # noqa: E402
from chatforge import runtime  # noqa: E402
from chatforge.train import checkpoint  # noqa: E402
from chatforge.train.loop import TrainConfig, lr_factor, make_optimizer, train  # noqa: E402
from chatforge.train.pretrain import RandomWindows, lm_loss, validation_batches  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    tok = make_tokenizer(root / "tok", vocab_size=384)
    folder = build_shards(make_data(root / "data", max_chars=60_000), root / "tok", tokenizer=tok)
    return {"tok": tok, "tok_dir": root / "tok", "train": load_tokens(folder, "train"),
            "val": load_tokens(folder, "val")}


def tiny_model(vocab: int) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=vocab, max_seq_len=64, d_model=64, n_layer=2, n_head=4, n_kv_head=2, d_ff=128))


def cfg(**kw) -> TrainConfig:
    base = dict(max_steps=12, lr=3e-3, warmup_steps=2, batch_size=4, seq_len=32, eval_every=6, log_every=2,
                precision="fp32", device="cpu", seed=0)
    return TrainConfig(**{**base, **kw})


def run(corpus, out: Path, c: TrainConfig, resume: bool = False, **kw):
    model = tiny_model(corpus["tok"].vocab_size)
    source = RandomWindows(corpus["train"], c.batch_size, c.seq_len, seed=0)
    val = validation_batches(corpus["val"], 8, c.seq_len, 1024)
    result = train(model, source, lm_loss, c, out, val_batches=val, tokenizer=corpus["tok_dir"], resume=resume, **kw)
    return model, result


@pytest.mark.parametrize("bad", [dict(lr=-1.0), dict(max_steps=0), dict(schedule="linear"),
                                 dict(precision="fp16"), dict(batch_size=0), dict(min_lr_ratio=2.0)])
def test_bad_config_values_are_clear_errors(bad):
    with pytest.raises(ChatforgeError, match="invalid training option"):
        cfg(**bad)


def test_compile_auto_only_for_long_runs_with_a_backend(monkeypatch):
    cpu = torch.device("cpu")
    long_run = runtime.COMPILE_MIN_MICRO_STEPS
    assert runtime.resolve_compile("off", cpu, 10**6) is False and runtime.resolve_compile("on", cpu, 1) is True
    assert cfg(compile=True).compile == "on"                          # older checkpoints saved a flag
    assert runtime.resolve_compile("auto", cpu, long_run - 1) is False
    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/" + name)
    assert runtime.resolve_compile("auto", cpu, long_run) is True
    monkeypatch.setattr("shutil.which", lambda name: None)           # inductor needs a C++ compiler
    assert runtime.resolve_compile("auto", cpu, long_run) is False
    assert runtime.resolve_compile("auto", torch.device("mps"), long_run) is False
    with pytest.raises(ChatforgeError, match="compile 'sometimes'"):
        cfg(compile="sometimes")
    assert cfg(compile=False).compile == "off"


@pytest.mark.e2e
def test_compiled_training_matches_eager(corpus, tmp_path, capsys):
    _, eager = run(corpus, tmp_path / "eager", cfg(max_steps=6, eval_every=6, compile="off"))
    assert "compiled" not in capsys.readouterr().out
    _, compiled = run(corpus, tmp_path / "compiled", cfg(max_steps=6, eval_every=6, compile="on"))
    assert "(fp32, compiled)" in capsys.readouterr().out
    assert compiled.val_loss == pytest.approx(eager.val_loss, rel=1e-3)
    assert compiled.val_loss < 6.0   # it learned: a uniform guess over 384 tokens is ln 384 = 5.95


def test_schedules_warm_up_then_decay_to_the_floor():
    c = cfg(max_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, c) == pytest.approx(0.1) and lr_factor(9, c) == pytest.approx(1.0)
    assert lr_factor(99, c) == pytest.approx(0.1, abs=1e-3)
    w = cfg(max_steps=100, warmup_steps=10, min_lr_ratio=0.0, schedule="wsd", decay_frac=0.2)
    assert lr_factor(50, w) == 1.0 and lr_factor(79, w) == 1.0
    assert lr_factor(90, w) == pytest.approx(0.5) and lr_factor(100, w) == pytest.approx(0.0)
    assert cfg(tokens_per_step=1000, batch_size=4, seq_len=32).grad_accum(world_size=2) == 4


def test_weight_decay_only_on_non_embedding_matrices():
    model = tiny_model(100)
    opt = make_optimizer(model, {n for n, _ in model.named_parameters()}, cfg(), torch.device("cpu"))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.dim() >= 2 and "embed" not in name), name


def test_loss_falls_on_real_text_and_outputs_are_written(corpus, tmp_path):
    model, result = run(corpus, tmp_path, cfg(max_steps=40, eval_every=20))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    # The last few logged losses, not the last one alone: one batch of 4 x 32 tokens is noisy
    # (+-0.1 here), and the drop is about 1.0 with the tokenizer's llama.cpp-compatible split.
    assert sum(losses[-4:]) / 4 < losses[0] - 1.0
    vals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in vals] == [20, 40] and vals[-1]["val_ppl"] == pytest.approx(math.exp(vals[-1]["val_loss"]))
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 for r in rows if "loss" in r)
    assert result.step == 40 and result.tokens == 40 * 4 * 32
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "last" / "state.json").is_file()
    assert any((tmp_path / "tb").iterdir())
    best, _ = model_folder.load_model(tmp_path)   # the best model is a normal model folder
    assert best.config == model.config


class Crash(RuntimeError):
    pass


def crash_after(calls: int):
    """A loss function that dies (like a crashed process) on training call `calls + 1`."""
    count = {"n": 0}

    def loss(model, batch):
        count["n"] += model.training  # validation calls do not count
        if count["n"] > calls:
            raise Crash
        return lm_loss(model, batch)
    return loss


def test_resume_after_a_crash_continues_exactly(corpus, tmp_path):
    full, _ = run(corpus, tmp_path / "full", cfg())
    with pytest.raises(Crash):   # dies during step 9; last/ holds step 6 (eval_every=6)
        train(tiny_model(corpus["tok"].vocab_size), RandomWindows(corpus["train"], 4, 32, seed=0), crash_after(8),
              cfg(), tmp_path / "split", tokenizer=corpus["tok_dir"],
              val_batches=validation_batches(corpus["val"], 8, 32, 1024))
    assert json.loads((tmp_path / "split" / "last" / "state.json").read_text())["step"] == 6
    resumed, result = run(corpus, tmp_path / "split", cfg(), resume=True)
    assert result.step == 12
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_gradient_accumulation_matches_a_bigger_batch(corpus, tmp_path):
    big, _ = run(corpus, tmp_path / "big", cfg(max_steps=3, batch_size=8, eval_every=100))

    class Halves:  # the same 8 rows as RandomWindows(batch 8), served as two micro-batches of 4
        def __init__(self):
            self.inner, self.pending = RandomWindows(corpus["train"], 8, 32, seed=0), []

        def next_batch(self):
            if not self.pending:
                b = self.inner.next_batch()
                self.pending = [{k: v[:4] for k, v in b.items()}, {k: v[4:] for k, v in b.items()}]
            return self.pending.pop(0)

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    model = tiny_model(corpus["tok"].vocab_size)
    train(model, Halves(), lm_loss, cfg(max_steps=3, batch_size=4, tokens_per_step=256, eval_every=100),
          tmp_path / "acc", tokenizer=corpus["tok_dir"])
    for a, b in zip(big.state_dict().values(), model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5)


def test_sigterm_saves_last_and_stops_cleanly(corpus, tmp_path):
    calls = {"n": 0}

    def loss_then_signal(model, batch):
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return lm_loss(model, batch)

    model = tiny_model(corpus["tok"].vocab_size)
    c = cfg(max_steps=50)
    result = train(model, RandomWindows(corpus["train"], 4, 32, 0), loss_then_signal, c, tmp_path,
                   tokenizer=corpus["tok_dir"])
    assert result.interrupted and result.step == 5
    assert json.loads((tmp_path / "last" / "state.json").read_text())["step"] == 5


def test_a_failed_save_leaves_the_previous_checkpoint_intact(corpus, tmp_path, monkeypatch):
    with pytest.raises(Crash):
        train(tiny_model(corpus["tok"].vocab_size), RandomWindows(corpus["train"], 4, 32, seed=0), crash_after(7),
              cfg(), tmp_path, tokenizer=corpus["tok_dir"], val_batches=validation_batches(corpus["val"], 8, 32, 512))
    before = {p.name: p.read_bytes() for p in (tmp_path / "last").iterdir()}

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_training_state", disk_full)
    with pytest.raises(OSError):
        run(corpus, tmp_path, cfg(), resume=True)
    after = {p.name: p.read_bytes() for p in (tmp_path / "last").iterdir()}
    assert before == after
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temp folder left behind
    monkeypatch.undo()
    _, result = run(corpus, tmp_path, cfg(), resume=True)  # and it still resumes
    assert result.step == 12


def test_corrupt_checkpoint_on_resume_is_a_clear_error(corpus, tmp_path):
    run(corpus, tmp_path, cfg(max_steps=6))
    state = tmp_path / "last" / "optimizer.safetensors"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(ChatforgeError, match="corrupt or truncated"):
        run(corpus, tmp_path, cfg(), resume=True)
    with pytest.raises(ChatforgeError, match="does not exist"):
        run(corpus, tmp_path / "nowhere", cfg(), resume=True)


def test_early_stopping_and_trainable_subset(corpus, tmp_path):
    model = tiny_model(corpus["tok"].vocab_size)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    only = [model.layers[1].mlp.down_proj.weight]
    # lr so high the loss cannot improve after the first evaluation -> stop after 2 bad ones.
    c = cfg(max_steps=60, eval_every=2, early_stop_patience=2, lr=5.0, warmup_steps=0, schedule="constant")
    result = train(model, RandomWindows(corpus["train"], 4, 32, 0), lm_loss, c, tmp_path,
                   val_batches=validation_batches(corpus["val"], 8, 32, 512), tokenizer=corpus["tok_dir"],
                   params=only)
    assert result.stopped_early and result.step < 60
    for n, p in model.named_parameters():
        assert torch.equal(p, frozen[n]) == (n != "layers.1.mlp.down_proj.weight"), n
