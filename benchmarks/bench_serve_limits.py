"""Benchmark: what `chatforge serve` does under the loads of issue 23 - one long prompt, a burst of
short ones, 8 clients at once - for two source trees of chatforge and for llama.cpp's
`llama-server` at the same precision, in one run.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_serve_limits.py [--before GIT_REV] [--model DIR]
        [--long-tokens 7900] [--short 5] [--burst 16] [--clients 8] [--prompt-tokens 600]
        [--precisions bf16,int8] [--threads 1] [--skip-before] [--no-llama] [--phases limits,load]

The model is SmolLM2-135M-Instruct as `bench_serve.py` imports it (cached under `bench/serve/`),
or --model (any chatforge model folder, e.g. a demo assistant's `sft/`). The trees are
`--before` (a git revision of this repository, exported with `git archive`; default: the merge
base with main) and this checkout; each `python -m chatforge serve` runs as a subprocess on a free
port of 127.0.0.1, with --threads, one server at a time.

Phase `limits` (bf16, each tree):
1. idle: after a warm-up request, the resident memory (VmRSS) and --short short streamed chats one
   after the other: their time to first token (TTFT, to the first streamed text);
2. long: one /v1/completions request with a prompt of --long-tokens tokens (max_tokens 4) in the
   background; one second later the same short chats, one after the other, while it is being
   prefilled: their TTFT (target: p95 at most 3x the idle p95), and whether they finished first;
3. after: VmRSS once the long request has ended (the cache given back);
4. burst: --burst short streamed chats sent at once: their TTFT median and p95 (target: the
   median at least 2x better than the previous tree's, which prefilled them one at a time).

Phase `load` (each precision, each tree, and llama-server on the peer GGUF file - f16 for bf16,
q8_0 for int8, exported with `chatforge export` into the cache when missing - with --clients
slots, 1,024 positions each, -t --threads; q8_0 with --no-repack, as its repacked kernels segfault
on this AMX CPU): a fresh server, a warm-up request, then --clients
streaming clients at once, each one chat of about --prompt-tokens tokens (a system message, passages
and a question, different for each client), max_tokens 128, greedy: output tokens/s over the
wall time, TTFT p50, and the server's peak resident memory over its whole life (VmHWM: loading
included). Target: chatforge's peak at most 1.5x llama-server's at the same precision, its
throughput kept.

The machine is shared and noisy: the ratios in one run are what to compare, not the absolute
seconds. The last line is one JSON object: {"bench": "serve_limits", ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from bench_serve import QUESTIONS, SYSTEM, cache_root, chatforge_folder, free_port, gguf_path

REPO = Path(__file__).resolve().parents[1]
PEER = {"bf16": "f16", "int8": "q8_0"}


def rss_mib(pid: int, key: str = "VmRSS") -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024


def chat(url: str, messages: list[dict], max_tokens: int) -> dict:
    """One streamed chat: seconds to the first text, output tokens, whole time."""
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, pieces, usage = None, 0, None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=1200) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            obj = json.loads(line[6:])
            if obj.get("usage"):
                usage = obj["usage"].get("completion_tokens")
            for choice in obj.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    pieces += 1
                    if first is None:
                        first = time.perf_counter() - start
    return {"ttft": first, "tokens": usage if usage is not None else pieces, "seconds": time.perf_counter() - start}


def short(url: str, question: str) -> float | None:
    return chat(url, [{"role": "user", "content": question}], 8)["ttft"]


def pctl(values: list[float], p: float) -> float | None:
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    return round(values[min(len(values) - 1, int(round(p * (len(values) - 1))))], 2)


def export_tree(rev: str, into: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "src"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "src"


class Proc:
    """A server subprocess, stopped on exit."""

    def __init__(self, name: str, cmd: list[str], port: int, env: dict, health: str = "/health"):
        self.name, self.url = name, f"http://127.0.0.1:{port}"
        self.log = open(Path(tempfile.gettempdir()) / f"bench_serve_limits_{name.replace(' ', '_')}.log", "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(self.url + health, timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError(f"{name}: the server did not start (see {self.log.name})")
            time.sleep(0.5)

    def __enter__(self) -> "Proc":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def chatforge(name: str, src: Path, folder: Path, args, extra: list[str]) -> Proc:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "chatforge", "serve", "--model", str(folder), "--port", str(port), "--no-feedback",
           "--threads", str(args.threads), "--log-level", "warning", "--repetition-penalty", "1.0", *extra]
    return Proc(name, cmd, port, env)


def limits(server: Proc, args, long_prompt: str) -> dict:
    pid, url = server.proc.pid, server.url
    short(url, "hello")                                         # warm-up
    idle_rss = rss_mib(pid)
    idle = [short(url, q) for q in QUESTIONS[:args.short]]
    long: dict = {}

    def send_long():
        t0 = time.perf_counter()
        r = httpx.post(url + "/v1/completions", json={"prompt": long_prompt, "max_tokens": 4, "temperature": 0},
                       timeout=1200)
        long.update(status=r.status_code, seconds=round(time.perf_counter() - t0, 1),
                    prompt_tokens=(r.json().get("usage") or {}).get("prompt_tokens"))

    t = threading.Thread(target=send_long)
    t.start()
    time.sleep(1.0)
    during, finished_first = [], 0
    for q in QUESTIONS[:args.short]:
        during.append(short(url, q))
        finished_first += "status" not in long
    t.join()
    time.sleep(1.0)
    after_rss = rss_mib(pid)
    burst: list = [None] * args.burst
    threads = [threading.Thread(target=lambda i=i: burst.__setitem__(i, short(url, QUESTIONS[i % len(QUESTIONS)])))
               for i in range(args.burst)]
    for b in threads:
        b.start()
    for b in threads:
        b.join()
    return {"idle_rss_mib": round(idle_rss), "after_rss_mib": round(after_rss),
            "idle_ttft_s": [round(x, 2) for x in idle], "idle_ttft_p95_s": pctl(idle, 0.95),
            "during_long_ttft_s": [round(x, 2) if x is not None else None for x in during],
            "during_long_ttft_p95_s": pctl(during, 0.95), "short_done_before_long": finished_first, "long": long,
            "burst_ttft_p50_s": pctl(burst, 0.5), "burst_ttft_p95_s": pctl(burst, 0.95)}


def load_prompts(tok, n: int, target: int) -> list[list[dict]]:
    """`n` different chats of about `target` tokens: passages about orders, then a question."""
    out = []
    for c in range(n):
        passages, j = [], 0
        while True:
            passages.append(f"[{j + 1}] Order {1000 + 37 * c + j} of customer {c} ships from warehouse "
                            f"{(c + j) % 7} within {2 + (j % 5)} days; returns are accepted for {14 + j % 3 * 7} days.")
            j += 1
            user = "Passages:\n" + "\n".join(passages) + f"\n\nQuestion: {QUESTIONS[c % len(QUESTIONS)]}"
            if len(tok.encode(SYSTEM + user)) + 20 >= target:
                break
        out.append([{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}])
    return out


def load(server: Proc, prompts: list[list[dict]], max_tokens: int) -> dict:
    chat(server.url, [{"role": "user", "content": "hello"}], 8)                 # warm-up
    results: list = [None] * len(prompts)
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, chat(server.url, prompts[i], max_tokens)))
               for i in range(len(prompts))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"out_tok_s": round(sum(r["tokens"] for r in results) / wall, 1), "tokens": sum(r["tokens"] for r in results),
            "wall_s": round(wall, 1), "ttft_p50_s": pctl([r["ttft"] for r in results], 0.5),
            "peak_rss_mib": round(rss_mib(server.proc.pid, "VmHWM"))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", default=None, help="git revision to compare with (default: merge base with main)")
    p.add_argument("--model", default=None, help="a chatforge model folder (default: SmolLM2-135M-Instruct imported)")
    p.add_argument("--long-tokens", type=int, default=7900)
    p.add_argument("--short", type=int, default=5)
    p.add_argument("--burst", type=int, default=16, help="short chats sent at once")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients of the load phase")
    p.add_argument("--prompt-tokens", type=int, default=600, help="each load client's prompt length")
    p.add_argument("--max-tokens", type=int, default=128, help="each load client's reply length")
    p.add_argument("--precisions", default="bf16,int8")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--phases", default="limits,load")
    p.add_argument("--skip-before", action="store_true", help="measure this checkout only")
    p.add_argument("--no-llama", action="store_true", help="leave llama-server out")
    args = p.parse_args()
    phases = set(args.phases.split(","))
    rev = args.before or subprocess.run(["git", "-C", str(REPO), "merge-base", "HEAD", "main"], check=True,
                                        capture_output=True, text=True).stdout.strip()
    folder = Path(args.model) if args.model else chatforge_folder(gguf_path())
    from chatforge.model.folder import load_tokenizer

    tok = load_tokenizer(folder)
    sentences = [f"item {i} is in stock." for i in range(args.long_tokens)]
    lo, hi = 1, len(sentences)                       # the most sentences within --long-tokens tokens
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if len(tok.encode(" ".join(sentences[:mid]))) <= args.long_tokens else (lo, mid - 1)
    long_prompt = " ".join(sentences[:lo])
    prompts = load_prompts(tok, args.clients, args.prompt_tokens)
    out: dict = {"bench": "serve_limits", "model": str(folder), "before": rev, "threads": args.threads,
                 "long_tokens": len(tok.encode(long_prompt)), "limits": {}, "load": {}}
    with tempfile.TemporaryDirectory() as tmp:
        trees = [] if args.skip_before else [(f"before ({rev[:7]})", export_tree(rev, Path(tmp)))]
        trees.append(("this checkout", REPO / "src"))
        if "limits" in phases:
            for name, src in trees:
                with chatforge(name, src, folder, args, []) as server:
                    out["limits"][name] = limits(server, args, long_prompt)
                print(f"limits {name}: {json.dumps(out['limits'][name])}", flush=True)
        if "load" in phases:
            binary = None
            if not args.no_llama:
                from _llamacpp import gguf_file, llama_server_binary, llama_server_cmd

                binary = llama_server_binary(build=False)
            for prec in args.precisions.split(","):
                extra = ["--quant", prec] if prec in ("int8", "int4") else ["--dtype", prec]
                for name, src in trees:
                    with chatforge(f"{name} {prec}", src, folder, args, extra) as server:
                        out["load"][f"chatforge {prec}, {name}"] = load(server, prompts, args.max_tokens)
                    print(f"load chatforge {prec}, {name}: {json.dumps(out['load'][f'chatforge {prec}, {name}'])}",
                          flush=True)
                if binary is not None:
                    gguf = gguf_file(cache_root() / "gguf" / folder.name, PEER[prec], folder)
                    port = free_port()
                    cmd = llama_server_cmd(binary, gguf, port, args.threads, args.clients, 1024)
                    if PEER[prec] == "q8_0":
                        # Its repacked q8_0 kernels segfault at start on this AMX CPU (llama.cpp
                        # 0.3.36, as in tests/test_export.py): the plain q8_0 kernels.
                        cmd.append("--no-repack")
                    with Proc(f"llama-server {PEER[prec]}", cmd, port, dict(os.environ)) as server:
                        out["load"][f"llama-server {PEER[prec]}"] = load(server, prompts, args.max_tokens)
                    print(f"load llama-server {PEER[prec]}: {json.dumps(out['load'][f'llama-server {PEER[prec]}'])}",
                          flush=True)
    report(out, args)
    print(json.dumps(out))


def report(out: dict, args) -> None:
    if out["limits"]:
        print(f"\none {out['long_tokens']}-token prompt, {args.short} short chats, a burst of {args.burst} "
              f"(bf16, {args.threads} thread(s)); TTFT in seconds, RSS in MiB")
        print(f"{'server':<20}{'idle RSS':>9}{'after':>7}{'idle TTFT p95':>14}{'during long p95':>16}{'ratio':>7}"
              f"{'burst p50':>10}{'p95':>6}  long")
        first = next(iter(out["limits"].values()))
        for name, r in out["limits"].items():
            ratio = (r["during_long_ttft_p95_s"] / r["idle_ttft_p95_s"]
                     if r["during_long_ttft_p95_s"] and r["idle_ttft_p95_s"] else None)
            print(f"{name:<20}{r['idle_rss_mib']:>9}{r['after_rss_mib']:>7}{r['idle_ttft_p95_s']!s:>14}"
                  f"{r['during_long_ttft_p95_s']!s:>16}{(f'{ratio:.1f}x' if ratio else 'n/a'):>7}"
                  f"{r['burst_ttft_p50_s']!s:>10}{r['burst_ttft_p95_s']!s:>6}  "
                  f"{r['long'].get('status')}: {r['long'].get('prompt_tokens')} tokens in {r['long'].get('seconds')} s")
        if len(out["limits"]) > 1 and first["burst_ttft_p50_s"]:
            last = list(out["limits"].values())[-1]
            print(f"burst TTFT median: this checkout {first['burst_ttft_p50_s'] / last['burst_ttft_p50_s']:.2f}x "
                  "better than before (target >= 2x)")
    if out["load"]:
        print(f"\n{args.clients} clients at once, ~{args.prompt_tokens}-token prompts, {args.max_tokens} tokens each, "
              f"{args.threads} thread(s); peak RSS over the server's life (loading included)")
        print(f"{'server':<34}{'out tok/s':>10}{'TTFT p50':>9}{'wall s':>8}{'peak MiB':>9}  vs llama-server")
        for name, r in out["load"].items():
            prec = next((p for p in PEER if f" {p}," in name), None)
            peer = out["load"].get(f"llama-server {PEER[prec]}") if prec else None
            vs = f"  {r['peak_rss_mib'] / peer['peak_rss_mib']:.2f}x peak (target <= 1.5x)" if peer else ""
            print(f"{name:<34}{r['out_tok_s']:>10}{r['ttft_p50_s']!s:>9}{r['wall_s']:>8}{r['peak_rss_mib']:>9}{vs}")


if __name__ == "__main__":
    main()
