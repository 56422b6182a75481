"""Benchmark: `chatforge serve` under concurrent streaming clients, beside `transformers serve`.

    .venv/bin/python benchmarks/bench_serve.py [--clients 1,8,32] [--requests-per-client 4]
        [--max-tokens 64] [--threads 2] [--skip-peer] [--quick] [--chatforge-dtype float32]

Real HTTP on loopback. The model is SmolLM2-135M-Instruct from the GGUF that
`chatforge data fetch --sources smollm2-135m-instruct` caches (fetched if it is missing), once
imported for chatforge (`chatforge model import GGUF --out DIR`) and once read by transformers
(`from_pretrained(dir, gguf_file=...)`, dequantized to fp32) and saved with its tokenizer, chat
template and generation config as a plain HF folder. Both folders are kept under the chatforge
cache (`bench/serve/`), so a rerun only starts the servers.

Each server runs alone as a subprocess on a free port of 127.0.0.1, with --threads torch threads
(OMP_NUM_THREADS, and `chatforge serve --threads`); it is ready when `GET /health` answers 200.
A short warm-up (sequential requests, then one small concurrent burst) runs before the loads;
then, for each client count C of --clients, C asynchronous clients (httpx) each send
--requests-per-client streaming chat completions one after the other (a closed loop: a client
sends its next request when its stream has ended). The server is stopped before the next one
starts; two servers never run at once.

- chatforge: `chatforge serve --model DIR --threads N --repetition-penalty 1` (no penalty, as
  transformers decodes the same requests) with its defaults otherwise (weights
  `--dtype auto`, bf16 where the CPU has native bf16; `--max-batch 16`, `--max-queue 64`), the
  feedback store recording every reply into a throw-away database.
- transformers: `transformers serve FOLDER --continuous-batching --device cpu --dtype D
  --cb-num-blocks B` with HF_HUB_OFFLINE=1: the local folder is the pinned model (loaded before
  /health answers). D matches chatforge's weights (--peer-dtype; bf16 is also transformers' faster
  setting here). B defaults to 2 x the most clients: left to itself, continuous batching on a CPU
  sizes its paged KV cache to 60% of the RAM (14 GB here), which was also slower.

The requests are the same for both servers: realistic support questions (below) under one fixed
system message, `max_tokens` --max-tokens, `temperature` 0 (greedy), `stream: true` with
`stream_options: {"include_usage": true}` (transformers ignores the field and sends usage anyway).
Client c's request r is question (c * R + r) mod N, so every load asks both servers the same
questions; the share of identical greedy answers is printed as a check that both run the same
model.

Per request: time to first token (TTFT) = from sending the request to the first chunk with a
non-empty `delta.content`, what a user sees. chatforge's reply filter (`infer/safety.SafeStream`)
holds streamed text back until a word is whole (after a number, until the sentence ends), so its
TTFT is the time to the first whole word; its own /metrics histogram of the first generated token
is read around each load and printed beside it ("server's first token", a mean). Output tokens =
`usage.completion_tokens` of the final chunk when the server sends it, else the streamed text
tokenized with the model's tokenizer (printed: which). The streamed text is also always tokenized,
as a check: transformers' usage counts the <|im_end|> that ends a reply, chatforge's does not (a
~1% difference). An error is a status other than 200, a transport failure or timeout, an `error`
object in the stream, or a stream that ends without a `finish_reason`. Per load: aggregate output
tokens/s = all output tokens / wall time (first request sent to last stream ended), TTFT p50/p95,
whole-reply latency p50/p95, and the cores kept busy during the load by the server, by this client
and by every other process (from /proc: CPU time over the wall time). Other jobs using more than
a quarter of a core during a load get that load flagged: its figures are low by an unknown amount.

Targets (reported, not asserted): chatforge at 8 clients >= 3.5x its aggregate tokens/s at 1
client, 0 errors at 32 clients, and ahead of `transformers serve` at 8 and 32 clients.

The machine is shared: before each server starts, the run waits (--settle, at most 180 s) for the
1-minute load average to fall below half the CPUs (--quiet-load); the load then (nothing of ours
running) and around each load (our server included) is printed, and a server that started on a
busy machine is flagged (a warning, and "busy" in the JSON): its figures are not comparable.
The last line is one JSON object: {"bench": "serve", ...}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

SOURCE = "smollm2-135m-instruct"
VENV_BIN = Path(sys.executable).parent

SYSTEM = ("You are the support assistant of a software company. Answer the customer's question "
          "clearly and briefly.")

QUESTIONS = [
    "How do I reset my password if I no longer have access to my email?",
    "My invoice shows a charge I don't recognise. What should I do?",
    "Can I change the email address on my account?",
    "The app crashes every time I open it on my phone. How can I fix it?",
    "How do I cancel my subscription before the next billing date?",
    "Is there a way to export all my data as a CSV file?",
    "Why am I not receiving the verification code by SMS?",
    "How can I add a second user to my team plan?",
    "What payment methods do you accept?",
    "I was charged twice this month. Can I get a refund?",
    "How do I turn on two-factor authentication?",
    "The website says my session expired. Why does this keep happening?",
    "Can I downgrade from the Pro plan to the Basic plan without losing my files?",
    "How long does it take for a refund to appear on my card?",
    "Where can I find my API key?",
    "My upload is stuck at 99 percent. What can I try?",
    "Do you offer a discount for students or non-profits?",
    "How do I delete my account permanently?",
    "Why is the sync between my laptop and my phone so slow?",
    "Can I use the service offline?",
    "How do I update my billing address for invoices?",
    "I forgot which email I signed up with. How can I find my account?",
    "Is my data encrypted at rest?",
    "How do I restore a file I deleted by mistake yesterday?",
    "The desktop app won't install on Windows 11. What should I check?",
    "Can I transfer my subscription to a colleague?",
    "How do I change the language of the interface?",
    "What happens to my data if my payment fails?",
    "How can I contact a human agent?",
    "Why does the app ask for access to my contacts?",
    "How do I connect my account to Slack?",
    "The search doesn't find documents I know are there. Why?",
    "Can I get an invoice with my company's VAT number on it?",
    "How many devices can I use with one licence?",
    "My account has been locked after too many login attempts. What now?",
    "How do I share a folder with someone who doesn't have an account?",
]


# ---------------------------------------------------------------------------------------------
# The model folders


def cache_root() -> Path:
    from chatforge.files import cache_dir

    return cache_dir("bench", "serve")


def gguf_path() -> Path:
    from chatforge.data.fetch import model_file
    from chatforge.errors import ChatforgeError

    try:
        return model_file(SOURCE)
    except ChatforgeError:
        subprocess.run([str(VENV_BIN / "chatforge"), "data", "fetch", "--sources", SOURCE], check=True)
        return model_file(SOURCE)


def chatforge_folder(gguf: Path) -> Path:
    out = cache_root() / "smollm2-135m-instruct-chatforge"
    if not (out / "config.json").is_file():
        print(f"importing {gguf.name} for chatforge into {out} ...", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(VENV_BIN / "chatforge"), "model", "import", str(gguf), "--out", str(out)], check=True,
                       stdout=subprocess.DEVNULL)
    return out


def hf_folder(gguf: Path) -> Path:
    out = cache_root() / "smollm2-135m-instruct-hf"
    if not (out / "config.json").is_file():
        print(f"converting {gguf.name} for transformers into {out} ...", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        # In a child process: the client process stays light (no model in its memory).
        subprocess.run([sys.executable, __file__, "--make-hf-folder", str(gguf), str(out)], check=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return out


def make_hf_folder(gguf: Path, out: Path) -> None:
    """Read the GGUF with transformers (dequantized to fp32) and save a plain HF model folder:
    the weights without the GGUF quantization marker, the tokenizer with its chat template and the
    generation config (EOS <|im_end|>). Written next to `out`, then renamed into place."""
    import copy
    import warnings

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# A server in a subprocess


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
OTHER_JOBS_LIMIT = 0.25   # cores other processes may use during a load before its figures are flagged


def machine_busy_seconds() -> float:
    """CPU time all processes have used so far (/proc/stat: everything but idle and iowait)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    return (sum(values) - values[3] - values[4]) / CLOCK_TICKS


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def help_text(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd + ["--help"], capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


class Server:
    """One server as a subprocess (its own session, so stopping it stops its children too)."""

    def __init__(self, name: str, cmd: list[str], port: int, threads: int, log_dir: Path):
        self.name, self.cmd, self.port = name, cmd, port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_dir / f"{name.replace(' ', '_')}.log"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        self.log = open(self.log_path, "w")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def log_tail(self, n: int = 30) -> str:
        self.log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def wait_ready(self, timeout: float, path: str = "/health") -> float:
        """Poll GET `path` until 200 (/v1/models for a server without /health, as
        llama_cpp.server); the seconds it took from the start of the process."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + path, timeout=5).status_code == 200:
                    return time.perf_counter() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def model_id(self) -> str | None:
        try:
            data = httpx.get(self.url + "/v1/models", timeout=10).json().get("data") or []
            return data[0]["id"] if data else None
        except (httpx.HTTPError, ValueError, KeyError):
            return None

    def first_token_totals(self) -> tuple[float, float] | None:
        """chatforge's own /metrics: (sum, count) of its time-to-first-token histogram (the server's
        clock, from the request to its first generated token, before any text is released)."""
        try:
            text = httpx.get(self.url + "/metrics", timeout=10).text
        except httpx.HTTPError:
            return None
        found = {}
        for line in text.splitlines():
            for key in ("sum", "count"):
                if line.startswith(f"chatforge_time_to_first_token_seconds_{key} "):
                    found[key] = float(line.split()[-1])
        return (found["sum"], found["count"]) if len(found) == 2 else None

    def cpu_seconds(self) -> float:
        """CPU time the server process (all its threads) has used so far."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS     # utime + stime
        except (OSError, IndexError, ValueError):
            return 0.0

    def peak_rss_mib(self) -> float | None:
        """The server process's peak resident set size (VmHWM)."""
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
        except (OSError, StopIteration):
            return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGINT)
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        self.log.close()


