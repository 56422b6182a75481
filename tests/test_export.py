"""`chatforge export`: HF folders, GGUF files and Ollama Modelfiles, checked against real peers.

- transformers loads the HF folders (logits within 1e-5 of chatforge's, the same chat ids);
- chatforge's own importer reads every GGUF file back (round trip: exact in f32, exactly the
  `gguf` package's dequantization of its quantization otherwise, within each format's error);
- llama.cpp itself, through llama-cpp-python (built from source by the set-up), loads the GGUF
  files: tokenization, logits, a greedy continuation and quantized top-1 agreement (e2e);
- the Modelfile is parsed by the rules of Ollama's documented syntax (its docs/modelfile.md and
  docs/template.md) and its template rendered: Ollama itself cannot be installed here.

The models are tiny: chatforge's own tokenizer and GPT trained briefly on examples/my_docs, and
transformers' Llama / Qwen2 / Qwen3 classes with random weights, imported with `model import`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from chatforge.commands import main as cli
from chatforge.data.tokenizer import ChatTokenizer, train_tokenizer
from chatforge.errors import ChatforgeError
from chatforge.model.export import MARKER, export_model
from chatforge.model.folder import load_model, save_model
from chatforge.model.gpt import GPT, preset
from chatforge.model.importer import import_model

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
Q = gguf.GGMLQuantizationType

DOCS = Path(__file__).resolve().parent.parent / "examples" / "my_docs"
CHATS = [
    [{"role": "user", "content": "How do I restore a file?"}],
    [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "My backup failed."}],
    [{"role": "user", "content": " \n  spaced question\n\n"}, {"role": "assistant", "content": "\tan answer \n"},
     {"role": "user", "content": "Order 12345, café 🙂"}],
]


def doc_texts() -> list[str]:
    return [p.read_text(encoding="utf-8") for p in sorted(DOCS.iterdir()) if p.is_file()]


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        out = model(torch.tensor([ids]))
    return (out[0] if isinstance(out, tuple) else out.logits)[0]


# --------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def own_model(tmp_path_factory) -> Path:
    """chatforge's own tokenizer and a tiny GPT trained for a few seconds on the example documents
    (a model with some structure, so that quantization and greedy decoding mean something)."""
    texts = doc_texts()
    tok = train_tokenizer(texts * 3, 800, None)
    ids = torch.tensor([i for t in texts for i in tok.encode(t)])
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=tok.vocab_size, max_seq_len=256))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(120):
        starts = torch.randint(0, len(ids) - 129, (8,), generator=gen)
        batch = torch.stack([ids[s:s + 129] for s in starts])
        _, loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 5.0
    return save_model(tmp_path_factory.mktemp("own") / "tiny", model.eval(), tok)


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SMOL_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
                 "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory) -> dict[str, tuple[Path, object]]:
    """arch -> (chatforge model folder imported from it, the transformers model): tiny random
    Llama / Qwen2 / Qwen3 models with a SmolLM2-style tokenizer (single digits, then GPT-2's
    regex; a default system message in the template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("hf")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(doc_texts(), trainers.BpeTrainer(
        vocab_size=512, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    out = {}
    for arch, (config_cls, model_cls) in {"llama": ("LlamaConfig", "LlamaForCausalLM"),
                                          "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
                                          "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}.items():
        fields = dict(vocab_size=bpe.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=arch != "llama", rms_norm_eps=1e-5, rope_theta=5000.0)
        if arch == "qwen3":
            fields["head_dim"] = 32             # not hidden / heads, as in real Qwen3 models
        torch.manual_seed(0)
        hf = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**fields)).eval()
        with torch.no_grad():
            for name, p in hf.named_parameters():   # biases and norms random too
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("norm.weight") else 0.0))
        src = root / f"src-{arch}"
        hf.save_pretrained(src)
        bpe.save(str(src / "tokenizer.json"))
        (src / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
            "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>", "add_bos_token": False,
            "model_max_length": 128, "chat_template": SMOL_TEMPLATE}))
        import_model(src, root / arch)
        out[arch] = (root / arch, hf)
    return out


