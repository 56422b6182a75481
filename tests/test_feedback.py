"""The feedback store (real SQLite files and a real PostgreSQL server: the store's tests run on
both), user satisfaction, the training-data export, the `chatforge feedback` command and the
report's "User satisfaction" section.

    .venv/bin/pytest -q tests/test_feedback.py
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
from datetime import datetime, timezone
from pathlib import Path

import pytest

from chatforge.commands import main as cli
from chatforge.data import feedback
from chatforge.data.feedback import (FeedbackStore, satisfaction_stats, schema_version, training_examples,
                                     user_satisfaction)
from chatforge.errors import ChatforgeError
from test_eval import setup  # noqa: F401  (the tiny model and questions of the eval tests)
from test_report import parse

SYSTEM = "Answer from the context."
DAY1 = datetime(2026, 11, 30, 10, 0, tzinfo=timezone.utc).timestamp()
DAY2 = datetime(2026, 12, 1, 9, 30, tzinfo=timezone.utc).timestamp()
ACCOUNTS, FAQ, NETWORK = "accounts.md > Accounts > Reset", "faq.md > FAQ > Passwords", "network.md > Network > Ports"


class Clock:
    """A settable clock for the store's timestamps."""

    def __init__(self, t: float = DAY1):
        self.t = t

    def __call__(self) -> float:
        return self.t


def prompt_for(question: str, sources=(), history=()) -> list[dict]:
    context = "\n".join(f"[{i + 1}] (source: {s}) passage of {s}" for i, s in enumerate(sources))
    return [{"role": "system", "content": SYSTEM}, *history,
            {"role": "user", "content": f"Context:\n{context}\n\nQuestion: {question}"}]


def record(store, message_id, conversation_id, question, reply, sources=(), history=()) -> list[dict]:
    """Record one reply the way the server does; return the prompt messages the model saw."""
    seen = prompt_for(question, sources, history)
    store.record_reply(message_id, conversation_id, "demo-sft", [*history, {"role": "user", "content": question}],
                       reply, seen, "\n".join(m["content"] for m in seen),
                       [{"source": s, "text": f"passage of {s}"} for s in sources])
    return seen


def rows(target, sql):
    """The rows of `sql` in a SQLite file or a PostgreSQL database, read without chatforge."""
    if isinstance(target, str) and target.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(target) as db:
            return [tuple(r) for r in db.execute(sql).fetchall()]
    with sqlite3.connect(target) as db:
        return db.execute(sql).fetchall()


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    """Where a test's store lives: a SQLite file (in a folder the store creates) or a new
    PostgreSQL database (skipped, saying why, where no PostgreSQL server can be started)."""
    if request.param == "sqlite":
        return tmp_path / "sub" / "fb.db"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def handmade(db):
    """A database with known votes: see test_stats_exact for what it holds."""
    path = db
    clock = Clock(DAY1)
    with FeedbackStore(path, clock=clock) as s:
        p = {}
        p[1] = record(s, "r1", "A", "How do I reset my password?", "Press Reset.", [ACCOUNTS])
        p[2] = record(s, "r2", "B", "how do I  reset my password", "I do not know.", [ACCOUNTS, FAQ])
        p[7] = record(s, "r7", "E", "How do I reset my password?", "Press Reset.", [ACCOUNTS])  # same as r1
        s.add_feedback("r1", "up")
        s.add_feedback("r2", "down", "inaccurate", comment="wrong", correction="Press Reset on the login page.")
        s.add_feedback("r7", "up")
        clock.t = DAY2
        history = [{"role": "user", "content": "how do I  reset my password"},
                   {"role": "assistant", "content": "I do not know."}]
        p[3] = record(s, "r3", "B", "Which port does it use?", "Port 80.", [NETWORK], history)
        p[4] = record(s, "r4", "C", "HOW DO I RESET MY PASSWORD?!", "Ask support.")
        p[5] = record(s, "r5", "C", "Thanks", "You're welcome.",
                      history=[{"role": "user", "content": "HOW DO I RESET MY PASSWORD?!"},
                               {"role": "assistant", "content": "Ask support."}])
        p[6] = record(s, "r6", "D", "Which port does it use?", "Port 8443.", [NETWORK])
        s.add_feedback("r3", "up")
        s.add_feedback("r3", "down", "too_long")           # changed their mind: the latest counts
        s.add_feedback("r4", "down", "unhelpful")
        s.add_feedback("r6", "up")
    return path, p


# --------------------------------------------------------------------------- the store

