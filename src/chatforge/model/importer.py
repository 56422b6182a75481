"""Import a pretrained checkpoint (a GGUF file or an HF model folder) as a chatforge model folder.

    from chatforge.model.importer import import_model
    result = import_model("SmolLM2-135M-Instruct.Q4_1.gguf", "runs/x/base")

The readers (`gguf_import.read_gguf`, `hf_import.read_hf_folder`) turn a source into a
`Checkpoint`: a `GPTConfig` plus a state dict under chatforge's parameter names, fp32. This
file dispatches to them and holds the last step (what both share, the `Checkpoint`, the
context / sliding-window rule and the check that every tensor the config needs is there with the
right shape and nothing else is, is in `model/checkpoint.py`), `write_model`, which reconciles the vocabulary with the tokenizer and writes an ordinary
model folder (`model.folder.save_model`) atomically: a failure leaves no output folder.

The command is `chatforge model import` (commands/model.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from chatforge import files
from chatforge.data.gguf_tokenizer import tokenizer_from_gguf
from chatforge.data.tokenizer import ChatTokenizer
from chatforge.errors import ChatforgeError
from chatforge.model.checkpoint import Checkpoint, check_state  # noqa: F401 (the readers' names)
from chatforge.model.folder import save_model
from chatforge.model.gguf_import import open_gguf, read_gguf
from chatforge.model.gpt import GPT
from chatforge.model.hf_import import read_hf_folder


def fit_vocabulary(ckpt: Checkpoint, tokenizer_size: int) -> None:
    """Make the embedding match the tokenizer. Checkpoints often pad the embedding beyond the
    tokenizer (Qwen: 151936 rows for 151665 tokens) so that it divides nicely on GPUs; those rows
    are ids no text can produce, so they are dropped (the logits of every real token are
    unchanged). A tokenizer with MORE tokens than the embedding has rows cannot work."""
    rows = ckpt.config.vocab_size
    if tokenizer_size == rows:
        return
    if tokenizer_size > rows:
        raise ChatforgeError(f"{ckpt.source}: vocabulary/embedding mismatch: the tokenizer has {tokenizer_size} "
                             f"tokens but the embedding only {rows} rows; the tokenizer does not belong to "
                             "these weights")
    for name in ("embed_tokens.weight", "lm_head.weight"):
        if name in ckpt.state:
            ckpt.state[name] = ckpt.state[name][:tokenizer_size].clone()
    if ckpt.config.tie_embeddings:
        ckpt.state["lm_head.weight"] = ckpt.state["embed_tokens.weight"]
    ckpt.config.vocab_size = tokenizer_size
    ckpt.notes.append(f"the embedding had {rows} rows for {tokenizer_size} tokens; the {rows - tokenizer_size} "
                      "padding rows (ids no text can produce) were dropped")


def _check_out(src: Path, out: Path) -> None:
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise ChatforgeError(f"--out {out} would overwrite the source {src}; choose another folder")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "config.json").is_file())):
        raise ChatforgeError(f"{out} exists and is not a model folder; choose another --out "
                             "(an existing model folder is replaced)")


def write_model(ckpt: Checkpoint, tokenizer, out: str | Path) -> Path:
    """Write `ckpt` with `tokenizer` (a `ChatTokenizer`) as the model folder `out`, atomically:
    it appears complete or not at all (an existing model folder there is replaced)."""
    out = Path(out)
    _check_out(ckpt.source, out)
    fit_vocabulary(ckpt, tokenizer.vocab_size)
    state = check_state(ckpt.config, ckpt.state, str(ckpt.source))
    with torch.device("meta"):
        model = GPT(ckpt.config)              # only carries the config: the weights come from `state`
    with files.atomic_dir(out) as tmp:
        save_model(tmp, model, tokenizer, state=state)
    return out


@dataclass
class ImportResult:
    out: Path
    checkpoint: Checkpoint
    seconds: float

    def summary(self) -> str:
        c, ck = self.checkpoint.config, self.checkpoint
        types = ", ".join(f"{t} x{n}" for t, n in ck.source_types.most_common())
        head = f", head size {c.head_dim}" if c.head_size is not None else ""
        switches = "".join(f", {s}" for s in ("qkv_bias", "qk_norm") if getattr(c, s))
        lines = [f"imported {ck.architecture} from {ck.source} in {self.seconds:.1f} s -> {self.out}",
                 f"  {ck.num_params / 1e6:.1f}M parameters: {c.n_layer} layers, width {c.d_model}, "
                 f"{c.n_head}/{c.n_kv_head} heads{head}, ffn {c.d_ff}, vocab {c.vocab_size}, context "
                 f"{c.max_seq_len}, rope theta {c.rope_theta:g}{', tied embeddings' if c.tie_embeddings else ''}"
                 f"{switches}",
                 f"  source tensors: {types} (stored here as fp32)"]
        lines += [f"  note: {n}" for n in ck.notes]
        return "\n".join(lines)


def read_checkpoint(src: str | Path) -> tuple[Checkpoint, Callable[[], object]]:
    """(checkpoint, function returning its tokenizer) for a .gguf file or an HF model folder."""
    src = Path(src).expanduser()
    if not src.exists():
        raise ChatforgeError(f"{src} does not exist; pass a .gguf file or a Hugging Face model folder")
    if src.is_dir():
        def hf_tokenizer():
            return ChatTokenizer.load(src)

        return read_hf_folder(src), hf_tokenizer

    reader = open_gguf(src)

    def gguf_tokenizer():
        return tokenizer_from_gguf(reader)

    return read_gguf(reader, src), gguf_tokenizer


def import_model(src: str | Path, out: str | Path) -> ImportResult:
    """Import the GGUF file or HF model folder `src` as the chatforge model folder `out`."""
    t0 = time.perf_counter()
    _check_out(Path(src), Path(out))             # before seconds of reading, not after
    ckpt, tokenizer = read_checkpoint(src)
    try:
        tok = tokenizer()
    except ChatforgeError as e:
        raise ChatforgeError(f"the weights of {src} are fine, but its tokenizer cannot be used: {e}") from None
    out = write_model(ckpt, tok, out)
    return ImportResult(out, ckpt, time.perf_counter() - t0)
