"""`chatforge data build`: outputs, report, split determinism, error handling and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chatforge.commands.main import main
from chatforge.data import sources
from chatforge.data.build import build, split_chunks
from chatforge.errors import ChatforgeError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "my_docs"


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("CHATFORGE_QUIET", "1")
    # Keep these tests independent of faq.py (another module with its own tests).
    monkeypatch.setattr(sources, "extract_pairs", lambda path, text: None)


def paragraph(i: int) -> str:
    return (f"Document {i} explains topic number {i} for the support team. " * 3
            + f"It has enough words to pass the length filter, and its own id {i * 7919}.")


def make_inputs(root: Path, n: int = 40) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"doc{i:03d}.txt").write_text(paragraph(i), encoding="utf-8")
    return root


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_build_outputs_and_report(tmp_path):
    src = make_inputs(tmp_path / "docs", 10)
    (src / "copy.txt").write_text(paragraph(3).upper(), encoding="utf-8")          # exact duplicate
    near = paragraph(4) + " " + paragraph(4).replace("support team", "help desk", 1)
    (src / "near_a.txt").write_text(near, encoding="utf-8")
    (src / "near_b.txt").write_text(near.replace("its own id", "its id"), encoding="utf-8")
    (src / "tiny.txt").write_text("too short", encoding="utf-8")
    (src / "chat.csv").write_text("speaker,message\ncustomer,My mail is a.b@example.com\n"
                                  "agent,Thanks! Call +1-202-555-0173 if needed.\n", encoding="utf-8")
    (src / "qa.jsonl").write_text(
        '{"question": "How do I reset?", "answer": "Press reset."}\n'
        '{"question": "how do I  RESET?", "answer": "Another answer."}\n'
        '{"question": "Empty answer?", "answer": "  "}\n', encoding="utf-8")
    out = tmp_path / "out"
    report = build([src], out)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["corpus.jsonl", "qa.jsonl", "qa_train.jsonl", "qa_val.jsonl", "report.json",
                     "train.jsonl", "val.jsonl"]
    assert json.loads((out / "report.json").read_text()) == report
    corpus = read_jsonl(out / "corpus.jsonl")
    assert len(corpus) == 11 and all(set(d) == {"text", "source"} for d in corpus)
    kept = {d["source"] for d in corpus}
    # The first of two duplicates (in sorted file order) is the one kept.
    assert "docs/copy.txt" in kept and "docs/doc003.txt" not in kept
    assert "docs/near_a.txt" in kept and "docs/near_b.txt" not in kept and "docs/tiny.txt" not in kept
    assert report["dedup"] == {"exact_documents": 1, "near_documents": 1, "qa": 1}
    assert report["filters"]["too_short"] == {"kept": 13, "removed": 1}
    assert report["filters"]["qa_empty"] == {"kept": 3, "removed": 1}
    assert report["pii"]["EMAIL"] == 1 and report["pii"]["PHONE"] == 1
    s = report["sources"]["docs"]
    assert s["files"] == 16 and s["documents"] == 11 and s["pairs"] == 1 and s["conversations"] == 1
    assert s["bytes_in"] > s["bytes_out"] > 0
    qa = read_jsonl(out / "qa.jsonl")
    assert qa[0]["messages"][0]["content"] == "My mail is <EMAIL>"
    assert qa[1] == {"messages": [{"role": "user", "content": "How do I reset?"},
                                  {"role": "assistant", "content": "Press reset."}], "source": "docs/qa.jsonl"}
    # train + val partition the corpus and the Q&A set.
    train, val = read_jsonl(out / "train.jsonl"), read_jsonl(out / "val.jsonl")
    assert sorted(map(json.dumps, train + val)) == sorted(map(json.dumps, corpus))
    assert len(val) >= 1 and len(read_jsonl(out / "qa_val.jsonl")) >= 1
    assert report["outputs"]["corpus"] == 11 and report["sizes"]["corpus.jsonl"] > 0


def test_split_is_deterministic_and_stable(tmp_path):
    src = make_inputs(tmp_path / "docs", 200)
    a, b = tmp_path / "a", tmp_path / "b"
    build([src], a, val_fraction=0.2)
    build([src], b, val_fraction=0.2)
    for name in ("corpus.jsonl", "train.jsonl", "val.jsonl", "qa.jsonl"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    val_before = {d["text"] for d in read_jsonl(a / "val.jsonl")}
    assert 20 <= len(val_before) <= 60
    # More documents: none of the old ones crosses the split.
    make_inputs(src, 260)
    c = tmp_path / "c"
    build([src], c, val_fraction=0.2)
    val_after = {d["text"] for d in read_jsonl(c / "val.jsonl")}
    train_after = {d["text"] for d in read_jsonl(c / "train.jsonl")}
    old = {d["text"] for d in read_jsonl(a / "corpus.jsonl")}
    assert val_before == val_after & old and not (val_before & train_after)
    # Another seed gives another split.
    d = tmp_path / "d"
    build([src], d, val_fraction=0.2, seed=1)
    assert {x["text"] for x in read_jsonl(d / "val.jsonl")} != val_after


def test_tiny_input_still_gets_a_validation_document(tmp_path):
    src = make_inputs(tmp_path / "docs", 3)
    report = build([src], tmp_path / "out")
    assert report["outputs"]["val"] == 1 and report["outputs"]["train"] == 2
    again = build([src], tmp_path / "again")
    assert (tmp_path / "out" / "val.jsonl").read_bytes() == (tmp_path / "again" / "val.jsonl").read_bytes()
    assert again["outputs"] == report["outputs"]


def test_split_chunks_bounds_and_sections():
    paras = [f"Section {i}" if i % 5 == 0 else ("word " * 60).strip() for i in range(60)]
    text = "\n\n".join(paras)
    chunks = split_chunks(text, 2000)
    assert all(len(c) <= 2000 for c in chunks) and len(chunks) > 5
    assert "\n\n".join(chunks).split() == text.split()          # nothing lost or reordered
    assert sum(c.startswith("Section") for c in chunks) >= len(chunks) // 2
    long_line = "x" * 5000
    assert split_chunks("intro\n\n" + long_line, 1000) == ["intro", long_line]
    assert split_chunks("short", 1000) == ["short"]


def test_malformed_jsonl_is_an_error_and_leaves_output_alone(tmp_path):
    src = make_inputs(tmp_path / "docs", 3)
    (src / "data.jsonl").write_text('{"text": "fine"}\n' * 6 + '{"txt": "typo"}\n', encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old output")
    with pytest.raises(ChatforgeError) as e:
        build([src], out)
    assert "data.jsonl:7: expected a JSON object with" in str(e.value)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []   # no temp folder left


def test_binary_file_is_skipped_with_a_warning(tmp_path, capsys):
    src = make_inputs(tmp_path / "docs", 3)
    (src / "manual.txt").write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00" + bytes(200))
    report = build([src], tmp_path / "out")
    assert any("manual.txt: binary file, skipped" in w for w in report["warnings"])
    assert "manual.txt: binary file, skipped" in capsys.readouterr().err
    assert report["outputs"]["corpus"] == 3


def test_empty_result_exits_2_without_output(tmp_path, capsys):
    src = tmp_path / "docs"
    src.mkdir()
    (src / "a.txt").write_text("tiny", encoding="utf-8")
    out = tmp_path / "out"
    assert main(["data", "build", "--input", str(src), "--out", str(out)]) == 2
    assert "error: nothing to write" in capsys.readouterr().err
    assert not out.exists()
    assert main(["data", "build", "--input", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["data", "build", "--input", str(src), "--out", str(out), "--val-fraction", "1.5"]) == 2
    assert not out.exists()


def test_cli_builds_the_example_folder(tmp_path, capsys):
    out = tmp_path / "built"
    assert main(["data", "build", "--input", str(EXAMPLES), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "PII replaced" in printed and "my_docs" in printed
    report = json.loads((out / "report.json").read_text())
    for name in ("corpus.jsonl", "train.jsonl", "val.jsonl", "qa.jsonl", "qa_train.jsonl", "qa_val.jsonl"):
        assert (out / name).stat().st_size > 0, name
    s = report["sources"]["my_docs"]
    assert s["files"] == 7 and s["documents"] >= 4 and s["conversations"] >= 4 and s["pairs"] >= 3
    assert report["pii"]["EMAIL"] >= 2 and report["pii"]["PHONE"] >= 2
    assert report["pii"]["CARD"] == 1 and report["pii"]["IP"] == 1
    assert report["dedup"]["near_documents"] == 1      # archive/faq-2023.md repeats faq.md
    assert report["dedup"]["qa"] == 1                  # "Can I back up a NAS?" asked twice
    corpus = read_jsonl(out / "corpus.jsonl")
    sources_seen = {d["source"] for d in corpus}
    assert {"my_docs/faq.md", "my_docs/getting-started.txt", "my_docs/troubleshooting.html",
            "my_docs/admin-guide.rst"} <= sources_seen
    by_source = {d["source"]: d["text"] for d in corpus}
    assert "analytics" not in by_source["my_docs/troubleshooting.html"]      # <script> dropped
    assert "**Back up now**" not in by_source["my_docs/faq.md"] and "Back up now" in by_source["my_docs/faq.md"]
    assert "doesn't finish" in by_source["my_docs/getting-started.txt"]      # mojibake repaired
    qa_text = (out / "qa.jsonl").read_text()
    assert "4111 1111" not in qa_text and "maria.lopez@" not in qa_text and "<CARD>" in qa_text
    # The transcripts' planted platform lines, auto-replies, signatures, quotes and off-topic
    # chats, as the README shows them (12 CSV conversations + 2 in qa.jsonl).
    t = report["transcripts"]
    assert t["conversations"] == {"read": 14, "kept": 10, "empty_side": 1, "spam": 1, "test": 1, "no_question": 1,
                                  "ends_mid_sentence": 1}
    assert {k: v for k, v in t["rules"].items() if v} == {
        "system_speaker": 9, "bot_speaker": 2, "quote_header": 1, "signature": 2, "join": 1, "transfer": 1,
        "auto_reply": 1, "sent_from": 1, "quoted_line": 1, "spam": 1, "test_message": 1, "greeting": 1}
    assert "conversations: 14 read, 10 kept; dropped: empty_side 1, spam 1, test 1, no_question 1" in printed


def test_default_inputs_leave_out_model_sources(tmp_path):
    import json as _json

    from chatforge.data.build import default_inputs

    for name, kind in (("debian-faq", "faq"), ("smollm2-135m-instruct", "model"), ("broken", None)):
        folder = tmp_path / "sources" / name
        folder.mkdir(parents=True)
        (folder / "SOURCE.json").write_text(_json.dumps({"name": name, "kind": kind}) if kind else "{not json")
    # A fetched model is imported, not read as text; a damaged SOURCE.json still counts as text.
    assert [p.name for p in default_inputs(tmp_path)] == ["broken", "debian-faq"]


# --------------------------------------------------------------------------- transcripts

CHATS = """conversation_id,speaker,message
1,system,This chat may be recorded for quality and training purposes.
1,customer,"My backup stops at 99%, what can I do?"
1,system,Agent Sam joined the chat
1,agent,Chat transferred to Billing
1,agent,"Delete the old snapshot under Settings > Retention, then run the backup again."
1,agent,"If it still stops, send me the log.

