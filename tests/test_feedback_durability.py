"""The feedback store under load, on both backends (a SQLite file, a real PostgreSQL server):
32 concurrent clients on one server; two `chatforge serve` processes writing to one database,
one of them SIGKILLed mid-load. Afterwards every acknowledged reply and vote is stored, once.

    .venv/bin/pytest -q tests/test_feedback_durability.py
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from _serve_fixtures import serve, start_serve_process
from _tiny_chat_model import CONVERSATIONS, train_tiny_chat_model

from chatforge.data.feedback import FeedbackStore

pytestmark = pytest.mark.e2e
QUESTIONS = [q for q, _ in CONVERSATIONS]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return train_tiny_chat_model(tmp_path_factory.mktemp("durability") / "model")


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request, tmp_path):
    """The database: a SQLite file, or a new PostgreSQL database (skipped, saying why, where no
    PostgreSQL server can be started)."""
    if request.param == "sqlite":
        return str(tmp_path / "feedback.sqlite")
    return request.getfixturevalue("pg_url")


def stored(target: str) -> dict:
    """What the database holds, read through a fresh store."""
    with FeedbackStore(target, create=False) as s:
        return {"feedback": s.db.read("SELECT id, message_id, comment FROM feedback"),
                "replies": [r["message_id"] for r in s.db.read("SELECT message_id FROM messages "
                                                               "WHERE message_id IS NOT NULL")]}


def check(target: str, acked_replies: list[str], acked_votes: list[tuple[int, str]], in_flight: int = 0) -> None:
    """Every acknowledged reply and vote is stored exactly once; at most `in_flight` rows more
    (committed by a server that died before it could answer)."""
    db = stored(target)
    assert len(db["replies"]) == len(set(db["replies"]))
    assert set(acked_replies) <= set(db["replies"])
    by_id = {r["id"]: r for r in db["feedback"]}
    assert len(acked_votes) == len({fid for fid, _ in acked_votes})        # ids never handed out twice
    for fid, comment in acked_votes:
        assert by_id[fid]["comment"] == comment                          # the row acknowledged is that vote
    comments = [r["comment"] for r in db["feedback"]]
    assert len(comments) == len(set(comments))                          # no vote stored twice
    assert len(db["feedback"]) - len(acked_votes) <= in_flight
    assert len(db["replies"]) - len(acked_replies) <= in_flight


def test_32_concurrent_clients_on_one_server(model_dir, target):
    running = serve(model_dir, db=target, max_batch=8, max_queue=64)
    acked_replies: list[str] = []
    acked_votes: list[tuple[int, str]] = []
    lock = threading.Lock()

    def user(i: int) -> None:
        with httpx.Client(base_url=running.url, timeout=120) as http:
            for turn in range(3):
                r = http.post("/v1/chat/completions", json={
                    "model": "tiny", "max_tokens": 12, "temperature": 0,
                    "messages": [{"role": "user", "content": QUESTIONS[(i + turn) % len(QUESTIONS)]}]})
                assert r.status_code == 200, r.text
                comment = f"user {i} turn {turn}"
                f = http.post("/v1/feedback", json={"message_id": r.json()["id"], "rating": "up" if i % 2 else "down",
                                                    "comment": comment})
                assert f.status_code == 200, f.text
                with lock:
                    acked_replies.append(r.json()["id"])
                    acked_votes.append((f.json()["id"], comment))

    try:
        with ThreadPoolExecutor(32) as pool:
            list(pool.map(user, range(32)))
    finally:
        running.stop()
    assert len(acked_votes) == 96
    check(target, acked_replies, acked_votes)


# ------------------------------------------------------------ two servers, one of them killed

def _start(model_dir, target: str) -> tuple[subprocess.Popen, str]:
    return start_serve_process(model_dir, target)


def test_two_servers_on_one_database_one_killed_mid_load(model_dir, target):
    """16 clients on each of two `chatforge serve` processes sharing the database; server A is
    SIGKILLed while its clients are writing, server B's clients go on. Every reply and vote either
    server acknowledged is stored once; B kept storing after A died."""
    (a, url_a), (b, url_b) = _start(model_dir, target), _start(model_dir, target)
    acked_replies: list[str] = []
    acked_votes: list[tuple[int, str]] = []
    per_server = {url_a: 0, url_b: 0}
    lock = threading.Lock()
    stop = threading.Event()
    errors: list[str] = []

    def user(i: int, url: str) -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            turn = 0
            while not stop.is_set():
                turn += 1
                comment = f"user {i} turn {turn}"
                try:
                    r = http.post("/v1/chat/completions", json={
                        "model": "tiny", "max_tokens": 8, "temperature": 0, "conversation_id": f"conv-{i}",
                        "messages": [{"role": "user", "content": QUESTIONS[(i + turn) % len(QUESTIONS)]}]})
                    if r.status_code != 200:
                        raise AssertionError(r.text)
                    with lock:
                        acked_replies.append(r.json()["id"])
                    f = http.post("/v1/feedback", json={"message_id": r.json()["id"], "rating": "up",
                                                        "comment": comment})
                    if f.status_code != 200:
                        raise AssertionError(f.text)
                    with lock:
                        acked_votes.append((f.json()["id"], comment))
                        per_server[url] += 1
                except httpx.TransportError:
                    return                                   # this client's server is gone
                except AssertionError as e:
                    errors.append(f"client {i}: {e}")
                    return

    threads = [threading.Thread(target=user, args=(i, url_a if i < 16 else url_b)) for i in range(32)]
    try:
        for t in threads:
            t.start()
        deadline = time.time() + 180

        def wait_for(what, condition):
            while not condition():
                assert time.time() < deadline, f"timed out waiting for {what}: {per_server}"
                assert b.poll() is None, b.stdout.read().decode()
                assert not errors, errors
                time.sleep(0.02)

        wait_for("40 votes on each server", lambda: min(per_server.values()) >= 40)
        a.send_signal(signal.SIGKILL)                        # mid-way through its clients' writes
        a.wait(10)
        after_kill = per_server[url_b]
        wait_for("40 more votes on the surviving server", lambda: per_server[url_b] >= after_kill + 40)
        stop.set()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
    finally:
        stop.set()
        for proc in (a, b):
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
    assert a.returncode == -signal.SIGKILL
    assert not errors, errors
    # Up to one reply and one vote per client of A may have been committed without an answer.
    check(target, acked_replies, acked_votes, in_flight=16)


def test_postgresql_down_then_back(model_dir, pg_cluster, pg_url):
    """PostgreSQL stops under a running server: a vote gets 503 `db_unavailable` (saying nothing of
    where the database is) and the server keeps answering; once PostgreSQL is back, votes are
    stored again without restarting chatforge."""
    running = serve(model_dir, db=pg_url)
    ask = {"model": "tiny", "max_tokens": 8, "temperature": 0, "messages": [{"role": "user", "content": QUESTIONS[0]}]}
    try:
        with httpx.Client(base_url=running.url, timeout=60) as http:
            first = http.post("/v1/chat/completions", json=ask).json()["id"]
            assert http.post("/v1/feedback", json={"message_id": first, "rating": "up"}).status_code == 200
            pg_cluster.down()
            try:
                r = http.post("/v1/feedback", json={"message_id": first, "rating": "down", "comment": "lost"})
                assert r.status_code == 503, r.text
                err = r.json()["error"]
                assert err["code"] == "db_unavailable" and "try again" in err["message"]
                assert pg_cluster.socket.name not in r.text and "postgresql" not in r.text.lower()
                assert http.get("/health").status_code == 200
            finally:
                pg_cluster.up()
            r = http.post("/v1/feedback", json={"message_id": first, "rating": "down", "comment": "after"})
            assert r.status_code == 200, r.text
            second = http.post("/v1/chat/completions", json=ask).json()["id"]
            assert http.post("/v1/feedback", json={"message_id": second, "rating": "up"}).status_code == 200
    finally:
        running.stop()
    db = stored(pg_url)
    assert sorted(r["comment"] or "" for r in db["feedback"]) == ["", "", "after"]
    assert sorted(db["replies"]) == sorted([first, second])