def chatforge_cmd(folder: Path, port: int, threads: int, db: Path, dtype: str | None) -> list[str]:
    # Its defaults otherwise (bf16 weights where native, --max-batch, --max-queue); the feedback
    # store records every reply as in real use, into a throw-away database.
    exe = str(VENV_BIN / "chatforge")
    cmd = [exe, "serve", "--model", str(folder), "--host", "127.0.0.1", "--port", str(port), "--db", str(db),
           "--log-level", "warning"]
    options = help_text([exe, "serve"])
    if "--threads" in options:
        cmd += ["--threads", str(threads)]
    if "--repetition-penalty" in options:   # plain greedy, as transformers runs the same requests
        cmd += ["--repetition-penalty", "1.0"]
    if dtype:
        cmd += ["--dtype", dtype]
    return cmd


def transformers_cmd(folder: Path, port: int, threads: int, dtype: str, cb_blocks: int | None) -> list[str]:
    # The local folder is the pinned model (FORCE_MODEL): loaded at start-up, before /health
    # answers, never unloaded; continuous batching (paged attention) serves concurrent requests.
    cmd = [str(VENV_BIN / "transformers"), "serve", str(folder), "--continuous-batching", "--device", "cpu",
           "--dtype", dtype, "--host", "127.0.0.1", "--port", str(port), "--log-level", "error"]
    if cb_blocks:
        cmd += ["--cb-num-blocks", str(cb_blocks)]
    return cmd


