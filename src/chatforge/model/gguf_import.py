"""Read a GGUF file (llama.cpp's format: llama, qwen2, qwen3) as a chatforge `Checkpoint`.

    from chatforge.model.gguf_import import open_gguf, read_gguf
    reader = open_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    ckpt = read_gguf(reader, "SmolLM2-135M-Instruct.Q4_1.gguf")

The `gguf` package does the work that is easy to get subtly wrong: `GGUFReader` parses the file
(memory-mapped, nothing executed), `gguf.quants.dequantize` turns every stored type (F32, F16,
BF16, Q8_0, Q4_0/1, Q5_0/1, the K-quants, ...) into fp32, and the package's tensor-name map gives
the GGUF name of each HF parameter name (`model.layers.3.self_attn.q_proj.weight` ->
`blk.3.attn_q.weight`), which are chatforge's names with a leading `model.`.

Two facts about the layout:
- numpy shapes are GGML's `ne` reversed: a tensor listed as [576, 49152] is read as
  (49152, 576), which is already PyTorch's (out, in) layout for a linear weight.
- llama.cpp's converter permutes the rows of `attn_q` / `attn_k` for `llama` files (Mistral's
  GGUFs are `llama` too): within each head it interleaves the two halves, so that its RoPE can
  rotate adjacent pairs, where HF (and chatforge) rotate the first half against the second. The
  permutation is undone here. `qwen2` / `qwen3` use the rotate-half ("NEOX") RoPE in llama.cpp
  and are stored unpermuted (transformers' GGUF loader also un-permutes `llama` only).

Config comes from the metadata (`{arch}.block_count`, `.embedding_length`, ...); the vocabulary
size from the token list; the embeddings are tied when there is no `output.weight`. Refused with
a message: another architecture, RoPE scaling (`rope.scaling.type` other than none, or a
`rope_freqs` tensor), partial RoPE, per-layer head counts, tensors the architecture does not have.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf.quants import dequantize

from chatforge.errors import ChatforgeError
from chatforge.model.architectures import Architecture, from_gguf_name
from chatforge.model.checkpoint import Checkpoint, check_state, context_length, expected_shapes
from chatforge.model.gpt import GPTConfig


def open_gguf(path: str | Path):
    """A `gguf.GGUFReader` on `path` (memory-mapped), with clear errors for a bad file."""
    path = Path(path)
    if not path.is_file():
        raise ChatforgeError(f"{path} does not exist; pass a .gguf file or a Hugging Face model folder")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as e:
        # A wrong magic number, a truncated header or an array running past the end of the file.
        raise ChatforgeError(f"{path} is not a readable GGUF file ({e}); pass a .gguf file or an HF model folder") from None


def _meta(reader, key: str, default=None):
    """The value of metadata `key` (a str, number or list), or `default` when absent."""
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation. Per head, llama.cpp stores the rows as pairs
    (r0, r_h/2, r1, r_h/2+1, ...); HF order is the first half, then the second: (r0, r1, ...)."""
    rows = w.shape[0]
    head = rows // n_head
    # (n_head, head/2 pairs, 2, ...) -> (n_head, 2 halves, head/2, ...)
    return w.reshape(n_head, head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def config_from_gguf(reader, where: str, notes: list[str]) -> tuple[Architecture, GPTConfig]:
    """(architecture, GPTConfig) from a GGUF file's metadata."""
    architecture = from_gguf_name(_meta(reader, "general.architecture"), where)
    arch = architecture.gguf_name

    def need(key: str):
        value = _meta(reader, f"{arch}.{key}")
        if value is None:
            raise ChatforgeError(f"{where}: metadata {arch}.{key} is missing; the file is incomplete")
        return value

    tokens = reader.fields.get("tokenizer.ggml.tokens")
    # An array field's `data` indexes its items: the count without decoding 50k+ strings.
    vocab = len(tokens.data) if tokens is not None else _meta(reader, f"{arch}.vocab_size")
    if vocab is None:
        raise ChatforgeError(f"{where}: no tokenizer.ggml.tokens (and no {arch}.vocab_size): the vocabulary size "
                             "is unknown")
    d_model, n_head = int(need("embedding_length")), need("attention.head_count")
    n_kv_head = _meta(reader, f"{arch}.attention.head_count_kv", n_head)
    if isinstance(n_head, list) or isinstance(n_kv_head, list):
        raise ChatforgeError(f"{where}: per-layer head counts are not supported")
    key_len = _meta(reader, f"{arch}.attention.key_length")
    value_len = _meta(reader, f"{arch}.attention.value_length", key_len)
    if key_len != value_len:
        raise ChatforgeError(f"{where}: keys of {key_len} and values of {value_len} dimensions per head are "
                             "not supported (they must be equal)")
    head = int(key_len) if key_len else d_model // int(n_head)
    rope_dims = _meta(reader, f"{arch}.rope.dimension_count")
    if rope_dims is not None and int(rope_dims) != head:
        raise ChatforgeError(f"{where}: RoPE over {rope_dims} of the {head} dimensions of a head (partial RoPE) "
                             "is not supported")
    tensor_names = {t.name for t in reader.tensors}
    scaling = _meta(reader, f"{arch}.rope.scaling.type")
    factor = _meta(reader, f"{arch}.rope.scaling.factor")
    if scaling not in (None, "none") or factor not in (None, 0.0, 1.0) or "rope_freqs.weight" in tensor_names:
        raise ChatforgeError(f"{where}: RoPE scaling ({scaling or 'rope_freqs'}) is not implemented by chatforge "
                             "(only plain RoPE); this model cannot be imported")
    config = GPTConfig(
        vocab_size=int(vocab), d_model=d_model, n_layer=int(need("block_count")), n_head=int(n_head),
        n_kv_head=int(n_kv_head), d_ff=int(need("feed_forward_length")),
        rope_theta=float(_meta(reader, f"{arch}.rope.freq_base", 10000.0)),
        norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        max_seq_len=context_length(int(need("context_length")),
                                   _meta(reader, f"{arch}.attention.sliding_window"), notes),
        tie_embeddings="output.weight" not in tensor_names,
        head_size=head if d_model % int(n_head) or head != d_model // int(n_head) else None,
        **architecture.switches)
    return architecture, config


def read_gguf(reader, path: str | Path) -> Checkpoint:
    """The checkpoint in an opened GGUF file, dequantized to fp32."""
    where = str(path)
    notes: list[str] = []
    architecture, config = config_from_gguf(reader, where, notes)
    arch = architecture.gguf_name
    names = architecture.gguf_tensor_names(config.n_layer)

    def gguf_name(name: str) -> str:
        hf = name if name.startswith("lm_head") else f"model.{name}"
        return names.get_name(hf, try_suffixes=(".weight", ".bias")) or name

    wanted = {gguf_name(n): n for n in expected_shapes(config)
              if not (config.tie_embeddings and n == "lm_head.weight")}
    extra = [t.name for t in reader.tensors if t.name not in wanted]
    if extra:
        more = f" (and {len(extra) - 3} more)" if len(extra) > 3 else ""
        raise ChatforgeError(f"{where}: unsupported tensor(s) {', '.join(extra[:3])}{more}: this variant of "
                             f"{arch} is not supported by chatforge")
    state: dict[str, torch.Tensor] = {}
    types: Counter = Counter()
    for tensor in reader.tensors:
        gname, ours = tensor.name, wanted[tensor.name]
        try:
            w = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise ChatforgeError(f"{where}: {gname} is stored as {tensor.tensor_type.name}, which the gguf package "
                                 "cannot dequantize; re-quantize the model to another type") from None
        shape = tuple(int(n) for n in reversed(tensor.shape))   # GGML ne is reversed numpy order
        if w.shape != shape:
            raise ChatforgeError(f"{where}: {gname} holds {w.shape} values where its header says {shape}; "
                                 "the file is corrupt")
        if architecture.gguf_permuted_qk and gname.endswith(("attn_q.weight", "attn_q.bias")):
            w = unpermute_qk(w, config.n_head)
        elif architecture.gguf_permuted_qk and gname.endswith(("attn_k.weight", "attn_k.bias")):
            w = unpermute_qk(w, config.n_kv_head)
        w = np.ascontiguousarray(w, dtype=np.float32)
        if not w.flags.writeable:
            w = w.copy()                             # F32 data is a read-only view of the memory-mapped file
        state[ours] = torch.from_numpy(w)
        types[tensor.tensor_type.name] += 1
    reverse = {v: k for k, v in wanted.items()}
    state = check_state(config, state, where, lambda n: reverse.get(n, n))
    return Checkpoint(config, state, arch, Path(path), types, notes)
