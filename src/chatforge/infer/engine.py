"""The inference engine: token ids in, token ids (and text) out.

`Engine(model, tokenizer=None, stop_ids=None).generate(prompts, cfg)` runs a batch of prompts
through one prefill and a token-by-token decode over a preallocated KV cache (`KVCache`), with
greedy decoding, sampling (temperature, top-k, top-p, min-p, seeded) or beam search, and returns
one `GenerationResult` per prompt. `Engine.stream(prompt_ids, cfg)` yields text pieces as they
are generated. Everything that generates text (`chatforge generate`, `chat`, evaluation, the HTTP
server, PPO rollouts) goes through this class. The continuous-batching scheduler
(`infer/batching.py`) runs its own loop over the engine's step API: `forward` (one forward over a
cache), `check_prompts`, `stop_matcher`, `completion`, the `thread_limit()` context, and
`TextStream` for text pieces.

The engine knows token ids, not prompts: chat formatting lives in `infer/chat.py`. A tokenizer
(anything with `decode(ids) -> str`) is only used to fill `text`, to stream and to match stop
strings and `stop_after` patterns (a grounded answer ends with its citation: `retrieval/`).

Batching: prompts of different lengths are left-padded; each row gets its own RoPE positions
(counted from its first real token) and an attention mask that hides the padding, so a prompt's
output in a batch is the same as its output alone.

Semantics follow HF `generate` where it has an equivalent (the tests check them against it):
repetition penalty as `RepetitionPenaltyLogitsProcessor`, the warpers as `TopK/TopP/MinPLogitsWarper`
applied in the order temperature, top-k, top-p, min-p, and beam search with HF's length penalty
(score = sum of log-probs / generated_length ** length_penalty), `early_stopping` and n-best.
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
import warnings
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

from chatforge import runtime
from chatforge.errors import ChatforgeError
from chatforge.infer.sampling import LogitsPipeline, StopStrings, first_stop
from chatforge.model.fuse import prepare_for_decoding
from chatforge.model.quant import quantize_model

STRATEGIES = ("greedy", "sample", "beam")
MIN_TEMPERATURE = 1e-5       # sampling below this temperature is greedy decoding


@dataclass
class GenerationConfig:
    """How to generate. Validated on creation: a bad value raises `ChatforgeError`."""

    strategy: str = "greedy"             # greedy | sample | beam
    max_new_tokens: int = 128
    temperature: float = 1.0             # sample only; 0 means greedy (as in the OpenAI API)
    top_k: int = 0                       # sample only; 0 = off
    top_p: float = 1.0                   # sample only; in (0, 1], 1 = off
    min_p: float = 0.0                   # sample only; in [0, 1], 0 = off
    repetition_penalty: float = 1.0      # > 0; 1 = off (HF semantics, over prompt + generated)
    no_repeat_ngram_size: int = 0        # 0 = off
    frequency_penalty: float = 0.0       # in [-2, 2] (OpenAI's meaning): minus this x times generated
    presence_penalty: float = 0.0        # in [-2, 2] (OpenAI's meaning): minus this once generated
    num_beams: int = 4                   # beam only
    length_penalty: float = 1.0          # beam only: score = sum logprobs / len ** length_penalty
    early_stopping: bool | str = False   # beam only: True, False or "never" (HF's meanings)
    num_return_sequences: int = 1        # beam: <= num_beams best; sample: independent samples
    seed: int | None = None              # sample: a seed makes the output reproducible
    stop_strings: tuple[str, ...] = ()   # the text is cut before the first one that appears
    stop_after: tuple[str, ...] = ()     # regexes: the text ends with the first match (kept), e.g. a citation
    truncate_prompt: bool = False        # drop the oldest prompt tokens instead of failing
    # (token id, bias) pairs added to the logits of the first generated token only: the answer
    # settings' refusal bias makes the first token of the not-found reply less likely when the
    # answer starts (`infer.answer`), and nowhere later in the reply.
    first_token_bias: tuple[tuple[int, float], ...] = ()
    # The names a "(source:" in the reply may go on with: the given passages' (a grounded prompt's,
    # `infer.turn.Prompt.generation`); () = any text. See `sampling.CitationConstraint`.
    cite_names: tuple[str, ...] = ()
    # A token is banned when the n-gram it completes is already in the reply as often as the prompt
    # holds it (at least once), so a grounded reply may still copy its passages, their repeats
    # included (HF's no_repeat_ngram_size, over prompt and reply, forbids exactly that). 0 = off.
    reply_no_repeat_ngram_size: int = 0

    def __post_init__(self) -> None:
        self.stop_strings = tuple(self.stop_strings or ())
        self.cite_names = tuple(self.cite_names or ())
        self.stop_after = tuple(self.stop_after or ())
        self.first_token_bias = tuple(tuple(pair) for pair in (self.first_token_bias or ()))
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ChatforgeError(f"invalid generation setting: {msg}")

        need(self.strategy in STRATEGIES, f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        need(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
             f"max_new_tokens must be a positive integer, got {self.max_new_tokens}")
        need(self.temperature >= 0 and math.isfinite(self.temperature),
             f"temperature must be >= 0, got {self.temperature}")
        need(isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}")
        need(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        need(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        need(self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty),
             f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        need(isinstance(self.no_repeat_ngram_size, int) and self.no_repeat_ngram_size >= 0,
             f"no_repeat_ngram_size must be >= 0 (0 = off), got {self.no_repeat_ngram_size}")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            need(-2 <= value <= 2, f"{name} must be in [-2, 2], got {value}")
        need(isinstance(self.num_beams, int) and self.num_beams >= 1, f"num_beams must be >= 1, got {self.num_beams}")
        need(math.isfinite(self.length_penalty), f"length_penalty must be finite, got {self.length_penalty}")
        need(self.early_stopping in (True, False, "never"),
             f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        need(isinstance(self.num_return_sequences, int) and self.num_return_sequences >= 1,
             f"num_return_sequences must be >= 1, got {self.num_return_sequences}")
        if self.strategy == "beam":
            need(self.num_return_sequences <= self.num_beams,
                 f"num_return_sequences ({self.num_return_sequences}) cannot exceed num_beams ({self.num_beams})")
        if self.greedy:
            need(self.num_return_sequences == 1, "greedy decoding returns one sequence; use sample or beam for more")
        need(all(isinstance(s, str) and s for s in self.stop_strings), "stop strings must be non-empty text")
        # torch.Generator.manual_seed takes these; a larger seed raised inside the decode loop.
        need(self.seed is None or (isinstance(self.seed, int) and -(2 ** 63) <= self.seed < 2 ** 64),
             f"seed must be an integer from -2**63 to 2**64-1, got {self.seed!r}")
        need(all(len(pair) == 2 and isinstance(pair[0], int) and pair[0] >= 0
                 and isinstance(pair[1], (int, float)) and math.isfinite(pair[1]) for pair in self.first_token_bias),
             f"first_token_bias must be (token id >= 0, finite bias) pairs, got {self.first_token_bias!r}")
        need(isinstance(self.reply_no_repeat_ngram_size, int) and self.reply_no_repeat_ngram_size >= 0,
             f"reply_no_repeat_ngram_size must be >= 0 (0 = off), got {self.reply_no_repeat_ngram_size}")
        need(all(isinstance(n, str) and n.strip() and "\n" not in n for n in self.cite_names),
             f"cite_names must be non-empty one-line names, got {self.cite_names!r}")
        for pattern in self.stop_after:
            try:
                empty = re.compile(pattern).fullmatch("") is not None
            except (re.error, TypeError) as e:
                need(False, f"stop_after {pattern!r} is not a regular expression: {e}")
            need(not empty, f"stop_after {pattern!r} matches empty text, so it would end every answer at once")

    @property
    def greedy(self) -> bool:
        # A temperature below MIN_TEMPERATURE is greedy too: dividing float32 logits by it
        # overflows to inf, and the probabilities become NaN.
        return self.strategy == "greedy" or (self.strategy == "sample" and self.temperature < MIN_TEMPERATURE)


@dataclass
class Completion:
    """One generated continuation."""

    tokens: list[int]              # generated ids, without the stop token that ended them
    text: str | None               # decoded `tokens`, cut before a stop string (None without tokenizer)
    finish_reason: str             # "stop" (a stop token or string) or "length" (max_new_tokens / context)
    stop: int | str | re.Pattern | None = None  # the stop token id, stop string or stop_after pattern that ended it
    score: float | None = None     # beam search: sum of log-probs / length ** length_penalty


@dataclass
class GenerationResult:
    """The outcome for one prompt: its completions, best first (one unless n-best was asked)."""

    completions: list[Completion]
    prompt_tokens: int                   # prompt length actually used (after any truncation)

    @property
    def tokens(self) -> list[int]:
        return self.completions[0].tokens

    @property
    def text(self) -> str | None:
        return self.completions[0].text

    @property
    def finish_reason(self) -> str:
        return self.completions[0].finish_reason

    @property
    def score(self) -> float | None:
        return self.completions[0].score


class KVCache:
    """Keys and values of every layer, allocated once as (n_layer, B, n_kv_head, max_len, head_dim).

    `update` writes the new keys/values in place at `pos` and returns views up to the new length:
    nothing grows or is copied per token. `pos` advances after the last layer has written.
    """

    def __init__(self, n_layer: int, batch: int, n_kv_head: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (n_layer, batch, n_kv_head, max_len, head_dim)
        # Uninitialised: a position is only ever read after it was written (`update` returns views
        # up to `pos`), and zero-filling a batch-32 cache cost ~10 ms per call.
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.n_layer, self.max_len, self.batch = n_layer, max_len, batch
        self.pos = 0
        # Per-layer views, taken once: indexing the 5-d tensor each call costs dispatches per token.
        self._k_layers, self._v_layers = self.k.unbind(0), self.v.unbind(0)

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch: int, max_len: int,
                  dtype: torch.dtype | None = None) -> "KVCache":
        """A cache for `model`, in `dtype` (default: the model's weights' dtype)."""
        cfg = model.config
        p = next(model.parameters())
        return cls(cfg.n_layer, batch, cfg.n_kv_head, max_len, cfg.head_dim, dtype or p.dtype, p.device)

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v: (b, nkv, T, hs) with b <= the allocated batch (prefill may fill the first rows only).
        b, T = k.shape[0], k.shape[2]
        end = self.pos + T
        if end > self.max_len:
            raise ChatforgeError(f"KV cache full: {end} positions needed, {self.max_len} allocated")
        k_all, v_all = self._k_layers[layer_idx], self._v_layers[layer_idx]        # (batch, nkv, max_len, hs)
        if b != self.batch:
            k_all, v_all = k_all[:b], v_all[:b]
        k_all[:, :, self.pos:end] = k
        v_all[:, :, self.pos:end] = v
        if layer_idx == self.n_layer - 1:
            self.pos = end
        return k_all[:, :, :end], v_all[:, :, :end]

    def select_rows(self, rows: Sequence[int] | torch.Tensor, start: int = 0) -> None:
        """Make row i hold what row rows[i] held (beam reordering, fanning a prompt out to n rows).

        Only rows that change are copied, and only positions from `start` on: beam search passes
        the prompt length, since the beams of one prompt share their prompt's keys and values.
        The copy moves the cache through memory, so its size matters: at 32 rows it was a third
        of a beam step when every row and position was copied (on average ~11 of 32 rows move).
        """
        rows = rows.tolist() if isinstance(rows, torch.Tensor) else list(rows)
        dst = [i for i, r in enumerate(rows) if r != i]
        if not dst or start >= self.pos:
            return
        src = [rows[i] for i in dst]
        # A source that is itself overwritten (two beams swapping places) is saved first. One
        # strided copy per moved row beat index_select + index_copy_ on the same view by ~5x
        # (index_select gathers a non-contiguous view element by element).
        overwritten = set(src).intersection(dst)
        for cache in (self.k, self.v):
            view = cache[:, :, :, start:self.pos]                          # (n_layer, batch, nkv, S, hs)
            saved = {r: view[:, r].clone() for r in overwritten}
            for d, r in zip(dst, src):
                view[:, d].copy_(saved[r] if r in saved else view[:, r])


class _Batch:
    """Left-padded prompts and the per-row state the decode loop needs (positions, masks)."""

    def __init__(self, prompts: list[list[int]], fan_out: int, new_tokens: int, pad_id: int, device):
        self.lengths = [len(p) for p in prompts]
        self.n_prompts, self.fan_out = len(prompts), fan_out
        L = max(self.lengths)
        self.prompt_len, self.total_len = L, L + new_tokens
        pads = torch.tensor([L - n for n in self.lengths], device=device)
        self.ids = torch.tensor([[pad_id] * (L - len(p)) + p for p in prompts], device=device)   # (P, L)
        cols = torch.arange(L, device=device)
        self.positions = (cols[None, :] - pads[:, None]).clamp(min=0)                               # (P, L)
        self.padded = bool(pads.any())
        rows = torch.arange(self.n_prompts, device=device).repeat_interleave(fan_out)
        self.rows = rows                                                                           # (R,)
        # Per-row next RoPE position, advanced in place every step: (R, 1)
        self.next_pos = torch.tensor(self.lengths, device=device)[rows].unsqueeze(1).clone()
        self.prefill_mask = self.decode_mask = None
        if self.padded:
            # Keys of padding are hidden. A padding query may see itself so that its softmax row is
            # not empty (an all-masked row is NaN, and NaN keys would poison later layers).
            valid = torch.ones(len(prompts), self.total_len, dtype=torch.bool, device=device)
            valid[:, :L] = cols[None, :] >= pads[:, None]
            causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
            eye = torch.eye(L, dtype=torch.bool, device=device)
            self.prefill_mask = (causal & (valid[:, None, :L] | eye))[:, None]                 # (P, 1, L, L)
            self.decode_mask = valid[rows][:, None, None, :]                                   # (R, 1, 1, S_max)


class Engine:
    """Generation over token ids for one model. Reuse one Engine for many calls."""

    def __init__(self, model: torch.nn.Module, tokenizer=None, stop_ids: Iterable[int] | None = None,
                 pad_id: int | None = None, threads: int | None = None,
                 dtype: torch.dtype | str | None = "auto", quant: str | None = None, own: bool = False):
        """`threads`: torch intra-op threads while the model runs. By default a model under 1B
        parameters on CPU uses 1. Its decode steps are matrix-vector products bound by memory
        bandwidth, which a second core adds little to (the 135M model's weight matmuls: fp32
        1.0-1.15x faster with 2 threads), while on a busy machine every op waits for the thread
        whose core is taken: with 2 threads on the shared 2-core machine the 135M model decoded 4x
        (fp32) and over 10x (bf16) slower, and a 512-token prefill took 2-16x longer. The caller's
        setting is restored when the engine returns or yields.

        `dtype`: the weights to generate with. "auto" (the default) takes a bfloat16 copy where the
        device computes bf16 natively (CUDA; CPUs with AVX512-BF16 or AMX, `runtime.bf16_supported`)
        and the model's own weights elsewhere; "float32" (or "fp32") keeps fp32 weights, whose
        output equals HF's fp32 `generate` (the parity tests pin it); None keeps the model's dtype.
        Decoding reads every weight once per token, so half-size weights are faster: the 135M
        model decoded ~1.4x faster in bf16 at batch 1 (see benchmarks/bench_generate_135m.py). A copy
        leaves the model passed in as it is and is taken here: weights the caller changes
        afterwards (training) are not seen, so make a new Engine then. Asking for bfloat16
        explicitly on a CPU without native bf16 instructions warns and keeps fp32: emulated bf16
        matrix products are slower. The KV cache is kept in the weights' dtype: with torch 2.x's
        CPU kernels, attention over a bf16 cache was as fast as over an fp32 one at batch 1 and
        1.5-2x faster at batch 8 (600 cached keys; a 135M model's decode step 71-110 ms against
        114-202 ms at batch 8, 51-54 ms either way at batch 1, same greedy tokens), and it takes half
        the memory (the 135M model: 23 KB a position instead of 46). A copy is also
        rewritten for decoding (`model/fuse.py`: q/k/v and gate/up each one matmul, bf16
        weights prepacked for oneDNN): the demo assistant (SmolLM2-135M) decoded 1.6x faster in
        bf16 at batch 1 on 1 thread, same tokens. A model used as given is never rewritten.

        `quant`: "int8" or "int4" stores every linear layer's weights in 8 or 4 bits
        (`model/quant.py`; CPU only), computing in the weights' dtype chosen above. Its output is
        measured (perplexity, agreement), not asserted equal to the full-precision model's.

        `own`: the caller hands the model over (a server that loaded it for this engine alone, in
        the serving dtype: `load_model(dtype=)`): it is rewritten for decoding in place, as a copy
        would be, so no second copy of the weights is made."""
        given = getattr(model, "_orig_mod", model)
        self.model = _in_dtype(given, dtype).eval()
        # A copy the engine owns (another dtype, or quantized) is only ever run, so it is rewritten
        # for decoding speed (model/fuse.py): q/k/v and gate/up fused, bf16 weights prepacked
        # for oneDNN. A model used as it was given is left alone: its owner may train or refresh it.
        owned = own or self.model is not given
        if quant:
            self.model = quantize_model(self.model, quant, fuse=True, inplace=own)
        elif owned:
            prepare_for_decoding(self.model)
        self.quant = quant
        self.config = self.model.config
        self.tokenizer = tokenizer
        if stop_ids is None:
            # The tokenizer's end-of-text and end-of-turn tokens, when it has them.
            stop_ids = [getattr(tokenizer, a) for a in ("eot_id", "im_end_id") if getattr(tokenizer, a, None) is not None]
        self.stop_ids = sorted(set(int(i) for i in stop_ids))
        self.pad_id = pad_id if pad_id is not None else getattr(tokenizer, "pad_id", None) or 0
        weights = next(self.model.parameters())
        self.device, self.dtype = weights.device, weights.dtype
        self.cache_dtype = self.dtype if self.dtype.is_floating_point else torch.float32
        if threads is None and self.device.type == "cpu":
            threads = 1 if sum(p.numel() for p in self.model.parameters()) < 1e9 else None
        self.threads = threads

    # ----------------------------------------------------------------------------------- public

    def generate(self, prompts: Sequence[Sequence[int]], cfg: GenerationConfig | None = None) -> list[GenerationResult]:
        """Complete every prompt (a list of token ids); one result per prompt, in order."""
        cfg = cfg or GenerationConfig()
        prompts = self.check_prompts(prompts, cfg)
        if not prompts:
            return []
        with torch.inference_mode(), self.thread_limit():
            if cfg.strategy == "beam":
                outs = self._beam_search(prompts, cfg)
            else:
                outs = self._decode(prompts, cfg)
        return [GenerationResult(c, len(p)) for c, p in zip(outs, prompts)]

    def stream(self, prompt_ids: Sequence[int], cfg: GenerationConfig | None = None) -> Iterator[str]:
        """Yield the completion of one prompt as text pieces, as soon as they are whole characters.

        A byte-level BPE token may end in the middle of a UTF-8 character; such bytes are held back
        until the character is complete, and so is any text that could be the start of a stop string.
        """
        cfg = cfg or GenerationConfig()
        if self.tokenizer is None:
            raise ChatforgeError("streaming needs a tokenizer: pass one to Engine(model, tokenizer)")
        if cfg.strategy == "beam" or cfg.num_return_sequences != 1:
            raise ChatforgeError("streaming works with greedy or sample and one sequence; beam search "
                                 "only knows its best sequence at the end")
        (prompt,) = self.check_prompts([prompt_ids], cfg)
        text = TextStream(self.tokenizer, cfg.stop_strings, cfg.stop_after)
        steps = self._decode_steps([prompt], cfg, _new_state(1))
        while True:
            # The limit holds while the engine works, not while the caller handles a piece.
            with torch.inference_mode(), self.thread_limit():
                step = next(steps, None)
            if step is None:
                break
            tok = step[0]
            if tok is None:
                continue
            piece = text.push(tok)
            if piece:
                yield piece
            if text.stopped:
                return
        tail = text.finish()
        if tail:
            yield tail

    # -------------------------------------------------------------------------------- one step
    # What a scheduler that batches requests itself (`infer/batching.py`) needs to drive the same
    # model, weights, threads and stop rules as `generate`: one forward over its own cache, the
    # prompt checks, the stop matcher and the finished completion.

    @contextlib.contextmanager
    def thread_limit(self) -> Iterator[None]:
        """Run with `self.threads` torch threads, then restore the caller's setting."""
        before = torch.get_num_threads()
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def check_prompts(self, prompts: Sequence[Sequence[int]], cfg: GenerationConfig) -> list[list[int]]:
        """`prompts` as lists of ints, each checked (not empty, ids in the vocabulary, shorter than
        the context) or cut to fit when `cfg.truncate_prompt`; a bad prompt raises `ChatforgeError`."""
        ctx, vocab = self.config.max_seq_len, self.config.vocab_size
        out = []
        for i, p in enumerate(prompts):
            p = [int(t) for t in p]
            if not p:
                raise ChatforgeError(f"prompt {i} is empty; give at least one token")
            if any(t < 0 or t >= vocab for t in p):
                raise ChatforgeError(f"prompt {i} has token ids outside the model's vocabulary (0..{vocab - 1}); "
                                     "was it encoded with this model's tokenizer?")
            if len(p) >= ctx:
                if not cfg.truncate_prompt:
                    raise ChatforgeError(f"prompt {i} has {len(p)} tokens but the model's context is {ctx}; "
                                         "shorten it (or allow truncation of its oldest tokens)")
                p = p[len(p) - ctx + 1:]  # keep room for at least one new token
            out.append(p)
        return out

    def forward(self, ids: torch.Tensor, cache, positions: torch.Tensor, mask,
                take: torch.Tensor | None = None) -> torch.Tensor:
        """One forward of the model over `ids` (B, T) at RoPE `positions`, writing keys and values
        into `cache` (a `KVCache`, or any object with its `update`), with attention `mask` (None:
        causal). Returns the logits of each row's last position (or of position `take[row]`), in
        fp32: (B, V). Call it inside `torch.inference_mode()` and `thread_limit()`."""
        if take is None:
            logits, _ = self.model(ids, cache=cache, positions=positions, attn_mask=mask, last_only=True)
        else:
            logits, _ = self.model(ids, cache=cache, positions=positions, attn_mask=mask, take=take)
        return logits[:, -1, :].float()                                                       # (B, V)

    def logits_pipeline(self, cfg: GenerationConfig, histories: list[list[int]], for_beam: bool) -> LogitsPipeline:
        """The logits processors `cfg` asks for, one row per history (a citation constraint needs
        the engine's tokenizer)."""
        return LogitsPipeline(cfg, histories, self.config.vocab_size, self.device, for_beam, self.tokenizer)

    def stop_matcher(self, cfg: GenerationConfig) -> StopStrings | None:
        """What matches `cfg`'s stop strings and `stop_after` patterns against generated tokens
        (None when it has neither); they need the engine's tokenizer."""
        if not cfg.stop_strings and not cfg.stop_after:
            return None
        if self.tokenizer is None:
            raise ChatforgeError("stop strings need a tokenizer: pass one to Engine(model, tokenizer)")
        return StopStrings(self.tokenizer, cfg.stop_strings, cfg.stop_after)

    def completion(self, tokens: list[int], reason: str, stop: int | str | re.Pattern | None,
                   score=None) -> Completion:
        """The `Completion` of generated `tokens` that ended for `reason` ("stop" or "length")
        on `stop`: its text decoded and cut where a stop string or pattern says."""
        text = None
        if self.tokenizer is not None:
            text = self.tokenizer.decode(tokens)
            if isinstance(stop, str):
                text = text[:first_stop(text, [stop], [])[0]]
            elif isinstance(stop, re.Pattern):
                text = text[:first_stop(text, [], [stop])[0]]
        return Completion(tokens, text, reason, stop, score)

    # --------------------------------------------------------------------------------- helpers

    def _new_tokens(self, batch_prompt_len: int, cfg: GenerationConfig) -> int:
        return min(cfg.max_new_tokens, self.config.max_seq_len - batch_prompt_len)

    def _prefill(self, batch: _Batch) -> tuple[torch.Tensor, KVCache]:
        """Run the prompts once, then fan the cache out to `fan_out` rows per prompt."""
        cache = KVCache.for_model(self.model, len(batch.rows), batch.total_len, self.cache_dtype)
        logits = self.forward(batch.ids, cache, batch.positions, batch.prefill_mask)          # (P, V)
        if batch.fan_out > 1:
            cache.select_rows(batch.rows)
            logits = logits[batch.rows]
        return logits, cache

    def _decode_step(self, tokens: torch.Tensor, cache: KVCache, batch: _Batch) -> torch.Tensor:
        mask = None if batch.decode_mask is None else batch.decode_mask[..., :cache.pos + 1]
        logits = self.forward(tokens, cache, batch.next_pos, mask)
        batch.next_pos += 1
        return logits

    # ------------------------------------------------------------------- greedy and sampling

    def _decode_steps(self, prompts: list[list[int]], cfg: GenerationConfig,
                      state: dict[str, list]) -> Iterator[list[int | None]]:
        """Greedy/sampled decoding; yields each step's new token per row (None once a row is done).

        `state` (from `_new_state`) collects each row's tokens and why it finished.
        """
        fan = cfg.num_return_sequences
        new_tokens = self._new_tokens(max(map(len, prompts)), cfg)
        batch = _Batch(prompts, fan, new_tokens, self.pad_id, self.device)
        R = len(batch.rows)
        histories = [list(prompts[r // fan]) for r in range(R)]
        pipeline = self.logits_pipeline(cfg, histories, for_beam=False)
        stops = self.stop_matcher(cfg)
        gen = None
        if not cfg.greedy and cfg.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(cfg.seed)
        stop_set = set(self.stop_ids)
        done = [False] * R
        tokens = torch.full((R, 1), self.pad_id, dtype=torch.long, device=self.device)

        logits, cache = self._prefill(batch)
        for step in range(new_tokens):
            if step:
                logits = self._decode_step(tokens, cache, batch)
            logits = pipeline(logits)
            if cfg.greedy:
                nxt = logits.argmax(-1)
            else:
                probs = torch.softmax(pipeline.warp(logits), dim=-1)
                nxt = torch.multinomial(probs, 1, generator=gen).squeeze(1)
            ids = nxt.tolist()
            out: list[int | None] = [None] * R
            for r, t in enumerate(ids):
                if done[r]:
                    ids[r] = self.pad_id
                    continue
                if t in stop_set:
                    done[r], state["reason"][r], state["stop"][r] = True, "stop", t
                    ids[r] = self.pad_id
                    continue
                state["tokens"][r].append(t)
                out[r] = t
                if stops is not None:
                    hit = stops.match(state["tokens"][r])
                    if hit is not None:
                        done[r], state["reason"][r], state["stop"][r] = True, "stop", hit
            yield out
            if all(done):
                break
            pipeline.append(ids, done)
            tokens.copy_(torch.tensor(ids, device=self.device).unsqueeze(1))

    def _decode(self, prompts: list[list[int]], cfg: GenerationConfig) -> list[list[Completion]]:
        fan = cfg.num_return_sequences
        state = _new_state(len(prompts) * fan)
        for _ in self._decode_steps(prompts, cfg, state):
            pass
        comps = [self.completion(t, r, s) for t, r, s in zip(state["tokens"], state["reason"], state["stop"])]
        return [comps[i * fan:(i + 1) * fan] for i in range(len(prompts))]

    # --------------------------------------------------------------------------- beam search

    def _beam_search(self, prompts: list[list[int]], cfg: GenerationConfig) -> list[list[Completion]]:
        """HF-equivalent beam search, all prompts at once (num_beams rows per prompt).

        Each step keeps the 2 * num_beams (more with several stop ids) best continuations of each
        prompt by summed log-prob; those among the top num_beams that end (stop token, stop string
        or last step) become finished hypotheses scored sum / length ** length_penalty, and the best
        num_beams unfinished ones continue.
        """
        nb, P = cfg.num_beams, len(prompts)
        new_tokens = self._new_tokens(max(map(len, prompts)), cfg)
        batch = _Batch(prompts, nb, new_tokens, self.pad_id, self.device)
        V, R = self.config.vocab_size, P * nb
        histories = [list(prompts[r // nb]) for r in range(R)]
        pipeline = self.logits_pipeline(cfg, histories, for_beam=True)
        stops = self.stop_matcher(cfg)
        stop_set = set(self.stop_ids)
        keep = max(2, 1 + len(self.stop_ids)) * nb
        lp = cfg.length_penalty

        # Only the first beam of each prompt starts alive, so the first step does not pick the
        # same continuation nb times.
        running = torch.zeros(P, nb, device=self.device)
        running[:, 1:] = -1e9
        seqs: list[list[int]] = [[] for _ in range(R)]
        finished: list[list[tuple[float, list[int], str, int | str | None]]] = [[] for _ in range(P)]
        improvable = [True] * P
        tokens = torch.zeros(R, 1, dtype=torch.long, device=self.device)

        logits, cache = self._prefill(batch)
        for step in range(new_tokens):
            if step:
                logits = self._decode_step(tokens, cache, batch)
            logprobs = pipeline(F.log_softmax(logits, dim=-1))                                # (R, V)
            total = (logprobs.view(P, nb, V) + running.unsqueeze(2)).view(P, nb * V)
            top_scores, top_idx = total.topk(keep, dim=1)                                     # (P, keep)
            src_beam, tok = top_idx // V, top_idx % V
            last = step == new_tokens - 1
            scores_l, src_l, tok_l = top_scores.tolist(), src_beam.tolist(), tok.tolist()
            next_src, next_tok, next_score = [], [], []
            for p in range(P):
                full = len(finished[p]) >= nb
                may_add = improvable[p] and not (full and cfg.early_stopping is True)
                alive: list[tuple[int, int, float]] = []
                for rank in range(keep):
                    row, t, s = p * nb + src_l[p][rank], tok_l[p][rank], scores_l[p][rank]
                    stop: int | str | None = t if t in stop_set else None
                    if stop is None and stops is not None:
                        stop = stops.match(seqs[row] + [t])
                    if stop is not None or last:
                        if rank < nb and may_add:
                            # A stop token is not part of the output; a stop string's token is.
                            cand = seqs[row] if isinstance(stop, int) else seqs[row] + [t]
                            reason = "stop" if stop is not None else "length"
                            finished[p].append((s / ((step + 1) ** lp), cand, reason, stop))
                    elif len(alive) < nb:
                        alive.append((row, t, s))
                # Fewer than nb unfinished candidates (only with stop strings or at the last
                # step): pad with the best ones, dead (-1e9) so they never win.
                while len(alive) < nb:
                    alive.append((p * nb, self.pad_id, -1e9))
                finished[p].sort(key=lambda h: -h[0])
                del finished[p][nb:]
                for row, t, s in alive:
                    next_src.append(row), next_tok.append(t), next_score.append(s)
            if last:
                break
            seqs = [seqs[r] + [t] for r, t in zip(next_src, next_tok)]
            running = torch.tensor(next_score, device=self.device).view(P, nb)
            src = torch.tensor(next_src, device=self.device)
            tokens.copy_(torch.tensor(next_tok, device=self.device).unsqueeze(1))
            cache.select_rows(next_src, start=batch.prompt_len)
            pipeline.reorder(src, next_tok)
            # HF's stopping test: can a running beam still beat the worst finished hypothesis?
            gen_len = step + 1
            if cfg.early_stopping == "never" and lp > 0:
                gen_len = new_tokens
            for p in range(P):
                best = next_score[p * nb] / (gen_len ** lp)
                worst = finished[p][-1][0] if len(finished[p]) >= nb else -1e9
                improvable[p] = improvable[p] and best > worst
            if all(not improvable[p] or (cfg.early_stopping is True and len(finished[p]) >= nb) for p in range(P)):
                break
        return [[self.completion(toks, reason, stop, score)
                 for score, toks, reason, stop in finished[p][:cfg.num_return_sequences]] for p in range(P)]


def weights_dtype(dtype: torch.dtype | str | None, current: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> torch.dtype:
    """The dtype an engine given weights in `current` on `device` generates in, for its `dtype`
    argument ("auto": bfloat16 where the device computes it natively, else `current`). A server
    loads its model straight in it (`load_model(dtype=)`)."""
    device = torch.device(device)
    if dtype == "auto":
        native = current == torch.float32 and runtime.bf16_supported(device)
        return torch.bfloat16 if native else current
    if dtype is None:
        return current
    if isinstance(dtype, str):
        names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                 "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}
        if dtype not in names:
            raise ChatforgeError(f"unknown dtype {dtype!r}; choose auto or one of {', '.join(names)}")
        dtype = names[dtype]
    if dtype != current and device.type == "cpu" and dtype != torch.float32:
        if not (dtype == torch.bfloat16 and runtime.bf16_supported(device)):
            warnings.warn(f"this CPU has no native {dtype} matrix products; generating in {current}")
            return current
    return dtype


def _in_dtype(model: torch.nn.Module, dtype: torch.dtype | str | None) -> torch.nn.Module:
    """`model`, or a copy of it in `dtype` when that differs and the device computes it natively
    ("auto": bfloat16 where native, else the model as it is)."""
    param = next(model.parameters())
    dtype = weights_dtype(dtype, param.dtype, param.device)
    if param.dtype == dtype:
        return model
    # A copy, so training code holding the model keeps its fp32 weights. Each floating tensor is
    # converted on its own and handed to deepcopy, so the model is never copied whole in fp32
    # first, and tied weights stay tied (one tensor, one copy). The RoPE tables are cast too, as
    # HF does.
    memo: dict[int, object] = {}
    for _, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]:
        if id(t) in memo or not t.is_floating_point():
            continue
        cast = t.detach().to(dtype)
        memo[id(t)] = torch.nn.Parameter(cast, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else cast
    return copy.deepcopy(model, memo)


def _new_state(rows: int) -> dict[str, list]:
    """Per-row outcome of greedy/sampled decoding: tokens, finish reason, what stopped it."""
    return {"reason": ["length"] * rows, "stop": [None] * rows, "tokens": [[] for _ in range(rows)]}


class TextStream:
    """Turns tokens into text pieces that never end inside a UTF-8 character or a stop string, and
    that end with the first match of a `stop_after` pattern (`Engine.stream` and the scheduler's
    requests use it): `push(token)` returns the text it releases, `finish()` the rest; `stopped`
    is set once a stop string or pattern matched.

    Tokens since the last clean cut are decoded together; U+FFFD at the end means the bytes of a
    character are still incomplete, so that part waits.
    """

    PATTERN_LOOKBACK = 1024   # characters of emitted text a stop_after match may reach back into

    def __init__(self, tokenizer, stop_strings: Sequence[str], stop_after: Sequence[str] = ()):
        self.tokenizer, self.stop_strings = tokenizer, tuple(stop_strings)
        self.patterns = tuple(re.compile(p) for p in stop_after)
        self.lookback = max([0, *map(len, self.stop_strings)] + [self.PATTERN_LOOKBACK] * bool(self.patterns))
        self.pending: list[int] = []   # tokens whose text is not all emitted yet
        self.pending_emitted = 0       # characters of decode(pending) already emitted
        self.emitted = ""              # the whole text emitted so far
        self.stopped = False

    def push(self, token: int) -> str:
        self.pending.append(token)
        text = self.tokenizer.decode(self.pending)
        whole = len(text.rstrip("\ufffd"))
        return self._emit(text, whole, final=False)

    def finish(self) -> str:
        if self.stopped or not self.pending:
            return ""
        text = self.tokenizer.decode(self.pending)
        return self._emit(text, len(text), final=True)

    def _emit(self, text: str, whole: int, final: bool) -> str:
        new = text[self.pending_emitted:whole]
        if self.stop_strings or self.patterns:
            # Look for a stop string or an end pattern in the emitted tail plus the new text.
            tail = self.emitted[-self.lookback:]
            window = tail + new
            end, hit = first_stop(window, self.stop_strings, self.patterns)
            if hit is not None:
                self.stopped = True
                piece = window[len(tail):end] if end >= len(tail) else ""
                self.emitted += piece
                return piece
            if not final:
                # Hold back a suffix that could grow into a stop string.
                hold = 0
                for s in self.stop_strings:
                    for k in range(min(len(s) - 1, len(window)), 0, -1):
                        if window.endswith(s[:k]):
                            hold = max(hold, k)
                            break
                keep = max(0, len(new) - hold)
                new = new[:keep]
                whole = self.pending_emitted + keep
        self.emitted += new
        self.pending_emitted = whole
        if whole == len(text):
            # Everything decoded so far is out: start afresh (keeps decoding cost per token small).
            self.pending, self.pending_emitted = [], 0
        return new
