"""Continuous batching: one decode loop over every running request, which join and leave at any step.

    scheduler = Scheduler(engine, max_batch=16, max_queue=64)
    scheduler.start()                       # the loop runs in its own thread
    request = scheduler.submit(prompt_ids, GenerationConfig(max_new_tokens=64))
    for event in request.events():          # Piece(text, ...) as tokens come, then Done(...)
        ...
    request.cancel()                        # leaves the batch at the next step
    scheduler.stop()

`Engine.generate` runs a fixed batch from start to end: right for evaluation and rollouts, where all
prompts are known at once. A server gets requests one by one at any time; waiting for a whole
batch to finish before starting the next would leave a new request queued behind the longest
reply. Here each step of the loop:
1. admits waiting requests while slots are free: each is prefilled alone (no padding) into its own
   slot of the KV cache, and its first token comes out of that prefill;
2. runs one decode step over every running request at once: each row has its own length, RoPE
   position and attention mask over its own slot, so a request's output does not depend on the
   others in the batch (the greedy output equals `Engine.generate` alone; the tests check it);
3. drops finished and cancelled requests at once, moving the last row into the freed slot so the
   running rows stay contiguous.

The model, weights' dtype, stop tokens, threads and the logits processors are the engine's: there
is one engine, with two ways to drive it. Each request keeps its own `GenerationConfig` (greedy
or sampled, penalties, stop strings, seed). Beam search is not offered here (it keeps several rows
per request and knows its answer only at the end); `Engine.generate` has it.

Events are delivered through `Request.events()` (a blocking iterator) or, for an asyncio server,
through the `on_event` callback given to `submit`, called on the scheduler's thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from chatforge.errors import ChatforgeError
from chatforge.infer.engine import Engine, GenerationConfig, _TextStream
from chatforge.infer.sampling import LogitsPipeline

log = logging.getLogger("chatforge.batching")


class QueueFull(ChatforgeError):
    """More requests are waiting than the scheduler accepts (a server answers 429)."""


class ShuttingDown(ChatforgeError):
    """The scheduler is stopping and takes no new requests (a server answers 503)."""


@dataclass
class Piece:
    """New text of a request, as soon as it is whole characters and cannot be part of a stop string."""

    text: str                         # never empty
    tokens: int                       # tokens generated so far


@dataclass
class Done:
    """The end of a request: its whole output and why it stopped."""

    text: str                         # the whole completion, cut before a stop string
    tokens: list[int]                 # generated ids, without the stop token
    finish_reason: str                # "stop", "length" or "cancelled"; "error" with `error` set
    prompt_tokens: int
    error: str | None = None


@dataclass
class Request:
    """One submitted prompt. Read it with `events()`; `cancel()` drops it at the next step."""

    prompt: list[int]
    cfg: GenerationConfig
    on_event: Callable[[Piece | Done], None] | None = None
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None  # perf_counter time of the first generated token
    outcome: Done | None = None       # set when it ends
    _finished: threading.Event = field(default_factory=threading.Event, repr=False)
    _events: queue.Queue = field(default_factory=queue.Queue, repr=False)
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def events(self, timeout: float | None = None) -> Iterator[Piece | Done]:
        """Yield the request's events until (and including) its `Done`."""
        while True:
            event = self._events.get(timeout=timeout)
            yield event
            if isinstance(event, Done):
                return

    def result(self, timeout: float | None = None) -> Done:
        """Wait for the request to finish and return its `Done` (TimeoutError if it does not)."""
        if not self._finished.wait(timeout):
            raise TimeoutError("the request has not finished")
        return self.outcome

    def _emit(self, event: Piece | Done) -> None:
        if isinstance(event, Done):
            self.outcome = event
            self._finished.set()
        if self.on_event is not None:
            self.on_event(event)
        else:
            self._events.put(event)