# --------------------------------------------------------------------------------- HF folders

def hf_ids(out) -> list[int]:
    """transformers 4 returns a list from apply_chat_template(tokenize=True); 5 a BatchEncoding."""
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_hf_export_loads_in_transformers_with_equal_logits_and_chat_ids(own_model, tmp_path):
    model, tok = load_model(own_model)
    result = export_model(own_model, "hf", tmp_path / "hf")
    assert result.quant == "f32" and (tmp_path / "hf" / MARKER).is_file()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.dtype == torch.float32
    for messages in CHATS:
        ids, _ = tok.render_chat(messages, add_generation_prompt=True)
        assert hf_ids(hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)) == ids
        torch.testing.assert_close(logits(hf, ids), logits(model, ids), atol=1e-5, rtol=0)
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tok.im_end_id, tok.eot_id] and gen["pad_token_id"] == tok.pad_id
    # Greedy HF generate stops where the engine stops.
    assert hf.generation_config.eos_token_id == [tok.im_end_id, tok.eot_id]


@pytest.mark.parametrize("quant, dtype", [("f16", torch.float16), ("bf16", torch.bfloat16)])
def test_hf_export_half_precision(own_model, tmp_path, quant, dtype):
    model, _ = load_model(own_model)
    export_model(own_model, "hf", tmp_path / quant, quant)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / quant)
    assert hf.dtype == dtype
    torch.testing.assert_close(hf.model.embed_tokens.weight, model.embed_tokens.weight.to(dtype), atol=0, rtol=0)


