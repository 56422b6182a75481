"""The tokenizer: byte-level BPE with a ChatML chat template, and `chatforge tokenizer train`.

    chatforge tokenizer train --data runs/demo/data --vocab-size 8192 --out runs/demo/tokenizer

What this file holds
- `ChatTokenizer`: load / save a tokenizer folder, encode and decode text, render conversations
  to ids plus a loss mask (see the class docstring for the exact rules).
- `train_tokenizer(texts, vocab_size, out_dir)`: train a new one with HF `tokenizers`.
- `tokens_per_byte(tok, texts)`: the compression figure reported after training.
- `configure(parser)` / `run_train(args)`: the command.

The tokenizer
- Byte-level BPE: text is UTF-8 bytes, each byte one of 256 base symbols, so every string is
  representable and `decode(encode(s)) == s` exactly (there is no normalizer, no unknown token).
- Pre-tokenization splits text with a GPT-4-style regex before BPE (merges never cross a split).
  One deliberate change from GPT-4's pattern: a piece holds at most ONE line break, so the `\n`
  that ends a ChatML header (`<|im_start|>user\n`) is always a piece of its own and the message
  content starts a fresh piece. That is what lets `render_chat` encode header and content apart
  and still get exactly the ids of encoding the whole rendered text (HF's `apply_chat_template`).
  The price is that a blank line (`\n\n`) costs two tokens instead of one.
- Special tokens, fixed ids: 0 `<|endoftext|>` (ends a pretraining document), 1 `<|im_start|>`,
  2 `<|im_end|>` (ends a chat turn; the `eos_token` in `tokenizer_config.json`, so HF, llama.cpp
  and Ollama stop there), 3 `<|pad|>`. Ids 4..259 are the 256 byte symbols (ordered by their
  printable stand-ins, not by byte value), then come the merges.
  There is no BOS token and no UNK token.

The folder (what `save` writes, each file atomically): `tokenizer.json` (HF `tokenizers`),
`tokenizer_config.json` (class, special-token fields, `model_max_length` and the Jinja
`chat_template`), `special_tokens_map.json`. `transformers.AutoTokenizer.from_pretrained(folder)`
loads it, and its `apply_chat_template` gives the same text and ids as `render_chat_text` /
`render_chat` (the tests check this).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from chatforge import files
from chatforge.cli import add_parser, leaf, subcommands
from chatforge.errors import ChatforgeError

EOT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|pad|>"
# Order = ids 0..3: the trainer puts special tokens first, in this order.
SPECIAL_TOKENS = (EOT, IM_START, IM_END, PAD)
ROLES = ("system", "user", "assistant")
DEFAULT_VOCAB_SIZE = 8192
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256  # the special tokens plus every byte
DEFAULT_MODEL_MAX_LENGTH = 2048

# GPT-4's split pattern (contractions, words with one leading non-letter, numbers of up to three
# digits, punctuation runs, line breaks, other whitespace) except for the line-break branch:
# GPT-4 has `\s*[\r\n]+` (a run of blank lines is one piece); ours takes trailing spaces and ONE
# line break, so a header's `\n` never merges with the content after it (see module docstring).
# No anchors and no look-behind: where a piece starts, the pieces after it do not depend on the
# text before it, which is what makes per-part encoding compose.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
    r"|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|[^\S\r\n]*(?:\r\n|[\r\n])"
    r"|\s+(?!\S)"
    r"|\s+"
)

# The same ChatML rendering as `render_chat_text`, for HF / llama.cpp / Ollama.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"

Message = Mapping[str, Any]


class ChatTokenizer:
    """Byte-level BPE tokenizer with ChatML rendering; a thin layer over a HF `tokenizers.Tokenizer`.

    `encode(text)` treats special-token strings inside the text as plain text: a user who types
    `<|im_end|><|im_start|>system` gets the characters, never the control tokens, so they cannot
    close their turn or forge a system message (prompt-injection guard). Only `render_chat` puts
    special tokens in, around the messages. (HF's `tokenizer(text)` does match them in raw text,
    so for content that contains a special-token string HF's `apply_chat_template(tokenize=True)`
    gives different ids from `render_chat`; the text is still the same. Otherwise they are equal.)

    `render_chat(messages)` returns `(ids, mask)`, both one entry per token. The mask is 1 on the
    tokens an assistant turn should learn to produce: the assistant's content and its closing
    `<|im_end|>` (so the model learns to stop). It is 0 on `<|im_start|>assistant\\n` (the prompt
    gives it), on the `\\n` after `<|im_end|>` (a separator that generation never produces, since
    it stops at `<|im_end|>`), and on every system and user token.
    """

    def __init__(self, tokenizer: Any, model_max_length: int = DEFAULT_MODEL_MAX_LENGTH) -> None:
        ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ChatforgeError(f"the tokenizer has no {', '.join(missing)} token; it was not made by "
                                 "chatforge: train one with `chatforge tokenizer train`")
        self._tok = tokenizer
        # Special-token strings in user text stay plain text (see the class docstring). This flag is
        # not part of tokenizer.json, so saved files keep HF's normal behaviour for the template.
        self._tok.encode_special_tokens = True
        self.model_max_length = int(model_max_length)
        self.eot_id: int = ids[EOT]
        self.im_start_id: int = ids[IM_START]
        self.im_end_id: int = ids[IM_END]
        self.pad_id: int = ids[PAD]
        # Fixed pieces of every rendered turn, encoded once.
        self._headers = {role: self.encode(f"{role}\n") for role in ROLES}
        self._newline = self.encode("\n")

    # ---- files -------------------------------------------------------------------------------

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "ChatTokenizer":
        """Load a folder written by `save` (or by `chatforge tokenizer train`)."""
        from tokenizers import Tokenizer

        folder = Path(folder)
        if not folder.is_dir():
            raise ChatforgeError(f"tokenizer folder {folder} does not exist; "
                                 "train one with `chatforge tokenizer train --data DIR --out DIR`")
        missing = [n for n in (TOKENIZER_JSON, TOKENIZER_CONFIG) if not (folder / n).is_file()]
        if missing:
            raise ChatforgeError(f"{folder} has no {' or '.join(missing)}; it is not a tokenizer folder: "
                                 "train one with `chatforge tokenizer train --data DIR --out DIR`")
        try:
            tok = Tokenizer.from_file(str(folder / TOKENIZER_JSON))
        except Exception as e:  # the Rust side raises a bare Exception on bad JSON or schema
            raise ChatforgeError(f"{folder / TOKENIZER_JSON} is corrupt ({e}); train the tokenizer again") from None
        try:
            config = files.read_json(folder / TOKENIZER_CONFIG)
        except (OSError, ValueError) as e:
            raise ChatforgeError(f"{folder / TOKENIZER_CONFIG} is corrupt ({e}); train the tokenizer again") from None
        if not isinstance(config, dict):
            raise ChatforgeError(f"{folder / TOKENIZER_CONFIG} should hold a JSON object; train the tokenizer again")
        # render_chat implements exactly one template; a different one would make chatforge and
        # HF / llama.cpp prompts disagree silently, so refuse it.
        if config.get("chat_template", CHAT_TEMPLATE) != CHAT_TEMPLATE:
            raise ChatforgeError(f"{folder / TOKENIZER_CONFIG} has a chat_template that is not chatforge's ChatML "
                                 "template; chatforge renders only its own, so restore it or retrain the tokenizer")
        max_len = config.get("model_max_length", DEFAULT_MODEL_MAX_LENGTH)
        if not isinstance(max_len, int) or max_len <= 0:
            max_len = DEFAULT_MODEL_MAX_LENGTH
        return cls(tok, model_max_length=max_len)

    def save(self, folder: str | os.PathLike) -> Path:
        """Write the three tokenizer files into `folder` (created if missing; other files are kept).

        Each file is written atomically. tokenizer.json goes first: the other two only name special
        tokens and hold the template, which never change, so any crash leaves a loadable folder.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        files.write_text(folder / TOKENIZER_JSON, self._tok.to_str(pretty=False))
        files.write_json(folder / SPECIAL_TOKENS_MAP, _special_tokens_map())
        files.write_json(folder / TOKENIZER_CONFIG, self._hf_config())
        return folder

    def _hf_config(self) -> dict[str, Any]:
        return {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **_special_tokens_map(),
            "model_max_length": self.model_max_length,
            "padding_side": "right",
            "clean_up_tokenization_spaces": False,  # decode must give back the exact text
            "add_bos_token": False,
            "add_eos_token": False,
            "chat_template": CHAT_TEMPLATE,
        }

    # ---- text --------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included (ids are 0 .. vocab_size - 1)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings in it are plain text. No BOS/EOS is added."""
        if not isinstance(text, str):
            raise ChatforgeError(f"can only encode text (str), got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` for many texts at once (the Rust side spreads them over the CPU cores)."""
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise ChatforgeError(f"can only encode text (str), got {type(t).__name__}")
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, special tokens written out (`<|im_end|>`). Bytes that do not form valid
        UTF-8 (a cut-off multi-byte character) become U+FFFD."""
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    # ---- chat --------------------------------------------------------------------------------

    def render_chat_text(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        """The ChatML text of `messages` (what HF's `apply_chat_template(tokenize=False)` gives)."""
        parts = [f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in validate_messages(messages)]
        if add_generation_prompt:
            parts.append(f"{IM_START}assistant\n")
        return "".join(parts)

    def render_chat(self, messages: Sequence[Message],
                    add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """(ids, mask) of the ChatML rendering of `messages`; see the class docstring for the mask.

        Built part by part (`<|im_start|>`, header, content, `<|im_end|>`, `\\n`): the split pattern
        makes this equal to encoding the whole text with special tokens recognised, and the parts
        say exactly which tokens are assistant content.
        """
        ids: list[int] = []
        mask: list[int] = []
        for m in validate_messages(messages):
            header = self._headers[m["role"]]
            content = self.encode(m["content"])
            learn = 1 if m["role"] == "assistant" else 0
            ids += [self.im_start_id, *header, *content, self.im_end_id, *self._newline]
            mask += [0] * (1 + len(header)) + [learn] * (len(content) + 1) + [0] * len(self._newline)
        if add_generation_prompt:
            ids += [self.im_start_id, *self._headers["assistant"]]
            mask += [0] * (1 + len(self._headers["assistant"]))
        return ids, mask


def validate_messages(messages: Sequence[Message]) -> list[Message]:
    """Check a conversation: a list of {"role": system|user|assistant, "content": str}."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatforgeError(f"messages must be a list of {{'role', 'content'}} objects, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ChatforgeError(f"message {i} must be an object with 'role' and 'content', got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise ChatforgeError(f"message {i} has role {role!r}; the role must be one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise ChatforgeError(f"message {i} ({role}) must have 'content' as text, got "
                                 f"{type(m.get('content')).__name__}")
    return list(messages)


def _special_tokens_map() -> dict[str, Any]:
    return {
        "bos_token": None,     # no BOS: documents are separated by <|endoftext|> at their end
        "eos_token": IM_END,   # generation of a chat turn ends here
        "unk_token": None,     # byte-level: nothing is ever unknown
        "pad_token": PAD,
        "additional_special_tokens": [EOT, IM_START],
    }


def _new_tokenizer() -> Any:
    """An untrained byte-level BPE tokenizer with chatforge's pre-tokenizer and decoder."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        # Bytes -> printable symbols only; the splitting is done above, and no prefix space is
        # added so that the first word of a text is encoded like any other unspaced word.
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike | None,
                    min_frequency: int = 2, model_max_length: int = DEFAULT_MODEL_MAX_LENGTH) -> ChatTokenizer:
    """Train a byte-level BPE tokenizer of at most `vocab_size` ids on `texts` and save it to `out_dir`.

    Merges are learned until the vocabulary is full or no pair of tokens occurs `min_frequency`
    times, so a small corpus can give fewer ids than asked for: `vocab_size` of the result is the
    real count. `out_dir=None` skips saving.
    """
    from tokenizers import pre_tokenizers, trainers

    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ChatforgeError(f"vocab size must be at least {MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} "
                             f"special tokens), got {vocab_size}")
    if min_frequency < 1:
        raise ChatforgeError(f"min frequency must be at least 1, got {min_frequency}")
    tok = _new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 byte symbols, even ones the corpus never shows, so any text can be encoded.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=_show_progress(),
    )
    tok.train_from_iterator(_strings(texts), trainer=trainer)
    result = ChatTokenizer(tok, model_max_length=model_max_length)
    if out_dir is not None:
        result.save(out_dir)
    return result


def tokens_per_byte(tok: ChatTokenizer, texts: Iterable[str], batch_size: int = 256) -> float:
    """Tokens per UTF-8 byte over `texts` (lower is better compression); nan when there is no text."""
    n_tokens = n_bytes = 0
    batch: list[str] = []

    def flush() -> None:
        nonlocal n_tokens
        n_tokens += sum(len(ids) for ids in tok.encode_batch(batch))
        batch.clear()

    for t in texts:
        n_bytes += len(t.encode("utf-8"))
        batch.append(t)
        if len(batch) >= batch_size:
            flush()
    flush()
    return n_tokens / n_bytes if n_bytes else float("nan")


def _strings(texts: Iterable[str]) -> Iterator[str]:
    for t in texts:
        if not isinstance(t, str):
            raise ChatforgeError(f"training texts must be str, got {type(t).__name__}")
        yield t


def _show_progress() -> bool:
    return os.environ.get("CHATFORGE_QUIET") != "1" and sys.stderr.isatty()


# ---- the command -------------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    sub = subcommands(parser)
    p = add_parser(sub, "train", "train a byte-level BPE tokenizer with a ChatML chat template on a built corpus",
                   "chatforge tokenizer train --data runs/demo/data --vocab-size 8192 --out runs/demo/tokenizer")
    p.add_argument("--data", default=None,
                   help="folder written by `chatforge data build` (train.jsonl, val.jsonl, qa_train.jsonl)")
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                   help="largest number of token ids, special tokens and the 256 bytes included")
    p.add_argument("--out", default=None, help="output folder; None means a `tokenizer` folder beside --data")
    p.add_argument("--min-frequency", type=int, default=2, help="a pair must occur this often to be merged")
    p.add_argument("--max-bytes", type=int, default=0,
                   help="train on at most this many bytes of text; 0 means all of it")
    p.add_argument("--model-max-length", type=int, default=DEFAULT_MODEL_MAX_LENGTH,
                   help="`model_max_length` written for HF transformers (the model's context length)")
    leaf(p, run_train)


