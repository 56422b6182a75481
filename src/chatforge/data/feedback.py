"""The feedback store: every reply the server gave, the users' thumbs on them, and what they teach.

    store = FeedbackStore("runs/demo/feedback.db")          # creates the file, or opens and migrates it
    store = FeedbackStore("postgresql://chatforge@db.internal/support")   # or PostgreSQL (`postgres` extra)
    store.record_reply("chatcmpl-1", "conv-1", "sft", messages, reply, prompt_messages, prompt, sources)
    store.add_feedback("chatcmpl-1", "down", reason="inaccurate", correction="Press Reset.")
    stats = satisfaction_stats(store.rated_replies(), store.count_replies())
    export_training_data(store, "runs/demo/feedback-data")  # preferences.jsonl, sft.jsonl, kto.jsonl

`chatforge serve --db FILE|URL` writes it (docs/SERVING.md); `chatforge feedback stats|export` and
`chatforge eval --feedback-db FILE|URL` read it.

The database
------------
One SQLite file in WAL mode (readers never block the writer; the stats can run while the
server writes), or a PostgreSQL database that several servers share; `feedback_db.py` runs the
statements on either. The tables are the same on both (row ids are identity columns on PostgreSQL):

- `conversations(id, created_at)`.
- `messages(id, message_id, conversation_id, role, content, model, created_at, question_id,
  prompt, prompt_messages, sources)`: every turn in order (`id`). An assistant turn the server
  produced has its `message_id` (the chat completion id feedback refers to), `question_id` (the
  user turn it answers) and the snapshot of what the model saw: the rendered `prompt` text,
  `prompt_messages` (JSON: system + history + the user turn with the retrieved context) and
  `sources` (JSON: `[{"source": "DOC > TITLE > SECTION", "text": ...}]`). A new conversation
  stores the client's whole history as sent; a known one gets only the new user turn and reply.
  `stopped` (schema 3): 1 when the user stopped the reply while it streamed; `content` is then
  the part they saw (so a thumbs down on it still lands, and it is never taught as an answer).
- `feedback(id, message_id, rating, reason, comment, correction, model, created_at)`: one row
  per vote; a user may rate a reply again, and the latest row is their verdict. The page saves
  the thumb at once and then completes that same row with the reason, comment and correction
  (`update_feedback`), so one vote stays one row.
- `tickets(id, conversation_id, message, reason, transcript, status, created_at)` (schema 2): one
  row per hand-off to a person (the `handoff` plugin, `infer/plugin_builtins.py`): the user's
  message, why (`asked for a person`, `negative sentiment`, ...), the conversation so far as JSON,
  and `status` ("open"; people working the queue change it).

Every text is PII-scrubbed (`chatforge.data.pii.scrub_pii`) before it is stored. Times are UTC,
ISO 8601 with milliseconds ("2026-12-01T18:55:48.123Z"). The schema version is SQLite's
`PRAGMA user_version` (PostgreSQL: the table `chatforge_schema`); `MIGRATIONS[i]` takes a
database from version i to i + 1, each in its own transaction, so a file of any older version
(0: an empty file) is brought up to date on open and a database from a newer chatforge is refused.

Concurrency: the store is thread-safe (the server calls it from FastAPI's thread pool) and every
write commits before it returns; how each backend does it is in `feedback_db.py`.

User satisfaction (`satisfaction_stats`)
----------------------------------------
The share of thumbs up among rated replies, each reply counted once with its latest rating:
overall, among the replies the user stopped, per day (UTC, the day the reply was given), per source document (the DOC part of the
reply's sources; a reply citing two documents counts for both, one citing none is under
`null`), and the questions with the most down-voted replies (questions compared after
`normalize_question`: case, spacing and trailing punctuation ignored).

Training data (`export_training_data`)
--------------------------------------
`preferences.jsonl`, in TRL's conversational preference format (explicit prompt), one pair a line:

    {"prompt": [{"role": "system", ...}, {"role": "user", "content": "Context: ... Question: ..."}],
     "chosen": [{"role": "assistant", "content": "the better answer"}],
     "rejected": [{"role": "assistant", "content": "the worse answer"}]}

The prompt is what the model saw. Pairs: (a) a user's correction (chosen) against the reply it
corrects (rejected); (b) an up-voted reply against a down-voted reply to the same normalized
question, with the up-voted reply's prompt (when the two prompts differ, e.g. other passages).

`sft.jsonl`: `{"messages": [...prompt messages..., {"role": "assistant", "content": ...}]}` for
every correction and every up-voted reply (a corrected reply gives its correction instead), the
line format of the data stage's `qa_train.jsonl`: `chatforge.data.chat_data.read_chat_records`
reads it, so it can be appended to a data folder's `qa_train.jsonl` for `chatforge sft`. Note
that SFT learns every assistant turn of a conversation, including earlier replies in the history.

`kto.jsonl`, TRL's conversational unpaired preference format for KTO (`chatforge kto`), one row a
line: every up-voted reply (label true) and down-voted reply (label false) in the prompt the
server showed, and every correction as a desirable row:

    {"prompt": [...prompt messages...], "completion": [{"role": "assistant", "content": ...}],
     "label": true}

A reply the user stopped is only the start of an answer: it is never a chosen answer, an
SFT example or a desirable KTO row (its correction still is), only a rejected or undesirable one.

Both files are re-scrubbed, deduplicated, sorted by their JSON text (the same database gives
byte-identical files) and written atomically once everything is computed.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

from chatforge import files
from chatforge.data.feedback_db import IntegrityError, open_database
from chatforge.data.pii import scrub_pii
from chatforge.errors import ChatforgeError

RATINGS = ("up", "down")
REASONS = ("inaccurate", "not_in_documents", "too_long", "unhelpful")
MAX_FEEDBACK_TEXT = 8000   # characters of a comment or correction (docs/SERVING.md)
PROMPT_ROLES = ("system", "user", "assistant")   # the chat template's roles


# --------------------------------------------------------------------------- schema

def _pk(db) -> str:
    """The row id column: SQLite's rowid alias; an identity column on PostgreSQL."""
    return ("BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY" if getattr(db, "dialect", "sqlite") == "postgresql"
            else "INTEGER PRIMARY KEY")