def test_round_trip(db):
    path = db                                              # SQLite: the folder is created
    with FeedbackStore(path, clock=Clock(DAY1)) as s:
        seen = record(s, "chatcmpl-1", "conv-1", "How do I reset?", "Press Reset.", [ACCOUNTS])
        assert s.has_message("chatcmpl-1") and not s.has_message("chatcmpl-2")
        fid = s.add_feedback("chatcmpl-1", "down", "not_in_documents", comment="meh", correction="Press R.")
        assert isinstance(fid, int)
    assert rows(path, "SELECT id, created_at FROM conversations") == [("conv-1", "2026-11-30T10:00:00.000Z")]
    msgs = rows(path, "SELECT message_id, conversation_id, role, content, model, created_at, question_id, prompt, "
                      "prompt_messages, sources FROM messages ORDER BY id")
    assert [m[:5] for m in msgs] == [(None, "conv-1", "user", "How do I reset?", "demo-sft"),
                                     ("chatcmpl-1", "conv-1", "assistant", "Press Reset.", "demo-sft")]
    assert msgs[1][5] == "2026-11-30T10:00:00.000Z"
    assert msgs[1][6] == rows(path, "SELECT id FROM messages WHERE role='user'")[0][0]
    assert msgs[1][7] == "\n".join(m["content"] for m in seen)
    assert json.loads(msgs[1][8]) == seen
    assert json.loads(msgs[1][9]) == [{"source": ACCOUNTS, "text": f"passage of {ACCOUNTS}"}]
    assert rows(path, "SELECT id, message_id, rating, reason, comment, correction, model FROM feedback") == [
        (fid, "chatcmpl-1", "down", "not_in_documents", "meh", "Press R.", "demo-sft")]

    # Reopened: a known conversation gets only the new user turn and the reply, whatever
    # history the client resends.
    with FeedbackStore(path) as s:
        assert s.has_message("chatcmpl-1")
        record(s, "chatcmpl-2", "conv-1", "And on Windows?", "The same.",
               history=[{"role": "user", "content": "How do I reset?"},
                        {"role": "assistant", "content": "Press Reset."}])
        with pytest.raises(ChatforgeError, match="already recorded"):
            record(s, "chatcmpl-2", "conv-1", "again?", "no")
    assert rows(path, "SELECT role, content FROM messages ORDER BY id") == [
        ("user", "How do I reset?"), ("assistant", "Press Reset."),
        ("user", "And on Windows?"), ("assistant", "The same.")]


def test_new_conversation_keeps_the_history_the_client_sent(db):
    with FeedbackStore(db) as s:
        # As the server passes OpenAI messages: content as text parts, or left out (None).
        s.record_reply("m1", "fresh", "demo", [{"role": "developer"},
                                               {"role": "user", "content": [{"type": "text", "text": "H"},
                                                                            {"type": "text", "text": "i"}]},
                                               {"role": "assistant", "content": "Hello."},
                                               {"role": "user", "content": "Why?"}],
                       "Because.", prompt_for("Why?"), "prompt", [])
    assert rows(db, "SELECT role, content, message_id FROM messages ORDER BY id") == [
        ("developer", "", None), ("user", "Hi", None), ("assistant", "Hello.", None), ("user", "Why?", None),
        ("assistant", "Because.", "m1")]


def test_pii_is_scrubbed_in_every_stored_column(db):
    path = db
    pii = "jane.doe@example.com or +44 20 7946 0958"
    with FeedbackStore(path) as s:
        s.record_reply("m1", "c1", "demo", [{"role": "user", "content": f"history {pii}"},
                                            {"role": "assistant", "content": f"old reply {pii}"},
                                            {"role": "user", "content": f"question {pii}"}],
                       f"reply {pii}", [{"role": "system", "content": f"system {pii}"},
                                        {"role": "user", "content": f"context and question {pii}"}],
                       f"rendered prompt {pii}", [{"source": f"doc > {pii}", "text": f"passage {pii}"}])
        s.add_feedback("m1", "down", comment=f"comment {pii}", correction=f"correction {pii}")
    texts = []
    for table in ("conversations", "messages", "feedback"):
        texts += [str(v) for row in rows(path, f"SELECT * FROM {table}") for v in row if v is not None]
    stored = "\n".join(texts)
    assert "jane.doe" not in stored and "7946" not in stored
    # Every text is there, scrubbed: 11 of them, each with one e-mail address and one phone number.
    assert stored.count("<EMAIL>") == 11 and stored.count("<PHONE>") == 11
    for word in ("history", "old reply", "question", "reply", "system", "context and question", "rendered prompt",
                 "doc >", "passage", "comment", "correction"):
        assert f"{word} <EMAIL> or <PHONE>" in stored


def test_unknown_message_and_bad_values_are_refused(db):
    path = db
    with FeedbackStore(path) as s:
        record(s, "m1", "c1", "q?", "a.")
        with pytest.raises(LookupError, match="nope"):
            s.add_feedback("nope", "up")
        with pytest.raises(ChatforgeError, match="'up' or 'down'"):
            s.add_feedback("m1", "meh")
        with pytest.raises(ChatforgeError, match="reason must be one of inaccurate, not_in_documents"):
            s.add_feedback("m1", "down", reason="rude")
        with pytest.raises(ChatforgeError, match="at most 8000"):
            s.add_feedback("m1", "down", comment="x" * 8001)
        with pytest.raises(ChatforgeError, match="end with the user's question"):
            s.record_reply("m2", "c1", "demo", [{"role": "assistant", "content": "a"}], "b", [], "", [])
        with pytest.raises(ChatforgeError, match="sources must be"):
            s.record_reply("m2", "c1", "demo", [{"role": "user", "content": "a"}], "b", [], "", ["doc"])
        assert s.add_feedback("m1", "up", comment="  ") == 1   # blank text is stored as NULL
    assert rows(path, "SELECT rating, comment FROM feedback") == [("up", None)]
    assert rows(path, "SELECT count(*) FROM messages") == [(2,)]


