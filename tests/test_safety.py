"""Reply safety: PII scrubbing, blocked terms (mask / refuse) and the streaming buffer."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatforge.errors import ChatforgeError
from chatforge.infer.safety import ReplyFilter, compile_term, load_blocked_terms


def stream_all(guard: ReplyFilter, pieces: list[str]) -> list[str]:
    s = guard.stream()
    return [s.push(p) for p in pieces] + [s.finish()]


def test_apply_scrubs_pii_with_the_data_stage_placeholders():
    out = ReplyFilter().apply("Mail jane.doe@example.com or call +1 415 555 0134.")
    assert out.text == "Mail <EMAIL> or call <PHONE>."
    assert out.pii == {"EMAIL": 1, "PHONE": 1} and not out.refused


def test_literal_terms_match_whole_words_case_insensitively():
    guard = ReplyFilter([compile_term("acme"), compile_term("C++")])
    out = guard.apply("ACME beats Acmes; acme-like C++ code.")
    assert out.text == "**** beats Acmes; ****-like *** code."
    assert out.blocked == 3


def test_regex_terms_and_the_terms_file(tmp_path):
    path = tmp_path / "blocked.txt"
    path.write_text("# competitors\nGlobex\n\n/inter(nal|im) build \\d+/\n")
    guard = ReplyFilter(load_blocked_terms(path))
    assert guard.apply("globex has internal build 42.").text == "****** has " + "*" * len("internal build 42") + "."


def test_bad_terms_file_errors_name_the_line(tmp_path):
    path = tmp_path / "blocked.txt"
    path.write_text("ok\n\n/[a-/\n")
    with pytest.raises(ChatforgeError, match=r"blocked.txt, line 3: '/\[a-/' is not a valid regular expression"):
        load_blocked_terms(path)
    with pytest.raises(ChatforgeError, match="does not exist"):
        load_blocked_terms(tmp_path / "nope.txt")
    with pytest.raises(ChatforgeError, match="must be one of mask, refuse"):
        ReplyFilter(action="drop")


def test_refuse_replaces_the_whole_reply():
    guard = ReplyFilter([compile_term("secret")], action="refuse", refusal="I can't say.")
    assert guard.apply("The secret is out.").text == "I can't say."
    assert guard.apply("Nothing here.").text == "Nothing here."
    # Streaming in refuse mode holds everything back: the end of the reply decides.
    assert stream_all(guard, ["Fine so far. ", "But the secret ", "is out."]) == ["", "", "", "I can't say."]
    assert "".join(stream_all(guard, ["All ", "good. ", "Yes."])) == "All good. Yes."


def test_an_email_split_across_stream_pieces_is_caught():
    pieces = ["You can write to jo", "hn.sm", "ith@exa", "mple.org if", " needed. Bye."]
    out = stream_all(ReplyFilter(), pieces)
    assert "".join(out) == "You can write to <EMAIL> if needed. Bye."
    assert not any("john" in p or "example" in p or "exa" in p for p in out)


def test_a_card_number_split_at_a_space_is_caught():
    out = stream_all(ReplyFilter(), ["Card 4111 1111", " 1111 1111 was charged.\n", "Thanks."])
    assert "".join(out) == "Card <CARD> was charged.\nThanks."
    assert out[0] == "Card "         # the word before the number, and no digit until it is whole


def test_a_blocked_phrase_split_across_pieces_is_masked():
    guard = ReplyFilter([compile_term("project falcon")])
    out = stream_all(guard, ["About Project ", "Falcon: no comment. ", "Ok."])
    assert "".join(out) == "About **************: no comment. Ok."
    assert out[0] == "" and "Project" not in out[1]


def test_text_is_released_a_word_at_a_time_while_streaming():
    s = ReplyFilter().stream()
    assert s.push("Hello there.") == "Hello "    # "there." may still become "there.com"
    assert s.push(" How are") == "there. How "
    assert s.push(" you? Call 0800") == "are you? Call "
    assert s.push(" 123 456 now.") == ""         # digit groups wait for the end of the sentence
    assert s.push(" Or") == "<PHONE> now. "
    assert s.finish() == "Or"


def test_a_blocked_term_that_spans_words_streams_by_sentence():
    assert ReplyFilter([compile_term("Acme")]).word_cuts
    assert not ReplyFilter([compile_term("Acme Corp")]).word_cuts
    assert not ReplyFilter([compile_term("/ac.me/")]).word_cuts
    s = ReplyFilter([compile_term("/acme\\s+corp/")]).stream()
    assert s.push("Ask Acme") == ""
    assert s.push(" Corp today. Bye") == "Ask ********* today. "


def test_long_text_without_sentence_ends_is_released_in_chunks():
    s = ReplyFilter().stream(max_buffer=60, keep_tail=20)
    words = "word " * 40
    out = [s.push(w + " ") for w in words.split()]
    assert sum(1 for o in out if o) >= 2          # it streamed before the end
    assert "".join(out) + s.finish() == " ".join(words.split()) + " "


REPLY = ("Hi Sam. Your order ships today. Write to sam.lee@example.net or call +44 20 7946 0958 "
         "if it is late.\nCard 4111 1111 1111 1111 was charged; our server 192.168.10.24 logged it. "
         "Internal codename Falcon is not public! Bye.")


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, len(REPLY)), max_size=25))
def test_streaming_gives_the_same_text_as_filtering_the_whole_reply(cuts):
    bounds = [0, *sorted(cuts), len(REPLY)]
    pieces = [REPLY[a:b] for a, b in zip(bounds, bounds[1:])]
    guard = ReplyFilter([compile_term("falcon")])
    streamed = "".join(stream_all(guard, pieces))
    assert streamed == guard.apply(REPLY).text
    assert "sam.lee" not in streamed and "4111" not in streamed and "Falcon" not in streamed