# ---------------------------------------------------------------------------------------------
# Clients


class Counter:
    """Tokens of streamed text, with the model's tokenizer (tokenizer.json of the HF folder)."""

    def __init__(self, folder: Path):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(folder / "tokenizer.json"))

    def __call__(self, text: str) -> int:
        return len(self.tok.encode(text, add_special_tokens=False).ids) if text else 0


def request_body(model: str | None, question: str, max_tokens: int) -> dict:
    body = {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    if model is not None:
        body["model"] = model
    return body


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    """One streaming chat completion: TTFT, end time, text, usage, error."""
    r = {"start": time.perf_counter(), "ttft": None, "first": None, "end": None, "text": "", "usage": None,
         "finish": None, "error": None}
    parts: list[str] = []
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                await resp.aread()
                r["error"] = f"HTTP {resp.status_code}: {resp.text[:200]}"
            else:
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        r["error"] = f"stream error: {str(chunk['error'])[:200]}"
                        break
                    for choice in chunk.get("choices") or []:
                        content = (choice.get("delta") or {}).get("content")
                        if content:
                            if r["first"] is None:
                                r["first"] = time.perf_counter()
                            parts.append(content)
                        if choice.get("finish_reason"):
                            r["finish"] = choice["finish_reason"]
                    if chunk.get("usage"):
                        r["usage"] = chunk["usage"]
                if r["error"] is None and r["finish"] is None:
                    r["error"] = "stream ended without a finish_reason"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        r["error"] = f"{type(e).__name__}: {str(e)[:200]}"
    r["end"] = time.perf_counter()
    r["text"] = "".join(parts)
    if r["first"] is not None:
        r["ttft"] = r["first"] - r["start"]
    return r


async def run_load(url: str, model: str | None, clients: int, per_client: int, max_tokens: int,
                   timeout: float) -> tuple[list[dict], float]:
    """`clients` closed-loop clients, `per_client` requests each; the results and the wall time."""
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=30), limits=limits) as client:
        async def worker(c: int) -> list[tuple[int, dict]]:
            out = []
            for k in range(per_client):
                q = (c * per_client + k) % len(QUESTIONS)
                out.append((q, await one_request(client, url, request_body(model, QUESTIONS[q], max_tokens))))
            return out

        t = time.perf_counter()
        done = await asyncio.gather(*(worker(c) for c in range(clients)))
        wall = time.perf_counter() - t
    results = []
    for per in done:
        for q, r in per:
            r["question"] = q
            results.append(r)
    return results, wall


