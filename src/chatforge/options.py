"""Typed options: the dataclasses that hold a command's settings, one help line per field.

    @dataclass
    class DPOConfig(LoopOptions):
        beta: float = option(0.1, "how far the model may move from --base: larger keeps it closer")
        loss: str = option("sigmoid", "sigmoid: DPO; ipo: ...", choices=LOSSES)
        lora: LoraConfig = group(PreferenceLora)

    cfg = build(DPOConfig, {"beta": 0.2, "lora_rank": 16}, "dpo")   # Python callers
    cfg.lora.rank                                                  # -> 16

A config class is the one home of its command's defaults. Fields are named as the command line
names them without the dashes (`batch_size` is `--batch-size`); a `group` nests another config
whose fields take its prefix (`lora.rank` is `lora_rank` and `--lora-rank`), so YAML files,
pipeline settings and Python callers all use the same flat names. `chatforge.commands` turns a
class into parser flags and parsed arguments back into an instance; nothing here knows argparse.

A class may check its values in `__post_init__` (raise `ChatforgeError` saying what to fix);
`build` checks unknown names and `choices` for every class.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Iterator

from chatforge.errors import ChatforgeError


def option(default: Any, help: str, *, choices: tuple | list | None = None, metavar: str | None = None,
           nargs: str | None = None, flag: str | None = None) -> Any:
    """A config field with its command-line help. `flag` overrides the generated `--name`;
    `nargs` is argparse's (lists take `*` unless told); a mutable default is copied per instance."""
    meta = {"help": help, "choices": tuple(choices) if choices else None, "metavar": metavar, "nargs": nargs,
            "flag": flag}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def group(cls: type, prefix: str = "") -> Any:
    """A nested config (e.g. `lora: LoraConfig = group(LoraConfig, "lora")`): its fields are
    flags with `prefix` (`--lora-rank`), and flat names `lora_rank` in YAML and Python calls."""
    return field(default_factory=cls, metadata={"group": prefix})


@dataclass(frozen=True)
class Flag:
    """One leaf field of a config class, as the command line sees it."""
    name: str              # the flat name: `lora_rank`
    path: tuple[str, ...]  # where it sits in the instance: ("lora", "rank")
    type: Any              # int, float, str, bool, or list[...] (element type in `item`)
    item: Any
    optional: bool         # None is a valid value
    default: Any
    help: str
    choices: tuple | None
    metavar: str | None
    nargs: str | None
    flag: str              # `--lora-rank`
    section: str           # the help's heading: the `SECTION` of the class that declared it ("" = the command's own)


def _unwrap(hint: Any) -> tuple[Any, Any, bool]:
    """(type, list element type, optional) of a field's annotation."""
    optional = False
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        optional = type(None) in args
        rest = [a for a in args if a is not type(None)]
        hint = rest[0] if len(rest) == 1 else str
    if typing.get_origin(hint) in (list, tuple):
        inner = typing.get_args(hint)
        return list, (inner[0] if inner else str), optional
    return hint, None, optional


def flags(cls: type, prefix: str = "", path: tuple[str, ...] = (), instance: Any = None,
          section: str | None = None) -> Iterator[Flag]:
    """Every leaf field of config class `cls` (nested groups flattened), in declaration order,
    with the defaults of `instance` (default: a fresh `cls()`). A class that declares `SECTION`
    (`LoopOptions`, `LoraConfig`) has its fields shown under that heading in `--help`."""
    instance = cls() if instance is None else instance
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        value = getattr(instance, f.name)
        if "group" in f.metadata:
            sub = f.metadata["group"]
            yield from flags(type(value), f"{prefix}{sub}_" if sub else prefix, (*path, f.name), value,
                             getattr(type(value), "SECTION", ""))
            continue
        if "help" not in f.metadata:
            continue   # an internal field: not an option
        typ, item, optional = _unwrap(hints[f.name])
        name = prefix + f.name
        m = f.metadata
        owner = next(c for c in reversed(cls.__mro__) if f.name in getattr(c, "__dataclass_fields__", {}))
        yield Flag(name, (*path, f.name), typ, item, optional or value is None, value, m["help"], m["choices"],
                   m["metavar"], m["nargs"], m["flag"] or "--" + name.replace("_", "-"),
                   section if section is not None else owner.__dict__.get("SECTION", ""))


def defaults(cls: type) -> dict[str, Any]:
    """{flat name: default} of `cls`."""
    return {f.name: f.default for f in flags(cls)}


def build(cls: type, options: dict[str, Any] | None = None, what: str = "") -> Any:
    """An instance of `cls` from flat names (`{"beta": 0.2, "lora_rank": 16}`; dashes work too),
    the others at their defaults. Unknown names and values outside `choices` are errors."""
    options = {str(k).replace("-", "_"): v for k, v in (options or {}).items()}
    known = {f.name: f for f in flags(cls)}
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ChatforgeError(f"unknown {what + ' ' if what else ''}option(s) {unknown}; "
                             f"valid: {', '.join(sorted(known))}")
    for name, value in options.items():
        f = known[name]
        if f.choices and value not in f.choices and not (value is None and f.optional):
            raise ChatforgeError(f"{f.flag} must be one of {', '.join(map(str, f.choices))}, got {value!r}")
    return _make(cls, options, ())


def _make(cls: type, options: dict[str, Any], path: tuple[str, ...], prefix: str = "") -> Any:
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if "group" in f.metadata:
            sub = f.metadata["group"]
            sub_cls = type(f.default_factory())  # the group's own class (it may narrow defaults)
            kwargs[f.name] = _make(sub_cls, options, (*path, f.name), f"{prefix}{sub}_" if sub else prefix)
        elif prefix + f.name in options:
            kwargs[f.name] = options[prefix + f.name]
    return cls(**kwargs)


def flatten(cfg: Any) -> dict[str, Any]:
    """{flat name: value} of a config instance: what `build` takes back, and what a report records."""
    out = {}
    for f in flags(type(cfg), instance=cfg):
        value = cfg
        for part in f.path:
            value = getattr(value, part)
        out[f.name] = value
    return out
