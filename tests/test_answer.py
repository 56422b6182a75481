"""Answer settings, refusals and citations (`infer/answer.py`)."""

import json

import pytest

from chatforge.errors import ChatforgeError
from chatforge.infer.answer import (AnswerSettings, checked_citation, cited_name, copied_from, fit_min_score,
                                    fit_refusal_bias, is_refusal)
from chatforge.retrieval import NOT_FOUND_REPLY, Passage

PASSAGES = [
    Passage("To restore a folder, open the console, pick the snapshot and press Restore.", "docs/guide.txt > Guide > Restoring", doc="docs/guide.txt"),
    Passage("Backups run every night at two unless you change the schedule in Settings.", "docs/faq.md > FAQ > When do backups run?", doc="docs/faq.md"),
]


def test_settings_round_trip_and_defaults(tmp_path):
    assert AnswerSettings.load(tmp_path) == AnswerSettings()              # no answer.json: defaults
    s = AnswerSettings(context_tokens=256, passages=2, min_score=3.5)
    s.save(tmp_path)
    assert AnswerSettings.load(tmp_path) == s
    assert s.replace(passages=None, strategy="sample").strategy == "sample"   # None = not told otherwise
    assert s.replace(passages=None).passages == 2
    cfg = s.generation(max_new_tokens=64)
    assert (cfg.strategy, cfg.max_new_tokens, cfg.repetition_penalty) == ("greedy", 64, 1.0)


def test_bad_settings_are_clear_errors(tmp_path):
    with pytest.raises(ChatforgeError, match="passages"):
        AnswerSettings(passages=0)
    (tmp_path / "answer.json").write_text(json.dumps({"context_tokens": 300, "colour": "blue"}))
    with pytest.raises(ChatforgeError, match="answer.json"):
        AnswerSettings.load(tmp_path)
    (tmp_path / "answer.json").write_text("{not json")
    with pytest.raises(ChatforgeError, match="not readable JSON"):
        AnswerSettings.load(tmp_path)


def test_fit_refusal_bias():
    # Margins of answerable examples: refused greedily when above the bias.
    margins = [-3.0, -2.0, -1.0, 0.3, 0.6, 1.1] + [-4.0] * 14        # 3 of 20 refused at bias 0
    assert fit_refusal_bias(margins, 0.15) == 0.0                     # within budget already: no bias
    assert fit_refusal_bias(margins, 0.10) == 0.5                     # 2 of 20: above 0.5 only 0.6, 1.1
    assert fit_refusal_bias(margins, 0.0) == 1.25                     # none: past the largest margin
    assert fit_refusal_bias(margins, 1.0) == 0.0 and fit_refusal_bias([], 0.02) == 0.0
    assert fit_refusal_bias([100.0], 0.0) == 8.0                      # capped: a model that always refuses
    with pytest.raises(ChatforgeError, match="refusal_bias"):
        AnswerSettings(refusal_bias=-1)
    with pytest.raises(ChatforgeError, match="refusal_bias"):
        AnswerSettings(refusal_bias=9)


def test_refusal_bias_applies_to_grounded_prompts_only(tmp_path):
    from chatforge.data.tokenizer import train_tokenizer
    from chatforge.infer.turn import Prompt
    from chatforge.retrieval import NOT_FOUND_REPLY as reply

    tok = train_tokenizer([reply, "How do I restore a folder? Open the console."] * 20, 400, None)
    settings = AnswerSettings(refusal_bias=2.0)
    ((token, bias),) = settings.refusal_logit_bias(tok)
    assert bias == -2.0
    # The refusal's first token: the one the model writes first after the assistant's opening.
    head = tok.render_chat([{"role": "user", "content": "?"}], add_generation_prompt=True)[0]
    full = tok.render_chat([{"role": "user", "content": "?"}, {"role": "assistant", "content": reply}])[0]
    assert token == full[len(head)] and tok.decode([token]).strip() and reply.startswith(tok.decode([token]).strip())
    assert AnswerSettings().refusal_logit_bias(tok) == ()
    cfg = settings.generation()
    assert cfg.first_token_bias == ()                           # not on every prompt: only grounded ones
    grounded = Prompt([1], [], [], 0, grounded=True).generation(cfg, settings.refusal_logit_bias(tok))
    plain = Prompt([1], [], [], 0, grounded=False).generation(cfg, settings.refusal_logit_bias(tok))
    assert grounded.first_token_bias == ((token, -2.0),) and plain.first_token_bias == ()
    # A grounded reply's citation can only name what the prompt gave it: passages, then facts.
    from chatforge.infer.plugin_api import Fact
    given = Prompt([1], [], PASSAGES, 0, facts=[Fact("order 7: shipped", "orders"), Fact("x", "two\nlines")],
                   grounded=True).generation(cfg)
    assert given.cite_names == (*(p.source for p in PASSAGES), "orders") and plain.cite_names == ()


