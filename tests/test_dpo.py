"""DPO: the pair layout equals two separate passes, the losses on hand-computed values and against
TRL's DPOTrainer, the reference cached once, training raises the reward accuracy, resume, the CLI."""

from __future__ import annotations

import copy
import json
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _align_fixtures import synthetic_pairs, tiny_model_folder, write_jsonl  # noqa: E402

from chatforge.commands.main import main  # noqa: E402
from chatforge.data.prefs import parse_preference  # noqa: E402
from chatforge.errors import ChatforgeError  # noqa: E402
from chatforge.model.folder import load_model  # noqa: E402
from chatforge.train import dpo  # noqa: E402
from chatforge.train.pairs import (ReplyLogProbs, encode_pairs, make_pair_batch, reply_attention_mask,  # noqa: E402
                                   reply_token_logps, side_sums)

CPU = torch.device("cpu")
PAIRS = [
    {"prompt": "How do I reset my password?", "chosen": "Open the sign-in page and choose Forgot password.",
     "rejected": "Write to support."},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Is my backup working?"}],
     "chosen": [{"role": "assistant", "content": "Your backup is working and good."}],
     "rejected": [{"role": "assistant", "content": "Your backup is working and poor, and it has been for a while."}]},
    {"prompt": "Is my printer working?", "chosen": "Your printer is working.", "rejected": "No."},
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tiny_model_folder(tmp_path_factory.mktemp("dpo") / "base")
    model, tok = load_model(folder)
    return folder, model, tok


def separate_logps(model, tok, pref, side: str) -> float:
    """The reply's summed log-probability from a plain forward over prompt + reply."""
    ids, mask = tok.render_chat(pref.conversation(side))
    x = torch.tensor([ids])
    with torch.no_grad():
        logits, _ = model(x)
    logps = torch.log_softmax(logits[0, :-1].double(), -1).gather(1, x[0, 1:, None])[:, 0]
    return float(sum(v for v, m in zip(logps.tolist(), mask[1:]) if m))


# ---------------------------------------------------------------------------------------------
# The layout


def test_pair_rows_compute_what_two_separate_passes_compute(tiny):
    _, model, tok = tiny
    prefs = [parse_preference(p) for p in PAIRS]
    examples, stats = encode_pairs(prefs, tok, 200)
    assert stats.kept == 3 and all(e.length < e.pair_tokens for e in examples)
    batch = make_pair_batch(examples, tok.pad_id)          # prompts and replies of different lengths: padded
    with torch.no_grad():
        chosen, rejected = side_sums(reply_token_logps(model, batch), batch)
    for i, pref in enumerate(prefs):
        assert chosen[i].item() == pytest.approx(separate_logps(model, tok, pref, "chosen"), abs=1e-4)
        assert rejected[i].item() == pytest.approx(separate_logps(model, tok, pref, "rejected"), abs=1e-4)
    # Each reply ends with its <|im_end|> (where a reward model reads).
    assert (batch["reply_ids"].gather(1, batch["reply_len"][:, None] - 1) == tok.im_end_id).all()


def test_reply_mask_hides_the_prompt_padding_and_the_future():
    mask = reply_attention_mask(torch.tensor([2, 3]), P=3, R=2)[:, 0].int().tolist()     # rows: 2 chosen, 2 rejected
    assert mask[0] == mask[2] == [[1, 1, 0, 1, 0], [1, 1, 0, 1, 1]]      # prompt 0 has 2 real tokens
    assert mask[1] == mask[3] == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]


def test_too_long_pairs_are_cut_from_the_left_or_dropped(tiny):
    _, _, tok = tiny
    pref = parse_preference(PAIRS[1])
    (full,), _ = encode_pairs([pref], tok, 1000)
    limit = len(full.prompt) + len(full.rejected) - 5
    (cut,), stats = encode_pairs([pref], tok, limit)
    assert stats.truncated == 1 and cut.prompt == full.prompt[5:] and cut.rejected == full.rejected
    (gone,), stats = encode_pairs([pref], tok, limit, truncate="drop")
    assert gone is None and stats.dropped == 1
    (gone,), stats = encode_pairs([pref], tok, len(full.rejected))      # the reply alone fills it
    assert gone is None and stats.dropped == 1


# ---------------------------------------------------------------------------------------------
# The losses


