"""`chatforge`: the list of commands and `main`, which parses arguments and runs the command.

Each command is a module of this package (`chatforge.commands.sft`, ...; see `__init__.py` for
what a command module holds). Only the module of the command being run is imported, so
`chatforge --help` stays fast and torch is loaded only by commands that need it.

Every leaf command takes `--config FILE.yaml`: its keys are the command's option names (dashes
or underscores) and become defaults, so the command line still overrides them. An unknown key is
an error that lists the valid ones.

Errors: a `ChatforgeError` prints `error: ...` (no traceback) and exits 2; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from chatforge import __version__
from chatforge.commands import _LEAVES, HelpFormatter, _apply_yaml, _find_config, subcommands
from chatforge.errors import ChatforgeError

# name -> (module, one-line help). The order is the pipeline's order.
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("chatforge.commands.data", "fetch real corpora; build a clean, PII-scrubbed, deduplicated corpus"),
    "tokenizer": ("chatforge.commands.tokenizer", "train a byte-level BPE tokenizer with a ChatML template"),
    "model": ("chatforge.commands.model", "inspect models; import a pretrained GGUF file or HF model folder"),
    "pretrain": ("chatforge.commands.pretrain", "pretrain a GPT from scratch or continue a local checkpoint"),
    "sft": ("chatforge.commands.sft", "fine-tune a model to chat (full, LoRA or frozen backbone)"),
    "classify": ("chatforge.commands.classify", "train / run a text classifier on a model's backbone"),
    "retriever": ("chatforge.commands.retriever", "fine-tune the embedding model of dense retrieval on the company's Q&A"),
    "generate": ("chatforge.commands.generate", "complete a prompt (greedy, beam search or sampling)"),
    "chat": ("chatforge.commands.chat", "talk to a model in the terminal, optionally grounded in documents"),
    "serve": ("chatforge.commands.serve", "serve the assistant: OpenAI-compatible API, chat page, feedback"),
    "eval": ("chatforge.commands.eval", "perplexity, BLEU, ROUGE and retrieval hit-rate, with an HTML report"),
    "export": ("chatforge.commands.export", "export a model for transformers (HF folder) or llama.cpp / Ollama (GGUF + Modelfile)"),
    "feedback": ("chatforge.commands.feedback", "user satisfaction from the feedback database; export it as training data"),
    "prefs": ("chatforge.commands.prefs", "make preference pairs from the company's Q&A (chosen vs rejected replies)"),
    "reward": ("chatforge.commands.reward", "train / run a reward model (a scalar score of a reply) on preference pairs"),
    "dpo": ("chatforge.commands.dpo", "align a chat model with preference pairs (DPO, IPO or hinge loss)"),
    "kto": ("chatforge.commands.kto", "align a chat model with unpaired thumbs up and down (KTO)"),
    "ppo": ("chatforge.commands.ppo", "align a chat model against a reward model with PPO or GRPO (sampled replies)"),
    "pipeline": ("chatforge.commands.pipeline", "run every stage in order from one config (the main job)"),
}

def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatforge", formatter_class=HelpFormatter,
        description="Build a ChatGPT-style support assistant from your own documents.\n"
                    "Run `chatforge COMMAND --help` for a command's options and an example.",
        epilog="example:\n  chatforge pipeline            # the whole path on the default data\n"
               "  chatforge pipeline --input my_docs/   # on your own folder")
    parser.add_argument("--version", action="version", version=f"chatforge {__version__}")
    sub = subcommands(parser)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help) in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.configure(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(argv)
        config = _find_config(argv)
        if config is not None:
            words = [a for a in argv if not a.startswith("-")]
            for path, p in sorted(_LEAVES.items(), key=lambda kv: -len(kv[0])):
                if tuple(words[: len(path)]) == path:
                    _apply_yaml(p, config)
                    break
        args = parser.parse_args(argv)
        return int(args._run(args) or 0)
    except ChatforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
