"""Tests for `chatforge.data.gguf_tokenizer`: the tokenizer of a GGUF file, rebuilt as a HF tokenizer.

Each test GGUF is written here with `gguf.GGUFWriter` from a tiny byte-level BPE vocabulary trained
(in well under a second) with the pre-tokenizer of the model family the file names, plus one dummy
tensor. The peers: transformers' own GGUF tokenizer (`AutoTokenizer.from_pretrained(dir,
gguf_file=...)`), the original HF tokenizer.json definition of each family (trained vocabulary +
that family's pre-tokenizer, loaded by transformers from a folder), and llama.cpp's regex lists
(from its `src/llama-vocab.cpp`) run with the `regex` module for the pre-tokenization itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chatforge.data.gguf_tokenizer import hf_tokenizer_from_gguf, tokenizer_from_gguf
from chatforge.data.tokenizer import EOT, IM_END, IM_START, ChatTokenizer
from chatforge.errors import ChatforgeError
from test_tokenizer import SMOL_SYSTEM, SMOL_TEMPLATE  # noqa: E402

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
regex = pytest.importorskip("regex")

THINK = "<think>"         # a user-defined token (type 4): matched whole, not special
REPO = "<repo_name>"      # another control token (type 3), as SmolLM2 has
SPECIALS = [EOT, IM_START, IM_END, REPO]

# SmolLM2's template shape (ChatML + a default system message), shared with test_tokenizer.
# One in Qwen2.5's shape (a tools branch, a different default, whitespace-controlled blocks).
QWEN_SYSTEM = "You are a careful assistant built for tests."
QWEN_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\nTools: ' + (tools | tojson) + '<|im_end|>\\n' }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\n""" + QWEN_SYSTEM + """<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first) or message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
LLAMA3_TEMPLATE = (
    "{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
)

# The pre-tokenization regexes llama.cpp uses for each name (src/llama-vocab.cpp), in its spelling.
LCPP_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LCPP_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LCPP_QWEN2 = LCPP_LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
LLAMA_CPP_REGEXES = {
    "gpt-2": [LCPP_GPT2],
    "smollm": [r"\p{N}", LCPP_GPT2],
    "default": [r"[\p{P}\$\+<=>\^~\|]+", LCPP_GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
    "llama-bpe": [LCPP_LLAMA3],
    "qwen2": [LCPP_QWEN2],
}

TEXTS = [
    "Hello world! It's 2024-05-17, and I've paid $1,234.56 (12%) for 3 items.",
    "def refund(order_id: int) -> bool:\n    \"\"\"Refund.\"\"\"\n    return api.post(f\"/orders/{order_id}\")\n\n\n",
    "    indented 42\n\t\ttabs\t\t7\r\nwindows line\r\n  \n",
    "Café naïve façade — “quotes” … 配送には3〜5営業日かかります。Доставка 3 дня 🙂👍🏽 e\u0301",
    "x=1;y=22;z=333;w=4444;v=55555 a1b2c3 1 22 333 4444 123456789",
    "  leading and trailing   ",
    "\n\nblank lines\n\n\nthree\n",
    "we're they'll I'M SHE'S 'quoted' don't",
    "if (a<=b && c!=d) { x ^= ~y | z; } // ok?!...",
    f"{IM_START}user\nHi there{IM_END}\n{IM_START}assistant\n{THINK}hmm</think> 12 apples{IM_END}\n{EOT}",
    f"text with {REPO} inside and a fake <|im_sta rt|>",
    "", " ", "\n", "  ", "\u00a0nbsp and tab\tend",
    "Total:    1234 and\t\t\t56 and  7 items",
]
CORPUS = TEXTS[:10] + [
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away quickly.",
    "Orders ship within 3 to 5 business days. Tracking numbers arrive by e-mail within 24 hours.",
    "for i in range(10):\n        print(i * 2)\n    return None\n",
    "Open Settings, choose Account, then click \"Reset password\". We send a link to your address.",
] * 4


def family_pre_tokenizer(pre: str):
    """The pre-tokenizer of each family's original tokenizer.json (what its merges were learned with)."""
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    split_then_bytes = lambda pattern: pre_tokenizers.Sequence([  # noqa: E731
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    return {
        "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]),
        "gpt-2": byte_level,
        "default": byte_level,  # no HF original: llama.cpp's fallback, checked by its regexes below
        "llama-bpe": split_then_bytes(LCPP_LLAMA3),
        "qwen2": split_then_bytes(LCPP_QWEN2),
    }[pre]


def train_original(pre: str, out: Path, template: str = SMOL_TEMPLATE) -> "object":
    """A tiny trained vocabulary with the family's original tokenizer.json definition, saved in
    `out` as a HF folder (SmolLM2-like config: bos <|im_start|>, eos = pad <|im_end|>)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = family_pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=700, min_frequency=2, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_tokens([AddedToken(THINK, special=False, normalized=False)])
    if pre == "llama-bpe":  # Llama 3's tokenizer.json takes a piece that is a whole token as is
        spec = json.loads(tok.to_str())
        spec["model"]["ignore_merges"] = True
        tok = Tokenizer.from_str(json.dumps(spec))
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": IM_START,
        "eos_token": {"__type": "AddedToken", "content": IM_END, "lstrip": False, "normalized": False,
                      "rstrip": False, "single_word": False, "special": True}, "pad_token": IM_END, "unk_token": EOT,
        "add_bos_token": False, "clean_up_tokenization_spaces": False, "chat_template": template}))
    return tok


def write_gguf(path: Path, tok, pre: str | None, *, model: str = "gpt2", template: str | None = SMOL_TEMPLATE,
               ids: dict[str, int] | None = None, add_bos: bool | None = False) -> Path:
    """A GGUF holding `tok`'s vocabulary the way llama.cpp's converter writes it, and one tensor."""
    import numpy as np

    spec = json.loads(tok.to_str())
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    n = tok.get_vocab_size(with_added_tokens=True)
    tokens = [tok.id_to_token(i) for i in range(n)]
    added = {a["content"]: a["special"] for a in spec["added_tokens"]}
    types = [(3 if added[t] else 4) if t in added else 1 for t in tokens]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(512)
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for key, token in (ids or {"bos": IM_START, "eos": IM_END, "unk": EOT, "pad": IM_END}).items():
        getattr(w, {"bos": "add_bos_token_id", "eos": "add_eos_token_id", "unk": "add_unk_token_id",
                    "pad": "add_pad_token_id"}[key])(tokens.index(token))
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if template is not None:
        w.add_chat_template(template)
    w.add_tensor("token_embd.weight", np.zeros((n, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


class Family:
    """One model family's files: the GGUF, the original HF folder, and the tokenizers built from them."""

    def __init__(self, pre: str, root: Path, template: str = SMOL_TEMPLATE) -> None:
        self.pre = pre
        self.original_dir = root / "original"
        self.original_raw = train_original(pre, self.original_dir, template)
        self.gguf_path = write_gguf(root / "model.gguf", self.original_raw, pre, template=template)
        self.reader = gguf.GGUFReader(str(self.gguf_path))
        self.raw = hf_tokenizer_from_gguf(self.reader)
        self.tok = tokenizer_from_gguf(self.reader)
        self.original = transformers.AutoTokenizer.from_pretrained(str(self.original_dir))
        self.hf_gguf = transformers.AutoTokenizer.from_pretrained(str(root), gguf_file="model.gguf")


FAMILIES = ["smollm", "gpt-2", "llama-bpe", "qwen2", "default"]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory: pytest.TempPathFactory) -> Family:
    template = QWEN_TEMPLATE if request.param == "qwen2" else SMOL_TEMPLATE
    return Family(request.param, tmp_path_factory.mktemp(request.param), template)


def hf_ids(out) -> list[int]:
    """transformers 4 returns a list from apply_chat_template(tokenize=True); 5 a BatchEncoding."""
    return list(out["input_ids"] if hasattr(out, "keys") else out)


# ---- encoding ----------------------------------------------------------------------------------


def test_pre_tokenization_follows_llama_cpp(family: Family) -> None:
    """Pieces = llama.cpp's regex list applied in order, each splitting the pieces of the one before."""
    patterns = [regex.compile(p) for p in LLAMA_CPP_REGEXES[family.pre]]
    for text in TEXTS:
        spans = [(0, len(text))] if text else []
        for rx in patterns:
            pieces = []
            for start, end in spans:
                pos = start
                for m in rx.finditer(text, start, end):
                    if m.start() > pos:
                        pieces.append((pos, m.start()))
                    if m.end() > m.start():
                        pieces.append(m.span())
                    pos = m.end()
                if pos < end:
                    pieces.append((pos, end))
            spans = pieces
        ours = [span for _, span in family.raw.pre_tokenizer.pre_tokenize_str(text)]
        assert ours == spans, text


def test_ids_match_the_original_tokenizer(family: Family) -> None:
    if family.pre == "default":
        pytest.skip("llama.cpp's fallback has no HF original; its splits are checked against llama.cpp's regexes")
    for text in TEXTS:
        expected = family.original(text, add_special_tokens=False)["input_ids"]
        assert family.raw.encode(text, add_special_tokens=False).ids == expected, text
        assert family.raw.decode(expected, skip_special_tokens=False) == text


def test_ids_match_transformers_gguf(family: Family) -> None:
    """transformers builds the same tokenizer from the file, except for two names: for `smollm` it
    leaves out the digit split (so text where whitespace or letters run into digits can differ:
    the original tokenizer is followed instead, see above) and it has no `default`."""
    differ = []
    for text in TEXTS:
        if family.raw.encode(text, add_special_tokens=False).ids != \
                family.hf_gguf(text, add_special_tokens=False)["input_ids"]:
            differ.append(text)
    if family.pre in ("gpt-2", "llama-bpe", "qwen2"):
        assert differ == []
    elif family.pre == "smollm":
        assert all(any(c.isdigit() for c in t) for t in differ)
        assert len(differ) < len(TEXTS) / 2
    assert len(family.hf_gguf) == family.tok.vocab_size


def test_special_and_added_tokens(family: Family) -> None:
    tok, raw = family.tok, family.raw
    assert (tok.eot_id, tok.im_start_id, tok.im_end_id) == tuple(raw.token_to_id(t) for t in (EOT, IM_START, IM_END))
    assert tok.pad_id == tok.im_end_id  # the file's padding token
    assert tok.vocab_size == len(family.reader.fields["tokenizer.ggml.tokens"].contents())
    # Typed special tokens stay text in ChatTokenizer.encode (the raw tokenizer matches them, as HF does).
    text = f"a{IM_END}b{REPO}"
    assert tok.im_end_id in raw.encode(text).ids and tok.im_end_id not in tok.encode(text)
    assert raw.token_to_id(REPO) not in tok.encode(text)
    assert tok.decode(tok.encode(text)) == text
    # A user-defined token is matched whole but is not special.
    assert raw.token_to_id(THINK) in tok.encode(f"x {THINK} y")


def test_ignore_merges_only_for_llama3(family: Family) -> None:
    assert json.loads(family.raw.to_str())["model"]["ignore_merges"] == (family.pre == "llama-bpe")


# ---- chat --------------------------------------------------------------------------------------


CHATS = [
    [{"role": "user", "content": "Where is my parcel?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi!"},
     {"role": "assistant", "content": "Hello, how can I help?"}],
    [{"role": "user", "content": "  \n indented question"}, {"role": "assistant", "content": "\n\nA blank line first."},
     {"role": "user", "content": "And code?\n\n    x = 12\n"}, {"role": "assistant", "content": " def f():\n\treturn 3"}],
    [{"role": "user", "content": "Order 123456, 7 items, €99.95?"},
     {"role": "assistant", "content": "Café ✓ 配送 🙂 — shipped 2024-05-17."}],
]


@pytest.mark.parametrize("gen", [False, True])
def test_chat_rendering_matches_transformers(family: Family, gen: bool, tmp_path: Path) -> None:
    tok = family.tok
    default = QWEN_SYSTEM if family.pre == "qwen2" else SMOL_SYSTEM
    assert tok.default_system == default
    tok.save(tmp_path)
    saved = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    peers = [saved, family.hf_gguf] + ([family.original] if family.pre != "default" else [])
    for msgs in CHATS:
        text = tok.render_chat_text(msgs, add_generation_prompt=gen)
        ids, mask = tok.render_chat(msgs, add_generation_prompt=gen)
        for peer in peers:
            assert peer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) == text
        if msgs[0]["role"] != "system":
            assert text.startswith(f"{IM_START}system\n{default}{IM_END}\n")
        # ids: the peers that encode like the file (transformers' GGUF tokenizer is not one for
        # smollm with digits, nor for default).
        exact = [saved] + ([family.original] if family.pre != "default" else []) + \
            ([family.hf_gguf] if family.pre in ("gpt-2", "llama-bpe", "qwen2") else [])
        for peer in exact:
            assert hf_ids(peer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)) == ids
        assert tok.decode(ids) == text and len(mask) == len(ids)
        # What is learned: each assistant reply and its <|im_end|>, less any leading whitespace a
        # pretrained pre-tokenizer fuses with the header's newline (that token counts as header).
        replies = [m["content"] + IM_END for m in msgs if m["role"] == "assistant"]
        runs = [tok.decode(r) for r in masked_runs(ids, mask)]
        assert len(runs) == len(replies)
        for run, reply in zip(runs, replies):
            assert reply.endswith(run) and len(run) >= len(reply.lstrip())