def percentile(values: list[float], p: float) -> float | None:
    """Linear interpolation between the closest ranks (numpy's default)."""
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def summarize(results: list[dict], wall: float, count) -> dict:
    ok = [r for r in results if r["error"] is None]
    text_tokens = [count(r["text"]) for r in ok]
    with_usage = [r for r in ok if r["usage"] and r["usage"].get("completion_tokens") is not None]
    if ok and len(with_usage) == len(ok):
        tokens, method = [r["usage"]["completion_tokens"] for r in ok], "usage"
    elif with_usage:
        tokens = [r["usage"]["completion_tokens"] if r in with_usage else n for r, n in zip(ok, text_tokens)]
        method = "usage+tokenized"
    else:
        tokens, method = text_tokens, "tokenized"
    ttfts = [r["ttft"] for r in ok if r["ttft"] is not None]
    latency = [r["end"] - r["start"] for r in ok]
    prompt_tokens = [r["usage"]["prompt_tokens"] for r in with_usage if r["usage"].get("prompt_tokens") is not None]
    errors = [r["error"] for r in results if r["error"] is not None]
    return {"requests": len(results), "errors": len(errors), "error_examples": sorted(set(errors))[:3],
            "output_tokens": sum(tokens), "tokens_by": method, "text_tokens": sum(text_tokens),
            "wall_s": wall, "agg_tok_s": sum(tokens) / wall if wall > 0 else 0.0,
            "ttft_p50_s": percentile(ttfts, 50), "ttft_p95_s": percentile(ttfts, 95),
            "latency_p50_s": percentile(latency, 50), "latency_p95_s": percentile(latency, 95),
            "mean_output_tokens": statistics.mean(tokens) if tokens else None,
            "mean_prompt_tokens": statistics.mean(prompt_tokens) if prompt_tokens else None,
            "finish_length": sum(r["finish"] == "length" for r in ok),
            "answers": {r["question"]: r["text"] for r in ok}}


