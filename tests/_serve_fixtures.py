"""A real chatforge server on loopback for tests: the tiny chat model behind uvicorn in a thread
(`serve`), or the `python -m chatforge serve` command in its own process (`start_serve_process`)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

DOCS = {
    "billing.md": "# Billing\n\n## Refunds\n\nRefunds are paid back to the card within five working days.\n\n"
                  "## Invoices\n\nInvoices are sent by e-mail on the first day of each month.\n",
    "account.md": "# Account\n\n## Password\n\nOpen the sign-in page and choose Forgot password. "
                  "A reset link arrives within a minute.\n",
}


def write_docs(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in DOCS.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


@dataclass
class Running:
    url: str
    app: object
    assistant: object
    server: object
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.assistant.scheduler.stop(drain=False, timeout=10)
        if self.assistant.store is not None:
            self.assistant.store.close()


def serve(model_dir: Path, db: Path | None = None, docs: Path | None = None, api_key: str | None = None,
          max_batch: int = 8, max_queue: int = 32, reloadable: bool = False, app_kw: dict | None = None,
          http_kw: dict | None = None, scheduler_kw: dict | None = None, upstream: str | None = None,
          upstream_kw: dict | None = None, **assistant_kw) -> Running:
    """Start the app for `model_dir` on a free loopback port; `stop()` it at the end. `app_kw` go
    to `create_app`, `http_kw` to `serve.http.server_config`, `scheduler_kw` to `Scheduler`. With
    `upstream` (a URL) the engine there generates (`serve.upstream.UpstreamClient`, given
    `upstream_kw`) and `model_dir` gives the tokenizer and context only."""
    from chatforge.data.feedback import FeedbackStore
    from chatforge.infer.batching import Scheduler
    from chatforge.infer.engine import Engine
    from chatforge.retrieval import PassageIndex
    from chatforge.model.folder import load_model
    from chatforge.serve.app import Assistant, create_app

    def load():
        if upstream is not None:
            from chatforge.model.folder import load_config, load_tokenizer
            from chatforge.serve.upstream import UpstreamClient

            tok = load_tokenizer(model_dir)
            kw = {"max_batch": max_batch, "max_queue": max_queue, **(upstream_kw or {})}
            return UpstreamClient(upstream, tok, load_config(model_dir).max_seq_len, **kw), tok
        model, tok = load_model(model_dir)
        engine = Engine(model, tok, stop_ids=[tok.eot_id, tok.im_end_id, tok.im_start_id], dtype="float32")
        return Scheduler(engine, max_batch=max_batch, max_queue=max_queue, **(scheduler_kw or {})).start(), tok

    scheduler, tok = load()
    index = PassageIndex.load_or_build([docs]) if docs is not None else None
    assistant = Assistant(scheduler, tok, "tiny", index=index, store=FeedbackStore(db) if db else None,
                          **assistant_kw)
    app = create_app(assistant, api_key=api_key, reload=load if reloadable else None, **(app_kw or {}))
    url, server, thread = run_in_thread(app, **(http_kw or {}))
    return Running(url, app, assistant, server, thread)


def run_in_thread(app, log_level: str = "warning", **http_kw) -> tuple[str, object, threading.Thread]:
    """(url, uvicorn server, thread) of `app` served on a free loopback port in a daemon thread;
    stop it with `server.should_exit = True` and `thread.join()`."""
    import uvicorn

    from chatforge.serve.http import server_config

    server = uvicorn.Server(server_config(app, "127.0.0.1", 0, log_level=log_level, **http_kw))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    return f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}", server, thread


def start_serve_process(model_dir: Path, db: str | Path, timeout: float = 90,
                        extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    """`python -m chatforge serve --db DB [EXTRA...]` in its own process on a free port, once GET
    /health answers 200 (the process and its URL); its output in the assertion if it never does."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "chatforge", "serve", "--model", str(model_dir), "--port",
                             str(port), "--db", str(db), "--name", "tiny", "--log-level", "warning", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(proc.stdout.read().decode())
        time.sleep(0.1)
