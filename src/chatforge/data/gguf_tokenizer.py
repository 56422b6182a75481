"""The tokenizer of a GGUF file, rebuilt as a HF tokenizer: `tokenizer_from_gguf(reader) -> ChatTokenizer`.

    import gguf
    tok = tokenizer_from_gguf(gguf.GGUFReader("SmolLM2-135M-Instruct.Q4_1.gguf"))
    tok.save("runs/smol/base")     # tokenizer.json, tokenizer_config.json, special_tokens_map.json

A GGUF file has no tokenizer.json: llama.cpp keeps the tokenizer as metadata. For a byte-level BPE
vocabulary (`tokenizer.ggml.model == "gpt2"`) that is
- `tokenizer.ggml.tokens` (id order, byte-level spelling like `Ġthe`; control tokens written
  out, like `<|im_start|>`), `tokenizer.ggml.merges` ("Ġ t" = merge `Ġ` and `t`, best first),
  `tokenizer.ggml.token_type` (1 normal, 3 control, 4 user-defined, ...);
- `tokenizer.ggml.pre`: the NAME of a pre-tokenizer that llama.cpp defines in its source
  (`src/llama-vocab.cpp`: the name picks a list of regexes; each regex splits the pieces of the
  one before, matches and the text between them both becoming pieces);
- bos / eos / unk / padding token ids, `add_bos_token`, `tokenizer.chat_template`.

`PRE_TOKENIZERS` maps the names chatforge knows to the HF pre-tokenizer that splits text the same
way, written the way the original model's tokenizer.json writes it:
- `smollm` (and starcoder, refact, command-r, codeshell, exaone): every digit alone, then GPT-2's
  regex: `Sequence[Digits(individual_digits), ByteLevel(use_regex)]` as in SmolLM2's
  tokenizer.json. transformers (5.x) builds these files with GPT-2's regex alone, so it encodes
  digits differently whenever the merges could join them; we follow llama.cpp and the original.
- `gpt-2` (and mpt, olmo, phi-2): GPT-2's regex (`ByteLevel(use_regex)`).
- `default`: llama.cpp's fallback for files that name no pre-tokenizer: punctuation runs, GPT-2's
  regex, digit runs, then three-digit groups, each as a split.
- `llama-bpe` (llama3, llama-v3, falcon3) and `dbrx`, `smaug-bpe`: Llama 3's regex; the llama3
  names also set `ignore_merges` (a piece that is a whole token is taken as is), as llama.cpp and
  Llama 3's tokenizer.json do.
- `qwen2` (deepseek-r1-qwen, stablelm2): Qwen2's regex (single digits). Qwen2's tokenizer.json also
  has an NFC normalizer, which llama.cpp does not apply; we follow llama.cpp, so only text that
  is not already NFC can encode differently from the original model.
- `deepseek-coder`: each line break alone, words and punctuation runs with one leading whitespace
  character, CJK runs, single digits: the split of chatforge's own tokenizer
  (`tokenizer.SPLIT_PATTERNS`), so that `chatforge export` can name it.
Any other name, or a SentencePiece vocabulary (`tokenizer.ggml.model == "llama"`), is an error.

The other direction, for `chatforge export`: `llama_cpp_pre_name(tokenizer)` is the name whose
split equals a tokenizer's own pre-tokenizer, found by comparing their tokenizer.json forms; a
tokenizer whose split llama.cpp has no name for cannot be exported to GGUF faithfully.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from chatforge.data.tokenizer import DEFAULT_MODEL_MAX_LENGTH, LLAMA_CPP_PRE, SPLIT_PATTERNS, ChatTokenizer
from chatforge.errors import ChatforgeError

# The pre-tokenization regexes, in the HF (Oniguruma) spelling of the original tokenizer.json files.
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp's `default` list (its GPT-2 regex lacks the final `|\s+`, which changes nothing: text
# no regex matches becomes a piece of its own anyway).
DEFAULT_SPLITS = (r"[\p{P}\$\+<=>\^~\|]+", GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]")

# llama.cpp token types (gguf.TokenType): control tokens are special, user-defined ones are added
# tokens that are matched whole in text but are not special.
CONTROL = 3
USER_DEFINED = 4


def _byte_level(use_regex: bool) -> Any:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=use_regex)


def _gpt2() -> Any:
    return _byte_level(use_regex=True)


def _digits_gpt2() -> Any:
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _byte_level(use_regex=True)])


def _splits(*patterns: str) -> Callable[[], Any]:
    def build() -> Any:
        return pre_tokenizers.Sequence([*(pre_tokenizers.Split(Regex(p), behavior="isolated") for p in patterns),
                                        _byte_level(use_regex=False)])
    return build


@dataclass(frozen=True)
class PreTokenizer:
    """What a `tokenizer.ggml.pre` name means: the HF pre-tokenizer, the BPE `ignore_merges` flag,
    and whether llama.cpp adds BOS when the file does not say (`tokenizer.ggml.add_bos_token`)."""

    build: Callable[[], Any]
    ignore_merges: bool = False
    add_bos: bool = False


_LLAMA3 = PreTokenizer(_splits(LLAMA3_SPLIT), ignore_merges=True, add_bos=True)
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "default": PreTokenizer(_splits(*DEFAULT_SPLITS)),
    **dict.fromkeys(["gpt-2", "phi-2", "mpt", "olmo"], PreTokenizer(_gpt2)),
    **dict.fromkeys(["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"], PreTokenizer(_digits_gpt2)),
    **dict.fromkeys(["llama-bpe", "llama3", "llama-v3", "falcon3"], _LLAMA3),
    **dict.fromkeys(["dbrx", "smaug-bpe"], PreTokenizer(_splits(LLAMA3_SPLIT))),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "stablelm2"], PreTokenizer(_splits(QWEN2_SPLIT))),
    LLAMA_CPP_PRE: PreTokenizer(_splits(*SPLIT_PATTERNS)),
}


def llama_cpp_pre_name(tokenizer: Any) -> str:
    """The `tokenizer.ggml.pre` name under which llama.cpp splits text as `tokenizer` (a HF
    `tokenizers.Tokenizer`) does: the first name of the `PRE_TOKENIZERS` entry whose pre-tokenizer
    and BPE `ignore_merges` flag serialize as the tokenizer's do. ChatforgeError when none does."""
    spec = json.loads(tokenizer.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ChatforgeError(f"the tokenizer is {model.get('type')!r}, not byte-level BPE; only byte-level BPE "
                             "tokenizers can be written to a GGUF file here")
    normalizer = spec.get("normalizer")
    # NFC (Qwen2's tokenizers) is what llama.cpp leaves out too (see the module docstring).
    if normalizer is not None and normalizer.get("type") != "NFC":
        raise ChatforgeError(f"the tokenizer has a {normalizer.get('type')} normalizer, which llama.cpp does not "
                             "apply; a GGUF file of it would tokenize differently in llama.cpp")
    ours = _comparable(spec.get("pre_tokenizer")), bool(model.get("ignore_merges", False))
    seen: set[int] = set()
    for name, pre in PRE_TOKENIZERS.items():
        if id(pre) in seen:
            continue                      # an alias: the first name of each entry is the one written
        seen.add(id(pre))
        if (_comparable(_serialized(pre.build())), pre.ignore_merges) == ours:
            return name
    raise ChatforgeError(
        "the tokenizer splits text in a way llama.cpp has no name for (its pre-tokenizer matches none of "
        f"{', '.join(sorted(PRE_TOKENIZERS))}), so llama.cpp and Ollama would tokenize differently from it. "
        "A tokenizer trained by an older chatforge (GPT-4-style split) is one: export it with --format hf, "
        "or retrain the tokenizer and the model with this version")


def _serialized(pre_tokenizer: Any) -> Any:
    """The tokenizer.json form of an HF pre-tokenizer object."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    return json.loads(tok.to_str())["pre_tokenizer"]


def _comparable(node: Any) -> Any:
    """A pre-tokenizer's tokenizer.json form without the fields that only move offsets
    (`trim_offsets`), which differ between files that split text the same way."""
    if isinstance(node, dict):
        return {k: _comparable(v) for k, v in node.items() if k != "trim_offsets"}
    if isinstance(node, list):
        return [_comparable(v) for v in node]
    return node


def tokenizer_from_gguf(reader: Any) -> ChatTokenizer:
    """The ChatTokenizer of the GGUF file behind `reader` (a `gguf.GGUFReader`).

    Raises ChatforgeError when the file has no tokenizer, a tokenizer chatforge cannot rebuild
    (SentencePiece, an unknown pre-tokenizer name) or one that is not ChatML.
    """
    meta = _Metadata(reader)
    tokenizer = hf_tokenizer_from_gguf(reader)
    tokens = meta.get("tokenizer.ggml.tokens")
    pre = PRE_TOKENIZERS[meta.get("tokenizer.ggml.pre", "default")]

    def name(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        if i is None:
            return None
        if not 0 <= int(i) < len(tokens):
            raise ChatforgeError(f"{meta.where}: tokenizer.ggml.{key} is {i}, outside the vocabulary of "
                                 f"{len(tokens)} tokens; the file is damaged")
        return tokens[int(i)]

    arch = meta.get("general.architecture")
    context = meta.get(f"{arch}.context_length") if arch else None
    try:
        return ChatTokenizer(
            tokenizer,
            model_max_length=int(context) if context else DEFAULT_MODEL_MAX_LENGTH,
            chat_template=meta.get("tokenizer.chat_template"),
            bos_token=name("bos_token_id"),
            eos_token=name("eos_token_id"),
            unk_token=name("unknown_token_id"),
            pad_token=name("padding_token_id"),
            add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", pre.add_bos)),
        )
    except ChatforgeError as e:
        raise ChatforgeError(f"{meta.where}: {e}") from None


def hf_tokenizer_from_gguf(reader: Any) -> Any:
    """The HF `tokenizers.Tokenizer` the GGUF metadata describes (byte-level BPE only)."""
    meta = _Metadata(reader)
    model = meta.get("tokenizer.ggml.model")
    if model is None:
        raise ChatforgeError(f"{meta.where} holds no tokenizer (no tokenizer.ggml.model); chatforge needs the "
                             "model's tokenizer in the file")
    if model == "llama":
        raise ChatforgeError(f"{meta.where} has a SentencePiece tokenizer (tokenizer.ggml.model 'llama'); chatforge "
                             "imports byte-level BPE (gpt2) tokenizers only for now: use a model with a byte-level "
                             "BPE vocabulary (SmolLM2, Qwen2) or its HF folder")
    if model != "gpt2":
        raise ChatforgeError(f"{meta.where} has a {model!r} tokenizer; chatforge imports byte-level BPE (gpt2) "
                             "tokenizers only")
    # llama.cpp reads a missing name as "default" (with a warning that quality will suffer).
    pre_name = meta.get("tokenizer.ggml.pre", "default")
    pre = PRE_TOKENIZERS.get(pre_name)
    if pre is None:
        raise ChatforgeError(f"{meta.where} names the pre-tokenizer {pre_name!r}, which chatforge does not know "
                             f"(it knows {', '.join(sorted(PRE_TOKENIZERS))}); import the model's HF folder instead")
    tokens = meta.get("tokenizer.ggml.tokens")
    merges = meta.get("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise ChatforgeError(f"{meta.where} has no tokenizer.ggml.{'tokens' if not tokens else 'merges'}; "
                             "the tokenizer is incomplete")
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ChatforgeError(f"{meta.where}: tokenizer.ggml.tokens lists the same token twice; chatforge cannot "
                             "rebuild such a vocabulary")
    pairs = [tuple(m.split(" ")) for m in merges]
    bad = next((m for m, p in zip(merges, pairs) if len(p) != 2 or p[0] not in vocab or p[1] not in vocab), None)
    if bad is not None:
        raise ChatforgeError(f"{meta.where}: the merge {bad!r} is not two tokens of the vocabulary; the file is damaged")

    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False,
                               ignore_merges=pre.ignore_merges))
    tok.pre_tokenizer = pre.build()
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = _post_processor(meta, tokens, pre)
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    # Added at their own ids (the content is in the vocabulary): control tokens as special tokens,
    # user-defined ones as plain added tokens that are still matched whole, as llama.cpp does.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, types) if kind == CONTROL and t])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, kind in zip(tokens, types) if kind == USER_DEFINED and t])
    if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise ChatforgeError(f"{meta.where}: the rebuilt tokenizer has {tok.get_vocab_size(with_added_tokens=True)} "
                             f"ids for {len(tokens)} tokens; the file's vocabulary is inconsistent")
    return tok


def _post_processor(meta: "_Metadata", tokens: list[str], pre: PreTokenizer) -> Any:
    """BOS / EOS added by `tokenizer(text)` when the file asks for it (as llama.cpp adds them);
    otherwise byte-level offsets only. chatforge's own encode never adds them."""
    defaults = {"bos": pre.add_bos, "eos": False}
    add = [(key, meta.get(f"tokenizer.ggml.{key}_token_id")) for key in ("bos", "eos")
           if meta.get(f"tokenizer.ggml.add_{key}_token", defaults[key])]
    for key, i in add:
        if i is None or not 0 <= int(i) < len(tokens):
            raise ChatforgeError(f"{meta.where}: add_{key}_token is set but the {key} token id is missing or invalid")
    if not add:
        return processors.ByteLevel(trim_offsets=False)
    bos = [tokens[int(i)] for key, i in add if key == "bos"]
    eos = [tokens[int(i)] for key, i in add if key == "eos"]
    return processors.TemplateProcessing(
        single=" ".join([*bos, "$A", *eos]),
        pair=" ".join([*bos, "$A", *eos, *bos, "$B", *eos]),
        special_tokens=[(t, tokens.index(t)) for t in dict.fromkeys(bos + eos)],
    )


class _Metadata:
    """Read access to a GGUFReader's key/value fields as plain Python values."""

    def __init__(self, reader: Any) -> None:
        self._fields = getattr(reader, "fields", None)
        if self._fields is None:
            raise ChatforgeError(f"expected a gguf.GGUFReader, got {type(reader).__name__}")
        # GGUFReader keeps no path of its own; its memory map knows the file name.
        self.where = str(getattr(getattr(reader, "data", None), "filename", None) or "the GGUF file")

    def get(self, key: str, default: Any = None) -> Any:
        field = self._fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except Exception as e:  # noqa: BLE001 - a damaged field: say which one
            raise ChatforgeError(f"{self.where}: the metadata field {key} cannot be read ({e}); the file is damaged")
