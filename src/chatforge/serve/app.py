"""The HTTP server's application: OpenAI's chat and text completions, the chat page, feedback,
health and Prometheus metrics. Generation is behind one small interface (`serve/upstream.Generator`):
chatforge's own continuously batched engine (`infer/batching.py`), or with `--upstream URL` any
OpenAI-compatible engine (`serve/upstream.py`); everything else here is the same for both.

    app = create_app(Assistant(model, tokenizer, index=index, store=store), api_key="...")
    uvicorn.run(app, host="127.0.0.1", port=8000)

`chatforge serve` (serve/command.py) builds it from a model folder; docs/SERVING.md is the API.

A chat request goes: OpenAI messages -> the prompt (`infer/turn.fit_prompt`: system prompt,
retrieved passages, as much history as fits) -> the scheduler, which streams pieces back through
an asyncio queue -> the reply filter (PII, blocked terms) -> the client. The finished reply is
written to the feedback store before the response ends, so a client can rate it at once; a
streamed reply the client stops (it disconnects) is written as far as it was sent, marked stopped,
and feedback that arrives while it is being written waits for it.
Everything that can go wrong with a request is answered in OpenAI's error shape (`ApiError`);
nothing leaks a traceback or a path.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from chatforge.data.feedback_db import DatabaseUnavailable
from chatforge.errors import ChatforgeError
from chatforge.infer.answer import AnswerStream, checked_citation, is_refusal
from chatforge.infer.batching import Done, Piece, QueueFull, Scheduler, ShuttingDown
from chatforge.infer.engine import GenerationConfig
from chatforge.infer.plugin_builtins import DocsPlugin
from chatforge.infer.plugins import PluginRunner
from chatforge.infer.prompting import SystemPrompt
from chatforge.infer.safety import ReplyFilter
from chatforge.infer.turn import fit_prompt, refused_below_threshold
from chatforge.runtime import give_back_memory
from chatforge.serve import openai_api as oa
from chatforge.serve.http import SECURITY_HEADERS, host_name
from chatforge.serve.upstream import UpstreamDone, UpstreamError

log = logging.getLogger("chatforge.serve")
disable_created_metrics()     # the *_created series only double the scrape
MAX_STOP_STRINGS = 4
FEEDBACK_WAIT_S = 30.0     # longest a vote waits for the reply it rates to be written
SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)     # what torch.Generator.manual_seed accepts
OPENAI_ROUTES = ("/v1/chat/completions", "/v1/completions")


@dataclass
class Assistant:
    """What the server serves: what generates (the model's scheduler, or an `UpstreamClient`) and
    the tokenizer, retrieval, the system prompt, the reply filter and the feedback store (None:
    feedback is off)."""

    scheduler: Any                                 # serve.upstream.Generator: a Scheduler or an UpstreamClient
    tokenizer: Any
    name: str                                      # the model id clients use
    index: Any = None                              # PassageIndex with --docs
    system: SystemPrompt | None = None
    guard: ReplyFilter = field(default_factory=ReplyFilter)
    store: Any = None                              # data.feedback.FeedbackStore
    tools: Any = None                              # infer.plugins.PluginRunner (docs is one of them)
    passages: int = 3
    default_max_tokens: int = 256
    default_temperature: float = 1.0               # for requests that do not say (OpenAI's default: 1)
    default_repetition_penalty: float = 1.0        # for requests that do not say (1 = off)
    max_tokens_limit: int = 1024                   # a request asking for more gets a 400
    max_message_chars: int = 4000                  # a longer user message gets a 400 (the page counts to it)
    request_timeout: float = 600.0                 # seconds a request may wait and generate in all
    context_tokens: int | None = None              # passages' token budget (the answer settings: SFT's)
    min_score: float = 0.0                         # retrieval score below which the reply is not-found (0 = off)
    refusal_bias: tuple = ()                       # first-token bias of grounded replies (the answer settings')
    reply_ngram: int = 0                           # the answer settings' reply_no_repeat_ngram_size (0 = off)

    def __post_init__(self):
        if self.tools is None and self.index is not None:
            # Retrieval is the docs plugin: one code path with or without other plugins.

            self.tools = PluginRunner([DocsPlugin(self.index, self.passages)])

    @property
    def context(self) -> int:
        upstream = getattr(self.scheduler, "context", None)      # an UpstreamClient's
        return upstream if upstream is not None else self.scheduler.engine.config.max_seq_len


class UpstreamSwitch(BaseModel):
    """POST /admin/upstream: the engine model new requests go to (null: the one it served at
    first), and the PEFT adapter folder to load as that model first (a path the engine can read)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(default=None, min_length=1, max_length=256)
    adapter: str | None = Field(default=None, min_length=1, max_length=4096)


class Metrics:
    """Prometheus counters of one app (its own registry, so tests can run several apps)."""

    def __init__(self, assistant: "Assistant"):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("chatforge_requests", "HTTP requests answered", ["path", "status"], registry=r)
        self.prompt_tokens = Counter("chatforge_prompt_tokens", "prompt tokens of completions", registry=r)
        self.completion_tokens = Counter("chatforge_completion_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("chatforge_time_to_first_token_seconds", "from request to its first token",
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32), registry=r)
        Gauge("chatforge_queue_length", "requests waiting for a batch slot",
              registry=r).set_function(lambda: assistant.scheduler.queued)
        Gauge("chatforge_running_requests", "requests in the running batch",
              registry=r).set_function(lambda: len(assistant.scheduler.running))
        self.reloads = Counter("chatforge_model_reloads", "model folders loaded again", registry=r)


