"""`chatforge eval` on a tiny untrained model: the outputs, their keys, and clear input errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_retrieval import ACCOUNTS, BILLING, NETWORK, QA, make_docs

from chatforge.commands import main as cli
from chatforge.errors import ChatforgeError
from chatforge.eval.evaluate import evaluate, load_questions

KEYS = ("perplexity", "bleu", "rouge1", "rouge2", "rougeL", "hit@1", "hit@3")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    from chatforge.data.tokenizer import train_tokenizer
    from chatforge.model.folder import save_model
    from chatforge.model.gpt import GPT, preset

    root = tmp_path_factory.mktemp("eval")
    docs = make_docs(root / "docs")
    texts = [BILLING, NETWORK, ACCOUNTS] + [f"{q} {a}" for q, a, _ in QA]
    tok = train_tokenizer(texts * 3, 400, root / "tok")
    torch.manual_seed(0)
    run = root / "run"
    model_dir = save_model(run / "sft", GPT(preset("tiny", vocab_size=tok.vocab_size)), tok)
    (model_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 6 - s, "val_loss": 6.2 - s}) + "\n"
                                                     for s in range(1, 4)))
    (run / "pretrain").mkdir()
    (run / "pretrain" / "metrics.jsonl").write_text('{"step": 1, "loss": 8.0}\n{"step": 2, "loss": 7.0}\n')
    data = root / "data"
    data.mkdir()
    (data / "val.jsonl").write_text("".join(json.dumps({"text": t, "source": "docs"}) + "\n" for t in texts))
    (data / "qa_val.jsonl").write_text("".join(json.dumps(
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "source": s}) + "\n"
        for q, a, s in QA[:4]))
    questions = root / "questions.jsonl"
    questions.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a, _ in QA[4:]))
    return {"root": root, "docs": docs, "model": model_dir, "data": data, "questions": questions}


def test_eval_cli_writes_json_examples_and_report(setup, capsys):
    out = setup["root"] / "out"
    code = cli.main(["eval", "--model", str(setup["model"]), "--data", str(setup["data"]), "--docs", str(setup["docs"]),
                     "--max-new-tokens", "8", "--max-ppl-batches", "2", "--out", str(out)])
    assert code == 0
    res = json.loads((out / "eval.json").read_text())
    for key in KEYS:
        assert key in res
    assert res["perplexity"] > 1 and res["questions"] == 4
    assert set(res["baselines"]) == {"extractive", "no_retrieval"}
    for row in res["baselines"].values():
        assert set(KEYS) <= set(row)
    # The extractive reply is the top passage; with sources given, retrieval finds their documents.
    assert res["hit@3"] == res["baselines"]["extractive"]["hit@3"] and res["hit@3"] >= 0.75
    # Grounded precision: the extractive reply is copied from its context by construction; a
    # tiny untrained model's answers are measured against the same passages (any value in 0-1).
    assert res["baselines"]["extractive"]["grounded"] == 1.0
    for g in (res.get("grounded"), res["baselines"]["no_retrieval"]["grounded"]):
        assert g is None or 0.0 <= g <= 1.0
    assert "grounded" in (out / "report.html").read_text()
    examples = [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines()]
    assert len(examples) == 4 and {"question", "reference", "answer", "extractive", "no_retrieval"} <= set(examples[0])
    # The grounded prompt the model answered, for a reward model to score the answer after it.
    for e in examples:
        assert e["prompt"][-1]["role"] == "user" and e["question"] in e["prompt"][-1]["content"]
        assert "Context" in e["prompt"][-1]["content"]
    html = (out / "report.html").read_text()
    assert "<svg" in html and "pretrain: loss" in html and "sft: loss" in html
    table = capsys.readouterr().out
    assert "extractive" in table and "no_retrieval" in table and "hit@1" in table
    # The questions asked again as a second turn (all 4 are single-turn).
    turn = res["second_turn"]
    assert turn["questions"] == 4 and 0 <= turn["closer_to_earlier_answer"] <= 1
    assert all("second_turn" in e for e in examples) and "on 4 questions asked after an earlier one" in table


def test_second_turn_measures_a_model_that_repeats_itself():
    from chatforge.eval.evaluate import _second_turn

    qs = [{"question": f"q{i}", "reference": ref, "history": []}
          for i, ref in enumerate(["open settings and pick reset", "the fee is ten dollars a month",
                                   "restart the router then wait", "backups run every night at two"])]
    first = [q["reference"] + " (source: doc)" for q in qs]

    class Stub:
        """Answers each conversation from its messages: `pick` chooses what."""

        def __init__(self, pick):
            self.pick, self.seen = pick, []

        def answer(self, convs, desc):
            self.seen += convs
            return [self.pick(c) for c in convs]

    def prompt(question, hits, history):
        return [*history, {"role": "user", "content": question}]

    repeater = Stub(lambda c: c[-2]["content"])                      # the earlier turn's answer
    examples = [{} for _ in qs]
    out = _second_turn(repeater, qs, [[]] * 4, first, examples, 10, prompt)
    assert out["questions"] == 4 and out["closer_to_earlier_answer"] == 1.0 and out["rougeL"] < 0.3
    assert out["rougeL_first_turn"] == 1.0
    # Each question came after the one before it (the first after the last) and that answer.
    assert [c[0]["content"] for c in repeater.seen] == ["q3", "q0", "q1", "q2"]
    assert [c[1]["content"] for c in repeater.seen] == [first[3], first[0], first[1], first[2]]
    faithful = Stub(lambda c: qs[int(c[-1]["content"][1])]["reference"])
    out = _second_turn(faithful, qs, [[]] * 4, first, examples, 2, prompt)
    assert out["questions"] == 2 and out["closer_to_earlier_answer"] == 0.0 and out["rougeL"] == 1.0
    assert examples[0]["second_turn"] == qs[0]["reference"]


def test_eval_questions_file_without_sources(setup):
    # No "source" field: the gold document is the one whose passage is closest to the reference.
    res = evaluate(setup["model"], setup["root"] / "out2", questions=setup["questions"], docs=[setup["docs"]],
                   max_new_tokens=4, verbose=False)
    assert res["perplexity"] is None and res["questions"] == 3
    assert res["hit@1"] is not None and res["bleu"] >= 0

    # A source that is not among the documents (a chat transcript) leaves the question out of hit@k.
    other = setup["root"] / "transcripts.jsonl"
    other.write_text(json.dumps({"question": "Which port must be forwarded?", "answer": "8443",
                                 "source": "support/chats.csv"}) + "\n")
    res = evaluate(setup["model"], setup["root"] / "out2b", questions=other, docs=[setup["docs"]],
                   max_new_tokens=2, verbose=False)
    assert res["hit@1"] is None and res["baselines"]["extractive"]["bleu"] >= 0


def test_eval_without_documents(setup):
    res = evaluate(setup["model"], setup["root"] / "out3", questions=setup["questions"], max_questions=2,
                   max_new_tokens=4, verbose=False)
    assert res["questions"] == 2 and res["hit@1"] is None and res["baselines"] == {}


def test_malformed_questions_file_is_exit_2(setup, capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "ok?", "answer": "yes"}\n{"question": "no answer"}\n')
    code = cli.main(["eval", "--model", str(setup["model"]), "--questions", str(bad), "--out", str(tmp_path / "o")])
    assert code == 2
    assert f"{bad}:2" in capsys.readouterr().err
    bad.write_text("not json\n")
    with pytest.raises(ChatforgeError, match=r"bad.jsonl:1: not valid JSON"):
        load_questions(bad)
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(ChatforgeError, match=r"bad.jsonl:1"):
        load_questions(bad)


def test_missing_model_is_exit_2(capsys, tmp_path):
    assert cli.main(["eval", "--questions", "x.jsonl"]) == 2
    assert "--model is required" in capsys.readouterr().err
    assert cli.main(["eval", "--model", str(tmp_path / "none"), "--data", str(tmp_path)]) == 2


def test_compare_two_evaluations(setup):
    """eval/compare.py on real eval folders: the metrics side by side, and a (tiny, untrained but
    real) reward model's win-rate: the same answers tie at 0.5, other answers are counted."""
    from chatforge.eval.compare import compare, format_comparison
    from chatforge.model.folder import load_model
    from chatforge.train.reward import RewardModel

    a, b = setup["root"] / "cmp-a", setup["root"] / "cmp-b"
    for out, new in ((a, "6"), (b, "12")):
        assert cli.main(["eval", "--model", str(setup["model"]), "--data", str(setup["data"]), "--docs",
                         str(setup["docs"]), "--max-new-tokens", new, "--max-ppl-batches", "1", "--out", str(out)]) == 0
    backbone, tok = load_model(setup["model"])
    torch.manual_seed(0)
    judge = RewardModel(backbone, tok, 256).eval()
    same = compare(a, a, judge)
    assert same["questions"] == 4 and same["win"]["win_rate"] == 0.5 and same["win"]["same_answer"] == 4
    assert all(row["change"] == 0 for row in same["metrics"].values())
    other = compare(a, b, judge)
    longer = [json.loads(line)["answer"] for line in (b / "examples.jsonl").read_text().splitlines()]
    shorter = [json.loads(line)["answer"] for line in (a / "examples.jsonl").read_text().splitlines()]
    assert other["win"]["same_answer"] == sum(x.strip() == y.strip() for x, y in zip(longer, shorter))
    assert 0 <= other["win"]["win_rate"] <= 1 and other["metrics"]["rougeL"]["before"] == same["metrics"]["rougeL"]["after"]
    assert "reward win-rate of the new answers" in format_comparison("eval", other)
    assert compare(a, b)["win"] is None
    with pytest.raises(ChatforgeError, match="holds no eval.json"):
        compare(a, setup["root"] / "nowhere")


