"""The retriever in the continual-learning round: training pairs from corrected answers (no
`source`), the embedding model a model folder's answer.json names (read by `chatforge eval`
without --embedding-model), and the round's `retriever` step keeping or rejecting what it trained
by its rule. Tiny embedding and chat models are made here; everything runs for real."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from chatforge.commands import main as cli
from chatforge.errors import ChatforgeError
from chatforge.infer.answer import AnswerSettings
from chatforge.retrieval import PassageIndex
from chatforge.train.retriever import copied_passage, training_pairs

from test_dense import WORDS, tiny_model
from test_retrieval import make_docs

SYSTEM = {"role": "system", "content": "Answer from the context."}


def _fed(question: str, answer: str, grounded: bool = True, history: tuple = ()) -> dict:
    """A line of `feedback export`'s sft.jsonl: the prompt the server showed, then the better answer."""
    user = (f"Context:\n[1] (source: docs/network.md > Proxy) Agents honour the HTTPS_PROXY variable.\n\n"
            f"Question: {question}") if grounded else question
    return {"messages": [SYSTEM, *history, {"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


@pytest.fixture()
def index(tmp_path: Path) -> PassageIndex:
    return PassageIndex.build([make_docs(tmp_path / "docs")], tmp_path / "cache")


def test_feedback_pairs_need_an_answer_copied_from_a_passage(index):
    rows = [
        # Copied (with its citation) from the refunds passage, asked in the customer's words.
        _fed("I was charged twice, how do I get my money back?",
             "A refund is possible within 30 days of a payment. Open Billing, choose the invoice and press "
             "Request refund. (source: docs/billing.md > Billing > Refunds)"),
        # Asked without a grounded prompt (a plain chat turn), copied from the firewall passage.
        _fed("agents cannot connect", "The router must forward TCP port 8443 to the backup appliance so that "
             "remote agents can connect.", grounded=False),
        # The user's own words: on topic, but no passage holds them.
        _fed("Can I pay with PayPal?", "Sorry, we only take cards and bank transfers for now."),
        # A follow-up: the last turn alone does not say what it is about.
        _fed("and how long does that take?", "the money reaches your card within five working days",
             history=({"role": "user", "content": "refund?"}, {"role": "assistant", "content": "Open Billing."})),
        # Too short for a single word 4-gram.
        _fed("port?", "8443"),
    ]
    pairs = training_pairs(rows, index, hard_negatives=1)
    assert [p["question"] for p in pairs] == ["I was charged twice, how do I get my money back?", "agents cannot connect"]
    by_id = {p.id: p for p in index.passages}
    assert by_id[pairs[0]["passage"]].section == "Refunds" and pairs[0]["source"].endswith("> Refunds")
    assert by_id[pairs[1]["passage"]].doc.endswith("network.md")
    for p in pairs:     # the hard negative is another passage, never the gold one
        assert len(p["negatives"]) == 1 and by_id[p["passage"]].text not in p["negatives"][0]

    # The bar: half of the answer's word 4-grams in one passage. A correction that quotes one
    # sentence and adds as much of its own is not trusted.
    quoted = "Invoices are issued on the first day of every month."
    assert copied_passage(index, "when is the bill sent?", quoted) is not None
    own = " and if it is late you can write to the team who will look into it again"
    assert copied_passage(index, "when is the bill sent?", quoted + own) is None


def test_data_folder_pairs_still_use_their_source(index):
    """A Q&A pair with a source is taken as before; one whose source is not indexed is skipped, even
    when its answer is copied from a passage (a source is a claim to check, not to overrule)."""
    answer = "Enable two-factor authentication under Profile, Security."
    records = [{"messages": [{"role": "user", "content": "2fa?"}, {"role": "assistant", "content": answer}],
                "source": src} for src in ("docs/accounts.txt", "elsewhere/other.md", None)]
    pairs = training_pairs(records, index)
    assert len(pairs) == 1 and pairs[0]["source"].startswith("docs/accounts.txt")


def test_answer_settings_embedding_model_is_validated_and_resolved(tmp_path: Path):
    model = tmp_path / "runs" / "rounds" / "1" / "dpo"
    model.mkdir(parents=True)
    (tmp_path / "runs" / "rounds" / "1" / "retriever").mkdir()
    settings = AnswerSettings(embedding_model="../retriever")
    settings.save(model)
    loaded = AnswerSettings.load(model)
    assert loaded.embedding_model == "../retriever"
    assert loaded.embedding_model_for(model) == str(tmp_path / "runs" / "rounds" / "1" / "retriever")
    # Through the served link: relative to the link's target, not to the link's folder.
    os.symlink("runs/rounds/1/dpo", tmp_path / "assistant")
    assert loaded.embedding_model_for(tmp_path / "assistant") == str((tmp_path / "runs/rounds/1/retriever").resolve())
    assert AnswerSettings(embedding_model="all-minilm-l6-v2").embedding_model_for(model) == "all-minilm-l6-v2"
    assert AnswerSettings().embedding_model_for(model) is None
    with pytest.raises(ChatforgeError, match="is not a folder"):
        AnswerSettings(embedding_model="../gone").embedding_model_for(model)
    for bad in ("", "  ", 3):
        with pytest.raises(ChatforgeError, match="embedding_model must be"):
            AnswerSettings(embedding_model=bad)
    (model / "answer.json").write_text(json.dumps({"embedding_model": 7}))
    with pytest.raises(ChatforgeError, match="embedding_model must be"):
        AnswerSettings.load(model)


def _tiny_gpt(folder: Path, docs: Path) -> Path:
    from chatforge.data.tokenizer import train_tokenizer
    from chatforge.model.folder import save_model
    from chatforge.model.gpt import GPT, preset

    tok = train_tokenizer([p.read_text() for p in docs.iterdir()] * 3, 300, None)
    torch.manual_seed(0)
    return save_model(folder, GPT(preset("tiny", vocab_size=tok.vocab_size)), tok)


def test_eval_uses_the_embedding_model_answer_json_names(tmp_path: Path, monkeypatch, capsys):
    from chatforge.retrieval import embed

    docs = make_docs(tmp_path / "docs")
    model = _tiny_gpt(tmp_path / "model", docs)
    tiny_model(tmp_path / "retriever", WORDS)
    AnswerSettings(embedding_model="../retriever").save(model)
    loaded = []
    real = embed.Embedder.load.__func__

    def spy(cls, name_or_path=None, *args, **kwargs):
        loaded.append(name_or_path)
        return real(cls, name_or_path, *args, **kwargs)

    monkeypatch.setattr(embed.Embedder, "load", classmethod(spy))
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "How do I get my money back?", "answer": "refund",
                                     "source": "docs/billing.md"}) + "\n")
    argv = ["eval", "--model", str(model), "--questions", str(questions), "--docs", str(docs), "--retrieval",
            "dense", "--max-new-tokens", "4", "--skip-bare", "--second-turn", "0", "--index-cache",
            str(tmp_path / "cache"), "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 0
    assert loaded == [str(tmp_path / "retriever")]
    assert json.loads((tmp_path / "out" / "eval.json").read_text())["retrieval_hits"]["modes"]["dense"]["n"] == 1
    # The flag still wins over the file.
    other = tiny_model(tmp_path / "other", WORDS, seed=1)
    assert cli.main([*argv, "--embedding-model", str(other)]) == 0
    assert loaded[-1] == str(other)
    # A file naming a folder that is gone: exit 2 and what to do.
    replace(AnswerSettings(), embedding_model="../missing").save(model)
    capsys.readouterr()
    assert cli.main(argv) == 2
    assert "names the embedding model ../missing" in capsys.readouterr().err


# ------------------------------------------------------------------ the round's retriever step

VAL = [("refund please", "A refund is possible", "docs/billing.md > Billing > Refunds"),
       ("router port", "forward TCP port 8443", "docs/network.md > Network setup"),
       ("reset password", "click Forgot password", "docs/accounts.txt > Accounts")]
PASSAGES = {"docs/billing.md > Billing > Refunds": "A refund is possible within 30 days of a payment.",
            "docs/network.md > Network setup": "The router must forward TCP port 8443 to the backup appliance.",
            "docs/accounts.txt > Accounts": "To reset a forgotten password, open the sign-in page.",
            "docs/billing.md > Billing": "Invoices are issued on the first day of every month.",
            "docs/network.md > Network setup > Proxy": "Agents honour the HTTPS_PROXY environment variable.",
            "docs/accounts.txt > Accounts > Two-factor authentication": "Enable two-factor authentication under "
                                                                       "Profile, Security."}


def _round_setup(tmp_path: Path, poisoned: bool = False) -> dict:
    """A data folder, documents, a served model folder whose answer.json names a tiny embedding
    model, and a round folder holding the exported feedback (two copied corrections)."""
    docs = make_docs(tmp_path / "docs")
    data = tmp_path / "data"
    data.mkdir()
    qa = [("How do I get my money back?", "A refund is possible within 30 days of a payment", "docs/billing.md"),
          ("Which port must the router open?", "The router must forward TCP port 8443", "docs/network.md"),
          ("I forgot my password", "To reset a forgotten password, open the sign-in page", "docs/accounts.txt"),
          ("How do I turn on two-factor?", "Enable two-factor authentication under Profile", "docs/accounts.txt"),
          ("When are invoices sent?", "Invoices are issued on the first day of every month", "docs/billing.md"),
          ("Can I use a proxy?", "Agents honour the HTTPS_PROXY environment variable", "docs/network.md")]
    with open(data / "qa_train.jsonl", "w") as f:
        for q, a, s in qa:
            f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                "source": s}) + "\n")
    # Gold passages named (not documents): hit@3 among six passages can fall.
    (data / "qa_val.jsonl").write_text("".join(json.dumps(
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "source": s}) + "\n"
        for q, a, s in VAL))
    run = tmp_path / "runs" / "r"
    served = run / "sft"
    served.mkdir(parents=True)
    tiny_model(run / "embedder", WORDS)
    AnswerSettings(passages=2, embedding_model="../embedder").save(served)
    round_dir = run / "rounds" / "1"
    (round_dir / "feedback").mkdir(parents=True)
    with open(round_dir / "feedback" / "sft.jsonl", "w") as f:
        for q, a in [("I was charged twice for my card", "A refund is possible within 30 days of a payment."),
                     ("agents cannot connect", "Firewalls that inspect TLS traffic break the agent handshake.")]:
            f.write(json.dumps(_fed(q, a)) + "\n")
        if poisoned:    # "corrections" pasting other passages to the validation questions
            for q, _, gold in VAL:
                for wrong, text in PASSAGES.items():
                    if wrong != gold:
                        f.write(json.dumps(_fed(q, text)) + "\n")
    unseen_docs = tmp_path / "unseen"
    unseen_docs.mkdir()
    (unseen_docs / "faq.md").write_text("# FAQ\n\n## Proxy\n\nThe agent reads HTTPS_PROXY.\n\n"
                                        "## Password\n\nClick Forgot password on the sign-in page.\n")
    unseen_q = tmp_path / "unseen.jsonl"
    unseen_q.write_text(json.dumps({"question": "proxy for agents?", "source": "unseen/faq.md"}) + "\n")
    return {"docs": [docs], "data": data, "run": run, "served": served, "round": round_dir,
            "unseen": (unseen_q, unseen_docs)}


