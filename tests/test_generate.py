"""`chatforge generate`: the command line over the engine, with a tiny saved model."""

from __future__ import annotations

import shutil

import pytest
import torch

from chatforge.commands.main import main
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.model.folder import save_model

TEXT = "Héllo wörld! How do I reset my password? Open the settings page and choose reset. 🙂\n" * 20


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from chatforge.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("gen")
    tok = train_tokenizer([TEXT], 300, root / "tok")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, d_model=32, n_layer=2, n_head=4, n_kv_head=2, d_ff=64,
                          max_seq_len=48))
    return save_model(root / "model", model, tok)


def run(capsys, *argv):
    code = main(["generate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_greedy_streams_and_is_deterministic(model_dir, capsys):
    a = run(capsys, "--model", str(model_dir), "--prompt", "How do I", "--max-new-tokens", "10")
    b = run(capsys, "--model", str(model_dir), "--prompt", "How do I", "--max-new-tokens", "10")
    assert a[0] == 0 and a[1] == b[1] and a[1].endswith("\n") and "Traceback" not in a[2]


def test_every_strategy_runs(model_dir, capsys):
    base = ["--model", str(model_dir), "--prompt", "Open the", "--max-new-tokens", "6"]
    for extra in (["--strategy", "sample", "--temperature", "0.8", "--top-k", "20", "--top-p", "0.9",
                   "--min-p", "0.05", "--seed", "3", "--repetition-penalty", "1.2", "--no-repeat-ngram", "2"],
                  ["--strategy", "beam", "--beams", "3", "--num-return", "2"],
                  ["--strategy", "sample", "--seed", "1", "--num-return", "2"],
                  ["--chat", "--stop", "reset", "\n"]):
        code, out, err = run(capsys, *base, *extra)
        assert code == 0, err
    code, out, err = run(capsys, *base, "--strategy", "beam", "--beams", "3", "--num-return", "2")
    assert err.count("score") == 2 and len(out.splitlines()) >= 2


def test_seeded_sampling_repeats(model_dir, capsys):
    argv = ["--model", str(model_dir), "--prompt", "Open", "--strategy", "sample", "--seed", "7",
            "--max-new-tokens", "12"]
    assert run(capsys, *argv)[1] == run(capsys, *argv)[1]


@pytest.mark.parametrize("argv,msg", [
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "1.5"], "top_p"),
    (["--strategy", "beam", "--beams", "0"], "num_beams"),
    (["--max-new-tokens", "0"], "max_new_tokens"),
    (["--prompt", "reset " * 200], "context"),
])
def test_bad_input_is_a_clear_error(model_dir, capsys, argv, msg):
    base = ["--model", str(model_dir), "--prompt", "hi"]
    code, out, err = run(capsys, *base, *argv)
    assert code == 2 and msg in err and err.startswith("error:") and "Traceback" not in err


def test_missing_or_broken_model_folder(model_dir, tmp_path, capsys):
    code, _, err = run(capsys, "--model", str(tmp_path / "nope"), "--prompt", "hi")
    assert code == 2 and "does not exist" in err
    code, _, err = run(capsys, "--prompt", "hi")
    assert code == 2 and "--model" in err
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "model.safetensors").unlink()
    code, _, err = run(capsys, "--model", str(broken), "--prompt", "hi")
    assert code == 2 and "model.safetensors" in err


def test_tokenizer_mismatch(model_dir, tmp_path, capsys):
    from chatforge.data.tokenizer import train_tokenizer

    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    train_tokenizer(["completely different words " * 50], 280, tmp_path / "tok2")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tmp_path / "tok2" / name).exists():
            shutil.copy(tmp_path / "tok2" / name, other / name)
    code, _, err = run(capsys, "--model", str(other), "--prompt", "hi")
    assert code == 2 and "tokenizer" in err


def test_dtype_float32_is_the_fp32_model(model_dir, capsys):
    from chatforge.infer.engine import Engine, GenerationConfig
    from chatforge.model.folder import load_model

    model, tok = load_model(model_dir)
    want = Engine(model, tok, stop_ids=[tok.eot_id, tok.im_end_id], dtype="float32").generate(
        [tok.encode("How do I")], GenerationConfig(max_new_tokens=10))[0].text
    code, out, _ = run(capsys, "--model", str(model_dir), "--prompt", "How do I", "--max-new-tokens", "10",
                       "--dtype", "float32")
    assert code == 0 and out == want + "\n"
