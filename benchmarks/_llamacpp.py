"""llama.cpp for benchmarks/bench_generate_demo.py: the demo assistant's GGUF files, timed decoding through
llama-cpp-python, and llama.cpp's two HTTP servers.

- `gguf_file` finds OUT/QUANT/*.gguf (what `chatforge export --format gguf` writes) or exports it.
- `gguf_bytes_per_token` reads a GGUF's tensor table: the bytes of weights one decode step reads.
- `LlamaRun` loads a GGUF with llama-cpp-python and times one greedy generation of given token
  ids (time to first token, then the decode steps), with llama.cpp's own counters beside it.
- Servers. llama-cpp-python's `python -m llama_cpp.server` has no parallel slots (no n_parallel
  setting in 0.3.36; it holds one lock around the model, so concurrent requests run one after
  the other, and by default a new request interrupts the one streaming: `--interrupt_requests
  false` turns that off). Its extra dependencies (sse-starlette, starlette-context,
  pydantic-settings, python-dotenv) are not in chatforge's dev set-up: `server_deps` installs them
  with pip into a folder of the chatforge cache that only the server's process sees
  (PYTHONPATH). llama.cpp's own server, `llama-server -np 8`, is the peer with 8 parallel slots
  and continuous batching; llama-cpp-python does not build it, so `llama_server_binary` compiles
  it once (cmake, ~10-20 CPU-minutes) from the llama.cpp sources in llama-cpp-python's own source
  distribution of the installed version (`pip download --no-binary`): the same llama.cpp as the
  Python binding, compiled for this CPU (-march=native, as the binding's build does).
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import httpx

VENV_BIN = Path(sys.executable).parent
SERVER_DEPS = ["sse-starlette", "starlette-context", "pydantic-settings", "python-dotenv"]


def cache_dir() -> Path:
    from chatforge.files import cache_dir as chatforge_cache

    return chatforge_cache("bench")


# ---------------------------------------------------------------------------------------------
# GGUF files


def gguf_file(export_dir: Path, quant: str, model_dir: Path) -> Path:
    """EXPORT_DIR/QUANT/*.gguf, exported from `model_dir` with `chatforge export` when missing."""
    folder = export_dir / quant
    found = sorted(folder.glob("*.gguf"))
    if found:
        return found[0]
    print(f"exporting {model_dir} as GGUF {quant} into {folder} ...", flush=True)
    subprocess.run([str(VENV_BIN / "chatforge"), "export", "--model", str(model_dir), "--format", "gguf",
                    "--quant", quant, "--out", str(folder)], check=True, stdout=subprocess.DEVNULL)
    return sorted(folder.glob("*.gguf"))[0]


def gguf_bytes_per_token(path: Path) -> dict:
    """Bytes of weights one batch-1 decode step reads from this file: every tensor but the token
    embedding (one row of it is read), unless the file has no `output.weight`, in which case the
    LM head is the embedding matrix, read whole. Also the bytes per tensor type."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    by_type: dict[str, int] = {}
    total = 0
    names = {t.name for t in reader.tensors}
    for t in reader.tensors:
        by_type[t.tensor_type.name] = by_type.get(t.tensor_type.name, 0) + int(t.n_bytes)
        if t.name == "token_embd.weight" and "output.weight" in names:
            continue
        total += int(t.n_bytes)
    return {"bytes": total, "by_type": by_type, "file_bytes": path.stat().st_size}


# ---------------------------------------------------------------------------------------------
# Decoding through llama-cpp-python


class LlamaRun:
    """One GGUF in llama-cpp-python, generating greedily from token ids.

    The context holds the prompt and the new tokens; `n_batch`/`n_ubatch` take the whole prompt
    in one batch (llama-cpp-python's default, 512, would cut a 600-token prompt in two; one
    batch was not slower). The KV cache is llama.cpp's default, f16."""

    def __init__(self, path: Path, threads: int, n_ctx: int, n_batch: int):
        import llama_cpp

        self.lib = llama_cpp
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                                   n_threads=threads, n_threads_batch=threads, verbose=False)

    def _perf(self) -> dict:
        p = self.lib.llama_perf_context(self.llm._ctx.ctx)
        return {"prompt_ms": p.t_p_eval_ms, "prompt_n": p.n_p_eval, "eval_ms": p.t_eval_ms, "eval_n": p.n_eval}

    def generate(self, prompt: list[int], new: int) -> dict:
        """Greedy `new` tokens (no stop token) after `prompt`, the KV cache emptied first: seconds to
        the first token, seconds of the rest, the tokens, and llama.cpp's own timings of its
        prompt evaluation and of its token-by-token evaluations."""
        self.llm.reset()                       # no prefix reuse from the previous run
        self.lib.llama_perf_context_reset(self.llm._ctx.ctx)
        tokens: list[int] = []
        t0 = time.perf_counter()
        first = None
        for tok in self.llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
            if first is None:
                first = time.perf_counter()
            tokens.append(int(tok))
            if len(tokens) == new:
                break
        end = time.perf_counter()
        perf = self._perf()
        return {"ttft_s": first - t0, "rest_s": end - first, "tokens": tokens,
                "engine_prefill_s": perf["prompt_ms"] / 1e3,
                "engine_decode_tok_s": perf["eval_n"] / (perf["eval_ms"] / 1e3) if perf["eval_ms"] > 0 else None}


# ---------------------------------------------------------------------------------------------
# llama.cpp's own server (llama-server), built once


def _installed_version() -> str:
    import llama_cpp

    return llama_cpp.__version__


def llama_server_binary(explicit: str | None = None, build: bool = True) -> Path | None:
    """`explicit`, or llama-server in PATH, or the one built in the chatforge cache (built now from
    llama-cpp-python's source distribution when `build`). None when there is none."""
    if explicit:
        return Path(explicit)
    found = shutil.which("llama-server")
    if found:
        return Path(found)
    root = cache_dir() / "llama-server"
    binary = root / "build" / "bin" / "llama-server"
    if binary.is_file():
        return binary
    if not build:
        return None
    version = _installed_version()
    src = root / f"src-{version}"
    if not (src / "CMakeLists.txt").is_file():
        with tempfile.TemporaryDirectory(prefix="llama-sdist.") as tmp:
            print(f"downloading the llama-cpp-python {version} source distribution (its llama.cpp) ...", flush=True)
            subprocess.run([str(VENV_BIN / "pip"), "download", "--no-deps", "--no-binary", ":all:", "-d", tmp,
                            f"llama-cpp-python=={version}"], check=True, stdout=subprocess.DEVNULL)
            archive = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")
            vendored = next(Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp"))
            root.mkdir(parents=True, exist_ok=True)
            shutil.copytree(vendored, src)
    print(f"building llama-server from {src} (once; cached in {root}) ...", flush=True)
    subprocess.run(["cmake", "-S", str(src), "-B", str(root / "build"), "-DCMAKE_BUILD_TYPE=Release",
                    "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON",
                    "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_UI=OFF"],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(root / "build"), "--target", "llama-server", "-j", str(os.cpu_count() or 2)],
                   check=True, stdout=subprocess.DEVNULL)
    return binary if binary.is_file() else None


def llama_server_cmd(binary: Path, gguf: Path, port: int, threads: int, slots: int, ctx_per_slot: int) -> list[str]:
    """llama-server with `slots` parallel slots (continuous batching is its default), the GGUF's
    own chat template (--jinja), `threads` threads for decoding and for prompts. --no-repack: on
    CPUs with AMX, llama.cpp 0.3.36's repacked q8_0/q4_0 weights crash the server at start (a
    segfault; tests/test_export.py opens llama-cpp-python without them for the same reason), so
    the peer runs its plain kernels here."""
    return [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-np", str(slots),
            "-c", str(slots * ctx_per_slot), "-t", str(threads), "-tb", str(threads), "--jinja",
            "--no-webui", "--log-disable", "--no-repack"]


def server_deps() -> Path | None:
    """A folder holding llama_cpp.server's extra dependencies (installed there once with pip), or
    None when they cannot be installed."""
    target = cache_dir() / "llama-cpp-server-deps"
    if not all((target / m).is_dir() for m in ("sse_starlette", "starlette_context", "pydantic_settings", "dotenv")):
        done = subprocess.run([str(VENV_BIN / "pip"), "install", "-q", "--no-deps", "--target", str(target),
                               *SERVER_DEPS], capture_output=True, text=True)
        if done.returncode != 0:
            print(f"llama_cpp.server's dependencies did not install: {done.stderr.strip()[-300:]}", flush=True)
            return None
    return target


def python_server_cmd(gguf: Path, port: int, threads: int, n_ctx: int) -> list[str]:
    """`python -m llama_cpp.server`: one model, requests one at a time, none interrupted."""
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
            "--port", str(port), "--n_threads", str(threads), "--n_threads_batch", str(threads),
            "--n_ctx", str(n_ctx), "--n_batch", "1024", "--n_ubatch", "1024", "--interrupt_requests", "false",
            "--verbose", "false"]


# ---------------------------------------------------------------------------------------------
# The worker process of bench_generate_demo's comparison (one engine per process)

RESULT = "@@ "          # a worker's answers on its stdout start with this


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def worker_loop(spec: dict, load, handlers: dict | None = None) -> None:
    """Run one engine for bench_generate_demo's comparison, answering commands read from stdin
    (one JSON object a line) with one JSON line each on stdout (prefixed RESULT).

    `load()` builds the engine and returns (generate, info): `generate(ids, n)` times a greedy
    generation of n tokens ({"ttft_s", "rest_s", optionally "tokens"}); `info` is reported with
    "ready". After loading: a warm-up (a short prompt, then the whole prompt for 16 tokens, whose
    tokens are reported as "first_tokens" when `generate` returns them; `info["first_tokens"]`
    otherwise) and the resident set size then. Commands:
    - run: one timed generation; the process's peak resident size during it (VmHWM, the mark
      reset through /proc/self/clear_refs just before: the weights, KV cache and buffers while
      generating, not the loading);
    - memory: the resident size, then again after glibc's malloc_trim(0) (what the C allocator
      holds freed: after loading, mostly); send it after the last run;
    - quit, and those of `handlers` (name -> function(cmd) -> dict).
    """
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)                                   # the libraries' own prints go to stderr
    sys.stdout = sys.stderr

    def reply(obj: dict) -> None:
        out.write(RESULT + json.dumps(obj) + "\n")
        out.flush()

    prompt, new = spec["prompt"], spec["new_tokens"]
    rss_imports = status_kib("VmRSS")
    t = time.perf_counter()
    generate, info = load()
    info["load_s"] = time.perf_counter() - t
    generate(prompt[:32], 4)
    first = generate(prompt, 16).get("tokens")
    if first is not None:
        info["first_tokens"] = first[:16]
    info.update(rss_imports_mib=rss_imports / 1024, rss_loaded_mib=status_kib("VmRSS") / 1024,
                load_peak_mib=status_kib("VmHWM") / 1024)
    gc.collect()
    reply({"ready": True, **info})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "run":
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            r = generate(prompt, new)
            r.pop("tokens", None)
            r["peak_mib"] = status_kib("VmHWM") / 1024
            reply(r)
        elif cmd["cmd"] == "memory":
            rss = status_kib("VmRSS") / 1024
            try:
                import ctypes

                ctypes.CDLL("libc.so.6").malloc_trim(0)
                trimmed = status_kib("VmRSS") / 1024
            except (OSError, AttributeError):
                trimmed = None
            reply({"rss_mib": rss, "rss_after_malloc_trim_mib": trimmed})
        elif cmd["cmd"] == "quit":
            reply({})
            return
        else:
            reply((handlers or {})[cmd["cmd"]](cmd))


def llama_worker(spec: dict) -> None:
    runner = None

    def load():
        nonlocal runner
        runner = LlamaRun(Path(spec["gguf"]), spec["threads"], n_ctx=len(spec["prompt"]) + spec["new_tokens"] + 64,
                          n_batch=1024)
        return runner.generate, {"weight_bytes": gguf_bytes_per_token(Path(spec["gguf"]))["bytes"]}

    try:
        worker_loop(spec, load)
    finally:
        if runner is not None:
            runner.llm.close()


if __name__ == "__main__":
    # python benchmarks/_llamacpp.py --worker SPEC_JSON: a llama.cpp worker without torch in it
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        llama_worker(json.loads(sys.argv[2]))
    else:
        sys.exit(__doc__)
