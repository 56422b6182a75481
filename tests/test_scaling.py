"""docs/SCALING.md, replicas behind a load balancer: two `chatforge serve --upstream ENGINE --db
postgresql://...` processes in front of one engine, a round-robin client in place of the load
balancer. No stickiness is needed: a conversation's second turn and a vote for a reply may land on
the other replica, and `chatforge feedback stats --db URL` sees every row from both.

The engine is chatforge's own server (any OpenAI-compatible one would do; tests/test_upstream.py
runs llama-server and vLLM there). PostgreSQL is a throw-away cluster (tests/_postgres.py),
skipped saying why where none can start.

    .venv/bin/pytest -q tests/test_scaling.py
"""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest
from _serve_fixtures import serve, start_serve_process
from _tiny_chat_model import CONVERSATIONS, train_tiny_chat_model

from chatforge.data.feedback import FeedbackStore

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def replica(model_dir, upstream: str, db: str) -> tuple[subprocess.Popen, str]:
    """`python -m chatforge serve --upstream UPSTREAM --db DB` on a free port, once /health answers."""
    return start_serve_process(model_dir, db, extra=("--upstream", upstream))


def test_replicas_share_postgresql_behind_round_robin(tmp_path, pg_url):
    model_dir = train_tiny_chat_model(tmp_path / "model")
    engine = serve(model_dir)                              # the engine both replicas send to
    replicas = []
    try:
        replicas = [replica(model_dir, engine.url, pg_url) for _ in range(2)]
        urls = [url for _, url in replicas]
        turn = 0

        def balanced() -> str:                             # the load balancer: round robin
            nonlocal turn
            turn += 1
            return urls[turn % 2]

        ids, conversations = [], set()
        with httpx.Client(timeout=60) as http:
            for i, (question, answer) in enumerate(CONVERSATIONS[:3]):
                messages = [{"role": "user", "content": question}]
                conv = None
                for _ in range(2):                         # the second turn goes to the other replica
                    r = http.post(balanced() + "/v1/chat/completions", json={
                        "model": "tiny", "messages": messages, "max_tokens": 24, "temperature": 0,
                        **({"conversation_id": conv} if conv else {})})
                    assert r.status_code == 200, r.text
                    body = r.json()
                    conv = body["conversation_id"]
                    ids.append(body["id"])
                    messages += [{"role": "assistant", "content": body["choices"][0]["message"]["content"]},
                                 {"role": "user", "content": "thanks"}]
                conversations.add(conv)
                # The vote for a reply lands on whichever replica is next: the shared database has it.
                v = http.post(balanced() + "/v1/feedback", json={"message_id": ids[-2], "rating": "down" if i else "up",
                                                                 "reason": "inaccurate" if i else None})
                assert v.status_code == 200, v.text
        with FeedbackStore(pg_url, create=False) as store:
            rows = store.db.read("SELECT message_id, conversation_id FROM messages WHERE message_id IS NOT NULL")
        assert sorted(r["message_id"] for r in rows) == sorted(ids)
        assert {r["conversation_id"] for r in rows} == conversations and len(conversations) == 3
        stats = subprocess.run([sys.executable, "-m", "chatforge", "feedback", "stats", "--db", pg_url, "--json"],
                               capture_output=True, text=True, timeout=120, check=False)
        assert stats.returncode == 0, stats.stderr
        figures = json.loads(stats.stdout)
        assert (figures["replies"], figures["up"], figures["down"]) == (6, 1, 2)
        assert figures["reasons"] == {"inaccurate": 2}
    finally:
        for proc, _ in replicas:
            proc.terminate()
            proc.wait(15)
        engine.stop()
