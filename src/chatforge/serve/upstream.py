"""Generation by another engine: `chatforge serve --upstream URL` sends each prompt to any
OpenAI-compatible server (llama.cpp's `llama-server`, `python -m llama_cpp.server`, vLLM, another
chatforge) and streams its tokens back; chatforge keeps everything else.

    client = UpstreamClient("http://127.0.0.1:8080", tokenizer, context=2048, max_batch=8, max_queue=64)
    assistant = Assistant(client, tokenizer, "demo", ...)     # in place of the local Scheduler

The app (`serve/app.py`) talks to one small interface, `Generator` below, which the local
continuous batcher (`infer/batching.Scheduler`) and `UpstreamClient` both implement: `submit`
a prompt's token ids with a `GenerationConfig` and get `Piece` events as text comes and one
`Done` at the end, through the `on_event` callback; `cancel()` the returned request; `queued`
and `running` for the metrics; `stop()` and `close()`. Retrieval, plugins, the prompt
(`infer/turn.fit_prompt`), the reply filter, the citation check, feedback, the page and
`/metrics` stay in chatforge and do not know which one generates.

How the prompt goes upstream. chatforge renders the prompt itself (the grounded format SFT
trained, the history fitted to the context with chatforge's own token counts) and sends it to
the engine's `/v1/completions`, as token ids where the engine takes them (llama-server, vLLM,
chatforge), else as its text (`llama_cpp.server`); the first request finds out which
(`probe`). So the engine sees exactly chatforge's prompt; the engine's own chat template is never
used. In text mode the engine tokenizes again with control tokens parsed, so a message holding a
control token's text ("<|im_end|>") would reach the model as a control token (chatforge
encodes it as plain text): such a request is refused (400) instead. Every reply's
`usage.prompt_tokens` is compared with chatforge's count: a difference means the engine's
tokenizer is not the model folder's, and is logged (once).

The citation stop. A grounded reply ends with its first citation, a pattern (balanced
parentheses, not on a copied context line) that no OpenAI `stop` string can express. The
engine gets the request's own `stop` strings; chatforge cuts the streamed text at the first stop
string, citation or control-token text itself (an engine that ignores `stop` is trimmed the
same) and then closes the stream, which makes the engine stop generating.

The round's adapters (`POST /admin/upstream`, `continual.reach_engine`). `load_adapter` has an
engine that loads LoRA adapters at runtime (vLLM with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True:
POST /v1/load_lora_adapter {"lora_name", "lora_path"}) load a PEFT folder under a new model name,
and `use_model` sends the requests submitted from then on to it: each request's body names its
model when it is sent, so the ones already streaming finish on the old name (the engine keeps
both loaded). The model moved to outlives a reload (`serve/app.swap_model`).

Failures become OpenAI-shaped errors (`UpstreamDone.status`): an engine that cannot be reached
503, one silent for `timeout` seconds (connecting, before its first token or between two) 504,
one that breaks off or answers an error 502 (its 400s, e.g. a context too long, stay 400; its
429 stays 429). At most `max_batch` requests are sent at once; `max_queue` more wait, and
beyond that `submit` raises `QueueFull` (429), as with the local batcher. Everything runs on
the server's event loop: a slow or dead engine holds no thread and delays no other request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence, Sized
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from chatforge.errors import ChatforgeError
from chatforge.infer.batching import Done, Piece, QueueFull, ShuttingDown
from chatforge.infer.engine import GenerationConfig
from chatforge.infer.sampling import first_stop

log = logging.getLogger("chatforge.upstream")
PROBE_TOKENS = 1
# /health (what a load balancer asks): unhealthy once this many requests in a row failed on the
# engine's side (unreachable, silent, 5xx), the last of them within FAILURE_WINDOW_S (an engine
# that gets no traffic after being taken out must be able to come back), or when a GET /v1/models
# to the engine fails; that probe's answer is kept HEALTH_CACHE_S so frequent checks stay cheap.
FAILURES_UNHEALTHY = 3
FAILURE_WINDOW_S = 30.0
HEALTH_TIMEOUT_S = 3.0
HEALTH_CACHE_S = 2.0


class Generator(Protocol):
    """What the app needs of whoever generates: `infer.batching.Scheduler` or `UpstreamClient`."""

    queued: int                       # requests waiting for a slot
    running: Sized                    # requests being generated

    def submit(self, prompt_ids: Sequence[int], cfg: GenerationConfig | None = None,
               on_event: Callable[[Piece | Done], None] | None = None) -> Any:
        """Start generating; raises QueueFull, ShuttingDown or ChatforgeError (a bad prompt). The
        result has `cancel()`, `outcome` (the Done once ended), `submitted` and `first_token`."""

    def stop(self, drain: bool = True, timeout: float | None = None) -> None: ...

    def close(self) -> None: ...


@dataclass
class UpstreamDone(Done):
    """`Done` of an upstream request: the engine's token count, and for an error the HTTP status
    and code it is answered with."""

    completion_tokens: int = 0
    status: int = 500
    code: str | None = None


class UpstreamError(Exception):
    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class UpstreamRequest:
    """One prompt sent upstream; the app reads it like `batching.Request`."""

    def __init__(self, prompt: list[int], cfg: GenerationConfig, on_event: Callable[[Piece | Done], None] | None,
                 loop: asyncio.AbstractEventLoop):
        self.prompt, self.cfg, self.on_event, self._loop = prompt, cfg, on_event, loop
        self.submitted = time.perf_counter()
        self.first_token: float | None = None
        self.outcome: Done | None = None
        self.cancelled = False
        self.task: asyncio.Task | None = None

    def cancel(self) -> None:
        """Stop it: its connection to the engine is closed, which ends the generation there."""
        self.cancelled = True
        if self.task is not None and not self.task.done():
            try:
                self._loop.call_soon_threadsafe(self.task.cancel)
            except RuntimeError:                    # the loop is closed: nothing runs any more
                pass

    def _emit(self, event: Piece | Done) -> None:
        if self.outcome is not None:
            return
        if isinstance(event, Done):
            self.outcome = event
        if self.on_event is not None:
            self.on_event(event)


class _TextCut:
    """Streamed text cut at the first stop string or end pattern, holding back a tail that may
    still become a stop string (as the local engine's text stream does with tokens)."""

    LOOKBACK = 1024

    def __init__(self, strings: Sequence[str], patterns: Sequence[str]):
        self.strings, self.patterns = tuple(strings), tuple(re.compile(p) for p in patterns)
        self.emitted, self.held, self.stopped = "", "", False

    def push(self, text: str, final: bool = False) -> str:
        if self.stopped:
            return ""
        tail = self.emitted[-self.LOOKBACK:]
        window = tail + self.held + text
        end, hit = first_stop(window, self.strings, self.patterns)
        if hit is not None:
            self.stopped = True
            out = window[len(tail):end] if end >= len(tail) else ""
            self.emitted, self.held = self.emitted + out, ""
            return out
        new = self.held + text
        hold = 0
        if not final:
            for s in self.strings:
                hold = max([hold, *(k for k in range(1, min(len(s), len(new) + 1)) if new.endswith(s[:k]))])
        out, self.held = new[:len(new) - hold], new[len(new) - hold:]
        self.emitted += out
        return out

    def finish(self) -> str:
        return self.push("", final=True)


class UpstreamClient:
    """Sends prompts to the OpenAI-compatible engine at `url` (see the module docstring).

    `tokenizer`: the model folder's (the engine must serve the same model); `context`: its
    context in tokens; `model`: the engine's model id (None: the only one its /v1/models lists);
    `key`: sent as `Authorization: Bearer KEY`; `timeout`: seconds the engine may stay silent."""

    def __init__(self, url: str, tokenizer, context: int, model: str | None = None, key: str | None = None,
                 timeout: float = 60.0, max_batch: int = 16, max_queue: int = 64):
        if not re.match(r"^https?://[^/\s]+", url or ""):
            raise ChatforgeError(f"--upstream must be an http(s) URL such as http://127.0.0.1:8080, got {url!r}")
        if timeout <= 0 or max_batch < 1 or max_queue < 0:
            raise ChatforgeError("--upstream-timeout must be above 0, --max-batch at least 1 and --max-queue at least 0")
        self.url = url.rstrip("/").removesuffix("/v1")
        self.tokenizer, self.context, self.model, self.key = tokenizer, context, model, key
        self.timeout, self.max_batch, self.max_queue = timeout, max_batch, max_queue
        self.base_model = model                     # what `use_model(None)` goes back to (set by `probe`)
        self.switched: str | None = None            # the model `use_model` moved to (a reload keeps it)
        self.prompt_format: str | None = None       # "ids" or "text", found by `probe`
        self.running: set[UpstreamRequest] = set()
        self._waiting = 0
        self._stopping = False
        self._idle = threading.Event()
        self._idle.set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._http: httpx.AsyncClient | None = None
        self._slots: asyncio.Semaphore | None = None
        self._ready: asyncio.Lock | None = None
        self._warned = False
        self._failures, self._last_failure = 0, (0.0, "")    # requests failed in a row; (when, why) of the last
        self._health: tuple[float, str | None] | None = None  # (when, reason or None) of the last probe
        special = tokenizer.special_tokens_map()
        names = [v for k, v in special.items() if k != "additional_special_tokens" and isinstance(v, str)]
        self.controls = tuple(dict.fromkeys([*names, *special.get("additional_special_tokens", [])]))

    # ------------------------------------------------------------------------------ interface

    @property
    def queued(self) -> int:
        return self._waiting

    def submit(self, prompt_ids: Sequence[int], cfg: GenerationConfig | None = None,
               on_event: Callable[[Piece | Done], None] | None = None) -> UpstreamRequest:
        """Queue a prompt; call on the event loop that serves the app."""
        cfg = cfg or GenerationConfig()
        if self._stopping:
            raise ShuttingDown("the server is shutting down; retry on another instance")
        if cfg.strategy == "beam" or cfg.num_return_sequences != 1:
            raise ChatforgeError("an upstream engine runs greedy or sampled decoding with one sequence per request")
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ChatforgeError("the prompt is empty; give at least one token")
        if len(prompt) >= self.context:
            raise ChatforgeError(f"the prompt has {len(prompt)} tokens but the model's context is {self.context}")
        if self._waiting + len(self.running) >= self.max_batch + self.max_queue:
            raise QueueFull(f"{self._waiting} requests are already waiting; retry later")
        loop = asyncio.get_running_loop()
        self._bind(loop)
        request = UpstreamRequest(prompt, cfg, on_event, loop)
        self._waiting += 1
        self._idle.clear()
        request.task = loop.create_task(self._run(request))
        return request

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Take no new requests; with `drain` let the sent ones finish, else cancel them."""
        self._stopping = True
        if not drain:
            for request in list(self.running):
                request.cancel()
        if self._loop is not None and self._loop.is_running() and not self._in_loop():
            self._idle.wait(timeout)

    def close(self) -> None:
        """Stop and close the connections to the engine."""
        self.stop(drain=False, timeout=10)
        http, self._http = self._http, None
        if http is not None and self._loop is not None and self._loop.is_running() and not self._in_loop():
            asyncio.run_coroutine_threadsafe(http.aclose(), self._loop)

    async def health(self) -> str | None:
        """None when the engine looks usable, else why not (the server's /health answers 503
        with it): the last FAILURES_UNHEALTHY requests failed on the engine's side, or the engine
        does not answer GET /v1/models within HEALTH_TIMEOUT_S."""
        now = time.monotonic()
        when, why = self._last_failure
        if self._failures >= FAILURES_UNHEALTHY and now - when < FAILURE_WINDOW_S:
            return f"the upstream engine failed the last {self._failures} requests; the last: {why}"
        if self._health is not None and now - self._health[0] < HEALTH_CACHE_S:
            return self._health[1]
        self._bind(asyncio.get_running_loop())
        reason = None
        for attempt in (0, 1):
            try:
                await self._send(self._http, "GET", "/v1/models", timeout=HEALTH_TIMEOUT_S)
                reason = None
                break
            except UpstreamError as e:
                reason = (f"the upstream engine at {self.url} did not answer GET /v1/models within "
                          f"{HEALTH_TIMEOUT_S:g} s" if e.code == "upstream_timeout" else e.message)
                # A kept-alive connection the engine had closed: once more, on a new one.
                if e.code != "upstream_error":
                    break
        self._health = (time.monotonic(), reason)
        return reason

    def _count(self, error: UpstreamError | None) -> None:
        """Keep the run of failed requests for `health`: the engine's failures (unreachable,
        silent, 5xx) lengthen it, a reply ends it; its 4xx (a prompt it refused) do neither."""
        if error is None:
            self._failures = 0
        elif error.status >= 500:
            self._failures += 1
            self._last_failure = (time.monotonic(), error.message)

    # ------------------------------------------------------------------ adapters (the round)

    async def engine_models(self) -> list[dict]:
        """The model cards of the engine's GET /v1/models (vLLM lists its loaded adapters too,
        each with `parent`, and `root`: the folder it was loaded from)."""
        self._bind(asyncio.get_running_loop())
        r = await self._send(self._http, "GET", "/v1/models", timeout=HEALTH_TIMEOUT_S * 10)
        return [m for m in r.json().get("data", []) if isinstance(m, dict)]

    async def load_adapter(self, name: str, path: str) -> bool:
        """Have the engine load the PEFT adapter folder `path` as the model `name` (vLLM's
        POST /v1/load_lora_adapter); False when it already serves `name`. An engine without that
        endpoint (llama-server, Ollama, vLLM without VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)
        raises UpstreamError 501 `runtime_lora_unsupported`."""
        if any(m.get("id") == name for m in await self.engine_models()):
            return False     # loaded before (a rollback to it): in-flight requests may still use it
        try:
            r = await self._http.post(self.url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path},
                                      timeout=max(self.timeout, 120.0))
        except httpx.HTTPError as e:
            raise self._transport_error(e) from None
        # The route missing (404 / 405 without a word about the adapter) is an engine that cannot;
        # vLLM's 404 for a path without an adapter names it, and is the adapter's fault.
        if r.status_code == 405 or (r.status_code == 404 and not re.search(r"adapter|lora", r.text, re.I)):
            raise UpstreamError(501, f"the upstream engine at {self.url} does not load LoRA adapters at runtime "
                                     f"(POST /v1/load_lora_adapter answered {r.status_code}); vLLM does when started "
                                     "with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True",
                                "runtime_lora_unsupported")
        if r.status_code != 200:
            e = self._status_error(r.status_code, r.text)
            # The engine's 4xx (vLLM: 404 for a path without an adapter) is the adapter's fault: a 400 to
            # the admin. vLLM answers every other refusal (a rank above --max-lora-rank) with 500, which
            # stays a 5xx: the engine's own reason is in the message.
            raise UpstreamError(400 if r.status_code < 500 else e.status, f"the engine did not load the adapter {path}: {e.message}", "adapter_rejected")
        log.info("upstream %s: loaded the adapter %s as %s", self.url, path, name)
        return True

    async def use_model(self, name: str | None) -> str | None:
        """Send new requests to the engine's model `name` (None: the one it served at first);
        requests already sent finish on the one they went to. Returns the model used before.
        The engine must list `name` (GET /v1/models): a typo never reaches the users."""
        cards = await self.engine_models()
        if name is None:
            if self.base_model is None:
                async with self._ready:
                    await self._probe(self._http)
            name = self.base_model
        ids = [m.get("id") for m in cards]
        if name not in ids:
            raise UpstreamError(400, f"the upstream engine at {self.url} does not serve {name!r} (it serves: "
                                     f"{', '.join(map(str, ids)) or 'nothing'}); load the adapter first",
                                "model_not_found")
        previous, self.model = self.model, name
        self.switched = None if name == self.base_model else name
        log.info("upstream %s: new requests go to %s (was %s)", self.url, name, previous)
        return previous

    # ------------------------------------------------------------------------------ the probe

    def check(self) -> str:
        """Probe the engine now (at start-up, before the event loop runs): a line saying what
        it serves and how prompts go to it. Raises UpstreamError when it cannot be used."""
        async def run() -> None:
            async with self._client() as http:
                await self._probe(http)

        asyncio.run(run())
        return f"{self.url} serving {self.model or '(unnamed model)'}, prompts as {'token ids' if self.prompt_format == 'ids' else 'text'}"

    async def _probe(self, http: httpx.AsyncClient) -> None:
        """Find the engine's model id (unless given) and whether /v1/completions takes token ids."""
        if self.model is None:
            r = await self._send(http, "GET", "/v1/models")
            cards = [m for m in r.json().get("data", []) if isinstance(m, dict)]
            ids = [m.get("id") for m in cards]
            # LoRA adapters an engine loaded (vLLM lists them with their `parent`) are not its model.
            bases = [m.get("id") for m in cards if not m.get("parent")]
            ids = bases if len(bases) == 1 else ids
            if len(ids) != 1:
                raise UpstreamError(502, f"the engine at {self.url} serves {len(ids)} models ({', '.join(map(str, ids))}); "
                                         "choose one with --upstream-model", "upstream_model")
            self.model = ids[0]
        if self.base_model is None:
            self.base_model = self.model
        ids, _ = self.tokenizer.render_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)
        body = {"model": self.model, "max_tokens": PROBE_TOKENS, "temperature": 0}
        try:
            await self._send(http, "POST", "/v1/completions", json={**body, "prompt": ids})
            self.prompt_format = "ids"
        except UpstreamError as e:
            if e.code in ("upstream_unavailable", "upstream_timeout"):
                raise
            # An engine that takes only text (llama_cpp.server answers a list of ids with 500).
            await self._send(http, "POST", "/v1/completions", json={**body, "prompt": self.tokenizer.decode(ids)})
            self.prompt_format = "text"
        log.info("upstream %s: model %s, prompts as %s", self.url, self.model, self.prompt_format)

    async def _send(self, http: httpx.AsyncClient, method: str, path: str, **kw) -> httpx.Response:
        try:
            r = await http.request(method, self.url + path, **kw)
        except httpx.HTTPError as e:
            raise self._transport_error(e) from None
        if r.status_code != 200:
            raise self._status_error(r.status_code, r.text)
        return r

    # ------------------------------------------------------------------------- one request

    def _client(self) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        timeout = httpx.Timeout(self.timeout, connect=min(self.timeout, 10.0))
        limits = httpx.Limits(max_connections=self.max_batch + 4, max_keepalive_connections=self.max_batch)
        return httpx.AsyncClient(headers=headers, timeout=timeout, limits=limits)

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is not loop:       # the app's loop (a reload keeps it; a test starts a new one)
            self._loop, self._http = loop, self._client()
            self._slots, self._ready = asyncio.Semaphore(self.max_batch), asyncio.Lock()

    def _in_loop(self) -> bool:
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    async def _run(self, request: UpstreamRequest) -> None:
        try:
            try:
                async with self._slots:
                    self._waiting -= 1
                    self.running.add(request)
                    await self._generate(request)
                self._count(None)
            except BaseException:
                if request not in self.running:
                    self._waiting -= 1
                raise
        except asyncio.CancelledError:
            request._emit(Done("", [], "cancelled", len(request.prompt)))
        except UpstreamError as e:
            self._count(e)
            log.warning("upstream request failed: %s", e.message)
            request._emit(UpstreamDone("", [], "error", len(request.prompt), error=e.message, status=e.status,
                                       code=e.code))
        except Exception as e:
            self._count(UpstreamError(502, f"{type(e).__name__}: {e}", "upstream_error"))
            log.exception("upstream request failed")
            request._emit(UpstreamDone("", [], "error", len(request.prompt), error=f"{type(e).__name__}: {e}",
                                       status=502, code="upstream_error"))
        finally:
            self.running.discard(request)
            if not self.running and not self._waiting:
                self._idle.set()

    def _body(self, request: UpstreamRequest) -> dict:
        cfg, prompt = request.cfg, request.prompt
        body: dict[str, Any] = {
            "prompt": prompt if self.prompt_format == "ids" else self.tokenizer.decode(prompt),
            "max_tokens": min(cfg.max_new_tokens, self.context - len(prompt)),
            "stream": True, "stream_options": {"include_usage": True},
            "temperature": 0 if cfg.greedy else cfg.temperature}
        if self.model is not None:
            body["model"] = self.model
        if not cfg.greedy and cfg.top_p < 1:
            body["top_p"] = cfg.top_p
        if cfg.stop_strings:
            body["stop"] = list(cfg.stop_strings)
        if cfg.seed is not None:
            body["seed"] = cfg.seed
        if cfg.frequency_penalty:
            body["frequency_penalty"] = cfg.frequency_penalty
        if cfg.presence_penalty:
            body["presence_penalty"] = cfg.presence_penalty
        if cfg.repetition_penalty != 1.0:
            # vLLM's and chatforge's name, then llama.cpp's; each engine ignores the other's
            body["repetition_penalty"] = body["repeat_penalty"] = cfg.repetition_penalty
        return body

    def _injected(self, prompt: list[int]) -> str | None:
        """A control token's text in the prompt that is not the token itself: in text mode the
        engine would read it as the token (a message could forge a turn)."""
        text = self.tokenizer.decode(prompt)
        for name in self.controls:
            if text.count(name) != sum(1 for t in prompt if self.tokenizer.id_to_token(t) == name):
                return name
        return None

    async def _generate(self, request: UpstreamRequest) -> None:
        if self.prompt_format is None:
            async with self._ready:
                if self.prompt_format is None:
                    await self._probe(self._http)
        if self.prompt_format == "text" and (name := self._injected(request.prompt)):
            raise UpstreamError(400, f"the message holds the text {name!r}, a control token of this model, which "
                                     "the upstream engine would read as the token itself; remove it", "invalid_text")
        cut = _TextCut((*request.cfg.stop_strings, *self.controls), request.cfg.stop_after)
        finish, usage, pieces = None, None, 0
        try:
            r = await self._send_stream(self._body(request))
            try:
                if r.status_code != 200:
                    raise self._status_error(r.status_code, (await r.aread()).decode("utf-8", "replace"))
                if r.headers.get("content-type", "").startswith("application/json"):
                    lines = [f"data: {(await r.aread()).decode('utf-8', 'replace')}"]   # an engine that does not stream
                else:
                    lines = r.aiter_lines()
                async for line in _lines(lines):
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    try:
                        chunk = json.loads(data)
                    except ValueError:
                        raise UpstreamError(502, f"the upstream engine sent a chunk that is not JSON: {data[:200]}",
                                            "upstream_error") from None
                    if not isinstance(chunk, dict):
                        continue
                    if "error" in chunk:
                        raise self._status_error(502, data)
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or []:
                        text = choice.get("text") or ""
                        finish = choice.get("finish_reason") or finish
                        if text:
                            pieces += 1
                            if request.first_token is None:
                                request.first_token = time.perf_counter()
                            out = cut.push(text)
                            if out:
                                request._emit(Piece(out, pieces))
                    if cut.stopped:
                        finish = "stop"
                        break
            finally:
                await r.aclose()          # closing early (a stop, a cancel) makes the engine stop
        except httpx.HTTPError as e:
            raise self._transport_error(e) from None
        tail = cut.finish()
        if tail:
            request._emit(Piece(tail, pieces))
        prompt_tokens = len(request.prompt)
        counted = usage.get("prompt_tokens") if isinstance(usage, dict) else None
        if isinstance(counted, int) and counted != prompt_tokens and not self._warned:
            self._warned = True
            log.warning("the upstream engine counted %d prompt tokens where chatforge counts %d: its "
                            "tokenizer (or BOS setting) is not the model folder's; answers may suffer",
                            usage["prompt_tokens"], prompt_tokens)
        done = isinstance(usage, dict) and usage.get("completion_tokens")
        tokens = done if isinstance(done, int) else len(self.tokenizer.encode(cut.emitted)) if cut.emitted else 0
        reason = "length" if finish == "length" else "stop"
        request._emit(UpstreamDone(cut.emitted, [], reason, prompt_tokens, completion_tokens=tokens))

    async def _send_stream(self, body: dict) -> httpx.Response:
        """POST a streamed completion; once more on a new connection when the kept-alive one it
        went out on turns out closed before any answer (llama-server closes idle connections,
        and a request can race that: "Server disconnected without sending a response")."""
        for attempt in (0, 1):
            try:
                return await self._http.send(self._http.build_request("POST", self.url + "/v1/completions", json=body),
                                             stream=True)
            except (httpx.RemoteProtocolError, httpx.ReadError):
                if attempt:
                    raise
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------------------ errors

    def _transport_error(self, e: httpx.HTTPError) -> UpstreamError:
        if isinstance(e, httpx.TimeoutException) and not isinstance(e, httpx.ConnectTimeout):
            return UpstreamError(504, f"the upstream engine at {self.url} sent nothing for {self.timeout:g} s "
                                      "(--upstream-timeout); retry later", "upstream_timeout")
        if isinstance(e, (httpx.ConnectError, httpx.ConnectTimeout)):
            return UpstreamError(503, f"the upstream engine at {self.url} cannot be reached ({e or type(e).__name__}); "
                                      "check that it is running", "upstream_unavailable")
        return UpstreamError(502, f"the upstream engine at {self.url} broke off the reply ({type(e).__name__}: {e})",
                             "upstream_error")

    def _status_error(self, status: int, text: str) -> UpstreamError:
        try:
            error = json.loads(text).get("error")
            message = error.get("message") if isinstance(error, dict) else error
        except (ValueError, AttributeError):
            message = None
        message = str(message) if message else text.strip()[:300] or f"HTTP {status}"
        said = f"the upstream engine answered {status}: {message}"
        if status == 400:
            return UpstreamError(400, said, "upstream_rejected")
        if status == 429:
            return UpstreamError(429, said + "; retry later", "upstream_busy")
        if status in (401, 403):
            return UpstreamError(502, said + " (check --upstream-key)", "upstream_auth")
        if status == 404:
            return UpstreamError(502, said + " (check --upstream and --upstream-model)", "upstream_model")
        if status == 503:
            return UpstreamError(503, said, "upstream_unavailable")
        return UpstreamError(502, said, "upstream_error")


async def _lines(lines):
    """The lines of a streamed answer (an async iterator) or of a whole one (a list)."""
    if isinstance(lines, list):
        for line in lines:
            yield line
    else:
        async for line in lines:
            yield line
