"""Token shards: a data folder's `train.jsonl` / `val.jsonl` as flat memory-mapped token files.

    from chatforge.data.shards import build_shards, load_tokens
    folder = build_shards("runs/demo/data", "runs/demo/tokenizer")   # cached after the first run
    train = load_tokens(folder, "train")                              # a read-only np.memmap

The folder `DATA/tokens-<tokenizer hash prefix>/` holds `train.bin` and `val.bin` (every
document's ids followed by the end-of-text id, back to back; uint16 while the vocabulary fits,
else uint32) and `meta.json` (dtype, token and document counts, and a fingerprint of the inputs:
the sizes and modification times of the .jsonl files and the hash of tokenizer.json). With an
unchanged fingerprint a second call is a cache hit. The folder is written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from chatforge import files
from chatforge.data.tokenizer import ChatTokenizer
from chatforge.errors import ChatforgeError

SPLITS = ("train", "val")
META = "meta.json"
FORMAT_VERSION = 1


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _inputs(data_dir: Path) -> dict[str, Path]:
    if not data_dir.is_dir():
        raise ChatforgeError(f"data folder {data_dir} does not exist; build it with `chatforge data build --out {data_dir}`")
    paths = {split: data_dir / f"{split}.jsonl" for split in SPLITS}
    for split, path in paths.items():
        if not path.is_file():
            raise ChatforgeError(f"{path} is missing; {data_dir} is not the output of `chatforge data build`")
        if path.stat().st_size == 0:
            raise ChatforgeError(f"{path} is empty; add documents to the corpus and rebuild it")
    return paths


def fingerprint(data_dir: Path, tokenizer_dir: Path) -> dict:
    """What the shards depend on: input sizes + mtimes and the tokenizer's exact file contents."""
    tok_file = Path(tokenizer_dir) / "tokenizer.json"
    if not tok_file.is_file():
        raise ChatforgeError(f"{tok_file} is missing; train one with `chatforge tokenizer train`")
    inputs = {split: {"size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns}
              for split, p in _inputs(Path(data_dir)).items()}
    return {"version": FORMAT_VERSION, "inputs": inputs, "tokenizer_sha256": _sha256(tok_file)}


def _texts(path: Path, bar: tqdm) -> Iterator[str]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            bar.update(len(raw))
            if not raw.strip():
                continue
            try:
                text = json.loads(raw)["text"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                raise ChatforgeError(f"{path}:{lineno}: expected a JSON object with a \"text\" field; "
                                     "rebuild the corpus with `chatforge data build`") from None
            if text:
                yield text


def _tokenize_file(src: Path, dst: Path, tokenizer, dtype: np.dtype, chunk_lines: int) -> dict:
    """Stream `src` through the tokenizer into `dst`; returns the token and document counts."""
    n_tokens = n_docs = 0
    eot = tokenizer.eot_id
    with open(dst, "wb") as out, tqdm(total=src.stat().st_size, unit="B", unit_scale=True,
                                      desc=f"tokenize {src.name}", disable=None) as bar:
        chunk: list[str] = []

        def flush() -> None:
            nonlocal n_tokens, n_docs
            # One flat array per chunk: each document's ids then the end-of-text id.
            ids = [tok for doc in tokenizer.encode_batch(chunk) for tok in (*doc, eot)]
            np.asarray(ids, dtype=dtype).tofile(out)
            n_tokens += len(ids)
            n_docs += len(chunk)
            chunk.clear()

        for text in _texts(src, bar):
            chunk.append(text)
            if len(chunk) >= chunk_lines:
                flush()
        if chunk:
            flush()
    return {"tokens": n_tokens, "documents": n_docs}


def build_shards(data_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike,
                 chunk_lines: int = 512, tokenizer=None) -> Path:
    """Tokenize the data folder into `DATA/tokens-<hash>/` (a cache hit if nothing changed)."""
    data_dir, tokenizer_dir = Path(data_dir), Path(tokenizer_dir)
    fp = fingerprint(data_dir, tokenizer_dir)
    out = data_dir / f"tokens-{fp['tokenizer_sha256'][:12]}"
    meta_path = out / META
    if meta_path.is_file():
        try:
            meta = files.read_json(meta_path)
        except (json.JSONDecodeError, OSError):
            meta = {}
        sizes_ok = all((out / f"{s}.bin").is_file() and (out / f"{s}.bin").stat().st_size
                       == meta["splits"][s]["tokens"] * np.dtype(meta["dtype"]).itemsize
                       for s in SPLITS) if meta.get("splits") else False
        if meta.get("fingerprint") == fp and sizes_ok:
            return out
    if tokenizer is None:
        tokenizer = ChatTokenizer.load(tokenizer_dir)
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2 ** 16 else np.uint32)
    inputs = _inputs(data_dir)
    with files.atomic_dir(out) as tmp:
        splits = {s: _tokenize_file(inputs[s], tmp / f"{s}.bin", tokenizer, dtype, chunk_lines) for s in SPLITS}
        for s, counts in splits.items():
            if counts["documents"] == 0:
                raise ChatforgeError(f"{inputs[s]} has no documents with text; rebuild the corpus")
        files.write_json(tmp / META, {"dtype": dtype.name, "vocab_size": tokenizer.vocab_size,
                                      "eot_id": tokenizer.eot_id, "splits": splits, "fingerprint": fp})
    return out


def load_meta(folder: str | os.PathLike) -> dict:
    path = Path(folder) / META
    if not path.is_file():
        raise ChatforgeError(f"{path} is missing; build the shards with build_shards")
    return files.read_json(path)


def load_tokens(folder: str | os.PathLike, split: str) -> np.memmap:
    """The split's tokens as a read-only memory map (nothing is read until used)."""
    meta = load_meta(folder)
    path = Path(folder) / f"{split}.bin"
    return np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r", shape=(meta["splits"][split]["tokens"],))
