"""Preference data: TRL's four formats, bad lines named by file:line, the feedback export read back,
question-grouped splits, and `chatforge prefs make` (kinds, refusal, determinism, counts, errors)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _align_fixtures import MY_DOCS, synthetic_pairs, tiny_model_folder, write_jsonl  # noqa: E402

from chatforge.commands.main import main  # noqa: E402
from chatforge.data.prefs import Preference, parse_preference, read_preferences, split_by_question  # noqa: E402
from chatforge.errors import ChatforgeError  # noqa: E402
from chatforge.retrieval import NOT_FOUND_REPLY  # noqa: E402

SYSTEM = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "What color is the sky?"}


def test_the_four_trl_formats_read_the_same():
    want = Preference([USER], "It is blue.", "It is green.")
    explicit_conv = {"prompt": [USER], "chosen": [{"role": "assistant", "content": "It is blue."}],
                     "rejected": [{"role": "assistant", "content": "It is green."}]}
    implicit_conv = {"chosen": [USER, {"role": "assistant", "content": "It is blue."}],
                     "rejected": [USER, {"role": "assistant", "content": "It is green."}]}
    explicit_std = {"prompt": "What color is the sky?", "chosen": "It is blue.", "rejected": "It is green."}
    for obj in (explicit_conv, implicit_conv, explicit_std):
        assert parse_preference(obj) == want
    # Standard, implicit: the shared beginning is the prompt, cut before the first differing word.
    p = parse_preference({"chosen": "Q: sky colour? A: It is blue.", "rejected": "Q: sky colour? A: It is green."})
    assert p.prompt == [{"role": "user", "content": "Q: sky colour? A: It is"}]
    assert (p.chosen, p.rejected) == (" blue.", " green.")


def test_system_prompt_history_and_extra_keys_are_kept():
    history = [SYSTEM, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}, USER]
    p = parse_preference({"prompt": history, "chosen": "Blue.", "rejected": "Green.", "kind": "model", "margin": 1.5})
    assert p.prompt == history and p.meta == {"kind": "model", "margin": 1.5}
    assert p.conversation("rejected")[-1] == {"role": "assistant", "content": "Green."}
    assert p.to_record()["chosen"] == [{"role": "assistant", "content": "Blue."}] and p.to_record()["kind"] == "model"
    grounded = {"role": "user", "content": "Context:\n[1] (source: faq > Sky) It is blue.\n\nQuestion: What color?"}
    assert parse_preference({"prompt": [SYSTEM, grounded], "chosen": "a", "rejected": "b"}).question == "What color?"


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "q", "chosen": "a"}', "missing 'rejected'"),
    ('{"prompt": "q", "chosen": "a", "rejected": "a"}', "the same reply"),
    ('{"prompt": [{"role": "assistant", "content": "hi"}], "chosen": "a", "rejected": "b"}', "end with a user turn"),
    ('{"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}', "one assistant reply"),
    ('{"prompt": "q", "chosen": [{"role": "robot", "content": "a"}], "rejected": "b"}', "chosen message 0"),
    ('{"prompt": "q", "chosen": "", "rejected": "b"}', "empty"),
    ('{"chosen": "abc", "rejected": "xyz"}', "share no beginning"),
    ('["prompt", "chosen"]', "JSON object"),
    ('{"prompt": "q", "chosen": "a", ', "not valid JSON"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    good = json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"})
    path = tmp_path / "prefs.jsonl"
    path.write_text(f"{good}\n\n{line}\n", encoding="utf-8")
    with pytest.raises(ChatforgeError, match=rf"prefs.jsonl:3: .*{message}"):
        read_preferences(path)


def test_empty_or_missing_file_says_how_to_make_pairs(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(ChatforgeError, match="no preference pairs.*prefs make"):
        read_preferences(tmp_path / "empty.jsonl")
    with pytest.raises(ChatforgeError, match="does not exist.*feedback export"):
        read_preferences(tmp_path / "missing.jsonl")


def test_reads_what_feedback_export_writes(tmp_path):
    from chatforge.data.feedback import FeedbackStore, export_training_data

    prompt = [SYSTEM, {"role": "user", "content": "How do I reset my password?"}]
    with FeedbackStore(tmp_path / "fb.sqlite") as store:
        store.record_reply("m1", "c1", "sft", prompt[1:], "Call us.", prompt, "rendered", [])
        store.add_feedback("m1", "down", reason="inaccurate", correction="Choose Forgot password.")
        export_training_data(store, tmp_path / "out")
    (pair,) = read_preferences(tmp_path / "out" / "preferences.jsonl")
    assert pair.prompt == prompt and (pair.chosen, pair.rejected) == ("Choose Forgot password.", "Call us.")


def test_split_keeps_a_question_on_one_side():
    pairs = [parse_preference(r) for r in synthetic_pairs(40)]     # 16 questions, several pairs each
    kept, held = split_by_question(pairs, 0.25, seed=3)
    assert sorted(kept + held) == list(range(40)) and held
    assert not {pairs[i].question for i in kept} & {pairs[i].question for i in held}
    assert split_by_question(pairs, 0.25, seed=3) == (kept, held)
    assert split_by_question(pairs, 0.0) == (list(range(40)), [])


# ---------------------------------------------------------------------------------------------
# chatforge prefs make


@pytest.fixture(scope="module")
def company(tmp_path_factory):
    """The Tidewater example documents built into a data folder, and a tiny model folder."""
    root = tmp_path_factory.mktemp("company")
    assert main(["data", "build", "--input", str(MY_DOCS), "--out", str(root / "data")]) == 0
    return {"data": root / "data", "model": tiny_model_folder(root / "model")}


def make(company, out: Path, **kw):
    from chatforge.train.make_pairs import make_preferences

    return make_preferences(company["model"], company["data"], [str(MY_DOCS)], out, **{"retrieval": "bm25", **kw})


def fake_answers(monkeypatch, text: str) -> None:
    """Model answers without a model: `text` for every prompt."""
    monkeypatch.setattr("chatforge.train.make_pairs.generate_replies",
                        lambda model, tok, conversations, budgets, batch_size: [(text, True)] * len(conversations))


def test_make_builds_every_kind_in_the_grounded_format(company, tmp_path, monkeypatch):
    from chatforge.retrieval import GROUNDED_SYSTEM_PROMPT

    fake_answers(monkeypatch, NOT_FOUND_REPLY)     # a refusal where the answer is there: worse
    counts = make(company, tmp_path / "prefs.jsonl", missing_fraction=0.3, context_tokens=200, max_new_tokens=64)
    pairs = read_preferences(tmp_path / "prefs.jsonl")
    kinds = {k: [p for p in pairs if p.meta["kind"] == k] for k in ("model", "wrong_passage", "invented")}
    assert counts["pairs"] == {"model": len(kinds["model"]), "wrong_passage": len(kinds["wrong_passage"]),
                               "invented": len(kinds["invented"]), "total": len(pairs)}
    assert all(kinds.values()), counts
    assert counts["answerable"] + counts["not_in_documents"] + counts["skipped"]["no_grounded_example"] == counts["questions"]
    for p in pairs:
        assert p.prompt[0]["content"] == GROUNDED_SYSTEM_PROMPT and p.prompt[-1]["content"].startswith("Context:\n")
    for p in kinds["model"] + kinds["wrong_passage"]:
        assert p.chosen.endswith(")") and " (source: my_docs/" in p.chosen and p.meta["rouge_l"] < 0.5
    for p in kinds["wrong_passage"]:    # cited with another shown passage than the answer's
        assert p.rejected.rsplit(" (source: ", 1)[1] != p.chosen.rsplit(" (source: ", 1)[1]
        assert p.rejected.rsplit(" (source: ", 1)[1][:-1] in p.prompt[-1]["content"]
    for p in kinds["invented"]:     # the model refused: the reference answer, cited from a shown passage
        assert p.chosen == NOT_FOUND_REPLY and p.meta["origin"] == "reference" and "(source: " in p.rejected
    assert all(p.rejected == NOT_FOUND_REPLY for p in kinds["model"])
    assert json.loads((tmp_path / "prefs.jsonl.report.json").read_text())["pairs"] == counts["pairs"]
    fake_answers(monkeypatch, "Restart the agent first.")    # now it invents an answer
    counts = make(company, tmp_path / "invented.jsonl", kinds=["invented"], missing_fraction=0.5, max_new_tokens=64)
    assert counts["invented_origin"] == {"model": counts["pairs"]["invented"]} and counts["pairs"]["invented"]
    assert {p.rejected for p in read_preferences(tmp_path / "invented.jsonl")} == {"Restart the agent first."}


def test_make_is_deterministic_and_follows_its_options(company, tmp_path, monkeypatch):
    fake_answers(monkeypatch, "Restart the agent first.")
    make(company, tmp_path / "a.jsonl", max_questions=8, seed=5, max_new_tokens=64)
    make(company, tmp_path / "b.jsonl", max_questions=8, seed=5, max_new_tokens=64)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    counts = make(company, tmp_path / "c.jsonl", kinds=["wrong_passage"], max_questions=8)
    assert counts["questions"] == 8 and set(counts["pairs"]) == {"wrong_passage", "total"}
    # Questions users already voted on are left out.
    voted = read_preferences(tmp_path / "c.jsonl")[:2]
    write_jsonl(tmp_path / "voted.jsonl", [p.to_record() for p in voted])
    counts = make(company, tmp_path / "d.jsonl", kinds=["wrong_passage"], skip_voted=tmp_path / "voted.jsonl")
    assert counts["skipped"]["voted"] == len({p.question for p in voted})
    assert not {p.question for p in voted} & {p.question for p in read_preferences(tmp_path / "d.jsonl")}


def test_make_with_the_engine(company, tmp_path):
    """The real generation path on the tiny model: every answer is the engine's, counted somewhere."""
    counts = make(company, tmp_path / "p.jsonl", max_questions=6, max_new_tokens=8, context_tokens=120)
    made = counts["pairs"]["model"] + sum(counts["skipped"].get(k, 0) for k in
                                          ("model_empty", "model_unfinished", "model_close_to_reference"))
    assert made == counts["answerable"]
    assert counts["invented_origin"] and sum(counts["invented_origin"].values()) == counts["pairs"]["invented"]