Best regards,
Sam"
2,customer,test
2,agent,Test received.
3,customer,Hi
3,agent,Hello! How can I help you today?
3,system,Customer left the chat
4,customer,"Dear website owner, we offer affordable SEO services."
4,agent,No thanks.
5,customer,Is there a 32-bit client?
5,Helpdesk Bot,These articles may help: tidewater.example/kb/arm
6,customer,How do I exclude a folder?
6,agent,"Right-click it, choose Exclude and"
"""


def test_transcripts_are_cleaned_and_counted(tmp_path, capsys):
    src = make_inputs(tmp_path / "docs", 3)
    (src / "chats.csv").write_text(CHATS, encoding="utf-8")
    out = tmp_path / "out"
    assert main(["data", "build", "--input", str(src), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    t = report["transcripts"]
    assert t["conversations"] == {"read": 6, "kept": 2, "empty_side": 1, "spam": 1, "test": 1, "no_question": 1,
                                  "ends_mid_sentence": 1}
    assert {k: v for k, v in t["rules"].items() if v} == {
        "system_speaker": 3, "bot_speaker": 1, "signature": 1, "transfer": 1, "spam": 1, "test_message": 1,
        "greeting": 1}
    assert t["examples"] == {"empty_side": ["docs/chats.csv id 5"], "spam": ["docs/chats.csv id 4"],
                             "test": ["docs/chats.csv id 2"], "no_question": ["docs/chats.csv id 3"],
                             "ends_mid_sentence": ["docs/chats.csv id 6"]}
    qa = [m for m in read_jsonl(out / "qa.jsonl") if m["source"] == "docs/chats.csv"]
    assert [q["messages"] for q in qa] == [
        [{"role": "user", "content": "My backup stops at 99%, what can I do?"},
         {"role": "assistant", "content": "Delete the old snapshot under Settings > Retention, then run the backup "
                                          "again.\nIf it still stops, send me the log."}],
        [{"role": "user", "content": "How do I exclude a folder?"},
         {"role": "assistant", "content": "Right-click it, choose Exclude and"}]]
    assert ("conversations: 6 read, 2 kept; dropped: empty_side 1, spam 1, test 1, no_question 1; "
            "1 end mid-sentence") in printed
    assert ("transcript rules: system_speaker 3, bot_speaker 1, signature 1, transfer 1, spam 1, test_message 1, "
            "greeting 1") in " ".join(printed.split())      # wrapped between rules

    # --keep-conversations: the flagged ones are written (and still counted), for a look.
    kept = tmp_path / "kept"
    assert main(["data", "build", "--input", str(src), "--out", str(kept), "--keep-conversations"]) == 0
    assert "flagged (kept: --keep-conversations): empty_side 1, spam 1" in capsys.readouterr().out
    t = json.loads((kept / "report.json").read_text())["transcripts"]
    assert t["keep_conversations"] and t["conversations"]["kept"] == 5 and t["conversations"]["spam"] == 1
    assert len([m for m in read_jsonl(kept / "qa.jsonl") if m["source"] == "docs/chats.csv"]) == 5


def test_own_transcript_rules(tmp_path, capsys):
    src = make_inputs(tmp_path / "docs", 3)
    (src / "chats.csv").write_text(CHATS, encoding="utf-8")
    mine = tmp_path / "rules.txt"
    mine.write_text("# ours\nline snapshot_tip  delete the old snapshot[^\\n]*\noff bot_speaker\n", encoding="utf-8")
    report = build([src], tmp_path / "out", transcript_rules=mine)
    t = report["transcripts"]
    assert t["rule_files"][-1] == str(mine) and report["options"]["transcript_rules"] == str(mine)
    assert t["rules"]["snapshot_tip"] == 1 and "bot_speaker" not in t["rules"]
    # With the bot's rows kept, conversation 5 has an agent side again.
    assert t["conversations"]["empty_side"] == 0 and t["conversations"]["kept"] == 3

    # A bad rule: exit code 2, the file and line named, nothing written.
    mine.write_text("# ours\n\nline broken (unclosed\n", encoding="utf-8")
    out = tmp_path / "bad"
    assert main(["data", "build", "--input", str(src), "--out", str(out), "--transcript-rules", str(mine)]) == 2
    err = capsys.readouterr().err
    assert f"error: {mine}:3: rule 'broken' has a bad pattern" in err
    assert not out.exists()


def test_example_transcripts_lose_every_planted_line_and_keep_every_answer(tmp_path):
    import csv

    report = build([EXAMPLES], tmp_path / "out")
    qa_text = "\n".join(m["content"] for q in read_jsonl(tmp_path / "out" / "qa.jsonl")
                        for m in q["messages"] if q["source"] == "my_docs/chat_transcripts.csv")
    planted = ["Chat started", "may be recorded", "joined the chat", "Customer left", "How would you rate",
               "Chat transferred", "request #48213", "request #48277", "Best regards", "Jonas Weber", "Weber & Sohn",
               "Kind regards", "Sam\nTidewater Support", "wrote:", "> turn on", "> Error E42", "Sent from my iPhone",
               "testing 123", "Test received", "How can I help you today", "idle for", "Chat ended", "SEO services",
               "business offers", "32-bit ARM", "number 4 in the queue"]
    for line in planted:
        assert line not in qa_text, line
    # Every agent answer of a kept conversation is there (its first line: signatures go; PII is
    # scrubbed after the rules, so the phone number in 1003 is cut off by the 40 characters).
    rows = list(csv.DictReader((EXAMPLES / "chat_transcripts.csv").open(encoding="utf-8")))
    dropped = {"1008", "1009", "1010", "1011"}
    platform = {"Chat transferred to Billing", "Priya joined the chat"}
    answers = [r["message"] for r in rows if r["speaker"] in ("agent", "support") and r["conversation_id"] not in dropped
               and r["message"] not in platform and "We have received your request" not in r["message"]]
    assert len(answers) == 11
    for answer in answers:
        assert answer.split("\n")[0][:40] in qa_text, answer
    for question in ("fails with error E42 since Friday. What does it mean?", "lowering the retention to 30 days fixed it.",
                     "Does the Linux agent work on a Raspberry Pi?", "Done, and the laptop skipped its backup"):
        assert question in qa_text
    # The false positive: the agent explaining "Agent joined" keeps the sentence.
    assert "the chat window shows 'Agent joined' with their name" in qa_text
    assert report["transcripts"]["conversations"]["ends_mid_sentence"] == 1
