"""How a grounded answer is made and shown: the settings a model was trained for, refusals and
citations.

    settings = AnswerSettings.load("runs/demo/sft")     # what SFT recorded in answer.json
    gen = settings.generation()                          # the decoding chat, serve and eval share
    shown = checked_citation(reply, passages)            # never a source name no passage has

One set of answer settings. SFT trains a model on prompts of one shape: `passages` passages in a
context block of at most `context_tokens` tokens. A model answers best when it is asked in that
shape and decoded the way it was evaluated, so SFT writes `answer.json` into the model folder and
`chat`, `serve`, `eval` and the continual-learning round read it (their flags still override it).
A model folder without the file (an imported base, an older run) gets the defaults below. The
file also names the embedding model retrieval uses with the model (`embedding_model`, written
by the continual-learning round when it keeps a retriever it trained): a retrieving command
without --embedding-model uses it, so a promoted model brings its retriever along and
`--rollback` brings the previous one back.

Knowing when nothing answers. The model says NOT_FOUND_REPLY when its context lacks the answer
(grounded SFT teaches it). A second, independent signal is the retrieval score: when even the
best passage scores below `min_score`, no passage is likely to hold the answer and the reply is
NOT_FOUND_REPLY without asking the model. `min_score` is fitted on the company's own Q&A when it
helps (see `fit_min_score`) and 0 (off) otherwise. A third is the weight the model gives the
refusal: the not-found reply's first token decides it (greedy), so `refusal_bias` logits taken
from that token when the answer starts make the model refuse only when it prefers the refusal by
that margin. SFT fits it on its held-out grounded examples (`fit_refusal_bias`): the smallest
bias that refuses at most a budget of those the context answers. A small model refuses answerable
manual questions with the passage in front of it (the demo assistant: 10.7% of the unseen manual's
answerable questions); the bias trades some of those refusals against refusing fewer questions
no document answers, and the operator sets the budget. An upstream engine (vLLM, llama.cpp) is
not sent the bias: their `logit_bias` holds for every token of a reply, not the first.

Citations a customer can trust. A grounded reply ends with "(source: NAME)". A small model may
misspell NAME or splice two passages' names; `checked_citation` keeps a citation only when it
names the passage the answer was copied from (the one sharing most of its word 4-grams; the
demo assistant cited a neighbouring passage in 11 of 19 answers on the unseen git FAQ), replaces
it with that passage otherwise, and for an answer copied from none keeps it only when it names
one of the given passages.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Sequence

import torch

from chatforge import files
from chatforge.errors import ChatforgeError
from chatforge.infer.engine import GenerationConfig
from chatforge.retrieval import DEFAULT_CONTEXT_TOKENS, NOT_FOUND_REPLY, strip_citation

ANSWER_FILE = "answer.json"
# The phrases a refusal starts with: NOT_FOUND_REPLY's own, and the ways a model rephrases it.
_REFUSAL = re.compile(r"^\W*(i (could ?not|couldn't|can ?not|can't) find|(that|this) is not (in|covered)|"
                      r"the (documentation|context) does not (say|contain|cover|mention))", re.I)
_CITED = re.compile(r"\((?i:source):\s*([^()]*(?:\([^()]*\)[^()]*)*)\)\s*$")
_WORD = re.compile(r"\w+")
MAX_REFUSAL_BIAS = 8.0       # logits: beyond this the model would never refuse
REFUSAL_BIAS_STEP = 0.25


@dataclass(frozen=True)
class AnswerSettings:
    """The settings that decide a grounded answer. Validated on creation."""

    context_tokens: int = DEFAULT_CONTEXT_TOKENS   # most tokens of passages in a prompt (SFT's budget)
    passages: int = 3                   # passages retrieved per question
    strategy: str = "greedy"            # decoding: "greedy" copies passages exactly; "sample" varies them
    temperature: float = 0.7            # with strategy "sample"
    top_p: float = 0.9                  # with strategy "sample"
    repetition_penalty: float = 1.0     # 1 = off: a penalty on prompt tokens works against copying
    max_new_tokens: int = 512           # a copied passage may be a few hundred tokens long
    min_score: float = 0.0              # best retrieval score below which the reply is a refusal (0 = off)
    retrieval: str = "bm25"             # the retrieval mode min_score was fitted on (scores differ by mode)
    refusal_bias: float = 0.0           # logits taken from the not-found reply's first token at the answer's start
    # A reply may repeat a run of this many tokens only as often as its prompt holds it (0 = off):
    # it ends loops ("... with the system credential.helper configuration. Most systems ... with
    # the system credential.helper ...") and lets a copied passage's own repeats through. 24 was
    # chosen on the demo's validation Q&A: 12 and 16 cut legitimate repeats in copied code.
    reply_no_repeat_ngram_size: int = 24
    # The embedding model dense/hybrid retrieval uses with this model (the continual-learning
    # round records the retriever it trained): a folder relative to the model folder, an absolute
    # folder, or a fetched source name; None = the default (`retrieval.embed.default_model`:
    # all-mpnet-base-v2 up to 2,000 passages when fetched, else all-minilm-l6-v2).
    embedding_model: str | None = None

    def __post_init__(self) -> None:
        if self.context_tokens < 16:
            raise ChatforgeError(f"answer settings: context_tokens must be at least 16, got {self.context_tokens}")
        if self.passages < 1:
            raise ChatforgeError(f"answer settings: passages must be at least 1, got {self.passages}")
        if self.strategy not in ("greedy", "sample", "beam"):
            raise ChatforgeError(f"answer settings: strategy must be greedy, sample or beam, got {self.strategy!r}")
        if not (isinstance(self.reply_no_repeat_ngram_size, int) and self.reply_no_repeat_ngram_size >= 0):
            raise ChatforgeError("answer settings: reply_no_repeat_ngram_size must be a whole number of tokens, "
                                 f"0 (off) or more, got {self.reply_no_repeat_ngram_size!r}")
        if self.max_new_tokens < 1 or self.min_score < 0 or self.repetition_penalty <= 0:
            raise ChatforgeError("answer settings: max_new_tokens must be at least 1, min_score at least 0 "
                                 "and repetition_penalty above 0")
        if not (isinstance(self.refusal_bias, (int, float)) and 0 <= self.refusal_bias <= MAX_REFUSAL_BIAS):
            raise ChatforgeError(f"answer settings: refusal_bias must be from 0 (off) to {MAX_REFUSAL_BIAS}, "
                                 f"got {self.refusal_bias!r}")
        if self.embedding_model is not None and (not isinstance(self.embedding_model, str)
                                                 or not self.embedding_model.strip()):
            raise ChatforgeError("answer settings: embedding_model must be a folder (relative to the model "
                                 f"folder, or absolute) or a fetched source name, got {self.embedding_model!r}")

    @classmethod
    def load(cls, model_dir: str | Path) -> "AnswerSettings":
        """The settings in MODEL/answer.json, or the defaults when the folder has none."""
        path = Path(model_dir) / ANSWER_FILE
        if not path.is_file():
            return cls()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ChatforgeError(f"{path}: not readable JSON ({e}); delete it to use the default answer settings")
        known = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) - known:
            raise ChatforgeError(f"{path}: expected an object with keys among {', '.join(sorted(known))}")
        return cls(**data)

    def embedding_model_for(self, model_dir: str | Path) -> str | None:
        """The embedding model these settings name, for the model in `model_dir`: a folder path
        (relative ones resolved against `model_dir`), a fetched source name, or None (the default).
        A named folder that is missing is an error saying which file names it."""
        value = self.embedding_model
        if value is None:
            return None
        path = Path(value).expanduser()
        if not path.is_absolute():
            # Against the real folder: runs/NAME/assistant is a link, and "../x" means beside its target.
            folder = Path(model_dir).resolve()
            if "/" not in value and os.sep not in value and not (folder / path).exists():
                return value            # a fetched source name (resolved where it is loaded)
            path = Path(os.path.normpath(folder / path))
        if not path.is_dir():
            raise ChatforgeError(f"{Path(model_dir) / ANSWER_FILE} names the embedding model {value}, but {path} "
                                 "is not a folder; restore it, or remove embedding_model from the file to use "
                                 "the default one")
        return str(path)

    def save(self, model_dir: str | Path) -> None:
        files.write_json(Path(model_dir) / ANSWER_FILE, asdict(self))

    def replace(self, **changes) -> "AnswerSettings":
        """These settings with the given fields changed (None values are ignored: "not told otherwise")."""
        return AnswerSettings(**{**asdict(self), **{k: v for k, v in changes.items() if v is not None}})

    def refusal_logit_bias(self, tokenizer) -> tuple[tuple[int, float], ...]:
        """The refusal bias as `GenerationConfig.first_token_bias` for a grounded prompt of this
        tokenizer's model; () when it is off."""
        return ((refusal_token(tokenizer), -float(self.refusal_bias)),) if self.refusal_bias else ()

    def threshold(self, mode: str | None) -> float:
        """`min_score` for retrieval in `mode` (a `Retriever`'s mode; None or a plain index: BM25),
        0 (off) when the threshold was fitted on another mode's scores."""
        return self.min_score if (mode or "bm25") == self.retrieval else 0.0

    def generation(self, **overrides):
        """The `GenerationConfig` these settings mean (`overrides` win; None ignored)."""
        cfg = {"strategy": self.strategy, "max_new_tokens": self.max_new_tokens,
               "repetition_penalty": self.repetition_penalty,
               "reply_no_repeat_ngram_size": self.reply_no_repeat_ngram_size}
        cfg.update({k: v for k, v in overrides.items() if v is not None})
        if cfg["strategy"] == "sample":      # the settings' temperature and top-p, unless told otherwise
            cfg = {"temperature": self.temperature, "top_p": self.top_p, **cfg}
        return GenerationConfig(**cfg)


