"""Dense retrieval: the BERT encoder (parity with transformers), the vector cache, fusion, follow-ups,
the --retrieval modes, passage-level hit@k and `chatforge retriever train` on a tiny model made here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from chatforge import files
from chatforge.errors import ChatforgeError
from chatforge.retrieval import Passage, PassageIndex
from chatforge.retrieval.dense import DenseIndex, cache_folder
from chatforge.retrieval.embed import ENCODERS, Embedder, EncoderConfig, mean_pool, relative_buckets
from chatforge.retrieval.fusion import Retriever, load_retriever, rrf, search_turn
from chatforge.retrieval.hits import gold_ids, load_questions, retrieval_hits

from test_retrieval import make_docs

TINY = EncoderConfig(vocab_size=0, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)


def _tokenizer(words: list[str], specials: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")):
    """A real WordPiece tokenizer (HF `tokenizers`) over `words`, with BERT's special tokens
    (in the order of `specials`: MPNet's padding id is 1)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate([*specials, *sorted(set(words))])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", vocab["[CLS]"]),
                                                                       ("[SEP]", vocab["[SEP]"])])
    return tok


def tiny_model(folder: Path, words: list[str], seed: int = 0, model_type: str = "bert") -> Path:
    """A tiny BERT (or MPNet) embedding model folder (random weights, safetensors) as
    all-MiniLM-L6-v2's (all-mpnet-base-v2's) is laid out."""
    from safetensors.torch import save_file

    tok = _tokenizer(words, ("[CLS]", "[PAD]", "[SEP]", "[UNK]") if model_type == "mpnet" else
                     ("[PAD]", "[UNK]", "[CLS]", "[SEP]"))
    cfg = EncoderConfig(**{**TINY.__dict__, "vocab_size": tok.get_vocab_size(), "model_type": model_type})
    if model_type == "mpnet":       # MPNet's positions start at 2; its layer norms at 1e-5
        cfg = EncoderConfig(**{**cfg.__dict__, "max_position_embeddings": 66, "layer_norm_eps": 1e-5})
    torch.manual_seed(seed)
    enc = ENCODERS[model_type](cfg)
    if model_type == "mpnet":       # a random relative bias that matters (HF initialises it at N(0, 0.02))
        torch.nn.init.normal_(enc.encoder.relative_attention_bias.weight, std=1.0)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in enc.state_dict().items()}
    state["pooler.dense.weight"] = torch.zeros(cfg.hidden_size, cfg.hidden_size)   # as HF's files carry it
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(cfg.hf_config()))
    tok.save(str(folder / "tokenizer.json"))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    return folder


WORDS = ("how do i reset my password refund invoice card proxy port router firewall agent two factor "
         "authentication billing network accounts the a to of and is are for you your with by "
         "forgotten sign in page click link mailed money payment charged").split()


@pytest.fixture()
def model(tmp_path: Path) -> Path:
    return tiny_model(tmp_path / "tiny-embed", WORDS)


def test_encoder_equals_transformers_bert(model: Path):
    transformers = pytest.importorskip("transformers")
    emb = Embedder.load(model, precision="fp32")
    hf = transformers.BertModel.from_pretrained(str(model), add_pooling_layer=False).eval()
    texts = ["How do I reset my password?", "refund", "the proxy port of the router and the firewall agent"]
    ids, mask = emb.batch(emb.token_ids(texts))
    with torch.no_grad():
        ref = mean_pool(hf(input_ids=ids, attention_mask=mask).last_hidden_state, mask).numpy()
    got = emb.encode(texts)
    assert np.allclose(got, ref, atol=1e-5)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_mpnet_encoder_equals_transformers_mpnet(tmp_path: Path):
    transformers = pytest.importorskip("transformers")
    folder = tiny_model(tmp_path / "tiny-mpnet", WORDS, model_type="mpnet")
    emb = Embedder.load(folder, precision="fp32")
    hf = transformers.MPNetModel.from_pretrained(str(folder), add_pooling_layer=False).eval()
    # Long enough (40+ tokens) that offsets reach the log-spaced buckets.
    texts = ["How do I reset my password?", "refund",
             " ".join(["the proxy port of the router and the firewall agent"] * 6)]
    ids, mask = emb.batch(emb.token_ids(texts))
    with torch.no_grad():
        ref = mean_pool(hf(input_ids=ids, attention_mask=mask).last_hidden_state, mask).numpy()
    got = emb.encode(texts)
    assert np.allclose(got, ref, atol=1e-5)
    # Without the relative bias the vectors differ: the parity above checks it, not only the layers.
    emb.encoder.encoder.relative_attention_bias.weight.data.zero_()
    assert not np.allclose(emb.encode(texts), ref, atol=1e-3)
    saved = Embedder.load(folder, precision="fp32").save(tmp_path / "saved")
    assert json.loads((saved / "config.json").read_text())["architectures"] == ["MPNetModel"]
    assert np.allclose(Embedder.load(saved, precision="fp32").encode(texts), ref, atol=1e-5)


