"""The one-command pipeline on a user's own folder, end to end with a tiny model.

Runs every stage for real (build, tokenizer, pretrain, sft, eval) on examples/my_docs with tiny
settings, then checks that a second run skips every stage and that a changed setting re-runs
only the stages after it.
"""

import json
import shutil
from pathlib import Path

import pytest

from chatforge.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = """
run:
  base: scratch
tokenizer:
  vocab-size: 600
pretrain:
  preset: tiny
  steps: 30
  batch-size: 4
  tokens-per-step: 512
  seq-len: 128
  eval-every: 15
sft:
  method: full
  steps: 20
  batch-size: 4
  tokens-per-step: 1024
eval:
  max-questions: 4
  max-new-tokens: 24
"""


@pytest.mark.e2e
def test_pipeline_on_own_docs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    argv = ["pipeline", "--config", str(cfg), "--input", str(ROOT / "examples" / "my_docs"),
            "--only-input", "--name", "t"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    run = tmp_path / "runs" / "t"
    for stage in ("data", "tokenizer", "pretrain", "sft", "eval"):
        assert (run / stage).is_dir(), stage
    res = json.loads((run / "eval" / "eval.json").read_text())
    for key in ("perplexity", "bleu", "rouge1", "rouge2", "rougeL", "hit@1", "hit@3"):
        assert key in res
    assert res["perplexity"] > 1
    assert "pipeline summary" in out and "evaluation" in out

    # Second run: everything up to date.
    assert main(argv) == 0
    out = capsys.readouterr().out
    for stage in ("build", "tokenizer", "pretrain", "sft", "eval"):
        assert f"== {stage}: up to date" in out

    # A changed SFT setting re-runs sft and eval only.
    cfg.write_text(TINY.replace("steps: 20", "steps: 21"))
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "== pretrain: up to date" in out
    assert "== sft: up to date" not in out and "== eval: up to date" not in out

    # A stage that re-runs with unchanged settings (its output was deleted) re-runs what follows.
    shutil.rmtree(run / "sft")
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "== pretrain: up to date" in out
    assert "== sft: up to date" not in out and "== eval: up to date" not in out


def test_settings_follow_the_base(tmp_path):
    from chatforge.pipeline import DEFAULT_BASE, load_settings

    # Default: the pretrained base, LoRA SFT, long answers in eval.
    s = load_settings(None)
    assert s["run"]["base"] == DEFAULT_BASE and s["sft"]["method"] == "lora" and s["eval"]["max_new_tokens"] == 256
    # From scratch: the small preset is pretrained and fully fine-tuned.
    s = load_settings(None, "scratch")
    assert s["sft"]["method"] == "full" and s["pretrain"]["preset"] == "small"
    # The file's run.base picks the defaults, its own values win over them, and --base wins over the file.
    cfg = tmp_path / "c.yaml"
    cfg.write_text("run:\n  base: scratch\nsft:\n  method: lora\n")
    s = load_settings(str(cfg))
    assert s["run"]["base"] == "scratch" and s["sft"]["method"] == "lora" and s["pretrain"]["preset"] == "small"
    s = load_settings(str(cfg), "model.gguf")
    assert s["run"]["base"] == "model.gguf" and "preset" not in s["pretrain"]


def test_unknown_base_is_a_clear_error(tmp_path, capsys):
    assert main(["pipeline", "--base", str(tmp_path / "nope.gguf"), "--name", "x"]) == 2
    assert "neither a model source" in capsys.readouterr().err


@pytest.mark.e2e
def test_pipeline_from_a_pretrained_hf_folder(tmp_path, monkeypatch, capsys):
    """--base FOLDER: import, LoRA SFT and eval with the base's own tokenizer; no tokenizer or
    pretrain stage. The base is a tiny random Llama saved by transformers itself."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from chatforge.data.tokenizer import train_tokenizer

    monkeypatch.chdir(tmp_path)
    docs = ROOT / "examples" / "my_docs"
    texts = [p.read_text(encoding="utf-8") for p in sorted(docs.iterdir()) if p.is_file()]
    base = tmp_path / "hf-base"
    tok = train_tokenizer(texts, 600, base)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=512, tie_word_embeddings=True)).save_pretrained(base)
    cfg = tmp_path / "p.yaml"
    cfg.write_text("sft:\n  steps: 4\n  lora-layers: 1\n  seq-len: 512\n  batch-size: 2\n"
                   "  tokens-per-step: 0\n  context-tokens: 160\neval:\n  max-questions: 3\n"
                   "  max-new-tokens: 8\n  context-tokens: 160\n  max-ppl-batches: 1\n")
    argv = ["pipeline", "--base", str(base), "--config", str(cfg), "--input", str(docs), "--only-input", "--name", "p"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    run = tmp_path / "runs" / "p"
    assert "== import: done" in out and "== tokenizer" not in out and "== pretrain" not in out
    assert (run / "base" / "model.safetensors").is_file() and not (run / "tokenizer").exists()
    report = json.loads((run / "sft" / "sft.json").read_text())
    assert report["method"] == "lora" and report["base"] == str(Path("runs") / "p" / "base") and report["lora"]["lora_layers"] == 1
    res = json.loads((run / "eval" / "eval.json").read_text())
    assert res["questions"] >= 1 and "grounded" in res["baselines"]["extractive"]
    # Up to date on a second run, the import included.
    assert main(argv) == 0
    out = capsys.readouterr().out
    for stage in ("build", "import", "sft", "eval"):
        assert f"== {stage}: up to date" in out
