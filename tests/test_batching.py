"""Continuous batching (`infer/batching.py`): requests that join and leave a running batch get the
same greedy output as when each runs alone through `Engine.generate`; cancellation, limits,
sampling, stop strings, the KV slots and the scheduler thread."""

from __future__ import annotations

import re
import threading

import pytest
import torch

from chatforge.errors import ChatforgeError
from chatforge.infer import sampling
from chatforge.infer.batching import Done, Piece, QueueFull, Scheduler, ShuttingDown, SlotCache
from chatforge.infer.engine import Engine, GenerationConfig
from chatforge.model.gpt import GPT, GPTConfig

VOCAB = 96
EOS = 7
PROMPTS = [[3, 14, 15, 92, 65], [35, 89], [79, 32, 38, 46, 26, 43, 38, 32, 79], [5, 6], [40] * 12]


@pytest.fixture(scope="module")
def engine() -> Engine:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, d_model=32, n_layer=2, n_head=4, n_kv_head=2, d_ff=64,
                          max_seq_len=400)).eval()
    with torch.no_grad():  # sharpen the near-uniform random outputs
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return Engine(model, stop_ids=[EOS], dtype="float32")


def alone(engine: Engine, prompt: list[int], cfg: GenerationConfig) -> tuple[list[int], str]:
    result = engine.generate([prompt], cfg)[0]
    return result.tokens, result.finish_reason


def test_requests_submitted_together_equal_each_alone(engine):
    cfg = GenerationConfig(max_new_tokens=30)
    scheduler = Scheduler(engine, max_batch=8)
    requests = [scheduler.submit(p, cfg) for p in PROMPTS]
    scheduler.run_until_idle()
    for prompt, request in zip(PROMPTS, requests):
        done = request.result(timeout=0)
        assert (done.tokens, done.finish_reason) == alone(engine, prompt, cfg)
        assert done.prompt_tokens == len(prompt)
    # One batched step per token of the longest request, not one per request.
    assert scheduler.steps < sum(len(r.result(timeout=0).tokens) for r in requests)


def test_requests_joining_and_leaving_mid_run_equal_each_alone(engine):
    """Two slots for five requests of different budgets: each later one joins when one leaves."""
    scheduler = Scheduler(engine, max_batch=2)
    cfgs = [GenerationConfig(max_new_tokens=n) for n in (25, 3, 17, 9, 30)]
    requests = [scheduler.submit(PROMPTS[0], cfgs[0])]
    for _ in range(5):
        scheduler.step()                         # the first one is already running
    requests += [scheduler.submit(p, c) for p, c in zip(PROMPTS[1:], cfgs[1:])]
    seen_batch = set()
    while scheduler.running or scheduler.queued:
        scheduler.step()
        seen_batch.add(len(scheduler.running))
    assert 2 in seen_batch
    for prompt, cfg, request in zip(PROMPTS, cfgs, requests):
        done = request.result(timeout=0)
        assert (done.tokens, done.finish_reason) == alone(engine, prompt, cfg)


def test_slots_grow_past_their_first_capacity(engine):
    cfg = GenerationConfig(max_new_tokens=40)
    scheduler = Scheduler(engine, max_batch=3)
    long_prompt = [(7 * i + 3) % VOCAB for i in range(300)]
    long_prompt = [t if t != EOS else 8 for t in long_prompt]
    requests = [scheduler.submit(p, cfg) for p in (PROMPTS[1], long_prompt, PROMPTS[2])]
    scheduler.run_until_idle()
    assert scheduler.cache.peak_bytes >= 3 * 300 * scheduler.cache.position_bytes
    assert scheduler.cache.allocated_bytes == 0          # and all of it is given back when idle
    for prompt, request in zip((PROMPTS[1], long_prompt, PROMPTS[2]), requests):
        assert request.result(timeout=0).tokens == alone(engine, prompt, cfg)[0]


def test_a_cancelled_request_leaves_and_the_others_are_unchanged(engine):
    cfg = GenerationConfig(max_new_tokens=30)
    scheduler = Scheduler(engine, max_batch=4)
    requests = [scheduler.submit(p, cfg) for p in PROMPTS[:3]]
    for _ in range(4):
        scheduler.step()
    requests[1].cancel()
    scheduler.step()
    assert len(scheduler.running) == 2 or all(r.finish is not None for r in scheduler.running)
    scheduler.run_until_idle()
    cancelled = requests[1].result(timeout=0)
    assert cancelled.finish_reason == "cancelled"
    assert len(cancelled.tokens) < 30
    for i in (0, 2):
        assert requests[i].result(timeout=0).tokens == alone(engine, PROMPTS[i], cfg)[0]