def test_relative_buckets_equal_transformers():
    modeling = pytest.importorskip("transformers.models.mpnet.modeling_mpnet")
    T = 300                                   # past max_distance (128): the last bucket
    offset = torch.arange(T)[None, :] - torch.arange(T)[:, None]
    ref = modeling.MPNetEncoder.relative_position_bucket(offset, num_buckets=32)
    assert torch.equal(relative_buckets(T, 32), ref)
    assert int(relative_buckets(T, 32).max()) == 31      # far offsets share the last bucket


def test_encode_is_independent_of_batching_and_padding(model: Path):
    emb = Embedder.load(model, precision="fp32")
    texts = ["refund", "How do I reset my password with the sign in page link?", "port"]
    together = emb.encode(texts, batch_size=3)
    alone = np.concatenate([emb.encode([t]) for t in texts])
    assert np.allclose(together, alone, atol=1e-5)


def test_load_refuses_what_it_cannot_run(tmp_path: Path, model: Path):
    with pytest.raises(ChatforgeError, match="not fetched"):
        Embedder.load("no-such-model", cache=tmp_path)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "model_type": "roberta"}))
    with pytest.raises(ChatforgeError, match="BERT"):
        Embedder.load(model)


def test_save_round_trips_and_changes_the_fingerprint(tmp_path: Path, model: Path):
    emb = Embedder.load(model, precision="fp32")
    out = emb.save(tmp_path / "copy")
    again = Embedder.load(out, precision="fp32")
    assert np.allclose(again.encode(["refund"]), emb.encode(["refund"]))
    assert (out / "tokenizer.json").is_file() and (out / "1_Pooling" / "config.json").is_file()
    with torch.no_grad():
        again.encoder.embeddings.word_embeddings.weight.add_(1.0)
    again.save_files(out)
    assert Embedder.load(out).fingerprint() != Embedder.load(model).fingerprint()


def test_rrf_sums_reciprocal_ranks():
    scores = rrf([[2, 0], [0, 1]], 4, k=60)
    assert scores[0] == pytest.approx(1 / 62 + 1 / 61)
    assert scores[2] == pytest.approx(1 / 61) and scores[1] == pytest.approx(1 / 62) and scores[3] == 0
    assert int(np.argmax(scores)) == 0          # second and first beats first alone


def test_weighted_fusion_adds_a_tenth_of_normalised_bm25(tmp_path: Path, model: Path):
    r = load_retriever([make_docs(tmp_path / "docs")], tmp_path / "cache", "hybrid", model)
    q = "refund card"
    b, d = r.scores(q, mode="bm25"), r.scores(q, mode="dense")
    assert np.allclose(r.scores(q), d + 0.1 * b / b.max())
    assert np.allclose(r.scores("zzz unknown"), r.scores("zzz unknown", mode="dense"))   # no BM25 match: dense alone
    rr = Retriever(r.index, r.dense, "hybrid", fusion="rrf")
    assert rr.scores(q).max() <= 2 / 61 + 1e-9


def test_a_small_document_set_gets_the_larger_model_when_fetched(tmp_path: Path, monkeypatch, capsys):
    from chatforge.retrieval import embed

    cache = tmp_path / "chatforge-cache"
    monkeypatch.setenv("CHATFORGE_CACHE", str(cache))
    tiny_model(cache / "sources" / embed.DEFAULT_MODEL, WORDS)
    docs = make_docs(tmp_path / "docs")
    assert load_retriever([docs], tmp_path / "idx", "dense").embedding_model == "all-minilm-l6-v2"   # not fetched
    tiny_model(cache / "sources" / embed.LARGE_MODEL, WORDS, model_type="mpnet")
    r = load_retriever([docs], tmp_path / "idx", "dense")
    assert r.embedding_model == "all-mpnet-base-v2" and r.dense.embedder.encoder.config.model_type == "mpnet"
    assert f"all-mpnet-base-v2 for {len(r)} passages" in capsys.readouterr().err
    monkeypatch.setattr(embed, "LARGE_MODEL_MAX_PASSAGES", len(r) - 1)       # one passage too many
    assert load_retriever([docs], tmp_path / "idx", "dense").embedding_model == "all-minilm-l6-v2"
    named = load_retriever([docs], tmp_path / "idx", "dense", embed.LARGE_MODEL)   # named: no size rule
    assert named.embedding_model == "all-mpnet-base-v2"


