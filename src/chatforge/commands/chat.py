"""`chatforge chat`: talk to a model in the terminal, optionally grounded in your documents.

The conversation itself (`ChatSession`) and the read-reply loop (`converse`) are in
`chatforge.infer.chat`; this module holds the options, loads what they name and starts the loop.
`add_plugin_options` / `plugin_runner` are shared with `chatforge serve`.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TextIO

from chatforge.commands import add_answer_overrides, add_retrieval, leaf
from chatforge.data.feedback import FeedbackStore
from chatforge.errors import ChatforgeError
from chatforge.infer.answer import AnswerSettings
from chatforge.infer.chat import ChatSession, converse, pipe_reader, style, tty_reader
from chatforge.infer.plugins import DEFAULT_TIMEOUT, PluginRunner
from chatforge.infer.plugins import plugin_runner as make_plugin_runner
from chatforge.infer.prompting import load_system_prompt
from chatforge.infer.safety import ACTIONS, DEFAULT_REFUSAL, ReplyFilter, load_blocked_terms
from chatforge.model.folder import load_model
from chatforge.retrieval.fusion import from_args


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("example:\n  chatforge chat --model runs/demo/sft --system examples/system_prompt.md "
                     "--docs examples/my_docs\n  printf 'hello\\n' | chatforge chat --model runs/demo/sft")
    parser.add_argument("--model", metavar="DIR", default=None, help="model folder (the output of sft); required")
    parser.add_argument("--system", metavar="FILE", default=None,
                        help="system prompt: plain text, or Markdown sections (# Role, # Goal, # Do not, "
                             "# Output format, # Examples); see examples/system_prompt.md")
    parser.add_argument("--docs", metavar="PATH", nargs="+", default=None,
                        help="files or folders to answer from: each question retrieves passages from them")
    parser.add_argument("--no-retrieval", action="store_true", default=False,
                        help="ignore --docs (e.g. one set in a --config file) and chat without retrieval")
    parser.add_argument("--passages", type=int, default=None,
                        help="passages retrieved per question with --docs (default: the model's answer settings, "
                             "answer.json, as SFT trained it; else 3)")
    add_answer_overrides(parser)
    add_retrieval(parser)
    parser.add_argument("--index-cache", metavar="DIR", default=None,
                        help="where the passage index is cached "
                             "(default: $CHATFORGE_CACHE/index or ~/.cache/chatforge/index)")
    # Decoding defaults to the model's answer settings (answer.json; greedy without one), the
    # decoding eval measured and serve uses: each flag overrides its part.
    parser.add_argument("--max-new-tokens", type=int, default=None, help="longest reply, in tokens (default: answer settings)")
    parser.add_argument("--strategy", choices=("greedy", "sample", "beam"), default=None,
                        help="decoding strategy (default: the model's answer settings, greedy without them)")
    parser.add_argument("--temperature", type=float, default=None, help="sampling temperature (0 = greedy)")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold (1 = off)")
    parser.add_argument("--repetition-penalty", type=float, default=None,
                        help="> 1 discourages repeating (1 = off; it also counts the passages, so it works against copying)")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling (replies become reproducible)")
    parser.add_argument("--blocked-terms", metavar="FILE", default=None,
                        help="terms never shown in a reply: one a line, /regex/ for a regular expression")
    parser.add_argument("--blocked-action", choices=ACTIONS, default="mask",
                        help="mask a blocked term with *s, or replace the whole reply with --refusal")
    parser.add_argument("--refusal", default=DEFAULT_REFUSAL,
                        help="the reply shown instead, with --blocked-action refuse")
    parser.add_argument("--device", default="cpu", help="torch device to run the model on")
    parser.add_argument("--quant", choices=["int8", "int4"], default=None,
                        help="weight-only 8- or 4-bit linear layers (CPU): smaller, faster decoding")
    add_plugin_options(parser)
    parser.add_argument("--db", metavar="FILE|URL", default=None,
                        help="feedback database where the handoff plugin opens its tickets: a SQLite file or "
                             "a postgresql:// URL")
    leaf(parser, run)



def add_plugin_options(parser: argparse.ArgumentParser) -> None:
    """`--plugins`, `--plugin`, `--orders`, `--router`, `--plugin-timeout` (chat and serve)."""
    parser.add_argument("--plugins", metavar="NAMES", default=None,
                        help="plugins to call before the model answers, comma-separated: docs, orders, calculator, "
                             "handoff, or an installed `chatforge.plugins` entry point "
                             "(default: docs when --docs is given)")
    parser.add_argument("--plugin", metavar="MODULE:CLASS", action="append", default=[],
                        help="also load this plugin class (repeatable)")
    parser.add_argument("--orders", metavar="FILE", default=None,
                        help="the orders plugin's table: a .csv file, or a SQLite file as FILE or FILE:TABLE")
    parser.add_argument("--router", metavar="DIR", default=None,
                        help="an intent classifier (`chatforge classify train` on {\"text\", \"label\"} lines "
                             "labelled with plugin intents) that routes messages beside the plugins' own rules")
    parser.add_argument("--plugin-timeout", type=float, default=DEFAULT_TIMEOUT,
                        help="seconds a plugin may take; a slower one is left out of that answer")


def plugin_runner(args: argparse.Namespace, index=None, store=None) -> PluginRunner | None:
    """The PluginRunner `add_plugin_options`' flags ask for, or None (no plugins: a plain chat)."""
    return make_plugin_runner(args.plugins, args.plugin, orders=args.orders, router=args.router,
                              timeout=args.plugin_timeout, passages=args.passages, index=index, store=store)


