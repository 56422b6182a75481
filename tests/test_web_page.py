"""The web chat page (`serve/static/`) in a real browser: Debian's chromium, driven by Playwright,
against a real `python -m chatforge serve` subprocess with the tiny chat model and two small
documents.

The tiny model is trained on the grounded prompts this server builds, so its replies are known:
a plain answer, the documentation's refusal (NOT_FOUND_REPLY) and a Markdown answer that holds
`<img onerror>` and `<script>`.

Covered: a question whose reply streams in with its sources; one click on a thumb stores the vote,
and the form then completes that same row (reason, comment, corrected answer), all read back from
the server's SQLite file; the copy button; the conversation and its votes after a reload; a
refusal listing no sources; a Markdown answer drawn as lists and code with its HTML shown as
text (and a crafted stream injected with `page.route` for headings, fences, links and hostile
sources); the message length counter at the server's limit; a reply stopped mid-stream (the
server held at a decode step) still taking a vote, stored as stopped; server and network errors
shown to the user; the API key field, the 401 message and a reply once the key is given.

CHATFORGE_SCREENSHOT=1 also saves the page to docs/images/chat_page.png (otherwise only to the
test's temporary folder, so that a test run leaves the repository clean).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from chatforge.retrieval import NOT_FOUND_REPLY

from _serve_fixtures import serve
from _tiny_chat_model import CONTEXT, CONVERSATIONS, train_tiny_chat_model

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip("Debian's chromium is not installed at /usr/bin/chromium (`apt-get install chromium`, "
                "or `make test` as root): the web page test needs a real browser",
                allow_module_level=True)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "images" / "chat_page.png"
QUESTION = "What does the free plan include?"
ANSWER = dict(CONVERSATIONS)[QUESTION]
# The model answers without a citation; the server adds the passage it copied from (infer/answer.py).
SHOWN = ANSWER + " (source: docs/plans.md > Plans > Free plan)"
CORRECTION = "The free plan includes five gigabytes of storage on one device."
KEY = "web-page-test-key"
SCRIPT = "<script>window.__pwned=1</script>"
IMG = '<img src=x onerror="window.__pwned=1">'
SYSTEM = "Answer from the context.\n"
MAX_TOKENS = 64          # the servers' --max-tokens: the Markdown answer needs about 52
MAX_CHARS = 120          # the servers' --max-message-chars
UNANSWERED = "Do you sell gift cards?"
MARKDOWN_QUESTION = "How do I sync my files?"
MARKDOWN_ANSWER = f"1. Run `acme sync`\n2. Press **Sync** {IMG}{SCRIPT}"


# ------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def docs_dir(tmp_path_factory) -> Path:
    docs = tmp_path_factory.mktemp("web-docs") / "docs"
    docs.mkdir()
    (docs / "plans.md").write_text("# Plans\n\n## Free plan\n\nThe free plan includes five gigabytes of storage.\n")
    (docs / "account.md").write_text("# Account\n\n## Password\n\nOpen the sign-in page and choose Forgot password.\n")
    return docs


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, docs_dir) -> Path:
    """The tiny model, fitted to the grounded prompts the servers below build (same documents,
    system prompt and budget), plus a refusal and a Markdown answer."""
    from chatforge.infer.turn import fit_prompt
    from chatforge.infer.plugin_builtins import DocsPlugin
    from chatforge.infer.plugins import PluginRunner
    from chatforge.infer.prompting import parse_system_prompt
    from chatforge.retrieval import PassageIndex

    index = PassageIndex.load_or_build([docs_dir], tmp_path_factory.mktemp("index"))
    system = parse_system_prompt(SYSTEM)

    def grounded(tokenizer, question: str) -> list[dict]:
        return fit_prompt(tokenizer, system, index, [], question, CONTEXT - MAX_TOKENS, 3,
                          PluginRunner([DocsPlugin(index, 3)])).messages

    extra = [(UNANSWERED, NOT_FOUND_REPLY), (MARKDOWN_QUESTION, MARKDOWN_ANSWER)]
    return train_tiny_chat_model(tmp_path_factory.mktemp("web") / "model", extra, steps=120, prompt=grounded)


class Server:
    """`python -m chatforge serve` on a free port, up once GET /health answers 200."""

    def __init__(self, folder: Path, model_dir: Path, docs_dir: Path, api_key: str | None = None):
        folder.mkdir(parents=True, exist_ok=True)
        self.db = folder / "feedback.sqlite"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/"
        system = folder / "system.txt"
        system.write_text(SYSTEM)
        # The tiny model's context is 256 tokens: a short system prompt and short replies leave
        # room for a passage.
        args = [sys.executable, "-m", "chatforge", "serve", "--model", str(model_dir), "--docs", str(docs_dir),
                "--system", str(system), "--max-tokens", str(MAX_TOKENS), "--max-message-chars", str(MAX_CHARS),
                "--port", str(port), "--db", str(self.db)]
        if api_key:
            args += ["--api-key", api_key]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
               "CHATFORGE_CACHE": str(folder / "cache")}
        env.pop("CHATFORGE_API_KEY", None)
        self.log_path = folder / "server.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        try:
            self._wait_until_up(timeout=60)
        except BaseException:
            self.stop()
            raise

    def _wait_until_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"chatforge serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise AssertionError(f"GET /health did not answer 200 within {timeout:.0f} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir, docs_dir):
    srv = Server(tmp_path_factory.mktemp("web-server"), model_dir, docs_dir)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    """A fresh tab (its own session storage) that may use the clipboard; fails the test on any
    uncaught page error."""
    context = browser.new_context(viewport={"width": 1000, "height": 900},
                                  permissions=["clipboard-read", "clipboard-write"])
    tab = context.new_page()
    tab.set_default_timeout(30_000)
    errors: list[str] = []
    tab.on("pageerror", lambda e: errors.append(str(e)))
    yield tab
    context.close()
    assert not errors, errors


def _open(page, server: Server) -> None:
    page.goto(server.url)
    page.wait_for_selector("body[data-ready=true]")


def _ask(page, text: str) -> None:
    page.fill("#question", text)
    page.press("#question", "Enter")


def _last_reply(page):
    return page.locator(".turn.assistant").last


def _wait_reply(page, count: int = 1, timeout: float = 60_000) -> None:
    """Until `count` replies have finished; an error shown instead fails with its message."""
    page.wait_for_function(
        """n => document.querySelectorAll('.turn.assistant:not([data-state=streaming])').length >= n
               || !document.getElementById('error').hidden""",
        arg=count, timeout=timeout)
    assert page.is_hidden("#error"), page.inner_text("#error")


def _rows(db: Path, sql: str, *params) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql, params).fetchall()


# ------------------------------------------------------------------------------ tests

def test_reply_streams_with_sources_feedback_copy_reload_and_refusal(page, server, tmp_path):
    _open(page, server)
    assert page.is_hidden("#key-panel")                     # the server runs without a key
    sent = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data))
            if r.url.endswith("/v1/chat/completions") else None)
    # Watch the reply arrive: each change records its length and whether Send is still disabled.
    page.evaluate("""() => {
        window.__seen = [];
        new MutationObserver(() => {
            const t = document.querySelector('.turn.assistant .text');
            window.__seen.push([t ? t.textContent.length : 0, document.getElementById('send').disabled]);
        }).observe(document.getElementById('conversation'), {subtree: true, childList: true, characterData: true});
    }""")
    _ask(page, QUESTION)
    _wait_reply(page)
    reply = _last_reply(page)
    assert reply.get_attribute("data-state") == "done", reply.inner_text()
    assert reply.locator(".text").inner_text() == SHOWN
    seen = page.evaluate("window.__seen")
    # The text showed while the stream was still open (Send is disabled until it ends). The guard
    # that masks PII may hold a short reply back to the end, so one piece is enough.
    assert any(n > 0 and disabled for n, disabled in seen), seen
    assert page.is_enabled("#send") and page.is_hidden("#stop")
    assert sent[0]["stream"] is True and sent[0]["messages"] == [{"role": "user", "content": QUESTION}]

    labels = reply.locator(".source-label").all_inner_texts()
    assert labels and any("plans.md" in label for label in labels), labels
    reply.locator(".source-label").first.click()             # open the passage
    assert reply.locator(".source-text").first.inner_text().strip()

    # The copy button puts the answer on the clipboard.
    reply.get_by_role("button", name="Copy answer").click()
    page.wait_for_function("t => navigator.clipboard.readText().then(c => c === t)", arg=SHOWN)

    # One click saves the vote, before any form is sent.
    message_id = reply.get_attribute("data-message-id")
    reply.get_by_role("button", name="Bad answer").click()
    reply.get_by_text("Thanks! Your vote was saved.").wait_for()
    votes = "SELECT id, rating, reason, comment, correction FROM feedback WHERE message_id = ?"
    [(vote, *rest)] = _rows(server.db, votes, message_id)
    assert rest == ["down", None, None, None]
    # The form then completes that same row.
    reply.get_by_label("Reason").select_option("not_in_documents")
    reply.get_by_label("Comment").fill("It forgot the device limit.")
    reply.get_by_label("Suggest a better answer").fill(CORRECTION)
    reply.get_by_role("button", name="Send feedback").click()
    reply.get_by_text("Thanks! Your feedback was saved.").wait_for()
    assert _rows(server.db, votes, message_id) == [
        (vote, "down", "not_in_documents", "It forgot the device limit.", CORRECTION)]

    # A second question carries the conversation so far and the conversation id.
    _ask(page, "hello")
    _wait_reply(page, 2)
    assert sent[1]["conversation_id"] and sent[1]["messages"] == [
        {"role": "user", "content": QUESTION}, {"role": "assistant", "content": SHOWN},
        {"role": "user", "content": "hello"}]

    # After a reload the conversation is there, with its sources and the vote given.
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    assert page.locator(".turn.user .text").all_inner_texts() == [QUESTION, "hello"]
    first = page.locator(".turn.assistant").first
    assert first.locator(".text").inner_text() == SHOWN
    assert first.get_attribute("data-message-id") == message_id
    assert first.get_by_role("button", name="Bad answer").get_attribute("aria-pressed") == "true"
    assert first.locator(".source-label").count() == len(labels)
    # ...and changing the vote there updates the same row.
    first.get_by_role("button", name="Good answer").click()
    first.get_by_text("Thanks! Your vote was saved.").wait_for()
    assert _rows(server.db, "SELECT id, rating FROM feedback WHERE message_id = ?", message_id) == [(vote, "up")]

    # The next question continues the restored conversation.
    _ask(page, UNANSWERED)
    _wait_reply(page, 3)
    assert sent[2]["conversation_id"] == sent[1]["conversation_id"]
    assert sent[2]["messages"][:3] == sent[1]["messages"] and sent[2]["messages"][3]["role"] == "assistant"
    assert sent[2]["messages"][4:] == [{"role": "user", "content": UNANSWERED}]
    page.get_by_role("button", name="New conversation").click()
    assert page.locator(".turn").count() == 0
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    assert page.locator(".turn").count() == 0

    # A question the documents do not answer: the refusal lists no sources, though passages were
    # retrieved (the server named them in its first chunk and took them back in its last).
    _ask(page, UNANSWERED)
    _wait_reply(page)
    assert "conversation_id" not in sent[3]
    refusal = _last_reply(page)
    assert refusal.locator(".text").inner_text() == NOT_FOUND_REPLY
    assert refusal.get_attribute("data-refusal") == "true"
    assert refusal.locator(".sources").count() == 0
    body = json.dumps({"messages": [{"role": "user", "content": UNANSWERED}]}).encode()
    with urllib.request.urlopen(urllib.request.Request(server.url + "v1/chat/completions", body,
                                                       {"Content-Type": "application/json"})) as r:
        answered = json.load(r)
    assert answered["refusal"] is True and answered["sources"] == []
    assert answered["choices"][0]["message"]["content"] == NOT_FOUND_REPLY


def test_markdown_answer_is_drawn_safely_and_the_length_limit_is_counted(page, server, tmp_path):
    _open(page, server)
    # The counter shows the server's own limit (GET /health), and the server enforces it.
    assert page.inner_text("#counter") == f"0 / {MAX_CHARS}"
    page.fill("#question", "x" * (MAX_CHARS + 1))
    assert page.inner_text("#counter").startswith(f"{MAX_CHARS + 1} / {MAX_CHARS} characters: shorten it by 1")
    page.press("#question", "Enter")
    assert page.locator(".turn").count() == 0 and page.input_value("#question") == "x" * (MAX_CHARS + 1)
    long = json.dumps({"messages": [{"role": "user", "content": "x" * (MAX_CHARS + 1)}]}).encode()
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(urllib.request.Request(server.url + "v1/chat/completions", long,
                                                      {"Content-Type": "application/json"}))
    assert refused.value.code == 400 and json.load(refused.value)["error"]["code"] == "message_too_long"

    _ask(page, MARKDOWN_QUESTION)
    _wait_reply(page)
    assert page.inner_text("#counter") == f"0 / {MAX_CHARS}"
    answer = _last_reply(page).locator(".answer")
    assert answer.locator("ol > li").count() == 2
    assert answer.locator("ol > li code").inner_text() == "acme sync"
    assert answer.locator("ol > li strong").inner_text() == "Sync"
    assert answer.locator("ol > li").nth(1).inner_text() == f"Press Sync {IMG}{SCRIPT}"
    page.wait_for_timeout(300)                  # time for an injected onerror to fire, were there one
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert page.locator("#conversation img, #conversation script").count() == 0
    page.fill("#question", "How do I")          # the counter as someone types
    assert page.inner_text("#counter") == f"8 / {MAX_CHARS}"
    _last_reply(page).get_by_role("button", name="Good answer").click()
    _last_reply(page).get_by_text("Thanks! Your vote was saved.").wait_for()

    shot = tmp_path / "chat_page.png"
    page.screenshot(path=str(shot))
    if os.environ.get("CHATFORGE_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)


class Gate:
    """Holds a server's scheduler before decode step `after` until `release()`: the reply then
    stays mid-stream for as long as the test needs, with no timing involved."""

    def __init__(self, scheduler, after: int):
        self.reached, self.opened = threading.Event(), threading.Event()
        step = scheduler.step

        def gated() -> None:
            if scheduler.steps >= after and not self.opened.is_set():
                self.reached.set()
                self.opened.wait(60)
            step()

        scheduler.step = gated

    def release(self) -> None:
        self.opened.set()


def test_a_stopped_reply_takes_a_vote_and_is_stored_as_stopped(page, model_dir, docs_dir, tmp_path):
    from chatforge.infer.prompting import parse_system_prompt

    db = tmp_path / "feedback.sqlite"
    running = serve(model_dir, db=db, docs=docs_dir, system=parse_system_prompt(SYSTEM),
                    default_max_tokens=MAX_TOKENS, max_message_chars=MAX_CHARS)
    gate = Gate(running.assistant.scheduler, after=8)
    try:
        page.goto(running.url + "/")
        page.wait_for_selector("body[data-ready=true]")
        _ask(page, QUESTION)
        assert gate.reached.wait(60), "the reply never reached the held step"
        # Everything generated before the held step has been sent once a later request is answered.
        urllib.request.urlopen(running.url + "/health").close()
        page.wait_for_function("document.querySelector('.turn.assistant .text').textContent.length > 0")
        page.click("#stop")
        _wait_reply(page)
        reply = _last_reply(page)
        # The text as received (the page keeps it in session storage; inner_text drops a last space).
        shown = page.evaluate("JSON.parse(sessionStorage.getItem('chatforge.conversation')).turns[1].text")
        assert reply.locator(".text").inner_text() == shown.strip()
        assert reply.get_attribute("data-state") == "stopped" and ANSWER.startswith(shown) and shown != ANSWER
        reply.get_by_role("button", name="Bad answer").click()
        reply.get_by_text("Thanks! Your vote was saved.").wait_for()
        message_id = reply.get_attribute("data-message-id")
        assert _rows(db, "SELECT content, stopped FROM messages WHERE message_id = ?", message_id) == [(shown, 1)]
        assert _rows(db, "SELECT rating FROM feedback WHERE message_id = ?", message_id) == [("down",)]
        # Reloaded, the stopped reply is shown as it was, and still takes the form's fields.
        page.reload()
        page.wait_for_selector("body[data-ready=true]")
        reply = _last_reply(page)
        assert reply.get_attribute("data-state") == "stopped" and reply.locator(".text").inner_text() == shown.strip()
        reply.get_by_role("button", name="Bad answer").click()
        reply.get_by_label("Reason").select_option("too_long")
        reply.get_by_role("button", name="Send feedback").click()
        reply.get_by_text("Thanks! Your feedback was saved.").wait_for()
        assert _rows(db, "SELECT rating, reason FROM feedback WHERE message_id = ?", message_id) == [
            ("down", "too_long")]
    finally:
        gate.release()
        running.stop()


def test_crafted_markdown_and_hostile_text_are_never_run_as_html(page, server):
    hostile = f"Try {SCRIPT} or {IMG} now."
    rich = ("## Setting *it* up\n\n- first **bold** and _soft_\n- a [manual](https://example.org/a?b=1) and "
            "[bad](javascript:alert(1))\n\n```\n<script>window.__pwned=1</script>\n```\n\n3. three\n4. four\n\n"
            "More at https://example.org/docs.")

    def crafted(route):
        chunks = [
            {"id": "chatcmpl-xss", "object": "chat.completion.chunk", "conversation_id": "c-xss",
             "sources": [{"source": f"evil.md > {IMG}", "text": hostile}],
             "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
            *({"id": "chatcmpl-xss", "object": "chat.completion.chunk",
               "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
              for piece in ["Try ", SCRIPT, " or <img src=x ", 'onerror="window.__pwned=1">', " now.\n\n", rich]),
        ]
        body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        route.fulfill(status=200, content_type="text/event-stream", body=body)

    page.route("**/v1/chat/completions", crafted)
    _open(page, server)
    _ask(page, "anything")
    _wait_reply(page)
    reply = _last_reply(page)
    reply.locator(".source-label").first.click()
    page.wait_for_timeout(300)                  # time for an injected onerror to fire, were there one
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert page.locator("#conversation img, #conversation script").count() == 0
    answer = reply.locator(".answer")
    assert answer.locator("p").first.inner_text() == hostile
    assert answer.locator("h4").inner_text() == "Setting it up" and answer.locator("h4 em").inner_text() == "it"
    assert answer.locator("ul > li").all_inner_texts() == [
        "first bold and soft", "a manual and [bad](javascript:alert(1))"]
    links = answer.locator("a")
    assert links.all_inner_texts() == ["manual", "https://example.org/docs"]
    assert [links.nth(i).get_attribute("href") for i in range(2)] == ["https://example.org/a?b=1",
                                                                      "https://example.org/docs"]
    assert all(set(links.nth(i).get_attribute("rel").split()) >= {"noopener", "noreferrer"} for i in range(2))
    assert answer.locator("pre code").inner_text() == SCRIPT
    assert answer.locator("ol").get_attribute("start") == "3" and answer.locator("ol > li").count() == 2
    assert reply.locator(".source-label").inner_text() == f"evil.md > {IMG}"
    assert reply.locator(".source-text").inner_text() == hostile


def test_server_and_network_errors_are_shown(page, server):
    def refuse(route):
        route.fulfill(status=429, content_type="application/json", body=json.dumps(
            {"error": {"message": "The queue is full: try again in a moment.", "type": "rate_limit",
                       "param": None, "code": None}}))

    page.route("**/v1/chat/completions", refuse)
    _open(page, server)
    _ask(page, QUESTION)
    error = page.locator("#error")
    error.wait_for()
    assert error.inner_text() == "The queue is full: try again in a moment."
    assert page.input_value("#question") == QUESTION        # given back, to ask again
    assert page.locator(".turn").count() == 0 and page.is_enabled("#send")

    page.unroute("**/v1/chat/completions")
    page.route("**/v1/chat/completions", lambda route: route.abort("connectionrefused"))
    page.click("#send")
    # A locator, not a JavaScript string: the page's Content-Security-Policy forbids eval.
    page.locator("#error", has_text="Could not reach the server").wait_for()


def test_api_key_field_401_message_and_reply_with_the_key(page, tmp_path, model_dir, docs_dir):
    srv = Server(tmp_path / "server", model_dir, docs_dir, api_key=KEY)
    try:
        _open(page, srv)
        assert page.is_visible("#key-panel")                 # GET /health says auth: true
        _ask(page, QUESTION)
        error = page.locator("#error")
        error.wait_for()
        assert "API key" in error.inner_text()
        assert page.locator(".turn").count() == 0

        page.get_by_label("API key").fill(KEY)
        page.click("#send")                                  # the question was given back
        _wait_reply(page)
        assert _last_reply(page).get_attribute("data-state") == "done"
        assert _last_reply(page).locator(".text").inner_text().strip()
        assert page.is_hidden("#error")
        assert page.evaluate("sessionStorage.getItem('chatforge.apiKey')") == KEY
    finally:
        srv.stop()