def refusal_token(tokenizer) -> int:
    """The first token of NOT_FOUND_REPLY as the model writes it after the chat template's
    assistant opening (the token whose logit decides a greedy refusal)."""
    probe = [{"role": "user", "content": "?"}]
    head = tokenizer.render_chat(probe, add_generation_prompt=True)[0]
    full = tokenizer.render_chat([*probe, {"role": "assistant", "content": NOT_FOUND_REPLY}],
                                 add_generation_prompt=False)[0]
    if len(full) <= len(head) or full[:len(head)] != head:
        raise ChatforgeError("the chat template does not render a reply after its generation prompt, "
                             "so the refusal's first token is unknown; set refusal_bias to 0")
    return full[len(head)]


@torch.no_grad()
def refusal_margin(model, tokenizer, messages: Sequence[dict], token: int | None = None) -> float:
    """How strongly `model` starts the not-found reply after `messages` (a grounded prompt, without
    the reply): the refusal's first-token logit minus the best other token's. A greedy answer is a
    refusal when this is above the refusal bias."""
    token = refusal_token(tokenizer) if token is None else token
    ids = tokenizer.render_chat(list(messages), add_generation_prompt=True)[0]
    logits = model(torch.tensor([ids], device=next(model.parameters()).device))
    logits = (logits[0] if isinstance(logits, tuple) else logits)[0, -1].float()
    refusal = logits[token].item()
    logits[token] = float("-inf")
    return refusal - logits.max().item()


