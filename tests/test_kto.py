"""KTO: the loss on hand-computed values and against TRL's KTOTrainer on the same rows and tiny
model, the rows file (TRL's unpaired formats and pairs), training moves the model towards the
desirable replies, the CLI."""

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
from chatforge.data.unpaired import parse_unpaired, read_unpaired  # noqa: E402
from chatforge.errors import ChatforgeError  # noqa: E402
from chatforge.model.folder import load_model  # noqa: E402
from chatforge.train import dpo, kto  # noqa: E402
from chatforge.train.pairs import make_pair_batch, reply_token_logps  # noqa: E402

CPU = torch.device("cpu")
ROWS = [
    {"prompt": "How do I reset my password?", "completion": "Open the sign-in page and choose Forgot password.",
     "label": True},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Is my backup working?"}],
     "completion": [{"role": "assistant", "content": "Your backup is working and poor, and it has been for a while."}],
     "label": False},
    {"prompt": "Is my printer working?", "completion": "Your printer is working.", "label": True},
    {"prompt": "Is my router working?", "completion": "No.", "label": False},
    {"prompt": "Is my laptop working today?", "completion": "Your laptop is working today and good.", "label": False},
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tiny_model_folder(tmp_path_factory.mktemp("kto") / "base")
    model, tok = load_model(folder)
    return folder, model, tok


def test_loss_on_hand_computed_values():
    policy, ref = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -2.0])        # r = 1 and -1
    labels, kl = torch.tensor([True, False]), torch.tensor(0.5)
    losses, rewards = kto.kto_losses(policy, ref, labels, kl, beta=0.5, desirable_weight=2.0, undesirable_weight=1.0)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert losses[0].item() == pytest.approx(2.0 * (1 - sig(0.5 * (1 - 0.5))))
    assert losses[1].item() == pytest.approx(1 - sig(0.5 * (0.5 + 1)))
    assert rewards.tolist() == [0.5, -0.5]
    # z: the mean mismatched log-ratio, never below 0, carries no gradient.
    p = torch.tensor([-1.0, -2.0], requires_grad=True)
    z = kto.kl_estimate(p, torch.tensor([-2.0, -2.0]))
    assert z.item() == 0.5 and not z.requires_grad
    assert kto.kl_estimate(torch.tensor([-3.0]), torch.tensor([-1.0])).item() == 0.0


def test_the_kl_rows_run_without_gradients_and_compute_the_same(tiny):
    _, model, tok = tiny
    rows = [r for obj in ROWS for r in parse_unpaired(obj)]
    examples, _ = kto.encode_rows(rows, tok, 200)
    batch = make_pair_batch(kto.with_mismatched(examples, 200), tok.pad_id)
    with torch.no_grad():
        expected = reply_token_logps(model, batch)
    got = kto.kto_token_logps(model, batch)
    assert torch.allclose(got.detach(), expected, atol=1e-5)
    got[len(rows):].sum().backward()          # the mismatched half holds no graph: no gradient flows from it
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    model.zero_grad(set_to_none=True)


def test_rows_file_formats_and_errors(tmp_path):
    rows = parse_unpaired(ROWS[1])
    assert len(rows) == 1 and rows[0].prompt[0]["role"] == "system" and rows[0].label is False
    assert rows[0].question == "Is my backup working?"
    pair = parse_unpaired(synthetic_pairs(1)[0])       # a pair unpairs, as TRL's KTOTrainer does
    assert [r.label for r in pair] == [True, False] and pair[0].completion.endswith("good.")
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS + synthetic_pairs(2))
    assert len(read_unpaired(path)) == 5 + 4
    for bad, why in [({"prompt": "q", "completion": "a"}, "missing 'label'"),
                     ({"prompt": "q", "completion": "a", "label": "yes"}, "must be true or false"),
                     ({"prompt": "q", "completion": " ", "label": True}, "completion is empty")]:
        write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], bad])
        with pytest.raises(ChatforgeError, match=f"bad.jsonl:2: .*{why}"):
            read_unpaired(tmp_path / "bad.jsonl")