def test_seeded_sampling_does_not_depend_on_the_batch(engine):
    cfg = GenerationConfig(strategy="sample", temperature=1.3, top_p=0.95, seed=11, max_new_tokens=20)
    solo = Scheduler(engine)
    first = solo.submit(PROMPTS[2], cfg)
    solo.run_until_idle()
    crowd = Scheduler(engine)
    requests = [crowd.submit(p, cfg) for p in PROMPTS]
    crowd.run_until_idle()
    assert requests[2].result(timeout=0).tokens == first.result(timeout=0).tokens
    other = Scheduler(engine)
    changed = other.submit(PROMPTS[2], GenerationConfig(**{**cfg.__dict__, "seed": 12}))
    other.run_until_idle()
    assert changed.result(timeout=0).tokens != first.result(timeout=0).tokens


def test_penalties_match_the_engine(engine):
    cfg = GenerationConfig(max_new_tokens=25, frequency_penalty=1.5, presence_penalty=0.5, repetition_penalty=1.2)
    scheduler = Scheduler(engine)
    requests = [scheduler.submit(p, cfg) for p in PROMPTS]
    scheduler.run_until_idle()
    for prompt, request in zip(PROMPTS, requests):
        assert request.result(timeout=0).tokens == alone(engine, prompt, cfg)[0]


def test_openai_frequency_and_presence_penalties():
    """OpenAI's definition: logit - count * frequency - (count > 0) * presence, over generated tokens."""
    cfg = GenerationConfig(frequency_penalty=0.7, presence_penalty=0.4)
    pipeline = sampling.LogitsPipeline(cfg, [[1, 2, 2], [3]], 5, torch.device("cpu"), for_beam=False)
    logits = torch.zeros(2, 5)
    assert torch.equal(pipeline(logits.clone()), logits)        # the prompt does not count
    pipeline.append([4, 0], [False, False])
    pipeline.append([4, 1], [False, True])                      # row 1 is done: its token is not counted
    expected = torch.zeros(2, 5)
    expected[0, 4] = -(2 * 0.7 + 0.4)
    expected[1, 0] = -(0.7 + 0.4)
    assert torch.allclose(pipeline(logits.clone()), expected)
    with pytest.raises(ChatforgeError, match="frequency_penalty"):
        GenerationConfig(frequency_penalty=2.5)


def test_stop_strings_and_text_pieces(engine):
    class Letters:
        """Token t decodes to one letter: the text is easy to predict."""

        def decode(self, ids):
            return "".join(chr(97 + t % 26) for t in ids)

    stream_engine = Engine(engine.model, Letters(), stop_ids=[EOS], dtype=None)
    free = stream_engine.generate([PROMPTS[0]], GenerationConfig(max_new_tokens=30))[0].text
    stop = free[5:7]
    cfg = GenerationConfig(max_new_tokens=30, stop_strings=(stop,))
    scheduler = Scheduler(stream_engine)
    request = scheduler.submit(PROMPTS[0], cfg)
    scheduler.run_until_idle()
    events = list(request.events(timeout=0))
    pieces = "".join(e.text for e in events if isinstance(e, Piece))
    done = events[-1]
    assert isinstance(done, Done) and done.finish_reason == "stop"
    assert pieces == done.text == free[:free.find(stop)]
    assert all(e.text for e in events if isinstance(e, Piece))
    assert done.text == stream_engine.generate([PROMPTS[0]], cfg)[0].text
    # An end pattern keeps its match: the text ends with it, in the pieces and in the result.
    cfg = GenerationConfig(max_new_tokens=30, stop_after=(re.escape(stop) + "[a-z]",))
    request = scheduler.submit(PROMPTS[0], cfg)
    scheduler.run_until_idle()
    events = list(request.events(timeout=0))
    want = free[:free.find(stop) + len(stop) + 1]
    assert "".join(e.text for e in events if isinstance(e, Piece)) == events[-1].text == want
    assert events[-1].finish_reason == "stop" and len(events[-1].tokens) == len(want)