def _int(db) -> str:
    """A column referring to a row id."""
    return "BIGINT" if getattr(db, "dialect", "sqlite") == "postgresql" else "INTEGER"


# Each migration runs on a sqlite3 connection or feedback_db's PostgreSQL one; the SQL is the
# same but for the row ids (on SQLite exactly what it was when the version was made).

def _v1(db) -> None:
    """The first schema: conversations, their turns with the reply snapshots, and feedback."""
    db.execute("""CREATE TABLE conversations (
        id TEXT PRIMARY KEY,
        created_at TEXT NOT NULL)""")
    db.execute(f"""CREATE TABLE messages (
        id {_pk(db)},
        message_id TEXT UNIQUE,
        conversation_id TEXT NOT NULL REFERENCES conversations(id),
        role TEXT NOT NULL,
        content TEXT NOT NULL,
        model TEXT,
        created_at TEXT NOT NULL,
        question_id {_int(db)} REFERENCES messages(id),
        prompt TEXT,
        prompt_messages TEXT,
        sources TEXT)""")
    db.execute("CREATE INDEX messages_conversation ON messages(conversation_id)")
    db.execute(f"""CREATE TABLE feedback (
        id {_pk(db)},
        message_id TEXT NOT NULL REFERENCES messages(message_id),
        rating TEXT NOT NULL CHECK (rating IN {RATINGS}),
        reason TEXT CHECK (reason IS NULL OR reason IN {REASONS}),
        comment TEXT,
        correction TEXT,
        model TEXT,
        created_at TEXT NOT NULL)""")
    db.execute("CREATE INDEX feedback_message ON feedback(message_id)")


def _v2(db) -> None:
    """Hand-off tickets: a person takes over the conversation."""
    db.execute(f"""CREATE TABLE tickets (
        id {_pk(db)},
        conversation_id TEXT,
        message TEXT NOT NULL,
        reason TEXT NOT NULL,
        transcript TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'open',
        created_at TEXT NOT NULL)""")


def _v3(db) -> None:
    """Replies the user stopped mid-stream: kept (what they saw) and marked."""
    db.execute("ALTER TABLE messages ADD COLUMN stopped INTEGER NOT NULL DEFAULT 0")


# MIGRATIONS[i] takes a file at schema version i to version i + 1. Append, never edit: files
# in the field were made by the functions as they are.
MIGRATIONS: list[Callable[[object], None]] = [_v1, _v2, _v3]


def schema_version() -> int:
    """The schema version this chatforge writes."""
    return len(MIGRATIONS)


