"""What a plugin is: the classes a plugin author writes against (documented in the README).

    from chatforge.infer.plugins import Fact, Plugin, PluginResult   # the same classes

`Plugin` (name, description, intents, the keyword rule `matches`, `run`), the `PluginResult` it
returns and the `Fact`s in it. `infer/plugins.py` runs and loads plugins; the built-ins
(`infer/plugin_builtins.py`) implement this interface. Apart from both so that the runner can
load the built-ins and the built-ins can subclass `Plugin` without the two importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Fact:
    """One piece of data for the prompt and where it came from (`plugin` is set by the runner)."""

    text: str
    source: str
    plugin: str = ""


@dataclass
class PluginResult:
    """What a plugin found: facts for the prompt, or a reply that replaces the model's, or neither."""

    facts: list[Fact] = field(default_factory=list)
    reply: str | None = None
    passages: list = field(default_factory=list)     # the docs plugin's retrieved passages


class Plugin:
    """Subclass this (or write any class with these attributes; see the README's example)."""

    name: str = ""
    description: str = ""
    intents: tuple[str, ...] = ()

    def matches(self, message: str) -> bool:
        """The keyword rule: whether this plugin should run on `message` without a classifier."""
        return False

    def run(self, message: str, conversation: list[dict]) -> PluginResult | None:
        raise NotImplementedError