def test_queue_limit_and_shutdown(engine):
    scheduler = Scheduler(engine, max_batch=1, max_queue=2)
    cfg = GenerationConfig(max_new_tokens=5)
    for _ in range(3):                                           # one slot + two waiting
        scheduler.submit(PROMPTS[0], cfg)
    with pytest.raises(QueueFull):
        scheduler.submit(PROMPTS[0], cfg)
    with pytest.raises(ChatforgeError, match="beam"):
        scheduler.submit(PROMPTS[0], GenerationConfig(strategy="beam"))
    with pytest.raises(ChatforgeError, match="context"):
        scheduler.submit(list(range(8, 90)) * 5, cfg)
    scheduler.start()
    scheduler.stop(drain=True, timeout=30)
    with pytest.raises(ShuttingDown):
        scheduler.submit(PROMPTS[0], cfg)


def test_the_scheduler_thread_serves_concurrent_callers(engine):
    cfg = GenerationConfig(max_new_tokens=20)
    scheduler = Scheduler(engine, max_batch=4).start()
    results: dict[int, list[int]] = {}

    def client(i: int) -> None:
        prompt = PROMPTS[i % len(PROMPTS)]
        results[i] = scheduler.submit(prompt, cfg).result(timeout=60).tokens

    threads = [threading.Thread(target=client, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    scheduler.stop(timeout=30)
    assert len(results) == 10
    for i, tokens in results.items():
        assert tokens == alone(engine, PROMPTS[i % len(PROMPTS)], cfg)[0]


def test_slot_cache_moves_a_slot():
    cache = SlotCache(1, 3, 1, 16, 2, torch.float32, torch.device("cpu"), capacity=4)
    cache.ensure(3, 4)
    cache.k[0][2, :, :3] = 5.0
    cache.lengths = [2, 1, 3]
    cache.move(2, 0)
    assert cache.lengths[0] == 3 and torch.all(cache.k[0][0, :, :3] == 5.0)


def test_bf16_weights_write_into_their_cache(engine):
    """The engine's default on CPUs with native bf16: bf16 weights, and a bf16 KV cache."""
    bf16 = Engine(engine.model, stop_ids=[EOS], dtype="bfloat16")
    cfg = GenerationConfig(max_new_tokens=20)
    scheduler = Scheduler(bf16)
    request = scheduler.submit(PROMPTS[2], cfg)
    scheduler.run_until_idle()
    done = request.result(timeout=0)
    assert done.finish_reason != "error" and scheduler.cache.dtype == bf16.cache_dtype == torch.bfloat16
    assert done.tokens == bf16.generate([PROMPTS[2]], cfg)[0].tokens


def test_a_vanishing_temperature_is_greedy_and_a_failed_request_ends_alone(engine):
    """Found by schemathesis: temperature 7e-281 overflowed float32 logits to inf (NaN probabilities)."""
    cfg = GenerationConfig(strategy="sample", temperature=7.2e-281, max_new_tokens=10)
    assert cfg.greedy
    scheduler = Scheduler(engine)
    tiny_t = scheduler.submit(PROMPTS[0], cfg)
    broken = scheduler.submit(PROMPTS[1], GenerationConfig(strategy="sample", max_new_tokens=10))
    fine = scheduler.submit(PROMPTS[2], GenerationConfig(max_new_tokens=10))
    scheduler.step()                                   # admit all three
    run = next(r for r in scheduler.running if r.request is broken)
    run.pipeline.warp = lambda logits: torch.full_like(logits, float("nan"))   # a sampler gone wrong
    scheduler.run_until_idle()
    assert tiny_t.result(timeout=0).tokens == alone(engine, PROMPTS[0], GenerationConfig(max_new_tokens=10))[0]
    assert broken.result(timeout=0).finish_reason == "error"
    assert fine.result(timeout=0).tokens == alone(engine, PROMPTS[2], GenerationConfig(max_new_tokens=10))[0]


def test_a_request_that_fails_to_be_admitted_ends_alone(engine):
    """Found by an outside probe: an admission that raised (a seed above 2**64-1) ended every
    running request with an error, and the request itself, taken off the queue, never ended."""
    scheduler = Scheduler(engine)
    cfg = GenerationConfig(max_new_tokens=12)
    first = scheduler.submit(PROMPTS[0], cfg)
    scheduler.step()                                          # running, one token out
    real = engine.forward
    bad_prompt = PROMPTS[3]

    def broken(ids, *a, **kw):
        # Any prefill holding the bad request (alone, or with `late` in one batch: that fails
        # whole, and each is tried again alone).
        if ids.shape[1] > 1 and any(row[:len(bad_prompt)].tolist() == bad_prompt for row in ids):
            raise ValueError("Overflow when unpacking long long")
        return real(ids, *a, **kw)

    engine.forward = broken
    try:
        bad = scheduler.submit(bad_prompt, cfg)
        late = scheduler.submit(PROMPTS[2], cfg)
        scheduler.run_until_idle()
    finally:
        engine.forward = real
    assert bad.result(timeout=0).finish_reason == "error" and "admission failed" in bad.result(timeout=0).error
    assert first.result(timeout=0).tokens == alone(engine, PROMPTS[0], cfg)[0]
    assert late.result(timeout=0).tokens == alone(engine, PROMPTS[2], cfg)[0]


def test_a_seed_torch_cannot_take_is_refused_up_front():
    with pytest.raises(ChatforgeError, match="seed"):
        GenerationConfig(strategy="sample", seed=2 ** 64)
    assert GenerationConfig(strategy="sample", seed=2 ** 64 - 1).seed == 2 ** 64 - 1


LONG = [t if t != EOS else 8 for t in ((7 * i + 3) % VOCAB for i in range(300))]


def test_a_long_prompt_is_prefilled_in_chunks_while_the_others_decode(engine):
    """Issue 23: a 7,900-token prefill blocked every other request for 42 s. In chunks of 32
    tokens, short requests submitted after the long one start and finish while it goes in; every
    output still equals the request's own, alone."""
    cfg = GenerationConfig(max_new_tokens=20)
    scheduler = Scheduler(engine, max_batch=4, prefill_chunk=16)
    early = scheduler.submit(PROMPTS[0], GenerationConfig(max_new_tokens=8))
    scheduler.step()
    long_request = scheduler.submit(LONG, cfg)
    scheduler.step()
    assert scheduler.prefilling is not None and scheduler.prefilling.request is long_request
    late = [scheduler.submit(p, cfg) for p in (PROMPTS[1], PROMPTS[2])]
    steps = 0
    while long_request.first_token is None:
        scheduler.step()
        steps += 1
    assert steps >= 300 // 16 - 2                          # it took many steps to go in ...
    assert all(r.first_token is not None and r.first_token < long_request.first_token for r in [early, *late])
    assert early.outcome is not None                       # ... during which the early one finished
    scheduler.run_until_idle()
    assert early.result(timeout=0).tokens == alone(engine, PROMPTS[0], GenerationConfig(max_new_tokens=8))[0]
    for prompt, request in zip((LONG, PROMPTS[1], PROMPTS[2]), (long_request, *late)):
        assert request.result(timeout=0).tokens == alone(engine, prompt, cfg)[0]
    assert scheduler.cache.allocated_bytes == 0


def test_the_kv_cache_stays_within_its_budget(engine):
    """Issue 23: one long prompt grew the cache to 16 slots x its length, for good. With a budget
    of 350 positions: a request that can never fit is refused at once, short ones that cannot fit
    beside a long one wait for it, the cache never exceeds the budget and is freed when idle."""
    cfg = GenerationConfig(max_new_tokens=20)
    budget = 350 * Scheduler(engine).cache.position_bytes
    scheduler = Scheduler(engine, max_batch=4, kv_cache_bytes=budget, prefill_chunk=64)
    with pytest.raises(ChatforgeError, match="KV cache"):
        scheduler.submit(LONG + LONG[:50], cfg)              # 350 + 20 positions at worst
    long_request = scheduler.submit(LONG, cfg)             # 320 at worst: fits alone
    shorts = [scheduler.submit(p, cfg) for p in PROMPTS[:3]]
    most = 0
    while scheduler.running or scheduler.prefilling or scheduler.queued:
        scheduler.step()
        assert scheduler.cache.allocated_bytes <= budget
        rows = [r.request for r in scheduler.running] + ([scheduler.prefilling.request] if scheduler.prefilling else [])
        assert long_request not in rows or rows == [long_request]      # nothing fits beside it
        most = max(most, len(rows))
    assert most == 3                                        # the short ones ran together after it
    for prompt, request in zip((LONG, *PROMPTS[:3]), (long_request, *shorts)):
        assert request.result(timeout=0).tokens == alone(engine, prompt, cfg)[0]
    assert scheduler.cache.allocated_bytes == 0 and scheduler.cache.peak_bytes <= budget


def _count_prefills(engine, monkeypatch) -> list[tuple[int, int]]:
    """Record the (rows, tokens) shape of every prefill forward the engine runs."""
    shapes: list[tuple[int, int]] = []
    real = engine.forward

    def spy(ids, *a, **kw):
        if ids.shape[1] > 1 or kw.get("take") is not None or (len(a) > 3 and a[3] is not None):
            shapes.append(tuple(ids.shape))
        return real(ids, *a, **kw)

    monkeypatch.setattr(engine, "forward", spy)
    return shapes


def test_prompts_arriving_together_are_prefilled_in_one_forward(engine, monkeypatch):
    """Issue 23: 16 streaming clients' prompts were prefilled one at a time. Prompts waiting
    together go in one right-padded forward (each row's logits at its own last token), and each
    request's greedy output still equals its own, alone; also when the batch is sampled, and when
    one of them joins a batch already decoding."""
    cfg = GenerationConfig(max_new_tokens=25)
    shapes = _count_prefills(engine, monkeypatch)
    scheduler = Scheduler(engine, max_batch=8)
    requests = [scheduler.submit(p, cfg) for p in PROMPTS]
    scheduler.step()
    assert shapes == [(len(PROMPTS), max(map(len, PROMPTS)))]            # one forward, all five
    late = [scheduler.submit(p, cfg) for p in (PROMPTS[4], PROMPTS[1])]  # beside the decoding ones
    scheduler.run_until_idle()
    assert shapes[1] == (2, len(PROMPTS[4]))
    for prompt, request in zip([*PROMPTS, PROMPTS[4], PROMPTS[1]], [*requests, *late]):
        assert request.result(timeout=0).tokens == alone(engine, prompt, cfg)[0]
    sampled = GenerationConfig(strategy="sample", temperature=0.8, seed=5, max_new_tokens=15)
    together = [scheduler.submit(p, sampled) for p in PROMPTS]
    scheduler.run_until_idle()
    for prompt, request in zip(PROMPTS, together):
        solo = Scheduler(engine)
        alone_request = solo.submit(prompt, sampled)
        solo.run_until_idle()
        assert request.result(timeout=0).tokens == alone_request.result(timeout=0).tokens
    assert scheduler.cache.allocated_bytes == 0


def test_short_prompts_go_ahead_of_a_long_ones_chunks_in_one_forward(engine, monkeypatch):
    """While a long prompt is prefilled chunk by chunk, short prompts that arrive go in whole,
    together, before its next chunk (its row moves past theirs); everyone's output is its own."""
    cfg = GenerationConfig(max_new_tokens=12)
    shapes = _count_prefills(engine, monkeypatch)
    scheduler = Scheduler(engine, max_batch=6, prefill_chunk=32, burst_tokens=32)
    long_request = scheduler.submit(LONG, cfg)
    scheduler.step()
    assert scheduler.prefilling is not None and shapes == [(1, 32)]
    shorts = [scheduler.submit(p, cfg) for p in PROMPTS[:3]]
    scheduler.step()
    assert shapes[1] == (3, max(map(len, PROMPTS[:3])))                # the three at once, first
    assert all(r.first_token is not None for r in shorts) and long_request.first_token is None
    scheduler.run_until_idle()
    for prompt, request in zip((LONG, *PROMPTS[:3]), (long_request, *shorts)):
        assert request.result(timeout=0).tokens == alone(engine, prompt, cfg)[0]


def test_a_long_prompt_waits_for_just_started_requests_for_a_few_steps_at_most(engine):
    """While requests that have just started decode their first tokens, the long prompt's prefill
    waits (their first words reach their clients at full speed), for at most MAX_PAUSE steps in
    a row; then it goes on, and once they are under way it goes on every step."""
    scheduler = Scheduler(engine, max_batch=4, prefill_chunk=16)
    long_request = scheduler.submit(LONG, GenerationConfig(max_new_tokens=4))
    scheduler.step()
    short_request = scheduler.submit(PROMPTS[0], GenerationConfig(max_new_tokens=40))
    progress = []
    while long_request.first_token is None:
        before = scheduler.prefilling.prefilled if scheduler.prefilling else None
        scheduler.step()
        after = scheduler.prefilling.prefilled if scheduler.prefilling else len(LONG)
        young = len(scheduler.running[0].tokens) < Scheduler.YOUNG_TOKENS if scheduler.running else False
        progress.append((before is not None and after > before, young))
    paused = [moved for moved, young in progress if young]
    assert paused and not paused[0] and len(paused) <= Scheduler.MAX_PAUSE + 1   # waited while it was young
    assert all(moved for moved, young in progress[len(paused) + 1:] if not young)
    assert short_request.first_token < long_request.first_token
    scheduler.run_until_idle()
    assert long_request.result(timeout=0).tokens == alone(engine, LONG, GenerationConfig(max_new_tokens=4))[0]