def _now_iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _scrub(text: str) -> str:
    return scrub_pii(text)[0]


def _text(value, what: str) -> str:
    """A message content as text: a string, None (OpenAI allows it: empty), or OpenAI's list of
    text parts joined."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    raise ChatforgeError(f"{what} must be a string, got {type(value).__name__}")


def _messages(messages, what: str, roles: Sequence[str] | None = None) -> list[dict]:
    """Validated, scrubbed {"role", "content"} dicts."""
    if not isinstance(messages, list):
        raise ChatforgeError(f"{what} must be a list of {{'role', 'content'}} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ChatforgeError(f"{what}[{i}] must be a dict with a string 'role' and a 'content'")
        if roles is not None and m["role"] not in roles:
            raise ChatforgeError(f"{what}[{i}]: role {m['role']!r} is not one of {', '.join(roles)}")
        out.append({"role": m["role"], "content": _scrub(_text(m.get("content"), f"{what}[{i}].content"))})
    return out


def _vote(rating, reason, comment, correction) -> tuple:
    """A feedback row's values, checked (ChatforgeError) and scrubbed."""
    if rating not in RATINGS:
        raise ChatforgeError(f"rating must be 'up' or 'down', got {rating!r}")
    if reason is not None and reason not in REASONS:
        raise ChatforgeError(f"reason must be one of {', '.join(REASONS)}, got {reason!r}")
    return rating, reason, _optional_text(comment, "comment"), _optional_text(correction, "correction")


