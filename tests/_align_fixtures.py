"""Shared pieces of the alignment tests (prefs, reward model, DPO): a tiny chat model folder and
synthetic preference pairs whose only difference is one word, so a model can learn them in a
few steps and reply length tells nothing (the chosen and rejected words have the same length)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
MY_DOCS = ROOT / "examples" / "my_docs"
THINGS = ["printer", "backup", "laptop", "router", "account", "invoice", "server", "phone", "agent", "folder",
          "schedule", "archive", "device", "token", "console", "browser"]


def synthetic_pairs(n: int, seed: int = 0) -> list[dict]:
    """Conversational pairs: "Is my THING working?" -> "... is working and good." over "... and poor."."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        thing = THINGS[i % len(THINGS)]
        extra = rng.choice(["", " today", " again", " now"])
        prompt = [{"role": "user", "content": f"Is my {thing} working{extra}?"}]
        base = f"Your {thing} is working{extra} and"
        out.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": f"{base} good."}],
                    "rejected": [{"role": "assistant", "content": f"{base} poor."}]})
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def tiny_model_folder(out: Path, context: int = 384, seed: int = 0) -> Path:
    """A tokenizer fitted to the synthetic pairs and the Tidewater documents, and a random tiny GPT."""
    from chatforge.data.tokenizer import train_tokenizer
    from chatforge.model.folder import save_model
    from chatforge.model.gpt import GPT, GPTConfig

    texts = [m["content"] for r in synthetic_pairs(64) for side in ("prompt", "chosen", "rejected") for m in r[side]]
    texts += [p.read_text(encoding="utf-8", errors="replace") for p in sorted(MY_DOCS.glob("*.*"))]
    tok = train_tokenizer(texts, 500, None)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, max_seq_len=context, d_model=32, n_layer=2, n_head=4,
                          n_kv_head=2, d_ff=64))
    return save_model(out, model.eval(), tok)
