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
1. prefills at most `prefill_chunk` prompt tokens (`burst_tokens` while nothing decodes): waiting
   requests are admitted while slots are free and the KV-cache budget holds them beside the
   running ones at their worst; short prompts go in whole, those waiting together in one forward
   (right-padded, each into its own slot, each row's logits at its own last token: 16 chats
   sent at once to the 135M model's server got their first text 2.3-3x sooner at the median
   than with one forward each, benchmarks/bench_serve_limits.py), also while a long prompt is
   halfway in; a long one goes in a chunk a step (`_chunk_tokens`), waiting while requests that
   have just started decode their first tokens, so a long prompt does not hold every other reply
   up for its whole prefill; a request's first token comes out of its last chunk;
2. runs one decode step over every running request at once: each row has its own length, RoPE
   position and attention mask over its own slot, so a request's output does not depend on the
   others in the batch (the greedy output equals `Engine.generate` alone; the tests check it);
3. drops finished and cancelled requests at once, moving the last row into the freed slot so the
   running rows stay contiguous, and gives cache memory back as the batch shrinks.
A failure while a request is admitted, prefilled or sampled ends that request alone.

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
from chatforge.runtime import give_back_memory
from chatforge.infer.engine import Engine, GenerationConfig, TextStream

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
    """Keys and values for up to `slots` requests, each in its own slot with its own length,
    within a budget of `budget_bytes`.

    Per layer, a (rows, n_kv_head, capacity, head_dim) tensor of keys and one of values; each
    slot fills from position 0 and `lengths[s]` says how far. Only the rows in use (`active`) and
    the positions the longest of them needs are allocated, and `trim` gives memory back when
    requests end (an idle cache holds none). Rows grow by doubling; positions by a quarter at a
    time, rounded up to `BLOCK`, so at most about a quarter of it is room not yet used (doubling
    kept up to half of it empty: 8 requests of 730 positions held 1,024 each). A resize goes layer
    by layer, so the old and the new cache never both exist whole: the peak is the new size plus
    one layer. The 135M model's bf16 cache is 23 KB per position and slot: sized for 16 slots at
    the longest prompt ever seen and never shrunk, as the first version was, one 7,900-token prompt
    kept 5.7 GB (fp32) for good.

    The scheduler admits a request only when every running one can reach its worst case
    (`fits`), so a request never runs out of cache halfway; the rows share one capacity (a decode
    step reads them as one tensor), so a long request makes every row that long.

    The model calls `update(layer, k, v)` as on any cache. In decode mode (`begin_decode(n)`),
    rows 0..n-1 each write their one new key at their own length; in prefill mode
    (`begin_prefill(slot, start, length, rows)`), a chunk of prompts is written at `start` of
    `rows` consecutive slots from `slot` (several prompts prefilled together, right-padded: a
    slot's positions past its own length hold finite values nobody reads, overwritten as it grows).
    """

    BLOCK = 64

    def __init__(self, n_layer: int, slots: int, n_kv_head: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, capacity: int = 256, budget_bytes: int | None = None):
        self.n_layer, self.slots, self.max_len = n_layer, slots, max_len
        self.n_kv_head, self.head_dim = n_kv_head, head_dim
        self.dtype, self.device = dtype, device
        # Keys and values of one position of one slot, over all layers.
        self.position_bytes = 2 * n_layer * n_kv_head * head_dim * torch.empty((), dtype=dtype).element_size()
        self.budget = budget_bytes if budget_bytes is not None else slots * max_len * self.position_bytes
        self.lengths = [0] * slots
        self.active = 0                    # rows in use (running, and those being prefilled)
        self.rows = self.capacity = 0      # allocated
        self.peak_bytes = 0
        self.k: list[torch.Tensor] | None = None
        self.v: list[torch.Tensor] | None = None
        self._min_capacity = min(capacity, max_len)
        self._mode: tuple[str, int] = ("decode", 0)
        self._prefill_rows = 1
        self._index: torch.Tensor | None = None
        self._view = 0
        self._start = 0

    @property
    def allocated_bytes(self) -> int:
        return self.rows * self.capacity * self.position_bytes

    def fits(self, rows: int, length: int) -> bool:
        """Whether `rows` slots of `length` positions stay within the budget."""
        return rows * length * self.position_bytes <= self.budget

    def _resize(self, rows: int, capacity: int) -> None:
        """Reallocate as rows x capacity, keeping what the rows in use hold, a layer at a time."""
        if rows == 0 or capacity == 0:
            self.k = self.v = None
            self.rows = self.capacity = 0
            give_back_memory()
            return
        shape = (rows, self.n_kv_head, capacity, self.head_dim)
        r, c = min(rows, self.rows), min(capacity, self.capacity)
        old_k, old_v = self.k, self.v
        self.k = self.v = None
        new_k, new_v = [], []
        for layer in range(self.n_layer):
            # Zeroed, unlike KVCache: a decode step reads every row up to the longest one, and a
            # shorter row's masked positions still enter the attention product as 0 * value,
            # which is NaN when uninitialised memory happens to hold a NaN (seen: greedy output
            # turned to token 0 at random). Stale values a finished request leaves are finite.
            k = torch.zeros(shape, dtype=self.dtype, device=self.device)
            v = torch.zeros(shape, dtype=self.dtype, device=self.device)
            if old_k is not None:
                k[:r, :, :c] = old_k[layer][:r, :, :c]
                v[:r, :, :c] = old_v[layer][:r, :, :c]
                old_k[layer] = old_v[layer] = None           # freed now, before the next layer's copy
            new_k.append(k)
            new_v.append(v)
        self.k, self.v, self.rows, self.capacity = new_k, new_v, rows, capacity
        self.peak_bytes = max(self.peak_bytes, self.allocated_bytes)
        if old_k is not None:
            give_back_memory()

    def _grown(self, length: int) -> int:
        """The capacity to allocate for `length` positions: a quarter more than now (fewer
        copies as a request grows), in whole blocks, at most the context."""
        want = max(length, self._min_capacity, self.capacity + self.capacity // 4)
        return min(self.max_len, -(-want // self.BLOCK) * self.BLOCK)

    def ensure(self, rows: int, length: int) -> None:
        """Room for `rows` slots of `length` positions (and for what the active rows hold)."""
        rows = max(rows, self.active)
        length = max([length, *self.lengths[:rows]])
        if rows <= self.rows and length <= self.capacity:
            return
        grow_rows = min(self.slots, max(rows, 2 * self.rows)) if rows > self.rows else self.rows
        grow_cap = self._grown(length) if length > self.capacity else self.capacity
        # Growing ahead where the budget allows it, else exactly what is needed.
        for r, c in ((grow_rows, grow_cap), (rows, grow_cap), (grow_rows, length), (rows, length)):
            if r >= rows and c >= length and (self.fits(r, c) or (r, c) == (rows, length)):
                self._resize(r, c)
                return

    def trim(self) -> None:
        """Give memory back once requests have ended: none when idle, else what the active rows
        use (with room to grow) when the allocation is more than twice that."""
        if self.active == 0:
            self._resize(0, 0)
            return
        length = max(self.lengths[:self.active]) + 1
        capacity = min(self.max_len, max(self._min_capacity, 2 * length))
        if self.allocated_bytes > 2 * self.active * capacity * self.position_bytes:
            self._resize(self.active, capacity)

    def begin_prefill(self, slot: int, start: int, length: int, rows: int = 1) -> None:
        """Write the next `length` prompt positions of slots slot..slot+rows-1 from `start`."""
        self.ensure(slot + rows, start + length)
        self._mode = ("prefill", slot)
        self._prefill_rows = rows
        self._start = start

    def begin_decode(self, n: int) -> torch.Tensor:
        """Set up a decode step over rows 0..n-1; returns their attention mask (n, 1, 1, S)."""
        lengths = self.lengths[:n]
        self.ensure(n, max(lengths) + 1)
        self._mode = ("decode", n)
        self._index = torch.tensor(lengths, device=self.device)
        self._view = max(lengths) + 1
        cols = torch.arange(self._view, device=self.device)
        return (cols[None, :] <= self._index[:, None])[:, None, None, :]

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mode, arg = self._mode
        k_all, v_all = self.k[layer_idx], self.v[layer_idx]                      # (rows, nkv, cap, hs)
        if mode == "prefill":
            start, end = self._start, self._start + k.shape[2]
            rows = slice(arg, arg + self._prefill_rows)
            k_slot, v_slot = k_all[rows], v_all[rows]
            k_slot[:, :, start:end] = k
            v_slot[:, :, start:end] = v
            return k_slot[:, :, :end], v_slot[:, :, :end]
        n = arg
        rows = torch.arange(n, device=self.device)
        # Row r writes its new key at position lengths[r] of its own slot.
        # (Index assignment does not convert dtypes: the cast is explicit.)
        k_all[rows, :, self._index] = k[:, :, 0].to(k_all.dtype)
        v_all[rows, :, self._index] = v[:, :, 0].to(v_all.dtype)
        return k_all[:n, :, :self._view], v_all[:n, :, :self._view]

    def move(self, src: int, dst: int) -> None:
        """Slot `dst` takes what slot `src` holds (the last running row fills a freed slot)."""
        n = self.lengths[src]
        for layer in range(self.n_layer):
            self.k[layer][dst, :, :n] = self.k[layer][src, :, :n]
            self.v[layer][dst, :, :n] = self.v[layer][src, :, :n]
        self.lengths[dst] = n
        self.lengths[src] = 0


class _Running:
    """A request in the batch: its slot's sampling state and its text so far."""

    def __init__(self, request: Request, engine: Engine):
        cfg = request.cfg
        self.request, self.cfg = request, cfg
        self.pipeline = engine.logits_pipeline(cfg, [list(request.prompt)], for_beam=False)
        self.stops = engine.stop_matcher(cfg)
        self.generator = None
        if not cfg.greedy and cfg.seed is not None:
            self.generator = torch.Generator(device=engine.device).manual_seed(cfg.seed)
        self.text = (TextStream(engine.tokenizer, cfg.stop_strings, cfg.stop_after)
                     if engine.tokenizer is not None else None)
        self.tokens: list[int] = []
        self.budget = min(cfg.max_new_tokens, engine.config.max_seq_len - len(request.prompt))
        self.worst = len(request.prompt) + self.budget      # the most cache positions it can use
        self.prefilled = 0                                  # prompt tokens in the cache so far
        self.finish: tuple[str, int | str | None] | None = None    # (reason, stop) once done
        self.next_token = 0


class Scheduler:
    """Runs `engine`'s model over every submitted request, continuously batched (see module docs)."""

    MIN_CHUNK = 16                  # tokens: the smallest chunk of a long prompt
    CHUNK_SECONDS = 0.3             # what a chunk of a long prompt should take, about
    YOUNG_TOKENS = 8                # a request with fewer generated tokens has just started ...
    MAX_PAUSE = 8                   # ... and holds a long prompt's prefill back for at most this many steps

    def __init__(self, engine: Engine, max_batch: int = 16, max_queue: int = 64,
                 kv_cache_bytes: int | None = None, prefill_chunk: int = 256, burst_tokens: int = 2048):
        """`kv_cache_bytes`: the KV cache's budget (None: enough for every slot at the full
        context); a request that cannot fit even alone is refused at `submit`, one that cannot
        fit beside the running ones waits. `prefill_chunk`: prompt tokens prefilled per step,
        between two decode steps, so a long prompt does not stall everyone's replies.
        `burst_tokens`: (padded) prompt tokens prefilled together in one step while no request
        is decoding (a burst of requests arriving at once: nobody waits for a decode step).
        Prompts up to 4 x `prefill_chunk` tokens go in whole (one a step at least, however long
        it takes); longer ones a chunk a step (`_chunk_tokens`)."""
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1 or burst_tokens < 1:
            raise ChatforgeError(f"max_batch, prefill_chunk and burst_tokens must be >= 1 and max_queue >= 0, "
                                 f"got {max_batch}, {prefill_chunk}, {burst_tokens} and {max_queue}")
        self.engine, self.max_batch, self.max_queue = engine, max_batch, max_queue
        self.prefill_chunk, self.burst_tokens = prefill_chunk, burst_tokens
        self._chunk = prefill_chunk                  # tokens of the long prompt's next chunk
        self._chunk_took: float | None = None        # seconds the last full-size chunk took
        self._paused = 0                             # steps the long prompt has waited for young requests
        # Longer prompts go in a chunk a step; shorter ones whole, however full the step is.
        self.long_prompt = 4 * prefill_chunk
        cfg = engine.config
        self.cache = SlotCache(cfg.n_layer, max_batch, cfg.n_kv_head, cfg.max_seq_len, cfg.head_dim,
                               engine.cache_dtype, engine.device, budget_bytes=kv_cache_bytes)
        self.running: list[_Running] = []
        self.prefilling: _Running | None = None      # the request whose prompt is going in, chunk by chunk
        self._prefill_slot = 0
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
        if self._stopping.is_set():         # first: a closed scheduler has no engine left
            raise ShuttingDown("the server is shutting down; retry on another instance")
        if cfg.strategy == "beam" or cfg.num_return_sequences != 1:
            raise ChatforgeError("continuous batching runs greedy or sampled decoding with one sequence "
                                 "per request; use Engine.generate for beam search or n-best")
        (prompt,) = self.engine.check_prompts([prompt_ids], cfg)
        worst = min(len(prompt) + cfg.max_new_tokens, self.engine.config.max_seq_len)
        if not self.cache.fits(1, worst):
            mb = self.cache.position_bytes / 2 ** 20
            raise ChatforgeError(
                f"the prompt ({len(prompt)} tokens) and its reply (up to {cfg.max_new_tokens}) need "
                f"{worst * mb:.0f} MB of KV cache; this server's budget is {self.cache.budget / 2 ** 20:.0f} MB "
                f"(--kv-cache-mb): shorten the prompt or ask for fewer tokens")
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
            for r in [*self.running, *([self.prefilling] if self.prefilling else [])]:
                r.request.cancel()
            for r in list(self._waiting.queue):
                r.cancel()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def close(self) -> None:
        """Stop, then free the cache and let go of the engine (its model) at once."""
        self.stop(drain=False, timeout=10)
        if self._thread is None or not self._thread.is_alive():
            self.cache.active = 0
            self.cache.trim()
            self.engine = None

    def run_until_idle(self) -> None:
        """Run steps on the caller's thread until nothing is running or waiting (tests, batch use)."""
        while self.running or self.prefilling or not self._waiting.empty():
            self.step()

    # ------------------------------------------------------------------------------------ loop

    def _loop(self) -> None:
        while True:
            if not self.running and self.prefilling is None and self._waiting.empty():
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
        """Prefill up to `prefill_chunk` prompt tokens (admitting waiting requests as slots and
        the cache budget allow), then one decode step over the batch."""
        with torch.inference_mode(), self.engine.thread_limit():
            self._prefill()
            self._drop_finished()
            if self.running:
                self._decode()
                self._drop_finished()

    def _admit(self, room: int) -> tuple[list[Request], Request | None]:
        """Waiting requests that may start now, oldest first (first come, first served): short
        prompts (at most `long_prompt` tokens) to go in whole together, right-padded to the
        longest of them, as many as `room` padded tokens hold (the first one always); or else,
        when no long prompt is being prefilled, one long prompt, to be prefilled a chunk a step.
        Each needs a free slot and room in the cache beside the running ones at their worst; the
        first that cannot start ends the list (it waits)."""
        group: list[Request] = []
        longest = 0
        pre, n = self.prefilling, len(self.running)
        worsts = [r.worst for r in self.running] + ([pre.worst] if pre is not None else [])
        while not self._waiting.empty():
            request = self._waiting.queue[0]
            if request.cancelled:
                self._waiting.get()
                request._emit(Done("", [], "cancelled", len(request.prompt)))
                continue
            length = len(request.prompt)
            is_long = length > self.long_prompt
            if (is_long and (group or pre is not None)) or (group and max(longest, length) * (len(group) + 1) > room):
                break
            k = len(group) + 1
            rows = n + k
            if pre is not None:
                # The long prompt's slot stays after the group's rows (it moves up if in the way).
                rows = max(rows + (self._prefill_slot < n + k), self._prefill_slot + 1)
            worst = min(length + request.cfg.max_new_tokens, self.engine.config.max_seq_len)
            if rows > self.max_batch or not self.cache.fits(rows, max([worst, *worsts])):
                break
            self._waiting.get()
            if is_long:
                return group, request
            group.append(request)
            worsts.append(worst)
            longest = max(longest, length)
        return group, None

    def _start(self, request: Request) -> _Running | None:
        try:
            return _Running(request, self.engine)
        except Exception as e:              # noqa: BLE001 - one request's failure is its own
            self._failed(request, e)
            return None

    def _prefill(self) -> None:
        """Put prompt tokens into the cache between two decode steps: first the waiting short
        prompts, whole, together in one forward (as many as `prefill_chunk` padded tokens hold,
        `burst_tokens` while nothing decodes; at least one), also while a long prompt is halfway
        in; then the next chunk of the long prompt (`_chunk_tokens`). A request whose prompt is
        in emits its first token and joins the decode rows. Any failure here ends only the
        request it belongs to."""
        room = self.prefill_chunk if self.running else max(self.prefill_chunk, self.burst_tokens)
        group, long_request = self._admit(room)
        if long_request is not None:
            run = self._start(long_request)
            if run is not None:
                self.prefilling, self._prefill_slot = run, len(self.running)
                self._set_active()
            group, _ = self._admit(room)          # short prompts behind it still go in first
        runs = [r for r in map(self._start, group) if r is not None]
        if runs:
            room -= self._prefill_group(runs)
        run = self.prefilling
        if run is None:
            return
        if run.request.cancelled:
            self._end_prefill()
            run.request._emit(Done("", [], "cancelled", len(run.request.prompt)))
            return
        n = self._chunk_tokens(room)
        if n > 0:
            self._prefill_into(run, self._prefill_slot, n)

    def _chunk_tokens(self, room: int) -> int:
        """How much of the long prompt goes in this step: none while requests that have just
        started (fewer than `YOUNG_TOKENS` generated: their first words are on their way to their
        clients) decode, for at most `MAX_PAUSE` steps in a row; else a chunk that takes about
        `CHUNK_SECONDS`, at most `prefill_chunk`: the size is adjusted after each chunk by how
        long it took (the further in, the more keys each token attends to, and a forward has a
        fixed cost - the 135M model's 16-token chunk took 0.18 s, its 256-token one 0.49 s on
        the busy machine - so a rate per token would not do). A short request that arrives waits
        for at most that one chunk, then runs at full speed: with fixed 256-token chunks each of
        its decode steps waited for a chunk, and its first word came 1-7 s after it was sent
        instead of 0.2 s."""
        room = min(room, self.prefill_chunk)
        if room <= 0:
            return 0
        if any(len(r.tokens) < self.YOUNG_TOKENS for r in self.running) and self._paused < self.MAX_PAUSE:
            self._paused += 1
            return 0
        self._paused = 0
        if self._chunk_took is not None:
            if self._chunk_took > 1.25 * self.CHUNK_SECONDS:
                self._chunk = max(self.MIN_CHUNK, int(self._chunk * 0.7))
            elif self._chunk_took < 0.8 * self.CHUNK_SECONDS:
                self._chunk = min(self.prefill_chunk, int(self._chunk * 1.4) + 1)
            self._chunk_took = None
        return min(room, self._chunk)

    def _prefill_group(self, runs: list[_Running]) -> int:
        """Prefill whole prompts into the rows after the running ones, in one forward when
        there are several (right-padded; each row's logits taken at its own last token). If that
        fails, each is tried alone, so a failure stays with the request it belongs to. Returns
        the (padded) tokens it cost."""
        if len(runs) == 1:
            self._prefill_into(runs[0], len(self.running), len(runs[0].request.prompt))
            return len(runs[0].request.prompt)
        first, k = len(self.running), len(runs)
        prompts = [r.request.prompt for r in runs]
        longest = max(map(len, prompts))
        device = self.engine.device
        try:
            if self.prefilling is not None and self._prefill_slot < first + k:
                self.cache.ensure(first + k + 1, self.cache.lengths[self._prefill_slot])
                self.cache.move(self._prefill_slot, first + k)
                self._prefill_slot = first + k
            self.cache.active = max(self.cache.active, first + k)
            self.cache.begin_prefill(first, 0, longest, rows=k)
            ids = torch.tensor([p + [self.engine.pad_id] * (longest - len(p)) for p in prompts], device=device)
            positions = torch.arange(longest, device=device).unsqueeze(0)
            take = torch.tensor([len(p) - 1 for p in prompts], device=device)
            logits = self.engine.forward(ids, self.cache, positions, None, take)              # (k, V)
        except Exception:                   # noqa: BLE001 - tried again one by one
            log.exception("prefilling %d prompts together failed; each is tried alone", k)
            self._set_active()
            for run in runs:
                self._prefill_into(run, len(self.running), len(run.request.prompt))
            return k * longest
        for i, run in enumerate(runs):
            run.prefilled = self.cache.lengths[first + i] = len(prompts[i])
        self.running.extend(runs)
        self._set_active()
        for i, run in enumerate(runs):
            self._take(run, logits[i])
        return k * longest

    def _prefill_into(self, run: _Running, slot: int, room: int) -> int:
        """Prefill the next (at most `room`) prompt tokens of `run` into `slot`; returns how many.
        A failure ends `run` alone, with an error."""
        prompt, start = run.request.prompt, run.prefilled
        n = min(room, len(prompt) - start)
        long_one = run is self.prefilling
        if not long_one and self.prefilling is not None and self._prefill_slot == slot:
            # A short prompt beside a long one being prefilled goes in the row after the running
            # ones: the long one's row moves up if it is there.
            self.cache.ensure(slot + 2, self.cache.lengths[slot])
            self.cache.move(slot, slot + 1)
            self._prefill_slot += 1
        started = time.perf_counter()
        try:
            self.cache.active = max(self.cache.active, slot + 1)
            self.cache.begin_prefill(slot, start, n)
            ids = torch.tensor([prompt[start:start + n]], device=self.engine.device)
            positions = torch.arange(start, start + n, device=self.engine.device).unsqueeze(0)
            logits = self.engine.forward(ids, self.cache, positions, None)                  # (1, V)
        except Exception as e:              # noqa: BLE001
            # The running rows are untouched (a request joins them once its prompt is in).
            self.cache.lengths[slot] = 0
            if long_one:
                self._end_prefill()
            else:
                self._set_active()
            self._failed(run.request, e)
            return n
        if long_one and n == self._chunk:
            self._chunk_took = time.perf_counter() - started
        run.prefilled = self.cache.lengths[slot] = start + n
        if run.prefilled == len(prompt):
            # Rows that ended meanwhile may have left the slot behind the running ones: close up.
            if slot != len(self.running):
                self.cache.move(slot, len(self.running))
            if long_one:
                self.prefilling = None
            self.running.append(run)
            self._set_active()
            self._take(run, logits[0])
        return n

    def _end_prefill(self) -> None:
        self.cache.lengths[self._prefill_slot] = 0
        self.prefilling = None
        self._set_active()
        self.cache.trim()

    def _set_active(self) -> None:
        self.cache.active = max(len(self.running), self._prefill_slot + 1 if self.prefilling else 0)

    def _failed(self, request: Request, e: Exception) -> None:
        log.exception("a request failed before joining the batch; it ends with an error", exc_info=e)
        request._emit(Done("", [], "error", len(request.prompt), error=f"admission failed: {type(e).__name__}: {e}"))

    def _decode(self) -> None:
        n = len(self.running)
        mask = self.cache.begin_decode(n)
        tokens = torch.tensor([[r.next_token] for r in self.running], device=self.engine.device)
        positions = torch.tensor([[self.cache.lengths[i]] for i in range(n)], device=self.engine.device)
        logits = self.engine.forward(tokens, self.cache, positions, mask)                   # (n, V)
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
        dropped = False
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
            else:
                self.cache.lengths[last] = 0
            self.running.pop()
            dropped = True
        if dropped:
            self._set_active()
            self.cache.trim()                # the cache shrinks with the batch, to nothing when idle

    def _finish(self, run: _Running) -> None:
        reason, stop = run.finish
        if reason == "error":
            run.request._emit(Done("", run.tokens, "error", len(run.request.prompt), error=f"sampling failed: {stop}"))
            return
        tail = run.text.finish() if run.text is not None and reason != "cancelled" else ""
        if tail:
            run.request._emit(Piece(tail, len(run.tokens)))
        completion = self.engine.completion(run.tokens, reason, stop)
        run.request._emit(Done(completion.text or "", run.tokens, reason, len(run.request.prompt)))

    def _fail_all(self, message: str) -> None:
        for i, run in enumerate(self.running):
            run.request._emit(Done("", run.tokens, "error", len(run.request.prompt), error=message))
            self.cache.lengths[i] = 0
        self.running.clear()
        self._set_active()
        self.cache.trim()
