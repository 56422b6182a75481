"""Readers: turn input files and folders into `Document`s for `chatforge data build`.

    from chatforge.data.sources import read_documents
    for doc in read_documents([Path("examples/my_docs")]):
        print(doc.source, doc.kind, len(doc.text), len(doc.pairs or ()))

Accepted inputs (folders are walked in sorted order; hidden files, SOURCE.json and licence
files are skipped; `NAME.gz` is read as NAME):

    .txt, extension-less text  plain text
    .md / .markdown            Markdown          (markup stripped lightly, see clean.py)
    .rst, .rst.txt             reStructuredText
    .html, .htm, .xhtml        HTML              (visible text only; no scripts or styles)
    .pod                       Perl POD
    .jsonl                     one JSON object a line, the first that fits of:
                               {"messages": [{"role", "content"}, ...]}  a conversation
                               {"prompt": str, "completion": str}        a Q&A pair
                               {"prompt": [msgs], "completion": [msgs]}  a conversation
                               {"question": str, "answer": str}          a Q&A pair
                               {"text": str}                             a document
    .csv, .tsv                 a header row, then either
                               question + answer columns (also q/a, prompt/response...)
                               -> Q&A pairs, or
                               role/speaker + text/message columns, optionally a
                               conversation id (conversation_id, session, thread, ticket...)
                               -> one conversation per id (the whole file when there is none),
                               one message a row, each with its "speaker" as written.
                               Speakers named customer/user/client/... are the user,
                               agent/support/assistant/bot/... the assistant, system the system;
                               other names: the first one seen in a conversation is the user, the
                               rest the assistant. `chatforge data build` passes `is_platform`
                               (its transcript speaker rules): such speakers (system, bot, ...)
                               get the system role and do not count as the first speaker; the
                               build drops them and merges consecutive turns (transcripts.py).

Text documents are also offered to `chatforge.data.faq.extract_pairs`; a FAQ comes back as
kind "faq" with its Q&A pairs. Each document's `source` is "<source name>/<relative path>": the
source name is a fetched folder's SOURCE.json `name`, else the input folder's name (a single
file input is its own source). Unreadable, binary and unsupported files are skipped with a
warning; malformed JSONL/CSV content is a `ChatforgeError` naming the file and line.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from chatforge.data.clean import strip_markup
from chatforge.data.faq import extract_pairs
from chatforge.errors import ChatforgeError

Warn = Callable[[str], None]
IsPlatform = Callable[[str], object] | None   # speaker name -> truthy for a platform speaker
ROLES = ("system", "user", "assistant")
_SUFFIXES = {".txt": "txt", ".text": "txt", ".md": "md", ".markdown": "md", ".rst": "rst",
             ".html": "html", ".htm": "html", ".xhtml": "html", ".pod": "pod",
             ".jsonl": "jsonl", ".csv": "csv", ".tsv": "csv"}
_SKIP_NAMES = ("source.json", "license", "licence", "copying", "copyright", "notice")


@dataclass
class Document:
    """One unit of input: prose (`text`), Q&A `pairs`, or a conversation (`messages`).

    kind: "text" (prose only), "faq" (prose and its pairs), "pairs" (pairs only) or
    "conversation" (`messages`, a list of {"role", "content"} dicts, from a CSV transcript one a
    row with the row's "speaker" too; `text` is empty).
    """

    text: str
    source: str
    kind: str = "text"
    pairs: list[tuple[str, str]] | None = None
    messages: list[dict] | None = None
    label: str = ""   # the source name, for counts per source
    ref: str = ""     # where a conversation is inside its file: "id 1006" (CSV) or "line 12" (JSONL)


@dataclass(frozen=True)
class InputFile:
    path: Path
    label: str     # source name
    source: str    # "<label>/<relative path>"
    size: int


def _warn_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def file_format(name: str) -> str | None:
    """The reader for a file name ("txt", "md", "rst", "html", "pod", "jsonl", "csv"), or None."""
    name = name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith(".rst.txt"):
        return "rst"
    suffix = os.path.splitext(name)[1]
    if not suffix:
        return "txt"  # README, fortunes, jargon...: sniffed for binary content when read
    return _SUFFIXES.get(suffix)


def _source_label(folder: Path) -> str:
    meta = folder / "SOURCE.json"
    if meta.is_file():
        try:
            name = json.loads(meta.read_text(encoding="utf-8")).get("name")
            if isinstance(name, str) and name:
                return name
        except (OSError, ValueError, AttributeError):
            pass
    return folder.resolve().name or "input"


def file_stats(paths: Sequence[Path]) -> list[list]:
    """[path, size, mtime_ns] of every file `read_documents(paths)` reads: what a cache built
    from them (a passage index, a pipeline stage) depends on."""
    out = []
    for f in iter_files(list(paths), warn=lambda m: None):
        st = f.path.stat()
        out.append([str(f.path.resolve()), st.st_size, st.st_mtime_ns])
    return out


def iter_files(paths: list[Path], warn: Warn = _warn_stderr) -> list[InputFile]:
    """Every readable input file under `paths`, in a deterministic order.

    A folder holding SOURCE.json (a fetched source) is its own source, also when it sits
    inside a folder given as input. Files of unsupported types are skipped with one warning.
    """
    files: list[InputFile] = []
    unsupported: Counter = Counter()
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise ChatforgeError(f"input {raw} does not exist; pass files or folders to --input")
        if path.is_file():
            if file_format(path.name) is None:
                raise ChatforgeError(f"input {raw}: unsupported file type; accepted: "
                                     + ", ".join(sorted(_SUFFIXES)) + ", .rst.txt, .gz of these")
            files.append(InputFile(path, path.name, path.name, path.stat().st_size))
            continue
        roots = {path: _source_label(path)}
        for dirpath, dirnames, filenames in os.walk(path):
            here = Path(dirpath)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for d in dirnames:
                if (here / d / "SOURCE.json").is_file():
                    roots[here / d] = _source_label(here / d)
            root = next(r for r in (here, *here.parents) if r in roots)
            for name in sorted(filenames):
                if name.startswith(".") or name.lower().startswith(_SKIP_NAMES):
                    continue
                fmt = file_format(name)
                if fmt is None:
                    unsupported[os.path.splitext(name)[1].lower()] += 1
                    continue
                p = here / name
                try:
                    size = p.stat().st_size
                except OSError as e:
                    warn(f"{p}: cannot read ({e.strerror}); skipped")
                    continue
                rel = p.relative_to(root).as_posix()
                files.append(InputFile(p, roots[root], f"{roots[root]}/{rel}", size))
    if unsupported:
        kinds = ", ".join(f"{ext}: {n}" for ext, n in sorted(unsupported.items()))
        warn(f"skipped {sum(unsupported.values())} files of unsupported types ({kinds})")
    return files


def _read_text(f: InputFile, warn: Warn) -> str | None:
    """The file's text, or None (with a warning) when it is unreadable or binary."""
    try:
        data = f.path.read_bytes()
        if f.path.name.lower().endswith(".gz"):
            data = gzip.decompress(data)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        warn(f"{f.path}: cannot read ({getattr(e, 'strerror', None) or e}); skipped")
        return None
    if b"\x00" in data[:8192]:
        warn(f"{f.path}: binary file, skipped")
        return None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    text = data.decode("cp1252", errors="replace")
    # Text in a legacy encoding has few control characters; a binary file has many.
    controls = sum(1 for c in text[:8192] if ord(c) < 32 and c not in "\n\r\t\f") + text[:8192].count("\ufffd")
    if controls > len(text[:8192]) * 0.01:
        warn(f"{f.path}: not text (binary content), skipped")
        return None
    warn(f"{f.path}: not UTF-8; read as Windows-1252/Latin-1")
    return text


# --------------------------------------------------------------------------- FAQ hook

def faq_pairs(path: Path, text: str, warn: Warn = _warn_stderr) -> list[tuple[str, str]] | None:
    """The Q&A pairs of a FAQ file via `chatforge.data.faq.extract_pairs`, or None.

    A parser failure on one file is a warning, not the end of the build.
    """
    try:
        return extract_pairs(path, text)
    except Exception as e:  # noqa: BLE001 - one odd file must not stop a whole build
        warn(f"{path}: FAQ parsing failed ({type(e).__name__}: {e}); read as plain text")
        return None


# --------------------------------------------------------------------------- readers

def _read_markup(f: InputFile, text: str, fmt: str, warn: Warn) -> Iterator[Document]:
    pairs = faq_pairs(f.path, text, warn)   # from the raw text: FAQ formats live in the markup
    plain = strip_markup(text, fmt)
    if pairs:
        # extract_pairs returns plain text already (its contract); stripping again could eat
        # code such as a Perl answer that starts with "use strict;".
        yield Document(plain, f.source, "faq", pairs=list(pairs), label=f.label)
    else:
        yield Document(plain, f.source, "text", label=f.label)


_JSONL_EXPECTED = 'expected a JSON object with "text", "messages", "prompt"/"completion" or "question"/"answer"'
_MESSAGES_EXPECTED = '"messages" must be a list of {"role": "system"|"user"|"assistant", "content": str}'


def _check_messages(msgs: object, where: str) -> list[dict]:
    if not isinstance(msgs, list) or not msgs:
        raise ChatforgeError(f"{where}: {_MESSAGES_EXPECTED}")
    out = []
    for m in msgs:
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise ChatforgeError(f"{where}: {_MESSAGES_EXPECTED}; got {json.dumps(m)[:80]}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _jsonl_lines(f: InputFile, warn: Warn) -> Iterator[tuple[int, str]]:
    """(line number, line) of a JSONL file, streamed: data files can be hundreds of MB."""
    opener = gzip.open if f.path.name.lower().endswith(".gz") else open
    try:
        with opener(f.path, "rb") as fh:
            if b"\x00" in fh.peek(8192)[:8192]:
                warn(f"{f.path}: binary file, skipped")
                return
            for lineno, raw in enumerate(fh, 1):
                try:
                    yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError:
                    raise ChatforgeError(f"{f.path}:{lineno}: not UTF-8 text; JSONL files must be UTF-8") from None
    except (OSError, EOFError) as e:
        warn(f"{f.path}: cannot read ({getattr(e, 'strerror', None) or e}); skipped")


def _read_jsonl(f: InputFile, warn: Warn) -> Iterator[Document]:
    for lineno, line in _jsonl_lines(f, warn):
        if not line.strip():
            continue
        where = f"{f.path}:{lineno}"
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise ChatforgeError(f"{where}: not valid JSON ({e.msg}); {_JSONL_EXPECTED}") from None
        if not isinstance(obj, dict):
            raise ChatforgeError(f"{where}: {_JSONL_EXPECTED}")
        if "messages" in obj:
            yield Document("", f.source, "conversation", messages=_check_messages(obj["messages"], where),
                           label=f.label, ref=f"line {lineno}")
        elif "prompt" in obj and "completion" in obj:
            p, c = obj["prompt"], obj["completion"]
            if isinstance(p, str) and isinstance(c, str):
                yield Document("", f.source, "pairs", pairs=[(p, c)], label=f.label)
            elif isinstance(p, list) and isinstance(c, list):
                msgs = _check_messages(p + c, where)
                yield Document("", f.source, "conversation", messages=msgs, label=f.label, ref=f"line {lineno}")
            else:
                raise ChatforgeError(f'{where}: "prompt" and "completion" must both be strings or both message lists')
        elif "question" in obj and "answer" in obj:
            q, a = obj["question"], obj["answer"]
            if not (isinstance(q, str) and isinstance(a, str)):
                raise ChatforgeError(f'{where}: "question" and "answer" must be strings')
            yield Document("", f.source, "pairs", pairs=[(q, a)], label=f.label)
        elif "text" in obj:
            if not isinstance(obj["text"], str):
                raise ChatforgeError(f'{where}: "text" must be a string')
            yield Document(obj["text"], f.source, "text", label=f.label)
        else:
            raise ChatforgeError(f"{where}: {_JSONL_EXPECTED}; got keys {sorted(obj)[:6]}")


# CSV header names, lower-cased with spaces/dashes as underscores.
_CSV_QUESTION = ("question", "q", "prompt", "query", "input")
_CSV_ANSWER = ("answer", "a", "response", "completion", "reply", "output")
_CSV_ROLE = ("role", "speaker", "author", "from", "sender", "who", "participant", "speaker_role")
_CSV_TEXT = ("text", "message", "content", "body", "utterance", "msg", "value", "message_text")
_CSV_CONV = ("conversation_id", "conversation", "conv_id", "session", "session_id", "thread",
             "thread_id", "ticket", "ticket_id", "chat_id", "chat", "dialog_id", "dialogue_id")
_USER_WORDS = frozenset("user customer client visitor human caller guest member buyer requester".split())
_ASSISTANT_WORDS = frozenset("assistant agent support bot staff operator rep representative advisor "
                             "helpdesk technician engineer ai".split())


def _column(header: list[str], names: tuple[str, ...]) -> int | None:
    for name in names:
        if name in header:
            return header.index(name)
    return None


def _csv_role(speaker: str, seen: dict[str, str], is_platform: IsPlatform = None) -> str:
    words = set(speaker.lower().replace("_", " ").replace("-", " ").split())
    if "system" in words or (is_platform is not None and is_platform(speaker)):
        return "system"
    if words & _ASSISTANT_WORDS:
        return "assistant"
    if words & _USER_WORDS:
        return "user"
    # Named people: the first one to speak opened the chat, so they are the customer.
    if speaker not in seen:
        seen[speaker] = "user" if "user" not in seen.values() else "assistant"
    return seen[speaker]


def _read_csv(f: InputFile, text: str, is_platform: IsPlatform = None) -> Iterator[Document]:
    first = text.split("\n", 1)[0]
    # The header's most frequent candidate separator is the delimiter (.tsv: always a tab).
    delimiter = "\t" if f.path.name.lower().removesuffix(".gz").endswith(".tsv") else \
        max(",;\t|", key=first.count)
    rows = csv.reader(io.StringIO(text), delimiter=delimiter)
    try:
        header = [h.strip().lower().replace(" ", "_").replace("-", "_") for h in next(rows)]
    except StopIteration:
        return
    q_col, a_col = _column(header, _CSV_QUESTION), _column(header, _CSV_ANSWER)
    r_col, t_col, c_col = _column(header, _CSV_ROLE), _column(header, _CSV_TEXT), _column(header, _CSV_CONV)
    if r_col is not None and t_col is not None:
        mode = "chat"
    elif q_col is not None and a_col is not None:
        mode = "qa"
    else:
        raise ChatforgeError(
            f"{f.path}:1: CSV header {header} not recognised; expected question,answer columns "
            "or role/speaker + text/message columns (optionally conversation_id)")
    pairs: list[tuple[str, str]] = []
    chats: dict[str, list[dict]] = {}
    speakers: dict[str, dict[str, str]] = {}
    used = (q_col, a_col) if mode == "qa" else (r_col, t_col, c_col)
    need = max(c for c in used if c is not None)
    try:
        for lineno, row in enumerate(rows, 2):
            if not any(cell.strip() for cell in row):
                continue
            if len(row) <= need:
                raise ChatforgeError(f"{f.path}:{lineno}: expected {len(header)} columns, got {len(row)}")
            if mode == "qa":
                pairs.append((row[q_col], row[a_col]))
                continue
            conv = row[c_col].strip() if c_col is not None else ""
            content = row[t_col]
            if not content.strip():
                continue
            speaker = row[r_col].strip()
            role = _csv_role(speaker, speakers.setdefault(conv, {}), is_platform)
            # One message a row: the build merges consecutive turns of one role once platform
            # rows and lines are gone (a transfer notice between two agent messages, say).
            chats.setdefault(conv, []).append({"role": role, "content": content, "speaker": speaker})
    except csv.Error as e:
        raise ChatforgeError(f"{f.path}:{rows.line_num}: malformed CSV ({e})") from None
    if mode == "qa":
        if pairs:
            yield Document("", f.source, "pairs", pairs=pairs, label=f.label)
        return
    for conv, turns in chats.items():
        yield Document("", f.source, "conversation", messages=turns, label=f.label,
                       ref=f"id {conv}" if conv else "")


def read_file(f: InputFile, warn: Warn = _warn_stderr, is_platform: IsPlatform = None) -> Iterator[Document]:
    """The documents of one input file (none, with a warning, when it cannot be read).

    `is_platform(speaker)`: which CSV transcript speakers are the chat platform (see above).
    """
    fmt = file_format(f.path.name)
    if fmt == "jsonl":
        yield from _read_jsonl(f, warn)
        return
    text = _read_text(f, warn)
    if text is None:
        return
    if fmt == "csv":
        yield from _read_csv(f, text, is_platform)
    else:
        yield from _read_markup(f, text, fmt or "txt", warn)


def read_documents(paths: list[Path], warn: Warn = _warn_stderr) -> Iterator[Document]:
    """Every document under `paths` (files or folders), in a deterministic order."""
    for f in iter_files(paths, warn):
        yield from read_file(f, warn)