def test_one_vote_is_one_row_completed_by_the_form(db):
    """The page saves the thumb at once, then completes that row with the form's fields (or
    turns it into the other thumb): one vote, one row, and the stats count it once."""
    path = db
    with FeedbackStore(path) as s:
        record(s, "m1", "c1", "How do I reset?", "Press Reset.", [ACCOUNTS])
        record(s, "m2", "c2", "How do I reset?", "No idea.", [ACCOUNTS])
        vote = s.add_feedback("m1", "up")
        assert s.update_feedback(vote, "m1", "down", "inaccurate", comment="no",
                                 correction="Press Reset on the sign-in page.") == vote
        with pytest.raises(LookupError, match="no feedback"):
            s.update_feedback(vote, "m2", "up")             # a row of another reply
        with pytest.raises(LookupError, match="no feedback"):
            s.update_feedback(vote + 1, "m1", "up")
        with pytest.raises(ChatforgeError, match="reason must be"):
            s.update_feedback(vote, "m1", "down", "rude")
        stats = satisfaction_stats(s.rated_replies(), s.count_replies())
    assert rows(path, "SELECT id, rating, reason, comment, correction FROM feedback") == [
        (vote, "down", "inaccurate", "no", "Press Reset on the sign-in page.")]
    assert (stats["rated"], stats["down"], stats["reasons"]) == (1, 1, {"inaccurate": 1})


def test_a_stopped_reply_is_kept_marked_and_never_taught(db, capsys):
    path = db
    with FeedbackStore(path) as s:
        seen = record(s, "full", "c1", "How do I reset?", "Press Reset.", [ACCOUNTS])
        s.record_reply("cut", "c2", "demo-sft", [{"role": "user", "content": "How do I reset?"}], "Press",
                       seen, "prompt", [], stopped=True)
        s.record_reply("cut-up", "c3", "demo-sft", [{"role": "user", "content": "How do I reset?"}], "Open the",
                       seen, "prompt", [], stopped=True)
        s.add_feedback("cut", "down", "too_long")
        s.add_feedback("cut-up", "up")                     # liked the start: still not a whole answer
        s.add_feedback("full", "up")
        rated = s.rated_replies()
    assert rows(path, "SELECT message_id, content, stopped FROM messages WHERE message_id IS NOT NULL ORDER BY id") == [
        ("full", "Press Reset.", 0), ("cut", "Press", 1), ("cut-up", "Open the", 1)]
    assert [(r["message_id"], r["stopped"]) for r in rated] == [("full", False), ("cut", True), ("cut-up", True)]
    stats = satisfaction_stats(rated)
    assert stats["stopped"] == {"rated": 2, "up": 1, "down": 1, "satisfaction": 0.5}
    prefs, sft_lines, _ = training_examples(rated)
    assert prefs == [pref(seen, "Press Reset.", "Press")]  # the stopped one only as the worse answer
    assert sft_lines == [sft(seen, "Press Reset.")]
    kto_lines, counts = feedback.kto_rows(rated)                # the stopped up-voted start is not desirable
    assert kto_lines == sorted([kto_row(seen, "Press Reset.", True), kto_row(seen, "Press", False)])
    assert counts == {"desirable": 1, "undesirable": 1}
    assert cli.main(["feedback", "stats", "--db", str(path)]) == 0
    assert "stopped by the user while streaming: 2 of the rated replies (1 up, 1 down)" in capsys.readouterr().out


def test_concurrent_writers(db):
    path = db
    with FeedbackStore(path) as s:
        record(s, "m0", "c0", "q?", "a.")
        start = threading.Barrier(16)
        ids: list[int] = []
        errors: list[BaseException] = []

        def worker(n: int) -> None:
            try:
                start.wait()
                for i in range(20):
                    ids.append(s.add_feedback("m0", "up" if i % 2 else "down", comment=f"{n}-{i}"))
                    if i % 5 == 0:   # replies are recorded at the same time
                        record(s, f"m-{n}-{i}", f"c-{n}", f"q {i}?", "a.")
            except BaseException as e:   # noqa: BLE001  (reported below)
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    assert len(ids) == len(set(ids)) == 320
    assert rows(path, "SELECT count(*), count(DISTINCT comment) FROM feedback") == [(320, 320)]
    assert rows(path, "SELECT count(*) FROM messages WHERE message_id IS NOT NULL") == [(1 + 16 * 4,)]


def test_wal_mode_and_settings(tmp_path):
    path = tmp_path / "fb.db"
    with FeedbackStore(path) as s:
        assert s.db._db.execute("PRAGMA synchronous").fetchone()[0] == 2   # FULL
        assert s.db._db.execute("PRAGMA busy_timeout").fetchone()[0] == 10_000
    assert rows(path, "PRAGMA journal_mode") == [("wal",)]               # stored in the file
    assert rows(path, "PRAGMA user_version") == [(schema_version(),)]


