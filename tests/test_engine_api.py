"""The scheduler (infer/batching.py) drives the engine through its public step API only.

`Engine.forward`, `check_prompts`, `logits_pipeline`, `stop_matcher`, `completion`, `thread_limit()`
and `TextStream` are what a second decode loop needs; anything private to infer/engine.py may change without
notice. This walks batching.py's syntax tree for a private name of the engine module: one
imported from it, or an attribute of an engine (`engine._x`, `self.engine._x`, `Engine._x`),
or any `._x` that names a private member of `Engine` and nothing of batching.py's own.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "chatforge" / "infer"
ENGINE_MODULE = "chatforge.infer.engine"


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _defined_private(tree: ast.AST, only_class: str | None = None) -> set[str]:
    """Private names a module defines: functions, classes, methods, `self._x` attributes (of
    class `only_class` when given)."""
    roots = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == only_class] if only_class \
        else [tree]
    names = set()
    for root in roots:
        for node in ast.walk(root):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and _private(node.name):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and _private(node.attr):
                names.add(node.attr)
    return names


def _names_an_engine(node: ast.expr) -> bool:
    """`engine`, `Engine`, `x.engine`: an expression that is the engine (or its class)."""
    name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
    return name in ("engine", "Engine")


def private_engine_uses(source: str, engine_source: str) -> list[str]:
    """`line: what` for every private name of the engine module that `source` uses."""
    tree, engine_tree = ast.parse(source), ast.parse(engine_source)
    engine_private = _defined_private(engine_tree, "Engine") - _defined_private(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == ENGINE_MODULE:
            found += [(node.lineno, node.col_offset, f"imports {a.name}") for a in node.names if _private(a.name)]
        elif isinstance(node, ast.Attribute) and _private(node.attr) and \
                (_names_an_engine(node.value) or node.attr in engine_private):
            found.append((node.lineno, node.col_offset, ast.unparse(node)))
    return [f"{line}: {what}" for line, _, what in sorted(found)]


def test_batching_uses_only_the_engines_public_names():
    uses = private_engine_uses((SRC / "batching.py").read_text(encoding="utf-8"),
                               (SRC / "engine.py").read_text(encoding="utf-8"))
    assert uses == [], "infer/batching.py uses private names of infer/engine.py:\n" + "\n".join(uses)


def test_the_check_finds_what_the_scheduler_used_before_the_step_api():
    """The lines batching.py had before the engine's step API was public, each one caught."""
    engine_source = (SRC / "engine.py").read_text(encoding="utf-8") + '''
class Engine(Engine):
    def _forward(self): ...
    def _completion(self): ...
'''
    before = '''
from chatforge.infer.engine import Engine, GenerationConfig, _TextStream

class Scheduler:
    def _prefill(self): ...

    def step(self, engine):
        stops = engine._stop_strings(cfg)
        with self.engine._thread_limit():
            self._prefill()                     # the scheduler's own: not the engine's
        eng = self.engine
        logits = eng._forward(ids, self.cache, positions, None)
        return eng._completion(run.tokens, reason, stop), Engine._check_prompts
'''
    assert private_engine_uses(before, engine_source) == [
        "2: imports _TextStream", "8: engine._stop_strings", "9: self.engine._thread_limit",
        "12: eng._forward", "13: eng._completion", "13: Engine._check_prompts"]
