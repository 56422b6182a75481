"""The `chatforge` command line: parse arguments, then hand over to the stage's `run(args)`.

Each command lives in its own module, which exposes `configure(parser)`; `configure` adds the
options and calls `leaf(parser, run)` on every parser that runs something (a command with
sub-commands, such as `data fetch` / `data build`, calls it once per sub-command). Only the module
of the command being run is imported, so `chatforge --help` stays fast and torch is loaded only
by commands that need it.

Every leaf command takes `--config FILE.yaml`: its keys are the command's option names (dashes
or underscores) and become defaults, so the command line still overrides them. An unknown key is
an error that lists the valid ones.

Errors: a `ChatforgeError` prints `error: ...` (no traceback) and exits 2; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable

from chatforge.errors import ChatforgeError

# name -> (module, one-line help). The order is the pipeline's order.
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("chatforge.data.commands", "fetch real corpora; build a clean, PII-scrubbed, deduplicated corpus"),
    "tokenizer": ("chatforge.data.tokenizer", "train a byte-level BPE tokenizer with a ChatML template"),
    "model": ("chatforge.model.commands", "inspect models; import a pretrained GGUF file or HF model folder"),
    "pretrain": ("chatforge.train.pretrain", "pretrain a GPT from scratch or continue a local checkpoint"),
    "sft": ("chatforge.train.sft", "fine-tune a model to chat (full, LoRA or frozen backbone)"),
    "classify": ("chatforge.train.classify", "train / run a text classifier on a model's backbone"),
    "retriever": ("chatforge.train.retriever", "fine-tune the embedding model of dense retrieval on the company's Q&A"),
    "generate": ("chatforge.infer.generate", "complete a prompt (greedy, beam search or sampling)"),
    "chat": ("chatforge.infer.chat", "talk to a model in the terminal, optionally grounded in documents"),
    "serve": ("chatforge.serve.command", "serve the assistant: OpenAI-compatible API, chat page, feedback"),
    "eval": ("chatforge.eval.evaluate", "perplexity, BLEU, ROUGE and retrieval hit-rate, with an HTML report"),
    "export": ("chatforge.model.export", "export a model for transformers (HF folder) or llama.cpp / Ollama (GGUF + Modelfile)"),
    "feedback": ("chatforge.data.feedback_commands", "user satisfaction from the feedback database; export it as training data"),
    "prefs": ("chatforge.train.make_pairs", "make preference pairs from the company's Q&A (chosen vs rejected replies)"),
    "reward": ("chatforge.train.reward", "train / run a reward model (a scalar score of a reply) on preference pairs"),
    "dpo": ("chatforge.train.dpo", "align a chat model with preference pairs (DPO, IPO or hinge loss)"),
    "kto": ("chatforge.train.kto_command", "align a chat model with unpaired thumbs up and down (KTO)"),
    "ppo": ("chatforge.train.ppo", "align a chat model against a reward model with PPO or GRPO (sampled replies)"),
    "pipeline": ("chatforge.pipeline", "run every stage in order from one config (the main job)"),
}

_LEAVES: dict[tuple[str, ...], argparse.ArgumentParser] = {}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults and keep the examples in epilogs as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        # Options whose help already explains the default, or whose default is "not set", say
        # nothing more: "(default: None)" tells a user nothing.
        if "default" in text or action.default in (None, argparse.SUPPRESS, False):
            return text
        return super()._get_help_string(action)


def leaf(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], int | None], yaml_config: bool = True) -> None:
    """Mark `parser` as a runnable command: `run(args)` is called with the parsed arguments."""
    if yaml_config:
        parser.add_argument("--config", metavar="FILE.yaml", default=None,
                            help="YAML file whose keys set this command's options (the command line overrides it)")
        _LEAVES[tuple(parser.prog.split()[1:])] = parser
    parser.set_defaults(_run=run)


def option_defaults(add_options: Callable[[argparse.ArgumentParser], None]) -> dict:
    """{option: default} of the options `add_options` adds to a parser: a command's defaults,
    for its Python API (`run_*(**options)` starts from them)."""
    p = argparse.ArgumentParser(add_help=False)
    add_options(p)
    return vars(p.parse_args([]))


def subcommands(parser: argparse.ArgumentParser, title: str = "commands") -> argparse._SubParsersAction:
    """Add sub-commands to `parser` that print nicely and require a choice."""
    sub = parser.add_subparsers(title=title, metavar="COMMAND")
    sub.required = True
    return sub


def add_parser(sub: argparse._SubParsersAction, name: str, help: str, example: str = "") -> argparse.ArgumentParser:
    """Add a sub-command with our formatter and an `example:` epilog."""
    return sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter,
                          epilog=f"example:\n  {example}" if example else None)


def _apply_yaml(parser: argparse.ArgumentParser, path: str) -> None:
    from chatforge.files import read_yaml_mapping

    data = read_yaml_mapping(path, "a mapping of option: value")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    defaults = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest not in actions:
            valid = ", ".join(sorted(d.replace("_", "-") for d in actions if not d.startswith("_")))
            raise ChatforgeError(f"{path}: unknown option {key!r}; valid options: {valid}")
        actions[dest].required = False
        defaults[dest] = value
    parser.set_defaults(**defaults)


def _find_config(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--config="):
            return a.split("=", 1)[1]
    return None


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatforge", formatter_class=HelpFormatter,
        description="Build a ChatGPT-style support assistant from your own documents.\n"
                    "Run `chatforge COMMAND --help` for a command's options and an example.",
        epilog="example:\n  chatforge pipeline            # the whole path on the default data\n"
               "  chatforge pipeline --input my_docs/   # on your own folder")
    from chatforge import __version__
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
