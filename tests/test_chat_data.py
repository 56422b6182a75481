"""SFT data: reading chat JSONL, assistant-only labels, truncation, packing masks, the batch source."""

from __future__ import annotations

import json

import pytest
import torch

from chatforge.data.chat_data import (IGNORE, Example, PackedBatches, attention_mask, eval_batches, fit_example,
                                      first_fit_decreasing, make_labels, pack, read_chat_jsonl, tokenize_examples)
from chatforge.errors import ChatforgeError
from chatforge.model.gpt import GPT, GPTConfig


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from chatforge.data.tokenizer import train_tokenizer

    texts = ["How do I reset my password? Open the settings page and choose Reset password.",
             "Where can I download the latest release? The downloads page lists every release.",
             "The package manager installs, upgrades and removes software on the system."] * 20
    return train_tokenizer(texts, 400, tmp_path_factory.mktemp("tok"))


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def test_read_both_formats_and_skip_blank_lines(tmp_path):
    p = write_jsonl(tmp_path / "qa.jsonl", [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], "source": "a"},
        "",
        {"prompt": "How do I quit?", "completion": "Press q."},
    ])
    convs = read_chat_jsonl(p)
    assert convs[1] == [{"role": "user", "content": "How do I quit?"}, {"role": "assistant", "content": "Press q."}]
    assert len(convs) == 2


@pytest.mark.parametrize("bad, why", [
    ('{"messages": [', "not valid JSON"),
    ('{"text": "no chat here"}', "expected"),
    ('{"messages": [{"role": "user", "content": "only a question"}]}', "no assistant"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "message 0"),
])
def test_malformed_line_names_file_and_line(tmp_path, bad, why):
    p = write_jsonl(tmp_path / "qa_train.jsonl", [{"prompt": "a", "completion": "b"}, bad])
    with pytest.raises(ChatforgeError, match=rf"qa_train\.jsonl:2: .*{why}"):
        read_chat_jsonl(p)


def test_labels_are_exactly_the_assistant_tokens(tokenizer):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "How do I reset my password?"},
                {"role": "assistant", "content": "Open the settings page."},
                {"role": "user", "content": "And then?"},
                {"role": "assistant", "content": "Choose Reset password."}]
    ids, mask = tokenizer.render_chat(messages)
    ex = make_labels(ids, mask)
    assert len(ex.ids) == len(ex.labels) == len(ids) - 1
    scored = [t for t in ex.labels if t != IGNORE]
    # The scored tokens are the assistant replies, each closed by <|im_end|>, and nothing else.
    expected = (tokenizer.encode("Open the settings page.") + [tokenizer.im_end_id]
                + tokenizer.encode("Choose Reset password.") + [tokenizer.im_end_id])
    assert scored == expected
    assert tokenizer.decode([t for t in scored if t != tokenizer.im_end_id]).replace(" ", "") == \
        "Openthesettingspage.ChooseResetpassword."


def test_truncation_keeps_final_reply_or_drops():
    ids = list(range(20))
    mask = [0] * 14 + [1] * 6         # a 14-token prompt, a 6-token reply
    ex, what = fit_example(ids, mask, seq_len=10)
    assert what == "truncated" and len(ex.ids) == 10
    assert [t for t in ex.labels if t != IGNORE] == list(range(14, 20))  # the reply is whole
    assert fit_example(ids, mask, seq_len=10, truncate="drop") == (None, "dropped")
    assert fit_example(ids, mask, seq_len=5)[1] == "dropped"             # the reply alone is too long
    assert fit_example(ids, [0] * 20, seq_len=30)[1] == "dropped"        # nothing to learn


def test_tokenize_counts_truncated_and_dropped(tokenizer):
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    long_prompt = [{"role": "user", "content": "please " * 60}, {"role": "assistant", "content": "Yes."}]
    long_reply = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "upgrade " * 80}]
    examples, stats = tokenize_examples([short, long_prompt, long_reply], tokenizer, seq_len=32)
    assert stats.to_dict() == {"kept": 1, "truncated": 1, "dropped": 1}
    assert all(len(e.ids) <= 32 for e in examples)


def test_first_fit_decreasing_fills_rows():
    bins = first_fit_decreasing([5, 3, 7, 2, 1, 6], capacity=8)
    assert sorted(i for b in bins for i in b) == list(range(6))
    assert all(sum([5, 3, 7, 2, 1, 6][i] for i in b) <= 8 for b in bins)
    assert len(bins) == 3  # 24 tokens in 3 rows of 8: no padding at all


