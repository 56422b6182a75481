"""Logits processing for the engine: penalties, warpers, stop strings and end patterns.

Each function has the semantics of its HF `transformers` namesake (the tests compare them on the
same input), so settings carry over from HF recipes:
- `repetition_penalty` = `RepetitionPenaltyLogitsProcessor`: for every token already in the prompt
  or the output, a positive logit is divided by the penalty and a negative one multiplied.
- `top_k_filter`, `top_p_filter`, `min_p_filter` = `TopKLogitsWarper`, `TopPLogitsWarper`,
  `MinPLogitsWarper` (each keeps at least one token), applied after the temperature in that order.
- `no_repeat_ngram` = `NoRepeatNGramLogitsProcessor`: a token that would repeat an n-gram already in
  the sequence is banned.
- `frequency_penalty` and `presence_penalty` have the OpenAI API's meaning: a token's logit is
  lowered by frequency_penalty times the number of times it was generated so far, plus
  presence_penalty once it was generated at all (the prompt does not count).
- `first_token_bias` (no HF namesake; OpenAI's `logit_bias` for the first token only): the bias is
  added to those tokens' logits when the first token is chosen, before the penalties.
- `reply_no_repeat_ngram_size` (no HF namesake): `no_repeat_ngram` over the reply alone, where an
  n-gram may come as often as the prompt holds it (`ReplyNgrams`).
- `cite_names` (no HF namesake; a constraint like llama.cpp's grammars, for one pattern): once the
  reply has written "(source:", only tokens that keep it on the way to " NAME)" for one of the
  names are allowed (`CitationConstraint`).
`LogitsPipeline` holds the per-row state (which tokens were seen, the histories) across steps.
"""

from __future__ import annotations

import re
import weakref
from collections import Counter, defaultdict
from typing import TYPE_CHECKING, Sequence

import torch

from chatforge.errors import ChatforgeError

if TYPE_CHECKING:
    from chatforge.infer.engine import GenerationConfig

NEG_INF = float("-inf")


def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (B, V); seen (B, V) bool, True for tokens in the prompt or output."""
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties with the k-th are kept too)."""
    k = min(max(k, 1), logits.shape[-1])
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probabilities add up to more than p."""
    sorted_logits, order = logits.sort(dim=-1)                    # ascending
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cum <= (1 - p)                                  # the unlikely tail
    drop_sorted[..., -1] = False                                  # always keep the best token
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times that of the most likely token."""
    probs = logits.softmax(dim=-1)
    drop = probs < min_p * probs.amax(dim=-1, keepdim=True)
    drop.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)
    return logits.masked_fill(drop, NEG_INF)


def banned_ngram_tokens(history: Sequence[int], n: int) -> list[int]:
    """Tokens that would complete an n-gram already present in `history`."""
    if len(history) + 1 < n:
        return []
    prefix = list(history[len(history) - (n - 1):]) if n > 1 else []
    return [history[i + n - 1] for i in range(len(history) - n + 1) if list(history[i:i + n - 1]) == prefix]