def fit_refusal_bias(margins: Sequence[float], budget: float) -> float:
    """The smallest bias (0 to MAX_REFUSAL_BIAS, in steps of REFUSAL_BIAS_STEP) at which at most
    `budget` of the answerable examples are refused. `margins`: each answerable example's first
    refusal-token logit minus the best other token's (refused greedily when > the bias)."""
    if not margins or budget >= 1:
        return 0.0
    bias = 0.0
    while bias < MAX_REFUSAL_BIAS and sum(m > bias for m in margins) > budget * len(margins):
        bias = round(bias + REFUSAL_BIAS_STEP, 6)
    return bias


def is_refusal(reply: str) -> bool:
    """True when `reply` says the documents do not hold the answer (NOT_FOUND_REPLY or a rephrasing)."""
    text = strip_citation(reply).strip()
    return text == NOT_FOUND_REPLY or bool(_REFUSAL.match(text))


def answered_history(history: Sequence[dict]) -> list[dict]:
    """`history` without the exchanges the assistant refused (a user turn and the not-found reply
    after it): what a grounded prompt shows the model. A refusal tells the next answer nothing,
    and a small model shown one tends to refuse again: the demo assistant refused 30% of answerable
    manual questions asked after a refusal against 20% asked first, 20% against 10% on the unseen
    git FAQ. Retrieval still reads the refused question (a follow-up may lean on it)."""
    out: list[dict] = []
    for m in history:
        if m.get("role") == "assistant" and out and out[-1].get("role") == "user" and is_refusal(m.get("content", "")):
            out.pop()
            continue
        out.append(m)
    return out


