"""`chatforge serve`: the assistant over HTTP (the OpenAI API, a chat page, feedback). The options
are here; what they start (the server, its reloads, its checks) is `chatforge.serve.command.run`."""

from __future__ import annotations

import argparse

from chatforge.commands import add_answer_overrides, add_retrieval, leaf
from chatforge.commands.chat import add_plugin_options
from chatforge.infer.safety import ACTIONS, DEFAULT_REFUSAL
from chatforge.serve.command import run


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("example:\n  chatforge serve --model runs/demo/sft --docs examples/my_docs\n"
                     "  CHATFORGE_API_KEY=secret chatforge serve --model runs/demo/sft --host 0.0.0.0")
    parser.add_argument("--model", metavar="DIR", default=None, help="model folder (the output of sft); required")
    parser.add_argument("--docs", metavar="PATH", nargs="+", default=None,
                        help="files or folders to answer from: each question retrieves passages from them")
    parser.add_argument("--system", metavar="FILE", default=None,
                        help="system prompt file (see examples/system_prompt.md); a client's own system "
                             "message replaces it for that request")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; anything but loopback needs care (use --api-key)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--db", metavar="FILE|URL", default=None,
                        help="feedback database: a SQLite file (default: feedback.sqlite beside the model folder) "
                             "or postgresql://USER:PASSWORD@HOST:PORT/DATABASE (pip install 'chatforge[postgres]')")
    parser.add_argument("--no-feedback", action="store_true", default=False,
                        help="keep no replies or feedback (POST /v1/feedback answers 503)")
    parser.add_argument("--api-key", metavar="KEY", default=None,
                        help="require 'Authorization: Bearer KEY' on /v1/...; prefer the CHATFORGE_API_KEY "
                             "environment variable (a command line is visible to other users)")
    parser.add_argument("--admin-key", metavar="KEY", default=None,
                        help="require 'Authorization: Bearer KEY' on /admin/... (reload); a chat --api-key never "
                             "opens them; without it they answer 403. Prefer CHATFORGE_ADMIN_KEY")
    parser.add_argument("--allowed-host", metavar="NAME", action="append", default=None,
                        help="a Host name the server answers besides its own address (repeatable); a "
                             "loopback server without --api-key answers only localhost names, against DNS rebinding")
    parser.add_argument("--api-docs", action="store_true", default=False,
                        help="serve the OpenAPI schema at /openapi.json and its Swagger page at /docs "
                             "(the page loads Swagger from a CDN)")
    parser.add_argument("--request-timeout", type=float, default=600.0,
                        help="seconds a request may wait and generate in all; then 504 and its generation stops")
    parser.add_argument("--read-timeout", type=float, default=10.0,
                        help="seconds a client has to send a whole request (headers and body); a slower "
                             "connection is closed")
    parser.add_argument("--keep-alive", type=int, default=5, help="seconds an idle kept-alive connection stays open")
    parser.add_argument("--max-connections", type=int, default=1000,
                        help="open connections at most; beyond it new requests get 503")
    parser.add_argument("--upstream", metavar="URL", default=None,
                        help="generate with the OpenAI-compatible engine at URL (llama-server, vLLM, another "
                             "chatforge) serving this --model (e.g. its GGUF export); chatforge keeps retrieval, "
                             "citations, feedback, the page. --max-batch requests are sent to it at once")
    parser.add_argument("--upstream-model", metavar="ID", default=None,
                        help="the engine's model id (default: the only one its /v1/models lists)")
    parser.add_argument("--upstream-key", metavar="KEY", default=None,
                        help="API key the engine wants (sent as a Bearer token); prefer CHATFORGE_UPSTREAM_KEY")
    parser.add_argument("--upstream-timeout", type=float, default=60.0,
                        help="seconds the engine may stay silent (connecting, before the first token, between "
                             "two) before the request fails with 504")
    parser.add_argument("--name", default=None, help="the model id clients use (default: the model folder's name)")
    parser.add_argument("--max-batch", type=int, default=16, help="requests decoded together at most")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="requests waiting for a batch slot at most; more get 429")
    parser.add_argument("--kv-cache-mb", type=int, default=None,
                        help="memory for the KV cache of all running requests (default: a quarter of the "
                             "machine's memory, at most what --max-batch requests at the full context take); "
                             "a request that can never fit gets 400, one that cannot fit now waits")
    parser.add_argument("--prefill-chunk", type=int, default=256,
                        help="prompt tokens prefilled between two decode steps: a long prompt goes in by "
                             "chunks while the other replies go on")
    # Without these flags the model's answer settings decide (answer.json, what SFT trained it for
    # and eval measured; `infer/answer.py`), as in chat and eval.
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="reply length when a request does not say (default: the answer settings', at most "
                             "--max-tokens-limit)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="temperature for requests that do not set one (0 = greedy: the same question "
                             "gets the same answer; OpenAI's own default is 1)")
    parser.add_argument("--repetition-penalty", type=float, default=None,
                        help="repetition penalty for requests that do not set `repetition_penalty` (1 = off; "
                             "it counts the prompt's tokens too, so it discourages copying from the passages)")
    parser.add_argument("--max-tokens-limit", type=int, default=1024, help="longest reply a request may ask for")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body accepted")
    parser.add_argument("--max-message-chars", type=int, default=4000,
                        help="longest user message in characters; longer ones get a 400 (the page shows a counter)")
    parser.add_argument("--passages", type=int, default=None,
                        help="passages retrieved per question with --docs (default: the answer settings', else 3)")
    add_answer_overrides(parser)
    parser.add_argument("--index-cache", metavar="DIR", default=None, help="where the passage index is cached")
    add_retrieval(parser)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for the model (default: 1 for models under 1B parameters)")
    parser.add_argument("--dtype", default="auto", help="weights to generate with: auto (bf16 where native), float32")
    parser.add_argument("--quant", choices=["int8", "int4"], default=None,
                        help="weight-only 8- or 4-bit linear layers (CPU): smaller, faster decoding")
    parser.add_argument("--blocked-terms", metavar="FILE", default=None,
                        help="terms never shown in a reply: one a line, /regex/ for a regular expression")
    parser.add_argument("--blocked-action", choices=ACTIONS, default="mask",
                        help="mask a blocked term with *s, or replace the whole reply with --refusal")
    parser.add_argument("--refusal", default=DEFAULT_REFUSAL, help="the reply shown instead, with --blocked-action refuse")
    add_plugin_options(parser)
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                        help="server log level")
    leaf(parser, run)
