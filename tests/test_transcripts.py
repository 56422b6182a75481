"""`chatforge.data.transcripts`: every built-in rule both ways (what goes, what must stay), the
conversation drop reasons, the mid-sentence mark, and the rule file's format and errors."""

from __future__ import annotations

from collections import Counter

import pytest

from chatforge.data.transcripts import (KINDS, REASONS, TranscriptStats, clean_conversation, clean_turn,
                                        ends_mid_sentence, load_rules, parse_rules)
from chatforge.errors import ChatforgeError

RULES = load_rules()


def clean(text: str) -> tuple[str, Counter]:
    removed: Counter = Counter()
    return clean_turn(text, RULES, removed), removed


def conversation(*turns: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in turns]


# --------------------------------------------------------------------------- turn rules: what goes

REMOVED = [  # (rule, turn, what is left of it)
    ("join", "Agent Maria joined the chat", ""),
    ("join", "Thanks for waiting.\nSam has joined the conversation.\nHow can I help?", "Thanks for waiting.\nHow can I help?"),
    ("join", "*** Sam Taylor joined ***", ""),
    ("join", "You are now chatting with Priya from Billing", ""),
    ("leave", "Customer left the chat", ""),
    ("leave", "The visitor has left the conversation.", ""),
    ("leave", "Chat ended by the agent", ""),
    ("leave", "The conversation was closed by Sam.", ""),
    ("leave", "Visitor has been idle for 10 minutes", ""),
    ("transfer", "Chat transferred to Billing", ""),
    ("transfer", "This chat has been transferred to Technical Support.", ""),
    ("transfer", "Transferring you to a specialist...", ""),
    ("recording", "This chat may be recorded for quality and training purposes.", ""),
    ("recording", "Your call is being monitored for quality assurance purposes", ""),
    ("survey", "How would you rate this chat? Reply with a number from 1 to 5.", ""),
    ("survey", "Please rate your experience with our support team.", ""),
    ("survey", "How likely are you to recommend Tidewater to a friend or colleague? (0-10)", ""),
    ("survey", "Please take a short survey: https://survey.example/abc", ""),
    ("survey", "Was this chat helpful? (yes/no)", ""),
    ("auto_reply", "Thank you for contacting Tidewater Support. We have received your request #48213 and will reply "
                   "within one business day.", ""),
    ("auto_reply", "Your ticket #TW-5521 has been created. An agent will contact you shortly.", ""),
    ("auto_reply", "This is an automated message, please do not reply.", ""),
    ("auto_reply", "Automatic reply: I am out of the office until Monday.", ""),
    ("status", "Sam is typing...", ""),
    ("status", "All our agents are busy. Please wait, you are number 4 in the queue.", ""),
    ("status", "You are number 3 in the queue.", ""),
    ("status", "Chat started from tidewater.example/support", ""),
    ("sent_from", "Is it fixed?\n\nSent from my iPhone", "Is it fixed?"),
    ("sent_from", "See the log.\nGet Outlook for Android", "See the log."),
    ("quoted_line", "> restart the agent\n> and wait\nDone, it works.", "Done, it works."),
    ("quote_header", "Thanks, it works.\n\nOn Mon, 11 Mar 2024 at 10:02, Sam <sam@x.example> wrote:\n> Try again.",
     "Thanks, it works."),
    ("quote_header", "See below.\n-----Original Message-----\nFrom: Sam\nSent: Monday\nTry again.", "See below."),
    ("signature", "It works now.\n\nBest regards,\nJonas Weber\nIT, Weber & Sohn GmbH\nTel. 030 1234567", "It works now."),
    ("signature", "Done.\n--\nSam | Tidewater Support", "Done."),
    ("signature", "Fixed.\nSincerely,\nA. Customer", "Fixed."),
]


@pytest.mark.parametrize("rule, text, left", REMOVED, ids=[f"{r}-{i}" for i, (r, _, _) in enumerate(REMOVED)])
def test_turn_rule_removes(rule, text, left):
    out, removed = clean(text)
    assert out == left
    assert set(removed) == {rule}


def test_counts_are_per_line_for_lines_and_per_block_for_cuts():
    _, removed = clean("> one\n> two\n> three\nok")
    assert removed == {"quoted_line": 3}
    _, removed = clean("Yes.\n\nOn Mon, 4 Mar 2024 at 09:12, A <a@b.example> wrote:\n> one\n> two")
    assert removed == {"quote_header": 1}