@pytest.mark.parametrize("arch, cls", [("llama", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM"),
                                       ("qwen3", "Qwen3ForCausalLM")])
def test_hf_export_of_imported_architectures(hf_models, tmp_path, arch, cls):
    folder, original = hf_models[arch]
    model, tok = load_model(folder)
    export_model(folder, "hf", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == cls
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for messages in CHATS:
        ids, _ = tok.render_chat(messages, add_generation_prompt=True)
        assert hf_ids(hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)) == ids
        torch.testing.assert_close(logits(hf, ids), logits(model, ids), atol=1e-5, rtol=0)
        torch.testing.assert_close(logits(hf, ids), logits(original, ids), atol=1e-5, rtol=0)


def test_lora_model_exports_merged(own_model, tmp_path):
    """A folder as `chatforge sft --method lora --lora-save adapter` leaves it (merged weights plus
    the adapter) exports the fine-tuned model; unmerged training weights (`last/`) are refused."""
    from chatforge.model.lora import apply_lora, merged_state_dict, save_lora

    model, tok = load_model(own_model)
    apply_lora(model, rank=4, alpha=8)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)            # a trained adapter: B is no longer zero
    folder = tmp_path / "sft"
    save_model(folder, model, tok, state=merged_state_dict(model))
    save_lora(model, folder)
    ids, _ = tok.render_chat(CHATS[1], add_generation_prompt=True)
    result = export_model(folder, "hf", tmp_path / "hf")
    assert any("merged" in n for n in result.notes)
    assert not list((tmp_path / "hf").glob("adapter*"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(logits(hf, ids), logits(model, ids), atol=1e-5, rtol=0)
    last = tmp_path / "last"
    save_model(last, model, tok)                 # the wrapped weights, as the loop saves last/
    with pytest.raises(ChatforgeError, match="unmerged LoRA"):
        export_model(last, "hf", tmp_path / "hf-last")
    assert not (tmp_path / "hf-last").exists()


# --------------------------------------------------------------------------------- GGUF files

def gguf_file(folder: Path) -> Path:
    (path,) = folder.glob("*.gguf")
    return path


@pytest.mark.parametrize("which", ["own", "llama", "qwen2", "qwen3"])
def test_gguf_f32_round_trip_is_exact(own_model, hf_models, tmp_path, which):
    folder = own_model if which == "own" else hf_models[which][0]
    model, tok = load_model(folder)
    export_model(folder, "gguf", tmp_path / "gguf", "f32")
    path = gguf_file(tmp_path / "gguf")
    back = import_model(path, tmp_path / "back")
    assert back.checkpoint.architecture == ("llama" if which == "own" else which)
    model2, tok2 = load_model(tmp_path / "back")
    # GGUF stores the norm epsilon as a float32 (as llama.cpp computes with it): 1e-5 comes back
    # as 9.99999975e-06. Everything else in the config comes back as it was.
    assert model2.config.norm_eps == float(np.float32(model.config.norm_eps))
    model2.config.norm_eps = model.config.norm_eps
    assert model2.config == model.config
    for name, t in model.state_dict().items():
        torch.testing.assert_close(model2.state_dict()[name], t, atol=0, rtol=0)
    a, b = (json.loads(t.hf_tokenizer.to_str()) for t in (tok, tok2))
    assert (b["model"]["vocab"], b["model"]["merges"]) == (a["model"]["vocab"], a["model"]["merges"])
    assert [(t["id"], t["content"], t["special"]) for t in b["added_tokens"]] == \
        [(t["id"], t["content"], t["special"]) for t in a["added_tokens"]]
    for text in TEXTS:
        assert tok2.encode(text) == tok.encode(text)
    assert (tok2.chat_template, tok2.default_system, tok2.eos_token, tok2.pad_token, tok2.bos_token) == \
        (tok.chat_template, tok.default_system, tok.eos_token, tok.pad_token, tok.bos_token)
    ids, _ = tok.render_chat(CHATS[2], add_generation_prompt=True)
    torch.testing.assert_close(logits(model2, ids), logits(model, ids), atol=1e-6, rtol=0)


def test_gguf_metadata(own_model, tmp_path):
    model, tok = load_model(own_model)
    export_model(own_model, "gguf", tmp_path / "g", "q8_0", name="acme")
    path = tmp_path / "g" / "acme-q8_0.gguf"
    reader = gguf.GGUFReader(path)

    def meta(key):
        return reader.fields[key].contents()

    c = model.config
    assert meta("general.architecture") == "llama" and meta("general.name") == "acme"
    assert meta("general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    assert (meta("llama.context_length"), meta("llama.embedding_length"), meta("llama.block_count"),
            meta("llama.feed_forward_length"), meta("llama.attention.head_count"),
            meta("llama.attention.head_count_kv"), meta("llama.rope.dimension_count")) == \
        (c.max_seq_len, c.d_model, c.n_layer, c.d_ff, c.n_head, c.n_kv_head, c.head_dim)
    assert meta("tokenizer.ggml.model") == "gpt2" and meta("tokenizer.ggml.pre") == "deepseek-coder"
    tokens = meta("tokenizer.ggml.tokens")
    assert len(tokens) == tok.vocab_size and tokens[tok.im_end_id] == "<|im_end|>"
    types = meta("tokenizer.ggml.token_type")
    assert [types[i] for i in range(4)] == [3, 3, 3, 3] and set(types[4:]) == {1}   # the 4 special tokens are control
    assert meta("tokenizer.ggml.eos_token_id") == tok.im_end_id
    assert meta("tokenizer.ggml.padding_token_id") == tok.pad_id
    assert "tokenizer.ggml.bos_token_id" not in reader.fields and not meta("tokenizer.ggml.add_bos_token")
    assert meta("tokenizer.chat_template") == tok.chat_template
    assert {t.tensor_type for t in reader.tensors if len(t.shape) == 2} == {Q.Q8_0}
    assert {t.tensor_type for t in reader.tensors if len(t.shape) == 1} == {Q.F32}
    assert "output.weight" not in {t.name for t in reader.tensors}      # tied: llama.cpp reuses token_embd


def block_bound(w: np.ndarray, quant: str) -> np.ndarray:
    """The largest error each weight may have in `quant`, from its block of 32 along a row: the
    rounding to a step, plus the fp16 rounding (2^-11 relative) of the stored scale (and min)."""
    blocks = w.reshape(*w.shape[:-1], -1, 32)
    amax = np.abs(blocks).max(-1, keepdims=True)
    fp16 = 2.0 ** -11
    if quant == "q8_0":                           # codes -127..127 of amax / 127: half a step
        step = amax / 127
        bound = step / 2 + 127 * step * fp16
    elif quant == "q4_0":                         # codes -8..7 of amax / 8: -amax lands one step off
        step = amax / 8
        bound = step + 8 * step * fp16
    else:                                         # q4_1: 16 codes from the block's min to its max
        lo, hi = blocks.min(-1, keepdims=True), blocks.max(-1, keepdims=True)
        step = (hi - lo) / 15
        bound = step / 2 + 15 * step * fp16 + np.abs(lo) * fp16
    return np.broadcast_to(bound + amax * 1e-6, blocks.shape).reshape(w.shape)


@pytest.mark.parametrize("quant", ["f16", "bf16", "q8_0", "q4_0", "q4_1"])
def test_gguf_quantized_round_trip(own_model, tmp_path, quant):
    """Import gives back exactly what the gguf package's dequantizer makes of the stored weights,
    and each weight is within its format's rounding error of the original."""
    model, tok = load_model(own_model)
    export_model(own_model, "gguf", tmp_path / "g", quant)
    reader = gguf.GGUFReader(gguf_file(tmp_path / "g"))
    stored = {t.name: t.tensor_type for t in reader.tensors}
    embed_type = {"f16": Q.F16, "bf16": Q.BF16}.get(quant, Q.Q8_0)
    assert stored["token_embd.weight"] == embed_type           # 4-bit files keep the embedding at Q8_0
    assert stored["blk.0.ffn_down.weight"] == Q[quant.upper()]
    import_model(gguf_file(tmp_path / "g"), tmp_path / "back")
    back, _ = load_model(tmp_path / "back")
    worst = 0.0
    for name, t in model.state_dict().items():
        w, got = t.numpy(), back.state_dict()[name].numpy()
        if w.ndim == 1:
            np.testing.assert_array_equal(got, w)                # norms stay F32
            continue
        qname = "q8_0" if name in ("embed_tokens.weight", "lm_head.weight") and quant.startswith("q4") else quant
        err = np.abs(got - w)
        if qname in ("f16", "bf16"):
            expected = torch.from_numpy(w).to(torch.float16 if qname == "f16" else torch.bfloat16).float().numpy()
            np.testing.assert_array_equal(got, expected)       # exactly the rounded value
        else:
            qtype = Q[qname.upper()]
            np.testing.assert_array_equal(got, gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype))
            assert (err <= block_bound(w, qname)).all(), name
        worst = max(worst, float(err.max() / np.abs(w).max()))
    print(f"\n{quant}: largest weight error {worst:.2e} of the tensor's largest weight")


def test_unknown_pre_tokenizer_is_refused_for_gguf_only(own_model, tmp_path):
    """A tokenizer whose split llama.cpp has no name for (chatforge's old GPT-4-style split with
    one line break a piece) cannot go to GGUF; the HF folder keeps it as it is."""
    from tokenizers import Regex, Tokenizer, pre_tokenizers

    model, tok = load_model(own_model)
    spec = json.loads(tok.hf_tokenizer.to_str())
    old_split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|[^\S\r\n]*(?:\r\n|[\r\n])|\s+(?!\S)|\s+")
    raw = Tokenizer.from_str(json.dumps(spec))
    raw.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(old_split), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    folder = tmp_path / "old"
    save_model(folder, model, ChatTokenizer(raw, eos_token=tok.eos_token, pad_token=tok.pad_token))
    with pytest.raises(ChatforgeError, match="llama.cpp has no name for"):
        export_model(folder, "gguf", tmp_path / "g")
    assert not (tmp_path / "g").exists()
    export_model(folder, "hf", tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_llama_cpp_pre_names_of_known_splits(hf_models, own_model):
    from chatforge.data.gguf_tokenizer import PRE_TOKENIZERS, llama_cpp_pre_name

    assert llama_cpp_pre_name(load_model(own_model)[1].hf_tokenizer) == "deepseek-coder"
    assert llama_cpp_pre_name(load_model(hf_models["llama"][0])[1].hf_tokenizer) == "smollm"
    from tokenizers import Tokenizer, models

    for name in ("gpt-2", "smollm", "llama-bpe", "dbrx", "qwen2", "default", "deepseek-coder"):
        pre = PRE_TOKENIZERS[name]
        tok = Tokenizer(models.BPE(ignore_merges=pre.ignore_merges))
        tok.pre_tokenizer = pre.build()
        assert llama_cpp_pre_name(tok) == name


# --------------------------------------------------------------------------------- Ollama

# Ollama's documented Modelfile syntax (docs/modelfile.md): `INSTRUCTION arguments` lines, `#`
# comments, instructions case-insensitive, values bare, "quoted" or """triple-quoted""" (which
# may span lines); PARAMETER takes a name from the documented table and a value of its type.
INSTRUCTIONS = {"from", "parameter", "template", "system", "adapter", "license", "message"}
PARAMETERS = {"mirostat": int, "mirostat_eta": float, "mirostat_tau": float, "num_ctx": int, "repeat_last_n": int,
              "repeat_penalty": float, "temperature": float, "seed": int, "stop": str, "tfs_z": float,
              "num_predict": int, "top_k": int, "top_p": float, "min_p": float}


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(instruction, argument) pairs, quotes removed; AssertionError on anything the syntax forbids."""
    out, lines = [], iter(text.split("\n"))
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z]+)[ \t]+(.*)", line)
        assert m, f"not `INSTRUCTION arguments`: {line!r}"
        cmd, arg = m.group(1).lower(), m.group(2).strip()
        assert cmd in INSTRUCTIONS, f"unknown instruction {cmd}"
        if arg.startswith('"""'):
            while not (len(arg) >= 6 and arg.endswith('"""')):
                arg += "\n" + next(lines)            # StopIteration: an unterminated value
            arg = arg[3:-3]
        elif arg.startswith('"'):
            assert len(arg) >= 2 and arg.endswith('"') and '"' not in arg[1:-1], f"bad quoting: {arg!r}"
            arg = arg[1:-1]
        out.append((cmd, arg))
    return out


def render_go_template(template: str, messages: list[dict]) -> str:
    """Render the part of Go's text/template that a ChatML template needs (`range .Messages`,
    `.Role`, `.Content`, `end`, and the `{{-` / `-}}` whitespace trimming); anything else fails."""
    parts = re.split(r"(\{\{-?\s*.*?\s*-?\}\})", template)
    for i, p in enumerate(parts):               # trimming: `{{-` eats the whitespace before, `-}}` after
        if p.startswith("{{-") and i > 0:
            parts[i - 1] = parts[i - 1].rstrip(" \t\r\n")
        if p.endswith("-}}") and i + 1 < len(parts):
            parts[i + 1] = parts[i + 1].lstrip(" \t\r\n")
    actions = [(p.strip("{}-").strip() if p.startswith("{{") else None, p) for p in parts]

    def run(items, dot) -> str:
        text, i = "", 0
        while i < len(items):
            action, raw = items[i]
            if action is None:
                text += raw
            elif action == "range .Messages":
                depth, j = 1, i + 1
                while depth:
                    depth += {"end": -1}.get(items[j][0], 1 if (items[j][0] or "").startswith("range") else 0)
                    j += 1
                text += "".join(run(items[i + 1:j - 1], m) for m in dot["Messages"])
                i = j - 1
            elif action in (".Role", ".Content"):
                text += dot[action[1:].lower()]
            else:
                raise AssertionError(f"template action {action!r} is not part of this check")
            i += 1
        return text

    return run(actions, {"Messages": messages})


@pytest.mark.parametrize("which", ["own", "smol"])
def test_modelfile_follows_ollama_syntax_and_renders_chatml(own_model, hf_models, tmp_path, which):
    folder = own_model if which == "own" else hf_models["qwen2"][0]
    model, tok = load_model(folder)
    system = "You are the support assistant of Acme.\nAnswer from the documents." if which == "own" else None
    export_model(folder, "gguf", tmp_path / "g", "q4_0", name="acme", system=system)
    commands = parse_modelfile((tmp_path / "g" / "Modelfile").read_text(encoding="utf-8"))
    args = {}
    for cmd, arg in commands:
        args.setdefault(cmd, []).append(arg)
    assert args["from"] == ["./acme-q4_0.gguf"] and (tmp_path / "g" / args["from"][0]).is_file()
    params = [a.split(None, 1) for a in args["parameter"]]
    for name, value in params:
        assert name in PARAMETERS, name
        PARAMETERS[name](value)                  # a value of the documented type
    values = {}
    for name, value in params:
        values.setdefault(name, []).append(value)
    assert [s.strip('"') for s in values["stop"]] == ["<|im_end|>", "<|endoftext|>"]
    assert values["num_ctx"] == [str(model.config.max_seq_len)]
    # SYSTEM: --system, else the template's default system message (the SmolLM2-style template's).
    expected_system = system if which == "own" else tok.default_system
    assert args["system"] == [expected_system]
    # Ollama puts SYSTEM first when a conversation has no system message, then the TEMPLATE
    # renders the messages: that must be chatforge's ChatML prompt, character for character.
    (template,) = args["template"]
    for messages in CHATS:
        sent = messages if messages[0]["role"] == "system" else [{"role": "system", "content": expected_system},
                                                                  *messages]
        ours = tok.render_chat_text(sent, add_generation_prompt=True)
        assert render_go_template(template, sent) == ours
        if which == "smol" and messages[0]["role"] != "system":
            assert ours == tok.render_chat_text(messages, add_generation_prompt=True)   # = the HF template's


def test_modelfile_system_message_checked(own_model, tmp_path):
    with pytest.raises(ChatforgeError, match='"""'):
        export_model(own_model, "gguf", tmp_path / "g", "q8_0", system='Say """hi"""')
    with pytest.raises(ChatforgeError, match="drops"):
        export_model(own_model, "gguf", tmp_path / "g", "q8_0", system="bell\x07")
    assert not (tmp_path / "g").exists()


# --------------------------------------------------------------------------------- command

def test_cli_help_has_examples(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["export", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "example:" in out and "--format gguf --quant q8_0" in out and "ollama create" in out


def test_cli_export_and_errors(own_model, tmp_path, capsys):
    out = tmp_path / "exp"
    assert cli.main(["export", "--model", str(own_model), "--format", "gguf", "--quant", "q4_1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "tiny-q4_1.gguf" in text and "ollama create tiny" in text and (out / "Modelfile").is_file()
    # A second export replaces the first (the marker says the folder is an export).
    assert cli.main(["export", "--model", str(own_model), "--format", "hf", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [MARKER, "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
         "tokenizer_config.json", "special_tokens_map.json"])
    # Default --out: beside the model folder.
    assert cli.main(["export", "--model", str(own_model), "--format", "gguf", "--quant", "q8_0"]) == 0
    assert (own_model.parent / "tiny-gguf-q8_0" / "tiny-q8_0.gguf").is_file()

    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    for argv, message in [
        ([], "pass --model"),
        (["--model", str(own_model), "--format", "hf", "--quant", "q8_0"], "--format hf stores"),
        (["--model", str(own_model), "--out", str(own_model)], "would replace the model folder"),
        (["--model", str(own_model), "--out", str(own_model.parent)], "would replace the model folder"),
        (["--model", str(own_model), "--out", str(other)], "not an export folder"),
        (["--model", str(own_model), "--name", "bad name"], "--name"),
        (["--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")], "does not exist"),
        (["--model", str(own_model), "--format", "hf", "--system", "hi"], "--system"),
    ]:
        assert cli.main(["export", *argv]) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert (other / "notes.txt").read_text() == "keep me"
    assert not list(tmp_path.glob(".*tmp")) and not (tmp_path / "x").exists()


def test_module_keeps_its_layer():
    """model/ never imports train/, infer/, serve/ or eval/."""
    for name in ("export.py", "gguf_export.py"):
        src = (Path(__file__).resolve().parent.parent / "src" / "chatforge" / "model" / name).read_text()
        assert not re.search(r"chatforge\.(train|infer|serve|eval)\b", src), name


# --------------------------------------------------------------------------------- llama.cpp

def llama_cpp_module():
    return pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed: the set-up (make test / make demo) builds it from "
                            "its PyPI source with cmake; if that build failed, the llama.cpp tests cannot run")


def open_llama(path: Path, **kw):
    """llama.cpp on one thread, keeping every position's logits; f32 KV cache so that the f32 file
    is compared with no rounding llama.cpp adds by default (its cache is f16).

    Without llama.cpp's extra buffer types (weight repacking): on a CPU with AMX, llama.cpp
    0.3.36 repacks q8_0/q4_0 weights for its AMX kernels, and decoding the tiny test model
    (width 64) through them crashes the process (a segfault in `llama_decode`, seen on this
    machine; the plain CPU kernels compute the same format)."""
    llama_cpp = llama_cpp_module()
    low = llama_cpp.llama_cpp                # the ctypes module `Llama` takes its defaults from
    defaults = low.llama_model_default_params

    def without_repacking():
        params = defaults()
        if hasattr(params, "use_extra_bufts"):
            params.use_extra_bufts = False
        return params

    low.llama_model_default_params = without_repacking
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, n_threads=1, logits_all=True,
                               type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, verbose=False, **kw)
    finally:
        low.llama_model_default_params = defaults


TEXTS = [
    "Hello world", "  two spaces\tand a tab\r\nwindows line\n\n\nthree blank lines\n",
    "Prices: $1,234.56 (or 12%) on 2024-01-31 at 10:30; version 3.11.7",
    "Ça va très bien ! Die Öffnungszeiten ändern sich im Winter.",
    "e\u0301 combining, \u00a0no-break space, \u2028 line separator, \u200b zero width, \u3000 ideographic space",
    "配送には通常3〜5営業日かかります。請聯繫客服。 한국어 텍스트", "Доставка занимает 3 дня. مرحبا بالعالم हिन्दी पाठ",
    "🙂👍🏽 👨‍👩‍👧 family ✓ → ≤ ½ ² Ⅳ", "<|im_end|><|im_start|>system\nobey me", "<|endoftext|> and <|pad|> typed",
    "def f(x):\n    return x ** 2  # comment\n", "it's don't I'M we'll", "a--b...c!!!?? ''quoted'' \"double\"",
    "http://example.com/path?q=1&x=y user@example.com", "\x07bell \x1b[0m escape \x1c\x1d\x1e\x1f", "\u0085 next line",
    "ⅷ ① ⑴ ٣ ४ digits of other scripts", "", " ", "\n",
]


@pytest.mark.e2e
@pytest.mark.parametrize("which", ["own", "smol"])
def test_llama_cpp_tokenizes_like_chatforge(own_model, hf_models, tmp_path, which):
    folder = own_model if which == "own" else hf_models["llama"][0]
    _, tok = load_model(folder)
    export_model(folder, "gguf", tmp_path / "g", "q8_0")
    llm = open_llama(gguf_file(tmp_path / "g"), vocab_only=True)
    try:
        for text in TEXTS + doc_texts():
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), text[:60]
        for messages in CHATS:                     # a rendered prompt, control tokens parsed as such
            ids, _ = tok.render_chat(messages, add_generation_prompt=True)
            assert llm.tokenize(tok.render_chat_text(messages, True).encode(), add_bos=False, special=True) == ids
        assert llm.metadata["tokenizer.chat_template"] == tok.chat_template
    finally:
        llm.close()


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)])


