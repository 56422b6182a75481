"""The classifier: metrics and baselines, vader labels, middle layers and pooling against HF Llama
with a pad-less (pad = eos) pretrained tokenizer, the feature cache, sub-sampled training, length
batches, train / predict through the CLI (frozen and LoRA), bad input."""

from __future__ import annotations

import json
import random

import pytest
import torch

from chatforge.commands.main import main
from chatforge.data.chat_data import length_groups
from chatforge.data.labelled import read_vader, stratified_split, vader_label
from chatforge.errors import ChatforgeError
from chatforge.model.classifier import encode_texts, load_classifier, predict
from chatforge.model.features import FEATURE_SALT, cached_features, pooled_features
from chatforge.model.folder import model_fingerprint, save_model
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.model.heads import ClassifierHead, RewardHead, ValueHead, hidden_states, layer_states, pool
from chatforge.model.lora import LoraConfig
from chatforge.train.baselines import accuracy, bow_logreg, macro_f1, majority_baseline
from chatforge.train.classify import ClassifyConfig, cap_training, train_classifier

GOOD = ["works perfectly", "arrived quickly and works great", "is excellent, thank you", "solved my problem",
        "is fast and reliable", "made me very happy", "is the best purchase this year", "is wonderful"]
BAD = ["broke after one day", "never arrived", "is slow and crashes", "is terrible, I want a refund",
       "stopped working", "made me angry", "is the worst purchase this year", "keeps failing"]
THINGS = ["The printer", "My new laptop", "This keyboard", "The router", "The update", "Your app", "The charger",
          "The monitor", "This phone", "The service"]


