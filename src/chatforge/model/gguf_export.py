"""Write a chatforge model as a GGUF file (llama.cpp's format) and an Ollama `Modelfile` for it.

    from chatforge.model.gguf_export import write_gguf, modelfile
    write_gguf(model, tokenizer, "out/sft-q8_0.gguf", quant="q8_0", name="sft")
    modelfile("sft-q8_0.gguf", tokenizer, context=model.config.max_seq_len)

The command is `chatforge export --format gguf` (model/export.py). This is the reverse of
`gguf_import`, with the same two facts about the layout: PyTorch's (out, in) weight is GGML's
ne = [in, out], so arrays go in as they are; and for the `llama` architecture llama.cpp's
converter permutes the rows of `attn_q` / `attn_k` (per head, the two rotate-half halves become
interleaved pairs, which its RoPE rotates), so the rows are permuted here; `qwen2` / `qwen3`
files are not permuted. The `gguf` package does the rest: `GGUFWriter` writes GGUF v3, its tensor
name map gives each parameter's GGUF name, and `gguf.quants.quantize` quantizes.

What each `--quant` stores (1-D tensors, i.e. norms and biases, are always F32, as llama.cpp's
converter keeps them):
- f32 / f16 / bf16: every matrix in that type.
- q8_0: every matrix in Q8_0 (blocks of 32 weights, one fp16 scale each).
- q4_0 / q4_1: every matrix in that type except the token embedding and the output matrix (the
  same matrix when they are tied), kept at Q8_0: 4 bits there cost the most quality.
  llama-quantize keeps those at Q6_K, which the `gguf` package cannot write; the SmolLM2 Q4_1
  file chatforge imports keeps its embedding at Q8_0 the same way.
- a matrix whose rows are not a whole number of blocks falls back to F16 (as llama.cpp's
  converter does).

The tokenizer goes in as llama.cpp reads it: byte-level BPE (`gpt2`), the tokens in id order,
their types (control for special tokens, user-defined for other added tokens), the merges, the
special ids, `add_bos_token`, the chat template, and `tokenizer.ggml.pre`: the NAME of the
pre-tokenizer, from `data.gguf_tokenizer.llama_cpp_pre_name`, which refuses a tokenizer whose
split llama.cpp does not know (it would tokenize differently there).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import gguf
import numpy as np
import torch

from chatforge.data.gguf_tokenizer import llama_cpp_pre_name
from chatforge.errors import ChatforgeError
from chatforge.model.architectures import Architecture, architecture_of
from chatforge.model.gpt import GPT

QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")
# llama.cpp's type names (GGMLQuantizationType / LlamaFileType members) per --quant.
_TYPE_NAMES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1"}
_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
               "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1"}
# Kept at Q8_0 in 4-bit files (see the module docstring).
_EMBEDDINGS = ("token_embd.weight", "output.weight")
# llama.cpp token types (gguf.TokenType).
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


def gguf_architecture(c) -> Architecture:
    """The architecture a model with the `GPTConfig` `c` is written as (`.gguf_name`: qwen2 for
    q/k/v biases, qwen3 for q/k norms, else llama); a mixture of experts has none."""
    if c.n_experts:
        raise ChatforgeError("a mixture-of-experts model cannot be exported (llama.cpp's llama files have no "
                             "chatforge-style router); export a dense model")
    return architecture_of(c)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order for `llama` files: within each head, the rows of the first half
    (r0, r1, ...) and the second half (r_h/2, ...) are interleaved as (r0, r_h/2, r1, r_h/2+1, ...)."""
    head = w.shape[0] // n_head
    # (n_head, 2 halves, head/2, ...) -> (n_head, head/2 pairs, 2, ...)
    return w.reshape(n_head, 2, head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensor_type(gguf_name: str, shape: tuple[int, ...], quant: str) -> Any:
    """The GGML type a tensor is stored in for `quant` (see the module docstring)."""
    Q = gguf.GGMLQuantizationType
    if len(shape) == 1:
        return Q.F32
    qtype = Q[_TYPE_NAMES[quant]]
    if quant in ("q4_0", "q4_1") and gguf_name in _EMBEDDINGS:
        qtype = Q.Q8_0
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block:
        return Q.F16
    return qtype


def gguf_tensors(model: GPT, quant: str) -> Iterator[tuple[str, np.ndarray, Any]]:
    """(GGUF name, stored data, GGML type) for every weight of `model`, in the model's order."""
    c = model.config
    arch = gguf_architecture(c)
    names = arch.gguf_tensor_names(c.n_layer)
    for hf_name, t in model.hf_state_dict().items():
        if hf_name == "lm_head.weight" and c.tie_embeddings:
            continue                           # llama.cpp uses token_embd when there is no output.weight
        gname = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise ChatforgeError(f"{hf_name} has no GGUF name for the {arch.gguf_name} architecture; the model "
                                 "cannot be exported")
        w = t.detach().to(torch.float32).cpu().numpy()
        if arch.gguf_permuted_qk and gname.endswith(("attn_q.weight", "attn_q.bias")):
            w = permute_qk(w, c.n_head)
        elif arch.gguf_permuted_qk and gname.endswith(("attn_k.weight", "attn_k.bias")):
            w = permute_qk(w, c.n_kv_head)
        qtype = tensor_type(gname, w.shape, quant)
        yield gname, gguf.quants.quantize(np.ascontiguousarray(w), qtype), qtype


def add_tokenizer(writer: Any, tokenizer: Any) -> None:
    """Write `tokenizer` (a ChatTokenizer) as llama.cpp's tokenizer metadata."""
    hf = tokenizer.hf_tokenizer
    pre = llama_cpp_pre_name(hf)
    spec = json.loads(hf.to_str())
    added = hf.get_added_tokens_decoder()              # id -> AddedToken
    tokens, types = [], []
    for i in range(tokenizer.vocab_size):
        token = hf.id_to_token(i)
        if token is None:                              # a hole in the ids: a placeholder llama.cpp skips
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        tokens.append(token)
        types.append(NORMAL if i not in added else CONTROL if added[i].special else USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    ids = {"bos": tokenizer.bos_token, "eos": tokenizer.eos_token, "unk": tokenizer.unk_token,
           "pad": tokenizer.pad_token}
    for key, token in ids.items():
        if token is not None:
            getattr(writer, f"add_{key}_token_id")(tokens.index(token))
    writer.add_add_bos_token(tokenizer.add_bos_token)
    writer.add_add_eos_token(False)
    writer.add_chat_template(tokenizer.chat_template)


def write_gguf(model: GPT, tokenizer: Any, path: str | Path, quant: str = "f16", name: str = "model") -> Counter:
    """Write `model` (fp32 weights) and `tokenizer` as the GGUF v3 file `path`, weights stored as
    `quant`. Returns the count of tensors per stored type. `path` is written in place: callers
    write into a temporary folder (model/export.py does)."""
    if quant not in QUANTS:
        raise ChatforgeError(f"unknown GGUF quantization {quant!r}; choose one of {', '.join(QUANTS)}")
    c = model.config
    writer = gguf.GGUFWriter(str(path), gguf_architecture(c).gguf_name)
    writer.add_type("model")
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType[_FILE_TYPES[quant]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(c.vocab_size)
    writer.add_context_length(c.max_seq_len)
    writer.add_embedding_length(c.d_model)
    writer.add_block_count(c.n_layer)
    writer.add_feed_forward_length(c.d_ff)
    writer.add_head_count(c.n_head)
    writer.add_head_count_kv(c.n_kv_head)
    writer.add_layer_norm_rms_eps(c.norm_eps)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_rope_dimension_count(c.head_dim)
    if c.head_size is not None or c.qk_norm:
        # llama.cpp takes d_model / n_head otherwise
        writer.add_key_length(c.head_dim)
        writer.add_value_length(c.head_dim)
    add_tokenizer(writer, tokenizer)
    return write_tensors(writer, gguf_tensors(model, quant))


def write_tensors(writer, tensors) -> Counter:
    """Add `tensors` ((name, data, GGML type) triples) to `writer` after its metadata, write the
    file and close it; the count of tensors per type."""
    types: Counter = Counter()
    for gname, data, qtype in tensors:
        writer.add_tensor(gname, data, raw_dtype=qtype)
        types[qtype.name] += 1
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return types


# ---- Ollama ------------------------------------------------------------------------------------

# A Go template (Ollama's template language) that renders ChatML exactly as the tokenizer's chat
# template does: each message as <|im_start|>ROLE\nCONTENT<|im_end|>\n, then the generation prompt.
# Ollama puts the Modelfile's SYSTEM message first when a conversation has no system message, as
# the Jinja templates with a default system message (SmolLM2's) do.
OLLAMA_TEMPLATE = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
                   "{{ end }}<|im_start|>assistant\n")


def modelfile(gguf_file: str, tokenizer: Any, context: int, system: str | None = None,
              adapter: str | None = None) -> str:
    """The text of an Ollama Modelfile for `gguf_file` (a path relative to the Modelfile).

    `system` is the system message (default: the one the chat template inserts, if any). The
    parameters are chatforge serve's defaults: greedy replies, no repetition penalty (it punishes
    copying from the passages), the model's whole context, stops at the end-of-turn tokens.
    `adapter`: a LoRA GGUF (path relative to the Modelfile) that Ollama applies to `gguf_file`,
    then the base model the adapter was trained on."""
    system = tokenizer.default_system if system is None else system
    lines = ["# Ollama Modelfile written by `chatforge export`: ollama create NAME -f Modelfile; ollama run NAME",
             f"FROM {_ollama_path(gguf_file)}"]
    if adapter:
        lines.append(f"ADAPTER {_ollama_path(adapter)}")
    lines.append(f'TEMPLATE """{OLLAMA_TEMPLATE}"""')
    if system:
        lines.append(f'SYSTEM """{_ollama_text(system)}"""')
    stops = dict.fromkeys(tokenizer.id_to_token(i) for i in (tokenizer.im_end_id, tokenizer.eot_id))
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines += [f"PARAMETER num_ctx {int(context)}", "PARAMETER temperature 0", "PARAMETER repeat_penalty 1"]
    return "\n".join(lines) + "\n"


def _ollama_path(path: str) -> str:
    """A file path as a Modelfile value: relative ones start with ./ or ../ (Ollama resolves them
    from the Modelfile's folder); one with whitespace is quoted."""
    if '"' in path or "\n" in path:
        raise ChatforgeError(f"the path {path!r} cannot go into an Ollama Modelfile (quotes or line breaks)")
    if not path.startswith(("/", "./", "../")):
        path = f"./{path}"
    return f'"{path}"' if any(ch.isspace() for ch in path) else path


def _ollama_text(text: str) -> str:
    """`text` checked for a triple-quoted Modelfile value: Ollama's parser ends the value at the
    first closing \"\"\" and keeps only printable characters, tabs and line breaks."""
    if '"""' in text:
        raise ChatforgeError('the system message contains """, which an Ollama Modelfile cannot hold; rephrase it')
    bad = sorted({repr(ch) for ch in text if not (ch.isprintable() or ch in "\n\t")})
    if bad:
        raise ChatforgeError(f"the system message holds characters Ollama's Modelfile parser drops "
                             f"({', '.join(bad[:5])}); remove them")
    return text