def test_losses_on_hand_computed_values():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-1.0, -3.0, -2.0, -2.0))    # h = 1 - (-1) = 2
    n_c, n_r = torch.tensor([2.0]), torch.tensor([4.0])
    losses, reward_c, reward_r = dpo.dpo_losses(pc, pr, rc, rr, 0.5, "sigmoid")
    assert losses.item() == pytest.approx(math.log1p(math.exp(-1.0)))       # -log sigmoid(0.5 * 2)
    assert (reward_c.item(), reward_r.item()) == (0.5, -0.5)
    assert dpo.dpo_losses(pc, pr, rc, rr, 0.5, "hinge")[0].item() == 0.0      # max(0, 1 - 1)
    assert dpo.dpo_losses(pc, pr, rc, rr, 0.25, "hinge")[0].item() == pytest.approx(0.5)
    # ipo: per-token means 1/2 - (-1/4) = 0.75, target 1 / (2 * 0.5) = 1
    assert dpo.dpo_losses(pc, pr, rc, rr, 0.5, "ipo", n_c, n_r)[0].item() == pytest.approx(0.0625)
    with pytest.raises(ValueError, match="token counts"):
        dpo.dpo_losses(pc, pr, rc, rr, 0.5, "ipo")
    kl = dpo.kl_k3(torch.tensor([-1.0, -2.0, 5.0]), torch.tensor([-1.0, -1.0, 0.0]), torch.tensor([True, True, False]))
    assert kl.item() == pytest.approx((math.e - 2) / 2)                      # d = 0 and 1


@pytest.mark.parametrize("loss_type, beta", [("sigmoid", 0.1), ("sigmoid", 0.5), ("ipo", 0.5), ("hinge", 0.1)])
def test_loss_and_rewards_equal_trl(tiny, tmp_path, loss_type, beta):
    """Same tiny model, batch and beta: chatforge's loss and rewards equal TRL DPOTrainer's within 1e-5."""
    transformers = pytest.importorskip("transformers")
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    folder, ref, tok = tiny
    policy = copy.deepcopy(ref)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))

    def hf(model):
        twin = transformers.LlamaForCausalLM(transformers.LlamaConfig(**model.hf_config())).eval()
        twin.load_state_dict(model.hf_state_dict(), strict=False)
        return twin

    prefs = [parse_preference(p) for p in PAIRS]
    examples, _ = encode_pairs(prefs, tok, 200)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = trl.DPOConfig(output_dir=str(tmp_path), beta=beta, loss_type=[loss_type], use_cpu=True,
                             report_to="none", bf16=False, gradient_checkpointing=False)
        trainer = trl.DPOTrainer(model=hf(policy), ref_model=hf(ref), args=args,
                                 train_dataset=Dataset.from_list([p.to_record() for p in prefs]),
                                 processing_class=transformers.AutoTokenizer.from_pretrained(folder))
        # The same token ids on both sides: the prompt, then each reply through its <|im_end|>.
        inputs = trainer.data_collator([{"prompt_ids": e.prompt, "chosen_ids": e.chosen, "rejected_ids": e.rejected}
                                        for e in examples])
        trainer.model.eval()
        with torch.no_grad():
            trl_loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False).item()
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items()}

    ref_logps = dpo.reference_logps(ref, examples, 8, tok.pad_id, CPU, "fp32")
    with torch.no_grad():
        loss, n, metrics = dpo.make_loss_fn(beta, loss_type)(ReplyLogProbs(policy),
                                                             make_pair_batch(examples, tok.pad_id, ref_logps))
    assert n == 3
    assert loss.item() == pytest.approx(trl_loss, abs=1e-5)
    assert metrics["rewards_chosen"].item() == pytest.approx(trl_metrics["rewards/chosen"], abs=1e-5)
    assert metrics["rewards_rejected"].item() == pytest.approx(trl_metrics["rewards/rejected"], abs=1e-5)
    assert metrics["reward_margin"].item() == pytest.approx(trl_metrics["rewards/margins"], abs=1e-5)
    assert metrics["reward_accuracy"].item() == pytest.approx(trl_metrics["rewards/accuracies"], abs=1e-6)
    assert metrics["logps_chosen"].item() == pytest.approx(trl_metrics["logps/chosen"], abs=1e-4)
    assert metrics["logps_rejected"].item() == pytest.approx(trl_metrics["logps/rejected"], abs=1e-4)


# ---------------------------------------------------------------------------------------------
# Training


def dpo_options(**kw) -> dict:
    base = dict(steps=24, lr=1e-2, batch_size=8, warmup=2, precision="fp32", device="cpu", val_fraction=0.25,
                eval_every=12, seed=0)
    return {**base, **kw}


@pytest.fixture(scope="module")
def prefs_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("prefs") / "prefs.jsonl", synthetic_pairs(64))


