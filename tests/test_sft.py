"""SFT: every method lowers validation loss, freeze/LoRA leave the base alone, the CLI writes a model folder."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import math

import numpy as np
import pytest
import torch

from chatforge.commands.main import main
from chatforge.data.chat_data import eval_batches, pack, tokenize_examples
from chatforge.model.folder import load_model
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.train.loop import TrainConfig, evaluate, train
from chatforge.train.pretrain import RandomWindows, lm_loss
from chatforge.train.recipe import freeze_below_top
from chatforge.train.sft import run_sft, sft_loss

MODULES = ["json", "textwrap", "shutil", "string", "difflib", "heapq", "functools", "pathlib", "csv", "random"]


def module_text(name: str) -> str:
    """A module's documentation as a plain-text manual: its docstring, then a section per function."""
    mod = importlib.import_module(name)
    parts = [name, inspect.getdoc(mod) or ""]
    for attr, obj in sorted(vars(mod).items()):
        doc = inspect.getdoc(obj) if inspect.isfunction(obj) or inspect.isclass(obj) else None
        if not attr.startswith("_") and doc and len(doc) >= 40:
            parts += [f"{name}.{attr}", doc]
    return "\n\n".join(parts) + "\n"


def docstring_pairs() -> list[dict]:
    """Real Q&A text: "What does json.dumps do?" answered by the first paragraph of its docstring."""
    records = []
    for name in MODULES:
        mod = importlib.import_module(name)
        for attr, obj in sorted(vars(mod).items()):
            if attr.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            doc = inspect.getdoc(obj)
            if not doc or len(doc) < 40:
                continue
            answer = " ".join(doc.split("\n\n")[0].split())[:300]
            records.append({"messages": [{"role": "user", "content": f"What does {name}.{attr} do?"},
                                         {"role": "assistant", "content": answer}],
                            "source": f"pydoc/{name}.txt"})
    return records


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A data folder (qa_train / qa_val, a multi-turn conversation, documents) and a tiny base model."""
    from chatforge.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("sft")
    records = docstring_pairs()
    records.append({"messages": [{"role": "user", "content": "Hi, can you help me with json?"},
                                 {"role": "assistant", "content": "Of course. What do you need?"},
                                 {"role": "user", "content": "What does json.dumps do?"},
                                 {"role": "assistant", "content": records[0]["messages"][1]["content"]}],
                    "source": "chat/1"})
    data = root / "data"
    data.mkdir()
    val = records[::8]
    train_part = [r for i, r in enumerate(records) if i % 8]
    for name, part in (("qa_train", train_part), ("qa_val", val)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    docs = root / "pydoc"
    docs.mkdir()
    for name in MODULES:
        (docs / f"{name}.txt").write_text(module_text(name), encoding="utf-8")
    texts = [m["content"] for r in records for m in r["messages"]]
    tok = train_tokenizer(texts, 600, root / "tok")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, max_seq_len=384, d_model=64, n_layer=3, n_head=4,
                          n_kv_head=2, d_ff=128))
    # A briefly pretrained base (on the module docs, not the Q&A), so that adapters have
    # features to work with, as they would on a real base.
    prose = [module_text(n) for n in MODULES]
    tokens = np.array([t for text in prose for t in tok.encode(text) + [tok.eot_id]], dtype=np.int64)
    cfg = TrainConfig(max_steps=40, lr=3e-3, warmup_steps=4, batch_size=8, seq_len=128, eval_every=1000,
                      log_every=1000, precision="fp32")
    train(model, RandomWindows(tokens, 8, 128, seed=0), lm_loss, cfg, root / "base", tokenizer=tok)
    base = root / "base"
    return {"root": root, "data": data, "base": base, "docs": docs, "tok": tok, "val": val}


def base_val_loss(setup, seq_len: int = 192) -> float:
    model, tok = load_model(setup["base"])
    examples, _ = tokenize_examples([r["messages"] for r in setup["val"]], tok, seq_len)
    rows = pack(examples, seq_len, tok.pad_id)
    return evaluate(model, eval_batches(rows, 8), sft_loss, torch.device("cpu"), "fp32")


FAST = dict(seq_len=192, steps=25, batch_size=8, tokens_per_step=0, eval_every=25, grounded_fraction=0.0, precision="fp32",
            warmup=2, log_every=5)


def test_sft_loss_counts_assistant_tokens_only():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, max_seq_len=16, d_model=16, n_layer=1, n_head=2, n_kv_head=1, d_ff=32))
    ids = torch.randint(0, 32, (1, 8))
    labels = torch.full((1, 8), -100)
    labels[0, 5:] = ids[0, 5:]
    batch = {"input_ids": ids, "labels": labels, "positions": torch.arange(8)[None],
             "attn_mask": torch.ones(8, 8, dtype=torch.bool).tril()[None, None]}
    loss, n = sft_loss(model, batch)
    logits = model(ids)[0]
    expected = torch.nn.functional.cross_entropy(logits[0, 5:], ids[0, 5:])
    assert int(n) == 3 and torch.allclose(loss, expected, atol=1e-6)


@pytest.mark.e2e
@pytest.mark.parametrize("method", ["full", "lora", "freeze"])
def test_each_method_lowers_validation_loss(setup, tmp_path, method):
    before = base_val_loss(setup)
    report = run_sft(setup["base"], setup["data"], tmp_path / method, method=method, lr=3e-3, lora_rank=8,
                     freeze_top=1, **FAST)
    # Measured: full -0.33, freeze -0.3, LoRA -0.15 (adapters of a 64-wide model move slowly).
    margin = 0.08 if method == "lora" else 0.15
    assert report["best_val_loss"] < before - margin, (method, before, report["best_val_loss"])
    assert report["train"]["padding_fraction"] < 0.2
    model, _ = load_model(tmp_path / method)  # a plain model folder for every method
    assert isinstance(model, GPT)
    if method != "full":
        assert report["trainable_parameters"] < report["parameters"]


@pytest.mark.e2e
def test_length_buckets_learn_as_well(setup, tmp_path):
    before = base_val_loss(setup)
    report = run_sft(setup["base"], setup["data"], tmp_path / "bucket", lr=3e-3, packing="bucket", **FAST)
    assert report["train"]["packing"] == "bucketed by 8" and report["train"]["padding_fraction"] < 0.2
    assert report["best_val_loss"] < before - 0.15, (before, report["best_val_loss"])


@pytest.mark.e2e
def test_freeze_leaves_lower_blocks_bit_identical(setup, tmp_path):
    run_sft(setup["base"], setup["data"], tmp_path / "f", method="freeze", freeze_top=1, lr=3e-3, **FAST)
    base, _ = load_model(setup["base"])
    tuned, _ = load_model(tmp_path / "f")
    b, t = base.state_dict(), tuned.state_dict()
    for name in b:
        if name.startswith(("layers.0.", "layers.1.")):
            assert torch.equal(b[name], t[name]), name
    assert not torch.equal(b["layers.2.mlp.up_proj.weight"], t["layers.2.mlp.up_proj.weight"])
    assert not torch.equal(b["embed_tokens.weight"], t["embed_tokens.weight"])  # tied: the head trains


def test_config_keeps_the_flags_defaults_and_checks_its_values():
    from chatforge.errors import ChatforgeError
    from chatforge.model.lora import DEFAULT_TARGETS
    from chatforge.options import build, defaults
    from chatforge.train.sft import SFTConfig

    d = defaults(SFTConfig)
    assert d["method"] == "full" and d["lr"] is None and d["eval_every"] == 0 and d["epochs"] == 3.0
    assert d["lora_dropout"] == 0.05 and d["lora_targets"] == ",".join(DEFAULT_TARGETS) and d["lora_save"] == "merged"
    assert d["retrieval"] == "auto" and d["embedding_model"] is None and d["docs"] is None
    assert build(SFTConfig, {"lora_rank": 4, "docs": ["a"]}).lora.rank == 4
    with pytest.raises(ChatforgeError, match=r"--missing-fraction must be in \[0, 1\], got 1.5"):
        build(SFTConfig, {"missing_fraction": 1.5})
    with pytest.raises(ChatforgeError, match="--epochs must be positive"):
        SFTConfig(epochs=0)
    assert SFTConfig(epochs=0, steps=5).steps == 5          # --steps overrides --epochs
    with pytest.raises(ChatforgeError, match="--seq-len must be 0"):
        SFTConfig(seq_len=8)
    with pytest.raises(ChatforgeError, match="--method must be one of full, lora, freeze"):
        run_sft("base", "data", method="qlora")


def test_freeze_validates_top():
    model = GPT(GPTConfig(vocab_size=32, max_seq_len=16, d_model=16, n_layer=2, n_head=2, n_kv_head=1, d_ff=32))
    params = freeze_below_top(model, 1, keep=(model.lm_head,), least=1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith(("layers.1.", "norm.", "embed_tokens"))}
    assert len(params) == len(trainable)
    from chatforge.errors import ChatforgeError
    with pytest.raises(ChatforgeError, match="freeze-top"):
        freeze_below_top(model, 3, keep=(model.lm_head,), least=1)


@pytest.mark.e2e
def test_cli_lora_adapter_with_grounded_examples(setup, tmp_path, capsys):
    from chatforge.model.lora import load_lora

    out = tmp_path / "sft"
    argv = ["sft", "--base", str(setup["base"]), "--data", str(setup["data"]), "--out", str(out),
            "--method", "lora", "--lora-rank", "4", "--lora-save", "adapter", "--docs", str(setup["docs"]),
            "--grounded-fraction", "0.5", "--steps", "6", "--eval-every", "3", "--tokens-per-step", "0",
            "--precision", "fp32", "--seq-len", "384", "--batch-size", "4"]
    assert main(argv) == 0
    report = json.loads((out / "sft.json").read_text())
    # Grounded copies are made only where the prompt shows the answer (the fixture's answers sit
    # inside long module docs, so only some pairs qualify; see copyable_answer).
    assert report["grounded"]["train"] > 0
    assert (out / "adapter.safetensors").is_file()
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    assert adapter_cfg["base"] == str(setup["base"].resolve()) and adapter_cfg["rank"] == 4
    merged, _ = load_model(out)
    with_adapter = load_lora(load_model(adapter_cfg["base"])[0], out).eval()
    x = torch.randint(0, setup["tok"].vocab_size, (2, 20))
    assert torch.allclose(merged(x)[0], with_adapter(x)[0], atol=1e-5)
    assert (out / "last" / "state.json").is_file()
    assert math.isfinite(report["best_val_loss"])
    # The refusal bias, fitted on the held-out grounded examples and recorded for chat, serve, eval.
    fit = report["refusal"]
    assert fit["examples"] > 0 and fit["answerable"] + fit["not_found"] == fit["examples"]
    assert json.loads((out / "answer.json").read_text())["refusal_bias"] == fit["refusal_bias"]
    after, before = fit["answerable_refused"]["after"], fit["answerable_refused"]["before"]
    assert after <= before and (after <= fit["budget"] or fit["refusal_bias"] == 8.0)


def test_refusal_margin_is_what_greedy_decoding_decides(setup, tmp_path):
    """A reply starts with the refusal's first token exactly when its margin is above the bias."""
    from chatforge.infer.answer import refusal_margin, refusal_token
    from chatforge.infer.engine import Engine, GenerationConfig

    model, tok = load_model(setup["base"])
    model.eval()
    token = refusal_token(tok)
    messages = [{"role": "user", "content": "Context:\n[1] (source: json) Serialize obj.\n\nQuestion: What is json?"}]
    margin = refusal_margin(model, tok, messages, token)
    ids = tok.render_chat(messages, add_generation_prompt=True)[0]
    engine = Engine(model, tok, stop_ids=[], dtype="float32")
    for bias in (margin - 0.5, margin + 0.5):
        cfg = GenerationConfig(max_new_tokens=1, first_token_bias=((token, -bias),))
        first = engine.generate([ids], cfg)[0].tokens[0]
        assert (first == token) == (margin > bias)


