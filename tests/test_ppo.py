"""PPO / GRPO: every loss on hand-computed values, the reply forward against plain passes, the
reference as the base without adapters, prompt files, exact mid-phase resume of the rollout
source, PPO and GRPO raising a simple reward on a tiny model, the command and its errors, and a
SIGKILLed run resumed to the same weights (e2e)."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _align_fixtures import MY_DOCS, synthetic_pairs, tiny_model_folder, write_jsonl  # noqa: E402

from chatforge.commands.main import main  # noqa: E402
from chatforge.errors import ChatforgeError  # noqa: E402
from chatforge.model.folder import load_model  # noqa: E402
from chatforge.model.heads import hidden_states  # noqa: E402
from chatforge.model.lora import apply_lora  # noqa: E402
from chatforge.options import build, defaults  # noqa: E402
from chatforge.train import ppo, reward, rollouts  # noqa: E402
from chatforge.train.rl_losses import (AdaptiveKLController, clipped_policy_loss, clipped_value_loss, gae,  # noqa: E402
                                       group_advantages, kl_estimate, masked_mean, token_rewards, whiten)

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------------------------------------
# The losses, on values worked out by hand


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_gae_on_hand_values_and_padding():
    # gamma 1, lambda 0.5: delta = (-0.1, -0.1, 0.7); A2 = 0.7, A1 = -0.1 + 0.5 * 0.7, A0 = -0.1 + 0.5 * 0.25.
    rewards, values = t([0.0, 0.0, 1.0], [0.0, 2.0, 9.0]), t([0.5, 0.4, 0.3], [1.0, 0.5, 7.0])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    assert adv[0].tolist() == pytest.approx([0.025, 0.25, 0.7])
    assert ret[0].tolist() == pytest.approx([0.525, 0.65, 1.0])
    # Row 2 ends after two tokens: its padding (reward 9, value 7) is never looked at.
    # delta1 = 2 - 0.5 = 1.5; delta0 = 0 + 0.5 - 1 = -0.5; A0 = -0.5 + 0.5 * 1.5 = 0.25.
    assert adv[1].tolist() == pytest.approx([0.25, 1.5, 0.0]) and ret[1].tolist() == pytest.approx([1.25, 2.0, 0.0])
    # gamma 0.9, lambda 1: A_t = discounted return - V_t.
    adv, _ = gae(t([1.0, 1.0]), t([0.0, 0.0]), torch.ones(1, 2, dtype=torch.bool), gamma=0.9, lam=1.0)
    assert adv[0].tolist() == pytest.approx([1.9, 1.0])


def test_clipped_policy_loss_on_hand_values():
    # ratios 1.5, 0.5, 0.5, 1.5 with advantages +1, +1, -1, -1 and clip 0.2: the per-token losses are
    # max(-1.5, -1.2) = -1.2 (clipped), max(-0.5, -0.8) = -0.5, max(0.5, 0.8) = 0.8 (clipped), max(1.5, 1.2) = 1.5.
    ratio = t([1.5, 0.5, 0.5, 1.5, 3.0])
    old = torch.zeros_like(ratio)
    adv = t([1.0, 1.0, -1.0, -1.0, 5.0])
    mask = torch.tensor([[True, True, True, True, False]])           # the last token is padding
    loss, clipped = clipped_policy_loss(ratio.log(), old, adv, mask, clip=0.2)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 0.8 + 1.5) / 4) and clipped.item() == pytest.approx(0.5)
    # At ratio 1 the loss is -mean(A) and its gradient -A / n: the policy-gradient estimate.
    logp = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    every = torch.ones(1, 2, dtype=torch.bool)
    loss, _ = clipped_policy_loss(logp, torch.zeros(1, 2, dtype=torch.float64), t([2.0, -1.0]), every)
    loss.backward()
    assert loss.item() == pytest.approx(-0.5) and logp.grad.tolist() == [[-1.0, 0.5]]


def test_clipped_value_loss_on_hand_values():
    # old 0.5, clip 0.2: V = 1.0 -> clipped 0.7, (1-2)^2 = 1 < (0.7-2)^2 = 1.69; V = 0 -> clipped 0.3, 0 < 0.09.
    every = torch.ones(1, 2, dtype=torch.bool)
    loss, clipped = clipped_value_loss(t([1.0, 0.0]), t([0.5, 0.5]), t([2.0, 0.0]), every, 0.2)
    assert loss.item() == pytest.approx(0.5 * (1.69 + 0.09) / 2) and clipped.item() == 1.0
    # Inside the clip range the clipped and plain values agree: 0.5 * mean squared error.
    loss, clipped = clipped_value_loss(t([0.6, 0.4]), t([0.5, 0.5]), t([1.6, 0.4]), every, 0.2)
    assert loss.item() == pytest.approx(0.5 * (1.0 + 0.0) / 2) and clipped.item() == 0.0


def test_kl_estimators_on_hand_values():
    logp, ref = t([math.log(0.5)]), t([math.log(0.25)])               # r = ref - logp = log 0.5
    assert kl_estimate(logp, ref, "k1").item() == pytest.approx(math.log(2))
    assert kl_estimate(logp, ref, "k2").item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert kl_estimate(logp, ref, "k3").item() == pytest.approx(0.5 - 1 + math.log(2))
    assert kl_estimate(ref, logp, "k3").item() == pytest.approx(2 - 1 - math.log(2))      # never negative
    assert kl_estimate(ref, ref, "k3").item() == 0.0
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_estimate(logp, ref, "k4")
    # Averaged over samples from pi, k1 and k3 both estimate KL(pi || ref): p = (0.75, 0.25), q = (0.5, 0.5).
    p, q = torch.tensor([0.75, 0.25], dtype=torch.float64), torch.tensor([0.5, 0.5], dtype=torch.float64)
    exact = (p * (p / q).log()).sum()
    for kind in ("k1", "k3"):
        assert (p * kl_estimate(p.log(), q.log(), kind)).sum().item() == pytest.approx(exact.item())


def test_adaptive_kl_controller_on_hand_values():
    c = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    assert c.update(9.0, 256) == pytest.approx(0.2 * (1 + 0.2 * 256 / 10000))         # error 0.5, clipped to 0.2
    c = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    assert c.update(3.0, 256) == pytest.approx(0.2 * (1 - 0.2 * 256 / 10000))         # error -0.5 -> -0.2
    c = AdaptiveKLController(0.2, target=6.0, horizon=100)
    assert c.update(6.6, 50) == pytest.approx(0.2 * (1 + 0.1 * 0.5))                  # error 0.1, inside the clip
    fixed = AdaptiveKLController(0.2, target=None)
    assert fixed.update(100.0, 256) == 0.2


def test_token_rewards_group_advantages_and_whitening():
    mask = torch.tensor([[True, True, False], [True, False, False]])
    logp, ref = t([-1.0, -2.0, 0.0], [-1.0, 0.0, 0.0]), t([-1.5, -1.0, 0.0], [-0.5, 0.0, 0.0])
    rewards = token_rewards(t(3.0, -1.0).view(2), logp, ref, mask, kl_coef=0.1)
    # -0.1 * (logp - ref) on each token, the score on the last one.
    assert torch.allclose(rewards, t([-0.05, 0.1 + 3.0, 0.0], [0.05 - 1.0, 0.0, 0.0]))
    adv = group_advantages(t([1.0, 2.0, 3.0], [5.0, 5.0, 5.0]))
    assert adv[0].tolist() == pytest.approx([-1 / 1.0001, 0.0, 1 / 1.0001]) and adv[1].tolist() == [0.0, 0.0, 0.0]
    w = whiten(t([1.0, 3.0, 100.0]), torch.tensor([[True, True, False]]))
    assert w[0].tolist() == pytest.approx([-1.0, 1.0, 0.0], abs=1e-6)
    assert masked_mean(t([1.0, 5.0]), torch.tensor([[True, False]])).item() == 1.0


# ---------------------------------------------------------------------------------------------
# The model side


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("ppo") / "base")


def test_reply_forward_computes_what_plain_passes_compute(tiny):
    model, tok = load_model(tiny)
    torch.manual_seed(0)
    head = rollouts.PolicyValue(model, value_head=True).value_head
    torch.nn.init.normal_(head.proj.weight)
    prompts = [tok.render_chat([{"role": "user", "content": q}], add_generation_prompt=True)[0]
               for q in ("Is my printer working?", "How do I restore a backup from last week?")]
    responses = [tok.encode(s) for s in ("Yes it is.", "Open the app", "No.", "Restore it from the archive today")]
    responses[0].append(tok.im_end_id)
    batch = rollouts.collate(prompts, [responses[0], responses[1], responses[2], responses[3]], tok.pad_id)
    with torch.no_grad():
        logps, values, entropy = rollouts.response_forward(model, batch, temperature=0.7, value_head=head)
        for r, resp in enumerate(responses):                   # row r answers prompt r % 2
            ids = torch.tensor([prompts[r % 2] + resp])
            logits, _ = model(ids)
            before = logits[0, len(prompts[r % 2]) - 1:-1].float() / 0.7
            want = torch.log_softmax(before, -1)[torch.arange(len(resp)), torch.tensor(resp)]
            assert torch.allclose(logps[r, :len(resp)], want, atol=1e-5)
            assert (logps[r, len(resp):] == 0).all() and (values[r, len(resp):] == 0).all()
            p = torch.softmax(before, -1)
            assert torch.allclose(entropy[r, :len(resp)], -(p * p.log()).sum(-1), atol=1e-4)
            h = hidden_states(model, ids)[0, len(prompts[r % 2]) - 1:-1]
            assert torch.allclose(values[r, :len(resp)], head(h), atol=1e-5)


def test_reference_is_the_base_without_its_adapters(tiny):
    model, tok = load_model(tiny)
    ids = torch.tensor([tok.encode("Is my router working today?")])
    with torch.no_grad():
        base = model(ids)[0]
        apply_lora(model, 4, 8.0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
        adapted = model(ids)[0]
        with rollouts.adapters_off(model):
            off = model(ids)[0]
        again = model(ids)[0]
    assert not torch.allclose(adapted, base, atol=1e-3)
    assert torch.equal(off, base) and torch.equal(again, adapted)


def test_the_engines_copy_follows_the_policy(tiny):
    model, tok = load_model(tiny)
    plain = load_model(tiny)[0]
    torch.manual_seed(0)
    apply_lora(model, 4, 8.0)
    with_adapters = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:                        # training moved the adapters
                p.normal_(std=0.1)
    ids = torch.tensor([tok.encode("Is my router working today?")])
    rollouts.refresh_weights(plain, model)              # merged into a plain model
    rollouts.refresh_weights(with_adapters, model)      # the adapters alone
    with torch.no_grad():
        want = model(ids)[0]
        assert torch.equal(with_adapters(ids)[0], want)
        assert torch.allclose(plain(ids)[0], want, atol=1e-5)


def test_prompt_files_and_grounding(tiny, tmp_path):
    _, tok = load_model(tiny)
    good = write_jsonl(tmp_path / "p.jsonl", [
        {"question": "How do I restore a backup?"},
        {"prompt": "Is my printer working?"},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
        {"messages": [{"role": "user", "content": "Where are my files?"}, {"role": "assistant", "content": "Here."}],
         "source": "x"}])
    prompts = ppo.read_prompts(good)
    assert [p[-1]["content"] for p in prompts] == ["How do I restore a backup?", "Is my printer working?", "Hi",
                                                  "Where are my files?"]
    assert prompts[3] == [{"role": "user", "content": "Where are my files?"}]   # the reply after it dropped
    from chatforge.retrieval import GROUNDED_SYSTEM_PROMPT, PassageIndex
    grounded = ppo.ground(prompts, PassageIndex.load_or_build([MY_DOCS]), tok, budget=200)
    assert grounded[0][0] == {"role": "system", "content": GROUNDED_SYSTEM_PROMPT}
    assert grounded[0][-1]["content"].startswith("Context:\n[1] (source: ")
    assert grounded[0][-1]["content"].endswith("\n\nQuestion: How do I restore a backup?")
    assert ppo.ground(grounded[:1], None, tok, 200) == grounded[:1]            # already grounded: kept
    for line, why in [("[1, 2]", "expected a JSON object"), ('{"text": "hi"}', 'expected {"messages"'),
                      ('{"question": ""}', "non-empty string"), ('{"prompt": "  "}', '"prompt" is empty'),
                      ('{"messages": [{"role": "assistant", "content": "x"}]}', "no user turn"),
                      ('{"prompt": [{"role": "user", "content": 3}]}', "content"), ("{oops", "not valid JSON")]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"question": "ok?"}\n\n' + line + "\n")
        with pytest.raises(ChatforgeError, match=f"bad.jsonl:3: .*{why[:12]}"):
            ppo.read_prompts(bad)


# ---------------------------------------------------------------------------------------------
# Runs on the tiny model


class HighIdsReward:
    """A stand-in reward model: the share of the reply's last `n` tokens whose id is in the upper
    half of the vocabulary (a random tiny model writes about half), so learning shows in seconds."""

    def __init__(self, tok, n: int):
        self.tokenizer, self.n, self.half = tok, n, tok.vocab_size // 2

    def score_ids(self, sequences):
        tail = [[t for t in s if t != self.tokenizer.im_end_id][-self.n:] for s in sequences]
        return torch.tensor([sum(t >= self.half for t in s) / len(s) for s in tail], dtype=torch.float32)


def run_options(**kw) -> dict:
    return {**dict(phases=8, rollout_prompts=8, minibatch=4, epochs=2, max_new_tokens=8, precision="fp32",
                   device="cpu", rollout_dtype="fp32", lr=3e-2, seed=0, max_eval_prompts=4, eval_every=4,
                   holdout=0.2), **kw}


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    questions = [f"Is my {p['prompt'][0]['content'].split()[2]} working number {i}?"
                 for i, p in enumerate(synthetic_pairs(40))]
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "q.jsonl", [{"question": q} for q in questions])


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_ppo_and_grpo_raise_a_simple_reward(tiny, prompts_file, tmp_path, monkeypatch, algo):
    _, tok = load_model(tiny)
    monkeypatch.setattr(ppo, "load_reward_model", lambda folder, device="cpu": HighIdsReward(tok, 8))
    out = tmp_path / algo
    # Full fine-tuning: the random tiny model's logits are nearly flat, and only its (tied) output
    # embedding moves them fast. A low KL target with a short horizon makes the coefficient react.
    report = ppo.run_ppo(tiny, "unused", prompts_file, out, **run_options(algo=algo, method="full", kl_target=2.0,
                                                                            kl_horizon=16))
    metrics = rows(out)
    assert len(metrics) == report["steps"] == 8 * 2 * 2
    phase_rewards = [r["reward"] for r in metrics[::4]]            # 4 steps a phase
    assert sum(phase_rewards[-2:]) / 2 > phase_rewards[0] + 0.1, phase_rewards
    # Each phase's KL moves the next phase's beta: up above the target (2), down below it.
    phases = metrics[::4]
    assert any(p["kl"] > 2.0 for p in phases)
    for now, after in zip(phases, phases[1:]):
        assert (after["kl_coef"] > now["kl_coef"]) == (now["kl"] > 2.0), (now, after)
    keys = {"loss", "policy_loss", "clip_fraction", "entropy", "approx_kl", "reward", "kl", "kl_coef", "length",
            "distinct", "truncated"} | ({"value_loss", "value_clip_fraction"} if algo == "ppo" else set())
    assert keys <= set(metrics[-1]), set(metrics[-1])
    assert metrics[0]["kl"] == pytest.approx(0.0, abs=1e-5) and metrics[-1]["kl"] > 0   # starts at the reference
    held = report["heldout"]
    assert [h["step"] for h in held] == [0, 16, 32] and held[-1]["reward_sampled"] > held[0]["reward_sampled"] + 0.15
    assert report["eval_prompts"] == 4 and report["train_prompts"] == 36
    model, _ = load_model(out)                                # a plain model folder, adapters merged
    assert not any("lora" in n for n, _ in model.named_parameters())


def test_rollout_source_resumes_mid_phase_exactly(tiny, prompts_file):
    from chatforge.infer.engine import Engine  # noqa: F401  (the source builds one)

    model, tok = load_model(tiny)
    o = build(ppo.PPOConfig, {**run_options(), "samples": 2, "kl_coef": 0.2, "algo": "ppo"}).rollout

    def source():
        m, _ = load_model(tiny)
        torch.manual_seed(0)
        apply_lora(m, 4, 8.0)
        rollout_model = copy.deepcopy(m).requires_grad_(False)      # as run_ppo makes it
        module = rollouts.PolicyValue(m, value_head=True)
        prompts = [tok.render_chat(p, add_generation_prompt=True)[0] for p in ppo.read_prompts(prompts_file)]
        return rollouts.Rollouts(module, tok, HighIdsReward(tok, 8), prompts, prompts[:2], o, torch.device("cpu"),
                                 "fp32", rollout_model)
    a = source()
    a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))
    assert state["data"] is not None and state["position"] == 1 and len(state["heldout"]) == 1
    b = source()
    b.load_state_dict(state)
    for _ in range(6):                                         # the rest of this phase, then a new one
        x, y = a.next_batch(), b.next_batch()
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert a.phase == b.phase == 2 and a.state_dict() == b.state_dict()
    o = dataclasses.replace(o, samples=3)                      # another run's options
    with pytest.raises(ChatforgeError, match="--samples was 2; resume with the same options"):
        source().load_state_dict(state)
    o = dataclasses.replace(o, samples=2)
    other = source()
    other.eval_prompts = other.eval_prompts[:1]                # another prompt set
    with pytest.raises(ChatforgeError, match="the prompts .* changed since the run was saved"):
        other.load_state_dict(state)


def test_command_help_and_errors(tiny, prompts_file, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["ppo", "--help"])
    assert "examples:\n  chatforge ppo --policy runs/demo/sft --reward" in capsys.readouterr().out
    assert main(["ppo", "--reward", "x", "--prompts", str(prompts_file)]) == 2
    assert "pass --policy DIR" in capsys.readouterr().err
    assert main(["ppo", "--policy", str(tiny), "--reward", str(tiny), "--prompts", str(prompts_file)]) == 2
    assert "not a reward model folder" in capsys.readouterr().err
    assert main(["ppo", "--policy", str(tiny), "--reward", "x", "--prompts", str(prompts_file), "--algo", "grpo",
                 "--samples", "1"]) == 2
    assert "give --samples 2 or more" in capsys.readouterr().err
    settings = tmp_path / "ppo.yaml"                            # YAML keys are the flat names
    settings.write_text("algo: grpo\nsamples: 1\nlora-rank: 4\n")
    assert main(["ppo", "--config", str(settings), "--policy", str(tiny), "--reward", "x", "--prompts",
                 str(prompts_file)]) == 2
    assert "give --samples 2 or more" in capsys.readouterr().err
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "ok?"}, {"answer": "no question"}])
    with pytest.raises(ChatforgeError, match="bad.jsonl:2"):
        ppo.read_prompts(bad)


def test_config_defaults_and_checks(capsys):
    d = defaults(ppo.PPOConfig)
    assert (d["algo"], d["samples"], d["kl_coef"], d["phases"], d["schedule"], d["lora_rank"]) == \
        ("ppo", None, None, 20, "constant", 8)
    grpo = build(ppo.PPOConfig, {"algo": "grpo"}).rollout.resolved()       # the algorithm's defaults
    assert (grpo.samples, grpo.kl_coef) == (4, 0.04)
    assert build(ppo.PPOConfig, {"kl_coef": 0.5}).rollout.resolved().kl_coef == 0.5
    for options, why in [({"minibatch": 32}, "--minibatch cannot exceed --rollout-prompts"),
                         ({"lora_dropout": 0.1}, "no LoRA dropout"), ({"clip": 1.5}, "--clip must be in"),
                         ({"phases": 0}, "--phases must be at least 1"), ({"holdout": 1.0}, "--holdout"),
                         ({"kl_target": -1.0}, "--kl-target must be >= 0"), ({"rollout_dtype": "fp8"}, "fp32")]:
        with pytest.raises(ChatforgeError, match=why):
            build(ppo.PPOConfig, options)
    with pytest.raises(SystemExit):             # the command has no --lora-dropout
        main(["ppo", "--lora-dropout", "0.1"])
    assert "unrecognized arguments: --lora-dropout" in capsys.readouterr().err


@pytest.fixture(scope="module")
def reward_folder(tiny, tmp_path_factory):
    """A real reward model on the tiny model: its head trained alone on the synthetic pairs."""
    tmp = tmp_path_factory.mktemp("rm")
    prefs = write_jsonl(tmp / "prefs.jsonl", synthetic_pairs(48))
    reward.train_reward_model(tiny, prefs, tmp / "rm", method="freeze", freeze_top=0, steps=20, precision="fp32",
                              device="cpu", seed=0)
    return tmp / "rm"


def test_command_with_documents_and_a_reward_model_folder(tiny, reward_folder, prompts_file, tmp_path, capsys):
    out = tmp_path / "grpo"
    assert main(["ppo", "--policy", str(tiny), "--reward", str(reward_folder), "--prompts", str(prompts_file),
                 "--out", str(out), "--algo", "grpo", "--docs", str(MY_DOCS), "--context-tokens", "64",
                 "--phases", "2", "--rollout-prompts", "2", "--minibatch", "1", "--epochs", "1",
                 "--max-new-tokens", "8", "--precision", "fp32", "--device", "cpu", "--max-eval-prompts", "2"]) == 0
    printed = capsys.readouterr().out
    assert "grpo (lora): 38 prompts, 2 held out; 2 phases of 2 prompts x 4 replies" in printed
    report = json.loads((out / "ppo.json").read_text())
    assert report["grounded"] and report["prompt_tokens"]["min"] > 100          # passages in every prompt
    assert report["options"]["samples"] == 4 and report["options"]["kl_coef"] == 0.04
    assert [h["step"] for h in report["heldout"]] == [0, 4] and len(rows(out)) == 4
    load_model(out)


# ---------------------------------------------------------------------------------------------
# The command end to end: SIGKILL, then --resume


@pytest.mark.e2e
def test_sigkilled_run_resumes_to_the_same_weights(tiny, reward_folder, prompts_file, tmp_path):
    def cmd(out: Path, *extra: str) -> list[str]:
        return [PY, "-m", "chatforge", "ppo", "--policy", str(tiny), "--reward", str(reward_folder), "--prompts",
                str(prompts_file), "--out", str(out), "--phases", "10", "--rollout-prompts", "4", "--minibatch", "2",
                "--epochs", "1", "--max-new-tokens", "8", "--precision", "fp32", "--rollout-dtype", "fp32",
                "--device", "cpu", "--lr", "1e-2", "--max-eval-prompts", "2", "--eval-every", "4", *extra]
    subprocess.run(cmd(tmp_path / "full"), check=True, env=ENV, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cmd(killed), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state, step, deadline = killed / "last" / "state.json", 0, time.time() + 120
    while step < 6 and time.time() < deadline and proc.poll() is None:   # 2 steps a phase: kill after phase 3
        try:
            step = json.loads(state.read_text())["step"]
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert 6 <= json.loads(state.read_text())["step"] < 20
    subprocess.run(cmd(killed, "--resume"), check=True, env=ENV, capture_output=True)
    from safetensors.torch import load_file
    a = load_file(str(tmp_path / "full" / "last" / "model.safetensors"))
    b = load_file(str(killed / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    full, resumed = rows(tmp_path / "full"), rows(killed)
    assert [r["step"] for r in resumed] == list(range(1, 21))
    for key in ("loss", "reward", "kl", "kl_coef"):
        assert [r[key] for r in full] == pytest.approx([r[key] for r in resumed], abs=1e-6), key
    report_a, report_b = (json.loads((d / "ppo.json").read_text()) for d in (tmp_path / "full", killed))
    assert report_a["heldout"] == report_b["heldout"] and len(report_a["heldout"]) == 4   # phases 0, 4, 8 and the end
    load_model(killed)