def test_refusals():
    assert is_refusal(NOT_FOUND_REPLY)
    assert is_refusal("I couldn't find that in the documentation. (source: docs/faq.md)")
    assert is_refusal("The documentation does not say how to do that.")
    assert not is_refusal("To restore a folder, open the console. (source: docs/guide.txt > Guide > Restoring)")


def test_citation_kept_replaced_or_dropped():
    right = "To restore a folder, open the console, pick the snapshot and press Restore. (source: docs/guide.txt > Guide > Restoring)"
    assert checked_citation(right, PASSAGES) == right
    assert cited_name(right) == "docs/guide.txt > Guide > Restoring"
    # A spliced name (two passages' parts) is replaced by the passage the answer copied.
    spliced = right.replace("Guide > Restoring", "FAQ > When do backups run?")
    assert checked_citation(spliced, PASSAGES) == right
    assert copied_from(spliced, PASSAGES) is PASSAGES[0]
    # A real passage's name, but not the one the answer copied: the copied one is shown.
    wrong = right.replace("docs/guide.txt > Guide > Restoring", "docs/faq.md > FAQ > When do backups run?")
    assert wrong != right and checked_citation(wrong, PASSAGES) == right
    # A paraphrase (copied from none) keeps a citation that names a given passage.
    paraphrase = "Open the console and restore it. (source: docs/guide.txt > Guide > Restoring)"
    assert checked_citation(paraphrase, PASSAGES) == paraphrase
    # An answer copied from no passage shows no source at all.
    invented = "Call us on Sundays for a free upgrade. (source: docs/made-up.txt)"
    assert checked_citation(invented, PASSAGES) == "Call us on Sundays for a free upgrade."
    # A missing citation is added when the answer was copied.
    assert checked_citation("Backups run every night at two unless you change the schedule in Settings.",
                            PASSAGES).endswith("(source: docs/faq.md > FAQ > When do backups run?)")
    # A refusal cites nothing.
    assert checked_citation(NOT_FOUND_REPLY + " (source: docs/faq.md > FAQ > When do backups run?)", PASSAGES) == NOT_FOUND_REPLY


def test_fit_min_score():
    answerable = [5.0, 6.0, 7.0, 8.0, 9.0] * 20
    unanswerable = [1.0, 2.0, 5.5] * 10
    t = fit_min_score(answerable, unanswerable, max_false_refusals=0.0)
    assert t == 5.0 and sum(s < t for s in answerable) == 0
    assert sum(s < t for s in unanswerable) == 20
    # A threshold that would refuse no unanswerable question is off.
    assert fit_min_score(answerable, [9.5] * 5) == 0.0
    assert fit_min_score([], [1.0]) == 0.0


