"""The GPT: a decoder-only, Llama-compatible transformer in one file.

Token embedding -> N x [RMSNorm -> attention (RoPE, grouped-query, SDPA) -> residual,
RMSNorm -> SwiGLU MLP (or a mixture of experts) -> residual] -> RMSNorm -> LM head.
No biases; the input and output embeddings may be tied.

Parameter names are exactly those of HF `LlamaForCausalLM` without the leading `model.`
(`layers.0.self_attn.q_proj.weight`, ...), and RoPE uses the same "rotate half" layout, so a
dense model's weights load into `LlamaForCausalLM` as they are (see `hf_state_dict`).

Three config switches, all off by default, exist for imported checkpoints (`model/importer.py`):
`qkv_bias` (Qwen2: biases on the q/k/v projections), `qk_norm` (Qwen3: an RMSNorm over each
head's queries and keys before RoPE, as `q_norm` / `k_norm`, HF's names) and `head_size` (a head
width other than d_model / n_head, as Qwen3 has). With them on, the names and the maths are those
of HF `Qwen2ForCausalLM` / `Qwen3ForCausalLM`, and `hf_config` names that class.

Shapes in comments: B batch, T new tokens, S keys (cached + new), C model width,
nh heads, nkv key/value heads, hs head size.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from chatforge.errors import ChatforgeError
from chatforge.model.architectures import architecture_of


@dataclass
class GPTConfig:
    vocab_size: int = 8192
    max_seq_len: int = 512       # longest context; RoPE tables are built for this length
    d_model: int = 384
    n_layer: int = 6
    n_head: int = 6
    n_kv_head: int = 2           # < n_head: grouped-query attention (smaller KV cache)
    d_ff: int = 1024             # SwiGLU hidden width
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True  # share the token embedding with the LM head
    dropout: float = 0.0         # on attention weights and on both residual branches
    n_experts: int = 0           # 0 = dense MLP; > 1 = mixture of experts
    experts_per_token: int = 2
    moe_aux_weight: float = 0.01  # weight of the load-balancing loss added to the LM loss
    # Switches for imported checkpoints; the defaults keep the model 1:1 with LlamaForCausalLM,
    # and config.json files written before they existed still load (they take the defaults).
    head_size: int | None = None  # width of one attention head; None = d_model // n_head (Qwen3 sets it)
    qkv_bias: bool = False       # biases on the q, k and v projections (Qwen2; o_proj has none)
    qk_norm: bool = False        # RMSNorm over each head's q and k before RoPE (Qwen3)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ChatforgeError(f"invalid model config: {msg}")

        need(self.vocab_size > 0, f"vocab_size must be positive, got {self.vocab_size}")
        need(self.max_seq_len > 0, f"max_seq_len must be positive, got {self.max_seq_len}")
        need(self.n_layer > 0 and self.d_model > 0 and self.d_ff > 0, "n_layer, d_model, d_ff must be positive")
        need(self.n_head > 0, f"n_head must be positive, got {self.n_head}")
        if self.head_size is None:
            need(self.d_model % self.n_head == 0,
                 f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        else:
            need(self.head_size > 0, f"head_size must be positive (or null), got {self.head_size}")
        need(self.head_dim % 2 == 0, f"head size ({self.head_dim}) must be even for RoPE")
        need(0 < self.n_kv_head <= self.n_head and self.n_head % self.n_kv_head == 0,
             f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        need(self.n_experts == 0 or (self.n_experts > 1 and 0 < self.experts_per_token <= self.n_experts),
             "n_experts must be 0 (dense) or > 1 with 0 < experts_per_token <= n_experts")

    @property
    def head_dim(self) -> int:
        return self.head_size if self.head_size is not None else self.d_model // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ChatforgeError(f"unknown model config keys {sorted(unknown)}; is this a chatforge config.json?")
        return cls(**d)


# The vocabulary size here is the typical one; a real model takes its tokenizer's.
PRESETS: dict[str, dict] = {
    # ~1M parameters: for tests and smoke runs.
    "tiny": dict(vocab_size=8192, d_model=96, n_layer=4, n_head=4, n_kv_head=2, d_ff=256, max_seq_len=256),
    # ~13M: the default for the CPU demo.
    "small": dict(vocab_size=8192, d_model=384, n_layer=6, n_head=6, n_kv_head=2, d_ff=1024, max_seq_len=512),
    # ~125M (GPT-2 small class).
    "base": dict(vocab_size=32768, d_model=768, n_layer=12, n_head=12, n_kv_head=4, d_ff=2048,
                 max_seq_len=1024, tie_embeddings=False),
    # ~370M: for GPUs.
    "large": dict(vocab_size=32768, d_model=1024, n_layer=24, n_head=16, n_kv_head=8, d_ff=3072,
                  max_seq_len=2048, tie_embeddings=False),
}


def preset(name: str, **overrides) -> GPTConfig:
    """The named preset's config with `overrides` (e.g. vocab_size) applied."""
    if name not in PRESETS:
        raise ChatforgeError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return GPTConfig(**{**PRESETS[name], **overrides})


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (as Llama does) so bf16 activations do not lose the small variances.
        # F.rms_norm is x * rsqrt(mean(x^2) + eps) in one call (on CPU still several kernels, but
        # one Python-level dispatch): at decode time this layer is dominated by per-op overhead.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, (max_len, head_dim), in the 'rotate half' layout of HF Llama."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (max_len, hs/2)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