class LogitsPipeline:
    """The processors a `GenerationConfig` asks for, with their per-row state.

    `__call__` applies the penalties (every strategy); `warp` applies temperature and the filters
    (sampling only). Beam search calls `__call__` on log-probabilities, as HF does.
    """

    def __init__(self, cfg: "GenerationConfig", histories: list[list[int]], vocab_size: int,
                 device: torch.device, for_beam: bool, tokenizer=None):
        self.cfg = cfg
        self.ngram = cfg.no_repeat_ngram_size
        self.histories = histories if self.ngram else None          # only n-gram blocking needs them
        self.seen = None
        if cfg.repetition_penalty != 1.0:
            self.seen = torch.zeros(len(histories), vocab_size, dtype=torch.bool, device=device)
            for r, h in enumerate(histories):
                self.seen[r, torch.tensor(h, device=device)] = True
        self.counts = None
        if getattr(cfg, "frequency_penalty", 0.0) or getattr(cfg, "presence_penalty", 0.0):
            self.counts = torch.zeros(len(histories), vocab_size, device=device)
        self.first_bias = tuple(getattr(cfg, "first_token_bias", ()) or ())
        self.steps = 0                                               # tokens appended so far
        self.reply_ngram = getattr(cfg, "reply_no_repeat_ngram_size", 0)
        self.replies = [ReplyNgrams(h, self.reply_ngram) for h in histories] if self.reply_ngram else None
        self.cites = None
        if getattr(cfg, "cite_names", ()):
            if tokenizer is None:
                raise ChatforgeError("cite_names needs a tokenizer: pass one to Engine(model, tokenizer)")
            self.cites = [CitationConstraint(tokenizer, cfg.cite_names) for _ in histories]
        self.active = (self.seen is not None or bool(self.ngram) or self.counts is not None or bool(self.first_bias)
                       or self.cites is not None or self.replies is not None)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return logits
        if self.first_bias and self.steps == 0:
            logits = logits.clone()
            for token, bias in self.first_bias:
                if token < logits.shape[-1]:
                    logits[..., token] += bias
        if self.seen is not None:
            logits = repetition_penalty(logits, self.seen, self.cfg.repetition_penalty)
        if self.ngram:
            for r, h in enumerate(self.histories):
                banned = banned_ngram_tokens(h, self.ngram)
                if banned:
                    logits[r, banned] = NEG_INF
        if self.counts is not None:
            logits = logits - self.counts * self.cfg.frequency_penalty \
                - (self.counts > 0).to(logits.dtype) * self.cfg.presence_penalty
        if self.replies is not None:
            for r, reply in enumerate(self.replies):
                banned = reply.banned()
                if banned:
                    logits[r, banned] = NEG_INF
        if self.cites is not None:
            for r, cite in enumerate(self.cites):
                allowed, banned = cite.allowed(), cite.banned()
                if allowed:
                    keep = torch.full_like(logits[r], NEG_INF)
                    keep[allowed] = 0.0
                    logits[r] = logits[r] + keep
                elif banned:
                    logits[r, banned] = NEG_INF
        return logits

    def warp(self, logits: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if cfg.temperature != 1.0:
            logits = logits / cfg.temperature
        if cfg.top_k:
            logits = top_k_filter(logits, cfg.top_k)
        if cfg.top_p < 1.0:
            logits = top_p_filter(logits, cfg.top_p)
        if cfg.min_p > 0.0:
            logits = min_p_filter(logits, cfg.min_p)
        return logits

    def append(self, tokens: list[int], done: list[bool]) -> None:
        """Record each row's new token (rows that are done are left alone)."""
        self.steps += 1
        if self.seen is not None:
            self.seen.scatter_(1, torch.tensor(tokens, device=self.seen.device).unsqueeze(1), True)
        if self.histories is not None:
            for h, t, d in zip(self.histories, tokens, done):
                if not d:
                    h.append(t)
        if self.counts is not None:
            live = torch.tensor([not d for d in done], dtype=self.counts.dtype, device=self.counts.device)
            self.counts.scatter_add_(1, torch.tensor(tokens, device=self.counts.device).unsqueeze(1), live.unsqueeze(1))
        if self.replies is not None:
            for reply, t, d in zip(self.replies, tokens, done):
                if not d:
                    reply.push(t)
        if self.cites is not None:
            for cite, t, d in zip(self.cites, tokens, done):
                if not d:
                    cite.push(t)

    def reorder(self, rows: torch.Tensor, tokens: list[int]) -> None:
        """Beam search: row i continues row rows[i] with tokens[i]."""
        self.steps += 1
        if self.seen is not None:
            self.seen = self.seen[rows]
            self.seen.scatter_(1, torch.tensor(tokens, device=self.seen.device).unsqueeze(1), True)
        if self.counts is not None:
            self.counts = self.counts[rows]
            self.counts.scatter_add_(1, torch.tensor(tokens, device=self.counts.device).unsqueeze(1),
                                     torch.ones(len(tokens), 1, device=self.counts.device))
        if self.histories is not None:
            src = rows.tolist()
            self.histories = [self.histories[s] + [t] for s, t in zip(src, tokens)]
        if self.replies is not None:
            self.replies = [self.replies[s].copy() for s in rows.tolist()]
            for reply, t in zip(self.replies, tokens):
                reply.push(t)
        if self.cites is not None:
            self.cites = [self.cites[s].copy() for s in rows.tolist()]
            for cite, t in zip(self.cites, tokens):
                cite.push(t)


class ReplyNgrams:
    """One row's `reply_no_repeat_ngram_size`: a token is banned when the n-gram it completes is in
    the reply already as often as in the prompt (at least once). A grounded reply copies its
    passages, repeated lines and all; a reply that loops over its own words ("... integrate with
    the system credential.helper configuration. Most systems provide ... integrate with the
    system credential.helper ...", the demo assistant on the unseen git FAQ) is stopped at the
    second turn of the loop."""

    def __init__(self, prompt: Sequence[int], n: int):
        self.n, self.reply = n, []
        # (n - 1 tokens) -> how often each next token follows them, in the prompt and in the reply
        self.prompt: defaultdict[tuple[int, ...], Counter] = defaultdict(Counter)
        for i in range(len(prompt) - n + 1):
            self.prompt[tuple(prompt[i:i + n - 1])][prompt[i + n - 1]] += 1
        self.seen: defaultdict[tuple[int, ...], Counter] = defaultdict(Counter)

    def copy(self) -> ReplyNgrams:
        other = object.__new__(ReplyNgrams)
        other.n, other.prompt, other.reply = self.n, self.prompt, list(self.reply)
        other.seen = defaultdict(Counter, {k: Counter(v) for k, v in self.seen.items()})
        return other

    def push(self, token: int) -> None:
        self.reply.append(token)
        if len(self.reply) >= self.n:
            self.seen[tuple(self.reply[-self.n:-1])][token] += 1

    def banned(self) -> list[int]:
        if len(self.reply) < self.n - 1:
            return []
        prefix = tuple(self.reply[len(self.reply) - self.n + 1:])
        allowed = self.prompt.get(prefix, Counter())
        return [t for t, c in self.seen.get(prefix, Counter()).items() if c >= allowed[t]]


class TokenPieces:
    """A tokenizer's tokens as text, for constraints on what a reply may spell: `texts[id]`, the ids
    of each text (`by_text`), the longest text's length. A token's text is what it adds after
    another token ("a" + id, minus "a"): decoded alone, a SentencePiece-style token loses its
    leading space. Built once per tokenizer (`of`); SmolLM2's 49k vocabulary takes 0.05 s."""

    _made: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @classmethod
    def of(cls, tokenizer) -> TokenPieces:
        if tokenizer not in cls._made:
            cls._made[tokenizer] = cls(tokenizer)
        return cls._made[tokenizer]

    def __init__(self, tokenizer):
        anchor = tokenizer.encode("a")
        base = len(tokenizer.decode(anchor))
        self.texts = [tokenizer.decode([*anchor, i])[base:] for i in range(tokenizer.vocab_size)]
        self.by_text: dict[str, list[int]] = {}
        for i, t in enumerate(self.texts):
            if t and "\ufffd" not in t:     # part of a character: no name can be spelt with it here
                self.by_text.setdefault(t, []).append(i)
        self.longest = max(map(len, self.by_text), default=1)
        self._starting: dict[tuple[str, bool], list[int]] = {}

    def spelling(self, text: str) -> set[int]:
        """The ids whose text is a non-empty prefix of `text` (the tokens that go on spelling it)."""
        ids: set[int] = set()
        for n in range(1, min(len(text), self.longest) + 1):
            ids.update(self.by_text.get(text[:n], ()))
        return ids

    def starting(self, text: str, lstrip: bool) -> list[int]:
        """The ids whose text, lower-cased (and left-stripped with `lstrip`), starts with `text`."""
        key = (text, lstrip)
        if key not in self._starting:
            self._starting[key] = [i for i, t in enumerate(self.texts)
                                   if (t.lstrip() if lstrip else t).lower().startswith(text)]
        return self._starting[key]


class CitationConstraint:
    """One row's citation constraint (a grounded reply's, `GenerationConfig.cite_names`).

    - After the reply writes "(source:", the next tokens must spell " NAME)" for one of `names`
      (the given passages' names). A small model copying a long name slips (cuts a heading at its
      first "?", splices two names into one no passage has); decoding restricted to the names
      cannot. The model still chooses which name. A token that carries the citation past the
      trigger already off every name leaves that citation unconstrained.
    - A reply cannot open with its citation: while nothing but the start of "(sou" is written,
      the tokens that would complete it are banned. The demo assistant answered a FAQ entry that
      begins "(portions of this answer contributed by ...)" with "(source: ...)" alone.

    `push(token)` records a generated token; `allowed()` is the ids the next token may be, or None;
    `banned()` the ids it may not be, or None.
    """

    TRIGGER = "(source:"
    OPENING = "(sou"

    def __init__(self, tokenizer, names: Sequence[str]):
        self.pieces = TokenPieces.of(tokenizer)
        self.targets = tuple(f" {n})" for n in names)
        self.tail = ""                      # the last characters generated (to see the trigger)
        self.written: str | None = None     # the citation since the trigger; None outside one
        self.opening: str | None = ""       # the reply so far while it may still open a citation

    def copy(self) -> CitationConstraint:
        other = object.__new__(CitationConstraint)
        other.__dict__.update(self.__dict__)
        return other

    def push(self, token: int) -> None:
        piece = self.pieces.texts[token] if 0 <= token < len(self.pieces.texts) else ""
        if self.opening is not None:
            so_far = (self.opening + piece if self.opening else piece.lstrip()).lower()
            self.opening = so_far if self.OPENING.startswith(so_far) else None
        if self.written is None:
            self.tail = (self.tail + piece)[-(len(self.TRIGGER) + self.pieces.longest):]
            at = self.tail.lower().rfind(self.TRIGGER)
            if at < 0:
                return                      # (a trigger empties the tail: any one found is new)
            self.written, self.tail = self.tail[at + len(self.TRIGGER):], ""
        else:
            self.written += piece
        if any(self.written.startswith(t) for t in self.targets) \
                or not any(t.startswith(self.written) for t in self.targets):
            self.written = None             # the citation is complete, or off every name

    def allowed(self) -> list[int] | None:
        if self.written is None:
            return None
        ids: set[int] = set()
        for target in self.targets:
            if target.startswith(self.written):
                ids |= self.pieces.spelling(target[len(self.written):])
        return sorted(ids) or None

    def banned(self) -> list[int] | None:
        if self.opening is None:
            return None
        return self.pieces.starting(self.OPENING[len(self.opening):], lstrip=not self.opening) or None


class StopStrings:
    """Finds user stop strings, and matches of the end patterns (`GenerationConfig.stop_after`),
    at the end of generated text without decoding all of it each step.

    A string of n UTF-8 bytes spans at most n tokens; a few more cover a character cut at the
    window's start. A pattern's match has to lie within the last PATTERN_WINDOW tokens.
    """

    PATTERN_WINDOW = 128

    def __init__(self, tokenizer, strings: Sequence[str], patterns: Sequence[str] = ()):
        self.tokenizer, self.strings = tokenizer, tuple(strings)
        self.patterns = tuple(re.compile(p) for p in patterns)
        self.window = max([len(s.encode("utf-8")) + 5 for s in self.strings]
                          + [self.PATTERN_WINDOW] * bool(self.patterns))

    def match(self, tokens: Sequence[int]) -> str | re.Pattern | None:
        """The stop string or end pattern that ends first in the last tokens' text, or None."""
        text = self.tokenizer.decode(list(tokens[-self.window:]))
        return first_stop(text, self.strings, self.patterns)[1]


def first_stop(text: str, strings: Sequence[str], patterns: Sequence[re.Pattern]) -> tuple[int, str | re.Pattern | None]:
    """Where `text` ends (before the first stop string, or after the first end-pattern match,
    whichever comes first) and what ended it; (len(text), None) when nothing does."""
    ends = [(text.find(s), s) for s in strings if s in text]
    for p in patterns:
        m = p.search(text)
        if m:
            ends.append((m.end(), p))
    return min(ends, key=lambda e: e[0]) if ends else (len(text), None)