def test_sigkill_keeps_every_acknowledged_row(db):
    path = db
    child = f"""
from chatforge.data.feedback import FeedbackStore
s = FeedbackStore({str(path)!r})
q = [{{"role": "user", "content": "q"}}]
s.record_reply("m1", "c1", "demo", q, "a", q, "q", [])
print("ready", flush=True)
while True:
    print(s.add_feedback("m1", "up", comment="x" * 200), flush=True)
"""
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        acked = [int(proc.stdout.readline()) for _ in range(40)]
        os.kill(proc.pid, signal.SIGKILL)                # mid-way through the next writes
        acked += [int(line) for line in proc.stdout.read().split()]  # printed before it died
    finally:
        proc.kill()
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    with FeedbackStore(path) as s:
        assert s.has_message("m1")
        stored = {r["id"] for r in s.db.read("SELECT id FROM feedback")}
    assert len(acked) >= 40 and set(acked) <= stored


# --------------------------------------------------------------------------- schema versions and bad files

def test_v0_file_is_migrated(tmp_path):
    empty = tmp_path / "empty.db"
    empty.touch()                                        # a zero-byte file is an empty SQLite database
    made = tmp_path / "made.db"
    sqlite3.connect(made).execute("PRAGMA user_version=0").connection.close()
    for path in (empty, made):
        with FeedbackStore(path) as s:
            record(s, "m1", "c1", "q?", "a.")
        assert rows(path, "PRAGMA user_version") == [(schema_version(),)]
        assert rows(path, "SELECT name FROM sqlite_master WHERE type='table' ORDER BY name") == [
            ("conversations",), ("feedback",), ("messages",), ("tickets",)]


def test_older_file_migrates_in_order_and_a_failed_migration_changes_nothing(tmp_path, monkeypatch):
    path = tmp_path / "fb.db"
    with FeedbackStore(path) as s:                       # a file of today's version, with data
        record(s, "m1", "c1", "q?", "a.")
        s.add_feedback("m1", "up")
    old = schema_version()

    def broken(db):
        db.execute("ALTER TABLE feedback ADD COLUMN half TEXT")
        raise RuntimeError("migration bug")

    monkeypatch.setattr(feedback, "MIGRATIONS", [*feedback.MIGRATIONS, broken])
    with pytest.raises(RuntimeError, match="migration bug"):
        FeedbackStore(path)
    assert rows(path, "PRAGMA user_version") == [(old,)]
    assert "half" not in [r[1] for r in rows(path, "PRAGMA table_info(feedback)")]

    def add_session(db):      # a later version: a column and a value for the existing rows
        db.execute("ALTER TABLE feedback ADD COLUMN session TEXT")
        db.execute("UPDATE feedback SET session = 'before-migration'")

    def add_index(db):
        db.execute("CREATE INDEX feedback_session ON feedback(session)")

    monkeypatch.setattr(feedback, "MIGRATIONS", [*feedback.MIGRATIONS[:old], add_session, add_index])
    with FeedbackStore(path) as s:
        assert s.has_message("m1")
        s.add_feedback("m1", "down")
    assert rows(path, "PRAGMA user_version") == [(old + 2,)]
    assert rows(path, "SELECT rating, session FROM feedback ORDER BY id") == [
        ("up", "before-migration"), ("down", None)]
    assert rows(path, "SELECT name FROM sqlite_master WHERE name='feedback_session'") == [("feedback_session",)]


@pytest.mark.parametrize("old", range(1, len(feedback.MIGRATIONS)))
def test_a_file_of_an_earlier_schema_is_upgraded_in_place(tmp_path, old):
    """A file as an earlier chatforge left it (schema `old`, made by its migrations, rows written
    with its columns) is upgraded on open: every row still there and read, new rows written."""
    path = tmp_path / "old.db"
    with sqlite3.connect(path, isolation_level=None) as db:
        for migrate in feedback.MIGRATIONS[:old]:
            migrate(db)
        db.execute(f"PRAGMA user_version={old}")
        seen = json.dumps(prompt_for("How do I reset?"))
        db.execute("INSERT INTO conversations VALUES ('c1', '2026-11-30T10:00:00.000Z')")
        db.execute("INSERT INTO messages (conversation_id, role, content, model, created_at) "
                   "VALUES ('c1', 'user', 'How do I reset?', 'demo', '2026-11-30T10:00:00.000Z')")
        db.execute("INSERT INTO messages (message_id, conversation_id, role, content, model, created_at, question_id, "
                   "prompt, prompt_messages, sources) VALUES ('m1', 'c1', 'assistant', 'Press Reset.', 'demo', "
                   "'2026-11-30T10:00:00.000Z', 1, 'p', ?, '[]')", (seen,))
        db.execute("INSERT INTO feedback (message_id, rating, model, created_at) "
                   "VALUES ('m1', 'up', 'demo', '2026-11-30T10:01:00.000Z')")
    with FeedbackStore(path, create=False) as s:       # the readers upgrade it too
        assert s.count_replies() == 1
        rated = s.rated_replies()
        assert [(r["message_id"], r["rating"], r["question"], r["stopped"]) for r in rated] == [
            ("m1", "up", "How do I reset?", False)]
        assert rated[0]["prompt_messages"] == json.loads(seen)
        record(s, "m2", "c1", "And then?", "Sign in.")
        s.add_feedback("m2", "down")
        s.add_ticket("c1", "a person please", "asked for a person")
    assert rows(path, "PRAGMA user_version") == [(schema_version(),)]
    assert rows(path, "SELECT message_id, stopped FROM messages WHERE role='assistant' ORDER BY id") == [
        ("m1", 0), ("m2", 0)]
    assert user_satisfaction(path)["rated"] == 2