@pytest.mark.parametrize("beta, desirable_weight, undesirable_weight", [(0.1, 1.0, 1.0), (0.5, 1.33, 0.8)])
def test_loss_equals_trl(tiny, tmp_path, beta, desirable_weight, undesirable_weight):
    """Same tiny model, rows, mismatched completions and weights: chatforge's loss, KL estimate and
    rewards equal TRL KTOTrainer's within 1e-5."""
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

    rows = [r for obj in ROWS for r in parse_unpaired(obj)]
    examples, _ = kto.encode_rows(rows, tok, 200)
    pairs = kto.with_mismatched(examples, 200)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = trl.KTOConfig(output_dir=str(tmp_path), beta=beta, desirable_weight=desirable_weight,
                             undesirable_weight=undesirable_weight, use_cpu=True, report_to="none", bf16=False,
                             gradient_checkpointing=False, per_device_train_batch_size=len(rows))
        trainer = trl.KTOTrainer(model=hf(policy), ref_model=hf(ref), args=args,
                                 train_dataset=Dataset.from_list([r.to_record() for r in rows]),
                                 processing_class=transformers.AutoTokenizer.from_pretrained(folder))
        # The same token ids on both sides; the mismatched completion of row i is row i - 1's, as
        # TRL's dataset preparation rotates them.
        inputs = trainer.data_collator([{"prompt_ids": e.prompt, "completion_ids": e.completion,
                                         "KL_completion_ids": examples[i - 1].completion, "label": e.label}
                                        for i, e in enumerate(examples)])
        trainer.model.eval()
        with torch.no_grad():
            trl_loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False).item()
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items()}

    ref_logps = dpo.reference_logps(ref, pairs, 8, tok.pad_id, CPU, "fp32")
    loss_fn = kto.make_loss_fn(beta, desirable_weight, undesirable_weight)
    with torch.no_grad():
        loss, n, metrics = loss_fn(kto.KTOLogProbs(policy), kto.make_kto_batch(examples, pairs, tok.pad_id, ref_logps))
    assert n == 5
    assert loss.item() == pytest.approx(trl_loss, abs=1e-5)
    assert metrics["kl"].item() == pytest.approx(trl_metrics["kl"], abs=1e-5)
    assert metrics["rewards_desirable"].item() == pytest.approx(trl_metrics["rewards/chosen"], abs=1e-5)
    assert metrics["rewards_undesirable"].item() == pytest.approx(trl_metrics["rewards/rejected"], abs=1e-5)


# ---------------------------------------------------------------------------------------------
# Training


def kto_options(**kw) -> dict:
    base = dict(steps=24, lr=1e-2, batch_size=8, warmup=2, precision="fp32", device="cpu", val_fraction=0.25, beta=1.0,
                eval_every=12, seed=0)
    return {**base, **kw}


def reply_logp(model, tok, row) -> float:
    ids, mask = tok.render_chat(row.conversation())
    x = torch.tensor([ids])
    with torch.no_grad():
        logits, _ = model(x)
    logps = torch.log_softmax(logits[0, :-1].double(), -1).gather(1, x[0, 1:, None])[:, 0]
    return float(sum(v for v, m in zip(logps.tolist(), mask[1:]) if m))


def test_lora_kto_learns_the_desirable_replies_and_resumes(tiny, tmp_path, capsys):
    folder, base_model, _ = tiny
    data = write_jsonl(tmp_path / "rows.jsonl", synthetic_pairs(64))          # 128 rows, half desirable
    out = tmp_path / "kto"
    report = kto.run_kto(folder, data, out, **kto_options())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows, val_rows = [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]
    for key in ("kl", "reward_accuracy", "rewards_desirable", "rewards_undesirable", "logps"):
        assert key in train_rows[0] and f"val_{key}" in val_rows[-1]
    assert train_rows[0]["loss"] == pytest.approx(0.5, abs=1e-3)     # the policy starts as the reference
    assert report["validation"]["reward_accuracy"] > 0.9 and report["validation"]["loss"] < 0.4
    assert report["train_rows"] + report["val_rows"] == 128 and report["train_desirable"] * 2 == report["train_rows"]
    trained, tok = load_model(out)
    good, bad = parse_unpaired(synthetic_pairs(1)[0])
    margin = {name: reply_logp(m, tok, good) - reply_logp(m, tok, bad) for name, m in (("base", base_model),
                                                                                       ("kto", trained))}
    assert margin["kto"] > margin["base"] + 1.0
    # Resume continues the same run, reading the cached reference.
    capsys.readouterr()
    report = kto.run_kto(folder, data, out, **kto_options(steps=26, resume=True))
    assert report["steps"] == 26 and "reference log-probabilities from" in capsys.readouterr().out


def test_cli_help_and_errors(tiny, tmp_path, capsys):
    folder, _, _ = tiny
    data = write_jsonl(tmp_path / "rows.jsonl", ROWS * 4)
    with pytest.raises(SystemExit):
        main(["kto", "--help"])
    help_text = capsys.readouterr().out
    assert "chatforge kto --base runs/demo/sft --data" in help_text and "--desirable-weight" in help_text
    assert main(["kto", "--base", str(folder), "--out", str(tmp_path / "x")]) == 2
    assert "pass --data FILE.jsonl" in capsys.readouterr().err
    assert main(["kto", "--base", str(folder), "--data", str(data), "--batch-size", "1"]) == 2
    assert "--batch-size must be at least 2" in capsys.readouterr().err
    assert main(["kto", "--base", str(folder), "--data", str(data), "--undesirable-weight", "0"]) == 2
    assert "must be positive" in capsys.readouterr().err
    with pytest.raises(ChatforgeError, match="unknown kto option"):
        kto.run_kto(folder, data, tmp_path / "y", betta=0.1)
    assert main(["kto", "--base", str(folder), "--data", str(data), "--out", str(tmp_path / "cli"),
                 "--steps", "2", "--precision", "fp32", "--lr", "1e-3", "--method", "full"]) == 0
    load_model(tmp_path / "cli")
    assert json.loads((tmp_path / "cli" / "kto.json").read_text())["desirable_weight"] == 1.0