def reviews(n: int, seed: int = 0) -> list[dict]:
    """Short product reviews from real phrases; 60% positive so the majority class is a real baseline."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        positive = rng.random() < 0.6
        out.append({"text": f"{rng.choice(THINGS)} {rng.choice(GOOD if positive else BAD)}.",
                    "label": "positive" if positive else "negative"})
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from chatforge.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("clf")
    texts = [r["text"] for r in reviews(300, seed=9)]
    tok = train_tokenizer(texts, 400, root / "tok")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, max_seq_len=64, d_model=48, n_layer=2, n_head=4,
                          n_kv_head=2, d_ff=96))
    return save_model(root / "base", model, tok)


def test_metrics_and_majority():
    gold = [0, 0, 0, 1, 1, 2]
    pred = [0, 0, 1, 1, 1, 1]
    assert accuracy(pred, gold) == pytest.approx(4 / 6)
    # F1: class 0 = 2*2/(4+0+1) = 0.8; class 1 = 2*2/(4+2+0) = 2/3; class 2 = 0.
    assert macro_f1(pred, gold, 3) == pytest.approx((0.8 + 2 / 3 + 0) / 3)
    assert majority_baseline([1, 0, 1, 1], 3) == [1, 1, 1]


def test_bow_logreg_learns_words():
    data = reviews(200, seed=1)
    texts, y = [d["text"] for d in data], [int(d["label"] == "positive") for d in data]
    pred = bow_logreg(texts[:150], y[:150], texts[150:], 2)
    assert accuracy(pred, y[150:]) > 0.95


def test_stratified_split_keeps_shares():
    labels = ["a"] * 80 + ["b"] * 20
    train, held = stratified_split(labels, 0.25, seed=3)
    assert sorted(train + held) == list(range(100)) and not set(train) & set(held)
    assert sum(labels[i] == "b" for i in held) == 5 and len(held) == 25
    assert stratified_split(labels, 0.25, seed=3) == (train, held)


def test_vader_labels(tmp_path):
    assert vader_label(-2.1) == "negative" and vader_label(1.3) == "positive"
    assert vader_label(0.2) is None and vader_label(-0.5) is None  # the ambiguous middle is dropped
    path = tmp_path / "sentiment.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"text": "I love this!", "score": 2.7},
                                                       {"text": "meh", "score": 0.1},
                                                       {"text": "Awful.", "score": -3.0}]) + "\n")
    assert read_vader(path) == (["I love this!", "Awful."], ["positive", "negative"])


def test_heads_shapes_and_pooling():
    h = torch.arange(24, dtype=torch.float32).view(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.equal(pool(h, mask, "mean")[0], h[0, :2].mean(0))
    assert torch.equal(pool(h, mask, "last")[0], h[0, 1]) and torch.equal(pool(h, mask, "last")[1], h[1, 2])
    assert ClassifierHead(4, 3)(h[:, 0]).shape == (2, 3)
    assert RewardHead(4)(h[:, 0]).shape == (2,)
    v = ValueHead(4)
    assert v(h).shape == (2, 3) and torch.equal(v(h), torch.zeros(2, 3))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, max_seq_len=16, d_model=16, n_layer=1, n_head=2, n_kv_head=1, d_ff=32))
    ids = torch.randint(0, 32, (2, 5))
    assert hidden_states(model, ids).shape == (2, 5, 16)


@pytest.mark.e2e
def test_cli_train_beats_majority_and_predicts(base, tmp_path, capsys):
    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in reviews(400)), encoding="utf-8")
    out = tmp_path / "clf"
    assert main(["classify", "train", "--base", str(base), "--data", str(data), "--out", str(out),
                 "--epochs", "15", "--precision", "fp32"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    held = report["held_out"]
    assert held["model"]["accuracy"] > held["majority"]["accuracy"] + 0.15, held
    assert held["model"]["macro_f1"] > held["majority"]["macro_f1"]
    capsys.readouterr()
    assert main(["classify", "predict", "--model", str(out), "--text", "The router broke after one day.",
                 "--text", "The router works perfectly."]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == ["negative", "positive"]
    assert all(0.5 <= float(line.split("\t")[1]) <= 1.0 for line in lines)
    inputs = tmp_path / "in.txt"
    inputs.write_text("The update keeps failing.\n", encoding="utf-8")
    assert predict(out, ["The update keeps failing."])[0][0] == "negative"
    assert main(["classify", "predict", "--model", str(out), "--input", str(inputs)]) == 0
    assert capsys.readouterr().out.startswith("negative\t")


@pytest.mark.e2e
def test_lora_classifier_saves_a_loadable_folder(base, tmp_path):
    from chatforge.model.folder import load_model

    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in reviews(120)), encoding="utf-8")
    out = tmp_path / "lora"
    assert main(["classify", "train", "--base", str(base), "--data", str(data), "--out", str(out),
                 "--method", "lora", "--steps", "8", "--precision", "fp32", "--lora-rank", "2"]) == 0
    model, _ = load_model(out)  # the backbone, adapters merged: a plain model folder
    assert isinstance(model, GPT)
    clf, _, meta = load_classifier(out)
    assert meta["method"] == "lora" and meta["labels"] == ["negative", "positive"]
    assert (out / "last" / "state.json").is_file()


def test_bad_input_exits_2(base, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": "a"}\n{"text": "no label"}\n', encoding="utf-8")
    assert main(["classify", "train", "--base", str(base), "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    assert main(["classify", "train", "--base", str(tmp_path / "nope"), "--data", str(bad)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["classify", "predict", "--model", str(tmp_path), "--text", "hi"]) == 2
    assert "not a classifier folder" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Pretrained backbones: middle layers, padding with pad = eos, the feature cache


def tiny_gpt(vocab: int, seed: int = 0, n_layer: int = 3) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab, max_seq_len=64, d_model=32, n_layer=n_layer, n_head=4, n_kv_head=2,
                         d_ff=64)).eval()


@pytest.fixture(scope="module")
def smol_like(tmp_path_factory):
    """A model folder shaped like an imported SmolLM2: a pretrained HF tokenizer with no pad token
    (padding uses eos `<|im_end|>`, id 2) and a 3-layer backbone."""
    from test_tokenizer import pretrained_folder

    from chatforge.data.tokenizer import ChatTokenizer

    root = tmp_path_factory.mktemp("smol_like")
    tok = ChatTokenizer.load(pretrained_folder(root / "hf"))
    return save_model(root / "model", tiny_gpt(tok.vocab_size, seed=3), tok)


def test_layer_states_match_hf_llama_and_skip_the_blocks_above():
    transformers = pytest.importorskip("transformers")
    model = tiny_gpt(97, n_layer=4)
    hf = transformers.LlamaModel(transformers.LlamaConfig(**model.hf_config())).eval()
    hf.load_state_dict({k[6:]: v for k, v in model.hf_state_dict().items() if k.startswith("model.")})
    idx = torch.randint(0, 97, (2, 11))
    ran = []
    model.layers[3].register_forward_hook(lambda *_: ran.append(True))
    with torch.no_grad():
        ours = layer_states(model, idx, [1, 2])
        theirs = hf(idx, output_hidden_states=True).hidden_states  # [embeddings, block 1, ..., normed last]
    assert set(ours) == {1, 2} and not ran  # block 4 never ran
    for layer in (1, 2):
        assert torch.allclose(ours[layer], theirs[layer], atol=1e-5)
    with torch.no_grad():
        final = hidden_states(model, idx)
    assert ran and torch.allclose(final, theirs[-1], atol=1e-5)
    with pytest.raises(ValueError, match="layers must be in 0..3"):
        layer_states(model, idx, [4])


@pytest.mark.parametrize("layer", [0, 2])
@pytest.mark.parametrize("how", ["mean", "last"])
def test_pooling_ignores_eos_padding(smol_like, layer, how):
    """Right padding with the pad-less tokenizer's eos: a text's features do not depend on the
    batch it is in, and equal HF's hidden states of the text alone, pooled over its tokens."""
    transformers = pytest.importorskip("transformers")
    from chatforge.model.folder import load_model

    model, tok = load_model(smol_like)
    assert tok.pad_id == tok.im_end_id == 2 and tok.eot_id == 0  # no pad token of its own
    texts = ["Refund please, the order never arrived and nobody answers my mails.", "ok", "Thanks!"]
    ids, mask = encode_texts(tok, texts, max_len=64)
    assert (ids[1, mask[1].sum():] == tok.pad_id).all() and mask[1].sum() < ids.shape[1]
    batched = pooled_features(model, ids, mask, [(layer, how)])[(layer, how)]
    hf = transformers.LlamaModel(transformers.LlamaConfig(**model.hf_config())).eval()
    hf.load_state_dict({k[6:]: v for k, v in model.hf_state_dict().items() if k.startswith("model.")})
    for i, text in enumerate(texts):
        alone = torch.tensor([tok.encode(text)])
        with torch.no_grad():
            h = hf(alone, output_hidden_states=True).hidden_states[layer if layer else -1][0]
        expected = h.mean(0) if how == "mean" else h[-1]
        assert torch.allclose(batched[i], expected, atol=1e-5), (i, text)


