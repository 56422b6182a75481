"""System prompt files: section parsing, few-shot turns in the ChatML prompt, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatforge.errors import ChatforgeError
from chatforge.infer.prompting import SystemPrompt, load_system_prompt, parse_system_prompt

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "system_prompt.md"


@pytest.fixture(scope="module")
def tokenizer():
    from chatforge.data.tokenizer import train_tokenizer

    return train_tokenizer(["User: hello there. Assistant: hi, how can I help?"] * 5, 300, None)


def test_sections_render_in_a_fixed_order_with_labels():
    text = ("# Output format\nShort sentences.\n\n"
            "# Role\nYou are Acme's support assistant.\n\n"
            "# Do not\n- invent prices\n- ask for passwords\n\n"
            "# Goal\nSolve the problem.\n")
    p = parse_system_prompt(text)
    assert p.text == ("You are Acme's support assistant.\n\n"
                      "Goal: Solve the problem.\n\n"
                      "Do not:\n- invent prices\n- ask for passwords\n\n"
                      "Output format: Short sentences.")
    assert p.examples == []
    assert p.messages() == [{"role": "system", "content": p.text}]


def test_headings_are_case_insensitive_and_subheadings_are_content():
    p = parse_system_prompt("#  role  \nHelper.\n## Tone\nWarm.\n# OUTPUT   FORMAT #\nPlain text.\n")
    assert p.text == "Helper.\n## Tone\nWarm.\n\nOutput format: Plain text."


def test_a_file_without_headings_is_the_system_message_as_is():
    text = "\n  You are a helpful assistant.\nUser: this line is not a turn.\n## not a section\n"
    assert parse_system_prompt(text) == SystemPrompt(text.strip(), [], "<string>")


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200)
       .filter(lambda t: not any(line.startswith("#") for line in t.splitlines())))
def test_any_text_without_level1_headings_is_kept_verbatim(text):
    assert parse_system_prompt(text).text == text.strip()


def test_text_before_the_first_heading_is_a_preamble():
    p = parse_system_prompt("Acme support bot v2.\n\n# Role\nHelper.\n")
    assert p.text == "Acme support bot v2.\n\nHelper."


def test_headings_inside_code_fences_are_not_sections():
    p = parse_system_prompt("# Output format\nLike this:\n```\n# not a heading\n```\n")
    assert p.text == "Output format:\nLike this:\n```\n# not a heading\n```"


def test_examples_become_few_shot_turns_in_the_chatml_prompt(tokenizer):
    p = parse_system_prompt("# Role\nHelper.\n\n# Examples\n"
                            "User: How do I log in?\n"
                            "Assistant: Open the app.\nThen tap Sign in.\n\n"
                            "user: Thanks!\nASSISTANT:You're welcome.\n")
    assert p.examples == [
        {"role": "user", "content": "How do I log in?"},
        {"role": "assistant", "content": "Open the app.\nThen tap Sign in."},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You're welcome."},
    ]
    assert "Examples" not in p.text
    rendered = tokenizer.render_chat_text(p.messages() + [{"role": "user", "content": "Hi"}],
                                          add_generation_prompt=True)
    assert rendered == ("<|im_start|>system\nHelper.<|im_end|>\n"
                        "<|im_start|>user\nHow do I log in?<|im_end|>\n"
                        "<|im_start|>assistant\nOpen the app.\nThen tap Sign in.<|im_end|>\n"
                        "<|im_start|>user\nThanks!<|im_end|>\n"
                        "<|im_start|>assistant\nYou're welcome.<|im_end|>\n"
                        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_examples_only_gives_no_system_message():
    p = parse_system_prompt("# Examples\nUser: a\nAssistant: b\n")
    assert p.text == "" and [m["role"] for m in p.messages()] == ["user", "assistant"]


def test_the_shipped_example_parses():
    p = load_system_prompt(EXAMPLE)
    assert p.text.startswith("You are the support assistant")
    assert "Do not:" in p.text and "Output format:" in p.text
    assert len(p.examples) >= 2 and p.examples[-1]["role"] == "assistant"


@pytest.mark.parametrize("text, line, message", [
    ("# Role\nHelper.\n\n# Tone\nFriendly.\n", 4, "unknown section '# Tone'"),
    ("# Rol\nHelper.\n", 1, "unknown section '# Rol'"),
    ("# Role\nA.\n# Goal\nB.\n# role\nC.\n", 5, "appears twice (first on line 1)"),
    ("# Role\n\n# Goal\nB.\n", 1, "section '# Role' is empty"),
    ("# Examples\nHello.\nUser: hi\nAssistant: yo\n", 2, "before the first 'User:' turn"),
    ("# Examples\n\nUser: a\nUser: b\n", 4, "expected a 'Assistant:' turn"),
    ("# Examples\nAssistant: a\n", 2, "expected a 'User:' turn"),
    ("# Examples\nUser: a\nAssistant: b\nUser: c\n", 4, "without an 'Assistant:' answer"),
    ("# Examples\nUser:\nAssistant: b\n", 2, "'User:' turn is empty"),
])
def test_errors_name_the_file_and_line(tmp_path, text, line, message):
    path = tmp_path / "system.md"
    path.write_text(text)
    with pytest.raises(ChatforgeError) as e:
        load_system_prompt(path)
    assert str(e.value).startswith(f"{path}, line {line}: ")
    assert message in str(e.value)


def test_unknown_section_lists_the_known_ones():
    with pytest.raises(ChatforgeError, match=r"# Role, # Goal, # Do not, # Output format, # Examples"):
        parse_system_prompt("# Persona\nx\n")


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(ChatforgeError, match="does not exist"):
        load_system_prompt(tmp_path / "nope.md")
    binary = tmp_path / "latin1.txt"
    binary.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ChatforgeError, match="not UTF-8"):
        load_system_prompt(binary)
