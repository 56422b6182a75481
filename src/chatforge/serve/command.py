"""`chatforge serve`: the assistant over HTTP — the OpenAI API, a chat page, feedback.

    chatforge serve --model runs/demo/sft --docs examples/my_docs
    open http://127.0.0.1:8000/            # the chat page
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "How do I reset my password?"}]}'

The routes and chatforge's additions to OpenAI's shapes are in docs/SERVING.md; the app is
`serve/app.py`. `kill -HUP PID` (or `POST /admin/reload` with the --admin-key) loads the model
folder again, e.g. after the next training round wrote it, and serves new requests from it while
the running ones finish on the old model. Replies are rated on the page or with POST /v1/feedback and kept in a SQLite file
(default: beside the model folder, e.g. runs/demo/feedback.sqlite) or, with `--db postgresql://...`
(the `postgres` extra), in a PostgreSQL database several servers share; `chatforge feedback stats`
and `chatforge feedback export` read either.

With `--upstream URL` another engine generates (llama.cpp's llama-server, vLLM, another chatforge:
any OpenAI-compatible server of the same model, e.g. a `chatforge export --format gguf` of it):
the model folder then gives only its tokenizer, context and answer settings, and chatforge keeps
retrieval, plugins, the prompt, citations, the reply filter, feedback, the page and metrics
(`serve/upstream.py`; docs/SCALING.md).

    llama-server -m runs/demo/export/q8_0/sft-q8_0.gguf --port 8080 -np 8 -c 16384 --no-repack &
    chatforge serve --model runs/demo/sft --docs examples/my_docs --upstream http://127.0.0.1:8080
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

import torch
import uvicorn

from chatforge.data.feedback import FeedbackStore
from chatforge.errors import ChatforgeError
from chatforge.infer.answer import AnswerSettings
from chatforge.infer.batching import Scheduler
from chatforge.infer.engine import Engine, weights_dtype
from chatforge.infer.plugins import plugin_runner
from chatforge.infer.prompting import load_system_prompt
from chatforge.infer.safety import ReplyFilter, load_blocked_terms
from chatforge.model.folder import load_config, load_model, load_tokenizer
from chatforge.retrieval.fusion import from_args
from chatforge.serve.app import Assistant, create_app, release_memory, swap_model
from chatforge.serve.http import LOOPBACK_NAMES, server_config
from chatforge.serve.upstream import UpstreamClient, UpstreamError


def _check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ChatforgeError(f"cannot listen on {host}:{port}: {e.strerror}; choose another --port "
                                 "(or stop what uses it)") from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def kv_cache_bytes(mb: int | None, engine, max_batch: int) -> int:
    """The KV-cache budget: `mb` MiB, or by default a quarter of the machine's memory, at most what
    `max_batch` requests at the model's full context take."""
    cfg = engine.config
    position = 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * torch.empty((), dtype=engine.cache_dtype).element_size()
    need = max_batch * cfg.max_seq_len * position
    if mb is not None:
        if mb < 1:
            raise ChatforgeError(f"--kv-cache-mb must be at least 1, got {mb}")
        if mb * 2 ** 20 < cfg.max_seq_len * position // 8:
            print(f"warning: --kv-cache-mb {mb} holds {mb * 2 ** 20 // position} positions; longer requests "
                  "get 400", file=sys.stderr)
        return mb * 2 ** 20
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 4 << 30
    return min(need, max(256 << 20, memory // 4))


M_MMAP_THRESHOLD = -3          # glibc's mallopt parameter


@contextlib.contextmanager
def _loading_memory():
    """While a model loads, every C allocation above 256 KiB gets its own mapping, returned to the
    system the moment it is freed: loading converts, fuses, prepacks or quantizes the weights one
    tensor at a time, and from glibc's heap each freed tensor stayed, too small for the next
    (the int8 demo model's server peaked at 790 MB loading, 650 MB this way). Afterwards the
    threshold is glibc's largest dynamic one (32 MiB), so a step's activations are reused from
    the heap, not mapped and zeroed again on every forward."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):           # not glibc
        yield
        return
    mallopt(M_MMAP_THRESHOLD, 256 << 10)
    try:
        yield
    finally:
        mallopt(M_MMAP_THRESHOLD, 32 << 20)


def run(args: Any) -> int:
    """Serve until stopped. `args`: the parsed options of `chatforge serve` (`chatforge.commands.serve`)."""
    if not args.model:
        raise ChatforgeError("--model is required: the folder of a trained model (the output of sft)")

    settings = AnswerSettings.load(args.model).replace(refusal_bias=getattr(args, "refusal_bias", None),
                                                       reply_no_repeat_ngram_size=getattr(args, "reply_ngram", None))
    args.passages = settings.passages if args.passages is None else args.passages
    if args.max_tokens is None:
        args.max_tokens = min(settings.max_new_tokens, args.max_tokens_limit)
    if args.temperature is None:
        args.temperature = 0.0 if settings.strategy != "sample" else settings.temperature
    if args.repetition_penalty is None:
        args.repetition_penalty = settings.repetition_penalty
    for name in ("max_batch", "max_tokens", "max_tokens_limit", "max_body_bytes", "max_message_chars", "passages",
                 "max_connections", "keep_alive", "prefill_chunk"):
        if getattr(args, name) < 1:
            raise ChatforgeError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.max_tokens > args.max_tokens_limit:
        raise ChatforgeError(f"--max-tokens ({args.max_tokens}) cannot exceed --max-tokens-limit ({args.max_tokens_limit})")
    if not 0 <= args.temperature <= 2 or not 0 < args.repetition_penalty <= 10:
        raise ChatforgeError("--temperature must be in [0, 2] and --repetition-penalty in (0, 10]")
    if not 0 < args.port < 65536:
        raise ChatforgeError(f"--port must be between 1 and 65535, got {args.port}")
    if not args.request_timeout > 0 or not args.read_timeout > 0 or not args.upstream_timeout > 0:
        raise ChatforgeError("--request-timeout, --read-timeout and --upstream-timeout must be above 0 seconds")
    upstream_key = args.upstream_key or os.environ.get("CHATFORGE_UPSTREAM_KEY") or None
    if args.upstream is None and (args.upstream_model or args.upstream_key):
        raise ChatforgeError("--upstream-model and --upstream-key go with --upstream URL")
    if args.upstream:
        local = [f for f, v in (("--threads", args.threads), ("--quant", args.quant), ("--kv-cache-mb", args.kv_cache_mb),
                                ("--dtype", None if args.dtype == "auto" else args.dtype)) if v is not None]
        if local:
            print(f"warning: {', '.join(local)} set the local engine, which --upstream replaces: ignored",
                  file=sys.stderr)
    api_key = args.api_key or os.environ.get("CHATFORGE_API_KEY") or None
    admin_key = args.admin_key or os.environ.get("CHATFORGE_ADMIN_KEY") or None
    if admin_key and admin_key == api_key:
        raise ChatforgeError("--admin-key must differ from --api-key: chat users must not be able to reload the model")
    system = load_system_prompt(args.system) if args.system else None
    guard = ReplyFilter(load_blocked_terms(args.blocked_terms) if args.blocked_terms else [],
                        action=args.blocked_action, refusal=args.refusal)
    _check_port(args.host, args.port)
    if not _is_loopback(args.host) and not api_key:
        print(f"warning: listening on {args.host} without an API key: anyone who reaches this port can use "
              "the model and read its sources; set CHATFORGE_API_KEY", file=sys.stderr)

    model_dir = Path(args.model)
    store = None
    if not args.no_feedback:
        store = FeedbackStore(args.db or model_dir.resolve().parent / "feedback.sqlite")

    def load_upstream() -> tuple[object, object]:
        """The model folder's tokenizer and context, generation by the engine at --upstream."""
        tokenizer = load_tokenizer(model_dir)
        return UpstreamClient(args.upstream, tokenizer, load_config(model_dir).max_seq_len, model=args.upstream_model,
                              key=upstream_key, timeout=args.upstream_timeout, max_batch=args.max_batch,
                              max_queue=args.max_queue), tokenizer

    def load() -> tuple[Scheduler, object]:
        """The model folder as it is now, on a started scheduler (at start and on each reload)."""
        if args.upstream:
            return load_upstream()
        # Loaded straight in the dtype it is served in, and handed over to the engine, which
        # rewrites it in place (fused, prepacked or quantized): no fp32 copy beside it, ever.
        with _loading_memory():
            model, tokenizer = load_model(model_dir, dtype=weights_dtype(args.dtype))
            stops = [tokenizer.eot_id, tokenizer.im_end_id, tokenizer.im_start_id]
            engine = Engine(model, tokenizer, stop_ids=[s for s in stops if s is not None], threads=args.threads,
                            dtype=None, quant=args.quant, own=True)
            del model              # the engine's now (its unfused or unquantized layers go with it)
            release_memory()       # what loading freed goes back to the system
        budget = kv_cache_bytes(args.kv_cache_mb, engine, args.max_batch)
        return Scheduler(engine, max_batch=args.max_batch, max_queue=args.max_queue, kv_cache_bytes=budget,
                         prefill_chunk=args.prefill_chunk).start(), tokenizer

    scheduler, tokenizer = load()
    if args.upstream:
        try:
            print(f"chatforge serve: generating with {scheduler.check()}", flush=True)
        except UpstreamError as e:
            # It may start later (vLLM takes minutes): requests get 503 until it answers.
            print(f"warning: {e.message}; requests are answered 503 until it answers", file=sys.stderr, flush=True)
    index = None
    if args.docs:
        index = from_args(args, args.docs, args.index_cache, settings.embedding_model_for(model_dir))
    tools = plugin_runner(args.plugins, args.plugin, orders=args.orders, router=args.router,
                          timeout=args.plugin_timeout, passages=args.passages, index=index, store=store)
    assistant = Assistant(scheduler, tokenizer, args.name or model_dir.resolve().name, index=index, system=system,
                          guard=guard, store=store, tools=tools, passages=args.passages, default_max_tokens=args.max_tokens,
                          max_tokens_limit=args.max_tokens_limit, max_message_chars=args.max_message_chars,
                          default_temperature=args.temperature,
                          default_repetition_penalty=args.repetition_penalty, request_timeout=args.request_timeout,
                          context_tokens=settings.context_tokens,
                          min_score=settings.threshold(getattr(index, "mode", None)),
                          refusal_bias=(settings.refusal_logit_bias(tokenizer) if index is not None and not args.upstream
                                        else ()),   # an upstream engine takes no first-token bias
                          reply_ngram=0 if args.upstream else settings.reply_no_repeat_ngram_size)
    allowed_hosts = None
    if _is_loopback(args.host) and not api_key:
        # Keyless on loopback: only a page the user opened by a loopback name may call it.
        allowed_hosts = [*LOOPBACK_NAMES, args.host, *(args.allowed_host or [])]
    app = create_app(assistant, api_key=api_key, max_body_bytes=args.max_body_bytes, reload=load,
                     admin_key=admin_key, allowed_hosts=allowed_hosts, api_docs=args.api_docs)

    def on_sighup(signum, frame):
        # A new model folder (the next training round) is served without dropping a request.
        def swap():
            try:
                swap_model(assistant, load)
                print(f"chatforge serve: reloaded {model_dir}", flush=True)
            except Exception as e:                    # noqa: BLE001 - the old model keeps serving
                print(f"chatforge serve: reload failed, still serving the previous model: {e}", flush=True)

        threading.Thread(target=swap, name="chatforge-reload", daemon=True).start()

    signal.signal(signal.SIGHUP, on_sighup)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # New requests get 503 while the running ones finish (uvicorn waits for them).
            app.state.stopping = True
            super().handle_exit(sig, frame)

    server = Server(server_config(app, args.host, args.port, request_read_timeout=args.read_timeout,
                                  keep_alive=args.keep_alive, max_connections=args.max_connections,
                                  log_level=args.log_level, timeout_graceful_shutdown=30))
    where = f"http://{'[' + args.host + ']' if ':' in args.host else args.host}:{args.port}"
    grounded = f", answering from {len(index)} passages" if index is not None else ""
    if tools is not None:
        grounded += f", plugins: {', '.join(tools.names)}"
    print(f"chatforge serve: {assistant.name} on {where}/ (API: {where}/v1{grounded}; "
          f"feedback: {store.where if store else 'off'})", flush=True)
    try:
        server.run()
    finally:
        assistant.scheduler.stop(drain=False, timeout=10)
        if store is not None:
            store.close()
    return 0