def read_training_texts(data: Path) -> Iterator[str]:
    """The corpus documents, then every Q&A message as `role\\ncontent` (the text between special
    tokens in a rendered chat), so that chat words and the role names get merges too."""
    for rec in _read_jsonl(data / "train.jsonl"):
        if isinstance(rec.get("text"), str):
            yield rec["text"]
    qa = data / "qa_train.jsonl"
    if qa.is_file():
        for rec in _read_jsonl(qa):
            for m in rec.get("messages") or []:
                if isinstance(m, dict) and isinstance(m.get("content"), str):
                    yield f"{m.get('role', 'user')}\n{m['content']}"


def _read_jsonl(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise ChatforgeError(f"{path}:{n}: not valid JSON ({e}); rebuild the data with `chatforge data build`") from None
            if isinstance(rec, dict):
                yield rec


def _capped(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    """Stop once `max_bytes` of UTF-8 have been yielded (0 = no cap); the last text is cut to fit."""
    used = 0
    for t in texts:
        if max_bytes <= 0:
            yield t
            continue
        size = len(t.encode("utf-8"))
        if used + size >= max_bytes:
            yield t.encode("utf-8")[: max_bytes - used].decode("utf-8", errors="ignore")
            return
        used += size
        yield t


def run_train(args: argparse.Namespace) -> int:
    if not args.data:
        raise ChatforgeError("pass --data DIR: the folder written by `chatforge data build`")
    data = Path(args.data)
    if not (data / "train.jsonl").is_file():
        raise ChatforgeError(f"{data} has no train.jsonl; build the corpus first with "
                             f"`chatforge data build --out {data}`")
    if args.max_bytes < 0:
        raise ChatforgeError(f"--max-bytes must be 0 (no cap) or positive, got {args.max_bytes}")
    out = Path(args.out) if args.out else data.parent / "tokenizer"

    texts = _capped(read_training_texts(data), args.max_bytes)
    t0 = time.perf_counter()
    tok = train_tokenizer(texts, args.vocab_size, out, min_frequency=args.min_frequency,
                          model_max_length=args.model_max_length)
    seconds = time.perf_counter() - t0

    val = data / "val.jsonl"
    tpb = float("nan")
    if val.is_file():
        tpb = tokens_per_byte(tok, (r["text"] for r in _read_jsonl(val) if isinstance(r.get("text"), str)))
    note = "" if tok.vocab_size == args.vocab_size else \
        f" (asked for {args.vocab_size}: the text has no more pairs seen {args.min_frequency}+ times)"
    print(f"tokenizer: {tok.vocab_size} tokens{note}, trained in {seconds:.1f}s -> {out}")
    print(f"validation: {tpb:.4f} tokens/byte ({1 / tpb:.2f} bytes/token)" if tpb == tpb else
          "validation: no val.jsonl text, tokens/byte not measured")
    return 0
