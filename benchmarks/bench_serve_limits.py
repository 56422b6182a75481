"""Benchmark: what one long prompt does to `chatforge serve` - its memory and everyone's time to
first token - for two source trees of chatforge, one after the other, in one run.

    .venv/bin/python benchmarks/bench_serve_limits.py [--before GIT_REV] [--long-tokens 2000]
        [--short 3] [--threads 1] [--extra-args "--kv-cache-mb 512"]

The model is SmolLM2-135M-Instruct, imported as `bench_serve.py` does (cached under
`bench/serve/`). For each tree - `--before` (a git revision of this repository, exported to a
temporary folder with `git archive`; default: the merge base with main) and this checkout - a
`python -m chatforge serve` subprocess runs on a free port of 127.0.0.1 with its defaults and
--threads, alone (the previous one is stopped first), and:

1. idle: after a warm-up request, its resident memory (VmRSS) and --short short streamed chats
   one after the other: their time to first token (TTFT, to the first content chunk);
2. long: one /v1/completions request with a prompt of about --long-tokens tokens (max_tokens 4)
   in the background; one second later the same short chats, one after the other, while it is
   being prefilled: their TTFT, and whether they finished before the long one;
3. after: VmRSS once the long request has ended (the cache should be given back) and the peak
   (VmHWM) over the whole run;
4. burst: --burst short streamed chats sent at once: their TTFT median and p95.

The machine is shared and noisy: the ratios (long vs idle TTFT, RSS after vs idle) are what to
compare, not the absolute seconds. The last line is one JSON object: {"bench": "serve_limits", ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from bench_serve import chatforge_folder, free_port, gguf_path

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = ["How do I reset my password?", "Can I get a refund?", "Where is my invoice?",
             "How do I change my e-mail address?", "Is there a free plan?"]


def rss_mib(pid: int, key: str = "VmRSS") -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024


def ttft(url: str, question: str) -> float | None:
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": 8, "temperature": 0, "stream": True}
    start = time.perf_counter()
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: {") and '"content": "' in line and '"content": ""' not in line:
                first = time.perf_counter() - start
                for _ in lines:                     # the rest of the reply
                    pass
                return first
    return None


def export_tree(rev: str, into: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "src"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "src"


def measure(name: str, src: Path, folder: Path, args: argparse.Namespace, extra: list[str]) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    with open(Path(tempfile.gettempdir()) / f"bench_serve_limits_{name}.log", "w") as log:
        return _measure(name, src, folder, args, extra, port, url, env, log)


def _measure(name, src, folder, args, extra, port, url, env, log) -> dict:
    cmd = [sys.executable, "-m", "chatforge", "serve", "--model", str(folder), "--port", str(port), "--no-feedback",
           "--threads", str(args.threads), "--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"{name}: the server did not start (see {log.name})")
            time.sleep(0.5)
        ttft(url, "hello")                                          # warm-up
        idle_rss = rss_mib(proc.pid)
        idle = [ttft(url, q) for q in QUESTIONS[:args.short]]
        prompt = " ".join(f"item {i} is in stock." for i in range(args.long_tokens // 6))
        long: dict = {}

        def send_long():
            t0 = time.perf_counter()
            r = httpx.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 4, "temperature": 0},
                           timeout=1200)
            long.update(status=r.status_code, seconds=time.perf_counter() - t0, end=time.perf_counter(),
                        prompt_tokens=(r.json().get("usage") or {}).get("prompt_tokens"))

        t = threading.Thread(target=send_long)
        t.start()
        time.sleep(1.0)
        during, finished_first = [], 0
        for q in QUESTIONS[:args.short]:
            during.append(ttft(url, q))
            finished_first += "end" not in long
        t.join()
        time.sleep(1.0)
        after_rss = rss_mib(proc.pid)
        burst: list = [None] * args.burst
        threads = [threading.Thread(target=lambda i=i: burst.__setitem__(i, ttft(url, QUESTIONS[i % len(QUESTIONS)])))
                   for i in range(args.burst)]
        for b in threads:
            b.start()
        for b in threads:
            b.join()
        done = sorted(x for x in burst if x is not None)
        return {"burst_ttft_p50_s": round(done[len(done) // 2], 2) if done else None,
                "burst_ttft_p95_s": round(done[min(len(done) - 1, int(0.95 * len(done)))], 2) if done else None,"name": name, "idle_rss_mib": round(idle_rss, 1), "after_rss_mib": round(after_rss, 1),
                "peak_rss_mib": round(rss_mib(proc.pid, "VmHWM"), 1),
                "idle_ttft_s": [round(x, 2) for x in idle], "during_long_ttft_s": [round(x, 2) for x in during],
                "short_done_before_long": finished_first, "long": long, "options": extra}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", default=None, help="git revision to compare with (default: merge base with main)")
    p.add_argument("--long-tokens", type=int, default=2000)
    p.add_argument("--short", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--burst", type=int, default=16, help="short chats sent at once at the end")
    p.add_argument("--extra-args", default="", help="more `chatforge serve` options for this checkout")
    p.add_argument("--skip-before", action="store_true", help="measure this checkout only")
    args = p.parse_args()
    rev = args.before or subprocess.run(["git", "-C", str(REPO), "merge-base", "HEAD", "main"], check=True,
                                        capture_output=True, text=True).stdout.strip()
    folder = chatforge_folder(gguf_path())
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_before:
            before_src = export_tree(rev, Path(tmp))
            results.append(measure(f"before ({rev[:7]})", before_src, folder, args, []))
        results.append(measure("this checkout", REPO / "src", folder, args, shlex.split(args.extra_args)))
    print(f"{'server':<20} {'idle RSS':>9} {'after':>9} {'peak':>9}  {'idle TTFT':>16}  {'TTFT during long':>22}"
          f"  {'burst p50/p95':>13}  long")
    for r in results:
        print(f"{r['name']:<20} {r['idle_rss_mib']:>9} {r['after_rss_mib']:>9} {r['peak_rss_mib']:>9}  "
              f"{r['idle_ttft_s']!s:>16}  {r['during_long_ttft_s']!s:>22}  "
              f"{r['burst_ttft_p50_s']:>6}/{r['burst_ttft_p95_s']:<6}  "
              f"{r['long'].get('prompt_tokens')} tokens in {r['long'].get('seconds', 0):.1f} s")
    print(json.dumps({"bench": "serve_limits", "long_tokens": args.long_tokens, "threads": args.threads,
                      "results": results}))


if __name__ == "__main__":
    main()