def test_dense_cache_reuses_unchanged_passages(tmp_path: Path, model: Path, monkeypatch):
    docs = make_docs(tmp_path / "docs")
    index = PassageIndex.build([docs], tmp_path / "cache")
    emb = Embedder.load(model, precision="fp32")
    folder = cache_folder(tmp_path / "cache", [str(docs.resolve())])
    first = DenseIndex.load_or_build(index.passages, emb, folder)
    assert any(folder.glob("*.npz"))
    encoded: list[int] = []
    real = emb.encode
    monkeypatch.setattr(emb, "encode", lambda texts, *a, **k: encoded.append(len(texts)) or real(texts, *a, **k))
    second = DenseIndex.load_or_build(index.passages, emb, folder)
    assert encoded == [] and np.allclose(first.matrix, second.matrix, atol=2e-3)   # float16 on disk
    # One edited passage: only it is embedded again.
    index.passages[0].text += " Edited."
    DenseIndex.load_or_build(index.passages, emb, folder)
    assert encoded == [1]


def test_modes_followups_and_fallback(tmp_path: Path, model: Path, monkeypatch):
    docs = make_docs(tmp_path / "docs")
    cache = tmp_path / "cache"
    r = load_retriever([docs], cache, "hybrid", model)
    assert isinstance(r, Retriever) and len(r.dense) == len(r)
    q = "How do I reset my password?"
    for mode in ("bm25", "dense", "hybrid"):
        hits = r.search(q, 3, mode=mode)
        assert len(hits) == 3 and hits[0].score >= hits[-1].score
    assert r.search(q, 1, mode="bm25")[0].source.startswith("docs/accounts.txt")
    # A follow-up with no words of its own is found through the earlier turn.
    follow = "and then what happens?"
    earlier = "How long does a refund take?"
    assert "Refunds" not in r.search(follow, 1, mode="bm25")[0].source
    assert "Refunds" in r.search(follow, 1, history=[earlier], mode="bm25")[0].source
    conv = [{"role": "user", "content": earlier}, {"role": "assistant", "content": "x"}]
    assert search_turn(r, follow, 1, conv)[0].id == r.search(follow, 1, history=[conv[0]["content"]])[0].id
    # auto: BM25 with a note when no embedding model is fetched.
    monkeypatch.setenv("CHATFORGE_CACHE", str(tmp_path / "empty"))
    assert load_retriever([docs], cache, "auto").mode == "bm25"
    with pytest.raises(ChatforgeError, match="unknown retrieval mode"):
        load_retriever([docs], cache, "fuzzy")


def test_dense_followup_keeps_a_new_topic(tmp_path: Path, model: Path):
    docs = make_docs(tmp_path / "docs")
    r = load_retriever([docs], tmp_path / "cache", "dense", model)
    alone = r.dense.scores(["refund"])
    both = r.dense.scores(["refund", "proxy port"], [1.0, 0.5])
    assert np.all(both >= alone - 1e-6)          # the best of alone and in context


def test_passage_level_hits(tmp_path: Path, model: Path):
    docs = make_docs(tmp_path / "docs")
    r = load_retriever([docs], tmp_path / "cache", "bm25")
    refunds = next(p for p in r.passages if p.section == "Refunds")
    assert gold_ids(r, refunds.source) == {refunds.id}
    assert gold_ids(r, "docs/billing.md") == {p.id for p in r.passages if p.doc == "docs/billing.md"}
    assert gold_ids(r, "nothing/here.md") is None
    untitled = PassageIndex.from_passages([Passage("a", "d/x.txt", doc="d/x.txt"),
                                           Passage("b", "d/x.txt > S", doc="d/x.txt", section="S")])
    assert gold_ids(untitled, "d/x.txt") == {0, 1}      # a document id names all its passages
    assert gold_ids(untitled, "d/x.txt", section="s") == {1}     # ... and with a section, its passages
    assert gold_ids(untitled, "d/x.txt", section="T") is None
    qs = [{"question": "How long until the refund reaches my card?", "source": refunds.source},
          {"question": "and then what happens?", "source": [refunds.source],
           "history": [{"role": "user", "content": "refund request"}]},
          {"question": "unknown", "source": "nothing/here.md"}]
    got = retrieval_hits(r, qs, ("bm25",))
    assert got["bm25"]["n"] == 2 and got["bm25"]["hit@1"] == 1.0
    assert retrieval_hits(r, qs, ("bm25",), last_message_only=True)["bm25"]["hit@1"] == 0.5
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(json.dumps(q) for q in qs) + "\n" + json.dumps(
        {"messages": [{"role": "user", "content": "refund?"}, {"role": "assistant", "content": "yes"}], "source": "x"}))
    assert [q["question"] for q in load_questions(path)][-1] == "refund?"