def test_refusals_citations_and_the_answer_settings(setup, monkeypatch):
    """False refusals, refusals of unanswerable questions and citation accuracy, from a stub model
    whose replies are known: it refuses questions marked unanswerable and one answerable one, and
    copies the first passage under a spliced source name otherwise."""
    from chatforge.eval import evaluate as eval_run
    from chatforge.infer.answer import AnswerSettings
    from chatforge.retrieval import NOT_FOUND_REPLY

    qs = setup["root"] / "sets.jsonl"
    rows = [{"question": q, "answer": a, "source": s} for q, a, s in QA[:4]]
    rows += [{"question": "Can I pay with seashells?", "answer": "", "answerable": False},
             {"question": "Do you sell garden furniture?", "answer": "", "answerable": False}]
    qs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    refused_answerable = QA[0][0]

    def stub(self, convs, desc, grounded=True):
        out = []
        for c in convs:
            user = c[-1]["content"]
            question = user.rsplit("Question: ", 1)[-1]
            if question in ("Can I pay with seashells?", "Do you sell garden furniture?", refused_answerable):
                out.append(NOT_FOUND_REPLY)
            elif "(source: " in user:
                first = next(line for line in user.splitlines() if line.startswith("[1] (source: "))
                name, text = first[len("[1] (source: "):].split(") ", 1)
                out.append(f"{text} (source: {name} > spliced)")
            else:
                out.append("no idea")
        return out

    monkeypatch.setattr(eval_run.Answerer, "answer", stub)
    AnswerSettings(passages=2, max_new_tokens=8).save(setup["model"])
    try:
        res = evaluate(setup["model"], setup["root"] / "out-sets", questions=qs, docs=[setup["docs"]], verbose=False)
        a = res["answering"]
        assert (a["answerable"], a["unanswerable"]) == (4, 2)
        assert a["refusals_unanswerable"] == 1.0 and a["refusals_answerable"] == 0.25
        assert a["cited"] == 3 and a["citation_exact"] == 0.0 and a["invented_names_shown"] == 0
        examples = [json.loads(line) for line in (setup["root"] / "out-sets" / "examples.jsonl").open()]
        assert all("[3] (source: " not in e["prompt"][-1]["content"] for e in examples)   # answer.json: 2 passages
        shown = [e["answer"] for e in examples if "model_reply" in e]
        assert shown and all(" > spliced)" not in s for s in shown)            # the trusted citation replaced it
        assert res["after_refusal"]["questions"] == 4
        # A score threshold above every passage's score: every reply is the not-found sentence.
        res = evaluate(setup["model"], setup["root"] / "out-sets2", questions=qs, docs=[setup["docs"]],
                       min_score=1e9, second_turn=0, verbose=False)
        assert res["answering"]["refusals_answerable"] == 1.0
        assert res["answering"]["model_alone"]["refusals_answerable"] == 0.25
        assert eval_run.answering_line(res).startswith("false refusals")
        # The answer settings' refusal bias reaches the grounded decoding, not the plain one, and
        # --refusal-bias overrides it (0 = off).
        AnswerSettings(passages=2, max_new_tokens=8, refusal_bias=1.5, reply_no_repeat_ngram_size=7).save(setup["model"])
        seen = {}
        real_init = eval_run.Answerer.__init__

        def spy(self, *args, **kwargs):
            real_init(self, *args, **kwargs)
            seen["cfg"], seen["plain"] = self.cfg, self.plain_cfg
        monkeypatch.setattr(eval_run.Answerer, "__init__", spy)
        res = evaluate(setup["model"], setup["root"] / "out-sets3", questions=qs, docs=[setup["docs"]],
                       second_turn=0, verbose=False)
        assert res["answering"]["refusal_bias"] == 1.5 and "refusal bias 1.50" in eval_run.answering_line(res)
        ((token, bias),) = seen["cfg"].first_token_bias
        assert bias == -1.5 and seen["plain"].first_token_bias == ()
        assert res["answering"]["reply_ngram"] == seen["cfg"].reply_no_repeat_ngram_size == 7
        res = evaluate(setup["model"], setup["root"] / "out-sets4", questions=qs, docs=[setup["docs"]],
                       second_turn=0, verbose=False, refusal_bias=0.0, reply_ngram=0)
        assert res["answering"]["refusal_bias"] == 0.0 and seen["cfg"].first_token_bias == ()
        assert res["answering"]["reply_ngram"] == seen["cfg"].reply_no_repeat_ngram_size == 0
    finally:
        (setup["model"] / "answer.json").unlink()
