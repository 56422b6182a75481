"""The tokenizer: ChatML chat tokenizers (chatforge's own or pretrained), and `chatforge tokenizer train`.

    chatforge tokenizer train --data runs/demo/data --vocab-size 8192 --out runs/demo/tokenizer

What this file holds
- `ChatTokenizer`: a HF `tokenizers.Tokenizer` plus ChatML rendering: load / save a tokenizer
  folder, encode and decode text, render conversations to ids plus a loss mask (see the class
  docstring for the exact rules). It takes chatforge's own tokenizers and pretrained ChatML-family
  ones (SmolLM2, Qwen2); `data/gguf_tokenizer.py` rebuilds one from a GGUF file.
- `chat_template_default_system(template)`: checks that a Jinja chat template renders ChatML and
  returns the system message it inserts when a conversation does not start with one.
- `train_tokenizer(texts, vocab_size, out_dir)`: train a new one with HF `tokenizers`.
- `tokens_per_byte(tok, texts)`: the compression figure reported after training.
- `train_on_corpus(data, ...)`: `chatforge tokenizer train` (its options: `chatforge.commands.tokenizer`).

chatforge's own tokenizer (`train_tokenizer`)
- Byte-level BPE: text is UTF-8 bytes, each byte one of 256 base symbols, so every string is
  representable and `decode(encode(s)) == s` exactly (there is no normalizer, no unknown token).
- Pre-tokenization splits text before BPE (merges never cross a split) with the regexes llama.cpp
  calls `deepseek-coder` (`SPLIT_PATTERNS`): each line break alone, then words with at most one
  leading whitespace character, punctuation runs likewise, CJK runs and single digits; what none
  of them matches (symbols, emoji, runs of spaces) stays a piece of its own. Two reasons:
  - every line break is a piece of its own, so the `\n` that ends a ChatML header
    (`<|im_start|>user\n`) never merges with the content after it, and the tokens of a message's
    content are the same whether it is an assistant reply being learned or the start of one
    being generated after the prompt. The price: a blank line (`\n\n`) costs two tokens.
  - llama.cpp knows this split by name (`tokenizer.ggml.pre`), so a model exported to GGUF
    (`chatforge export`) tokenizes in llama.cpp and Ollama exactly as here. llama.cpp has no name
    for a GPT-4-style split that keeps line breaks apart, which this tokenizer used before.
- Special tokens, fixed ids: 0 `<|endoftext|>` (ends a pretraining document), 1 `<|im_start|>`,
  2 `<|im_end|>` (ends a chat turn; the `eos_token` in `tokenizer_config.json`, so HF, llama.cpp
  and Ollama stop there), 3 `<|pad|>`. Ids 4..259 are the 256 byte symbols (ordered by their
  printable stand-ins, not by byte value), then come the merges.
  There is no BOS token and no UNK token.

Pretrained tokenizers (`ChatTokenizer.load` on a HF tokenizer folder, or `tokenizer_from_gguf`)
- The vocabulary must hold `<|im_start|>` and `<|im_end|>`. Special ids come from the tokens'
  names: `eot_id` is `<|endoftext|>` if the vocabulary has it, else the eos token; `pad_id` is the
  pad token, else the eos token (SmolLM2 has no pad token: pad = eos = `<|im_end|>`).
- The chat template (`chat_template` in tokenizer_config.json, or a `chat_template.jinja` file) is
  rendered on probe conversations in a sandboxed Jinja environment (a template is untrusted
  input). It must give ChatML text, optionally with a default system message inserted when the
  first message is not a system message (SmolLM2, Qwen2.5 do that); any other template is refused.
  chatforge renders prompts itself, inserting that same default, so the text a model is trained on
  and the prompt it sees at chat time are the ones HF, llama.cpp and Ollama render from the
  template, which `save` writes back verbatim.

The folder (what `save` writes, each file atomically): `tokenizer.json` (HF `tokenizers`),
`tokenizer_config.json` (class, special-token fields, `model_max_length` and the Jinja
`chat_template`), `special_tokens_map.json`. `transformers.AutoTokenizer.from_pretrained(folder)`
loads it, and its `apply_chat_template` gives the same text and ids as `render_chat_text` /
`render_chat` (the tests check this, for chatforge's own tokenizer and for pretrained-style ones).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from chatforge import files
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
# The special-token fields of tokenizer_config.json / special_tokens_map.json.
SPECIAL_FIELDS = ("bos_token", "eos_token", "unk_token", "pad_token")

# The pre-tokenizer of chatforge's own tokenizer: llama.cpp's `deepseek-coder` list, applied in
# order, each regex splitting the pieces of the one before (matches and the text between them
# both become pieces). Written as llama.cpp writes them, so both split text the same way.
SPLIT_PATTERNS = (
    r"[\r\n]",                 # every line break alone (see the module docstring)
    r"\s?\p{L}+",              # a word, with at most one whitespace character before it
    r"\s?\p{P}+",              # a punctuation run, likewise
    "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",   # CJK runs (after the above: little is left)
    r"\p{N}",                  # each digit alone
)
# The name llama.cpp gives that split (GGUF `tokenizer.ggml.pre`).
LLAMA_CPP_PRE = "deepseek-coder"

# The same ChatML rendering as `render_chat_text`, for HF / llama.cpp / Ollama.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where newer HF folders keep the template

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"

Message = Mapping[str, Any]


class ChatTokenizer:
    """A HF `tokenizers.Tokenizer` with ChatML rendering (`<|im_start|>role\\ncontent<|im_end|>\\n`).

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
    it stops at `<|im_end|>`), and on every system and user token. If the template inserts a
    default system message (`default_system`), `render_chat` / `render_chat_text` insert it too.

    Construct it with `load(folder)`, `train_tokenizer(...)` or `tokenizer_from_gguf(reader)`; the
    keyword arguments name the special tokens as a tokenizer_config.json does.
    """

    def __init__(self, tokenizer: Any, model_max_length: int = DEFAULT_MODEL_MAX_LENGTH, *,
                 chat_template: str | None = None, bos_token: str | None = None,
                 eos_token: str | None = IM_END, pad_token: str | None = PAD,
                 unk_token: str | None = None, add_bos_token: bool = False) -> None:
        def token_id(token: str | None) -> int | None:
            return None if token is None else tokenizer.token_to_id(token)

        missing = [t for t in (IM_START, IM_END) if token_id(t) is None]
        if missing:
            raise ChatforgeError(f"the tokenizer has no {' or '.join(missing)} token; chatforge needs a ChatML "
                                 "tokenizer: train one with `chatforge tokenizer train` or import a ChatML "
                                 "model (SmolLM2, Qwen2)")
        names = {"bos_token": bos_token, "eos_token": eos_token, "unk_token": unk_token, "pad_token": pad_token}
        for field, name in names.items():
            if name is not None and token_id(name) is None:
                raise ChatforgeError(f"the {field} {name!r} is not in the tokenizer's vocabulary; fix "
                                     f"{field} in {TOKENIZER_CONFIG} or use the tokenizer.json it belongs to")
        eot = EOT if token_id(EOT) is not None else eos_token
        if eot is None:
            raise ChatforgeError(f"the tokenizer has no {EOT} token and no eos_token; chatforge needs one to end "
                                 f"documents: set eos_token in {TOKENIZER_CONFIG}")
        pad = pad_token if pad_token is not None else eos_token
        if pad is None:
            raise ChatforgeError(f"the tokenizer has no pad_token and no eos_token to pad with; set one of them "
                                 f"in {TOKENIZER_CONFIG}")
        # Control tokens must be special added tokens: matched whole by HF in a rendered template,
        # and kept as plain text by `encode` (the guard below only protects special tokens).
        special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
        controls = dict.fromkeys(t for t in (EOT, IM_START, IM_END, *names.values())
                                 if t is not None and token_id(t) is not None and t not in special)
        if controls:
            tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in controls])
        self._tok = tokenizer
        # Special-token strings in user text stay plain text (see the class docstring). This flag is
        # not part of tokenizer.json, so saved files keep HF's normal behaviour for the template.
        self._tok.encode_special_tokens = True
        self.model_max_length = int(model_max_length)
        # The pad token written back is the one padding really uses (eos when the folder names none),
        # so HF pads saved folders the way chatforge does.
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = bos_token, eos_token, unk_token, pad
        self.add_bos_token = bool(add_bos_token)
        self.eot_id: int = token_id(eot)
        self.im_start_id: int = token_id(IM_START)
        self.im_end_id: int = token_id(IM_END)
        self.pad_id: int = token_id(pad)
        self.chat_template: str = CHAT_TEMPLATE if chat_template is None else chat_template
        self.default_system: str | None = chat_template_default_system(self.chat_template, self.special_tokens_map())
        # Fixed pieces, encoded once: the separator after <|im_end|> and the generation prompt.
        self._newline = self.encode("\n")
        self._prompt = self.encode("assistant\n")

    # ---- files -------------------------------------------------------------------------------

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "ChatTokenizer":
        """Load a tokenizer folder: one written by `save` / `chatforge tokenizer train`, or a
        pretrained HF one (tokenizer.json + tokenizer_config.json) with a ChatML vocabulary."""
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
        names = {field: _token_name(config.get(field), field, folder / TOKENIZER_CONFIG) for field in SPECIAL_FIELDS}
        max_len = config.get("model_max_length", DEFAULT_MODEL_MAX_LENGTH)
        if not isinstance(max_len, int) or max_len <= 0:
            max_len = DEFAULT_MODEL_MAX_LENGTH
        try:
            return cls(tok, model_max_length=max_len, chat_template=_read_chat_template(folder, config),
                       add_bos_token=config.get("add_bos_token") is True, **names)
        except ChatforgeError as e:
            raise ChatforgeError(f"{folder}: {e}") from None

    def save(self, folder: str | os.PathLike) -> Path:
        """Write the three tokenizer files into `folder` (created if missing; other files are kept).

        Each file is written atomically, tokenizer.json first; the chat template goes verbatim into
        tokenizer_config.json so HF, llama.cpp and Ollama render the prompts chatforge renders.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        files.write_text(folder / TOKENIZER_JSON, self._tok.to_str(pretty=False))
        files.write_json(folder / SPECIAL_TOKENS_MAP, self.special_tokens_map())
        files.write_json(folder / TOKENIZER_CONFIG, self._hf_config())
        return folder

    def special_tokens_map(self) -> dict[str, Any]:
        """The special-token fields HF expects (also the names a chat template may use)."""
        named = {self.bos_token, self.eos_token, self.unk_token, self.pad_token}
        return {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "unk_token": self.unk_token,
            "pad_token": self.pad_token,
            "additional_special_tokens": [t for t in (EOT, IM_START, IM_END)
                                          if t not in named and self._tok.token_to_id(t) is not None],
        }

    def _hf_config(self) -> dict[str, Any]:
        return {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **self.special_tokens_map(),
            "model_max_length": self.model_max_length,
            "padding_side": "right",
            "clean_up_tokenization_spaces": False,  # decode must give back the exact text
            "add_bos_token": self.add_bos_token,
            "add_eos_token": False,
            "chat_template": self.chat_template,
        }

    # ---- text --------------------------------------------------------------------------------

    @property
    def hf_tokenizer(self) -> Any:
        """The HF `tokenizers.Tokenizer` inside (to read its vocabulary, merges and pre-tokenizer:
        `chatforge export` writes them into a GGUF file). Changing it changes this tokenizer."""
        return self._tok

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

    def conversation(self, messages: Sequence[Message]) -> list[Message]:
        """`messages` checked, with the template's default system message in front if it has one
        and the conversation does not start with a system message."""
        msgs = validate_messages(messages)
        if self.default_system is not None and msgs and msgs[0]["role"] != "system":
            msgs = [{"role": "system", "content": self.default_system}, *msgs]
        return msgs

    def render_chat_text(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        """The ChatML text of `messages` (what HF's `apply_chat_template(tokenize=False)` gives)."""
        return chatml_text(self.conversation(messages), add_generation_prompt)

    def render_chat(self, messages: Sequence[Message],
                    add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """(ids, mask) of the ChatML rendering of `messages`; see the class docstring for the mask.

        The control tokens are put in as ids and the text between two of them (`role\\ncontent`,
        `\\n`) is encoded as one string, which is what HF does with the whole rendered text: it
        cuts it at special tokens and encodes each piece alone. So the ids equal
        `apply_chat_template(tokenize=True)` whatever the pre-tokenizer (a pretrained one may merge
        the header's `\\n` with whitespace that starts the content). The mask comes from token
        offsets: a token is content when it starts after the header; one that straddles the
        header's `\\n` and the content (only with such a pre-tokenizer) counts as header.
        """
        ids: list[int] = []
        mask: list[int] = []
        for m in self.conversation(messages):
            header = f"{m['role']}\n"
            enc = self._tok.encode(header + m["content"], add_special_tokens=False)
            learn = 1 if m["role"] == "assistant" else 0
            ids += [self.im_start_id, *enc.ids, self.im_end_id, *self._newline]
            mask += [0] + [learn if start >= len(header) else 0 for start, _ in enc.offsets]
            mask += [learn] + [0] * len(self._newline)
        if add_generation_prompt:
            ids += [self.im_start_id, *self._prompt]
            mask += [0] * (1 + len(self._prompt))
        return ids, mask


def chatml_text(messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
    """Plain ChatML text of `messages` (nothing inserted)."""
    parts = [f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages]
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n")
    return "".join(parts)


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


# ---- chat templates ------------------------------------------------------------------------------

def _msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


# Probe conversations: every shape chatforge renders (system first or not, a generation prompt or
# a final assistant turn, several turns) and content with leading / trailing whitespace, which a
# template that strips or trims content would change.
_PROBE_USER = [_msg("user", "Where is my parcel?")]
_PROBES: list[tuple[list[dict[str, str]], bool]] = [
    (_PROBE_USER, False),
    (_PROBE_USER, True),
    ([_msg("system", "You answer briefly."), _msg("user", "Hi there")], True),
    ([_msg("system", "You answer briefly."), _msg("user", "Hi"), _msg("assistant", "Hello! How can I help?")], False),
    ([_msg("user", "First question"), _msg("assistant", "First answer"), _msg("user", "Second one")], True),
    ([_msg("system", "Rules:\n- be kind"), _msg("user", "a"), _msg("assistant", "b"), _msg("user", "c"),
      _msg("assistant", "d")], False),
    ([_msg("user", " \n  spaced question\n\n"), _msg("assistant", "\tan answer with a tab \n")], False),
]
_DEFAULT_SYSTEM = re.compile(re.escape(IM_START) + r"system\n(.*)" + re.escape(IM_END) + r"\n", re.DOTALL)


def chat_template_default_system(template: str, special: Mapping[str, Any] | None = None) -> str | None:
    """Check that the Jinja chat `template` renders ChatML and return the system message it
    inserts when the first message is not a system message (None when it inserts none).

    The template is rendered (sandboxed, as HF renders it) on probe conversations; its text must
    equal ChatML, with that default message in front where the first message is not a system
    message. The default message is read from the template's own output for a lone user message.
    `special` holds the special-token names HF passes to templates (bos_token, eos_token, ...).
    Anything else raises ChatforgeError: chatforge renders prompts itself and would silently
    disagree with HF, llama.cpp and Ollama.
    """
    render = _compile_template(template, dict(special or {}))
    default = None
    plain = chatml_text(_PROBE_USER)
    got = render(_PROBE_USER, False)
    if got != plain:
        found = _DEFAULT_SYSTEM.fullmatch(got[:-len(plain)]) if got.endswith(plain) else None
        if found is None or IM_START in found.group(1) or IM_END in found.group(1):
            raise _not_chatml(_PROBE_USER, False, plain, got)
        default = found.group(1)
    for messages, gen in _PROBES:
        with_default = messages if default is None or messages[0]["role"] == "system" \
            else [_msg("system", default), *messages]
        expected = chatml_text(with_default, gen)
        got = render(messages, gen)
        if got != expected:
            raise _not_chatml(messages, gen, expected, got)
    return default


def _not_chatml(messages: list[dict[str, str]], gen: bool, expected: str, got: str) -> ChatforgeError:
    roles = "/".join(m["role"] for m in messages) + (" + generation prompt" if gen else "")
    return ChatforgeError(f"the chat_template is not a ChatML template: for a {roles} conversation it renders "
                          f"{_clip(got)} where ChatML is {_clip(expected)}; chatforge renders ChatML itself (so "
                          "training and chat see the same prompt), so use a ChatML model or drop the template "
                          "to get chatforge's")


def _clip(text: str, n: int = 160) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


def _compile_template(template: str, special: dict[str, Any]) -> Callable[[list[dict[str, str]], bool], str]:
    """`render(messages, add_generation_prompt) -> text` for `template`, in a sandboxed Jinja
    environment set up like HF's (trim_blocks, lstrip_blocks, loop controls, raise_exception)."""
    if not isinstance(template, str):
        raise ChatforgeError(f"the chat_template must be text, got {type(template).__name__}")

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(value: Any, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)

    # Never a plain Environment: a template is untrusted input and must not reach Python objects.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        compiled = env.from_string(template)
    except TemplateError as e:
        raise ChatforgeError(f"the chat_template is not valid Jinja ({e}); fix it or drop it to get chatforge's "
                             "ChatML template") from None

    def render(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        try:
            return compiled.render(messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                                   tools=None, documents=None, **special)
        except Exception as e:  # noqa: BLE001 - whatever an untrusted template raises is the template's fault
            roles = "/".join(m["role"] for m in messages)
            raise ChatforgeError(f"the chat_template fails on a plain {roles} conversation ({type(e).__name__}: "
                                 f"{e}); chatforge needs a ChatML template") from None

    return render


def _read_chat_template(folder: Path, config: Mapping[str, Any]) -> str | None:
    """The folder's chat template: `chat_template.jinja` (newer HF folders; it wins, as in HF), else
    `chat_template` of tokenizer_config.json (a string, or HF's list of named templates, of which
    the "default" one). None when there is none: chatforge's ChatML template is then used."""
    if (folder / CHAT_TEMPLATE_FILE).is_file():
        return (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise ChatforgeError(f"{folder / TOKENIZER_CONFIG} has named chat templates ({', '.join(map(str, named))}) "
                                 "but no 'default' one; chatforge renders the default template")
        template = named["default"]
    if template is not None and not isinstance(template, str):
        raise ChatforgeError(f"{folder / TOKENIZER_CONFIG}: chat_template must be text, got {type(template).__name__}")
    return template


def _token_name(value: Any, field: str, path: Path) -> str | None:
    """A special-token field of tokenizer_config.json: a string, {"content": str, ...} or null."""
    if isinstance(value, Mapping):
        value = value.get("content")
    if value is None or isinstance(value, str):
        return value
    raise ChatforgeError(f"{path}: {field} must be a token string or {{\"content\": ...}}, got {value!r}")


def _new_tokenizer() -> Any:
    """An untrained byte-level BPE tokenizer with chatforge's pre-tokenizer and decoder."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        *(pre_tokenizers.Split(Regex(p), behavior="isolated") for p in SPLIT_PATTERNS),
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


# ---- training on a built corpus ------------------------------------------------------------

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


def train_on_corpus(data: str | os.PathLike, vocab_size: int = DEFAULT_VOCAB_SIZE, out: str | os.PathLike | None = None,
                    min_frequency: int = 2, max_bytes: int = 0,
                    model_max_length: int = DEFAULT_MODEL_MAX_LENGTH) -> dict[str, Any]:
    """`chatforge tokenizer train`: train on the folder `chatforge data build` wrote (`data`), save
    to `out` (default: a `tokenizer` folder beside `data`), measure tokens per byte on val.jsonl.
    Returns {"tokenizer", "out", "seconds", "tokens_per_byte" (nan without validation text)}."""
    data = Path(data)
    if not (data / "train.jsonl").is_file():
        raise ChatforgeError(f"{data} has no train.jsonl; build the corpus first with "
                             f"`chatforge data build --out {data}`")
    if max_bytes < 0:
        raise ChatforgeError(f"--max-bytes must be 0 (no cap) or positive, got {max_bytes}")
    out = Path(out) if out else data.parent / "tokenizer"
    t0 = time.perf_counter()
    tok = train_tokenizer(_capped(read_training_texts(data), max_bytes), vocab_size, out,
                          min_frequency=min_frequency, model_max_length=model_max_length)
    seconds = time.perf_counter() - t0
    val = data / "val.jsonl"
    tpb = float("nan")
    if val.is_file():
        tpb = tokens_per_byte(tok, (r["text"] for r in _read_jsonl(val) if isinstance(r.get("text"), str)))
    return {"tokenizer": tok, "out": out, "seconds": seconds, "tokens_per_byte": tpb}