def test_customer_rows_score_a_manual_per_style_and_section(tmp_path: Path):
    from chatforge.eval.customer import customer_rows

    root, cache = tmp_path / "repo", tmp_path / "cache"
    make_docs(root / "examples" / "my_docs")
    make_docs(cache / "sources" / "git-faq")
    manual = make_docs(cache / "sources" / "git-manual")
    (root / "evalsets").mkdir()
    lines = [{"question": "refund money card", "source": "git-manual", "section": "Refunds", "style": "title"},
             {"question": "refund money card", "source": "git-manual", "section": "Proxy", "style": "customer"},
             {"question": "proxy NTLM", "source": "git-manual", "section": "Proxy", "style": "customer"}]
    (root / "evalsets" / "manual-git.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = customer_rows(cache, tmp_path / "out", model=str(tiny_model(tmp_path / "m", WORDS)), root=root)
    hits = json.loads((tmp_path / "out" / "hits.json").read_text())
    assert set(hits) == {"manual-git, customer", "manual-git, title"}     # only the sets that exist
    assert hits["manual-git, title"]["bm25"] == {"hit@1": 1.0, "hit@3": 1.0, "n": 1}
    # The refund question's gold is the Proxy section now: the Refunds passage at the top is no hit.
    assert hits["manual-git, customer"]["bm25"]["hit@1"] == 0.5 and hits["manual-git, customer"]["bm25"]["n"] == 2
    n = len(PassageIndex.build([manual], tmp_path / "idx"))
    assert f"manual-git, customer ({n} passages, m)" in out           # the embedding model is named


def test_evalsets_are_well_formed_and_their_gold_is_indexed():
    root = Path(__file__).resolve().parent.parent
    sizes = {"customer-gitfaq.jsonl": 60, "customer-company.jsonl": 40, "followups.jsonl": 20}
    company = PassageIndex.from_passages(__import__("chatforge.retrieval.passages", fromlist=["x"]).read_passages(
        [root / "examples" / "my_docs"]))
    for name, least in sizes.items():
        qs = load_questions(root / "evalsets" / name)
        assert len(qs) >= least
        for q in qs:
            assert q["question"].strip() and q["source"]
            if name == "followups.jsonl":
                assert [m["role"] for m in q["history"]] == ["user", "assistant"]
            if "my_docs/" in json.dumps(q["source"]):
                assert gold_ids(company, q["source"]), q


def retriever_data(tmp_path: Path) -> tuple[Path, Path]:
    """(documents, data folder with qa_train / qa_val) for `retriever train`."""
    docs = make_docs(tmp_path / "docs")
    data = tmp_path / "data"
    data.mkdir()
    qa = [("How do I get my money back?", "A refund is possible within 30 days", "docs/billing.md"),
          ("Which port must the router open?", "forward TCP port 8443", "docs/network.md"),
          ("I forgot my password", "click Forgot password", "docs/accounts.txt"),
          ("How do I turn on two-factor?", "Enable two-factor authentication under Profile", "docs/accounts.txt"),
          ("When are invoices sent?", "Invoices are issued on the first day", "docs/billing.md"),
          ("Can I use a proxy?", "Agents honour the HTTPS_PROXY environment variable", "docs/network.md")] * 2
    with open(data / "qa_train.jsonl", "w") as f:
        for q, a, s in qa:
            f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                "source": s}) + "\n")
    (data / "qa_val.jsonl").write_text(json.dumps({"question": "money back?", "answer": "refund",
                                                   "source": "docs/billing.md"}) + "\n")
    return docs, data


