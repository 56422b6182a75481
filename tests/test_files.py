"""Atomic writes: a failure leaves the previous file or folder exactly as it was."""

import os

import pytest

from chatforge import files


def test_atomic_open_replaces_whole_file(tmp_path):
    p = tmp_path / "a.txt"
    files.write_text(p, "old")
    files.write_text(p, "new")
    assert p.read_text() == "new"
    assert [x.name for x in tmp_path.iterdir()] == ["a.txt"]


def test_atomic_open_failure_keeps_previous(tmp_path):
    p = tmp_path / "a.txt"
    files.write_text(p, "old")
    with pytest.raises(RuntimeError):
        with files.atomic_open(p) as f:
            f.write("half")
            raise RuntimeError("disk full")
    assert p.read_text() == "old"
    assert [x.name for x in tmp_path.iterdir()] == ["a.txt"]


def test_atomic_dir_failure_keeps_previous(tmp_path):
    out = tmp_path / "out"
    with files.atomic_dir(out) as d:
        (d / "x").write_text("1")
    with pytest.raises(ValueError):
        with files.atomic_dir(out) as d:
            (d / "x").write_text("2")
            raise ValueError("bad input")
    assert (out / "x").read_text() == "1"
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_atomic_dir_replaces(tmp_path):
    out = tmp_path / "out"
    with files.atomic_dir(out) as d:
        (d / "x").write_text("1")
    with files.atomic_dir(out) as d:
        (d / "y").write_text("2")
    assert sorted(os.listdir(out)) == ["y"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_written_files_have_ordinary_permissions(tmp_path):
    import os

    mask = os.umask(0o022)
    try:
        files.write_text(tmp_path / "a.txt", "x")
        with files.atomic_dir(tmp_path / "d") as d:
            (d / "f").write_text("y")
    finally:
        os.umask(mask)
    # Not mkstemp's private 0600: other users and tools may read what chatforge writes.
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


def test_read_parsed_names_the_bad_line_and_an_empty_file(tmp_path):
    """`files.read_parsed` (preference pairs, KTO rows, PPO prompts): items in order, blank lines
    skipped, the parser's ValueError as file:line, and a file with no line says what it should hold."""
    from chatforge.errors import ChatforgeError

    def parse(obj):
        if not isinstance(obj.get("n"), int):
            raise ValueError('"n" must be an integer')
        return obj["n"] * 2

    p = tmp_path / "items.jsonl"
    p.write_text('{"n": 1}\n\n{"n": 4}\n', encoding="utf-8")
    assert files.read_parsed(p, parse, "numbers", "write one {\"n\": 1} a line") == [2, 8]
    p.write_text('{"n": 1}\n{"n": "x"}\n', encoding="utf-8")
    with pytest.raises(ChatforgeError, match=r"items.jsonl:2: \"n\" must be an integer"):
        files.read_parsed(p, parse, "numbers", "hint")
    p.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ChatforgeError, match=r"items.jsonl holds no numbers; write one"):
        files.read_parsed(p, parse, "numbers", "write one {\"n\": 1} a line")