def test_lora_in_top_blocks_only(setup):
    from chatforge.model.lora import LoraConfig, apply_lora, lora_modules

    model, _ = load_model(setup["base"])      # 3 blocks
    names = LoraConfig(targets="q_proj,down_proj", layers=1).module_names(model)
    assert names == ["layers.2.self_attn.q_proj", "layers.2.mlp.down_proj"]
    assert LoraConfig(targets="q_proj", layers=0).module_names(model) == ["q_proj"]
    with pytest.raises(Exception, match="--lora-layers must be between 1 and"):
        LoraConfig(targets="q_proj", layers=4).module_names(model)
    apply_lora(model, 4, 8.0, 0.0, names)
    assert sorted(lora_modules(model)) == sorted(names)
    # Nothing below the adapted block needs a gradient: the backward pass stops at block 2.
    x = torch.randint(0, setup["tok"].vocab_size, (2, 16))
    _, loss = model(x, x)
    loss.backward()
    assert all(p.grad is None for p in model.layers[0].parameters())
    assert any(p.grad is not None for p in model.layers[2].parameters())


def test_grounded_only_drops_the_plain_copies(setup, tmp_path):
    from chatforge.retrieval import PassageIndex
    from chatforge.train.sft import SFTConfig, build_rows, read_records

    tok = setup["tok"]
    o = SFTConfig(docs=[str(setup["docs"])], grounded_fraction=1.0)
    train_recs, val_recs = read_records(setup["data"], 0)
    _, _, both, _ = build_rows(train_recs, val_recs, tok, 384, setup["data"], o)
    rows, _, only, _ = build_rows(train_recs, val_recs, tok, 384, setup["data"], dataclasses.replace(o, grounded_only=True))
    index = PassageIndex.load_or_build([setup["docs"]])
    documented = sum(1 for r in train_recs if r["source"] and index.matching_docs(r["source"]))
    assert documented > 0 and only["plain_dropped"] == documented and "plain_dropped" not in both
    # The grounded copies are the same; the chat transcript (not a document) stays plain.
    assert only["train"] == both["train"]
    assert rows.n_examples == len(train_recs) - documented + only["train"]


