"""Token shards: exact round trip, dtype, cache hits and rebuilds, bad input."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _pretrain_fixtures import make_data, make_tokenizer  # noqa: E402

from chatforge.data.shards import build_shards, load_meta, load_tokens  # noqa: E402
from chatforge.errors import ChatforgeError  # noqa: E402


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    make_tokenizer(folder, vocab_size=400)
    return folder


def read_docs(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


def test_shards_hold_every_document_then_end_of_text(tmp_path, tok_dir):
    from chatforge.data.tokenizer import ChatTokenizer

    data = make_data(tmp_path / "data", max_chars=30_000)
    folder = build_shards(data, tok_dir, chunk_lines=7)   # several chunks
    tok = ChatTokenizer.load(tok_dir)
    assert folder.parent == data and folder.name.startswith("tokens-")
    meta = load_meta(folder)
    assert meta["dtype"] == "uint16" and meta["eot_id"] == tok.eot_id
    for split in ("train", "val"):
        ids = load_tokens(folder, split)
        assert ids.dtype == np.uint16 and len(ids) == meta["splits"][split]["tokens"]
        docs = read_docs(data / f"{split}.jsonl")
        assert meta["splits"][split]["documents"] == len(docs)
        ends = np.flatnonzero(ids == tok.eot_id)
        assert len(ends) == len(docs) and ends[-1] == len(ids) - 1
        starts = [0, *(ends[:-1] + 1)]
        assert [tok.decode(ids[s:e].tolist()) for s, e in zip(starts, ends)] == docs


def test_second_build_is_a_cache_hit_and_a_changed_input_rebuilds(tmp_path, tok_dir):
    data = make_data(tmp_path / "data", max_chars=20_000)
    folder = build_shards(data, tok_dir)
    stamp = (folder / "train.bin").stat().st_mtime_ns
    assert build_shards(data, tok_dir) == folder
    assert (folder / "train.bin").stat().st_mtime_ns == stamp
    with open(data / "train.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"text": "One more document about support.", "source": "x"}) + "\n")
    before = load_meta(folder)["splits"]["train"]["documents"]
    assert build_shards(data, tok_dir) == folder
    assert load_meta(folder)["splits"]["train"]["documents"] == before + 1


def test_large_vocabularies_use_uint32(tmp_path, tok_dir):
    from chatforge.data.tokenizer import ChatTokenizer

    class Big:
        def __init__(self, inner):
            self.inner, self.vocab_size, self.eot_id = inner, 70_000, inner.eot_id

        def encode_batch(self, texts):
            return [[i + 65_600 for i in ids] for ids in self.inner.encode_batch(texts)]

    data = make_data(tmp_path / "data", max_chars=5_000)
    folder = build_shards(data, tok_dir, tokenizer=Big(ChatTokenizer.load(tok_dir)))
    ids = load_tokens(folder, "train")
    assert ids.dtype == np.uint32 and ids.max() >= 65_600


def test_bad_data_folders_are_clear_errors(tmp_path, tok_dir):
    with pytest.raises(ChatforgeError, match="does not exist"):
        build_shards(tmp_path / "missing", tok_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ChatforgeError, match="train.jsonl is missing"):
        build_shards(tmp_path / "empty", tok_dir)
    data = make_data(tmp_path / "data", max_chars=5_000)
    (data / "val.jsonl").write_text("")
    with pytest.raises(ChatforgeError, match="val.jsonl is empty"):
        build_shards(data, tok_dir)
    (data / "val.jsonl").write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(ChatforgeError, match=r"val.jsonl:2: expected a JSON object"):
        build_shards(data, tok_dir)
    assert not [p for p in os.listdir(data) if p.startswith(".tokens")]  # no half-written folder