def test_bf16_features_are_close_to_fp32(smol_like):
    from chatforge.model.folder import load_model

    model, tok = load_model(smol_like)
    ids, mask = encode_texts(tok, [r["text"] for r in reviews(12)], 32)
    fp32 = pooled_features(model, ids, mask, [(0, "mean")])[(0, "mean")]
    bf16 = pooled_features(model, ids, mask, [(0, "mean")], precision="bf16")[(0, "mean")]
    assert bf16.dtype == torch.float32 and next(model.parameters()).dtype == torch.float32  # a copy was cast
    assert torch.nn.functional.cosine_similarity(fp32, bf16).min() > 0.99


def test_feature_cache_computes_each_text_once(smol_like, tmp_path, capsys):
    from chatforge.model.folder import load_model

    model, tok = load_model(smol_like)
    texts = [r["text"] for r in reviews(30, seed=4)]
    ids, mask = encode_texts(tok, texts, 32)
    specs, key = [(0, "mean"), (2, "last")], model_fingerprint(smol_like, salt=FEATURE_SALT)
    fresh = pooled_features(model, ids, mask, specs)
    first = cached_features(model, ids[:20], mask[:20], specs, tmp_path, key)
    assert "computing features of" in capsys.readouterr().out
    # Rows 10..29: 10 are cached, only the 10 new ones (fewer: the reviews repeat) are computed.
    both = cached_features(model, ids[10:], mask[10:], specs, tmp_path, key)
    new_texts = len(set(texts[20:]) - set(texts[:20]))
    assert f"computing features of {new_texts} texts" in capsys.readouterr().out
    again = cached_features(model, ids, mask, specs, tmp_path, key)
    assert "computing" not in capsys.readouterr().out
    for spec in specs:
        assert torch.allclose(first[spec], fresh[spec][:20], atol=1e-6)
        assert torch.allclose(both[spec], fresh[spec][10:], atol=1e-6)
        assert torch.allclose(again[spec], fresh[spec], atol=1e-6)
    # Another model (other weights) does not hit these entries; an unreadable file is recomputed.
    assert model_fingerprint(save_model(tmp_path / "other", tiny_gpt(tok.vocab_size, seed=4), tok), salt=FEATURE_SALT) != key
    for f in (tmp_path / key).glob("*/*.safetensors"):
        f.write_bytes(b"not safetensors")
    redone = cached_features(model, ids, mask, specs, tmp_path, key)
    assert "computing features of" in capsys.readouterr().out
    assert torch.allclose(redone[(2, "last")], fresh[(2, "last")], atol=1e-6)