def metric_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_lora_dpo_learns_the_preference_and_reuses_its_reference(tiny, prefs_file, tmp_path, capsys):
    folder, base_model, _ = tiny
    out = tmp_path / "dpo"
    report = dpo.run_dpo(folder, prefs_file, out, **dpo_options())
    rows = metric_rows(out)
    train_rows, val_rows = [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]
    for key in ("reward_accuracy", "reward_margin", "rewards_chosen", "rewards_rejected", "logps_chosen",
                "logps_rejected", "kl"):
        assert key in train_rows[0] and f"val_{key}" in val_rows[-1]
    assert train_rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)     # the policy starts as the reference
    assert train_rows[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert report["validation"]["reward_accuracy"] == 1.0 and report["validation"]["loss"] < 0.6
    assert report["validation"]["kl"] > 0 and report["train_pairs"] + report["val_pairs"] == 64
    # The output is a plain model folder that prefers the chosen replies more than the base did.
    trained, tok = load_model(out)
    pref = parse_preference(synthetic_pairs(1)[0])
    margin = {name: separate_logps(m, tok, pref, "chosen") - separate_logps(m, tok, pref, "rejected")
              for name, m in (("base", base_model), ("dpo", trained))}
    assert margin["dpo"] > margin["base"] + 1.0
    assert json.loads((out / "dpo.json").read_text())["loss"] == "sigmoid"
    # A second run on the same base and pairs reads the cached reference.
    capsys.readouterr()
    dpo.run_dpo(folder, prefs_file, tmp_path / "again", **dpo_options(steps=1, eval_every=1))
    (tmp_path / "again" / dpo.REFERENCE_FILE).write_bytes((out / dpo.REFERENCE_FILE).read_bytes())
    dpo.run_dpo(folder, prefs_file, tmp_path / "again", **dpo_options(steps=1, eval_every=1))
    assert "reference log-probabilities from" in capsys.readouterr().out


def test_reference_cache_is_checked(tiny, tmp_path):
    folder, model, tok = tiny
    examples, _ = encode_pairs([parse_preference(p) for p in PAIRS], tok, 200)
    values = dpo.reference_logps(model, examples, 2, tok.pad_id, CPU, "fp32")
    path = tmp_path / dpo.REFERENCE_FILE
    dpo.save_reference(path, values, "abc")
    loaded = dpo.load_reference(path, "abc")
    assert all(torch.equal(a, b) for a, b in zip(values, loaded))
    assert dpo.load_reference(path, "other") is None                        # another base, pairs or precision
    path.write_bytes(b"not safetensors")
    assert dpo.load_reference(path, "abc") is None
    assert dpo.reference_fingerprint(folder, examples, "fp32") != dpo.reference_fingerprint(folder, examples[:2], "fp32")


def test_full_dpo_and_resume(tiny, prefs_file, tmp_path):
    folder, _, _ = tiny
    out = tmp_path / "full"
    dpo.run_dpo(folder, prefs_file, out, **dpo_options(method="full", lr=3e-3, steps=4, eval_every=2, loss="ipo"))
    assert json.loads((out / "last" / "state.json").read_text())["step"] == 4
    report = dpo.run_dpo(folder, prefs_file, out, **dpo_options(method="full", lr=3e-3, steps=6, eval_every=2,
                                                               loss="ipo", resume=True))
    assert report["steps"] == 6 and [r["step"] for r in metric_rows(out) if "loss" in r][-2:] == [5, 6]
    load_model(out)


def test_cli_help_and_errors(tiny, prefs_file, tmp_path, capsys):
    folder, _, _ = tiny
    with pytest.raises(SystemExit):
        main(["dpo", "--help"])
    help_text = capsys.readouterr().out
    assert "chatforge dpo --base runs/demo/sft --prefs" in help_text and "--beta" in help_text
    assert main(["dpo", "--base", str(folder), "--out", str(tmp_path / "x")]) == 2
    assert "pass --prefs FILE.jsonl" in capsys.readouterr().err
    assert main(["dpo", "--base", str(folder), "--prefs", str(prefs_file), "--beta", "0"]) == 2
    assert "--beta must be positive" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a"}\n', encoding="utf-8")
    assert main(["dpo", "--base", str(folder), "--prefs", str(bad)]) == 2
    assert "bad.jsonl:1: missing 'rejected'" in capsys.readouterr().err
    with pytest.raises(ChatforgeError, match="unknown dpo option"):
        dpo.run_dpo(folder, prefs_file, tmp_path / "y", betta=0.1)
    assert main(["dpo", "--base", str(folder), "--prefs", str(prefs_file), "--out", str(tmp_path / "cli"),
                 "--steps", "2", "--precision", "fp32", "--lr", "1e-3"]) == 0
    load_model(tmp_path / "cli")