def test_packed_rows_mask_and_positions():
    examples = [Example([1, 2, 3], [IGNORE, 3, 4]), Example([5, 6], [6, 7]), Example([8, 9, 10, 11], [IGNORE] * 3 + [1])]
    rows = pack(examples, seq_len=8, pad_id=0)
    assert len(rows) == 2 and rows.n_examples == 3
    assert rows.padding_fraction == pytest.approx(7 / 16)
    for r in range(len(rows)):
        seg, pos = rows.segments[r], rows.positions[r]
        for s in seg.unique().tolist():
            if s >= 0:  # positions restart at 0 for each example
                assert pos[seg == s].tolist() == list(range(int((seg == s).sum())))
    mask = attention_mask(rows.segments)
    seg = rows.segments
    B, T = seg.shape
    for b in range(B):
        for i in range(T):
            for j in range(T):
                assert bool(mask[b, 0, i, j]) == (j <= i and seg[b, i] == seg[b, j])
    assert mask[:, 0].any(-1).all()  # no query row is fully masked (that would give NaN)


def test_packed_example_computes_what_it_would_alone():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, max_seq_len=32, d_model=32, n_layer=2, n_head=4, n_kv_head=2, d_ff=64)).eval()
    g = torch.Generator().manual_seed(0)
    examples = [Example(torch.randint(1, 50, (n,), generator=g).tolist(), [1] * n) for n in (7, 5, 9, 3)]
    rows = pack(examples, seq_len=16, pad_id=0)
    batch = eval_batches(rows, batch_size=8)[0]
    with torch.no_grad():
        packed = model(batch["input_ids"], positions=batch["positions"], attn_mask=batch["attn_mask"])[0]
        for r, s in ((r, s) for r in range(len(rows)) for s in rows.segments[r].unique().tolist() if s >= 0):
            where = rows.segments[r] == s
            alone = model(rows.ids[r][where].unsqueeze(0))[0][0]
            assert torch.allclose(packed[r][where], alone, atol=1e-5)
        assert torch.isfinite(packed).all()


def test_bucketed_rows_compute_what_each_example_would_alone():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, max_seq_len=32, d_model=32, n_layer=2, n_head=4, n_kv_head=2, d_ff=64)).eval()
    g = torch.Generator().manual_seed(0)
    lengths = (7, 5, 9, 3, 12, 4, 8)
    examples = [Example(torch.randint(1, 50, (n,), generator=g).tolist(), [1] * n) for n in lengths]
    rows = pack(examples, seq_len=16, pad_id=0, bucket_size=3)
    assert len(rows) == 7 and rows.n_examples == 7 and rows.stats["packing"] == "bucketed by 3"
    # Longest first, in groups of 3 cut to their longest: widths 12, 7, 3.
    assert rows.padding_fraction == pytest.approx(1 - sum(lengths) / (3 * 12 + 3 * 7 + 1 * 3))
    batches = eval_batches(rows, batch_size=3)
    assert [b["input_ids"].shape for b in batches] == [(3, 12), (3, 7), (1, 3)]
    assert all("attn_mask" not in b for b in batches)
    with torch.no_grad():
        for b in batches:
            out = model(b["input_ids"], positions=b["positions"])[0]
            for r in range(b["input_ids"].shape[0]):
                ids = [t for t, lab in zip(b["input_ids"][r].tolist(), b["labels"][r].tolist()) if lab != IGNORE]
                alone = model(torch.tensor([ids]))[0][0]
                torch.testing.assert_close(out[r, :len(ids)], alone, atol=1e-5, rtol=1e-5)
    # Training batches are whole groups, shuffled per epoch; resuming continues exactly.
    src = PackedBatches(rows, 3, seed=4)
    assert src.batches_per_epoch == 3
    shapes = sorted(src.next_batch()["input_ids"].shape[1] for _ in range(3))
    assert shapes == [3, 7, 12]
    state = src.state_dict()
    again = PackedBatches(rows, 3, seed=4)
    again.load_state_dict(state)
    assert torch.equal(src.next_batch()["input_ids"], again.next_batch()["input_ids"])
    with pytest.raises(ChatforgeError, match="groups of 3"):
        PackedBatches(rows, 4)


def test_batches_are_deterministic_and_resume_exactly():
    examples = [Example([i + 1] * (1 + i % 4), [1] * (1 + i % 4)) for i in range(30)]
    rows = pack(examples, seq_len=8, pad_id=0)

    def take(src, n):
        return [src.next_batch()["input_ids"] for _ in range(n)]

    a, b = PackedBatches(rows, 3, seed=1), PackedBatches(rows, 3, seed=1)
    first = take(a, 4)
    assert all(torch.equal(x, y) for x, y in zip(first, take(b, 4)))
    state = a.state_dict()
    rest = take(a, 10)                                # crosses an epoch boundary
    c = PackedBatches(rows, 3, seed=1)
    c.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(rest, take(c, 10)))
    seen = torch.cat(take(PackedBatches(rows, 3, seed=2), PackedBatches(rows, 3).batches_per_epoch))
    assert seen.shape[0] == len(rows)                 # one epoch shows every row once
    assert not all(torch.equal(x, y) for x, y in zip(first, take(PackedBatches(rows, 3, seed=2), 4)))