class SlotCache:
    """Keys and values for up to `slots` requests, each in its own slot with its own length.

    Shaped like the engine's `KVCache` ((n_layer, slots, n_kv_head, capacity, head_dim)), but
    each slot fills from position 0 and `lengths[s]` says how far. Capacity grows by doubling as
    the longest request needs (up to the model's context), so a server with many slots does not
    reserve the whole context for each: the 135M model's fp32 cache is 46 KB per position and
    slot, 377 MB for one slot at its full 8192-token context.

    The model calls `update(layer, k, v)` as on any cache. In decode mode (`begin_decode(n)`),
    rows 0..n-1 each write their one new key at their own length; in prefill mode
    (`begin_prefill(slot)`), one request's prompt is written at the start of its slot.
    """

    def __init__(self, n_layer: int, slots: int, n_kv_head: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, capacity: int = 256):
        self.n_layer, self.slots, self.max_len = n_layer, slots, max_len
        self.shape = (n_layer, slots, n_kv_head, 0, head_dim)
        self.dtype, self.device = dtype, device
        self.lengths = [0] * slots
        self.capacity = 0
        self.k = self.v = None
        self._grow(min(capacity, max_len))
        self._mode: tuple[str, int] = ("decode", 0)
        self._index: torch.Tensor | None = None
        self._view = 0

    def _grow(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        new = min(self.max_len, max(needed, 2 * self.capacity))
        shape = (*self.shape[:3], new, self.shape[4])
        # Zeroed, unlike KVCache: a decode step reads every row up to the longest one, and a
        # shorter row's masked positions still enter the attention product as 0 * value, which
        # is NaN when uninitialised memory happens to hold a NaN (seen: greedy output turned to
        # token 0 at random). Stale values a finished request leaves behind are finite.
        k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        if self.k is not None:
            k[:, :, :, :self.capacity] = self.k
            v[:, :, :, :self.capacity] = self.v
        self.k, self.v, self.capacity = k, v, new

    def begin_prefill(self, slot: int, length: int) -> None:
        self._grow(length)
        self._mode = ("prefill", slot)

    def begin_decode(self, n: int) -> torch.Tensor:
        """Set up a decode step over rows 0..n-1; returns their attention mask (n, 1, 1, S)."""
        lengths = self.lengths[:n]
        self._grow(max(lengths) + 1)
        self._mode = ("decode", n)
        self._index = torch.tensor(lengths, device=self.device)
        self._view = max(lengths) + 1
        cols = torch.arange(self._view, device=self.device)
        return (cols[None, :] <= self._index[:, None])[:, None, None, :]

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mode, arg = self._mode
        k_all, v_all = self.k[layer_idx], self.v[layer_idx]                      # (slots, nkv, cap, hs)
        if mode == "prefill":
            T = k.shape[2]
            k_slot, v_slot = k_all[arg:arg + 1], v_all[arg:arg + 1]
            k_slot[:, :, :T] = k
            v_slot[:, :, :T] = v
            return k_slot[:, :, :T], v_slot[:, :, :T]
        n = arg
        rows = torch.arange(n, device=self.device)
        # Row r writes its new key at position lengths[r] of its own slot.
        # (Index assignment does not convert: bf16 weights write into the fp32 CPU cache.)
        k_all[rows, :, self._index] = k[:, :, 0].to(k_all.dtype)
        v_all[rows, :, self._index] = v[:, :, 0].to(v_all.dtype)
        return k_all[:n, :, :self._view], v_all[:n, :, :self._view]

    def move(self, src: int, dst: int) -> None:
        """Slot `dst` takes what slot `src` holds (the last running row fills a freed slot)."""
        n = self.lengths[src]
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.lengths[dst] = n


class _Running:
    """A request in the batch: its slot's sampling state and its text so far."""

    def __init__(self, request: Request, engine: Engine, vocab_size: int):
        cfg = request.cfg
        self.request, self.cfg = request, cfg
        self.pipeline = LogitsPipeline(cfg, [list(request.prompt)], vocab_size, engine.device, for_beam=False)
        self.stops = engine._stop_strings(cfg)
        self.generator = None
        if not cfg.greedy and cfg.seed is not None:
            self.generator = torch.Generator(device=engine.device).manual_seed(cfg.seed)
        self.text = (_TextStream(engine.tokenizer, cfg.stop_strings, cfg.stop_after)
                     if engine.tokenizer is not None else None)
        self.tokens: list[int] = []
        self.budget = min(cfg.max_new_tokens, engine.config.max_seq_len - len(request.prompt))
        self.finish: tuple[str, int | str | None] | None = None    # (reason, stop) once done
        self.next_token = 0


class Scheduler:
    """Runs `engine`'s model over every submitted request, continuously batched (see module docs)."""

    def __init__(self, engine: Engine, max_batch: int = 16, max_queue: int = 64):
        if max_batch < 1 or max_queue < 0:
            raise ChatforgeError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        self.engine, self.max_batch, self.max_queue = engine, max_batch, max_queue
        cfg = engine.config
        self.cache = SlotCache(cfg.n_layer, max_batch, cfg.n_kv_head, cfg.max_seq_len, cfg.head_dim,
                               engine.cache_dtype, engine.device)
        self.running: list[_Running] = []
        self._waiting: queue.Queue[Request] = queue.Queue()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.steps = 0                      # decode steps run (for tests and metrics)

    # ----------------------------------------------------------------------------------- public

    @property
    def queued(self) -> int:
        """Requests waiting for a slot."""
        return self._waiting.qsize()

    def submit(self, prompt_ids: Sequence[int], cfg: GenerationConfig | None = None,
               on_event: Callable[[Piece | Done], None] | None = None) -> Request:
        """Queue a prompt; raises `QueueFull` or `ShuttingDown`, or `ChatforgeError` for a bad prompt."""
        cfg = cfg or GenerationConfig()
        if cfg.strategy == "beam" or cfg.num_return_sequences != 1:
            raise ChatforgeError("continuous batching runs greedy or sampled decoding with one sequence "
                                 "per request; use Engine.generate for beam search or n-best")
        (prompt,) = self.engine._check_prompts([prompt_ids], cfg)
        with self._lock:
            if self._stopping.is_set():
                raise ShuttingDown("the server is shutting down; retry on another instance")
            if self._waiting.qsize() >= self.max_queue + max(0, self.max_batch - len(self.running)):
                raise QueueFull(f"{self._waiting.qsize()} requests are already waiting; retry later")
            request = Request(prompt, cfg, on_event)
            self._waiting.put(request)
        self._wake.set()
        return request

    def start(self) -> "Scheduler":
        """Run the loop in a daemon thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="chatforge-scheduler", daemon=True)
            self._thread.start()
        return self

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Take no new requests; with `drain` finish the running and waiting ones, else cancel them."""
        self._stopping.set()
        if not drain:
            for r in self.running:
                r.request.cancel()
            for r in list(self._waiting.queue):
                r.cancel()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def run_until_idle(self) -> None:
        """Run steps on the caller's thread until nothing is running or waiting (tests, batch use)."""
        while self.running or not self._waiting.empty():
            self.step()

    # ------------------------------------------------------------------------------------ loop

    def _loop(self) -> None:
        while True:
            if not self.running and self._waiting.empty():
                if self._stopping.is_set():
                    return
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                self.step()
            except Exception as e:          # noqa: BLE001 - a failed step must not kill the server
                log.exception("a generation step failed; its requests end with an error")
                self._fail_all(f"generation failed: {type(e).__name__}: {e}")

    def step(self) -> None:
        """Admit waiting requests into free slots, then one decode step over the batch."""
        with torch.inference_mode(), self.engine._thread_limit():
            while len(self.running) < self.max_batch and not self._waiting.empty():
                request = self._waiting.get()
                if request.cancelled:
                    request._emit(Done("", [], "cancelled", len(request.prompt)))
                    continue
                try:
                    self._admit(request)
                except Exception as e:      # noqa: BLE001 - one request's failure is its own
                    # The running rows are untouched (the request only joins them once its
                    # prefill is done), so only this request ends, with an error.
                    log.exception("admitting a request failed; it ends with an error")
                    request._emit(Done("", [], "error", len(request.prompt),
                                       error=f"admission failed: {type(e).__name__}: {e}"))
            self._drop_finished()
            if self.running:
                self._decode()
                self._drop_finished()

    def _admit(self, request: Request) -> None:
        slot = len(self.running)
        run = _Running(request, self.engine, self.engine.config.vocab_size)
        ids = torch.tensor([request.prompt], device=self.engine.device)
        self.cache.begin_prefill(slot, len(request.prompt))
        positions = torch.arange(len(request.prompt), device=self.engine.device).unsqueeze(0)
        logits = self.engine._forward(ids, self.cache, positions, None)                     # (1, V)
        self.cache.lengths[slot] = len(request.prompt)
        self.running.append(run)
        self._take(run, logits[0])

    def _decode(self) -> None:
        n = len(self.running)
        mask = self.cache.begin_decode(n)
        tokens = torch.tensor([[r.next_token] for r in self.running], device=self.engine.device)
        positions = torch.tensor([[self.cache.lengths[i]] for i in range(n)], device=self.engine.device)
        logits = self.engine._forward(tokens, self.cache, positions, mask)                  # (n, V)
        for i in range(n):
            self.cache.lengths[i] += 1
        self.steps += 1
        for i, run in enumerate(self.running):
            self._take(run, logits[i])

    def _take(self, run: _Running, logits: torch.Tensor) -> None:
        """Choose the request's next token from its logits row and emit what it adds."""
        if run.request.cancelled:
            run.finish = ("cancelled", None)
            return
        try:
            logits = run.pipeline(logits.unsqueeze(0))
            if run.cfg.greedy:
                token = int(logits.argmax(-1))
            else:
                probs = torch.softmax(run.pipeline.warp(logits), dim=-1)
                token = int(torch.multinomial(probs, 1, generator=run.generator))
        except Exception as e:              # noqa: BLE001
            # One request's settings (say, penalties that drive every logit to -inf) end that
            # request only; the rest of the batch goes on.
            log.warning("a request's sampling failed: %s", e)
            run.finish = ("error", str(e))
            return
        request = run.request
        if request.first_token is None:
            request.first_token = time.perf_counter()
        if token in self.engine.stop_ids:
            run.finish = ("stop", token)
            return
        run.tokens.append(token)
        run.pipeline.append([token], [False])
        run.next_token = token
        if run.text is not None:
            piece = run.text.push(token)          # held back while it could start a stop string
            if piece:
                request._emit(Piece(piece, len(run.tokens)))
            if run.text.stopped:
                run.finish = ("stop", run.stops.match(run.tokens) if run.stops is not None else None)
                return
        elif run.stops is not None and run.stops.match(run.tokens) is not None:
            run.finish = ("stop", run.stops.match(run.tokens))
            return
        if len(run.tokens) >= run.budget:
            run.finish = ("length", None)

    def _drop_finished(self) -> None:
        i = 0
        while i < len(self.running):
            run = self.running[i]
            if run.finish is None and run.request.cancelled:
                run.finish = ("cancelled", None)
            if run.finish is None:
                i += 1
                continue
            self._finish(run)
            last = len(self.running) - 1
            if i != last:
                self.cache.move(last, i)
                self.running[i] = self.running[last]
            self.running.pop()

    def _finish(self, run: _Running) -> None:
        reason, stop = run.finish
        if reason == "error":
            run.request._emit(Done("", run.tokens, "error", len(run.request.prompt), error=f"sampling failed: {stop}"))
            return
        tail = run.text.finish() if run.text is not None and reason != "cancelled" else ""
        if tail:
            run.request._emit(Piece(tail, len(run.tokens)))
        completion = self.engine._completion(run.tokens, reason, stop)
        run.request._emit(Done(completion.text or "", run.tokens, reason, len(run.request.prompt)))

    def _fail_all(self, message: str) -> None:
        for run in self.running:
            run.request._emit(Done("", run.tokens, "error", len(run.request.prompt), error=message))
        self.running.clear()
