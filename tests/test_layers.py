"""The layers of chatforge import only downward, and no two modules import each other.

    files / errors / runtime / options -> data -> model -> retrieval -> infer -> train -> eval
        -> serve | pipeline -> commands

Every `import` in src/chatforge counts, those inside functions too (they are how an upward import
hid before); only imports for type checkers (`if TYPE_CHECKING:`) do not. A module may import its own layer and the layers below it; `serve` and `pipeline`
(pipeline.py, continual.py, stages.py) sit side by side and import neither each other. A cycle
between two modules is an error even when each import is lazy. argparse is imported only in
`chatforge.commands` (the command line; every other module is a library).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "chatforge"
RANK = {"base": 0, "data": 1, "model": 2, "retrieval": 3, "infer": 4, "train": 5, "eval": 6,
        "serve": 7, "pipeline": 7, "cli": 8}
BASE = {"errors", "files", "runtime", "options"}
PIPELINE = {"pipeline", "continual", "continual_engine", "stages"}
PACKAGES = {"data", "model", "retrieval", "infer", "train", "eval", "serve"}


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in BASE:
        return "base"
    if parts[1] in PACKAGES:
        return parts[1]
    if parts[1] == "export":
        return "model"
    if parts[1] in PIPELINE:
        return "pipeline"
    if parts[1] in ("cli", "__main__", "commands"):
        return "cli"
    raise AssertionError(f"{module}: no layer for it in tests/test_layers.py; add it to RANK's map")


def module_name(path: Path) -> str:
    name = ".".join(("chatforge", *path.relative_to(SRC).with_suffix("").parts))
    return name.removesuffix(".__init__")


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every chatforge import in `path`, at any depth; `from chatforge import x`
    names the submodule x when there is one."""
    out = []
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    # Imports for type checkers only (`if TYPE_CHECKING:`) never run: not an edge.
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and getattr(block.test, "id", getattr(block.test, "attr", None)) == "TYPE_CHECKING"
                   for n in ast.walk(block)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("chatforge")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("chatforge"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                is_module = (SRC.parent / Path(*sub.split("."))).with_suffix(".py").is_file() or \
                    (SRC.parent / Path(*sub.split("."))).is_dir()
                out.append((node.lineno, sub if is_module else node.module))
    return out


def graph() -> dict[str, list[tuple[int, str]]]:
    return {module_name(p): imports(p) for p in sorted(SRC.rglob("*.py"))}


def upward(edges: dict[str, list[tuple[int, str]]]) -> list[str]:
    bad = []
    for module, targets in edges.items():
        mine = layer(module)
        for line, target in targets:
            theirs = layer(target)
            if theirs == mine:
                continue
            if RANK[theirs] >= RANK[mine]:
                bad.append(f"{module} (line {line}, layer {mine}) imports {target} (layer {theirs})")
    return bad


def cycles(edges: dict[str, list[tuple[int, str]]]) -> list[list[str]]:
    """Every cycle's modules (strongly connected components of more than one module, Tarjan)."""
    succ = {m: sorted({t for _, t in ts if t in edges and t != m}) for m, ts in edges.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in succ[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in succ:
        if v not in index:
            visit(v)
    return found


def argparse_users(root: Path = SRC) -> list[str]:
    """Modules outside `chatforge.commands` that import argparse (at any depth)."""
    bad = []
    for path in sorted(root.rglob("*.py")):
        module = module_name(path)
        if module.startswith("chatforge.commands"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            if "argparse" in names:
                bad.append(f"{module} (line {node.lineno}) imports argparse")
    return bad


def test_argparse_only_in_commands():
    assert argparse_users() == []


def test_imports_point_only_downward():
    assert upward(graph()) == []


def test_no_two_modules_import_each_other():
    assert cycles(graph()) == []


@pytest.mark.parametrize("source, expected", [
    # what the checks catch: today's tree with the engine importing training code again ...
    ({"chatforge.infer.engine": [(1, "chatforge.train.runtime")], "chatforge.train.runtime": []},
     ["chatforge.infer.engine (line 1, layer infer) imports chatforge.train.runtime (layer train)"]),
    # ... or the server and the pipeline importing each other
    ({"chatforge.serve.app": [(3, "chatforge.pipeline")], "chatforge.pipeline": []},
     ["chatforge.serve.app (line 3, layer serve) imports chatforge.pipeline (layer pipeline)"]),
])
def test_an_upward_import_is_reported(source, expected):
    assert upward(source) == expected


def test_a_cycle_is_reported():
    edges = {"chatforge.continual": [(1, "chatforge.pipeline")], "chatforge.pipeline": [(9, "chatforge.continual")],
             "chatforge.files": []}
    assert cycles(edges) == [["chatforge.continual", "chatforge.pipeline"]]
