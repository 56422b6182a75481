"""The command line's parts: argparse lives in this package only, one module per command.

Each command module (`commands/sft.py`, ...) exposes `configure(parser)`, which adds the options
and calls `leaf(parser, run)` on every parser that runs something (a command with sub-commands,
such as `data fetch` / `data build`, calls it once per sub-command); `run(args)` hands the parsed
arguments to the library (`chatforge.train.sft.run_sft`, ...) and returns the exit code.
`commands/main.py` holds the list of commands and `main`.

A command whose settings are a typed config (`chatforge.options`) gets its flags from the class:
`add_config(parser, SFTConfig)` adds one flag per field (`lora.rank` -> `--lora-rank`, the
field's help, type, choices and default), and `config_from(args, SFTConfig)` builds the instance
back from the parsed arguments. Flags and YAML keys keep the names the fields have.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

from chatforge import options as typed
from chatforge.errors import ChatforgeError
from chatforge.files import read_yaml_mapping

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


def add_config(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of config class `cls` (flat names in `skip` left out); the fields of a
    class with a `SECTION` (the training loop's, LoRA's) under that heading in `--help`."""
    sections: dict[str, Any] = {}
    for f in typed.flags(cls):
        if f.name in skip:
            continue
        if f.section and f.section not in sections:
            sections[f.section] = parser.add_argument_group(f.section)
        target = sections[f.section] if f.section else parser
        kw: dict[str, Any] = {"dest": f.name, "default": f.default, "help": f.help}
        if f.type is bool:
            kw["action"] = "store_true" if not f.default else argparse.BooleanOptionalAction
        else:
            kw["type"] = f.item if f.type is list else f.type
            if f.type is list:
                kw["nargs"] = f.nargs or "*"
            elif f.nargs:
                kw["nargs"] = f.nargs
            if f.choices:
                kw["choices"] = f.choices
            if f.metavar:
                kw["metavar"] = f.metavar
        target.add_argument(f.flag, **kw)


def add_answer_overrides(parser: argparse.ArgumentParser) -> None:
    """`--refusal-bias` and `--reply-ngram`, which chat, serve and eval take over the model's
    answer settings (`infer.answer.AnswerSettings`)."""
    parser.add_argument("--refusal-bias", type=float, default=None, metavar="LOGITS",
                        help="logits taken from the not-found reply's first token when a grounded answer starts "
                             "(default: the model's answer settings, fitted by SFT; 0 = off, more = fewer refusals)")
    parser.add_argument("--reply-ngram", type=int, default=None, metavar="TOKENS",
                        help="a reply may repeat a run of this many tokens only as often as its prompt holds it, "
                             "which ends loops (default: the model's answer settings, 24; 0 = off)")


def add_retrieval(parser: argparse.ArgumentParser) -> None:
    """`--retrieval` and `--embedding-model`, for a command whose settings are not a config class."""
    # lazy: retrieval.fusion brings torch (~2.5 s), and `chatforge --help` imports this package alone (0.07 s)
    from chatforge.retrieval.fusion import RetrievalOptions

    add_config(parser, RetrievalOptions)


def config_from(args: argparse.Namespace, cls: type) -> Any:
    """The instance of config class `cls` that the parsed `args` describe."""
    names = {f.name for f in typed.flags(cls)}
    return typed.build(cls, {k: v for k, v in vars(args).items() if k in names})


def exit_code(report: dict) -> int:
    """A training command's exit code: 130 when it was interrupted (its last checkpoint saved)."""
    return 130 if report.get("interrupted") else 0
