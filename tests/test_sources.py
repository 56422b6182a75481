"""Readers of `chatforge.data.sources`: every format, folder walking, labels and bad input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from chatforge.data import sources
from chatforge.data.sources import file_format, iter_files, read_documents
from chatforge.errors import ChatforgeError


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def docs_of(*paths: Path, warnings: list | None = None) -> list:
    sink = warnings if warnings is not None else []
    return list(read_documents(list(paths), warn=sink.append))


@pytest.fixture(autouse=True)
def no_faq_parser(monkeypatch):
    """Readers are tested with no FAQ parsing (faq.py has its own tests); the hook has its own test."""
    monkeypatch.setattr(sources, "extract_pairs", lambda path, text: None)


def test_file_formats():
    assert file_format("a.txt") == "txt"
    assert file_format("faq/library.rst.txt") == "rst"
    assert file_format("A.RST") == "rst"
    assert file_format("x.md") == "md" and file_format("x.markdown") == "md"
    assert file_format("p.htm") == "html" and file_format("p.html") == "html"
    assert file_format("perlfaq4.pod") == "pod"
    assert file_format("d.jsonl") == "jsonl" and file_format("d.csv") == "csv" and file_format("d.tsv") == "csv"
    assert file_format("FAQ.txt.gz") == "txt"
    assert file_format("jargon") == "txt"         # extension-less text (fortunes, jargon)
    assert file_format("image.png") is None


def test_plain_text_and_markup_readers(tmp_path):
    write(tmp_path / "a.txt", "Plain   text stays.\n")
    write(tmp_path / "b.md", "# Title\n\nSome **bold** and [a link](http://x.org) and `snake_case_name`.\n")
    write(tmp_path / "c.rst", "Heading\n=======\n\nUse :func:`os.path.join` and ``ls -l``::\n\n    code here\n")
    write(tmp_path / "d.rst.txt", "Other\n-----\n\nText with *emphasis*.\n")
    write(tmp_path / "e.html", "<html><head><title>T</title><style>p{}</style></head>"
                               "<body><script>var x=1;</script><p>Hello &amp; welcome</p></body></html>")
    write(tmp_path / "f.pod", "=head1 NAME\n\nfoo - B<bold> C<code>\n\n=cut\n")
    docs = docs_of(tmp_path)
    by = {d.source.split("/", 1)[1]: d for d in docs}
    assert [d.source for d in docs] == sorted(d.source for d in docs)  # sorted walk
    assert all(d.kind == "text" and d.label == tmp_path.name for d in docs)
    assert by["a.txt"].text == "Plain   text stays.\n"   # whitespace is normalised later, in clean
    md = by["b.md"].text
    assert "Title" in md and "#" not in md and "bold" in md and "**" not in md
    assert "a link" in md and "http://x.org" not in md and "snake_case_name" in md
    rst = by["c.rst"].text
    assert "=====" not in rst and "os.path.join" in rst and ":func:" not in rst and "ls -l" in rst
    assert "    code here" in rst
    assert "emphasis" in by["d.rst.txt"].text and "*" not in by["d.rst.txt"].text
    html = by["e.html"].text
    assert "Hello & welcome" in html and "var x" not in html and "p{}" not in html
    assert "foo - bold code" in by["f.pod"].text and "=head1" not in by["f.pod"].text


def test_jsonl_record_types(tmp_path):
    lines = [
        {"text": "A document."},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"prompt": "P?", "completion": "C."},
        {"question": "Q?", "answer": "A."},
        {"prompt": [{"role": "user", "content": "u"}], "completion": [{"role": "assistant", "content": "a"}]},
    ]
    write(tmp_path / "d.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n\n")
    docs = docs_of(tmp_path / "d.jsonl")
    assert [d.kind for d in docs] == ["text", "conversation", "pairs", "pairs", "conversation"]
    assert docs[0].text == "A document." and docs[0].source == "d.jsonl"
    assert docs[1].messages[1] == {"role": "assistant", "content": "hello"} and docs[1].ref == "line 2"
    assert docs[2].pairs == [("P?", "C.")] and docs[3].pairs == [("Q?", "A.")]
    assert [m["role"] for m in docs[4].messages] == ["user", "assistant"]


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ('["a list"]', 'expected a JSON object with "text", "messages"'),
    ('{"title": "x"}', 'expected a JSON object with "text", "messages", "prompt"/"completion" or "question"/"answer"'),
    ('{"messages": [{"role": "wizard", "content": "x"}]}', '"messages" must be a list'),
    ('{"messages": "hi"}', '"messages" must be a list'),
    ('{"text": 5}', '"text" must be a string'),
    ('{"question": "q", "answer": null}', '"question" and "answer" must be strings'),
])
def test_jsonl_errors_name_file_and_line(tmp_path, line, message):
    p = write(tmp_path / "data.jsonl", '{"text": "ok"}\n\n' + line + "\n")
    with pytest.raises(ChatforgeError) as e:
        docs_of(p)
    assert "data.jsonl:3: " in str(e.value) and message in str(e.value)


def test_csv_transcript_grouped_by_conversation(tmp_path):
    write(tmp_path / "chats.csv",
          "conversation_id,timestamp,Speaker,Message\n"
          "1,t,Customer,Hi there\n"
          "2,t,customer,Other chat\n"
          "1,t,Agent Sarah,Hello!\n"
          "1,t,agent,How can I help?\n"
          "2,t,support,Sure\n"
          "1,t,customer,\"Thanks, bye\"\n")
    docs = docs_of(tmp_path / "chats.csv")
    assert [d.kind for d in docs] == ["conversation", "conversation"]
    assert [d.ref for d in docs] == ["id 1", "id 2"]
    first = docs[0].messages
    # One message a row, with its speaker: the build merges consecutive turns after cleaning.
    assert [m["role"] for m in first] == ["user", "assistant", "assistant", "user"]
    assert [m["speaker"] for m in first] == ["Customer", "Agent Sarah", "agent", "customer"]
    assert first[3]["content"] == "Thanks, bye"
    assert [m["content"] for m in docs[1].messages] == ["Other chat", "Sure"]


def test_csv_platform_speakers_are_system_and_not_the_customer(tmp_path):
    chats = write(tmp_path / "chats.csv", "speaker,message\nNotification,Chat started\nAlice,my printer is broken\n"
                                          "Bob,try turning it off\nTidewater Bot,Survey: rate us\n")
    [doc] = docs_of(chats)
    # Without the build's speaker rules an unknown name that speaks first is the customer...
    assert [m["role"] for m in doc.messages] == ["user", "assistant", "assistant", "assistant"]
    # ...with them, platform speakers get the system role and Alice is still the customer.
    f = iter_files([chats])[0]
    [doc] = sources.read_file(f, is_platform=lambda s: s in ("Notification", "Tidewater Bot"))
    assert [m["role"] for m in doc.messages] == ["system", "user", "assistant", "system"]


def test_csv_named_speakers_semicolons_and_qa(tmp_path):
    write(tmp_path / "named.csv", "speaker;text\nAlice;my printer is broken\nBob;try turning it off\nAlice;ok\n")
    [doc] = docs_of(tmp_path / "named.csv")
    assert [m["role"] for m in doc.messages] == ["user", "assistant", "user"]
    write(tmp_path / "qa.csv", "Question,Answer\nWhat is X?,X is Y.\nAnd Z?,Z.\n")
    [doc] = docs_of(tmp_path / "qa.csv")
    assert doc.kind == "pairs" and doc.pairs == [("What is X?", "X is Y."), ("And Z?", "Z.")]
    write(tmp_path / "t.tsv", "role\tcontent\nuser\tq\nassistant\ta\n")
    [doc] = docs_of(tmp_path / "t.tsv")
    assert doc.messages == [{"role": "user", "content": "q", "speaker": "user"},
                            {"role": "assistant", "content": "a", "speaker": "assistant"}]


def test_csv_unknown_header_is_an_error(tmp_path):
    p = write(tmp_path / "numbers.csv", "a,b,c\n1,2,3\n")
    with pytest.raises(ChatforgeError, match=r"numbers.csv:1: CSV header .* not recognised"):
        docs_of(p)


def test_fetched_source_folder_uses_its_name(tmp_path):
    root = tmp_path / "sources"
    src = root / "debian-faq"
    write(src / "SOURCE.json", json.dumps({"name": "debian-faq", "kind": "faq"}))
    write(src / "copyright", "Copyright (C) someone. GPL.")
    write(src / "LICENSE.txt", "licence text")
    write(src / "ch-basic.txt", "What is Debian? A free operating system.")
    write(src / "conversations.jsonl", json.dumps({"messages": [{"role": "user", "content": "a"}]}) + "\n")
    write(root / "other" / "SOURCE.json", json.dumps({"name": "the-other", "kind": "docs"}))
    write(root / "other" / "sub" / "x.md", "# X\n\ntext")
    docs = docs_of(root)    # the parent folder: each fetched source keeps its own name
    assert [(d.label, d.source) for d in docs] == [
        ("debian-faq", "debian-faq/ch-basic.txt"), ("debian-faq", "debian-faq/conversations.jsonl"),
        ("the-other", "the-other/sub/x.md")]


def test_binary_unsupported_and_gz_files(tmp_path, capsys):
    write(tmp_path / "good.txt", "fine text")
    write(tmp_path / "blob.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00IHDR" + bytes(range(256)))
    write(tmp_path / "pic.png", b"\x89PNG")
    write(tmp_path / "old.txt.gz", gzip.compress(b"compressed text"))
    write(tmp_path / "latin1.txt", "caf\u00e9 cr\u00e8me".encode("latin-1"))
    warnings: list[str] = []
    docs = docs_of(tmp_path, warnings=warnings)
    assert sorted(d.text for d in docs) == ["caf\u00e9 cr\u00e8me", "compressed text", "fine text"]
    assert any("blob.txt: binary file, skipped" in w for w in warnings)
    assert any("unsupported types (.png: 1)" in w for w in warnings)
    assert any("latin1.txt: not UTF-8" in w for w in warnings)
    # The default warning goes to stderr with the path.
    list(read_documents([tmp_path / "blob.txt"]))
    assert "blob.txt: binary file, skipped" in capsys.readouterr().err


def test_missing_and_unsupported_inputs_are_errors(tmp_path):
    with pytest.raises(ChatforgeError, match="does not exist"):
        iter_files([tmp_path / "nope"])
    write(tmp_path / "x.docx", "x")
    with pytest.raises(ChatforgeError, match="unsupported file type"):
        iter_files([tmp_path / "x.docx"])


def test_faq_hook(tmp_path, monkeypatch):
    calls = []

    def fake_extract(path, text):
        calls.append(path.name)
        return [("What is it?", "It is this.")] if "faq" in path.name else None

    monkeypatch.setattr(sources, "extract_pairs", fake_extract)
    write(tmp_path / "faq.md", "# FAQ\n\n## What is **it**?\n\nIt is `this`.\n")
    write(tmp_path / "guide.md", "# Guide\n\ntext\n")
    write(tmp_path / "q.jsonl", '{"text": "x"}\n')
    docs = docs_of(tmp_path)
    assert calls == ["faq.md", "guide.md"]     # only text documents are offered to the FAQ parser
    assert docs[0].kind == "faq" and docs[0].pairs == [("What is it?", "It is this.")]
    assert "What is it?" in docs[0].text
    assert docs[1].kind == "text"


def test_faq_parser_failure_is_a_warning(tmp_path, monkeypatch):
    def broken(path, text):
        raise ValueError("boom")

    monkeypatch.setattr(sources, "extract_pairs", broken)
    write(tmp_path / "faq.txt", "Q?\nA.\n")
    warnings: list[str] = []
    [doc] = docs_of(tmp_path, warnings=warnings)
    assert doc.kind == "text" and "FAQ parsing failed" in warnings[0]


def test_jsonl_is_streamed_and_checked(tmp_path):
    p = write(tmp_path / "big.jsonl.gz", gzip.compress(b'{"text": "one"}\n{"question": "q", "answer": "a"}\n'))
    assert [d.kind for d in docs_of(p)] == ["text", "pairs"]
    bad = write(tmp_path / "latin.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ChatforgeError, match=r"latin.jsonl:2: not UTF-8"):
        docs_of(bad)
    warnings: list[str] = []
    write(tmp_path / "dir" / "blob.jsonl", b"\x00\x01\x02")
    assert docs_of(tmp_path / "dir", warnings=warnings) == []
    assert "blob.jsonl: binary file, skipped" in warnings[0]