@pytest.mark.parametrize("model_type", ["bert", "mpnet"])
def test_retriever_train_moves_the_encoder(tmp_path: Path, model_type: str):
    from chatforge.train.retriever import run_retriever

    model = tiny_model(tmp_path / "tiny-embed", WORDS, model_type=model_type)
    docs, data = retriever_data(tmp_path)
    out = tmp_path / "retriever"
    before = Embedder.load(model, precision="fp32").encode(["How do I get my money back?"])
    report = run_retriever(data, out, docs=[str(docs)], base=str(model), steps=4, batch_size=4, lr=1e-3,
                           max_tokens=32, val_fraction=0.2, threads=1, index_cache=str(tmp_path / "cache"))
    after = Embedder.load(out, precision="fp32").encode(["How do I get my money back?"])
    assert not np.allclose(before, after)
    assert report["steps"] == 4 and "qa_val" in report["before"] and "qa_val" in report["after"]
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert json.loads((out / "retriever.json").read_text())["pairs"] == report["pairs"]
    assert json.loads((out / "config.json").read_text())["model_type"] == model_type


def test_retriever_train_command(tmp_path: Path, model: Path, capsys):
    """The command line: options from --config YAML and flags, the table printed, bad input exit 2."""
    from chatforge.commands.main import main

    docs, data = retriever_data(tmp_path)
    cfg = tmp_path / "r.yaml"
    cfg.write_text(f"steps: 2\nbatch-size: 4\nmax_tokens: 32\nthreads: 1\nindex-cache: {tmp_path / 'cache'}\n")
    assert main(["retriever", "train", "--data", str(data), "--docs", str(docs), "--base", str(model),
                 "--config", str(cfg), "--lr", "1e-3"]) == 0
    out = capsys.readouterr().out
    assert "2 steps" in out and "qa_val" in out and f"--embedding-model {data.parent / 'retriever'}" in out
    assert json.loads((data.parent / "retriever" / "retriever.json").read_text())["steps"] == 2
    assert main(["retriever", "train", "--data", str(data), "--batch-size", "1"]) == 2
    assert "--batch-size >= 2" in capsys.readouterr().err


@pytest.mark.network
def test_fetched_minilm_finds_the_customer_worded_entry(tmp_path: Path):
    from chatforge.data.fetch import fetch

    cache = files.cache_dir()
    assert fetch(["all-minilm-l6-v2"], cache)["all-minilm-l6-v2"].ok
    docs = make_docs(tmp_path / "docs")
    r = load_retriever([docs], tmp_path / "cache", "dense", cache / "sources" / "all-minilm-l6-v2")
    assert "Refunds" in r.search("I was charged twice, how do I get my money back?", 1)[0].source


@pytest.mark.network
def test_fetched_mpnet_equals_transformers_and_finds_the_entry(tmp_path: Path):
    from chatforge.data.fetch import fetch

    cache = files.cache_dir()
    assert fetch(["all-mpnet-base-v2"], cache)["all-mpnet-base-v2"].ok
    folder = cache / "sources" / "all-mpnet-base-v2"
    docs = make_docs(tmp_path / "docs")
    r = load_retriever([docs], tmp_path / "cache", "dense", folder)
    assert "Refunds" in r.search("I was charged twice, how do I get my money back?", 1)[0].source
    transformers = pytest.importorskip("transformers")
    emb = Embedder.load(folder, precision="fp32")
    hf = transformers.MPNetModel.from_pretrained(str(folder), add_pooling_layer=False).eval()
    texts = ["did a reset --hard and lost my commits!!! any way to get them back??", "refund"]
    ids, mask = emb.batch(emb.token_ids(texts))
    with torch.no_grad():
        ref = mean_pool(hf(input_ids=ids, attention_mask=mask).last_hidden_state, mask).numpy()
    assert np.allclose(emb.encode(texts), ref, atol=1e-4)


def test_another_document_set_reuses_the_vectors_it_shares(tmp_path: Path, model: Path, monkeypatch):
    docs = make_docs(tmp_path / "docs")
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "refund.md").write_text("# Refund policy\n\nCharged twice? We pay the money back within a week.\n")
    emb = Embedder.load(model, precision="fp32")
    load_retriever([docs], tmp_path / "cache", "dense", model)
    encoded: list[int] = []
    real = Embedder.encode
    monkeypatch.setattr(Embedder, "encode",
                        lambda self, texts, *a, **k: encoded.append(len(texts)) or real(self, texts, *a, **k))
    both = load_retriever([docs, extra], tmp_path / "cache", "dense", model)
    assert encoded == [1]                     # only the new document's passage
    assert len(both.dense) == len(both) and emb.dim == both.dense.matrix.shape[1]
    encoded.clear()
    load_retriever([docs, extra], tmp_path / "cache", "dense", model)
    assert encoded == []                      # its own cache now holds every passage
