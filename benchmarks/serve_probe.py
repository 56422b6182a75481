"""Issue 23's probe reproductions against one chatforge source tree, each in one request or so:
a seed above 2**64-1 with a stream in flight, a lone surrogate, string-typed `stream` and
`max_tokens`, 8 non-streamed clients that give up after 3 s, HEAD, /docs, the page's CSP, a
foreign Host header, and a half-sent request.

    git archive REV src | tar -x -C /tmp/before
    .venv/bin/python benchmarks/serve_probe.py /tmp/before/src before
    .venv/bin/python benchmarks/serve_probe.py src after

The model is SmolLM2-135M-Instruct as `bench_serve.py` imports it (run that, or
bench_serve_limits.py, once first). Each line is `NAME | what: result`; the last line is one JSON
object: {"bench": "serve_probe", ...}.
"""
import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
from bench_serve import cache_root

src, name = sys.argv[1], sys.argv[2]
model = str(cache_root() / "smollm2-135m-instruct-chatforge")
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
url = f"http://127.0.0.1:{port}"
env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"}
proc = subprocess.Popen([sys.executable, "-m", "chatforge", "serve", "--model", model, "--port", str(port),
                         "--no-feedback", "--threads", "1", "--log-level", "warning"], env=env,
                        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
out = {}


def chat(content="hi", **kw):
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 4, **kw}


def post(body, timeout=20, **kw):
    t0 = time.perf_counter()
    try:
        r = httpx.post(url + "/v1/chat/completions", content=json.dumps(body), headers={"content-type": "application/json"}, timeout=timeout, **kw)
        return r.status_code, round(time.perf_counter() - t0, 1)
    except httpx.TimeoutException:
        return f"no answer in {timeout} s", timeout


try:
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    # 1. seed overflow with a stream in flight
    stream = {}
    def run():
        with httpx.stream("POST", url + "/v1/chat/completions", json=chat("Tell me about your refund policy.", max_tokens=60, stream=True), timeout=120) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
            stream["end"] = "error" if any('"error"' in line for line in lines) else lines[-1]
    t = threading.Thread(target=run)
    t.start()
    time.sleep(1.5)
    out["1 seed 2^64 (stream in flight)"] = post(chat(temperature=1, seed=18446744073709551616), timeout=20)
    t.join()
    out["1 ... the stream in flight ended with"] = stream["end"]
    out["2 lone surrogate"] = post(chat("hi \ud800"))
    out["6 stream: 'yes'"] = post(chat(stream="yes"))
    out["6 max_tokens: '10'"] = post(chat(max_tokens="10"))
    # 3. abandoned non-streamed requests
    def give_up():
        post(chat("Write a long story about a dragon.", max_tokens=300), timeout=3)
    ts = [threading.Thread(target=give_up) for _ in range(8)]
    for x in ts:
        x.start()
    for x in ts:
        x.join()
    time.sleep(5)
    m = httpx.get(url + "/metrics").text
    def val(k):
        return next(float(line.split()[-1]) for line in m.splitlines() if line.startswith(k + " "))
    out["3 queued+running 5 s after 8 clients gave up at 3 s"] = val("chatforge_queue_length") + val("chatforge_running_requests")
    # 4. history fitting: 2,000 one-character messages
    hist = [{"role": ("user", "assistant")[i % 2], "content": "x"} for i in range(2000)] + [{"role": "user", "content": "hi"}]
    # 6. hardening
    out["6 HEAD /"] = httpx.head(url + "/").status_code
    out["6 HEAD /health"] = httpx.head(url + "/health").status_code
    out["6 GET /docs"] = httpx.get(url + "/docs").status_code
    out["6 CSP on /"] = "content-security-policy" in httpx.get(url + "/").headers
    out["6 Host: evil.example"] = httpx.get(url + "/health", headers={"host": "evil.example"}).status_code
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"GET /health HTTP/1.1\r\n")         # and never the rest
    sock.settimeout(20)
    t0 = time.time()
    try:
        closed = sock.recv(100) == b""
    except TimeoutError:
        closed = False
    out["6 half-sent request closed by the server within 20 s"] = (closed, round(time.time() - t0, 1))
finally:
    for k, v in out.items():
        print(f"{name:>8} | {k}: {v}", flush=True)
    print(json.dumps({"bench": "serve_probe", "tree": name, "results": out}), flush=True)
    proc.terminate()
    try:
        proc.wait(45)
    except subprocess.TimeoutExpired:
        print(f"{name:>8} | the server did not stop within 45 s of SIGTERM (a request never ended)", flush=True)
        proc.kill()