def test_newer_file_is_refused(tmp_path):
    path = tmp_path / "fb.db"
    FeedbackStore(path).close()
    sqlite3.connect(path).execute(f"PRAGMA user_version={schema_version() + 1}").connection.close()
    with pytest.raises(ChatforgeError, match="newer chatforge.*upgrade chatforge"):
        FeedbackStore(path)


def test_bad_paths_say_what_to_fix(tmp_path):
    with pytest.raises(ChatforgeError, match="is a folder; give the database file"):
        FeedbackStore(tmp_path)
    text = tmp_path / "notes.txt"
    text.write_text("these are notes, not a database\n" * 100)
    with pytest.raises(ChatforgeError, match="not a SQLite database"):
        FeedbackStore(text)
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE invoices (id)")
    with pytest.raises(ChatforgeError, match=r"another program \(tables: invoices\)"):
        FeedbackStore(other)
    with pytest.raises(ChatforgeError, match="cannot create the folder"):
        FeedbackStore(text / "fb.db")                    # its "folder" is a file
    with pytest.raises(ChatforgeError, match="does not exist; `chatforge serve --db"):
        FeedbackStore(tmp_path / "missing.db", create=False)
    assert not (tmp_path / "missing.db").exists()


def test_unwritable_places_say_so():
    # Under /tmp rather than tmp_path: when the tests run as root, the check runs as "nobody",
    # who cannot enter pytest's private temporary folders.
    with tempfile.TemporaryDirectory() as tmp:
        ro = Path(tmp) / "ro"
        ro.mkdir()
        FeedbackStore(ro / "old.db").close()
        os.chmod(ro / "old.db", 0o444)
        os.chmod(ro, 0o555)
        os.chmod(tmp, 0o755)
        check = """
import os, sys
from chatforge.data.feedback import FeedbackStore
from chatforge.errors import ChatforgeError
if os.geteuid() == 0:   # root may write anywhere
    os.setgid(65534)
    os.setuid(65534)
for path in sys.argv[1:]:
    try:
        with FeedbackStore(path) as s:
            s.record_reply("m", "c", "demo", [{"role": "user", "content": "q"}], "a", [], "", [])
        print("written")
    except ChatforgeError as e:
        print(e)
"""
        try:
            r = subprocess.run([sys.executable, "-c", check, str(ro / "new.db"), str(ro / "old.db"),
                                str(ro / "sub" / "new.db")], capture_output=True, text=True, timeout=60)
        finally:
            os.chmod(ro, 0o755)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        f"cannot open {ro / 'new.db'}: unable to open database file; check that its folder exists and is writable",
        f"cannot write {ro / 'old.db'} (attempt to write a readonly database): SQLite needs write access to the "
        "file and its folder (it keeps old.db-wal and old.db-shm beside it)",
        f"cannot create the folder of {ro / 'sub' / 'new.db'}: Permission denied"]


# --------------------------------------------------------------------------- stats

EXPECTED_STATS = {
    "replies": 7, "rated": 6, "up": 3, "down": 3, "satisfaction": 0.5,
    "reasons": {"inaccurate": 1, "too_long": 1, "unhelpful": 1},
    "stopped": {"rated": 0, "up": 0, "down": 0, "satisfaction": None},
    "per_day": [{"day": "2026-11-30", "rated": 3, "up": 2, "down": 1, "satisfaction": 0.6667},
                {"day": "2026-12-01", "rated": 3, "up": 1, "down": 2, "satisfaction": 0.3333}],
    "per_document": [{"document": "accounts.md", "rated": 3, "up": 2, "down": 1, "satisfaction": 0.6667},
                     {"document": "network.md", "rated": 2, "up": 1, "down": 1, "satisfaction": 0.5},
                     {"document": None, "rated": 1, "up": 0, "down": 1, "satisfaction": 0.0},
                     {"document": "faq.md", "rated": 1, "up": 0, "down": 1, "satisfaction": 0.0}],
    "most_down_voted": [{"question": "How do I reset my password?", "down": 2, "up": 2},
                        {"question": "Which port does it use?", "down": 1, "up": 1}],
}