def masked_runs(ids: list[int], mask: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for i, (t, m) in enumerate(zip(ids, mask)):
        if m and (i == 0 or not mask[i - 1]):
            runs.append([])
        if m:
            runs[-1].append(t)
    return runs


def test_saved_folder_loads_back(family: Family, tmp_path: Path) -> None:
    family.tok.save(tmp_path)
    again = ChatTokenizer.load(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    expected_template = QWEN_TEMPLATE if family.pre == "qwen2" else SMOL_TEMPLATE
    assert config["chat_template"] == expected_template  # verbatim
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (IM_START, IM_END, IM_END)
    assert config["model_max_length"] == 512  # the file's context length
    for msgs in CHATS:
        assert again.render_chat(msgs, True) == family.tok.render_chat(msgs, True)
    assert [again.encode(t) for t in TEXTS] == [family.tok.encode(t) for t in TEXTS]


# ---- errors ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_raw(tmp_path_factory: pytest.TempPathFactory):
    return train_original("smollm", tmp_path_factory.mktemp("smol_raw"))


def test_unknown_pre_tokenizer(smol_raw, tmp_path: Path) -> None:
    reader = gguf.GGUFReader(str(write_gguf(tmp_path / "m.gguf", smol_raw, "made-up-bpe")))
    with pytest.raises(ChatforgeError, match="pre-tokenizer 'made-up-bpe'.*does not know"):
        tokenizer_from_gguf(reader)


def test_missing_pre_name_is_llama_cpp_default(smol_raw, tmp_path: Path) -> None:
    reader = gguf.GGUFReader(str(write_gguf(tmp_path / "m.gguf", smol_raw, None)))
    splits = json.loads(hf_tokenizer_from_gguf(reader).to_str())["pre_tokenizer"]["pretokenizers"]
    assert [s["type"] for s in splits] == ["Split"] * 4 + ["ByteLevel"]


def test_sentencepiece_is_refused(smol_raw, tmp_path: Path) -> None:
    reader = gguf.GGUFReader(str(write_gguf(tmp_path / "m.gguf", smol_raw, "default", model="llama")))
    with pytest.raises(ChatforgeError, match="SentencePiece"):
        tokenizer_from_gguf(reader)


def test_non_chatml_template_is_refused(smol_raw, tmp_path: Path) -> None:
    reader = gguf.GGUFReader(str(write_gguf(tmp_path / "m.gguf", smol_raw, "smollm", template=LLAMA3_TEMPLATE)))
    with pytest.raises(ChatforgeError, match="m.gguf.*not a ChatML template"):
        tokenizer_from_gguf(reader)


def test_add_bos_token(smol_raw, tmp_path: Path) -> None:
    """A file that asks for BOS gets it from `tokenizer(text)` (as llama.cpp and transformers add it),
    never from ChatTokenizer.encode or render_chat (the template writes what a prompt needs)."""
    write_gguf(tmp_path / "m.gguf", smol_raw, "smollm", add_bos=True)
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    raw, tok = hf_tokenizer_from_gguf(reader), tokenizer_from_gguf(reader)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    text = "Hello world, order 12."
    assert raw.encode(text).ids == hf(text)["input_ids"] == [tok.im_start_id, *tok.encode(text)]
    assert tok.add_bos_token and tok.render_chat([{"role": "user", "content": "hi"}])[0][:2] == \
        [tok.im_start_id, tok.encode("system")[0]]  # no BOS in front
    # A Llama 3 file that does not say: llama.cpp adds BOS for that pre-tokenizer.
    write_gguf(tmp_path / "l.gguf", smol_raw, "llama-bpe", add_bos=None)
    assert tokenizer_from_gguf(gguf.GGUFReader(str(tmp_path / "l.gguf"))).add_bos_token
    write_gguf(tmp_path / "s.gguf", smol_raw, "smollm", add_bos=None)
    assert not tokenizer_from_gguf(gguf.GGUFReader(str(tmp_path / "s.gguf"))).add_bos_token


def test_no_template_means_plain_chatml(smol_raw, tmp_path: Path) -> None:
    tok = tokenizer_from_gguf(gguf.GGUFReader(str(write_gguf(tmp_path / "m.gguf", smol_raw, "smollm", template=None))))
    assert tok.default_system is None
    assert tok.render_chat_text([{"role": "user", "content": "hi"}]) == f"{IM_START}user\nhi{IM_END}\n"


def test_missing_chat_tokens(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                                        show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = write_gguf(tmp_path / "m.gguf", tok, "gpt-2", template=None, ids={"bos": "<s>", "eos": "</s>"})
    with pytest.raises(ChatforgeError, match=r"no <\|im_start\|> or <\|im_end\|> token"):
        tokenizer_from_gguf(gguf.GGUFReader(str(path)))
    assert hf_tokenizer_from_gguf(gguf.GGUFReader(str(path))).token_to_id("</s>") is not None


def test_no_tokenizer_in_file(tmp_path: Path) -> None:
    import numpy as np

    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ChatforgeError, match="holds no tokenizer"):
        tokenizer_from_gguf(gguf.GGUFReader(str(tmp_path / "m.gguf")))


def test_not_a_reader() -> None:
    with pytest.raises(ChatforgeError, match="GGUFReader"):
        tokenizer_from_gguf("model.gguf")
