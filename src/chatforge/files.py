"""Atomic file and folder writes: a crash never leaves a half-written output; and where
chatforge's cache folder is (`cache_dir`).

Everything chatforge writes for later stages goes through here: write to a temporary name in
the same folder, fsync, then rename over the final name (rename is atomic on POSIX).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from chatforge.errors import ChatforgeError


def cache_dir(*parts: str) -> Path:
    """chatforge's cache folder, `$CHATFORGE_CACHE`, else `~/.cache/chatforge` (downloads, fetched
    sources, passage indexes, benchmark files); with `parts`, that path inside it. Nothing is
    created. Every default cache location is computed here, so the variable moves all of them."""
    env = os.environ.get("CHATFORGE_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "chatforge"
    return root.joinpath(*parts)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[Any]:
    """Open a temporary file beside `path`; on success fsync and rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the output is an ordinary file
    if "b" in mode:
        encoding = None
    try:
        with open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def iter_jsonl(path: str | os.PathLike, missing_hint: str = "") -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) for every non-blank line; a bad line is a ChatforgeError
    naming the file and line, so callers only check the shape of each object."""
    path = Path(path)
    if not path.is_file():
        raise ChatforgeError(f"{path} does not exist" + (f"; {missing_hint}" if missing_hint else ""))
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise ChatforgeError(f"{path}:{lineno}: not valid JSON ({e.msg}); fix or delete the line") from None


def read_parsed(path: str | os.PathLike, parse: Callable[[Any], Any], what: str, hint: str) -> list:
    """`parse(object)` of every non-blank line of a JSONL file: a ValueError from `parse` is a
    ChatforgeError naming file:line, and a file without a line is one naming `what` it should hold
    and `hint` (how to make one)."""
    out = []
    for lineno, obj in iter_jsonl(path, hint):
        try:
            out.append(parse(obj))
        except ValueError as e:
            raise ChatforgeError(f"{path}:{lineno}: {e}") from None
    if not out:
        raise ChatforgeError(f"{path} holds no {what}; {hint}")
    return out


def read_yaml_mapping(path: str | os.PathLike, expected: str) -> dict:
    """A YAML file that must hold a mapping; `expected` says what the mapping should contain."""
    p = Path(path)
    if not p.is_file():
        raise ChatforgeError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ChatforgeError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ChatforgeError(f"{path}: expected {expected}, got {type(data).__name__}")
    return data


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `final`; on success it replaces `final`.

    On any error the temporary folder is removed and `final` is left exactly as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the output is an ordinary folder
    try:
        yield tmp
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        if final.exists():
            if not replace:
                raise FileExistsError(final)
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