def _settings(cache: Path, lr: float) -> dict:
    return {"eval": {}, "retriever": {"steps": 3, "batch_size": 4, "lr": lr, "max_tokens": 32, "threads": 1,
                                      "val_fraction": 0, "index_cache": str(cache)}}


def _step(tmp_path: Path, monkeypatch, poisoned: bool, steps: int, lr: float) -> tuple[dict, dict]:
    from chatforge import continual
    from chatforge.stages import Runner

    monkeypatch.chdir(tmp_path)
    s = _round_setup(tmp_path, poisoned)
    settings = _settings(tmp_path / "cache", lr)
    settings["retriever"]["steps"] = steps
    result = continual.retriever_step(settings, Runner(s["round"], False, cli.main), s["round"], s["data"], s["docs"],
                                      s["unseen"], s["served"])
    assert result["base"] == str(s["run"] / "embedder") and result["mode"] == "hybrid"
    assert set(result["before"]) == {"qa_val", "unseen", "feedback (trained on)"}
    report = json.loads((s["round"] / "retriever" / "retriever.json").read_text())
    assert report["base"] == str(s["run"] / "embedder") and report["before"] == result["before"]
    return s, result


def test_round_retriever_step_keeps_a_retriever_that_does_not_lose(tmp_path: Path, monkeypatch):
    """A learning rate too small to move a ranking: nothing falls, so the step keeps it, and the
    round's model is recorded to retrieve with it."""
    from chatforge import continual

    s, result = _step(tmp_path, monkeypatch, poisoned=False, steps=3, lr=1e-12)
    assert result["feedback"] == {"records": 2, "pairs": 2}
    assert result["kept"] and result["kept_because"] == [] and result["use"] == str(s["round"] / "retriever")
    new = s["round"] / "dpo"
    new.mkdir()
    continual.record_answer_settings(s["served"], new, result["use"])
    settings = AnswerSettings.load(new)
    assert settings.passages == 2       # the served model's answer settings carried over
    assert settings.embedding_model == "../retriever" and settings.embedding_model_for(new) == result["use"]


