"""What a core install (`pip install chatforge`, `make demo`) imports is what it installs.

Every import at the top of a module in src/chatforge must be the standard library, chatforge
itself, or a distribution the core dependencies in pyproject.toml bring (directly or through
their own requirements). An extra's library (psycopg, transformers, ...) may only be imported
inside a function, on the path that needs it. `chatforge serve` once imported httpx at the top
while httpx came only with the dev extra: on a `make demo` install the server did not start.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "chatforge"


def requirement_name(req: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def closure(names: list[str]) -> set[str]:
    """The distributions `names` need, their requirements included (markers for extras skipped)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [requirement_name(r) for r in requires if "extra ==" not in r]
    return seen


def top_level_imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level module) of the imports a module runs when it is imported: those in its
    body, in try/if blocks at module level, not in functions or classes' methods."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    out: list[tuple[int, str]] = []

    def visit(nodes, guarded: bool) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                out.extend((node.lineno, a.name.split(".")[0]) for a in node.names if not guarded)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and not guarded:
                out.append((node.lineno, node.module.split(".")[0]))
            elif isinstance(node, ast.Try):
                # `try: import x / except ImportError:` is an optional import by construction.
                optional = any(isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                               for h in node.handlers)
                visit(node.body, guarded or optional)
                for h in node.handlers:
                    visit(h.body, guarded)
            elif isinstance(node, ast.If):
                typing_only = getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING"
                visit(node.body, guarded or typing_only)
                visit(node.orelse, guarded)
            elif isinstance(node, ast.ClassDef):
                visit(node.body, guarded)

    visit(tree.body, False)
    return out


def test_top_level_imports_come_with_the_core_install():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = closure([requirement_name(r) for r in project["dependencies"]])
    provides = metadata.packages_distributions()      # module -> distributions
    missing = []
    for path in sorted(SRC.rglob("*.py")):
        for line, module in top_level_imports(path):
            if module == "chatforge" or module in sys.stdlib_module_names or module == "__future__":
                continue
            dists = {d.lower().replace("_", "-") for d in provides.get(module, [])}
            if not dists & core:
                missing.append(f"{path.relative_to(ROOT)}:{line} imports {module} "
                               f"({', '.join(sorted(dists)) or 'not installed'}), not a core dependency")
    assert missing == []


def test_the_check_sees_an_extra_imported_at_the_top(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import os\nimport psycopg\ntry:\n    import onnxruntime\nexcept ImportError:\n    pass\n"
                      "def f():\n    import transformers\n")
    assert top_level_imports(module) == [(1, "os"), (2, "psycopg")]