# SDPA shares key/value heads across query groups itself since torch 2.5 (no repeat_interleave copy).
_SDPA_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, n, T, hs); cos/sin: (B, 1, T, hs)
    # chunk, not slicing: its backward is one cat, where each slice's backward zero-fills a
    # full-size gradient (measured: ~5% of a CPU training step).
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)
        if cfg.qk_norm:
            # One weight vector per projection, shared by all heads, normalising each head's vector.
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.qk_norm = cfg.qk_norm
        self.dropout = cfg.dropout
        # q/k/v as one layer, set only on an inference copy by `model/fuse.py` (which then
        # drops q_proj, k_proj and v_proj): one matmul, and RoPE applied once to q and k together.
        self.qkv_proj = None

    def forward(self, x, cos, sin, cache=None, attn_mask=None):
        B, T, _ = x.shape
        nh, nkv = self.n_head, self.n_kv_head
        if self.qkv_proj is not None:
            heads = self.qkv_proj(x).view(B, T, nh + 2 * nkv, self.head_dim).transpose(1, 2)  # (B, nh+2nkv, T, hs)
            qk, v = heads.split([nh + nkv, nkv], dim=1)
            q, k = apply_rope(qk, cos, sin).split([nh, nkv], dim=1)
        else:
            q = self.q_proj(x).view(B, T, nh, self.head_dim)                          # (B, T, nh, hs)
            k = self.k_proj(x).view(B, T, nkv, self.head_dim)                         # (B, T, nkv, hs)
            if self.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = q.transpose(1, 2), k.transpose(1, 2)                               # (B, nh|nkv, T, hs)
            v = self.v_proj(x).view(B, T, nkv, self.head_dim).transpose(1, 2)         # (B, nkv, T, hs)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)                                 # (B, nkv, S, hs)
            # A cache may be in another dtype than the weights (an fp32 cache beside bf16
            # weights): attend in the cache's dtype.
            q = q.to(k.dtype)
        gqa = self.n_kv_head != self.n_head
        if gqa and not _SDPA_GQA:
            # Each group of n_head / n_kv_head query heads shares one key/value head.
            rep = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)   # (B, nh, S, hs)
            gqa = False
        S = k.shape[2]
        # Without an explicit mask: a fresh sequence is plainly causal; one new token may see all
        # keys; several new tokens after a cached prefix need the causal mask shifted by the prefix.
        is_causal = attn_mask is None and T > 1 and S == T
        if attn_mask is None and T > 1 and S != T:
            attn_mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0,
                                           **({"enable_gqa": True} if gqa else {}))
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim).to(x.dtype)  # (B, T, nh*hs)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)
        self.gate_up_proj = None     # gate and up as one layer on an inference copy (model/fuse.py)

    def forward(self, x):
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """A mixture of SwiGLU experts: each token goes to its top-k experts by a learned router.

    The load-balancing loss (Switch Transformer style: n_experts * sum_i f_i * P_i, where f_i is
    the fraction of routed slots that chose expert i and P_i its mean router probability) is 1.0
    when routing is uniform and grows as experts are starved or crowded.
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.k = cfg.experts_per_token
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(MLP(cfg.d_model, cfg.d_ff) for _ in range(cfg.n_experts))
        self.aux_loss = torch.zeros(())
        self.last_choice: torch.Tensor | None = None  # (B*T, k) expert ids, kept for inspection

    def forward(self, x):
        B, T, C = x.shape
        flat = x.reshape(-1, C)                                              # (N, C)
        probs = F.softmax(self.router(flat).float(), dim=-1)                 # (N, E)
        weights, choice = probs.topk(self.k, dim=-1)                         # (N, k)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        self.last_choice = choice
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token_idx, slot = (choice == e).nonzero(as_tuple=True)
            if token_idx.numel():
                out.index_add_(0, token_idx, expert(flat[token_idx]) * weights[token_idx, slot, None])
        n_exp = len(self.experts)
        frac = torch.bincount(choice.flatten(), minlength=n_exp).float() / choice.numel()
        self.aux_loss = n_exp * (frac * probs.mean(0)).sum()
        return out.view(B, T, C)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MoE(cfg) if cfg.n_experts else MLP(cfg.d_model, cfg.d_ff)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, cache=None, attn_mask=None):
        x = x + self.resid_dropout(self.self_attn(self.input_layernorm(x), cos, sin, cache, attn_mask))
        x = x + self.resid_dropout(self.mlp(self.post_attention_layernorm(x)))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        # Not saved in checkpoints: they are a pure function of the config.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.aux_loss = torch.zeros(())
        self.apply(self._init_weights)
        # Scale the projections that write into the residual stream so its variance does not
        # grow with depth (GPT-2's trick).
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def extend_context(self, max_seq_len: int) -> None:
        """Let the model take `max_seq_len` tokens (e.g. to fine-tune on longer rows than it was
        pretrained on). Only the RoPE tables grow: no weight depends on the length, and the
        positions beyond the old context are learned by the training that follows."""
        if max_seq_len <= self.config.max_seq_len:
            return
        self.config.max_seq_len = max_seq_len
        cos, sin = rope_tables(self.config.head_dim, max_seq_len, self.config.rope_theta)
        device = self.rope_cos.device
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed_tokens.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6 per weight plus the attention scores.

        For a mixture of experts only the k active experts count.
        """
        cfg = self.config
        T = seq_len or cfg.max_seq_len
        # Tied: the shared matrix counts once, as the head (a lookup costs no FLOPs).
        n = self.num_params() if cfg.tie_embeddings else self.num_params(non_embedding=True)
        if cfg.n_experts:
            per_expert = 3 * cfg.d_model * cfg.d_ff
            n -= cfg.n_layer * per_expert * (cfg.n_experts - cfg.experts_per_token)
        # The PaLM paper's count, as MFU figures use (the attention width is n_head * head size).
        return 6 * n + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * T

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, cache=None,
                positions: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                last_only: bool = False, loss_only: bool = False, take: torch.Tensor | None = None):
        """Logits (B, T, vocab) (or (B, 1, vocab) with last_only) and the loss if targets are given.

        take: (B,) one position per row whose logits alone are computed, (B, 1, vocab): the last
        real token of right-padded prompts prefilled together.

        targets: (B, T) next-token ids, -100 where no loss is wanted.
        loss_only: with targets, apply the LM head only where a target is (logits come back None).
        The head is a 576 x 49152 matmul for a model like SmolLM2-135M, a fifth of its forward
        FLOPs; in SFT most positions are prompt tokens without a target, so this skips most of it.
        cache: a KV cache (see docs/ARCHITECTURE.md); positions: (B, T) RoPE positions;
        attn_mask: (B, 1, T, S) boolean, True = may attend.
        """
        B, T = idx.shape
        if positions is None:
            start = cache.pos if cache is not None else 0
            if start + T > self.config.max_seq_len:
                raise ChatforgeError(f"sequence of {start + T} tokens is longer than the model's context "
                                     f"({self.config.max_seq_len}); shorten the input")
            positions = torch.arange(start, start + T, device=idx.device).unsqueeze(0)  # (1, T)
        cos = self.rope_cos[positions].unsqueeze(1)  # (B or 1, 1, T, hs)
        sin = self.rope_sin[positions].unsqueeze(1)
        x = self.embed_tokens(idx)                   # (B, T, C)
        for block in self.layers:
            x = block(x, cos, sin, cache, attn_mask)
        x = self.norm(x)
        if last_only:
            x = x[:, -1:, :]
        elif take is not None:
            x = x[torch.arange(B, device=x.device), take].unsqueeze(1)
        if loss_only and targets is not None:
            keep = targets.reshape(-1) != -100
            logits, targets = None, targets.reshape(-1)[keep]
            flat = self.lm_head(x.reshape(-1, x.size(-1))[keep])                       # (N, vocab)
        else:
            logits = self.lm_head(x)
            flat = logits.view(-1, logits.size(-1))
        loss = None
        if self.config.n_experts:
            self.aux_loss = sum(b.mlp.aux_loss for b in self.layers) / self.config.n_layer
        if targets is not None:
            loss = F.cross_entropy(flat.float(), targets.reshape(-1), ignore_index=-100)
            if self.config.n_experts:
                loss = loss + self.config.moe_aux_weight * self.aux_loss
        return logits, loss

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under the names of the HF class `hf_config` names (dense models only)."""
        if self.config.n_experts:
            raise ChatforgeError("a mixture-of-experts model has no LlamaForCausalLM equivalent")
        out = {}
        for name, t in self.state_dict().items():
            out[name if name.startswith("lm_head") else f"model.{name}"] = t
        return out

    def hf_config(self) -> dict:
        """The matching HF config fields: `LlamaConfig`, or `Qwen2Config` with qkv_bias, or
        `Qwen3Config` with qk_norm (the model's maths is then exactly that class's;
        `model/architectures.py` names it)."""
        c = self.config
        arch = architecture_of(c)
        out = dict(vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff,
                   num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
                   max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
                   tie_word_embeddings=c.tie_embeddings, hidden_act="silu")
        if c.head_size is not None or c.qk_norm:
            out["head_dim"] = c.head_dim          # Qwen3Config's default (128) is not d_model / n_head
        return arch.hf_config(out)