def test_cap_training_and_length_groups():
    fit, val = list(range(0, 900)), list(range(900, 1000))
    small_fit, small_val = cap_training(fit, val, 90, 0.1, seed=5)
    assert len(small_fit) == 90 and len(small_val) == 10
    assert set(small_fit) <= set(fit) and set(small_val) <= set(val)
    assert cap_training(fit, val, 0, 0.1, 5) == (fit, val) and cap_training(fit, val, 5000, 0.1, 5) == (fit, val)
    lengths = [random.Random(1).randint(1, 40) for _ in range(103)]
    groups = length_groups(lengths, 16, seed=2)
    assert sorted(i for g in groups for i in g) == list(range(103))
    assert [len(g) for g in groups] == [16] * 6 + [7]
    assert all(max(lengths[i] for i in a) <= min(lengths[i] for i in b) for a, b in zip(groups, groups[1:]))


def test_lora_targets_stay_below_the_layer():
    """A classifier reading block L's output runs blocks 1..L only: adapters go there (LoraConfig's
    targeting with runs=L), and --lora-layers N takes the top N of those."""
    model = tiny_gpt(50, n_layer=4)

    def names(targets: str, layer: int, top: int = 0) -> list[str]:
        return LoraConfig(targets=targets, layers=top).module_names(model, runs=layer)

    assert names("q_proj,v_proj", 0) == ["q_proj", "v_proj"]
    assert names("q_proj,v_proj", 2) == ["layers.0.self_attn.q_proj", "layers.0.self_attn.v_proj",
                                         "layers.1.self_attn.q_proj", "layers.1.self_attn.v_proj"]
    assert names("down_proj", 3, top=1) == ["layers.2.mlp.down_proj"]
    assert names("down_proj", 0, top=2) == ["layers.2.mlp.down_proj", "layers.3.mlp.down_proj"]
    # More top blocks than run is an error naming the flag (it used to mean "all" silently).
    with pytest.raises(ChatforgeError, match="--lora-layers must be between 1 and the 2 blocks"):
        names("down_proj", 2, top=3)


def test_config_defaults_and_checks():
    from chatforge.options import build, defaults

    d = defaults(ClassifyConfig)
    assert d["method"] == "frozen" and d["batch_size"] == 64 and d["tokens_per_step"] == 0 and d["epochs"] == 10.0
    assert d["lora_dropout"] == 0.05 and d["lr"] is None and d["pooling"] == "last" and d["compile"] == "auto"
    assert "lora_save" not in d
    with pytest.raises(ChatforgeError, match=r"--holdout must be in \(0, 1\)"):
        build(ClassifyConfig, {"holdout": 1.0})
    with pytest.raises(ChatforgeError, match="--lora-layers must be 0"):
        build(ClassifyConfig, {"lora_layers": -1})
    with pytest.raises(ChatforgeError, match="--pooling must be one of mean, last"):
        build(ClassifyConfig, {"pooling": "max"})


