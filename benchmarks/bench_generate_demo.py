"""Benchmark: the demo assistant run by chatforge, llama.cpp and HF `generate`; then `chatforge
serve` against llama.cpp's servers.

    .venv/bin/python benchmarks/bench_generate_demo.py [--threads 1,2] [--quick] [--profile]
        [--serve-precisions bf16,int8] [--serve-peers llama-server,llama_cpp.server] [--no-serve]

(`benchmarks/bench_generate.py --only demo` runs the same.) It needs the demo assistant
(`make demo`) and llama-cpp-python (the dev extra).

The engines run in worker processes (chatforge's and HF's: `_demo_worker.py`; llama.cpp's:
`_llamacpp.py`). The demo assistant (runs/demo/sft: SmolLM2-135M-Instruct with its LoRA merged) run by chatforge in fp32,
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

The last line printed is one JSON object: {"bench": "generate", "demo": ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from _generate_common import fmt, memory_bandwidth, run_main

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent

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


class Worker:
    """The parent's handle on one engine's worker process (`_demo_worker.py`, or `_llamacpp.py --worker`)."""

    def __init__(self, name: str, spec: dict, log_dir: Path):
        self.name, self.spec = name, spec
        self.log_path = log_dir / (name.replace(" ", "_").replace(".", "") + ".log")
        self.log = open(self.log_path, "w")
        env = {**os.environ, "CHATFORGE_QUIET": "1", "OMP_NUM_THREADS": str(spec["threads"]),
               "MKL_NUM_THREADS": str(spec["threads"]), "TOKENIZERS_PARALLELISM": "false",
               "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
        # llama.cpp's workers run _llamacpp.py: no torch in their memory or their threads
        script = [str(HERE / "_llamacpp.py"), "--worker"] if spec["engine"] == "llama.cpp" \
            else [str(HERE / "_demo_worker.py")]
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

    from chatforge.files import cache_dir
    from chatforge.model.folder import load_tokenizer
    from chatforge.pipeline import DEFAULTS

    model_dir, export = Path(args.demo_model), Path(args.gguf_dir)
    args.gguf = {q: gguf_file(export, q, model_dir) for q in ("f16", "q8_0", "q4_0")}
    tok = load_tokenizer(model_dir)
    cache = Path(args.sources_cache) if args.sources_cache else cache_dir()
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
        print(f"{name:<24}{r['errors']:>7}{r['agg_tok_s']:>10.1f}{fmt(r['ttft_p50_s'], 11, 2)}{fmt(r['ttft_p95_s'], 11, 2)}"
              f"{fmt(r['latency_p50_s'], 12, 1)}{fmt(r['mean_output_tokens'], 11, 1)}{prompt}{peak}"
              f"{r['load'][0]:>6.1f}->{r['load'][1]:<4.1f}{rel}")
    for name, r in servers.items():
        if "server_first_token_mean_s" in r:
            print(f"{name}: its own first-token time (/metrics, before text is released) mean "
                  f"{r['server_first_token_mean_s']:.2f} s")
    return targets


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


def run(args: argparse.Namespace) -> dict:
    """The demo part when its model and llama-cpp-python are there (else a line saying what is missing)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        llama_cpp = None
    if not Path(args.demo_model, "config.json").is_file():
        print(f"\ndemo assistant: {args.demo_model} is missing; build it with `make demo`")
        return {}
    if llama_cpp is None:
        print("\ndemo assistant against llama.cpp: llama-cpp-python is not installed (the dev extra has it)")
        return {}
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
    return {"demo": demo(args)}


def add_options(ap: argparse.ArgumentParser) -> None:
    demo_args = ap.add_argument_group("the demo assistant against llama.cpp (--only demo)")
    demo_args.add_argument("--demo-model", default=str(ROOT / "runs/demo/sft"), help="the demo assistant's folder")
    demo_args.add_argument("--demo-data", default=str(ROOT / "runs/demo/data"), help="its data (qa_val.jsonl)")
    demo_args.add_argument("--gguf-dir", default=str(ROOT / "runs/demo/export"),
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


if __name__ == "__main__":
    run_main(__doc__, add_options, run)
