"""Benchmark: `chatforge serve --upstream` llama-server against llama-server alone, and chatforge's
own engine beside both.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_upstream.py [--model runs/demo/sft]
        [--docs examples/my_docs] [--quants q8_0,q4_0] [--requests 6] [--max-tokens 128]
        [--clients 8] [--llama-server PATH] [--no-build] [--quick]
        [--vllm /path/to/vllm-venv/bin/python [--hf-export DIR]] [--no-llama]

Real HTTP on loopback, one server process per engine (bench_serve's `Server`), greedy decoding.
The model is the demo assistant (--model; its GGUF exports q8_0 and q4_0 are written once with
`chatforge export` into --gguf-dir, `_llamacpp.gguf_file`); llama-server is the one
`_llamacpp.llama_server_binary` builds from llama-cpp-python's source distribution.

The prompts are the same token ids for every server. chatforge (front or own engine) gets a chat
request with one question (--docs: it retrieves passages and renders the grounded prompt);
llama-server alone gets, on /v1/completions, the token ids of the prompt chatforge renders for
it, made here by the same code (`infer.turn.fit_prompt`, BM25 over --docs, the model's answer
settings); each chatforge reply's `usage.prompt_tokens` is checked against it. The time that
costs here (retrieval and rendering, the median over the questions) is reported apart as the
retrieval time.

1. Single stream (1 thread each, llama-server -np 1): for each quant, the questions one after
   the other against chatforge --upstream llama-server and against llama-server alone, the two
   alternating per question. Per request: time to first token (TTFT: the request sent to the first
   streamed text) and decode tokens/s (the tokens after the first, over the time after the first
   text; tokens from `usage`, else chatforge's tokenizer on the text). Targets: decode >= 0.95x
   llama-server's, TTFT <= llama-server's + the retrieval time.
2. --clients concurrent clients (closed loop, --requests each): chatforge's own engine
   (`chatforge serve --threads 1`, default weights), chatforge --upstream llama-server -np N
   (q8_0), llama-server -np N alone: aggregate tokens/s, TTFT p50/p95, errors.
3. With --vllm: vLLM's OpenAI server on the HF export of --model (bf16, --max-model-len 2048), at
   1 and --clients clients (closed loop, --requests each): vLLM alone, chatforge --upstream vLLM
   and chatforge's own engine on the same model folder (`vllm_section`).

The machine's 1-minute load average is printed around every measurement: on a shared machine the
figures move with it. The last line is one JSON object: {"bench": "upstream", ...}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_serve as bs
from _llamacpp import gguf_file, llama_server_binary

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "How do I add a new user?", "How do I back up the database?", "How do I change the admin password?",
    "How do I restore from a backup?", "How do I configure e-mail notifications?", "What ports must be open?",
    "How do I upgrade to a new version?", "Where are the log files?", "How do I reset a user's password?",
    "How do I enable single sign-on?", "How do I archive old projects?", "What does the health check report?",
]


def build_prompts(model: Path, docs: list[str], questions: list[str], max_tokens: int) -> tuple[list[list[int]], float]:
    """The ids chatforge renders for each question (grounded, as `serve` does) and the median
    seconds that takes (retrieval + rendering)."""
    from chatforge.infer.answer import AnswerSettings
    from chatforge.infer.turn import fit_prompt, refused_below_threshold
    from chatforge.infer.plugin_builtins import DocsPlugin
    from chatforge.infer.plugins import PluginRunner
    from chatforge.model.folder import load_config, load_tokenizer
    from chatforge.retrieval.fusion import load_retriever

    tok, context = load_tokenizer(model), load_config(model).max_seq_len
    settings = AnswerSettings.load(model)
    index = load_retriever(docs, None, "bm25") if docs else None
    tools = PluginRunner([DocsPlugin(index, settings.passages)]) if index is not None else None
    out, seconds = [], []
    for q in questions:
        t = time.perf_counter()
        prompt = fit_prompt(tok, None, index, [], q, context - min(max_tokens, context // 2),
                            settings.passages, tools, context_tokens=settings.context_tokens)
        prompt = refused_below_threshold(prompt, settings.threshold("bm25"))
        seconds.append(time.perf_counter() - t)
        out.append(prompt.ids)
    return out, statistics.median(seconds)


# The first whole word: a word and the space (or end of line) after it, what chatforge's reply
# filter needs before it shows a word (infer/safety.py: a word is scrubbed whole).
WHOLE_WORD = re.compile(r"\S\s")


async def stream(client: httpx.AsyncClient, url: str, body: dict, chat: bool) -> dict:
    """One streamed request: TTFT, decode seconds, tokens, text, errors."""
    r = {"start": time.perf_counter(), "first": None, "word": None, "end": None, "text": "", "first_text": "",
         "usage": None, "error": None}
    parts = []
    try:
        for attempt in (0, 1):
            try:
                # llama-server may close a kept-alive connection as a request goes out on it (no
                # answer at all): sent once more, as chatforge's upstream client does.
                resp = await client.send(client.build_request(
                    "POST", url + ("/v1/chat/completions" if chat else "/v1/completions"),
                    json={**body, "stream": True, "stream_options": {"include_usage": True}}), stream=True)
                break
            except httpx.RemoteProtocolError:
                if attempt:
                    raise
        try:
            if resp.status_code != 200:
                r["error"] = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
            async for line in resp.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    r["error"] = str(chunk["error"])[:200]
                r["usage"] = chunk.get("usage") or r["usage"]
                for c in chunk.get("choices") or []:
                    text = (c.get("delta") or {}).get("content") if chat else c.get("text")
                    if text:
                        if r["first"] is None:
                            r["first"], r["first_text"] = time.perf_counter(), text
                        parts.append(text)
                        if r["word"] is None and WHOLE_WORD.search("".join(parts)):
                            r["word"] = time.perf_counter()
        finally:
            await resp.aclose()
    except httpx.HTTPError as e:
        r["error"] = f"{type(e).__name__}: {e}"
    r["end"], r["text"] = time.perf_counter(), "".join(parts)
    return r


def figures(r: dict, count) -> dict:
    """TTFT; decode tokens/s = the tokens of the text that came after the first chunk, over the
    time after it (chatforge's reply filter may send its first chunk a few tokens late, holding a
    word until it is whole: counting from that chunk on keeps the rate a rate)."""
    tokens = (r["usage"] or {}).get("completion_tokens") or count(r["text"])
    decode = r["end"] - r["first"] if r["first"] else 0
    after = count(r["text"]) - count(r["first_text"])
    return {"ttft_s": r["first"] - r["start"] if r["first"] else None, "tokens": tokens,
            "first_word_s": r["word"] - r["start"] if r["word"] else None, "first_text": r["first_text"],
            "decode_tok_s": after / decode if decode > 0 and after > 0 else None,
            "prompt_tokens": (r["usage"] or {}).get("prompt_tokens"), "error": r["error"]}


def chat_body(question: str, max_tokens: int) -> dict:
    return {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, "temperature": 0}


def ids_body(ids: list[int], max_tokens: int) -> dict:
    return {"prompt": ids, "max_tokens": max_tokens, "temperature": 0}


def med(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def start(name: str, cmd: list[str], log_dir: Path, path: str) -> bs.Server:
    port = int(cmd[cmd.index("--port") + 1])
    print(f"\n{name}: {' '.join(cmd)}  (load {os.getloadavg()[0]:.2f})", flush=True)
    server = bs.Server(name, cmd, port, 1, log_dir)
    server.wait_ready(600, path)
    return server


def llama(binary: Path, gguf: Path, slots: int, ctx: int) -> list[str]:
    # --no-repack: on this AMX CPU the llama-server built from llama-cpp-python 0.3.36's sources
    # segfaults right after loading a q8_0 file with its weights repacked (seen with the demo's
    # q8_0 export; tests/test_export.py notes the same for the binding).
    return [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(bs.free_port()), "-np", str(slots),
            "-c", str(slots * ctx), "-t", "1", "-tb", "1", "--no-webui", "--log-disable", "--no-repack"]


def front(model: Path, docs: list[str], upstream: str | None, db: Path, slots: int) -> list[str]:
    cmd = [sys.executable, "-m", "chatforge", "serve", "--model", str(model), "--port", str(bs.free_port()),
           "--db", str(db), "--retrieval", "bm25", "--log-level", "warning", "--threads", "1",
           "--max-batch", str(slots)]
    cmd += ["--docs", *docs] if docs else []
    return cmd + (["--upstream", upstream] if upstream else [])


def single_stream(args, binary, gguf, prompts, count, log_dir) -> dict:
    """Two llama-servers of the same file, one alone and one behind chatforge: llama-server keeps
    a slot's last prompt in its KV cache, and one shared server would answer the second asking of
    a prompt without its prefill."""
    engine = start("llama-server", llama(binary, gguf, 1, args.ctx), log_dir, "/health")
    behind = cf = None
    try:
        behind = start("llama-server (behind chatforge)", llama(binary, gguf, 1, args.ctx), log_dir, "/health")
        cf = start("chatforge --upstream", front(args.model, args.docs, behind.url, log_dir / "f.sqlite", 1),
                   log_dir, "/health")

        async def run():
            async with httpx.AsyncClient(timeout=600) as c:
                await stream(c, engine.url, ids_body(prompts[0], 8), chat=False)          # warm-up
                await stream(c, cf.url, chat_body(QUESTIONS[0], 8), chat=True)
                rows = {"llama-server": [], "chatforge --upstream": []}
                for i, q in enumerate(QUESTIONS[:args.requests]):
                    pair = [("llama-server", engine.url, ids_body(prompts[i], args.max_tokens), False),
                            ("chatforge --upstream", cf.url, chat_body(q, args.max_tokens), True)]
                    for name, url, body, chat in pair[i % 2:] + pair[:i % 2]:
                        rows[name].append(figures(await stream(c, url, body, chat), count))
                return rows

        first_before, cpu_before = cf.first_token_totals(), cf.cpu_seconds()
        rows = asyncio.run(run())
        first_after, cpu = cf.first_token_totals(), cf.cpu_seconds() - cpu_before
    finally:
        for s in (cf, behind, engine):
            if s is not None:
                s.stop()
    mismatch = [i for i, r in enumerate(rows["chatforge --upstream"]) if r["prompt_tokens"] not in (None, len(prompts[i]))]
    if mismatch:
        print(f"  note: questions {mismatch}: chatforge's prompt differs from the one rebuilt here", flush=True)
    out = {name: {"ttft_s": med(r["ttft_s"] for r in rs), "first_word_s": med(r["first_word_s"] for r in rs),
                  "first_texts": [r["first_text"] for r in rs][:4],
                  "decode_tok_s": med(r["decode_tok_s"] for r in rs),
                  "tokens": med(r["tokens"] for r in rs), "errors": sum(bool(r["error"]) for r in rs),
                  "error_examples": sorted({r["error"] for r in rs if r["error"]})[:2]}
           for name, rs in rows.items()}
    # What the front itself costs: its process's CPU time per token it passed on (on a 2-core
    # machine that time is taken from the engine's core).
    shown = sum(r["tokens"] for r in rows["chatforge --upstream"])
    out["chatforge --upstream"]["front_cpu_ms_per_token"] = 1e3 * cpu / shown if shown else None
    if first_before and first_after and first_after[1] > first_before[1]:
        # chatforge's own clock: the request to the engine's first token, before the reply filter.
        out["chatforge --upstream"]["engine_first_token_mean_s"] = (
            (first_after[0] - first_before[0]) / (first_after[1] - first_before[1]))
    return out


def closed_loop(url: str, chat: bool, n: int, requests: int, max_tokens: int, prompts, count) -> dict:
    """n clients, each sending `requests` streamed requests one after the other (a warm-up
    request each first): aggregate tokens/s, TTFT p50/p95, errors, the load around it."""
    async def run():
        limits = httpx.Limits(max_connections=n + 4)
        async with httpx.AsyncClient(timeout=600, limits=limits) as c:
            await asyncio.gather(*(stream(c, url, chat_body(QUESTIONS[i], 8) if chat else
                                          ids_body(prompts[i], 8), chat) for i in range(n)))   # warm-up

            async def client(k: int) -> list[dict]:
                res = []
                for j in range(requests):
                    i = (k + j) % len(prompts)
                    body = chat_body(QUESTIONS[i], max_tokens) if chat else ids_body(prompts[i], max_tokens)
                    res.append(figures(await stream(c, url, body, chat), count))
                return res

            t = time.perf_counter()
            done = await asyncio.gather(*(client(k) for k in range(n)))
            return [r for rs in done for r in rs], time.perf_counter() - t

    load = os.getloadavg()[0]
    results, wall = asyncio.run(run())
    ttfts = [r["ttft_s"] for r in results if r["ttft_s"] is not None]
    tokens = sum(r["tokens"] for r in results if not r["error"])
    return {"agg_tok_s": tokens / wall, "tokens": tokens,
            "ttft_p50_s": bs.percentile(ttfts, 50), "ttft_p95_s": bs.percentile(ttfts, 95),
            "decode_tok_s_p50": med(r["decode_tok_s"] for r in results),
            "errors": sum(bool(r["error"]) for r in results), "wall_s": wall,
            "error_examples": sorted({r["error"] for r in results if r["error"]})[:2],
            "load": [round(load, 2), round(os.getloadavg()[0], 2)]}


def concurrent(args, binary, gguf, prompts, count, log_dir) -> dict:
    n = args.clients
    out = {}
    plans = [("chatforge own engine", None)]
    if binary is not None:
        plans += [("chatforge --upstream llama-server", "front"), ("llama-server alone", "alone")]
    for name, kind in plans:
        engine = cf = None
        try:
            if kind is not None:
                engine = start(f"llama-server -np {n}", llama(binary, gguf, n, args.ctx), log_dir, "/health")
            if kind != "alone":
                cf = start(name, front(args.model, args.docs, engine.url if engine else None,
                                       log_dir / f"{kind}.sqlite", n), log_dir, "/health")
            url, chat = (cf.url, True) if cf else (engine.url, False)
            out[name] = closed_loop(url, chat, n, args.requests, args.max_tokens, prompts, count)
            print(f"  {name}: {out[name]}", flush=True)
        finally:
            for s in (cf, engine):
                if s is not None:
                    s.stop()
    return out


def vllm_section(args, prompts, count, log_dir) -> dict:
    """vLLM's OpenAI server (its own venv's python, --vllm) on the HF export of --model, bf16,
    --max-model-len 2048, at 1 and --clients clients: vLLM alone (token ids on /v1/completions),
    chatforge --upstream vLLM (chat), then chatforge's own engine on the same model folder (vLLM
    stopped first; vLLM alone first at 1 client, chatforge first at the next count). OMP_NUM_THREADS=1
    for each (VLLM_CPU_OMP_THREADS_BIND=nobind; chatforge --threads 1). One
    vLLM serves both the alone and the behind-chatforge runs, so its prefix cache is turned off:
    neither may answer from the other's prompts."""
    hf = args.hf_export or (log_dir / "hf")
    if not (Path(hf) / "config.json").exists():
        from chatforge.model.export import export_model

        export_model(args.model, "hf", Path(hf), "bf16")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    cmd = [args.vllm, "-m", "vllm.entrypoints.openai.api_server", "--model", str(hf), "--served-model-name", "sft",
           "--dtype", "bfloat16", "--max-model-len", "2048", "--no-enable-prefix-caching",
           "--host", "127.0.0.1", "--port", str(bs.free_port())]
    counts = sorted({1, args.clients})
    out: dict = {name: {} for name in ("vllm alone", "chatforge --upstream vllm", "chatforge own engine")}
    engine = cf = None
    try:
        t = time.perf_counter()
        engine = start("vllm", cmd, log_dir, "/health")
        print(f"  vLLM ready after {time.perf_counter() - t:.0f} s", flush=True)
        cf = start("chatforge --upstream vllm", front(args.model, args.docs, engine.url, log_dir / "v.sqlite",
                                                      args.clients), log_dir, "/health")
        for i, n in enumerate(counts):
            # Which goes first alternates with the client count: vLLM's CPU kernels warm up (and
            # the machine's load drifts) as a run goes on, which would favour whoever is second.
            pair = [("vllm alone", engine.url, False), ("chatforge --upstream vllm", cf.url, True)]
            for name, url, chat in pair[i % 2:] + pair[:i % 2]:
                cpu = cf.cpu_seconds()
                out[name][n] = closed_loop(url, chat, n, args.requests, args.max_tokens, prompts, count)
                if chat:   # the front's own CPU per token passed on (taken from the cores vLLM runs on)
                    tokens = out[name][n]["tokens"]
                    out[name][n]["front_cpu_ms_per_token"] = 1e3 * (cf.cpu_seconds() - cpu) / tokens if tokens else None
                print(f"  {name}, {n} client(s): {out[name][n]}", flush=True)
    finally:
        for s in (cf, engine):
            if s is not None:
                s.stop()
    own = None
    try:
        own = start("chatforge own engine", front(args.model, args.docs, None, log_dir / "o.sqlite", args.clients),
                    log_dir, "/health")
        for n in counts:
            out["chatforge own engine"][n] = closed_loop(own.url, True, n, args.requests, args.max_tokens, prompts,
                                                         count)
            print(f"  chatforge own engine, {n} client(s): {out['chatforge own engine'][n]}", flush=True)
    finally:
        if own is not None:
            own.stop()
    for n in counts:
        base = out["vllm alone"][n]["agg_tok_s"]
        for name in ("chatforge --upstream vllm", "chatforge own engine"):
            r = out[name][n]
            r["tok_s_vs_vllm"] = r["agg_tok_s"] / base if base else None
        print(f"vLLM, {n} client(s): tokens/s vllm alone {bs.fmt(base, 1)}, chatforge --upstream vllm "
              f"{bs.fmt(out['chatforge --upstream vllm'][n]['agg_tok_s'], 1)} "
              f"({bs.fmt(out['chatforge --upstream vllm'][n]['tok_s_vs_vllm'], 3)}x), chatforge own engine "
              f"{bs.fmt(out['chatforge own engine'][n]['agg_tok_s'], 1)} "
              f"({bs.fmt(out['chatforge own engine'][n]['tok_s_vs_vllm'], 3)}x); TTFT p50 "
              + ", ".join(f"{bs.fmt(out[k][n]['ttft_p50_s'], 3)} s" for k in out), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "runs/demo/sft", help="the demo assistant's folder")
    ap.add_argument("--docs", nargs="*", default=[str(ROOT / "examples/my_docs")], help="documents to answer from")
    ap.add_argument("--gguf-dir", type=Path, default=None, help="GGUF exports (default: beside --model, export/)")
    ap.add_argument("--quants", default="q8_0,q4_0")
    ap.add_argument("--requests", type=int, default=6, help="single stream: questions; concurrent: per client")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=2048, help="llama-server's context per slot")
    ap.add_argument("--llama-server", default=None, help="llama-server binary (default: built once, cached)")
    ap.add_argument("--no-build", action="store_true", help="never build llama-server")
    ap.add_argument("--skip-concurrent", action="store_true")
    ap.add_argument("--quick", action="store_true", help="3 requests, 64 tokens")
    ap.add_argument("--vllm", default=None, metavar="PYTHON",
                    help="the python of a venv with vLLM (vllm-cpu): add vLLM at 1 and --clients clients")
    ap.add_argument("--hf-export", type=Path, default=None,
                    help="--vllm: an existing `chatforge export --format hf` folder of --model (default: exported)")
    ap.add_argument("--no-llama", action="store_true", help="skip the llama-server measurements")
    args = ap.parse_args()
    if args.quick:
        args.requests, args.max_tokens = 3, 64
    args.model = args.model.resolve()
    gguf_dir = args.gguf_dir or args.model.parent / "export"
    binary = None if args.no_llama else llama_server_binary(args.llama_server, build=not args.no_build)
    if binary is None and not args.no_llama:
        sys.exit("no llama-server: build it (drop --no-build) or give --llama-server PATH")
    from chatforge.model.folder import load_tokenizer

    tok = load_tokenizer(args.model)

    def count(text: str) -> int:
        return len(tok.encode(text)) if text else 0

    prompts, retrieval_s = build_prompts(args.model, args.docs, QUESTIONS, args.max_tokens)
    refused = [q for q, ids in zip(QUESTIONS, prompts) if not ids]
    if refused:
        # chatforge answers these with its not-found reply and never asks the engine.
        sys.exit(f"{len(refused)} of the {len(QUESTIONS)} questions are refused by {args.model}'s answer settings "
                 f"(answer.json min_score: no passage of --docs scores above it), e.g. {refused[0]!r}; give the "
                 "--docs the model was tuned on, or a model whose threshold lets them through")
    print(f"prompts: {statistics.mean(map(len, prompts)):.0f} tokens on average; retrieval + rendering "
          f"{retrieval_s * 1e3:.1f} ms (median)", flush=True)
    log_dir = Path(tempfile.mkdtemp(prefix="bench_upstream."))
    report = {"bench": "upstream", "retrieval_s": retrieval_s, "single": {}, "concurrent": {}}
    for quant in [] if args.no_llama else args.quants.split(","):
        gguf = gguf_file(gguf_dir, quant, args.model)
        single = single_stream(args, binary, gguf, prompts, count, log_dir)
        ours, theirs = single["chatforge --upstream"], single["llama-server"]
        ratio = ours["decode_tok_s"] / theirs["decode_tok_s"] if ours["decode_tok_s"] and theirs["decode_tok_s"] else None
        single["decode_ratio"] = ratio
        single["ttft_over_llama_plus_retrieval_s"] = (ours["ttft_s"] - theirs["ttft_s"] - retrieval_s
                                                      if ours["ttft_s"] and theirs["ttft_s"] else None)
        report["single"][quant] = single
        print(f"single stream {quant}: decode chatforge --upstream {bs.fmt(ours['decode_tok_s'], 1)} tok/s, "
              f"llama-server {bs.fmt(theirs['decode_tok_s'], 1)} tok/s = {bs.fmt(ratio, 3)}x (target >= 0.95); "
              f"TTFT {bs.fmt(ours['ttft_s'], 3)} s vs {bs.fmt(theirs['ttft_s'], 3)} s + retrieval "
              f"{retrieval_s:.3f} s (target: at most that sum; {bs.fmt(single['ttft_over_llama_plus_retrieval_s'], 3)} s "
              f"over it; chatforge's clock to the engine's first token {bs.fmt(ours.get('engine_first_token_mean_s'), 3)} s); "
              f"first whole word {bs.fmt(ours['first_word_s'], 3)} s vs {bs.fmt(theirs['first_word_s'], 3)} s; "
              f"first texts {ours['first_texts']} vs {theirs['first_texts']}; "
              f"front CPU {bs.fmt(ours.get('front_cpu_ms_per_token'), 2)} ms/token; "
              f"errors {ours['errors']} / {theirs['errors']} {ours['error_examples'] + theirs['error_examples']}", flush=True)
    if args.vllm:
        report["vllm"] = vllm_section(args, prompts, count, log_dir)
    if not args.skip_concurrent and not args.no_llama:
        report["concurrent"] = concurrent(args, binary, gguf_file(gguf_dir, "q8_0", args.model), prompts, count,
                                          log_dir)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
