"""`chatforge pretrain`: a real tiny run, every bad input (exit 2 + message), resume after
SIGKILL, and 2-process DDP / FSDP on CPU matching one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from _pretrain_fixtures import make_data, make_tokenizer  # noqa: E402

from chatforge.commands.main import main  # noqa: E402

PY = sys.executable
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CHATFORGE_QUIET": "1"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    make_tokenizer(root / "tok", vocab_size=400)
    make_data(root / "data", max_chars=60_000)
    return root


def args(inputs: Path, out: Path, *extra: str) -> list[str]:
    return ["pretrain", "--data", str(inputs / "data"), "--tokenizer", str(inputs / "tok"), "--preset", "tiny",
            "--seq-len", "32", "--batch-size", "4", "--tokens-per-step", "0", "--precision", "fp32",
            "--device", "cpu", "--log-every", "1", "--out", str(out), *extra]


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_a_tiny_run_learns_and_reports(inputs, tmp_path, capsys):
    assert main(args(inputs, tmp_path / "run", "--steps", "30", "--eval-every", "15", "--lr", "3e-3")) == 0
    out = capsys.readouterr().out
    assert "validation loss" in out and "perplexity" in out and "sample: 'The" in out
    curve = losses(tmp_path / "run")
    assert curve[-1] < curve[0] - 0.5
    # --init-from continues the saved model (its tokenizer by default).
    assert main(["pretrain", "--data", str(inputs / "data"), "--init-from", str(tmp_path / "run"), "--steps", "2",
                 "--seq-len", "32", "--batch-size", "4", "--tokens-per-step", "0", "--out", str(tmp_path / "more")]) == 0


def bad(capsys, argv: list[str], message: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err, err


def test_bad_inputs_exit_2_with_what_to_fix(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    bad(capsys, ["pretrain", "--tokenizer", str(inputs / "tok")], "--data is required")
    # The last --data wins (argparse), so these replace the good one.
    bad(capsys, args(inputs, out, "--data", str(tmp_path / "nope")), "does not exist")
    (tmp_path / "empty").mkdir()
    bad(capsys, args(inputs, out, "--data", str(tmp_path / "empty")), "train.jsonl is missing")
    bad(capsys, args(inputs, out, "--preset", "gigantic"), "unknown preset 'gigantic'")
    bad(capsys, args(inputs, out, "--lr", "-0.1"), "--lr must be positive")
    bad(capsys, args(inputs, out, "--seq-len", "1000"), "longer than the model's context (256)")
    bad(capsys, args(inputs, out, "--steps", "2", "--resume"), "cannot resume")


def test_config_checks_its_values_and_keeps_the_defaults():
    from chatforge.errors import ChatforgeError
    from chatforge.options import build, defaults
    from chatforge.train.pretrain import PretrainConfig

    d = defaults(PretrainConfig)
    assert (d["lr"], d["steps"], d["eval_every"], d["preset"], d["max_tokens"]) == (1e-3, None, 100, "small", 1_500_000)
    assert d["tokens_per_step"] == 8192 and d["tokenizer"] is None and d["init_from"] is None
    with pytest.raises(ChatforgeError, match="--lr must be positive"):
        build(PretrainConfig, {"lr": 0.0})
    with pytest.raises(ChatforgeError, match="unknown preset 'huge'"):
        PretrainConfig(preset="huge")
    assert PretrainConfig(preset="huge", init_from="runs/x").init_from == "runs/x"  # its shapes win


def test_checkpoint_problems_exit_2(inputs, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(args(inputs, run, "--steps", "2", "--eval-every", "2")) == 0
    capsys.readouterr()
    # A tokenizer other than the checkpoint's.
    other = tmp_path / "tok2"
    make_tokenizer(other, vocab_size=300)
    bad(capsys, ["pretrain", "--data", str(inputs / "data"), "--tokenizer", str(other), "--init-from", str(run),
                 "--out", str(tmp_path / "x")], "is not the one")
    # A truncated checkpoint, for --init-from and for --resume.
    weights = run / "last" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    bad(capsys, args(inputs, tmp_path / "y", "--init-from", str(run / "last")), "corrupt or truncated")
    bad(capsys, args(inputs, run, "--steps", "4", "--resume"), "corrupt or truncated")


@pytest.mark.e2e
def test_resume_after_sigkill_matches_an_uninterrupted_run(inputs, tmp_path):
    common = ["--steps", "24", "--save-every", "4", "--eval-every", "20", "--seq-len", "64", "--batch-size", "8"]
    cmd = [PY, "-m", "chatforge", *args(inputs, tmp_path / "full", *common)]
    subprocess.run(cmd, check=True, env=ENV, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([PY, "-m", "chatforge", *args(inputs, killed, *common)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state, step, deadline = killed / "last" / "state.json", 0, time.time() + 120
    while step < 8 and time.time() < deadline and proc.poll() is None:
        try:
            step = json.loads(state.read_text())["step"]
        except (OSError, ValueError):
            pass
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert 8 <= json.loads(state.read_text())["step"] < 24
    subprocess.run([PY, "-m", "chatforge", *args(inputs, killed, *common, "--resume")], check=True, env=ENV,
                   capture_output=True)
    a = load_file(str(tmp_path / "full" / "last" / "model.safetensors"))
    b = load_file(str(killed / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert losses(tmp_path / "full") == pytest.approx(losses(killed), abs=1e-6)


def torchrun(inputs: Path, out: Path, *extra: str) -> None:
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "chatforge",
           *args(inputs, out, "--steps", "6", "--eval-every", "3", "--warmup", "2"), "--batch-size", "2", *extra]
    # A session of its own, so that on a hang the workers die with torchrun instead of lingering.
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, err[-3000:]


@pytest.mark.e2e
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one_with_the_same_global_batch(inputs, tmp_path, mode):
    torchrun(inputs, tmp_path / mode, *(["--fsdp"] if mode == "fsdp" else []))
    # One process, batch 4 = 2 ranks x batch 2: RandomWindows gives it exactly the same rows.
    assert main(args(inputs, tmp_path / "one", "--steps", "6", "--eval-every", "3", "--warmup", "2")) == 0
    assert losses(tmp_path / mode) == pytest.approx(losses(tmp_path / "one"), abs=1e-4)
    a = load_file(str(tmp_path / mode / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "one" / "last" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