def test_round_retriever_step_rejects_one_that_loses_on_validation(tmp_path: Path, monkeypatch):
    """"Corrections" that paste the wrong passages to the validation questions: the retrained
    retriever loses hit@3 on qa_val (1.000 -> 0.667, seeded), so the step rejects it and the
    round's model keeps retrieving with the served model's embedding model."""
    from chatforge import continual

    s, result = _step(tmp_path, monkeypatch, poisoned=True, steps=20, lr=5e-3)
    assert result["feedback"]["pairs"] == 2 + 3 * 5
    assert result["before"]["qa_val"]["hybrid"]["hit@3"] == 1.0
    assert result["after"]["qa_val"]["hybrid"]["hit@3"] < 1.0
    assert not result["kept"] and result["kept_because"][0].startswith("hybrid hit@3 on qa_val fell 1.000")
    assert result["use"] == str(s["run"] / "embedder")
    new = s["round"] / "dpo"
    new.mkdir()
    continual.record_answer_settings(s["served"], new, result["use"])
    assert AnswerSettings.load(new).embedding_model == "../../../embedder"
    assert AnswerSettings.load(new).embedding_model_for(new) == str(s["run"] / "embedder")


def test_keep_rule_on_reported_hits():
    """The rule itself, on hand-written reports: any held-out hit@3 fall rejects; ties keep; the
    feedback's own questions never decide; hit@1 alone does not decide."""
    from chatforge.continual import keep_retriever

    def r(before, after):
        return {"before": {n: {"hybrid": {"hit@1": 0.5, "hit@3": b}} for n, b in before.items()},
                "after": {n: {"hybrid": {"hit@1": 0.1, "hit@3": a}} for n, a in after.items()}}

    assert keep_retriever(r({"qa_val": 1.0, "unseen": 0.9}, {"qa_val": 1.0, "unseen": 0.9}), "hybrid") == []
    assert keep_retriever(r({"qa_val": 1.0, "feedback (trained on)": 0.9}, {"qa_val": 1.0, "feedback (trained on)": 0.1}),
                          "hybrid") == []
    why = keep_retriever(r({"qa_val": 1.0, "unseen": 0.9}, {"qa_val": 0.97, "unseen": 0.95}), "hybrid")
    assert why == ["hybrid hit@3 on qa_val fell 1.000 -> 0.970"]
    why = keep_retriever(r({"qa_val": 1.0, "unseen": 0.9}, {"qa_val": 1.0, "unseen": 0.85}), "hybrid")
    assert why == ["hybrid hit@3 on unseen fell 0.900 -> 0.850"]