def test_answer_stream_holds_the_citation_back_until_it_is_checked():
    from chatforge.infer.answer import AnswerStream, below_min_score

    reply = "Backups run every night at two unless you change the schedule in Settings. (source: docs/faq.md > spliced)"
    stream = AnswerStream(PASSAGES)
    shown = [stream.push(reply[i:i + 5]) for i in range(0, len(reply), 5)]
    assert "(sou" not in "".join(shown) and "spliced" not in "".join(shown)
    assert "".join(shown) + stream.finish() == checked_citation(reply, PASSAGES)
    assert stream.shown.endswith("(source: docs/faq.md > FAQ > When do backups run?)") and not stream.refusal
    # "(" that does not become a citation is released.
    stream = AnswerStream(PASSAGES)
    assert stream.push("Press Restore (the green button") == "Press Restore (the green button"
    assert stream.push(") or Mute (sou") == ") or Mute"
    assert stream.push("nd off) now.") == " (sound off) now."
    refusal = AnswerStream(PASSAGES)
    text = refusal.push(NOT_FOUND_REPLY + " (source: docs/faq.md)") + refusal.finish()
    assert text == NOT_FOUND_REPLY and refusal.refusal
    low = [Passage("x", "a", score=1.5), Passage("y", "b", score=2.5)]
    assert below_min_score(low, 3.0) and not below_min_score(low, 2.0) and not below_min_score(low, 0.0)
    assert below_min_score([], 1.0)


def test_threshold_applies_to_the_scores_it_was_fitted_on():
    s = AnswerSettings(min_score=9.5, retrieval="bm25")
    assert s.threshold("bm25") == s.threshold(None) == 9.5       # a plain index is BM25
    assert s.threshold("hybrid") == 0.0                           # cosine-based scores: another scale
    assert AnswerSettings(min_score=0.4, retrieval="hybrid").threshold("hybrid") == 0.4


def test_a_prompt_below_the_threshold_becomes_the_not_found_reply():
    from chatforge.infer.turn import Prompt, refused_below_threshold

    low = [Passage("x", "a", score=1.5)]
    grounded = Prompt([1, 2, 3], [], low, 0, grounded=True)
    refused = refused_below_threshold(grounded, 2.0)
    assert refused.reply == NOT_FOUND_REPLY and refused.passages == [] and refused.ids == []
    assert refused_below_threshold(grounded, 0.0) is grounded                 # off
    assert refused_below_threshold(grounded, 1.0) is grounded                 # a passage reaches it
    plain = Prompt([1], [], [], 0, grounded=False)
    assert refused_below_threshold(plain, 5.0) is plain                       # not a grounded prompt
    with_facts = Prompt([1], [], low, 0, facts=["order 42 shipped"], grounded=True)
    assert refused_below_threshold(with_facts, 5.0) is with_facts             # a plugin answered


def test_refused_exchanges_are_left_out_of_the_prompt():
    from chatforge.infer.answer import answered_history
    from chatforge.infer.turn import fit_prompt
    from chatforge.retrieval import PassageIndex

    refused = [{"role": "user", "content": "Do you sell gift cards?"},
               {"role": "assistant", "content": NOT_FOUND_REPLY}]
    answered = [{"role": "user", "content": "When do backups run?"},
                {"role": "assistant", "content": "Every night at two. (source: docs/faq.md > FAQ > When do backups run?)"}]
    rephrased = [{"role": "user", "content": "Can I pay by cheque?"},
                 {"role": "assistant", "content": "I couldn't find that in the documentation."}]
    assert answered_history(refused + answered + rephrased) == answered
    assert answered_history(answered) == answered
    # An assistant turn without the user turn before it (a system-opened conversation) stays.
    assert answered_history([refused[1]]) == [refused[1]]

    class Words:          # a stand-in tokenizer: one token per word
        def encode(self, text):
            return text.split()

        def render_chat(self, messages, add_generation_prompt=True):
            return [" ".join(m["content"] for m in messages).split()], None

    index = PassageIndex.from_passages(PASSAGES)
    question = "How do I restore a folder?"
    alone = fit_prompt(Words(), None, index, [], question, 4000)
    after = fit_prompt(Words(), None, index, refused, question, 4000)
    assert after.messages == alone.messages and after.ids == alone.ids
    kept = fit_prompt(Words(), None, index, answered, question, 4000)
    assert kept.messages[1:3] == answered                  # an answered exchange is still shown