def _optional_text(value, what: str) -> str | None:
    """Comment or correction: None for missing or blank text; scrubbed otherwise."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ChatforgeError(f"{what} must be a string, got {type(value).__name__}")
    if len(value) > MAX_FEEDBACK_TEXT:
        raise ChatforgeError(f"{what} is {len(value)} characters long; at most {MAX_FEEDBACK_TEXT}")
    return _scrub(value) if value.strip() else None


# --------------------------------------------------------------------------- the store

class FeedbackStore:
    """The feedback database: thread-safe; every call commits before it returns.

    `target`: a SQLite file path or a postgresql:// URL (`chatforge.data.feedback_db`).
    `create=False` refuses a missing file or a database without chatforge's tables instead of
    creating them (the readers use that). `clock` (seconds since the epoch) is for tests that
    need known times.
    """

    def __init__(self, target: str | os.PathLike, *, create: bool = True, clock: Callable[[], float] = time.time):
        self._clock = clock
        # MIGRATIONS looked up now, not bound at import: tests give other histories.
        self.db = open_database(target, create=create, migrations=MIGRATIONS)
        self.path: Path | None = self.db.path      # the SQLite file (None on PostgreSQL)
        self.where: str = self.db.where            # the file, or the URL without its password

    # ----------------------------------------------------------------------- writing

    def record_reply(self, message_id: str, conversation_id: str, model: str, messages: list[dict], reply: str,
                     prompt_messages: list[dict], prompt: str, sources: list[dict], stopped: bool = False) -> None:
        """Store one answered turn: the user's question (and, for a new conversation, the history
        the client sent) and the reply with its snapshot. Appends to a known conversation.
        `stopped`: the user stopped the reply while it streamed; `reply` is the part they saw."""
        for value, what in ((message_id, "message_id"), (conversation_id, "conversation_id"), (model, "model")):
            if not isinstance(value, str) or not value:
                raise ChatforgeError(f"{what} must be a non-empty string")
        turns = _messages(messages, "messages")
        if not turns or turns[-1]["role"] != "user":
            raise ChatforgeError("messages must end with the user's question")
        seen = _messages(prompt_messages, "prompt_messages", PROMPT_ROLES)
        if not isinstance(sources, list) or not all(
                isinstance(s, dict) and isinstance(s.get("source"), str) and isinstance(s.get("text"), str)
                for s in sources):
            raise ChatforgeError('sources must be a list of {"source": str, "text": str}')
        snapshot = (_scrub(_text(prompt, "prompt")),
                    json.dumps(seen, ensure_ascii=False),
                    json.dumps([{"source": _scrub(s["source"]), "text": _scrub(s["text"])} for s in sources],
                               ensure_ascii=False))
        answer = _scrub(_text(reply, "reply"))
        now = _now_iso(self._clock())

        def work(db) -> None:
            # ON CONFLICT rather than look first: two servers on one PostgreSQL database may take
            # the same conversation's turns at once, and only one of them may create it.
            new = db.execute("INSERT INTO conversations (id, created_at) VALUES (?, ?) ON CONFLICT (id) DO NOTHING "
                             "RETURNING id", (conversation_id, now)).fetchall()
            # A known conversation already holds the earlier turns (stored with earlier replies).
            for m in (turns if new else turns[-1:]):
                question = db.execute("INSERT INTO messages (conversation_id, role, content, model, created_at) "
                                      "VALUES (?, ?, ?, ?, ?) RETURNING id",
                                      (conversation_id, m["role"], m["content"], model, now)).fetchall()[0][0]
            db.execute("INSERT INTO messages (message_id, conversation_id, role, content, model, created_at, "
                       "question_id, prompt, prompt_messages, sources, stopped) "
                       "VALUES (?, ?, 'assistant', ?, ?, ?, ?, ?, ?, ?, ?)",
                       (message_id, conversation_id, answer, model, now, question, *snapshot, int(bool(stopped))))

        try:
            self.db.write(work)
        except IntegrityError:
            raise ChatforgeError(f"reply {message_id!r} is already recorded; every reply needs a new id") from None

    def has_message(self, message_id: str) -> bool:
        """Whether a reply with this id is stored."""
        return bool(self.db.read("SELECT 1 FROM messages WHERE message_id=?", (message_id,)))

    def add_feedback(self, message_id: str, rating: str, reason: str | None = None, comment: str | None = None,
                     correction: str | None = None) -> int:
        """Store a user's rating of a reply; return the feedback row id.

        LookupError for an unknown `message_id`; ChatforgeError for a bad rating, reason or text.
        """
        rating, reason, comment, correction = _vote(rating, reason, comment, correction)
        now = _now_iso(self._clock())

        def work(db) -> int:
            row = db.execute("SELECT model FROM messages WHERE message_id=?", (message_id,)).fetchone()
            if row is None:
                raise LookupError(f"no reply with id {message_id!r} in {self.where}")
            return db.execute("INSERT INTO feedback (message_id, rating, reason, comment, correction, model, "
                              "created_at) VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
                              (message_id, rating, reason, comment, correction, row[0], now)).fetchall()[0][0]

        return self.db.write(work)

    def update_feedback(self, feedback_id: int, message_id: str, rating: str, reason: str | None = None,
                        comment: str | None = None, correction: str | None = None) -> int:
        """Replace the rating, reason, comment and correction of feedback row `feedback_id` (a vote
        given earlier on `message_id`: the page saves the thumb at once and completes the same row
        when the form is sent); return `feedback_id`. The row keeps its time: when the vote was cast.

        LookupError when no such row belongs to `message_id`; ChatforgeError for bad values.
        """
        rating, reason, comment, correction = _vote(rating, reason, comment, correction)

        def work(db) -> int:
            cur = db.execute("UPDATE feedback SET rating=?, reason=?, comment=?, correction=? "
                             "WHERE id=? AND message_id=?",
                             (rating, reason, comment, correction, feedback_id, message_id))
            if cur.rowcount != 1:
                raise LookupError(f"no feedback {feedback_id} on reply {message_id!r} in {self.where}")
            return feedback_id

        return self.db.write(work)

    def add_ticket(self, conversation_id: str | None, message: str, reason: str, transcript: str = "[]") -> int:
        """Open a hand-off ticket (a person takes over); return its id. Texts are PII-scrubbed."""
        if conversation_id is not None and not isinstance(conversation_id, str):
            raise ChatforgeError("conversation_id must be a string or None")
        row = (conversation_id, _scrub(_text(message, "message")), _text(reason, "reason"),
               _scrub(_text(transcript, "transcript")), _now_iso(self._clock()))
        return self.db.write(lambda db: db.execute(
            "INSERT INTO tickets (conversation_id, message, reason, transcript, created_at) VALUES (?, ?, ?, ?, ?) "
            "RETURNING id", row).fetchall()[0][0])

    def tickets(self) -> list[dict]:
        """Every hand-off ticket, oldest first."""
        return [dict(r) for r in self.db.read("SELECT * FROM tickets ORDER BY id")]

    # ----------------------------------------------------------------------- reading

    def count_replies(self) -> int:
        """How many replies the server recorded."""
        return self.db.read("SELECT count(*) AS n FROM messages WHERE message_id IS NOT NULL")[0]["n"]

    def rated_replies(self) -> list[dict]:
        """Every reply with at least one feedback row, in the order given, with its latest rating
        and reason, its latest correction (or None), its question, its snapshot and whether the
        user stopped it (`stopped`, a bool)."""
        rows = self.db.read("""
            SELECT m.message_id, m.conversation_id, m.model, m.created_at, m.content AS reply,
                   m.prompt_messages, m.sources, m.stopped, q.content AS question, f.rating, f.reason,
                   (SELECT c.correction FROM feedback c WHERE c.message_id = m.message_id
                      AND c.correction IS NOT NULL ORDER BY c.id DESC LIMIT 1) AS correction
            FROM messages m
            JOIN messages q ON q.id = m.question_id
            JOIN feedback f ON f.id = (SELECT max(id) FROM feedback WHERE message_id = m.message_id)
            ORDER BY m.id""")
        out = []
        for r in rows:
            d = dict(r)
            d["prompt_messages"] = json.loads(d["prompt_messages"] or "[]")
            d["sources"] = json.loads(d["sources"] or "[]")
            d["stopped"] = bool(d["stopped"])
            out.append(d)
        return out

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "FeedbackStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- user satisfaction

def normalize_question(text: str) -> str:
    """The key that makes two questions "the same": case, spacing and trailing ?!. ignored."""
    return " ".join(text.casefold().split()).rstrip("?!. ")


def _share(up: int, rated: int) -> float | None:
    return round(up / rated, 4) if rated else None


def _row(up: int, down: int) -> dict:
    return {"rated": up + down, "up": up, "down": down, "satisfaction": _share(up, up + down)}


def document_of(source: str) -> str:
    """The DOC part of a source name "DOC > TITLE > SECTION"."""
    return source.split(" > ", 1)[0]


def satisfaction_stats(rated: Sequence[dict], replies: int | None = None, top: int = 10) -> dict:
    """User satisfaction from `FeedbackStore.rated_replies()` (see the module docstring).

    {"replies", "rated", "up", "down", "satisfaction", "reasons", "stopped": {"rated", "up", "down",
     "satisfaction"}, "per_day": [{"day", ...}], "per_document": [{"document", ...}],
     "most_down_voted": [{"question", "down", "up"}]}
    """
    def tally() -> Counter:
        return Counter(up=0, down=0)

    overall, stopped, reasons = tally(), tally(), Counter()
    days: dict[str, Counter] = defaultdict(tally)
    docs: dict[str | None, Counter] = defaultdict(tally)
    questions: dict[str, Counter] = defaultdict(tally)
    first_text: dict[str, str] = {}
    for r in rated:
        vote = r["rating"]
        overall[vote] += 1
        if r.get("stopped"):
            stopped[vote] += 1
        if vote == "down" and r["reason"]:
            reasons[r["reason"]] += 1
        days[r["created_at"][:10]][vote] += 1
        for doc in sorted({document_of(s["source"]) for s in r["sources"]}) or [None]:
            docs[doc][vote] += 1
        key = normalize_question(r["question"])
        first_text.setdefault(key, r["question"])
        questions[key][vote] += 1
    per_document = [{"document": d, **_row(c["up"], c["down"])} for d, c in docs.items()]
    per_document.sort(key=lambda x: (-x["down"], -x["rated"], x["document"] or ""))
    worst = sorted((k for k, c in questions.items() if c["down"]),
                   key=lambda k: (-questions[k]["down"], questions[k]["up"], k))
    return {
        "replies": replies if replies is not None else len(rated),
        **_row(overall["up"], overall["down"]),
        "reasons": {r: reasons[r] for r in REASONS if reasons[r]},
        "stopped": _row(stopped["up"], stopped["down"]),
        "per_day": [{"day": d, **_row(days[d]["up"], days[d]["down"])} for d in sorted(days)],
        "per_document": per_document,
        "most_down_voted": [{"question": first_text[k], "down": questions[k]["down"], "up": questions[k]["up"]}
                            for k in worst[:top]],
    }


def user_satisfaction(path: str | os.PathLike, top: int = 10) -> dict:
    """`satisfaction_stats` of the database file at `path` (which must exist)."""
    with FeedbackStore(path, create=False) as store:
        return satisfaction_stats(store.rated_replies(), store.count_replies(), top)


# --------------------------------------------------------------------------- training data

def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def _clean(messages: list[dict]) -> list[dict]:
    # Stored texts are scrubbed already; scrubbing again covers files written by hand or by an
    # older scrubber, and costs little.
    return [{"role": m["role"], "content": _scrub(m["content"])} for m in messages]


def training_examples(rated: Sequence[dict]) -> tuple[list[str], list[str], dict]:
    """(preference lines, SFT lines, counts) from `FeedbackStore.rated_replies()`: JSON lines,
    deduplicated and sorted (see the module docstring for what becomes a pair or an example)."""
    prefs: set[str] = set()
    sft: set[str] = set()
    counts = Counter(corrections=0, vote_pairs=0)

    def pair(prompt: list[dict], chosen: str, rejected: str) -> bool:
        if not prompt or chosen.strip() == rejected.strip():
            return False
        prefs.add(json.dumps({"prompt": _clean(prompt), "chosen": _assistant(_scrub(chosen)),
                              "rejected": _assistant(_scrub(rejected))}, ensure_ascii=False))
        return True

    by_question: dict[str, dict[str, list[dict]]] = defaultdict(lambda: {"up": [], "down": []})
    for r in rated:
        if not r["prompt_messages"]:
            continue   # nothing to condition on (not a chat reply)
        # A stopped reply is the start of an answer only: never taught as one, only as the worse.
        complete = not r.get("stopped")
        better = r["correction"] or (r["reply"] if r["rating"] == "up" and complete else None)
        if r["correction"]:
            counts["corrections"] += pair(r["prompt_messages"], r["correction"], r["reply"])
        if better is not None and better.strip():
            sft.add(json.dumps({"messages": _clean(r["prompt_messages"]) + _assistant(_scrub(better))},
                               ensure_ascii=False))
        if complete or r["rating"] == "down":
            by_question[normalize_question(r["question"])][r["rating"]].append(r)
    for group in by_question.values():
        for up in group["up"]:
            for down in group["down"]:
                counts["vote_pairs"] += pair(up["prompt_messages"], up["reply"], down["reply"])
    return sorted(prefs), sorted(sft), {**counts, "preferences": len(prefs), "sft": len(sft)}


def kto_rows(rated: Sequence[dict]) -> tuple[list[str], dict]:
    """(KTO lines, counts) from `FeedbackStore.rated_replies()`: JSON lines, deduplicated and
    sorted; every rated reply with its label, and every correction as a desirable reply."""
    lines: set[str] = set()
    counts = Counter(desirable=0, undesirable=0)

    def row(prompt: list[dict], completion: str, label: bool) -> None:
        if completion.strip():
            lines.add(json.dumps({"prompt": _clean(prompt), "completion": _assistant(_scrub(completion)),
                                  "label": label}, ensure_ascii=False))

    for r in rated:
        if not r["prompt_messages"]:
            continue   # nothing to condition on (not a chat reply)
        if r["rating"] == "down":
            row(r["prompt_messages"], r["reply"], False)
        elif not r.get("stopped"):   # a stopped reply is only the start of an answer: never desirable
            row(r["prompt_messages"], r["reply"], True)
        if r["correction"]:
            row(r["prompt_messages"], r["correction"], True)
    for line in lines:
        counts["desirable" if json.loads(line)["label"] else "undesirable"] += 1
    return sorted(lines), dict(counts)


def export_training_data(store: FeedbackStore, out_dir: str | os.PathLike) -> dict:
    """Write `preferences.jsonl`, `sft.jsonl` and `kto.jsonl` into `out_dir`; return the counts.

    Everything is computed before anything is written, and the files are replaced atomically.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ChatforgeError(f"{out_dir} is a file; --out needs a folder")
    rated = store.rated_replies()
    prefs, sft, counts = training_examples(rated)
    kto, kto_counts = kto_rows(rated)
    counts.update(kto=len(kto), kto_desirable=kto_counts["desirable"], kto_undesirable=kto_counts["undesirable"])
    try:
        # The files are written to temporary names first and renamed only once all are complete.
        with files.atomic_open(out_dir / "preferences.jsonl") as f_prefs, \
                files.atomic_open(out_dir / "sft.jsonl") as f_sft, files.atomic_open(out_dir / "kto.jsonl") as f_kto:
            f_prefs.writelines(line + "\n" for line in prefs)
            f_sft.writelines(line + "\n" for line in sft)
            f_kto.writelines(line + "\n" for line in kto)
    except OSError as e:
        raise ChatforgeError(f"cannot write into {out_dir}: {e.strerror or e}") from None
    return counts
