"""`chatforge data build`: documents in, a clean, PII-scrubbed, deduplicated corpus out.

    chatforge data build --input examples/my_docs --out runs/demo/data
    chatforge data build                     # the fetched default sources in the cache

    from chatforge.data.build import build
    report = build([Path("examples/my_docs")], Path("runs/demo/data"))

Every document streams through: read (sources.py) -> normalise -> PII scrub -> split into
passages of at most --chunk-chars (by paragraph groups, preferring section breaks) -> quality
filters -> exact dedup -> near dedup (MinHash LSH) -> written. Q&A pairs and conversations are
normalised and scrubbed turn by turn and deduplicated on their (normalised) user turns. Only
hashes and signatures stay in memory.

Conversations (CSV transcripts, JSONL "messages") are cleaned first, by the transcript rules
(transcripts.py; the built-in rule file plus --transcript-rules FILE): platform speakers'
rows, platform lines, auto-replies, signatures and quoted earlier messages go; then empty,
spam, test and question-less conversations are dropped (--keep-conversations keeps them for
inspection); the report counts every rule and reason.

The output folder (written to a temporary folder and renamed at the end, so an error leaves
the old one untouched) holds:

    corpus.jsonl             {"text", "source"} a line: every kept passage
    train.jsonl / val.jsonl  the corpus split by a seeded hash of each text (--val-fraction)
    qa.jsonl                 {"messages": [{"role", "content"}, ...], "source"} a line
    qa_train.jsonl / qa_val.jsonl   the same split of qa.jsonl (hash of the user turns)
    report.json              counts per source, per filter, PII per type, dedup, transcript
                             rules and dropped conversations, sizes, seconds

The split depends only on each item's own text and --seed, so adding a document never moves
another across it. When a non-empty set would get no validation item at all (tiny inputs),
the item with the smallest hash goes to validation so later stages always have one.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from chatforge.data.clean import FILTERS, PII_TYPES, FilterConfig, check_quality, normalize, scrub_pii
from chatforge.data.dedup import ExactDedup, NearDedup, normalize_key
from chatforge.data.sources import Document, InputFile, iter_files, read_file
from chatforge.data.transcripts import (TranscriptRules, TranscriptStats, clean_conversation,
                                       format_transcripts, load_rules)
from chatforge.errors import ChatforgeError
from chatforge.files import atomic_dir, cache_dir

# Fetched sources kept out of the default corpus (the project's brief): git-faq is held out
# and vader is sentiment data for the classifier, not support text.
DEFAULT_EXCLUDED = ("git-faq", "vader")


def default_cache(cache: str | os.PathLike | None = None) -> Path:
    """--cache, else the cache `chatforge data fetch` uses."""
    return Path(cache).expanduser() if cache else cache_dir()


def default_inputs(cache: str | os.PathLike | None = None) -> list[Path]:
    """The fetched text sources in the cache, minus `DEFAULT_EXCLUDED` and model sources (a
    fetched GGUF is a model to import, not text), sorted by name."""
    root = default_cache(cache) / "sources"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if (p / "SOURCE.json").is_file() and p.name not in DEFAULT_EXCLUDED
                  and _source_kind(p) != "model")


def _source_kind(folder: Path) -> str | None:
    try:
        return json.loads((folder / "SOURCE.json").read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


# --------------------------------------------------------------------------- passages

def split_chunks(text: str, max_chars: int) -> list[str]:
    """Split a long text into passages of at most `max_chars` at paragraph boundaries.

    A new passage starts early at a heading-like paragraph (a short single line) once the
    current one is half full, so passages tend to follow sections. A paragraph longer than
    `max_chars` is split between lines; a single line longer than that stays whole (and the
    too_long filter decides). A short tail is merged into the passage before it.
    """
    if max_chars <= 0 or len(text) <= max_chars:
        return [text]
    chunks: list[str] = []
    cur: list[str] = []
    size = 0

    def flush() -> None:
        nonlocal cur, size
        if cur:
            chunks.append("\n\n".join(cur))
        cur, size = [], 0

    for para in text.split("\n\n"):
        pieces = [para]
        if len(para) > max_chars:
            flush()
            pieces, part, n = [], [], 0
            for line in para.split("\n"):
                if part and n + len(line) + 1 > max_chars:
                    pieces.append("\n".join(part))
                    part, n = [], 0
                part.append(line)
                n += len(line) + 1
            pieces.append("\n".join(part))
        for piece in pieces:
            heading = "\n" not in piece and len(piece) < 80 and not piece.endswith((".", ":", ","))
            if cur and (size + len(piece) + 2 > max_chars or (heading and size > max_chars // 2)):
                flush()
            cur.append(piece)
            size += len(piece) + 2
    flush()
    if len(chunks) > 1 and len(chunks[-1]) < max_chars // 8:
        tail = chunks.pop()
        chunks[-1] += "\n\n" + tail
    return chunks


# --------------------------------------------------------------------------- split writer

class SplitWriter:
    """Writes items to ALL.jsonl and, by a seeded hash of a key, to train or val."""

    def __init__(self, folder: Path, name: str, train: str, val: str, fraction: float, seed: int) -> None:
        self.paths = {"all": folder / name, "train": folder / train, "val": folder / val}
        self.files = {k: open(p, "w", encoding="utf-8") for k, p in self.paths.items()}
        self.fraction = fraction
        self.seed_key = str(seed).encode()
        self.counts = Counter()
        self._lowest: tuple[float, int, str] | None = None  # (hash, train line number, line)

    def _unit(self, key: str) -> float:
        h = hashlib.blake2b(key.encode("utf-8"), digest_size=8, key=self.seed_key).digest()
        return int.from_bytes(h, "big") / 2**64

    def write(self, obj: dict, key: str) -> None:
        line = json.dumps(obj, ensure_ascii=False) + "\n"
        u = self._unit(key)
        part = "val" if u < self.fraction else "train"
        self.files["all"].write(line)
        self.files[part].write(line)
        if part == "train" and (self._lowest is None or u < self._lowest[0]):
            self._lowest = (u, self.counts["train"], line)
        self.counts["all"] += 1
        self.counts[part] += 1

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        if self.fraction > 0 and self.counts["val"] == 0 and self.counts["train"] >= 2 and self._lowest:
            _, skip, line = self._lowest
            kept = self.paths["train"].with_suffix(".tmp")
            with open(self.paths["train"], encoding="utf-8") as src, open(kept, "w", encoding="utf-8") as dst:
                for i, text in enumerate(src):
                    if i != skip:
                        dst.write(text)
            os.replace(kept, self.paths["train"])
            self.paths["val"].write_text(line, encoding="utf-8")
            self.counts["train"] -= 1
            self.counts["val"] += 1


# --------------------------------------------------------------------------- the build

class _Builder:
    """The streaming state of one build: dedup memories, writers and the report's counters."""

    def __init__(self, out: Path, opts: dict, rules: TranscriptRules, warn) -> None:
        self.opts = opts
        self.filters = FilterConfig(opts["min_chars"], opts["max_chars"], opts["min_alpha_ratio"],
                                    opts["max_dup_line_ratio"])
        self.corpus = SplitWriter(out, "corpus.jsonl", "train.jsonl", "val.jsonl", opts["val_fraction"], opts["seed"])
        self.qa = SplitWriter(out, "qa.jsonl", "qa_train.jsonl", "qa_val.jsonl", opts["val_fraction"], opts["seed"])
        self.exact = ExactDedup()
        self.near = NearDedup(opts["near_dup_threshold"], opts["num_perm"])
        self.qa_seen: set[bytes] = set()
        self.sources: dict[str, Counter] = {}
        self.filter_counts = {name: Counter(kept=0, removed=0) for name in (*FILTERS, "qa_empty")}
        self.pii: Counter = Counter({t: 0 for t in PII_TYPES})
        self.qa_duplicates = 0
        self.rules = rules
        self.transcripts = TranscriptStats(self.rules, opts["keep_conversations"])
        self.warn = warn

    def _clean(self, text: str) -> str:
        text, counts = scrub_pii(normalize(text))
        self.pii.update(counts)
        return text

    def add_file(self, f: InputFile) -> None:
        stats = self.sources.setdefault(f.label, Counter())
        stats["files"] += 1
        stats["bytes_in"] += f.size
        for doc in read_file(f, self.warn, is_platform=self.rules.platform_speaker):
            self.add(doc, stats)

    def add(self, doc: Document, stats: Counter) -> None:
        if doc.text.strip():
            for chunk in split_chunks(self._clean(doc.text), self.opts["chunk_chars"]):
                self._add_passage(chunk, doc.source, stats)
        for q, a in doc.pairs or ():
            self._add_conversation([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                   doc.source, stats, "pairs")
        if doc.messages:
            # The rules read normalised text (line ends, odd spaces) before PII is scrubbed, so a
            # quote header or a signature still looks like one.
            messages = [{**m, "content": normalize(m["content"])} for m in doc.messages]
            result = clean_conversation(messages, self.rules)
            if self.transcripts.add(result, f"{doc.source} {doc.ref}".strip()):
                self._add_conversation(result.messages, doc.source, stats, "conversations")

    def _add_passage(self, text: str, source: str, stats: Counter) -> None:
        rejected = check_quality(text, self.filters)
        for name in FILTERS:   # every filter before the rejecting one kept the passage
            if name == rejected:
                self.filter_counts[name]["removed"] += 1
                return
            self.filter_counts[name]["kept"] += 1
        if self.exact.seen(text) or self.near.seen(text):
            return
        self.corpus.write({"text": text, "source": source}, text)
        stats["documents"] += 1
        stats["bytes_out"] += len(text.encode("utf-8"))

    def _add_conversation(self, messages: list[dict], source: str, stats: Counter, kind: str) -> None:
        turns = []
        for m in messages:
            content = self._clean(m["content"]).strip()
            if content:
                turns.append({"role": m["role"], "content": content})
        roles = {m["role"] for m in turns}
        if "user" not in roles or "assistant" not in roles:
            self.filter_counts["qa_empty"]["removed"] += 1
            return
        self.filter_counts["qa_empty"]["kept"] += 1
        key = "\n".join(normalize_key(m["content"]) for m in turns if m["role"] == "user")
        digest = hashlib.blake2b(key.encode("utf-8"), digest_size=16).digest()
        if digest in self.qa_seen:
            self.qa_duplicates += 1
            return
        self.qa_seen.add(digest)
        self.qa.write({"messages": turns, "source": source}, key)
        stats[kind] += 1
        stats["bytes_out"] += sum(len(m["content"].encode("utf-8")) for m in turns)


def build(inputs: list[Path], out_dir: Path, *, val_fraction: float = 0.05, seed: int = 0,
          near_dup_threshold: float = 0.85, num_perm: int = 64, chunk_chars: int = 8000,
          min_chars: int = FilterConfig.min_chars, max_chars: int = FilterConfig.max_chars,
          min_alpha_ratio: float = FilterConfig.min_alpha_ratio,
          max_dup_line_ratio: float = FilterConfig.max_dup_line_ratio,
          transcript_rules: str | os.PathLike | None = None, keep_conversations: bool = False,
          progress: bool = True) -> dict:
    """Build the corpus and Q&A sets from `inputs` into `out_dir`; return the report.

    `transcript_rules`: a rule file added to the built-in transcript rules;
    `keep_conversations`: keep (still count) the conversations the spam, test and small-talk
    rules flag. Raises ChatforgeError for a missing input, malformed JSONL/CSV, a bad rule file,
    bad options or an empty result; `out_dir` is then left as it was.
    """
    opts = dict(val_fraction=val_fraction, seed=seed, near_dup_threshold=near_dup_threshold, num_perm=num_perm,
                chunk_chars=chunk_chars, min_chars=min_chars, max_chars=max_chars,
                min_alpha_ratio=min_alpha_ratio, max_dup_line_ratio=max_dup_line_ratio,
                transcript_rules=str(transcript_rules) if transcript_rules else None,
                keep_conversations=keep_conversations)
    _check_options(opts)
    rules = load_rules(opts["transcript_rules"])   # a bad rule file fails before any work
    start = time.perf_counter()
    quiet = not progress or os.environ.get("CHATFORGE_QUIET") == "1"
    warnings: list[str] = []

    def warn(message: str) -> None:
        warnings.append(message)
        tqdm.write(f"warning: {message}", file=sys.stderr)

    files = iter_files([Path(p) for p in inputs], warn)
    if not files:
        raise ChatforgeError(f"no readable files under {', '.join(map(str, inputs))}")
    total = sum(f.size for f in files)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        b = _Builder(tmp, opts, rules, warn)
        with tqdm(total=total, unit="B", unit_scale=True, desc="data build", file=sys.stderr,
                  disable=True if quiet else None) as bar:
            try:
                for f in files:
                    bar.set_postfix_str(f.source[-40:], refresh=False)
                    b.add_file(f)
                    bar.update(f.size)
            finally:
                b.corpus.close()
                b.qa.close()
        if b.corpus.counts["all"] == 0 and b.qa.counts["all"] == 0:
            raise ChatforgeError(
                f"nothing to write: no document or Q&A pair of {len(files)} input files survived cleaning "
                "and filtering; check the inputs (see the warnings) or lower --min-chars")
        if b.corpus.counts["all"] == 0:
            warn("the corpus is empty (only Q&A pairs were found): pretraining needs documents")
        seconds = time.perf_counter() - start
        report = _report(b, inputs, files, total, out_dir, tmp, opts, warnings, seconds)
        with open(tmp / "report.json", "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2, ensure_ascii=False)
            fh.write("\n")
    return report


def _check_options(o: dict) -> None:
    if not 0 <= o["val_fraction"] < 1:
        raise ChatforgeError(f"--val-fraction must be in [0, 1), got {o['val_fraction']}")
    if not 0 <= o["near_dup_threshold"] <= 1:
        raise ChatforgeError(f"--near-dup-threshold must be in [0, 1] (0 turns near-dedup off), "
                             f"got {o['near_dup_threshold']}")
    if not 16 <= o["num_perm"] <= 512:
        raise ChatforgeError(f"--num-perm must be between 16 and 512, got {o['num_perm']}")
    if o["chunk_chars"] and o["chunk_chars"] < 256:
        raise ChatforgeError(f"--chunk-chars must be 0 (no splitting) or at least 256, got {o['chunk_chars']}")
    if o["max_chars"] <= o["min_chars"]:
        raise ChatforgeError(f"--max-chars ({o['max_chars']}) must be larger than --min-chars ({o['min_chars']})")


def _report(b: _Builder, inputs, files, total: int, out_dir: Path, tmp: Path, opts: dict,
            warnings: list[str], seconds: float) -> dict:
    sizes = {p.name: p.stat().st_size for p in sorted(tmp.glob("*.jsonl"))}
    sources = {name: {k: s[k] for k in ("files", "documents", "pairs", "conversations", "bytes_in", "bytes_out")}
               for name, s in sorted(b.sources.items())}
    return {
        "inputs": [str(p) for p in inputs],
        "out": str(out_dir),
        "options": opts,
        "files": len(files),
        "bytes_in": total,
        "sources": sources,
        "filters": {k: dict(v) for k, v in b.filter_counts.items()},
        "pii": dict(b.pii),
        "dedup": {"exact_documents": b.exact.removed, "near_documents": b.near.removed,
                  "qa": b.qa_duplicates},
        "transcripts": b.transcripts.report(),
        "outputs": {"corpus": b.corpus.counts["all"], "train": b.corpus.counts["train"],
                    "val": b.corpus.counts["val"], "qa": b.qa.counts["all"],
                    "qa_train": b.qa.counts["train"], "qa_val": b.qa.counts["val"]},
        "sizes": sizes,
        "warnings": warnings,
        "seconds": round(seconds, 3),
        "mb_per_s": round(total / 1e6 / seconds, 3) if seconds > 0 else None,
    }


def format_summary(report: dict) -> str:
    """A readable summary of a build report: sources, filters, PII, dedup, outputs."""
    mb = 1e6
    lines = [f"{'source':<24} {'files':>6} {'passages':>9} {'pairs':>7} {'convs':>7} {'MB in':>8} {'MB out':>8}"]
    for name, s in report["sources"].items():
        lines.append(f"{name[:24]:<24} {s['files']:>6} {s['documents']:>9} {s['pairs']:>7} {s['conversations']:>7} "
                     f"{s['bytes_in'] / mb:>8.2f} {s['bytes_out'] / mb:>8.2f}")
    lines += ["", f"{'filter':<24} {'kept':>9} {'removed':>9}"]
    for name, c in report["filters"].items():
        lines.append(f"{name:<24} {c['kept']:>9} {c['removed']:>9}")
    lines += ["", "PII replaced: " + ", ".join(f"{k} {v}" for k, v in report["pii"].items())]
    d = report["dedup"]
    lines.append(f"duplicates removed: {d['exact_documents']} exact and {d['near_documents']} near passages, "
                 f"{d['qa']} Q&A")
    lines += format_transcripts(report["transcripts"])
    o = report["outputs"]
    lines.append(f"corpus: {o['corpus']} passages (train {o['train']}, val {o['val']}), "
                 f"{report['sizes'].get('corpus.jsonl', 0) / mb:.2f} MB; "
                 f"qa: {o['qa']} (train {o['qa_train']}, val {o['qa_val']})")
    lines.append(f"{report['bytes_in'] / mb:.1f} MB in {report['seconds']:.1f} s "
                 f"({report['mb_per_s']} MB/s) -> {report['out']}")
    if report["warnings"]:
        lines.append(f"{len(report['warnings'])} warnings (see report.json)")
    return "\n".join(lines)
