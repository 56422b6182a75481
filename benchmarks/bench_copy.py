"""Can a model copy from its context? Loss on a passage read once, then on the same passage again.

    .venv/bin/python benchmarks/bench_copy.py runs/demo/pretrain runs/demo/sft [--data runs/demo/data]

Answering from retrieved passages is mostly copying: the answer is in the prompt. A model that
can copy (that has "induction heads") predicts the second reading of a passage almost perfectly,
so its loss there falls far below the first reading's (to well under 1 nat per token for
trained language models). A model that cannot copy scores both readings alike.

For each of the first `--texts` validation passages of at least `--tokens` tokens: the model
reads those tokens twice in one sequence; the mean next-token loss is taken over the first
reading and over the second. The last line is one JSON object: {"bench": "copy", ...}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def copy_losses(model_dir: str, texts: list[str], n_tokens: int, limit: int) -> dict:
    from chatforge.model.folder import load_model

    model, tok = load_model(model_dir)
    model.eval()
    first, second, n = 0.0, 0.0, 0
    with torch.no_grad():
        for text in texts:
            if n == limit:
                break
            ids = tok.encode(text)[:n_tokens]
            if len(ids) < n_tokens:
                continue
            x = torch.tensor([ids + ids])
            logits, _ = model(x[:, :-1])
            nll = torch.nn.functional.cross_entropy(logits[0].float(), x[0, 1:], reduction="none")
            first += nll[:n_tokens - 1].mean().item()
            second += nll[n_tokens:].mean().item()
            n += 1
    if not n:
        raise SystemExit(f"no validation text has {n_tokens} tokens; lower --tokens")
    return {"model": model_dir, "texts": n, "first_reading": first / n, "second_reading": second / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="model folders")
    ap.add_argument("--data", default="runs/demo/data", help="data folder: its val.jsonl gives the passages")
    ap.add_argument("--texts", type=int, default=40, help="passages to read")
    ap.add_argument("--tokens", type=int, default=100, help="tokens of each passage")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    texts = []
    with open(Path(args.data) / "val.jsonl", encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            if len(texts) >= args.texts * 3:   # some are too short; read a few spare
                break
    rows = []
    for m in args.models:
        r = copy_losses(m, texts, args.tokens, args.texts)
        rows.append(r)
        print(f"{m}: loss {r['first_reading']:.2f} on the first reading, {r['second_reading']:.2f} on the "
              f"second ({r['texts']} passages of {args.tokens} tokens)")
    print(json.dumps({"bench": "copy", "tokens": args.tokens, "results": rows}))


if __name__ == "__main__":
    main()
