"""The worker process of bench_generate_demo.py for a chatforge or HF engine (llama.cpp's run
`_llamacpp.py --worker`): it loads one engine and answers the parent's commands on stdin (run,
memory, breakdown, profile; `_llamacpp.worker_loop`). Also where a chatforge decode step's time
goes (`decode_breakdown`) and torch.profiler's view of it (`profile_decode`).

    python benchmarks/_demo_worker.py SPEC_JSON      # started by bench_generate_demo.Worker
"""

from __future__ import annotations

import json
import sys
import time

import torch
from _generate_common import hf_twin, mean_time


def demo_worker(spec: dict) -> None:
    """A child process holding one chatforge or HF engine (`_llamacpp.worker_loop` runs it;
    llama.cpp's workers run `_llamacpp.py` itself, without torch in the process)."""
    from _llamacpp import worker_loop

    from chatforge.infer.engine import Engine, GenerationConfig
    from chatforge.model.folder import load_model

    kind, prec, threads = spec["engine"], spec["precision"], spec["threads"]
    held: dict = {}

    def load():
        model, tok = load_model(spec["model"])
        if kind == "chatforge":
            dtype = {"fp32": "float32", "bf16": "bfloat16"}.get(prec, "auto")
            quant = prec if prec in ("int8", "int4") else None
            engine = held["engine"] = Engine(model, tok, stop_ids=[], dtype=dtype, quant=quant, threads=threads)
            del model
            info = {"engine_dtype": str(engine.dtype).replace("torch.", ""),
                    "cache_dtype": str(engine.cache_dtype).replace("torch.", ""),
                    "weight_bytes": sum(t.numel() * t.element_size() for m in linear_modules(engine.model)
                                        for t in [*m.parameters(recurse=False), *m.buffers(recurse=False),
                                                  *([m.packed] if type(m).__name__ == "PackedLinear" else [])])}

            def generate(ids: list[int], n: int) -> dict:
                t0 = time.perf_counter()
                first = None
                for _ in engine.stream(ids, GenerationConfig(max_new_tokens=n)):
                    if first is None:
                        first = time.perf_counter()
                end = time.perf_counter()
                return {"ttft_s": first - t0, "rest_s": end - first}

            info["first_tokens"] = engine.generate([spec["prompt"]], GenerationConfig(max_new_tokens=16))[0].tokens
            return generate, info
        hf = hf_twin(model, tok.pad_id)
        if prec == "bf16":
            hf = hf.to(torch.bfloat16)
        del model
        torch.set_num_threads(threads)
        from transformers.generation.streamers import BaseStreamer

        class Clock(BaseStreamer):
            """Times each `put`: the first is the prompt, the second the first new token."""

            def __init__(self):
                self.times: list[float] = []

            def put(self, value):
                self.times.append(time.perf_counter())

            def end(self):
                pass

        def generate(ids: list[int], n: int) -> dict:
            clock = Clock()
            x = torch.tensor([ids])
            t0 = time.perf_counter()
            with torch.inference_mode():
                res = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, streamer=clock)
            end = time.perf_counter()
            return {"ttft_s": clock.times[1] - t0, "rest_s": end - clock.times[1], "tokens": res[0, len(ids):].tolist()}

        return generate, {"weight_bytes": sum(m.weight.numel() * m.weight.element_size() for m in hf.modules()
                                              if isinstance(m, torch.nn.Linear))}

    handlers = {"breakdown": lambda cmd: decode_breakdown(held["engine"], spec["prompt"], threads),
                "profile": lambda cmd: profile_decode(held["engine"], spec["prompt"], cmd.get("steps", 16))}
    worker_loop(spec, load, handlers)


def linear_modules(model) -> list:
    return [m for m in model.modules() if type(m).__name__ in ("Linear", "PackedLinear", "Int8Linear", "Int4Linear")]


