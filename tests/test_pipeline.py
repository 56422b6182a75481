"""The one-command pipeline on a user's own folder, end to end with a tiny model.

Runs every stage for real (build, tokenizer, pretrain, sft, eval) on examples/my_docs with tiny
settings, then checks that a second run skips every stage and that a changed setting re-runs
only the stages after it.
"""

import json
import os
import shutil
from pathlib import Path

import pytest

from chatforge.commands.main import main

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
    # One hand-written set, asked against the same documents (the pipeline runs it after eval);
    # a set whose documents are missing is left out with a note.
    (tmp_path / "unanswerable.jsonl").write_text(
        '{"question": "Can I pay with seashells?", "answer": "", "answerable": false}\n')
    evalsets = (f"  evalsets:\n  - {{name: unanswerable, questions: unanswerable.jsonl, docs: [{ROOT / 'examples' / 'my_docs'}]}}\n"
                "  - {name: gone, questions: unanswerable.jsonl, docs: [no/such/folder]}\n")
    cfg.write_text(TINY.replace("  base: scratch\n", "  base: scratch\n" + evalsets))
    argv = ["pipeline", "--config", str(cfg), "--input", str(ROOT / "examples" / "my_docs"),
            "--only-input", "--name", "t"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    out = captured.out
    run = tmp_path / "runs" / "t"
    for stage in ("data", "tokenizer", "pretrain", "sft", "eval", "eval-unanswerable"):
        assert (run / stage).is_dir(), stage
    res = json.loads((run / "eval" / "eval.json").read_text())
    for key in ("perplexity", "bleu", "rouge1", "rouge2", "rougeL", "hit@1", "hit@3"):
        assert key in res
    assert res["perplexity"] > 1
    assert "pipeline summary" in out and "evaluation" in out
    sets = json.loads((run / "eval-unanswerable" / "eval.json").read_text())
    assert sets["answering"]["unanswerable"] == 1 and "no_retrieval" not in sets["baselines"]
    assert "after_refusal" not in sets    # the conversation measures only where a set asks for them
    assert "refused unanswerable" in out and "evaluation set gone left out" in captured.err
    assert json.loads((run / "sft" / "answer.json").read_text())["passages"] == 3   # SFT's answer settings

    # Second run: everything up to date.
    assert main(argv) == 0
    out = capsys.readouterr().out
    for stage in ("build", "tokenizer", "pretrain", "sft", "eval", "eval-unanswerable"):
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
    assert s["run"]["base"] == DEFAULT_BASE and s["sft"]["method"] == "lora" and s["eval"]["max_new_tokens"] == 512
    # The demo's budget: no model-alone baseline; the conversation measures on the manual set
    # (and the validation Q&A, by eval's own default).
    assert s["eval"]["skip_bare"] is True
    assert {e["name"]: e.get("second_turn", 0) for e in s["run"]["evalsets"]}["manual"] == 10
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


def test_stages_run_through_the_command_line_they_are_handed(tmp_path, monkeypatch, capsys):
    """The pipeline imports no command line: `run_pipeline` gets one (`commands/pipeline.py` hands
    it `main`). A recording one shows the stages' command lines, the skip of an up-to-date stage,
    and a failing stage stopping the run."""
    from chatforge.errors import ChatforgeError
    from chatforge.pipeline import run_pipeline

    monkeypatch.chdir(tmp_path)
    docs, cache = ROOT / "examples" / "my_docs", tmp_path / "cache"
    ran: list[list[str]] = []

    def record(argv: list[str]) -> int:
        ran.append(argv)
        Path(argv[argv.index("--out") + 1] if "--out" in argv else argv[argv.index("--cache") + 1]).mkdir(
            parents=True, exist_ok=True)
        return 0

    options = dict(input=[str(docs)], only_input=True, base="scratch", name="rec", cache=str(cache), until="build")
    assert run_pipeline(record, **options) == 0
    assert [a[:2] for a in ran] == [["data", "build"]]      # --only-input: nothing to fetch
    assert ran[0][ran[0].index("--input") + 1] == str(docs) and ran[0][ran[0].index("--out") + 1] == "runs/rec/data"
    assert run_pipeline(record, **options) == 0              # up to date: not run again
    assert len(ran) == 1 and "== build: up to date" in capsys.readouterr().out
    with pytest.raises(ChatforgeError, match="stage tokenizer failed \\(exit 2\\)"):
        run_pipeline(lambda argv: 2, **{**options, "until": "tokenizer"})
    with pytest.raises(ChatforgeError, match="--until must be one of"):
        run_pipeline(record, **{**options, "until": "deploy"})


def test_unknown_base_is_a_clear_error(tmp_path, capsys):
    assert main(["pipeline", "--base", str(tmp_path / "nope.gguf"), "--name", "x"]) == 2
    assert "neither a model source" in capsys.readouterr().err


@pytest.mark.e2e
def test_pipeline_from_a_pretrained_hf_folder(tmp_path, monkeypatch, capsys):
    """--base FOLDER: import, LoRA SFT and eval with the base's own tokenizer; no tokenizer or
    pretrain stage. The base is a tiny random Llama saved by transformers itself."""
    monkeypatch.chdir(tmp_path)
    docs = ROOT / "examples" / "my_docs"
    base = _hf_base(tmp_path, docs)
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


def _hf_base(tmp_path: Path, docs: Path) -> Path:
    """A tiny random Llama saved by transformers itself, with a tokenizer fitted to `docs`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from chatforge.data.tokenizer import train_tokenizer

    texts = [p.read_text(encoding="utf-8") for p in sorted(docs.iterdir()) if p.is_file()]
    base = tmp_path / "hf-base"
    tok = train_tokenizer(texts, 600, base)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=512, tie_word_embeddings=True)).save_pretrained(base)
    return base


ROUND = """
sft:
  steps: 4
  lora-layers: 1
  seq-len: 512
  batch-size: 2
  tokens-per-step: 0
  context-tokens: 160
eval:
  max-questions: 3
  max-new-tokens: 8
  context-tokens: 160
  max-ppl-batches: 1
align:
  min-reward-pairs: 4
  sft-epochs: 1
reward:
  steps: 2
  batch-size: 2
  max-length: 512
dpo:
  lora-layers: 1
  steps: 2
  batch-size: 2
  max-length: 512
kto:
  lora-layers: 1
  steps: 2
  batch-size: 2
  max-length: 512
ppo:
  phases: 1
  rollout-prompts: 2
  minibatch: 2
  epochs: 1
  max-new-tokens: 8
  max-eval-prompts: 1
  eval-samples: 1
"""


def _served_feedback(db: Path, questions: list[tuple[str, str]], tag: str) -> None:
    """What `chatforge serve --db` records: a grounded reply to each question, each corrected by
    a user, and one question answered twice with a thumbs up and a thumbs down."""
    from chatforge.data.feedback import FeedbackStore

    with FeedbackStore(db) as store:
        for i, (q, answer) in enumerate(questions):
            prompt = [{"role": "system", "content": "Answer from the context."},
                      {"role": "user", "content": f"Context:\n[1] {answer}\nQuestion: {q}"}]
            store.record_reply(f"{tag}-{i}", f"conv-{tag}-{i}", "assistant", [{"role": "user", "content": q}],
                               "I do not know, try turning it off.", prompt, "...", [{"source": "faq", "text": answer}])
            store.add_feedback(f"{tag}-{i}", "down", reason="inaccurate", correction=answer)
        q, answer = questions[0]
        prompt = [{"role": "user", "content": q}]
        for rating, reply in (("up", answer), ("down", "Nobody knows.")):
            store.record_reply(f"{tag}-{rating}", f"conv-{tag}-{rating}", "assistant", prompt, reply, prompt, "...", [])
            store.add_feedback(f"{tag}-{rating}", rating)


@pytest.mark.e2e
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_continual_learning_round(tmp_path, monkeypatch, capsys, request, backend):
    """`pipeline --feedback DB`: export, SFT on corrections, reward model, DPO, evaluation beside
    the served model, promotion by the rule; nothing new -> up to date; new feedback -> round 2
    (PPO) from the served model; --rollback points the link back. DB: a SQLite file or a
    PostgreSQL URL (skipped, saying why, where no PostgreSQL server can be started)."""
    from chatforge import continual
    from chatforge.eval.evaluate import load_questions

    monkeypatch.chdir(tmp_path)
    docs = ROOT / "examples" / "my_docs"
    base = _hf_base(tmp_path, docs)
    cfg = tmp_path / "r.yaml"
    cfg.write_text(ROUND)
    argv = ["pipeline", "--base", str(base), "--config", str(cfg), "--input", str(docs), "--only-input", "--name", "r"]
    assert main(argv) == 0
    run = tmp_path / "runs" / "r"
    qa = [(q["question"], q["reference"]) for q in load_questions(run / "data" / "qa_train.jsonl")]
    assert len(qa) >= 10
    # A database without a single pair yet: a clear error, and no round folder.
    db = tmp_path / "feedback.db" if backend == "sqlite" else request.getfixturevalue("pg_url")
    from chatforge.data.feedback import FeedbackStore

    with FeedbackStore(db) as store:
        store.record_reply("x", "conv-x", "assistant", [{"role": "user", "content": "Hi"}], "Hello.",
                           [{"role": "user", "content": "Hi"}], "...", [])
        store.add_feedback("x", "down")
    capsys.readouterr()
    assert main([*argv, "--feedback", str(db)]) == 2
    assert "no preference pairs to learn from" in capsys.readouterr().err and not (run / "rounds").exists()
    _served_feedback(db, qa[:6], "a")

    assert main([*argv, "--feedback", str(db)]) == 0
    out = capsys.readouterr().out
    assert "== round 1: from" in out and "== sft: chatforge sft" in out and "== dpo: chatforge dpo" in out
    info = json.loads((run / "rounds" / "1" / "round.json").read_text())
    # 6 corrections; the up-voted reply over the two down-voted ones to the same question
    assert info["counts"]["pairs"] == 8 and info["counts"]["sft_examples"] == 7     # + the up-voted reply
    assert info["previous"] == "runs/r/sft" and info["model"] == "runs/r/rounds/1/dpo"
    assert (run / "rounds" / "1" / "dpo" / "config.json").is_file()
    sft_report = json.loads((run / "rounds" / "1" / "sft" / "sft.json").read_text())
    assert sft_report["base"] == "runs/r/sft"
    val = info["comparison"]["eval"]
    asked = len((run / "data" / "qa_val.jsonl").read_text().splitlines())   # my_docs holds few
    assert val["questions"] == min(asked, 3) and {"rougeL", "perplexity"} <= set(val["metrics"])
    assert 0 <= val["win"]["win_rate"] <= 1 and val["win"]["questions"] == val["questions"]
    # The rule decides: promoted exactly when the new model does not lose.
    loses = val["win"]["win_rate"] < 0.5 or val["metrics"]["rougeL"]["change"] < -0.02
    assert info["promoted"] == (not loses) and bool(info["kept_because"]) == loses
    served = continual.served_model(run)
    assert served.resolve() == ((run / "rounds" / "1" / "dpo") if info["promoted"] else (run / "sft")).resolve()
    assert "reward win-rate of the new answers" in out

    # Nothing new: the round is up to date.
    assert main([*argv, "--feedback", str(db)]) == 0
    assert "== round 1: up to date" in capsys.readouterr().out

    # New votes, PPO this time, always promoted: round 2 starts from the model served now.
    _served_feedback(db, qa[6:10], "b")
    cfg.write_text(ROUND.replace("  sft-epochs: 1", "  sft-epochs: 1\n  promote: always"))
    assert main([*argv, "--feedback", str(db), "--align", "ppo"]) == 0
    out = capsys.readouterr().out
    info2 = json.loads((run / "rounds" / "2" / "round.json").read_text())
    # All the feedback so far: round 1's 8 pairs, 4 corrections, 2 more vote pairs.
    assert info2["algo"] == "ppo" and Path(info2["previous"]).resolve() == served.resolve() and info2["counts"]["pairs"] == 14
    assert continual.served_model(run).resolve() == (run / "rounds" / "2" / "ppo").resolve()
    assert os.readlink(run / "assistant") == "rounds/2/ppo"
    assert "serve it: chatforge serve --model runs/r/assistant" in out

    # Roll back: the link points at the model round 2 started from; again: round 1's start.
    assert main([*argv, "--rollback"]) == 0
    assert continual.served_model(run).resolve() == served.resolve()
    assert json.loads((run / "rounds" / "2" / "round.json").read_text())["promoted"] is False
    if info["promoted"]:
        assert main([*argv, "--rollback"]) == 0
        assert continual.served_model(run).resolve() == (run / "sft").resolve()
    assert main([*argv, "--rollback"]) == 2
    assert "nothing to roll back to" in capsys.readouterr().err


@pytest.mark.e2e
def test_kto_round_learns_from_thumbs_alone(tmp_path, monkeypatch, capsys):
    """Thumbs on different questions make no pair: a dpo round has nothing to learn from, a kto
    round (`--align kto`, continual.ALIGNERS) trains on every thumb, evaluates and decides."""
    from chatforge.data.feedback import FeedbackStore
    from chatforge.eval.evaluate import load_questions

    monkeypatch.chdir(tmp_path)
    docs = ROOT / "examples" / "my_docs"
    base = _hf_base(tmp_path, docs)
    cfg = tmp_path / "r.yaml"
    cfg.write_text(ROUND)
    argv = ["pipeline", "--base", str(base), "--config", str(cfg), "--input", str(docs), "--only-input", "--name", "k"]
    assert main(argv) == 0
    run = tmp_path / "runs" / "k"
    qa = [(q["question"], q["reference"]) for q in load_questions(run / "data" / "qa_train.jsonl")]
    db = tmp_path / "feedback.db"
    with FeedbackStore(db) as store:
        for i, (q, answer) in enumerate(qa[:6]):
            prompt = [{"role": "user", "content": q}]
            rating, reply = ("up", answer) if i % 2 == 0 else ("down", "Nobody knows.")
            store.record_reply(f"t-{i}", f"conv-{i}", "assistant", prompt, reply, prompt, "...", [])
            store.add_feedback(f"t-{i}", rating)
    capsys.readouterr()
    assert main([*argv, "--feedback", str(db)]) == 2
    assert "or --align kto, which learns from every thumb" in capsys.readouterr().err
    assert main([*argv, "--feedback", str(db), "--align", "kto"]) == 0
    out = capsys.readouterr().out
    assert "== kto: chatforge kto" in out
    info = json.loads((run / "rounds" / "1" / "round.json").read_text())
    assert info["algo"] == "kto" and info["model"] == "runs/k/rounds/1/kto" and info["counts"]["pairs"] == 0
    report = json.loads((run / "rounds" / "1" / "kto" / "kto.json").read_text())
    assert report["train_rows"] == 6 and report["train_desirable"] == 3
    assert "rougeL" in info["comparison"]["eval"]["metrics"]
    # Nothing new: up to date.
    assert main([*argv, "--feedback", str(db), "--align", "kto"]) == 0
    assert "== round 1: up to date" in capsys.readouterr().out


def test_round_errors(tmp_path, capsys):
    run = tmp_path / "runs" / "x"
    assert main(["pipeline", "--name", "x", "--rollback", "--base", "scratch"]) == 2
    from chatforge import continual

    with pytest.raises(Exception, match="align.algo must be one of dpo, ppo, kto"):
        continual.check_settings({"algo": "rlhf", "promote": "better"})
    with pytest.raises(Exception, match="unknown key"):
        continual.check_settings({"algo": "dpo", "promote": "better", "colour": 1})
    # The aligner's own section is checked against its config (ALIGNERS) before the round runs.
    continual.check_aligner_section({"align": {"algo": "kto"}, "kto": {"beta": 0.2, "lora_rank": 4}})
    with pytest.raises(Exception, match=r"unknown kto section's option\(s\) \['betta'\]"):
        continual.check_aligner_section({"align": {"algo": "kto"}, "kto": {"betta": 0.2}})
    with pytest.raises(Exception, match="--loss must be one of sigmoid, ipo, hinge"):
        continual.check_aligner_section({"align": {"algo": "dpo"}, "dpo": {"loss": "nope"}})
    with pytest.raises(Exception, match="batch-size must be at least 2"):
        continual.check_aligner_section({"align": {"algo": "kto"}, "kto": {"batch_size": 1}})
    assert not run.exists()