# ------------------------------------------------------------------------------ the request

def _text(content: str | list[oa.ContentPart] | None, i: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise oa.ApiError(400, f"messages[{i}].content[{j}] is of type {part.type!r}; this model reads text only",
                              f"messages[{i}].content")
        parts.append(part.text)
    return "".join(parts)


def _conversation(messages: list[oa.Message], max_chars: int) -> tuple[SystemPrompt | None, list[dict], str]:
    """(the client's system prompt or None, the history, the question) from OpenAI messages."""
    if not messages:
        raise oa.ApiError(400, "messages is empty; send at least one user message", "messages")
    system, turns = [], []
    for i, m in enumerate(messages):
        text = _text(m.content, i)
        if m.role in ("system", "developer"):
            system.append(text)
        elif m.role in ("user", "assistant"):
            if m.role == "user" and len(text) > max_chars:
                raise oa.ApiError(400, f"messages[{i}] is {len(text)} characters long; a message may have at most "
                                       f"{max_chars}", f"messages[{i}].content", "message_too_long")
            turns.append({"role": m.role, "content": text})
        else:
            raise oa.ApiError(400, f"messages[{i}].role is {m.role!r}; use system, user or assistant",
                              f"messages[{i}].role")
    if not turns or turns[-1]["role"] != "user":
        raise oa.ApiError(400, "the last message must be the user's", "messages")
    if not turns[-1]["content"].strip():
        raise oa.ApiError(400, "the user's message is empty", "messages")
    prompt = SystemPrompt("\n\n".join(system).strip()) if system else None
    return prompt, turns[:-1], turns[-1]["content"]


def _generation(req: oa._Sampling, max_tokens: int | None, assistant: Assistant) -> GenerationConfig:
    if req.n not in (None, 1):
        raise oa.ApiError(400, "n must be 1: one completion per request", "n")
    if max_tokens is not None and not 1 <= max_tokens <= assistant.max_tokens_limit:
        raise oa.ApiError(400, f"max_tokens must be between 1 and {assistant.max_tokens_limit}, got {max_tokens}",
                          "max_tokens")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP_STRINGS or any(not s for s in stop):
        raise oa.ApiError(400, f"stop takes up to {MAX_STOP_STRINGS} non-empty strings", "stop")
    checks = {"temperature": (req.temperature, 0, 2), "top_p": (req.top_p, 0, 1),
              "repetition_penalty": (req.repetition_penalty, 0.01, 10),
              "frequency_penalty": (req.frequency_penalty, -2, 2), "presence_penalty": (req.presence_penalty, -2, 2)}
    for name, (value, lo, hi) in checks.items():
        if value is not None and not lo <= value <= hi:
            raise oa.ApiError(400, f"{name} must be between {lo} and {hi}, got {value}", name)
    if req.top_p is not None and req.top_p == 0:
        raise oa.ApiError(400, "top_p must be above 0", "top_p")
    if req.seed is not None and not SEED_RANGE[0] <= req.seed <= SEED_RANGE[1]:
        raise oa.ApiError(400, f"seed must be between {SEED_RANGE[0]} and {SEED_RANGE[1]}", "seed")
    temperature = assistant.default_temperature if req.temperature is None else req.temperature
    penalty = assistant.default_repetition_penalty if req.repetition_penalty is None else req.repetition_penalty
    try:
        return GenerationConfig(repetition_penalty=penalty,
            strategy="greedy" if temperature == 0 else "sample", temperature=temperature or 1.0,
            top_p=req.top_p or 1.0, max_new_tokens=max_tokens or assistant.default_max_tokens,
            stop_strings=tuple(stop), seed=req.seed, frequency_penalty=req.frequency_penalty or 0.0,
            presence_penalty=req.presence_penalty or 0.0, reply_no_repeat_ngram_size=assistant.reply_ngram)
    except ChatforgeError as e:            # a value the checks above let through (e.g. NaN)
        raise oa.ApiError(400, str(e)) from None


def _check_text(body: Any) -> None:
    """400 for a string the tokenizer and the database cannot take (a lone surrogate)."""
    where = oa.lone_surrogate(body.model_dump())
    if where is not None:
        raise oa.ApiError(400, f"{where} holds a lone UTF-16 surrogate (e.g. \\ud800), which is not text; "
                               "send valid Unicode", where)


def _check_model(requested: str | None, assistant: Assistant) -> None:
    if requested is not None and requested != assistant.name:
        raise oa.ApiError(404, f"the model {requested!r} does not exist here; this server serves "
                               f"{assistant.name!r} (GET /v1/models)", "model", "model_not_found")


class _Job:
    """One request on the scheduler, its events on an asyncio queue."""

    def __init__(self, assistant: Assistant, ids: list[int], cfg: GenerationConfig):
        loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[Piece | Done] = asyncio.Queue()
        self.started = time.perf_counter()
        self.deadline = self.started + assistant.request_timeout
        try:
            self.request = assistant.scheduler.submit(
                ids, cfg, on_event=lambda e: loop.call_soon_threadsafe(self.events.put_nowait, e))
        except QueueFull as e:
            raise oa.ApiError(429, f"the server is busy: {e}", code="queue_full") from None
        except ShuttingDown as e:
            raise oa.ApiError(503, str(e), code="shutting_down") from None
        except ChatforgeError as e:
            raise oa.ApiError(400, str(e)) from None

    async def pieces(self) -> AsyncIterator[Piece | Done]:
        """The request's events; 504 once it has run past its deadline (a request never waits
        without one, whatever happens to the scheduler)."""
        try:
            while True:
                try:
                    event = await asyncio.wait_for(self.events.get(), max(0.0, self.deadline - time.perf_counter()))
                except TimeoutError:
                    raise oa.ApiError(504, "the request took longer than the server's limit "
                                           "(--request-timeout); retry later or ask for fewer tokens",
                                      code="timeout") from None
                yield event
                if isinstance(event, Done):
                    return
        finally:
            # A client that went away (or an error) frees the batch slot at the next step.
            if self.request.outcome is None:
                self.request.cancel()


def _generated(done: Done) -> int:
    """Tokens a request generated: an upstream engine's own count, else the ids the engine made."""
    return done.completion_tokens if isinstance(done, UpstreamDone) else len(done.tokens)


def _failed(done: Done) -> oa.ApiError:
    """The error a failed generation is answered with: an upstream engine's failure as it maps to
    (unreachable 503, silent 504, broken 502, ...), the local engine's as 500."""
    if isinstance(done, UpstreamDone):
        return oa.ApiError(done.status, done.error or "the upstream engine failed", code=done.code)
    return oa.ApiError(500, "generation failed; see the server's log")


class ClientGone(Exception):
    """The client of a non-streamed request disconnected before its answer was ready."""


async def _collect(job: _Job | _Canned, request: Request) -> Done:
    """The `Done` of a non-streamed request, while watching its connection: a client that gives
    up (a timeout, a retry) cancels its generation, queued or running, as a streaming one does
    when its next chunk cannot be sent. Without this an abandoned request kept its slot to the end
    and clients that retried multiplied the load."""
    async def last() -> Done:
        done = None
        async for event in job.pieces():
            done = event if isinstance(event, Done) else done
        return done

    async def gone() -> None:
        # The body is read, so the next ASGI message is the disconnect (uvicorn sends it when
        # the connection closes, whenever that is).
        while (await request.receive())["type"] != "http.disconnect":
            pass

    answer, watch = asyncio.ensure_future(last()), asyncio.ensure_future(gone())
    try:
        await asyncio.wait({answer, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not answer.done():
            answer.cancel()
            # Not left to job.pieces()' own `finally`: a task cancelled before it first ran
            # never enters it (a client gone before its request was submitted).
            if job.request is not None and job.request.outcome is None:
                job.request.cancel()
    if not answer.done() or answer.cancelled():
        raise ClientGone()
    return answer.result()


class _Canned:
    """A reply that is already written (a plugin's), with the events of a generated one."""

    request = None

    def __init__(self, text: str):
        self.text = text

    async def pieces(self) -> AsyncIterator[Piece | Done]:
        yield Piece(self.text, 0)
        yield Done(self.text, [], "stop", 0)


# ----------------------------------------------------------------------------------- the app

def create_app(assistant: Assistant, api_key: str | None = None, max_body_bytes: int = 1 << 20,
               reload: Callable[[], tuple[Scheduler, Any]] | None = None, admin_key: str | None = None,
               allowed_hosts: Sequence[str] | None = None, api_docs: bool = False) -> FastAPI:
    """The FastAPI app serving `assistant` (see the module docstring and docs/SERVING.md).

    `reload()` loads the model folder again and returns a started scheduler and its tokenizer;
    `POST /admin/reload` (and `chatforge serve`'s SIGHUP) swap them in (`swap_model`); it needs
    `admin_key`, never a chat key. `allowed_hosts`: the Host names answered (None: any), against
    DNS rebinding of a keyless loopback server. `api_docs`: serve /docs and /openapi.json."""
    metrics = Metrics(assistant)
    app = FastAPI(title="chatforge", version="1", redoc_url=None,
                  docs_url="/docs" if api_docs else None, openapi_url="/openapi.json" if api_docs else None)
    app.state.stopping = False
    app.state.assistant = assistant
    # Streamed replies not yet in the store (message id -> set once written or given up): feedback
    # on a reply the user just stopped may arrive before its disconnect is handled.
    writing: dict[str, asyncio.Event] = {}
    static = resources.files("chatforge.serve") / "static"

    @app.exception_handler(oa.ApiError)
    async def api_error(request: Request, e: oa.ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        if first.get("type") == "json_invalid":
            message, where = "the request body is not valid JSON", None      # its loc is a character offset
        elif not where:
            message = "the request body must be a JSON object (Content-Type: application/json)"
        else:
            message = f"{where or 'body'}: {first.get('msg', 'invalid value')}"
        # OpenAI answers a body it cannot read (bad JSON, a wrong type) with 400 on its own
        # routes; chatforge's own (feedback) keep FastAPI's 422.
        status = 400 if request.url.path in OPENAI_ROUTES else 422
        return JSONResponse(oa.ApiError(status, message, where).body(), status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        message = {404: f"no such path: {request.url.path}", 405: f"{request.method} is not allowed here"}
        body = oa.ApiError(e.status_code, message.get(e.status_code, str(e.detail))).body()
        return JSONResponse(body, status_code=e.status_code)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, e: ClientGone):
        return Response(status_code=499)        # nginx's "client closed request"; nobody reads it

    @app.exception_handler(Exception)
    async def failed(request: Request, e: Exception):
        log.exception("request failed")
        return JSONResponse(oa.ApiError(500, "the server failed to answer; see its log").body(), status_code=500)

    # ------------------------------------------------------------------------- pages, health

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(str(static / "index.html"), media_type="text/html")

    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.get("/health")
    async def health():
        body = {"status": "ok", "model": assistant.name, "auth": bool(api_key), "docs": bool(assistant.tools and assistant.tools.get("docs")),
                "feedback": assistant.store is not None, "max_message_chars": assistant.max_message_chars}
        # With --upstream, a load balancer must see a dead engine here: 503 and why.
        check = getattr(assistant.scheduler, "health", None)
        reason = await check() if check is not None else None
        if reason is not None:
            return JSONResponse({**body, "status": "unavailable", "reason": reason}, status_code=503)
        return body

    @app.get("/metrics", include_in_schema=False)
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [oa.model_card(assistant.name, app.state.created)]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str):
        _check_model(model_id, assistant)
        return oa.model_card(assistant.name, app.state.created)

    app.state.created = oa.now()

    # HEAD wherever GET is (FastAPI, unlike Starlette, does not add it; uvicorn drops the body),
    # kept out of the schema, whose clients would expect a body.
    for route in list(app.routes):
        if isinstance(route, APIRoute) and "GET" in route.methods:
            app.add_api_route(route.path, route.endpoint, methods=["HEAD"], include_in_schema=False)
    app.add_middleware(_Gate, state=app.state, api_key=api_key, max_body_bytes=max_body_bytes, metrics=metrics,
                       admin_key=admin_key, allowed_hosts=allowed_hosts)

    # ---------------------------------------------------------------------------- completions

    @app.post("/v1/chat/completions")
    async def chat(body: oa.ChatRequest, request: Request):
        _check_model(body.model, assistant)
        _check_text(body)
        client_system, history, question = _conversation(body.messages, assistant.max_message_chars)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        cfg = _generation(body, max_tokens, assistant)
        reserve = min(cfg.max_new_tokens, assistant.context // 2)
        conversation = body.conversation_id or oa.new_id("conv")
        try:
            prompt = await run_in_threadpool(fit_prompt, assistant.tokenizer, client_system or assistant.system,
                                             assistant.index, history, question, assistant.context - reserve,
                                             assistant.passages, assistant.tools, assistant.guard, conversation,
                                             assistant.context_tokens)
        except ChatforgeError as e:
            raise oa.ApiError(400, str(e), "messages", "context_length_exceeded") from None
        prompt = refused_below_threshold(prompt, assistant.min_score)
        sources = prompt.sources()
        rid, created = oa.new_id("chatcmpl"), oa.now()
        # A plugin's direct reply (e.g. the hand-off) is not generated: it is the whole answer.
        job = _Canned(prompt.reply) if prompt.reply is not None else _Job(assistant, prompt.ids, prompt.generation(cfg, assistant.refusal_bias))
        record = dict(message_id=rid, conversation_id=conversation, model=assistant.name,
                      messages=[m.model_dump(exclude_none=True) for m in body.messages],
                      prompt_messages=prompt.messages, sources=sources)

        async def finish(done: Done, reply: str) -> None:
            metrics.prompt_tokens.inc(done.prompt_tokens)
            metrics.completion_tokens.inc(_generated(done))
            if job.request is not None and job.request.first_token is not None:
                metrics.ttft.observe(job.request.first_token - job.request.submitted)
            if done.finish_reason == "error":
                raise _failed(done)
            if assistant.store is not None:
                text = assistant.tokenizer.render_chat_text(prompt.messages, add_generation_prompt=True)
                await run_in_threadpool(assistant.store.record_reply, reply=reply, prompt=text, **record)

        def verdict(reply: str) -> dict:
            # A reply saying the documents hold no answer used none of the passages: it lists none.
            refusal = prompt.grounded and is_refusal(reply)
            return {"sources": [] if refusal else sources, "refusal": refusal}

        extra = {"conversation_id": conversation, "sources": sources}
        # A grounded reply's citation is checked before the client sees it (`infer/answer.py`):
        # never a source name that none of the passages has.
        checked = prompt.grounded and prompt.reply is None
        if not body.stream:
            done = await _collect(job, request)
            reply = assistant.guard.apply(checked_citation(done.text, prompt.passages) if checked else done.text).text
            await finish(done, reply)
            return {"id": rid, "object": "chat.completion", "created": created, "model": assistant.name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                                 "logprobs": None, "finish_reason": done.finish_reason}],
                    "usage": oa.usage(done.prompt_tokens, _generated(done)), **extra, **verdict(reply)}

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        shown: list[str] = []        # the text sent so far
        ended: list[Done] = []       # the Done event, once generation ended (stopped replies have none)

        async def stream() -> AsyncIterator[str]:
            safe = assistant.guard.stream()
            answer = AnswerStream(prompt.passages) if checked else None
            yield _sse(oa.chat_chunk(rid, assistant.name, created, {"role": "assistant", "content": ""}, **extra))
            try:
                async for event in job.pieces():
                    if isinstance(event, Piece):
                        out = safe.push(answer.push(event.text) if answer else event.text)
                    else:
                        out = (safe.push(answer.finish()) if answer else "") + safe.finish()
                    if out:
                        shown.append(out)
                        yield _sse(oa.chat_chunk(rid, assistant.name, created, {"content": out}))
                    if isinstance(event, Done):
                        ended.append(event)
                        await finish(event, "".join(shown))
                        yield _sse(oa.chat_chunk(rid, assistant.name, created, {}, event.finish_reason,
                                                 **verdict("".join(shown))))
                        if include_usage:
                            yield _sse({**oa.chat_chunk(rid, assistant.name, created, {}), "choices": [],
                                        "usage": oa.usage(event.prompt_tokens, _generated(event))})
            except oa.ApiError as e:
                yield _sse(e.body())
                return
            yield "data: [DONE]\n\n"

        async def kept() -> AsyncIterator[str]:
            """`stream()`, and when the client goes away mid-reply (the page's Stop), what it was
            sent is stored, marked stopped: its feedback, often the most negative, is not lost."""
            if assistant.store is not None:
                writing[rid] = asyncio.Event()       # before the client can know the id
            try:
                async for chunk in stream():
                    yield chunk
            finally:
                if rid in writing and not ended:
                    keep_stopped("".join(shown))
                elif rid in writing:
                    writing.pop(rid).set()            # stored (or failed) before the last chunk

        def keep_stopped(reply: str) -> None:
            # In a worker thread, not awaited: this request's task is being cancelled.
            text = assistant.tokenizer.render_chat_text(prompt.messages, add_generation_prompt=True)
            work = asyncio.get_running_loop().run_in_executor(
                None, lambda: assistant.store.record_reply(reply=reply, prompt=text, stopped=True, **record))

            def written(f: asyncio.Future) -> None:
                if f.exception() is not None:
                    log.error("a stopped reply was not stored: %s", f.exception())
                writing.pop(rid).set()

            work.add_done_callback(written)

        return StreamingResponse(kept(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def complete(body: oa.CompletionRequest, request: Request):
        _check_model(body.model, assistant)
        _check_text(body)
        if body.echo or body.logprobs or body.suffix:
            raise oa.ApiError(400, "echo, logprobs and suffix are not supported", "echo")
        if body.prompt and all(isinstance(t, int) for t in body.prompt):
            # Token ids, as OpenAI's API allows: the exact prompt (another chatforge in front of
            # this one sends its rendered prompt so; control tokens are tokens here, not text).
            ids = list(body.prompt)
            vocab = assistant.tokenizer.vocab_size
            if any(not 0 <= t < vocab for t in ids):
                raise oa.ApiError(400, f"prompt holds token ids outside the vocabulary (0..{vocab - 1})", "prompt")
        else:
            prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
            if len(prompts) != 1 or not isinstance(prompts[0], str) or not prompts[0]:
                raise oa.ApiError(400, "prompt must be one non-empty string or a list of token ids", "prompt")
            ids = assistant.tokenizer.encode(prompts[0])
        cfg = _generation(body, body.max_tokens, assistant)
        if len(ids) >= assistant.context:
            raise oa.ApiError(400, f"the prompt has {len(ids)} tokens; the model's context is {assistant.context}",
                              "prompt", "context_length_exceeded")
        rid, created = oa.new_id("cmpl"), oa.now()
        job = _Job(assistant, ids, cfg)

        def counted(done: Done) -> None:
            metrics.prompt_tokens.inc(done.prompt_tokens)
            metrics.completion_tokens.inc(_generated(done))
            if done.finish_reason == "error":
                raise _failed(done)

        if not body.stream:
            done = await _collect(job, request)
            counted(done)
            return {"id": rid, "object": "text_completion", "created": created, "model": assistant.name,
                    "choices": [{"index": 0, "text": done.text, "logprobs": None, "finish_reason": done.finish_reason}],
                    "usage": oa.usage(done.prompt_tokens, _generated(done))}

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def stream() -> AsyncIterator[str]:
            try:
                async for event in job.pieces():
                    if isinstance(event, Piece):
                        yield _sse(oa.completion_chunk(rid, assistant.name, created, event.text))
                        continue
                    counted(event)
                    yield _sse(oa.completion_chunk(rid, assistant.name, created, "", event.finish_reason))
                    if include_usage:
                        yield _sse({**oa.completion_chunk(rid, assistant.name, created, ""), "choices": [],
                                    "usage": oa.usage(event.prompt_tokens, _generated(event))})
            except oa.ApiError as e:
                yield _sse(e.body())
                return
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # ---------------------------------------------------------------------------------- admin

    @app.post("/admin/reload", responses={403: {"description": "no admin key is set"},
                                          501: {"description": "reloading is not configured"}})
    async def reload_model():
        if not admin_key:
            raise oa.ApiError(403, "admin endpoints need an admin key: start the server with --admin-key "
                                   "(or send it SIGHUP to reload)", code="admin_disabled")
        if reload is None:
            raise oa.ApiError(501, "this server cannot reload its model", code="reload_unavailable")
        t0 = time.perf_counter()
        try:
            await run_in_threadpool(swap_model, assistant, reload)
        except ChatforgeError as e:
            raise oa.ApiError(400, f"the model was not reloaded: {e}", code="reload_failed") from None
        metrics.reloads.inc()
        return {"status": "reloaded", "model": assistant.name, "seconds": round(time.perf_counter() - t0, 2)}

    def upstream_client():
        if not admin_key:
            raise oa.ApiError(403, "admin endpoints need an admin key: start the server with --admin-key",
                              code="admin_disabled")
        client = assistant.scheduler
        if not hasattr(client, "use_model"):
            raise oa.ApiError(501, "this server generates with its own engine, not --upstream: reload its model "
                                   "folder instead (POST /admin/reload)", code="not_upstream")
        return client

    @app.get("/admin/upstream", responses={403: {"description": "no admin key is set"},
                                           501: {"description": "the server runs no --upstream"}})
    async def upstream_status():
        client = upstream_client()
        try:
            cards = await client.engine_models()
        except UpstreamError as e:
            raise oa.ApiError(e.status, e.message, code=e.code) from None
        return {"url": client.url, "model": client.model, "base_model": client.base_model, "engine_models": cards}

    @app.post("/admin/upstream", responses={403: {"description": "no admin key is set"},
                                            501: {"description": "no --upstream, or it cannot load adapters"}})
    async def upstream_switch(body: UpstreamSwitch):
        """Load an adapter on the engine (optional) and send new requests to the engine model
        `model` (null: the one it served at first); the requests in flight finish where they went."""
        client = upstream_client()
        if body.adapter and not body.model:
            raise oa.ApiError(400, "an adapter needs the model name to load it as", "model")
        try:
            loaded = await client.load_adapter(body.model, body.adapter) if body.adapter else False
            previous = await client.use_model(body.model)
        except UpstreamError as e:
            raise oa.ApiError(e.status, e.message, code=e.code) from None
        return {"status": "switched", "model": client.model, "previous": previous, "loaded": loaded}

    # ------------------------------------------------------------------------------- feedback

    @app.post("/v1/feedback", response_model=oa.FeedbackResponse,
              responses={404: {"description": "unknown message_id"}, 503: {"description": "feedback is off"}})
    async def feedback(body: oa.FeedbackRequest):
        if assistant.store is None:
            raise oa.ApiError(503, "this server keeps no feedback (started with --no-feedback)", code="feedback_off")
        _check_text(body)
        pending = writing.get(body.message_id)
        if pending is not None:
            # Still streaming, or stopped a moment ago and being written: its row comes shortly.
            try:
                await asyncio.wait_for(pending.wait(), FEEDBACK_WAIT_S)
            except TimeoutError:
                pass
        fields = (body.message_id, body.rating, body.reason, body.comment, body.correction)
        try:
            if body.feedback_id is None:
                row = await run_in_threadpool(assistant.store.add_feedback, *fields)
            else:
                row = await run_in_threadpool(assistant.store.update_feedback, body.feedback_id, *fields)
        except LookupError:
            if body.feedback_id is not None:
                raise oa.ApiError(404, f"no feedback {body.feedback_id} was given on reply {body.message_id!r} "
                                       "here", "feedback_id") from None
            raise oa.ApiError(404, f"no reply with id {body.message_id!r} was served here", "message_id") from None
        except DatabaseUnavailable:
            log.exception("a vote was not stored")         # the details (where the database is) stay here
            raise oa.ApiError(503, "the feedback database is unavailable; try again", code="db_unavailable") from None
        except ChatforgeError as e:
            raise oa.ApiError(400, str(e)) from None
        return {"id": row, "status": "stored"}

    return app


class _Gate:
    """Checks every request before the app sees it: the Host header (400 for a name this server
    does not answer to), shutting down (503), body size (413; a POST must say its length, 411),
    the API key on /v1/... and the admin key on /admin/... (401, compared in constant time); adds
    the security headers (`http.SECURITY_HEADERS`) to every answer and counts each by route and
    status. Plain ASGI, so streamed replies pass through untouched and a client that disconnects
    still cancels its generation."""

    def __init__(self, app, state, api_key: str | None, max_body_bytes: int, metrics: Metrics,
                 admin_key: str | None = None, allowed_hosts: Sequence[str] | None = None):
        self.app, self.state, self.api_key, self.max_body, self.metrics = app, state, api_key, max_body_bytes, metrics
        self.admin_key = admin_key
        self.allowed_hosts = None if allowed_hosts is None else {h.lower().strip("[]") for h in allowed_hosts}

    @staticmethod
    def _key_ok(headers: dict, key: str) -> bool:
        given = headers.get(b"authorization", b"").decode("latin-1")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        return hmac.compare_digest(token.encode(), key.encode())

    def check(self, scope) -> oa.ApiError | None:
        path, headers = scope["path"], dict(scope["headers"])
        if self.allowed_hosts is not None and host_name(headers.get(b"host")) not in self.allowed_hosts:
            # A page on another site whose name now points at 127.0.0.1 (DNS rebinding) would
            # otherwise read a keyless loopback server as its own origin.
            return oa.ApiError(400, "the Host header names a site this server does not serve; open it by "
                                    "its own address (or start it with --allowed-host NAME)", code="invalid_host")
        if self.state.stopping and path != "/metrics":
            return oa.ApiError(503, "the server is shutting down", code="shutting_down")
        length = headers.get(b"content-length")
        if scope["method"] in ("POST", "PUT", "PATCH") and length is None:
            return oa.ApiError(411, "send the request body with a Content-Length header")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return oa.ApiError(413, f"the request body is larger than {self.max_body} bytes")
        if self.api_key and path.startswith("/v1/") and not self._key_ok(headers, self.api_key):
            return oa.ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                               code="invalid_api_key")
        # The admin key is its own: a chat user's key never opens /admin/ (without an admin key
        # the route itself answers 403).
        if self.admin_key and path.startswith("/admin/") and not self._key_ok(headers, self.admin_key):
            return oa.ApiError(401, "missing or wrong admin key: send 'Authorization: Bearer ADMIN_KEY'",
                               code="invalid_api_key")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [0]

        async def counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        error = self.check(scope)
        try:
            if error is not None:
                await JSONResponse(error.body(), status_code=error.status)(scope, receive, counted)
            else:
                await self.app(scope, receive, counted)
        finally:
            self.metrics.requests.labels(_route(scope["path"]), str(status[0] or 499)).inc()


_swap_lock = threading.Lock()


def swap_model(assistant: Assistant, reload: Callable[[], tuple[Scheduler, Any]]) -> None:
    """Load the model again and serve new requests from it; the old scheduler finishes the
    requests it already has (none is dropped), then stops and frees its model and cache. A load
    that fails leaves the old model serving."""
    with _swap_lock:
        scheduler, tokenizer = reload()
        old = assistant.scheduler
        if getattr(old, "switched", None) and hasattr(scheduler, "switched"):
            # The engine model POST /admin/upstream moved to (the round's adapter) stays in use.
            scheduler.model = scheduler.switched = old.switched
        assistant.scheduler, assistant.tokenizer = scheduler, tokenizer
    threading.Thread(target=_retire, args=(old,), name="chatforge-drain", daemon=True).start()


def _retire(old: Scheduler) -> None:
    """Drain `old`, then give its memory back. Its thread and bound methods form reference
    cycles, so without a collection the weights stayed until the collector happened to run: two
    reloads took the demo server from 7.8 to 9.3 GB."""
    old.stop(drain=True)
    old.close()
    del old
    release_memory()


def release_memory() -> None:
    """Collect unreachable objects and hand freed heap pages back to the system. glibc keeps
    them otherwise: after the engine built its bf16 copy of the demo model, the dropped fp32
    weights still held 640 MB of the server's 1.27 GB (626 MB after a trim)."""
    gc.collect()
    give_back_memory()


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _route(path: str) -> str:
    """The metrics label of a path: known routes as they are, anything else as one label."""
    known = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/feedback", "/health", "/metrics", "/",
             "/admin/reload", "/admin/upstream")
    if path in known or path.startswith("/static/"):
        return "/static" if path.startswith("/static/") else path
    return "/v1/models/{id}" if path.startswith("/v1/models/") else "other"