def test_stats_exact(handmade):
    # r1, r7 up and r2 down (day 1); r3 up then down, r4 down, r6 up, r5 unrated (day 2). The
    # reset question is asked four ways (case, spacing, punctuation): one group.
    path, _ = handmade
    assert user_satisfaction(path) == EXPECTED_STATS
    assert user_satisfaction(path, top=1)["most_down_voted"] == EXPECTED_STATS["most_down_voted"][:1]
    assert satisfaction_stats([], 0) == {"replies": 0, "rated": 0, "up": 0, "down": 0, "satisfaction": None,
                                         "reasons": {}, "stopped": {"rated": 0, "up": 0, "down": 0,
                                                                    "satisfaction": None},
                                         "per_day": [], "per_document": [], "most_down_voted": []}


# --------------------------------------------------------------------------- export

def pref(prompt, chosen, rejected) -> str:
    return json.dumps({"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
                       "rejected": [{"role": "assistant", "content": rejected}]}, ensure_ascii=False)


def sft(prompt, answer) -> str:
    return json.dumps({"messages": [*prompt, {"role": "assistant", "content": answer}]}, ensure_ascii=False)


def kto_row(prompt, completion, label) -> str:
    return json.dumps({"prompt": prompt, "completion": [{"role": "assistant", "content": completion}],
                       "label": label}, ensure_ascii=False)


def test_export_exact_deterministic_and_deduplicated(handmade, tmp_path):
    path, p = handmade
    expected_prefs = sorted([
        pref(p[2], "Press Reset on the login page.", "I do not know."),   # the correction
        pref(p[1], "Press Reset.", "I do not know."),                     # up-voted r1 (= r7) against r2...
        pref(p[1], "Press Reset.", "Ask support."),                       # ...and against r4
        pref(p[6], "Port 8443.", "Port 80."),                             # r6 against r3
    ])
    expected_sft = sorted([sft(p[1], "Press Reset."), sft(p[2], "Press Reset on the login page."),
                           sft(p[6], "Port 8443.")])
    expected_kto = sorted([
        kto_row(p[1], "Press Reset.", True),                                # r1 (= r7) up
        kto_row(p[2], "I do not know.", False),                             # r2 down...
        kto_row(p[2], "Press Reset on the login page.", True),              # ...and its correction
        kto_row(p[3], "Port 80.", False),                                   # r3: its latest vote
        kto_row(p[4], "Ask support.", False),
        kto_row(p[6], "Port 8443.", True),                                  # r5 is not rated
    ])
    out = tmp_path / "out"
    assert cli.main(["feedback", "export", "--db", str(path), "--out", str(out)]) == 0
    first = {name: (out / name).read_bytes() for name in ("preferences.jsonl", "sft.jsonl", "kto.jsonl")}
    assert first["preferences.jsonl"].decode() == "".join(line + "\n" for line in expected_prefs)
    assert first["sft.jsonl"].decode() == "".join(line + "\n" for line in expected_sft)
    assert first["kto.jsonl"].decode() == "".join(line + "\n" for line in expected_kto)
    assert cli.main(["feedback", "export", "--db", str(path), "--out", str(out)]) == 0
    assert {name: (out / name).read_bytes() for name in first} == first
    assert sorted(os.listdir(out)) == ["kto.jsonl", "preferences.jsonl", "sft.jsonl"]   # no temporary files left

    # The KTO stage reads the file: three desirable and three undesirable rows.
    from chatforge.data.unpaired import read_unpaired

    assert sorted(r.label for r in read_unpaired(out / "kto.jsonl")) == [False] * 3 + [True] * 3

    # The SFT stage reads the file as the training split of a data folder.
    from chatforge.train.sft import read_records

    data = tmp_path / "data"
    data.mkdir()
    (data / "qa_train.jsonl").write_bytes(first["sft.jsonl"])
    train, val = read_records(data, seed=0)
    assert sorted(json.dumps(r["messages"]) for r in train + val) == sorted(
        json.dumps(json.loads(line)["messages"]) for line in expected_sft)


def test_export_scrubs_again_and_skips_empty_pairs():
    seen = [{"role": "user", "content": "mail bob@example.com"}]
    rated = [{"question": "q", "reply": "same", "rating": "down", "correction": "same ", "prompt_messages": seen},
             {"question": "q", "reply": "call 020 7946 0958", "rating": "up", "correction": None,
              "prompt_messages": seen},
             {"question": "q", "reply": "x", "rating": "up", "correction": None, "prompt_messages": []}]
    prefs, sft_lines, counts = training_examples(rated)
    assert counts == {"corrections": 0, "vote_pairs": 1, "preferences": 1, "sft": 2}
    assert "bob@" not in "".join(prefs + sft_lines) and "7946" not in "".join(prefs + sft_lines)
    assert json.loads(prefs[0])["chosen"][0]["content"] == "call <PHONE>"