def cpu_bf16() -> bool:
    """Whether this CPU has native bf16 matrix products (where chatforge's `auto` serves bf16)."""
    import torch

    from chatforge.runtime import bf16_supported

    return bf16_supported(torch.device("cpu"))


def load1() -> float:
    return os.getloadavg()[0]


def settle(limit: float, max_wait: float) -> float:
    """Wait (at most `max_wait` s) for the 1-minute load average to fall below `limit`: the previous
    server's own load decays, and another job's may end. Returns the seconds waited."""
    t = time.perf_counter()
    while load1() >= limit and time.perf_counter() - t < max_wait:
        time.sleep(5)
    return time.perf_counter() - t


def bench_server(name: str, cmd: list[str], port: int, args: argparse.Namespace, count, log_dir: Path) -> dict:
    waited = settle(args.quiet_load, args.settle) if args.settle > 0 else 0.0
    background = load1()
    busy = background >= args.quiet_load
    print(f"\n{name}: {' '.join(cmd)}\n  load before start {background:.2f}"
          + (f" (waited {waited:.0f} s for it to settle)" if waited >= 5 else "")
          + (f"; BUSY MACHINE: above {args.quiet_load:.1f}, this server's figures are not comparable" if busy else ""),
          flush=True)
    server = Server(name, cmd, port, args.threads, log_dir)
    out: dict = {"command": cmd, "load_before_start": round(background, 2), "busy": busy,
                 "settle_wait_s": round(waited), "levels": {}}
    try:
        out["ready_s"] = round(server.wait_ready(args.ready_timeout), 1)
        model = server.model_id()
        out["model_id"] = model
        print(f"  ready after {out['ready_s']:.1f} s (model id {model!r})", flush=True)
        # Warm-up: the same request shape as the loads (transformers' continuous batching takes its
        # sampling settings from the first request it sees), then one small concurrent burst.
        t = time.perf_counter()
        warm, _ = asyncio.run(run_load(server.url, model, 1, args.warmup, args.max_tokens, args.timeout))
        burst, _ = asyncio.run(run_load(server.url, model, min(4, max(args.clients)), 1, args.max_tokens,
                                        args.timeout))
        bad = [r["error"] for r in warm + burst if r["error"]]
        out["warmup_s"] = round(time.perf_counter() - t, 1)
        out["warmup_errors"] = len(bad)
        print(f"  warm-up {len(warm) + len(burst)} requests in {out['warmup_s']:.1f} s"
              + (f", {len(bad)} errors: {bad[0]}" if bad else ""), flush=True)
        if bad:
            print("  server log (last lines):\n    " + server.log_tail(25).replace("\n", "\n    "), flush=True)
        for c in args.clients:
            before = load1()
            first_before = server.first_token_totals()
            cpu_before = (machine_busy_seconds(), server.cpu_seconds(), own_cpu_seconds())
            results, wall = asyncio.run(run_load(server.url, model, c, args.requests_per_client, args.max_tokens,
                                                 args.timeout))
            machine, server_cpu, client_cpu = (a - b for a, b in zip(
                (machine_busy_seconds(), server.cpu_seconds(), own_cpu_seconds()), cpu_before))
            s = summarize(results, wall, count)
            # Cores kept busy during the load: by the server, by this client, by every other process.
            s["server_cores"] = server_cpu / wall
            s["client_cores"] = client_cpu / wall
            s["other_cores"] = max(0.0, machine - server_cpu - client_cpu) / wall
            first_after = server.first_token_totals()
            if first_before and first_after and first_after[1] > first_before[1]:
                s["server_first_token_mean_s"] = (first_after[0] - first_before[0]) / (first_after[1] - first_before[1])
            s["load"] = [round(before, 2), round(load1(), 2)]
            out["levels"][c] = s
            print(f"  {c:>3} clients: {s['requests']} requests, {s['errors']} errors, {s['output_tokens']} tokens "
                  f"({s['tokens_by']}) in {wall:.1f} s = {s['agg_tok_s']:.1f} tok/s; TTFT p50 "
                  f"{fmt(s['ttft_p50_s'], 2)} s p95 {fmt(s['ttft_p95_s'], 2)} s"
                  + (f" (server's first token: mean {s['server_first_token_mean_s']:.2f} s)"
                     if "server_first_token_mean_s" in s else "")
                  + f" (load {before:.1f} -> {load1():.1f}; cores used: server {s['server_cores']:.2f}, "
                    f"client {s['client_cores']:.2f}, other jobs {s['other_cores']:.2f})"
                  + (f"; e.g. {s['error_examples'][0]}" if s["errors"] else ""), flush=True)
        out["peak_rss_mib"] = server.peak_rss_mib()
    except RuntimeError as e:
        out["failed"] = str(e)
        print(f"  FAILED: {e}", flush=True)
    finally:
        server.stop()
    return out