def test_grounded_copies_after_an_earlier_turn(setup):
    from chatforge.retrieval import PassageIndex
    from chatforge.train.sft import grounded_records, read_records

    tok = setup["tok"]
    train_recs, _ = read_records(setup["data"], 0)
    index = PassageIndex.load_or_build([setup["docs"]])
    single = grounded_records(train_recs, index, 1.0, 0, tok, 384, history_fraction=0.0)
    multi = grounded_records(train_recs, index, 1.0, 0, tok, 384, history_fraction=1.0)
    assert len(single) == len(multi) and all(len(e["messages"]) == 3 for e in single)
    longer = [(a, b) for a, b in zip(single, multi) if len(b["messages"]) == 5]
    assert longer, "no example got an earlier turn"
    for a, b in longer:
        system, user, reply, question, answer = b["messages"]
        # The new turn is exactly the single-turn example; the earlier one is another document's
        # plain question and cited reply, as chat keeps them.
        assert [system, question, answer] == a["messages"]
        assert user["role"] == "user" and "Context:" not in user["content"]
        assert reply["role"] == "assistant" and ("(source: " in reply["content"] or "could not find" in reply["content"])
        assert reply["content"] != answer["content"] or "could not find" in answer["content"]
        assert len(tok.render_chat(b["messages"])[0]) <= 385


def test_cli_errors_exit_2(setup, tmp_path, capsys):
    assert main(["sft", "--base", str(tmp_path / "nope"), "--data", str(setup["data"]), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "qa_train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"messages": [\n', encoding="utf-8")
    assert main(["sft", "--base", str(setup["base"]), "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "qa_train.jsonl:2" in capsys.readouterr().err
    assert main(["sft", "--data", str(setup["data"])]) == 2
    assert "--base" in capsys.readouterr().err