def test_align_retriever_setting_is_checked():
    from chatforge import continual

    base = {"algo": "dpo", "promote": "better"}
    continual.check_settings({**base, "retriever": True})
    with pytest.raises(ChatforgeError, match="align.retriever must be true or false"):
        continual.check_settings({**base, "retriever": "yes"})


@pytest.mark.e2e
def test_pipeline_round_retrains_the_retriever_and_rollback_restores_it(tmp_path: Path, monkeypatch, capsys):
    """`pipeline --feedback DB --train-retriever` on examples/my_docs with a tiny Llama: the round
    trains the retriever from the served model's embedding model on the Q&A and the corrections,
    records the one it uses in the new model's answer.json, evaluates the new model with it, and
    `--rollback` serves the previous model with its own answer.json's embedding model again."""
    from chatforge import continual
    from chatforge.eval.evaluate import load_questions

    from test_pipeline import ROOT, ROUND, _hf_base, _served_feedback

    monkeypatch.chdir(tmp_path)
    docs = ROOT / "examples" / "my_docs"
    cfg = tmp_path / "r.yaml"
    cfg.write_text(ROUND.replace("  sft-epochs: 1", "  sft-epochs: 1\n  promote: always") +
                   "retriever:\n  steps: 2\n  batch-size: 4\n  max-tokens: 32\n  threads: 1\n")
    argv = ["pipeline", "--base", str(_hf_base(tmp_path, docs)), "--config", str(cfg), "--input", str(docs),
            "--only-input", "--name", "r"]
    assert main_ok(argv)
    run = tmp_path / "runs" / "r"
    # The served model retrieves with a (tiny) embedding model its answer.json names.
    embedder = tiny_model(tmp_path / "embedder", WORDS)
    sft = run / "sft"
    replace(AnswerSettings.load(sft), embedding_model=str(embedder)).save(sft)
    # Corrections: two support agents' replies of the transcripts (their own words: no passage
    # holds them) and three pasted from the documents (copied: they teach the retriever).
    qa = [(q["question"], q["reference"]) for q in load_questions(run / "data" / "qa_train.jsonl")][:2]
    qa += [("Can I get one file back?", ("Open the device in the web console, browse to the folder, pick the "
                                         "file and choose a version from the timeline.")),
           ("Is the upload private?", ("Files are encrypted on your device with AES-256 before they leave it, "
                                       "and travel over TLS 1.3.")),
           ("How do I quit?", ("Go to Billing > Plan and choose Cancel plan. Your backups stay available for 30 "
                               "days after the end of the billing period."))]
    db = tmp_path / "feedback.db"
    _served_feedback(db, qa, "a")
    capsys.readouterr()
    assert main_ok([*argv, "--feedback", str(db), "--train-retriever"])
    out = capsys.readouterr().out
    assert "== retriever: chatforge retriever train" in out and f"--base {embedder}" in out
    info = json.loads((run / "rounds" / "1" / "round.json").read_text())
    r = info["retriever"]
    # 5 corrections + the up-voted reply to the first question (a transcript's words: no pair)
    assert r["base"] == str(embedder) and r["feedback"] == {"records": 6, "pairs": 3}
    assert r["kept"] == (not r["kept_because"])
    new = run / "rounds" / "1" / "dpo"
    expected = str((run / "rounds" / "1" / "retriever").resolve()) if r["kept"] else str(embedder)
    assert AnswerSettings.load(new).embedding_model_for(new) == expected
    assert continual.served_model(run).resolve() == new.resolve()       # promote: always
    assert AnswerSettings.load(run / "assistant").embedding_model_for(run / "assistant") == expected
    assert json.loads((run / "rounds" / "1" / "eval" / "eval.json").read_text())["retrieval_hits"]["modes"].get("hybrid")
    assert ("kept: " if r["kept"] else "not kept (") in out
    # Roll back: the previous model, with the embedding model its own answer.json names.
    assert main_ok([*argv, "--rollback"])
    assert AnswerSettings.load(run / "assistant").embedding_model_for(run / "assistant") == str(embedder)


def main_ok(argv: list[str]) -> bool:
    return cli.main(argv) == 0