def decode_breakdown(engine, prompt: list[int], threads: int, calls: int = 16) -> dict:
    """Where one batch-1 decode step of `engine` goes, each part timed alone (no profiler; each the
    mean of `calls` calls in a row, best of 3), at `threads` threads:
    - the step: the engine's forward of one token after the prompt (`Engine.forward`, as its
      decode loop runs it) with its KV cache;
    - its linear layers alone, one row each (the weight matmuls with the layers' own casts): the
      existing `roofline` ceiling, for each precision as chatforge holds its weights;
    - attention alone: scaled_dot_product_attention of one query over the prompt's keys, in the
      cache's dtype, once per layer;
    - the rest (norms, RoPE, residuals, reshapes, casts, the cache writes, dispatch) = step - both;
    and for the prompt: the linear layers on all its rows (the prefill's matmuls); for int4 layers
    also a dense bf16 matmul with the same weights (unpacked from the kernel's format) on those
    rows, and what unpacking 4-bit codes to bf16 elementwise would cost (nibbles, minus 8, times
    the group scale, plus the zero point, on codes of the same shapes)."""
    from chatforge.infer.engine import KVCache

    model, L = engine.model, len(prompt)
    cfg = model.config
    linears = linear_modules(model)
    dtype = next(model.parameters()).dtype
    one = {m.in_features: torch.randn(1, 1, m.in_features, dtype=dtype) for m in linears}
    rows = {m.in_features: torch.randn(1, L, m.in_features, dtype=dtype) for m in linears}
    cache = KVCache.for_model(model, 1, L + 4 * calls + 8, engine.cache_dtype)
    out: dict = {}
    with torch.inference_mode(), engine.thread_limit():
        engine.forward(torch.tensor([prompt]), cache, torch.arange(L)[None], None)
        tok = torch.tensor([[prompt[-1]]])

        def step():
            engine.forward(tok, cache, torch.tensor([[cache.pos]]), None)

        out["step_ms"] = mean_time(step, calls) * 1e3
        out["linear_ms"] = mean_time(lambda: [m(one[m.in_features]) for m in linears], calls) * 1e3
        q = torch.randn(1, cfg.n_head, 1, cfg.head_dim, dtype=engine.cache_dtype)
        k = torch.randn(1, cfg.n_kv_head, L, cfg.head_dim, dtype=engine.cache_dtype)
        gqa = {"enable_gqa": True} if cfg.n_kv_head != cfg.n_head else {}
        out["attention_ms"] = mean_time(
            lambda: [torch.nn.functional.scaled_dot_product_attention(q, k, k, **gqa) for _ in range(cfg.n_layer)],
            calls) * 1e3
        out["rest_ms"] = out["step_ms"] - out["linear_ms"] - out["attention_ms"]
        out["prefill_linear_ms"] = mean_time(lambda: [m(rows[m.in_features]) for m in linears], 1, 2) * 1e3
        int4 = [m for m in linears if type(m).__name__ == "Int4Linear"]
        if int4:
            # The dense weights back from the packed ones: the kernel applied to the identity.
            dense = [torch.ops.aten._weight_int4pack_mm_for_cpu(torch.eye(m.in_features, dtype=torch.bfloat16),
                                                                 m.packed, m.group_size, m.qparams).T.contiguous()
                     for m in int4]
            xs = {m.in_features: rows[m.in_features].reshape(L, -1).to(torch.bfloat16) for m in int4}
            out["prefill_int4_kernel_ms"] = mean_time(lambda: [m(rows[m.in_features]) for m in int4], 1, 2) * 1e3
            out["prefill_int4_as_dense_bf16_ms"] = mean_time(
                lambda: [xs[m.in_features] @ w.T for m, w in zip(int4, dense)], 1, 2) * 1e3
            codes = [(torch.randint(0, 256, (m.out_features, m.in_features // 2), dtype=torch.uint8),
                      torch.randn(m.out_features, m.in_features // m.group_size, 1, dtype=torch.bfloat16),
                      m.group_size) for m in int4]

            def unpack():
                for c, sc, g in codes:
                    q = torch.stack([c & 15, c >> 4], -1).view(c.shape[0], -1, g).to(torch.bfloat16)
                    ((q - 8) * sc + sc).view(c.shape[0], -1)

            out["int4_unpack_elementwise_ms"] = mean_time(unpack, 1, 2) * 1e3
    return out


def profile_decode(engine, prompt: list[int], steps: int) -> dict:
    """torch.profiler over `steps` batch-1 decode steps after the prompt, as the engine runs them
    (`Engine.forward` with its KV cache and threads): the ops by self time and the number of
    ops per step. The profiler's own cost per op inflates the wall time; the shares are what count."""
    from torch.profiler import ProfilerActivity, profile

    from chatforge.infer.engine import KVCache

    L = len(prompt)
    cache = KVCache.for_model(engine.model, 1, L + steps + 8, engine.cache_dtype)
    with torch.inference_mode(), engine.thread_limit():
        engine.forward(torch.tensor([prompt]), cache, torch.arange(L)[None], None)
        tok = torch.tensor([[prompt[-1]]])
        for _ in range(2):
            engine.forward(tok, cache, torch.tensor([[cache.pos]]), None)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                engine.forward(tok, cache, torch.tensor([[cache.pos]]), None)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]
    return {"ops_per_step": sum(e.count for e in events) / steps,
            "top": [{"op": e.key, "share": e.self_cpu_time_total / total, "calls_per_step": e.count / steps}
                    for e in top]}


if __name__ == "__main__":
    demo_worker(json.loads(sys.argv[1]))
