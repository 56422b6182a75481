"""`chatforge serve`: a real uvicorn server on loopback with the tiny chat model, driven by the
official `openai` client and by raw HTTP: completions (streamed and not), retrieval sources,
feedback into a real SQLite file, errors in OpenAI's shape with the right status, the API key,
metrics, a client that disconnects, concurrent load, and generated inputs from the OpenAPI schema."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings

from chatforge.infer.prompting import SystemPrompt

from _serve_fixtures import serve, start_serve_process, write_docs
from _tiny_chat_model import CONVERSATIONS, EMAIL, train_tiny_chat_model

QUESTION = "How do I reset my password?"
ANSWER = dict(CONVERSATIONS)[QUESTION]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return train_tiny_chat_model(tmp_path_factory.mktemp("serve") / "model")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    running = serve(model_dir, db=tmp_path_factory.mktemp("db") / "feedback.sqlite", app_kw={"api_docs": True})
    yield running
    running.stop()


@pytest.fixture(scope="module")
def grounded(model_dir, tmp_path_factory):
    docs = write_docs(tmp_path_factory.mktemp("docs") / "docs")
    # A short system prompt: the tiny model's 256-token context has little room for passages.
    running = serve(model_dir, db=tmp_path_factory.mktemp("db") / "feedback.sqlite", docs=docs,
                    system=SystemPrompt("Answer from the context."))
    yield running
    running.stop()


def client(running, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=running.url + "/v1", api_key=key, max_retries=0, timeout=60)


def ask(question: str = QUESTION, **kw) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": question}], "temperature": 0, **kw}


# ------------------------------------------------------------------------------ the openai client

def test_openai_client_chat_and_stream(server):
    c = client(server)
    reply = c.chat.completions.create(**ask(max_tokens=40))
    assert reply.choices[0].message.content == ANSWER
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens > 0 and reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.model_extra["sources"] == [] and reply.model_extra["conversation_id"].startswith("conv-")

    chunks = list(c.chat.completions.create(**ask(max_tokens=40), stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == ANSWER
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    assert len({ch.id for ch in chunks}) == 1


def test_openai_client_text_completion_and_models(server, model_dir):
    from chatforge.infer.engine import Engine, GenerationConfig
    from chatforge.model.folder import load_model

    c = client(server)
    assert [m.id for m in c.models.list()] == ["tiny"]
    prompt = "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    done = c.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    # A text prompt is plain text (its special-token strings stay characters), which the tiny chat
    # model never saw: the reply is its greedy continuation of those ids, whatever that says.
    model, tok = load_model(model_dir)
    engine = Engine(model, tok, stop_ids=[tok.eot_id, tok.im_end_id, tok.im_start_id], dtype="float32")
    (alone,) = engine.generate([tok.encode(prompt)], GenerationConfig(max_new_tokens=12))
    assert done.choices[0].text == alone.text and alone.text
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="tiny", prompt="<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n",
        max_tokens=12, temperature=0, stream=True) if ch.choices)
    assert streamed == done.choices[0].text


def test_replies_are_pii_scrubbed_and_stop_strings_cut(server):
    c = client(server)
    reply = c.chat.completions.create(**ask("How do I contact support?", max_tokens=40)).choices[0].message.content
    assert EMAIL not in reply and reply.startswith("Write to")
    cut = c.chat.completions.create(**ask(max_tokens=40, stop=["sign-in"]))
    assert cut.choices[0].message.content == ANSWER[:ANSWER.index("sign-in")]
    assert cut.choices[0].finish_reason == "stop"
    short = c.chat.completions.create(**ask(max_tokens=3))
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3


def test_seeded_sampling_is_reproducible(server):
    c = client(server)
    kw = dict(max_tokens=20, temperature=1.5, top_p=0.95, seed=7)
    a = c.chat.completions.create(**{**ask(), **kw}).choices[0].message.content
    b = c.chat.completions.create(**{**ask(), **kw}).choices[0].message.content
    assert a == b


def test_grounded_answers_carry_their_sources(grounded):
    reply = client(grounded).chat.completions.create(**ask("How do I reset my password?", max_tokens=8))
    sources = reply.model_extra["sources"]
    assert sources and sources[0]["source"].startswith("docs/account.md")
    assert "Forgot password" in sources[0]["text"]
    chunks = list(client(grounded).chat.completions.create(**ask("When are refunds paid?", max_tokens=4), stream=True))
    assert chunks[0].model_extra["sources"][0]["source"].startswith("docs/billing.md")


def test_the_refusal_bias_reaches_grounded_decoding(grounded, monkeypatch):
    """`serve` hands the answer settings' refusal bias and loop guard to a grounded reply's generation."""
    submitted = []
    real = grounded.assistant.scheduler.submit

    def spy(ids, cfg=None, on_event=None):
        submitted.append(cfg)
        return real(ids, cfg, on_event)
    monkeypatch.setattr(grounded.assistant.scheduler, "submit", spy)
    monkeypatch.setattr(grounded.assistant, "refusal_bias", ((5, -0.75),))
    monkeypatch.setattr(grounded.assistant, "reply_ngram", 24)
    client(grounded).chat.completions.create(**ask("How do I reset my password?", max_tokens=4))
    assert submitted and submitted[-1].first_token_bias == ((5, -0.75),)
    # The answer settings' loop guard too, and the citation may only spell a passage it was given.
    assert submitted[-1].reply_no_repeat_ngram_size == 24
    assert submitted[-1].cite_names and all(n.startswith("docs/") for n in submitted[-1].cite_names)


# ------------------------------------------------------------------------------------ feedback

def test_feedback_is_stored_with_a_snapshot(grounded):
    c = client(grounded)
    reply = c.chat.completions.create(**ask("When are refunds paid?", max_tokens=8))
    conv = reply.model_extra["conversation_id"]
    follow = c.chat.completions.create(
        model="tiny", max_tokens=8, temperature=0, extra_body={"conversation_id": conv},
        messages=[{"role": "user", "content": "When are refunds paid?"},
                  {"role": "assistant", "content": reply.choices[0].message.content},
                  {"role": "user", "content": "And invoices?"}])
    assert follow.model_extra["conversation_id"] == conv
    r = httpx.post(grounded.url + "/v1/feedback", json={
        "message_id": follow.id, "rating": "down", "reason": "not_in_documents", "comment": "call me at +1 415 555 0100",
        "correction": "Invoices are sent by e-mail on the first day of each month."})
    assert r.status_code == 200 and r.json()["status"] == "stored"
    db = sqlite3.connect(grounded.assistant.store.path)
    rows = db.execute("SELECT rating, reason, comment, correction FROM feedback WHERE id = ?", (r.json()["id"],)).fetchall()
    assert rows[0][:2] == ("down", "not_in_documents")
    assert "555 0100" not in rows[0][2] and rows[0][3].startswith("Invoices are sent")
    prompt, sources = db.execute("SELECT prompt, sources FROM messages WHERE message_id = ?", (follow.id,)).fetchone()
    assert "And invoices?" in prompt and "Invoices are sent" in prompt
    assert json.loads(sources)[0]["source"].startswith("docs/billing.md")


def test_a_vote_is_completed_in_its_own_row(grounded):
    """The page saves a thumb at once, then sends the form's fields with the row's id."""
    reply = client(grounded).chat.completions.create(**ask("When are refunds paid?", max_tokens=8))
    first = httpx.post(grounded.url + "/v1/feedback", json={"message_id": reply.id, "rating": "up"})
    assert first.status_code == 200
    vote = first.json()["id"]
    more = httpx.post(grounded.url + "/v1/feedback", json={
        "message_id": reply.id, "rating": "down", "reason": "inaccurate", "feedback_id": vote,
        "correction": "Refunds are paid back to the card within five working days."})
    assert more.status_code == 200 and more.json()["id"] == vote
    other = httpx.post(grounded.url + "/v1/feedback", json={"message_id": "chatcmpl-other", "rating": "up",
                                                            "feedback_id": vote})
    assert other.status_code == 404 and other.json()["error"]["param"] == "feedback_id"
    db = sqlite3.connect(grounded.assistant.store.path)
    assert db.execute("SELECT id, rating, reason, correction FROM feedback WHERE message_id = ?", (reply.id,)).fetchall() \
        == [(vote, "down", "inaccurate", "Refunds are paid back to the card within five working days.")]


def test_the_message_length_limit_is_told_and_kept(server):
    limit = httpx.get(server.url + "/health").json()["max_message_chars"]
    assert limit == server.assistant.max_message_chars
    r = httpx.post(server.url + "/v1/chat/completions", json=ask("x" * (limit + 1)))
    assert r.status_code == 400 and r.json()["error"]["code"] == "message_too_long"
    assert r.json()["error"]["param"] == "messages[0].content"


@pytest.mark.parametrize("body, status", [
    ({"message_id": "chatcmpl-unknown", "rating": "up"}, 404),
    ({"message_id": "x", "rating": "meh"}, 422),
    ({"message_id": "x", "rating": "up", "reason": "because"}, 422),
    ({"rating": "up"}, 422),
    ({"message_id": "x", "rating": "up", "correction": "x" * 9000}, 422),
])
def test_bad_feedback_is_refused(server, body, status):
    r = httpx.post(server.url + "/v1/feedback", json=body)
    assert r.status_code == status and r.json()["error"]["message"]


# -------------------------------------------------------------------------------------- errors

def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert "Traceback" not in r.text and "/work" not in r.text and ".py" not in r.text
    return err


@pytest.mark.parametrize("body, status, param", [
    ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}, {"role": "user", "content": "hi"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 5}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"messages": [{"role": "user", "content": "hi"}], "frequency_penalty": -3}, 400, "frequency_penalty"),
    ({"messages": [{"role": "user", "content": "word " * 400}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages[0].content"),
    ({"messages": "hello"}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4"}, 404, "model"),
])
def test_bad_requests_get_openai_errors(server, body, status, param):
    err = _error(httpx.post(server.url + "/v1/chat/completions", json=body), status)
    assert err["param"] == param


def test_transport_level_errors(server):
    url = server.url + "/v1/chat/completions"
    assert _error(httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}), 400)
    assert _error(httpx.post(url, content=b"x" * (2 << 20), headers={"content-type": "application/json"}), 413)
    assert _error(httpx.get(server.url + "/v1/nothing"), 404)
    assert _error(httpx.get(url), 405)
    assert _error(httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "echo": True}), 400)
    too_long = {"prompt": "word " * 400}
    assert _error(httpx.post(server.url + "/v1/completions", json=too_long), 400)["code"] == "context_length_exceeded"


def test_api_key(model_dir):
    running = serve(model_dir, api_key="s3cret")
    try:
        url = running.url + "/v1/chat/completions"
        assert _error(httpx.post(url, json=ask()), 401)["code"] == "invalid_api_key"
        assert _error(httpx.post(url, json=ask(), headers={"Authorization": "Bearer wrong"}), 401)
        with pytest.raises(openai.AuthenticationError):
            client(running, "wrong").chat.completions.create(**ask(max_tokens=5))
        assert client(running, "s3cret").chat.completions.create(**ask(max_tokens=40)).choices[0].message.content == ANSWER
        health = httpx.get(running.url + "/health").json()
        assert health["auth"] is True and "s3cret" not in json.dumps(health)
        assert httpx.get(running.url + "/").status_code == 200            # the page itself is open
    finally:
        running.stop()


def test_full_queue_gets_429_and_shutdown_503(model_dir):
    running = serve(model_dir, max_batch=1, max_queue=0)
    slow = running.assistant.scheduler.engine
    real = slow.forward

    def crawl(*a, **kw):            # a model this small answers too fast to fill any queue
        time.sleep(0.05)
        return real(*a, **kw)

    slow.forward = crawl
    try:
        with ThreadPoolExecutor(4) as pool:
            statuses = list(pool.map(lambda _: httpx.post(running.url + "/v1/chat/completions", timeout=60,
                                                          json=ask(max_tokens=30)).status_code, range(4)))
        assert 200 in statuses and 429 in statuses and set(statuses) <= {200, 429}
        running.app.state.stopping = True
        assert _error(httpx.post(running.url + "/v1/chat/completions", json=ask()), 503)["code"] == "shutting_down"
    finally:
        slow.forward = real
        running.app.state.stopping = False
        running.stop()


def test_a_client_that_disconnects_frees_its_slot(model_dir):
    running = serve(model_dir)
    scheduler = running.assistant.scheduler
    real = scheduler.engine.forward

    def crawl(*a, **kw):
        time.sleep(0.02)
        return real(*a, **kw)

    scheduler.engine.forward = crawl
    try:
        body = {"prompt": "free plan storage support " * 3, "max_tokens": 200, "temperature": 1.0, "stream": True}
        with httpx.stream("POST", running.url + "/v1/completions", json=body, timeout=30) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break                     # one piece read, then hang up
        deadline = time.time() + 5
        while scheduler.running and time.time() < deadline:
            time.sleep(0.05)
        assert not scheduler.running
        steps = scheduler.steps
        time.sleep(0.3)
        assert scheduler.steps == steps       # nothing is generated for nobody
    finally:
        scheduler.engine.forward = real
        running.stop()


def test_metrics(server):
    client(server).chat.completions.create(**ask(max_tokens=40))
    text = httpx.get(server.url + "/metrics").text
    for name in ("chatforge_requests_total{", "chatforge_prompt_tokens_total", "chatforge_completion_tokens_total",
                 "chatforge_time_to_first_token_seconds_count", "chatforge_queue_length", "chatforge_running_requests"):
        assert name in text
    served = [line for line in text.splitlines() if line.startswith('chatforge_requests_total{path="/v1/chat/completions",status="200"}')]
    assert served and float(served[0].split()[-1]) >= 1


# ----------------------------------------------------------------------------------------- load

@pytest.mark.e2e
def test_32_concurrent_clients_lose_nothing(grounded):
    """32 clients chat (streamed and not) and rate every reply: no 5xx, every acknowledged
    feedback row is in the database, and the greedy replies equal the one asked alone."""
    questions = [q for q, _ in CONVERSATIONS] + ["When are refunds paid?", "How do I reset my password?"]
    alone = {q: client(grounded).chat.completions.create(**ask(q, max_tokens=24)).choices[0].message.content
             for q in questions}
    acknowledged, statuses, mismatched = [], [], []
    lock = threading.Lock()

    def user(i: int) -> None:
        with httpx.Client(base_url=grounded.url, timeout=120) as http:
            for j in range(3):
                q = questions[(i + j) % len(questions)]
                if (i + j) % 2:
                    r = http.post("/v1/chat/completions", json=ask(q, max_tokens=24))
                    rid, text = r.json().get("id"), r.json().get("choices", [{}])[0].get("message", {}).get("content")
                else:
                    parts, rid = [], None
                    with http.stream("POST", "/v1/chat/completions", json=ask(q, max_tokens=24, stream=True)) as r:
                        for line in r.iter_lines():
                            if line.startswith("data: {"):
                                chunk = json.loads(line[6:])
                                rid = chunk["id"]
                                parts += [c["delta"].get("content") or "" for c in chunk["choices"]]
                    text = "".join(parts)
                f = http.post("/v1/feedback", json={"message_id": rid, "rating": "up" if j else "down",
                                                    "correction": f"client {i} turn {j}" if not j else None})
                with lock:
                    statuses.extend([r.status_code, f.status_code])
                    if text != alone[q]:
                        mismatched.append((q, text))
                    if f.status_code == 200:
                        acknowledged.append(f.json()["id"])

    before = sqlite3.connect(grounded.assistant.store.path).execute("SELECT COUNT(*) FROM feedback").fetchone()[0]
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(user, range(32)))
    assert set(statuses) == {200}
    assert not mismatched
    db = sqlite3.connect(grounded.assistant.store.path)
    assert db.execute("SELECT COUNT(*) FROM feedback").fetchone()[0] - before == len(acknowledged) == 96
    stored = {row[0] for row in db.execute("SELECT id FROM feedback")}
    assert set(acknowledged) <= stored


@pytest.mark.e2e
def test_generated_requests_never_get_a_5xx(server):
    """schemathesis reads the app's OpenAPI schema and generates bodies, valid and not, for every
    operation. (Its pytest plugin does not run under pytest 9, so the strategies are driven here.)"""
    schema = schemathesis.openapi.from_asgi("/openapi.json", server.app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/feedback"}
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            response = case.call()
            assert response.status_code < 500, (case.method, case.path, case.body, response.text[:300])
            if response.status_code >= 400:
                assert set(response.json()["error"]) == {"message", "type", "param", "code"}

        check()


def _start_cli_server(model_dir, db):
    return start_serve_process(model_dir, db)


@pytest.mark.e2e
def test_sighup_reloads_the_model_folder(model_dir, tmp_path):
    import signal

    proc, url = _start_cli_server(model_dir, tmp_path / "feedback.sqlite")
    try:
        proc.send_signal(signal.SIGHUP)
        line = proc.stdout.readline().decode()
        while line and not line.startswith("chatforge serve: reload"):
            line = proc.stdout.readline().decode()
        assert line.startswith("chatforge serve: reloaded"), line
        r = httpx.post(url + "/v1/chat/completions", json=ask(max_tokens=40), timeout=30)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == ANSWER
    finally:
        proc.kill()
        proc.wait(10)


@pytest.mark.e2e
def test_a_killed_server_loses_no_acknowledged_feedback(model_dir, tmp_path):
    """`chatforge serve` as its own process under load, SIGKILLed mid-way: every feedback row
    it acknowledged is in the database afterwards."""
    db = tmp_path / "feedback.sqlite"
    proc, url = _start_cli_server(model_dir, db)
    try:
        acknowledged: list[int] = []
        lock = threading.Lock()
        stop = threading.Event()

        def user(i: int) -> None:
            with httpx.Client(base_url=url, timeout=30) as http:
                while not stop.is_set():
                    try:
                        r = http.post("/v1/chat/completions", json=ask(max_tokens=12))
                        assert r.status_code == 200, r.text
                        f = http.post("/v1/feedback", json={"message_id": r.json()["id"], "rating": "up",
                                                            "comment": f"user {i}"})
                        if f.status_code == 200:
                            with lock:
                                acknowledged.append(f.json()["id"])
                    except (httpx.TransportError, KeyError, ValueError):
                        return                                   # the server is gone

        threads = [threading.Thread(target=user, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        deadline = time.time() + 120
        while len(acknowledged) < 40 and proc.poll() is None and any(t.is_alive() for t in threads):
            assert time.time() < deadline, f"only {len(acknowledged)} feedback rows acknowledged in 120 s"
            time.sleep(0.02)
        proc.kill()                                              # SIGKILL
        proc.wait(10)
        stop.set()
        for t in threads:
            t.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    stored = {row[0] for row in sqlite3.connect(db).execute("SELECT id FROM feedback")}
    assert len(acknowledged) >= 40
    assert set(acknowledged) <= stored


def test_server_defaults_fill_what_a_request_leaves_out(server):
    """`--temperature` / `--repetition-penalty` apply only when a request does not say."""
    from dataclasses import replace

    from chatforge.serve import openai_api as oa
    from chatforge.serve.app import _generation

    assistant = replace(server.assistant, default_temperature=0.0, default_repetition_penalty=1.1)
    bare = oa.ChatRequest(messages=[{"role": "user", "content": "hi"}])
    cfg = _generation(bare, None, assistant)
    assert cfg.greedy and cfg.repetition_penalty == 1.1 and cfg.max_new_tokens == assistant.default_max_tokens
    own = oa.ChatRequest(messages=[{"role": "user", "content": "hi"}], temperature=0.7, repetition_penalty=1.0)
    cfg = _generation(own, 12, assistant)
    assert not cfg.greedy and cfg.temperature == 0.7 and cfg.repetition_penalty == 1.0 and cfg.max_new_tokens == 12
    reply = client(server).chat.completions.create(**ask(max_tokens=40), extra_body={"repetition_penalty": 1.0})
    assert reply.choices[0].message.content == ANSWER
    assert _error(httpx.post(server.url + "/v1/chat/completions", json=ask(repetition_penalty=0)), 400)["param"] \
        == "repetition_penalty"


def test_reload_serves_a_new_model_without_dropping_a_request(model_dir, tmp_path):
    import shutil

    from chatforge.model.folder import load_model, save_model

    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    running = serve(folder, api_key="k", reloadable=True, app_kw={"admin_key": "admin"})
    auth = {"Authorization": "Bearer k"}
    admin = {"Authorization": "Bearer admin"}
    try:
        before = httpx.post(running.url + "/v1/chat/completions", json=ask(max_tokens=40), headers=auth).json()
        old = running.assistant.scheduler
        real = old.engine.forward

        def crawl(*a, **kw):                        # keep a request running across the swap
            time.sleep(0.03)
            return real(*a, **kw)

        old.engine.forward = crawl
        old_model = weakref.ref(old.engine.model)
        streamed: dict = {}

        def long_request():
            body = ask(max_tokens=60, stream=True)
            body["messages"][0]["content"] = "What does the free plan include?"
            with httpx.stream("POST", running.url + "/v1/chat/completions", json=body, headers=auth, timeout=60) as r:
                streamed["status"] = r.status_code
                streamed["lines"] = [line for line in r.iter_lines() if line.startswith("data: ")]

        t = threading.Thread(target=long_request)
        t.start()
        deadline = time.time() + 10
        while not old.running and time.time() < deadline:
            time.sleep(0.01)
        assert old.running                           # the request is being generated
        # The next training round writes a different model into the folder.
        model, tok = load_model(folder)
        with torch.no_grad():
            model.lm_head.weight.mul_(-1.0)
        save_model(folder, model, tok)
        assert _error(httpx.post(running.url + "/admin/reload"), 401)
        assert _error(httpx.post(running.url + "/admin/reload", headers=auth), 401)     # a chat key is not enough
        r = httpx.post(running.url + "/admin/reload", headers=admin, timeout=60)
        assert r.status_code == 200 and r.json()["status"] == "reloaded"
        assert running.assistant.scheduler is not old
        t.join(60)
        assert streamed["status"] == 200 and streamed["lines"][-1] == "data: [DONE]"
        real = crawl = None                          # the test's own hold on the old engine
        deadline = time.time() + 10                  # once drained, the old model is freed
        while old_model() is not None and time.time() < deadline:
            time.sleep(0.05)
        assert old_model() is None and old.cache.allocated_bytes == 0
        assert any('"finish_reason": "stop"' in line or '"finish_reason": "length"' in line for line in streamed["lines"])
        after = httpx.post(running.url + "/v1/chat/completions", json=ask(max_tokens=40), headers=auth).json()
        assert after["choices"][0]["message"]["content"] != before["choices"][0]["message"]["content"]
        assert "chatforge_model_reloads_total 1.0" in httpx.get(running.url + "/metrics").text
    finally:
        running.stop()


def test_reload_needs_an_api_key(server):
    assert _error(httpx.post(server.url + "/admin/reload"), 403)["code"] == "admin_disabled"