def test_make_command_and_its_errors(company, tmp_path, capsys):
    out = tmp_path / "cli.jsonl"
    assert main(["prefs", "make", "--data", str(company["data"]), "--docs", str(MY_DOCS), "--out", str(out),
                 "--kinds", "wrong_passage", "--model", str(company["model"])]) == 0
    printed = capsys.readouterr().out
    assert "wrong_passage" in printed and str(out) in printed and read_preferences(out)
    assert main(["prefs", "make", "--data", str(company["data"]), "--kinds", "model,best"]) == 2
    assert "--kinds must be a comma-separated subset" in capsys.readouterr().err
    assert main(["prefs", "make", "--data", str(company["data"]), "--out", str(out)]) == 2
    assert "pass --model DIR" in capsys.readouterr().err
    assert main(["prefs", "make", "--data", str(tmp_path / "nowhere"), "--model", str(company["model"])]) == 2
    assert "qa_train.jsonl does not exist" in capsys.readouterr().err
    with pytest.raises(ChatforgeError, match="--max-rouge in"):
        make(company, out, max_rouge=0)
    with pytest.raises(ChatforgeError, match=r"unknown prefs make option\(s\) \['kind'\]"):
        make(company, out, kind="model")
    with pytest.raises(SystemExit):
        main(["prefs", "make", "--help"])
    assert "example:\n  chatforge prefs make --model" in capsys.readouterr().out