# --------------------------------------------------------------------------- turn rules: what stays

KEPT = [
    # The case: an agent explaining the platform's messages in a real answer.
    "When a colleague takes over, the chat window shows 'Agent Maria joined the chat' at the top.",
    "The chat window shows 'Agent joined' and the new agent's name.",
    "Step 1: open the console.\nThe chat window then shows \"Agent joined\".",
    "I left the chat open overnight and it timed out.",
    "I left the chat.",
    "Our team joined forces with the Linux maintainers last year.",
    "Transferring to a new laptop is easy: install the agent and sign in.",
    "Your data is transferred to our Frankfurt data centre over TLS.",
    "This chat is logged in your account history, so you can find these steps later.",
    "How would you rate the speed now? If it is still slow, lower the upload limit.",
    "Rate limits apply to the API: 100 requests a minute.",
    "We have received your request #48213 twice; I merged the two tickets.",
    "We have received your request and I refunded the second payment.",
    "On Monday you wrote that it fails; that is fixed in 3.2.",
    ">>> import tidewater\n>>> tidewater.version()\n'3.2.1'",
    "Regards,\nthe files you asked about are in the Restores folder, sorted by date; open the newest one first "
    "and check that every document opens before you delete anything else from the share.",
    "Best regards to your team from all of us!",
    "Sent from my iPhone, the upload stops after two minutes.",
    "Since the chat started, two backups ran.",
    "--verbose prints every file it reads.",
    "The customer portal is typing-friendly on phones.",
    "Settings > Network > Only on these networks",
]


@pytest.mark.parametrize("text", KEPT)
def test_turn_rules_keep(text):
    out, removed = clean(text)
    assert out == text and not removed


# --------------------------------------------------------------------------- speaker rules

@pytest.mark.parametrize("speaker", ["system", "System", "Platform", "Automated message", "Notification",
                                     "Tidewater Bot", "bot", "Chatbot", "Virtual Assistant", "Auto-Reply",
                                     "autoresponder", "Workflow"])
def test_platform_speakers_are_dropped(speaker):
    assert RULES.platform_speaker(speaker) in ("system_speaker", "bot_speaker")


@pytest.mark.parametrize("speaker", ["agent", "Agent Sarah", "customer", "support", "Abbott", "Robert",
                                     "Botha", "Maria Lopez", "Systems Engineer", "Bo T."])
def test_people_are_not_platform_speakers(speaker):
    assert RULES.platform_speaker(speaker) is None


def test_platform_rows_go_and_turns_around_them_merge():
    messages = [{"role": "user", "content": "Charged twice", "speaker": "customer"},
                {"role": "assistant", "content": "Chat transferred to Billing", "speaker": "agent"},
                {"role": "system", "content": "Priya joined the chat", "speaker": "System"},
                {"role": "assistant", "content": "I refunded it.", "speaker": "agent"},
                {"role": "assistant", "content": "Anything else?", "speaker": "Priya"}]
    out = clean_conversation(messages, RULES)
    assert out.messages == conversation(("user", "Charged twice"), ("assistant", "I refunded it.\nAnything else?"))
    assert out.removed == {"transfer": 1, "system_speaker": 1} and out.reason is None


def test_system_prompts_of_jsonl_conversations_are_left_alone():
    msgs = conversation(("system", "This chat may be recorded."), ("user", "Why is my backup slow?"),
                        ("assistant", "Lower the upload limit."))
    out = clean_conversation(msgs, RULES)
    assert out.messages == msgs and not out.removed and out.reason is None


# --------------------------------------------------------------------------- conversations

FLAGGED = [
    ("no_question", [("user", "Hi"), ("assistant", "Hello! How can I help you today?")]),
    ("no_question", [("user", "hello there"), ("assistant", "Hi!"), ("user", "ok great thanks bye")]),
    ("no_question", [("user", "Hello? Anyone there?"), ("assistant", "Yes, I am here."), ("user", "ok thanks, bye")]),
    ("no_question", [("user", "Good morning Maria"), ("assistant", "Good morning!"),
                     ("user", "Thank you so much, have a nice day! :)")]),
    ("test", [("user", "test"), ("assistant", "Test received.")]),
    ("test", [("user", "Hi, this is a test, please ignore"), ("assistant", "Noted.")]),
    ("test", [("user", "testing 1 2 3"), ("assistant", "Works."), ("user", "thanks")]),
    ("test", [("user", "asdfgh"), ("assistant", "Can I help?")]),
    ("test", [("user", "hi test"), ("assistant", "Hi!")]),
    ("spam", [("user", "Dear website owner, we offer affordable SEO services."), ("assistant", "No, thanks.")]),
    ("spam", [("user", "I can bring your website to the first page of Google"), ("assistant", "No.")]),
    ("spam", [("user", "Buy cheap viagra here"), ("assistant", "No.")]),
    ("spam", [("user", "Earn $500 a day working from home! Click here."), ("assistant", "No.")]),
    ("spam", [("user", "Join our crypto investment opportunity today"), ("assistant", "No.")]),
    ("empty_side", [("user", "Is there a Linux client?")]),
    ("empty_side", [("assistant", "Hello! How can I help?")]),
    ("empty_side", [("user", "Agent Sam joined the chat"), ("assistant", "Hi!")]),
    ("empty_side", [("user", "Hi"), ("assistant", "Best regards,\nSam")]),
]