def _use_color(stream: TextIO) -> bool:
    return stream.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


def run(args: argparse.Namespace) -> int:
    if not args.model:
        raise ChatforgeError("--model is required: the folder of a trained model (the output of sft)")
    if args.passages is not None and args.passages < 1:
        raise ChatforgeError(f"--passages must be at least 1, got {args.passages}")
    # Cheap checks first, so a typo fails at once, before torch and the model load.
    system = load_system_prompt(args.system) if args.system else None
    blocked = load_blocked_terms(args.blocked_terms) if args.blocked_terms else []
    guard = ReplyFilter(blocked, action=args.blocked_action, refusal=args.refusal)

    settings = AnswerSettings.load(args.model).replace(passages=args.passages, refusal_bias=args.refusal_bias,
                                                       reply_no_repeat_ngram_size=args.reply_ngram)
    strategy = args.strategy or ("sample" if args.temperature else None)
    if args.temperature == 0 and args.strategy is None:
        strategy = "greedy"
    gen_cfg = settings.generation(strategy=strategy, max_new_tokens=args.max_new_tokens,
                                  temperature=args.temperature or None, top_k=args.top_k, top_p=args.top_p,
                                  repetition_penalty=args.repetition_penalty, seed=args.seed)

    model, tokenizer = load_model(args.model, device=args.device)
    index = None
    if args.docs and not args.no_retrieval:
        index = from_args(args, args.docs, args.index_cache, settings.embedding_model_for(args.model))
    store = None
    if args.db:
        store = FeedbackStore(args.db)
    tools = plugin_runner(args, index, store)
    session = ChatSession(model, tokenizer, system=system, gen_cfg=gen_cfg, guard=guard,
                          quant=args.quant, tools=tools, settings=settings)

    if not sys.stdin.isatty():
        return converse(session, pipe_reader(sys.stdin), sys.stdout, sys.stderr, interactive=False)
    color = _use_color(sys.stdout)
    n_params = sum(p.numel() for p in model.parameters())
    grounded = f", answering from {len(index)} passages" if index is not None else ""
    if tools is not None:
        grounded += f", plugins: {', '.join(tools.names)}"
    print(style(color)(f"chatforge chat: {args.model} ({n_params / 1e6:.1f}M parameters, "
                        f"{session.context}-token context{grounded})", "bold"))
    print("Type a message and press Enter; /help for commands, /exit or Ctrl-D to leave.\n")
    return converse(session, tty_reader("you> ", sys.stdout), sys.stdout, sys.stdout, interactive=True, color=color)