def fmt(v: float | None, digits: int, width: int = 0) -> str:
    return f"{v:>{width}.{digits}f}" if v is not None else f"{'n/a':>{width}}"


# ---------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="1,8,32", help="comma-separated numbers of concurrent clients")
    ap.add_argument("--requests-per-client", type=int, default=None,
                    help="requests each client sends (default 4; 2 with --quick)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of each server")
    ap.add_argument("--skip-peer", action="store_true", help="only chatforge serve")
    ap.add_argument("--skip-chatforge", action="store_true", help="only transformers serve")
    ap.add_argument("--chatforge-dtype", default=None, help="chatforge serve --dtype (default: its own, auto)")
    ap.add_argument("--peer-dtype", default="match",
                    help="transformers serve --dtype: match (default: chatforge's weights, bf16 where the CPU has "
                         "native bf16 unless --chatforge-dtype float32), auto (the folder's fp32), bfloat16, float32")
    ap.add_argument("--peer-cb-blocks", type=int, default=None,
                    help="transformers serve --cb-num-blocks (default: 2 x the most clients, at least 16; 0 = its own "
                         "sizing, 60%% of the RAM on a CPU)")
    ap.add_argument("--quick", action="store_true", help="2 requests per client, 1 warm-up request")
    ap.add_argument("--warmup", type=int, default=None, help="sequential warm-up requests (default 2; 1 with --quick)")
    ap.add_argument("--settle", type=float, default=180.0,
                    help="before each server starts, wait up to this many seconds for the 1-minute load average "
                         "to fall below --quiet-load (0: do not wait)")
    ap.add_argument("--quiet-load", type=float, default=None,
                    help="load average under which the machine counts as quiet (default: half the CPUs)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds a request may take")
    ap.add_argument("--ready-timeout", type=float, default=600.0)
    ap.add_argument("--make-hf-folder", nargs=2, metavar=("GGUF", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    # A SIGTERM (kill, timeout) unwinds like Ctrl-C, so the running server is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.make_hf_folder:
        make_hf_folder(Path(args.make_hf_folder[0]), Path(args.make_hf_folder[1]))
        return
    args.clients = [int(x) for x in args.clients.split(",") if x.strip()]
    if args.requests_per_client is None:
        args.requests_per_client = 2 if args.quick else 4
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    if args.quiet_load is None:
        args.quiet_load = (os.cpu_count() or 2) / 2
    if args.peer_cb_blocks is None:
        args.peer_cb_blocks = max(16, 2 * max(args.clients))
    if args.peer_dtype == "match":
        args.peer_dtype = "float32" if args.chatforge_dtype == "float32" else (
            "bfloat16" if cpu_bf16() and args.chatforge_dtype in (None, "auto", "bfloat16") else "float32")

    gguf = gguf_path()
    cf_dir = None if args.skip_chatforge else chatforge_folder(gguf)
    hf_dir = hf_folder(gguf)   # its tokenizer counts tokens when a server sends no usage
    count = Counter(hf_dir)
    print(f"SmolLM2-135M-Instruct ({gguf.name}); {len(QUESTIONS)} support questions, max_tokens {args.max_tokens}, "
          f"greedy, streaming; clients {args.clients} x {args.requests_per_client} requests; "
          f"{args.threads} torch threads per server; {os.cpu_count()} CPUs, load {load1():.2f}", flush=True)

    servers: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench_serve.") as logs:
        if not args.skip_chatforge:
            if "serve" not in help_text([str(VENV_BIN / "chatforge")]):
                servers["chatforge"] = {"failed": "`chatforge serve` does not exist in this checkout yet"}
                print("\nchatforge: `chatforge serve` does not exist in this checkout yet", flush=True)
            else:
                port = free_port()
                cmd = chatforge_cmd(cf_dir, port, args.threads, Path(logs) / "feedback.sqlite", args.chatforge_dtype)
                servers["chatforge"] = bench_server("chatforge", cmd, port, args, count, Path(logs))
        if not args.skip_peer:
            port = free_port()
            cmd = transformers_cmd(hf_dir, port, args.threads, args.peer_dtype, args.peer_cb_blocks)
            servers["transformers"] = bench_server("transformers", cmd, port, args, count, Path(logs))

    # The table
    print(f"\n{'server':<14}{'clients':>8}{'requests':>9}{'errors':>7}{'out tok/s':>10}{'TTFT p50 s':>11}"
          f"{'TTFT p95 s':>11}{'reply p50 s':>12}{'tokens/req':>11}{'wall s':>8}{'server cores':>13}"
          f"{'other jobs':>11}")
    for name, s in servers.items():
        for c, r in s.get("levels", {}).items():
            print(f"{name:<14}{c:>8}{r['requests']:>9}{r['errors']:>7}{r['agg_tok_s']:>10.1f}"
                  f"{fmt(r['ttft_p50_s'], 2, 11)}{fmt(r['ttft_p95_s'], 2, 11)}{fmt(r['latency_p50_s'], 2, 12)}"
                  f"{fmt(r['mean_output_tokens'], 1, 11)}{r['wall_s']:>8.1f}{r['server_cores']:>13.2f}"
                  f"{r['other_cores']:>11.2f}")
        if "failed" in s:
            print(f"{name:<14} failed: {s['failed'].splitlines()[0]}")
    for name, s in servers.items():
        if s.get("levels"):
            methods = sorted({r["tokens_by"] for r in s["levels"].values()})
            prompt = [r["mean_prompt_tokens"] for r in s["levels"].values() if r["mean_prompt_tokens"] is not None]
            print(f"{name}: output tokens counted by {', '.join(methods)} (usage = the final chunk's usage, "
                  f"tokenized = the streamed text through the tokenizer); streamed text tokenized: "
                  + ", ".join(f"{r['text_tokens']} vs {r['output_tokens']} counted at {c}"
                              for c, r in s["levels"].items())
                  + (f"; prompt tokens per request {statistics.mean(prompt):.1f}" if prompt else "")
                  + (f"; peak RSS {s['peak_rss_mib']:.0f} MiB" if s.get("peak_rss_mib") else ""))

    # Ratios and targets
    cf = servers.get("chatforge", {}).get("levels", {})
    tf = servers.get("transformers", {}).get("levels", {})
    ratios: dict[str, float] = {}
    targets: dict[str, bool | None] = {}
    if 1 in cf:
        for c in cf:
            if c != 1 and cf[1]["agg_tok_s"] > 0:
                ratios[f"chatforge_{c}_over_1"] = round(cf[c]["agg_tok_s"] / cf[1]["agg_tok_s"], 2)
    for c in cf:
        if c in tf and tf[c]["agg_tok_s"] > 0:
            ratios[f"chatforge_over_transformers_{c}"] = round(cf[c]["agg_tok_s"] / tf[c]["agg_tok_s"], 2)
    if 1 in tf:
        for c in tf:
            if c != 1 and tf[1]["agg_tok_s"] > 0:
                ratios[f"transformers_{c}_over_1"] = round(tf[c]["agg_tok_s"] / tf[1]["agg_tok_s"], 2)
    scaling = ratios.get("chatforge_8_over_1")
    targets["chatforge_8_over_1_ge_3.5"] = None if scaling is None else scaling >= 3.5
    targets["chatforge_0_errors_at_32"] = (cf[32]["errors"] == 0) if 32 in cf else None
    for c in (8, 32):
        key = f"chatforge_over_transformers_{c}"
        targets[f"chatforge_ahead_of_transformers_at_{c}"] = (ratios[key] > 1) if key in ratios else None
    if ratios:
        print("\nratios (aggregate output tokens/s): " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    print("targets: " + ", ".join(f"{k}: {'n/a' if v is None else ('met' if v else 'NOT met')}"
                                  for k, v in targets.items()))

    busy = [f"{name} (load {s['load_before_start']:.1f})" for name, s in servers.items() if s.get("busy")]
    if busy:
        print(f"WARNING: other jobs kept the machine busy before {', '.join(busy)} started; the comparison is "
              "not fair to that server: rerun when the machine is quiet")
    shared = [f"{name} at {c} clients ({r['other_cores']:.2f} cores)" for name, s in servers.items()
              for c, r in s.get("levels", {}).items() if r["other_cores"] > OTHER_JOBS_LIMIT]
    if shared:
        print(f"WARNING: other jobs took CPU during {', '.join(shared)}: those figures are low by an unknown "
              "amount; rerun when the machine is quiet")

    # Greedy answers of the two servers to the same questions (a check that they run the same model)
    same = None
    if cf and tf:
        pairs = [(a, tf[c]["answers"].get(q)) for c in cf if c in tf for q, a in cf[c]["answers"].items()
                 if tf[c]["answers"].get(q) is not None]
        if pairs:
            same = round(sum(a == b for a, b in pairs) / len(pairs), 3)
            print(f"identical greedy answers chatforge vs transformers: {100 * same:.0f}% of {len(pairs)} "
                  "(100% expected in fp32; in bf16, different kernels and chatforge's fp32 KV cache "
                  "change greedy paths)")

    summary = {"bench": "serve", "model": "SmolLM2-135M-Instruct", "gguf": gguf.name, "max_tokens": args.max_tokens,
               "temperature": 0, "requests_per_client": args.requests_per_client, "clients": args.clients,
               "threads": args.threads, "cpus": os.cpu_count(), "questions": len(QUESTIONS), "servers": {}}
    for name, s in servers.items():
        entry = {k: v for k, v in s.items() if k != "levels"}
        for c, r in s.get("levels", {}).items():
            entry[str(c)] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()
                             if k not in ("answers", "error_examples")}
        summary["servers"][name] = entry
    summary.update(ratios=ratios, targets=targets, identical_answers=same, busy_starts=busy, shared_loads=shared)
    print(json.dumps(summary))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