@pytest.mark.parametrize("reason, turns", FLAGGED, ids=[f"{r}-{i}" for i, (r, _) in enumerate(FLAGGED)])
def test_conversation_is_flagged(reason, turns):
    assert clean_conversation(conversation(*turns), RULES).reason == reason


KEPT_CONVERSATIONS = [
    [("user", "Hi, my laptop shows Offline since this morning."), ("assistant", "Run tidewater doctor.")],
    [("user", "Hello"), ("assistant", "Hi! How can I help?"), ("user", "How do I restore a folder?"),
     ("assistant", "Click Restore.")],
    [("user", "Can I test a restore without overwriting my files?"), ("assistant", "Yes: restore to another folder.")],
    [("user", "My test restore failed with error E42"), ("assistant", "E42 means the quota is full.")],
    [("user", "I got a spam e-mail offering cheap followers that claims to be from you. Is it real?"),
     ("assistant", "No, we never send such e-mails.")],
    [("user", "Does Tidewater back up our marketing team's laptops?"), ("assistant", "Yes, any laptop with the agent.")],
    [("user", "How are you?"), ("assistant", "Fine, thanks!")],
    [("user", "thanks"), ("assistant", "You're welcome."), ("user", "Why is my backup slow?"), ("assistant", "Check the limit.")],
    [("user", "Hallo, mein Backup startet nicht."), ("assistant", "Bitte starten Sie den Dienst neu.")],
]


@pytest.mark.parametrize("turns", KEPT_CONVERSATIONS)
def test_conversation_is_kept(turns):
    out = clean_conversation(conversation(*turns), RULES)
    assert out.reason is None and out.messages == conversation(*turns)


@pytest.mark.parametrize("text", ["Open Settings, then", "Files stay restorable until", "Click Restore and",
                                  "Pick one of:", "Open the device in the console, select the folder and press",
                                  "Done. The next run uses the new quota and skips every folder you excluded before"])
def test_ends_mid_sentence(text):
    assert ends_mid_sentence(text)


@pytest.mark.parametrize("text", ["Click Restore.", "Sure", "Have a nice day", "Done!", "Is it fixed?",
                                  "sudo systemctl restart tidewater-agent", "See (Settings > Network)", "Hi :)",
                                  "if i could drink i probably would", ""])
def test_ends_a_sentence(text):
    assert not ends_mid_sentence(text)


def test_only_the_agents_last_turn_is_marked():
    cut = clean_conversation(conversation(("user", "How do I exclude a folder?"),
                                          ("assistant", "Right-click it and pick Exclude, then")), RULES)
    assert cut.reason is None and cut.ends_mid_sentence
    answered = clean_conversation(conversation(("user", "How do I exclude a folder?"),
                                               ("assistant", "Right-click it and pick Exclude, then"),
                                               ("user", "Then what?")), RULES)
    assert not answered.ends_mid_sentence