def test_export_writes_nothing_when_it_fails(handmade, tmp_path, monkeypatch):
    path, _ = handmade
    out = tmp_path / "out"
    out.mkdir()
    (out / "preferences.jsonl").write_text("old\n")
    (out / "sft.jsonl").write_text("old\n")

    def broken_lines():
        yield '{"messages": []}'
        raise OSError(28, "No space left on device")

    real = feedback.training_examples
    monkeypatch.setattr(feedback, "training_examples", lambda rated: (real(rated)[0], broken_lines(), {}))
    assert cli.main(["feedback", "export", "--db", str(path), "--out", str(out)]) == 2
    assert (out / "preferences.jsonl").read_text() == "old\n" and (out / "sft.jsonl").read_text() == "old\n"
    assert sorted(os.listdir(out)) == ["preferences.jsonl", "sft.jsonl"]      # nor a kto.jsonl


# --------------------------------------------------------------------------- the command

def test_cli_stats_tables_json_and_errors(handmade, tmp_path, capsys):
    path, _ = handmade
    assert cli.main(["feedback", "stats", "--db", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("user satisfaction: 50.0% thumbs up of 6 rated replies (3 up, 3 down; 7 replies recorded)")
    assert "down-vote reasons: inaccurate 1, too_long 1, unhelpful 1" in out
    assert "2026-12-01       3      1      2        33.3%" in out
    assert "(no sources)" in out and "   2    2  How do I reset my password?" in out

    assert cli.main(["feedback", "stats", "--db", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == EXPECTED_STATS

    empty = tmp_path / "empty.db"
    FeedbackStore(empty).close()
    assert cli.main(["feedback", "stats", "--db", str(empty)]) == 0
    assert "no rated replies yet" in capsys.readouterr().out

    missing = tmp_path / "missing.db"
    for argv in (["stats", "--db", str(missing)], ["export", "--db", str(missing), "--out", str(tmp_path / "o")]):
        assert cli.main(["feedback", *argv]) == 2
        assert f"feedback database {missing} does not exist" in capsys.readouterr().err
    assert not missing.exists() and not (tmp_path / "o").exists()
    assert cli.main(["feedback", "stats"]) == 2
    assert "--db is required" in capsys.readouterr().err
    assert cli.main(["feedback", "export", "--db", str(path)]) == 2
    assert "--out is required" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["feedback", "--help"], ["feedback", "stats", "--help"],
                                  ["feedback", "export", "--help"]])
def test_cli_help_has_an_example(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 0
    assert "example:\n  chatforge feedback" in capsys.readouterr().out


# --------------------------------------------------------------------------- the report

def test_report_section(handmade):
    from chatforge.eval.report import render_report

    path, _ = handmade
    stats = user_satisfaction(path)
    stats["most_down_voted"][0]["question"] = "<script>alert(1)</script>"
    doc = parse(render_report({"baselines": {}, "user_satisfaction": stats}))
    text = "".join(doc.text)
    assert "User satisfaction" in text and "50.0% of 6 rated replies were thumbs up" in text
    assert doc.tables["satisfaction-documents"] == [
        ["document", "rated", "up", "down", "thumbs up"], ["accounts.md", "3", "2", "1", "66.7%"],
        ["network.md", "2", "1", "1", "50.0%"], ["(no sources)", "1", "0", "1", "0.0%"],
        ["faq.md", "1", "0", "1", "0.0%"]]
    assert doc.tables["down-voted"][1] == ["<script>alert(1)</script>", "2", "2"]
    assert not any(tag == "script" for tag, _ in doc.tags)
    assert sum(1 for tag, _ in doc.tags if tag == "svg") == 2        # the metrics' bars and the per-day chart
    assert "share of thumbs up per day (UTC)" in text and "11-30" in text and "12-01" in text

    # Many days: the chart shows the last 30, and names every third under its axis.
    stats["per_day"] = [{"day": f"2026-{11 + d // 30}-{1 + d % 30:02d}", "rated": 2, "up": 1, "down": 1,
                         "satisfaction": 0.5} for d in range(40)]
    doc = parse(render_report({"baselines": {}, "user_satisfaction": stats}))
    assert "The last 30 of 40 days with ratings." in "".join(doc.text)
    bars = [a for tag, a in doc.tags if tag == "rect" and a.get("fill") == "#1f77b4" and a.get("width") != "12"]
    assert len(bars) == 30
    assert "11-11" in doc.text and "11-12" not in doc.text and "11-14" in doc.text   # axis labels
    assert "11-12: 0.500" in doc.text                                                 # every bar's tooltip

    empty = parse(render_report({"baselines": {}, "user_satisfaction": satisfaction_stats([], 3)}))
    assert "No rated replies in the feedback database yet (3 replies recorded)." in "".join(empty.text)
    assert "User satisfaction" not in "".join(parse(render_report({"baselines": {}})).text)


def test_eval_with_feedback_db(setup, handmade, capsys):  # noqa: F811
    path, _ = handmade
    out = setup["root"] / "out-feedback"
    assert cli.main(["eval", "--model", str(setup["model"]), "--questions", str(setup["questions"]),
                     "--max-new-tokens", "4", "--feedback-db", str(path), "--out", str(out)]) == 0
    assert json.loads((out / "eval.json").read_text())["user_satisfaction"] == EXPECTED_STATS
    assert "User satisfaction" in (out / "report.html").read_text()
    assert "user satisfaction: 50.0% thumbs up of 6 rated replies" in capsys.readouterr().out
    # A wrong path fails before the model loads.
    assert cli.main(["eval", "--model", str(setup["model"]), "--questions", str(setup["questions"]),
                     "--feedback-db", str(setup["root"] / "nope.db"), "--out", str(out)]) == 2
    assert "nope.db does not exist" in capsys.readouterr().err


# --------------------------------------------------------------------------- PostgreSQL only

def test_postgres_schema_version_and_refusals(pg_url, pg_cluster, monkeypatch):
    import psycopg

    with pytest.raises(ChatforgeError, match="holds no chatforge feedback yet; `chatforge serve --db URL` creates"):
        FeedbackStore(pg_url, create=False)              # the readers create nothing
    assert rows(pg_url, "SELECT to_regclass('chatforge_schema') IS NULL") == [(True,)]
    with FeedbackStore(pg_url) as s:
        record(s, "m1", "c1", "q?", "a.")
        s.add_feedback("m1", "up")
        assert s.where == pg_url and s.path is None
    assert rows(pg_url, "SELECT version FROM chatforge_schema") == [(schema_version(),)]

    # A later version: migrated in place, in order, once; a failed one changes nothing.
    def broken(db):
        db.execute("ALTER TABLE feedback ADD COLUMN half TEXT")
        raise RuntimeError("migration bug")

    monkeypatch.setattr(feedback, "MIGRATIONS", [*feedback.MIGRATIONS, broken])
    with pytest.raises(RuntimeError, match="migration bug"):
        FeedbackStore(pg_url)
    assert rows(pg_url, "SELECT count(*) FROM information_schema.columns WHERE column_name='half'") == [(0,)]

    def add_session(db):
        db.execute("ALTER TABLE feedback ADD COLUMN session TEXT")
        db.execute("UPDATE feedback SET session = ?", ("before-migration",))

    monkeypatch.setattr(feedback, "MIGRATIONS", [*feedback.MIGRATIONS[:-1], add_session])
    with FeedbackStore(pg_url) as s:
        s.add_feedback("m1", "down")
    assert rows(pg_url, "SELECT rating, session FROM feedback ORDER BY id") == [
        ("up", "before-migration"), ("down", None)]
    monkeypatch.undo()
    with pytest.raises(ChatforgeError, match=r"newer chatforge \(schema version 4; this one knows up to 3\)"):
        FeedbackStore(pg_url)

    # A database where another program has a table of one of our names.
    other = pg_cluster.url("other_program")
    with psycopg.connect(other) as conn:
        conn.execute("CREATE TABLE feedback (id int)")
    with pytest.raises(ChatforgeError, match="already has tables of another program named feedback"):
        FeedbackStore(other)


def test_postgres_stores_starting_together_migrate_once(pg_url):
    stores, errors = [], []

    def start():
        try:
            stores.append(FeedbackStore(pg_url))
        except BaseException as e:   # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in stores:
        s.close()
    assert not errors and len(stores) == 6
    assert rows(pg_url, "SELECT version FROM chatforge_schema") == [(schema_version(),)]


def test_postgres_urls_that_cannot_work_say_what_to_fix(pg_cluster, capsys):
    with pytest.raises(ChatforgeError, match=r"a SQLite file path or a postgresql:// URL"):
        FeedbackStore("mysql://root:hunter2@localhost/db")
    missing = pg_cluster._conninfo("no_such_db")
    with pytest.raises(ChatforgeError, match='cannot use PostgreSQL at .*database "no_such_db" does not exist; '
                                             r"check the URL \(postgresql://USER:PASSWORD@HOST:PORT/DATABASE\)"):
        FeedbackStore(missing)
    nobody = "postgresql://chatforge:hunter2@/x?host=/nonexistent-socket-dir"
    with pytest.raises(ChatforgeError, match="cannot use PostgreSQL at postgresql://chatforge:\\*\\*\\*@") as e:
        FeedbackStore(nobody)
    assert "hunter2" not in str(e.value)                  # the password is never shown
    assert cli.main(["feedback", "stats", "--db", nobody]) == 2
    err = capsys.readouterr().err
    assert "cannot use PostgreSQL" in err and "hunter2" not in err


def test_sqlite_needs_no_driver_and_postgres_says_which_to_install(tmp_path):
    """Without psycopg (a plain install): SQLite works, a postgresql:// URL says what to install."""
    check = f"""
import sys
sys.modules["psycopg"] = sys.modules["psycopg_pool"] = None      # as if not installed
from chatforge.data.feedback import FeedbackStore
from chatforge.errors import ChatforgeError
with FeedbackStore({str(tmp_path / "fb.db")!r}) as s:
    s.record_reply("m", "c", "demo", [{{"role": "user", "content": "q"}}], "a", [], "", [])
    print(s.add_feedback("m", "up"))
try:
    FeedbackStore("postgresql://chatforge:hunter2@db.internal/support")
except ChatforgeError as e:
    print(e)
"""
    r = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "1", "--db postgresql://chatforge:***@db.internal/support needs the PostgreSQL driver: "
             "pip install 'chatforge[postgres]'"]