def cited_name(reply: str) -> str | None:
    """The NAME of a reply's final "(source: NAME)", or None."""
    m = _CITED.search(reply.strip())
    return m.group(1).strip() if m else None


def _grams(text: str, n: int = 4) -> set[tuple[str, ...]]:
    words = _WORD.findall(text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def copied_from(answer: str, passages: Sequence) -> object | None:
    """The passage `answer` copied most of its word 4-grams from (at least a third of them), or None."""
    grams = _grams(strip_citation(answer))
    if not grams:
        return None
    best, share = None, 0.0
    for p in passages:
        s = len(grams & _grams(p.text)) / len(grams)
        if s > share:
            best, share = p, s
    return best if share >= 1 / 3 else None


def checked_citation(reply: str, passages: Sequence) -> str:
    """`reply` with a citation a customer can trust: the passage the answer was copied from; for an
    answer copied from none, its own citation when that names one of `passages`, else none. A
    refusal cites nothing."""
    if is_refusal(reply):
        return strip_citation(reply)
    name = cited_name(reply)
    body = strip_citation(reply)
    source = copied_from(body, passages)
    if source is not None:          # the passage the answer was copied from is its source
        return reply.strip() if name == source.source else f"{body} (source: {source.source})"
    # Not copied (a paraphrase): a citation naming a given passage stands; any other goes.
    return reply.strip() if name is not None and name in {p.source for p in passages} else body


def fit_min_score(answerable: Sequence[float], unanswerable: Sequence[float],
                  max_false_refusals: float = 0.02) -> float:
    """The highest best-passage score threshold that refuses at most `max_false_refusals` of the
    `answerable` questions' scores, or 0 (off) when it would refuse none of the `unanswerable`
    ones either (a threshold that only costs answers is no threshold)."""
    if not answerable:
        return 0.0
    ranked = sorted(answerable)
    allowed = int(max_false_refusals * len(ranked))
    threshold = ranked[allowed]                 # scores below it are refused: `allowed` of them
    caught = sum(s < threshold for s in unanswerable)
    return float(threshold) if caught else 0.0


_SOURCE_OPEN = "(source:"


class AnswerStream:
    """Streams a grounded reply while holding back its citation until it can be checked.

    `push(piece)` returns the text that can be shown now; from a "(source:" on (or a tail that may
    become one) the text waits. `finish()` returns the rest, with the citation `checked_citation`
    makes of the whole reply: the customer never sees an invented source name, and a refusal
    shows none. `refusal` is set by `finish()`.
    """

    def __init__(self, passages: Sequence):
        self.passages = passages
        self.shown = ""
        self.held = ""
        self.refusal = False

    def push(self, piece: str) -> str:
        self.held += piece
        lower = self.held.lower()
        at = lower.find(_SOURCE_OPEN)
        if at < 0:
            # A tail that is the start of "(source:" waits for the next piece.
            at = next((i for i in range(max(0, len(lower) - len(_SOURCE_OPEN)), len(lower))
                       if _SOURCE_OPEN.startswith(lower[i:])), len(lower))
        # Trailing spaces wait too: they go out with the next word, or not at all at the end.
        at = len(self.held[:at].rstrip())
        out, self.held = self.held[:at], self.held[at:]
        self.shown += out
        return out

    def finish(self) -> str:
        full = self.shown + self.held
        self.refusal = is_refusal(full)
        final = checked_citation(full, self.passages)
        self.held = ""
        rest = final[len(self.shown):] if final.startswith(self.shown) else ""
        self.shown += rest
        return rest


def below_min_score(passages: Sequence, min_score: float) -> bool:
    """True when a score threshold is set and no retrieved passage reaches it."""
    return bool(min_score) and max((p.score for p in passages), default=0.0) < min_score