def test_stats_count_reasons_rules_and_examples():
    stats = TranscriptStats(RULES)
    for i, (_, turns) in enumerate(FLAGGED):
        assert stats.add(clean_conversation(conversation(*turns), RULES), f"chats.csv id {i}") is False
    assert stats.add(clean_conversation(conversation(*KEPT_CONVERSATIONS[0]), RULES), "chats.csv id 99")
    report = stats.report()
    per_reason = Counter(reason for reason, _ in FLAGGED)
    assert per_reason == {"no_question": 4, "test": 5, "spam": 5, "empty_side": 4}
    assert report["conversations"] == {"read": len(FLAGGED) + 1, "kept": 1, **per_reason, "ends_mid_sentence": 0}
    assert report["examples"]["spam"] == [f"chats.csv id {i}" for i, (r, _) in enumerate(FLAGGED) if r == "spam"]
    assert report["rules"]["spam"] == 5 and report["rules"]["test_message"] == 5 and report["rules"]["join"] == 1
    assert report["rules"]["greeting"] == 6 and report["rules"]["goodbye"] == 3     # conversations it helped flag
    assert list(report["rules"]) == RULES.names()           # every rule, in file order, zero or not
    # --keep-conversations: flagged ones go on (still counted), a one-sided one cannot.
    keep = TranscriptStats(RULES, keep_conversations=True)
    assert keep.add(clean_conversation(conversation(*FLAGGED[0][1]), RULES), "a")
    assert not keep.add(clean_conversation(conversation(*FLAGGED[-1][1]), RULES), "b")
    assert keep.report()["conversations"]["kept"] == 1


# --------------------------------------------------------------------------- the rule file

def test_builtin_rules_cover_every_kind():
    assert set(RULES.by_kind) == set(KINDS) and all(RULES.by_kind[k] for k in KINDS)
    assert set(REASONS) == {"empty_side", "spam", "test", "no_question"}
    assert RULES.files == ["chatforge/resources/transcript_rules.txt"]


def test_rule_file_format():
    text = ("# my rules\n\n"
            "line  holiday  our office is closed for the holidays[.!]?\n"
            "line  holiday  (?-i:HOLIDAY NOTICE)\n"
            "   # an indented comment\n"
            "speaker  helpdesk_robot  \\bzendesk\\b\n"
            "line  doomed  doomed\n"
            "off doomed\n")
    rules = parse_rules(text, "mine.txt")
    assert list(rules) == ["holiday", "helpdesk_robot"]
    assert len(rules["holiday"].patterns) == 2 and rules["holiday"].where == "mine.txt:3"
    assert rules["holiday"].whole("Our office is closed for the holidays.")     # case-insensitive...
    assert rules["holiday"].whole("HOLIDAY NOTICE") and not rules["holiday"].whole("holiday notice")  # ...unless told
    assert rules["helpdesk_robot"].anywhere("Zendesk")


def test_user_file_extends_and_switches_off_builtin_rules(tmp_path):
    mine = tmp_path / "rules.txt"
    mine.write_text("line holiday our office is closed for the holidays[.!]?\noff bot_speaker\n", encoding="utf-8")
    rules = load_rules(mine)
    assert rules.files == ["chatforge/resources/transcript_rules.txt", str(mine)]
    assert rules.names()[-1] == "holiday" and "bot_speaker" not in rules.names()
    assert rules.platform_speaker("Tidewater Bot") is None and rules.platform_speaker("System") == "system_speaker"
    removed: Counter = Counter()
    assert clean_turn("Our office is closed for the holidays.\nYour fix is below.", rules, removed) == "Your fix is below."
    assert removed == {"holiday": 1}


@pytest.mark.parametrize("line, message", [
    ("lines join Agent joined", "unknown rule kind 'lines'; expected one of speaker, quote, signature, line"),
    ("line join", "expected 'KIND NAME PATTERN'"),
    ("line Join-Rule x", "rule name 'Join-Rule' must be lower-case letters"),
    ("line join (Agent joined", "rule 'join' has a bad pattern (missing ), unterminated subpattern"),
    ("spam everything .*", "rule 'everything''s pattern matches an empty text"),
    ("test join test", "rule 'join' is a line rule (chatforge/resources/transcript_rules.txt:"),
    ("off nothing_like_this", "'off nothing_like_this': no rule of that name is defined above"),
    ("off join extra", "expected 'off NAME'"),
])
def test_bad_rule_names_file_and_line(tmp_path, line, message):
    bad = tmp_path / "bad_rules.txt"
    bad.write_text("# comment\n\nline ok_rule fine\n" + line + "\n", encoding="utf-8")
    with pytest.raises(ChatforgeError) as e:
        load_rules(bad)
    assert f"{bad}:4: " in str(e.value) and message in str(e.value)


def test_missing_or_binary_rule_file(tmp_path):
    with pytest.raises(ChatforgeError, match="--transcript-rules .*nope.txt: no such file"):
        load_rules(tmp_path / "nope.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00line")
    with pytest.raises(ChatforgeError, match="cannot read it as UTF-8 text"):
        load_rules(tmp_path / "bin.txt")