def test_max_train_keeps_the_held_out_set(base, tmp_path):
    data = reviews(300, seed=6)
    texts, labels = [d["text"] for d in data], [d["label"] for d in data]
    common = dict(steps=3, precision="fp32", feature_cache=str(tmp_path / "cache"))
    full = train_classifier(base, texts, labels, tmp_path / "full", **common)
    small = train_classifier(base, texts, labels, tmp_path / "small", max_train=50, **common)
    assert full["split"]["held_out"] == small["split"]["held_out"] == 60
    assert small["split"]["train"] == 50 and small["split"]["val"] == 6
    assert full["held_out"]["bow_logreg"] == small["held_out"]["bow_logreg"]  # same held-out set, same baseline
    assert "bow_logreg_same_sample" in small["held_out"] and "bow_logreg_same_sample" not in full["held_out"]
    assert set(small["seconds"]) == {"features", "train", "evaluation", "total"}
    assert 0 <= small["validation"]["accuracy"] <= 1


@pytest.mark.e2e
def test_middle_layer_classifiers_on_a_pad_less_tokenizer(smol_like, tmp_path):
    """Frozen and LoRA classifiers reading block 2 of 3 on the SmolLM2-shaped folder: they learn,
    their folders load, and LoRA adapters went only into the blocks that run."""
    from chatforge.model.folder import load_model

    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in reviews(300, seed=7)), encoding="utf-8")
    common = ["--base", str(smol_like), "--data", str(data), "--layer", "2", "--precision", "fp32"]
    assert main(["classify", "train", *common, "--out", str(tmp_path / "frozen"), "--epochs", "20",
                 "--pooling", "last"]) == 0
    report = json.loads((tmp_path / "frozen" / "metrics.json").read_text())
    held = report["held_out"]
    assert report["layer"] == 2 and held["model"]["accuracy"] > held["majority"]["accuracy"] + 0.15, held
    assert predict(tmp_path / "frozen", ["The printer never arrived."])[0][0] == "negative"

    base_model, _ = load_model(smol_like)
    lora = common + ["--out", str(tmp_path / "lora"), "--method", "lora", "--batch-size", "16", "--lora-rank", "4",
                     "--pooling", "last"]
    assert main(["classify", "train", *lora, "--steps", "60", "--lr", "1e-2"]) == 0
    merged, _ = load_model(tmp_path / "lora")
    changed = {name.split(".")[1] for name, p in merged.state_dict().items()
               if name.startswith("layers.") and not torch.equal(p, base_model.state_dict()[name])}
    assert changed == {"0", "1"}  # the adapters of blocks 1-2 were merged; block 3 never ran
    clf, _, meta = load_classifier(tmp_path / "lora")
    assert meta["layer"] == 2 and clf.layer == 2
    held = json.loads((tmp_path / "lora" / "metrics.json").read_text())["held_out"]
    assert held["model"]["accuracy"] > held["majority"]["accuracy"] + 0.15, held

    # LoRA in the top block only: block 1 stays as it was.
    lora[lora.index("--out") + 1] = str(tmp_path / "lora_top")
    assert main(["classify", "train", *lora, "--steps", "60", "--lr", "1e-2", "--lora-layers", "1"]) == 0
    merged, _ = load_model(tmp_path / "lora_top")
    changed = {name.split(".")[1] for name, p in merged.state_dict().items()
               if name.startswith("layers.") and not torch.equal(p, base_model.state_dict()[name])}
    assert changed == {"1"}
    held = json.loads((tmp_path / "lora_top" / "metrics.json").read_text())["held_out"]
    assert held["model"]["accuracy"] > held["majority"]["accuracy"] + 0.15, held