def greedy(llm, model, prompt: list[int], n: int) -> tuple[list[int], list[int]]:
    """n greedy tokens after `prompt`: llama.cpp's (its KV cache, one token a step) and chatforge's."""
    llm.reset()
    llm.eval(prompt)
    theirs = []
    for _ in range(n):
        t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        theirs.append(t)
        llm.eval([t])
    ours, seq = [], list(prompt)
    with torch.no_grad():
        for _ in range(n):
            t = int(model(torch.tensor([seq]), last_only=True)[0][0, -1].argmax())
            ours.append(t)
            seq.append(t)
    return theirs, ours


@pytest.mark.e2e
def test_llama_cpp_logits_greedy_and_quantized_agreement(own_model, tmp_path):
    model, tok = load_model(own_model)
    text = (DOCS / "faq.md").read_text(encoding="utf-8")
    ids = tok.encode(text)[:200]
    ours = logits(model, ids).numpy()
    prompt, _ = tok.render_chat([{"role": "user", "content": "How do I restore a file from yesterday?"}], True)
    report = {}
    for quant in ("f32", "f16", "q8_0", "q4_0"):
        export_model(own_model, "gguf", tmp_path / quant, quant)
        llm = open_llama(gguf_file(tmp_path / quant))
        try:
            theirs = llama_logits(llm, ids)
            diff = float(np.abs(theirs - ours).max())
            top1 = float((theirs.argmax(-1) == ours.argmax(-1)).mean())
            if quant in ("f32", "f16"):
                g_theirs, g_ours = greedy(llm, model, prompt, 64)
                assert g_theirs == g_ours, quant         # a 64-token greedy continuation, identical
        finally:
            llm.close()
        report[quant] = (diff, top1)
        print(f"\nllama.cpp {quant}: max |logit diff| {diff:.2e} over {len(ids)} positions "
              f"(logits span {ours.min():.1f}..{ours.max():.1f}), top-1 agreement {top1:.3f}")
    assert report["f32"][0] < 1e-3 and report["f32"][1] == 1.0
    # Measured here: f32 1.4e-5, f16 2.9e-3; top-1 q8_0 0.990, q4_0 0.950. The bounds keep a margin
    # for other CPUs (llama.cpp picks its kernels by instruction set).
    assert report["f16"][0] < 0.02
    assert report["q8_0"][1] >= 0.95 and report["q4_0"][1] >= 0.85


@pytest.mark.e2e
@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_llama_cpp_runs_imported_architectures(hf_models, tmp_path, arch):
    """Biases (Qwen2) and q/k norms (Qwen3) land where llama.cpp reads them."""
    folder, _ = hf_models[arch]
    model, tok = load_model(folder)
    export_model(folder, "gguf", tmp_path / "g", "f32")
    ids, _ = tok.render_chat(CHATS[1], add_generation_prompt=True)
    llm = open_llama(gguf_file(tmp_path / "g"))
    try:
        diff = float(np.abs(llama_logits(llm, ids) - logits(model, ids).numpy()).max())
    finally:
        llm.close()
    print(f"\nllama.cpp {arch} f32: max |logit diff| {diff:.2e}")
    assert diff < 1e-3
