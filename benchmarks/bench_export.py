"""Benchmark: the demo assistant exported to GGUF (f16, q8_0, q4_0, q4_1) and run by llama.cpp.

    .venv/bin/python benchmarks/bench_export.py [--model runs/demo/sft] [--data runs/demo/data]
        [--out runs/demo/export] [--quants f16,q8_0,q4_0,q4_1] [--tokens 4096] [--threads 2]

For each type, `chatforge export --format gguf` writes OUT/TYPE/ (the GGUF file and its Modelfile,
left there for llama.cpp and Ollama), then llama.cpp (llama-cpp-python, with its defaults: f16 KV
cache) reads the validation split of the demo data (`val.jsonl`: documents the model did not train
on, joined with <|endoftext|> and cut into windows of --window tokens, the first --tokens of them)
and the script compares its next-token logits with chatforge's fp32 model on the same windows:
- top-1 agreement: the share of positions where both pick the same next token (target for q8_0:
  at least 0.97), and the largest absolute logit difference;
- perplexity on those tokens, beside chatforge fp32's and the f16 file's;
- greedy: whether a 64-token greedy reply to a question is the same token for token.
For the quantized types the file's own weights are also read back (`gguf_import.read_gguf`) and run by
chatforge in fp32: that row separates what the stored weights cost from what llama.cpp's
quantized kernels add (they also round the activations to 8 bits for their dot products).
A table is printed and, last, one JSON line: {"bench": "export", ...}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

QUESTION = "How do I find out which package a file belongs to?"


def windows(tokenizer, data: Path, n_tokens: int, width: int) -> list[list[int]]:
    ids: list[int] = []
    with open(data / "val.jsonl", encoding="utf-8") as f:
        for line in f:
            ids += tokenizer.encode(json.loads(line)["text"]) + [tokenizer.eot_id]
            if len(ids) >= n_tokens:
                break
    ids = ids[:n_tokens - n_tokens % width]
    return [ids[i:i + width] for i in range(0, len(ids), width)]


def nll(logits: np.ndarray, ids: list[int]) -> np.ndarray:
    """Negative log-likelihood of each next token (positions 0..T-2 predict 1..T-1)."""
    x = logits[:-1].astype(np.float64)
    top = x.max(-1, keepdims=True)
    logz = top[:, 0] + np.log(np.exp(x - top).sum(-1))
    return logz - x[np.arange(len(ids) - 1), ids[1:]]


def chatforge_logits(model, rows: list[list[int]]) -> Iterator[np.ndarray]:
    with torch.no_grad():
        for r in rows:
            yield model(torch.tensor([r]))[0][0].float().numpy()


def llama_logits(llm, rows: list[list[int]]) -> Iterator[np.ndarray]:
    for r in rows:
        llm.reset()
        llm.eval(r)
        yield np.array(llm.scores[:len(r)], dtype=np.float32)


def compare(theirs: Iterator[np.ndarray], ours: list[np.ndarray], rows: list[list[int]]) -> dict:
    """Top-1 agreement with `ours`, the largest logit difference and the perplexity, one window at a
    time (a window's logits are 512 x 49152 floats: 100 MB)."""
    t0 = time.perf_counter()
    same = n = 0
    diff, nlls = 0.0, []
    for lg, ref, r in zip(theirs, ours, rows):
        same += int((lg[:-1].argmax(-1) == ref[:-1].argmax(-1)).sum())
        n += len(r) - 1
        diff = max(diff, float(np.abs(lg - ref).max()))
        nlls.append(nll(lg, r))
    return {"top1": round(same / n, 4), "max_logit_diff": round(diff, 4),
            "ppl": float(math.exp(np.concatenate(nlls).mean())), "seconds": round(time.perf_counter() - t0, 1)}


def greedy_llama(llm, prompt: list[int], n: int, stop: set[int]) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(t)
        if t in stop:
            break
        llm.eval([t])
    return out


def greedy_chatforge(model, prompt: list[int], n: int, stop: set[int]) -> list[int]:
    seq, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(torch.tensor([seq]), last_only=True)[0][0, -1].argmax())
            out.append(t)
            if t in stop:
                break
            seq.append(t)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="runs/demo/sft", help="chatforge model folder (the demo assistant)")
    ap.add_argument("--data", default="runs/demo/data", help="chatforge data folder holding val.jsonl")
    ap.add_argument("--out", default="runs/demo/export", help="exports go to OUT/QUANT/")
    ap.add_argument("--quants", default="f16,q8_0,q4_0,q4_1", help="comma-separated GGUF types (f16 first: the reference)")
    ap.add_argument("--tokens", type=int, default=4096, help="validation tokens compared")
    ap.add_argument("--window", type=int, default=512, help="tokens per window (each starts a fresh context)")
    ap.add_argument("--threads", type=int, default=2, help="torch and llama.cpp threads")
    args = ap.parse_args()
    try:
        import llama_cpp
    except ImportError:
        sys.exit("llama-cpp-python is not installed: run the set-up (make test) or pip install llama-cpp-python")
    from chatforge.model.export import export_model
    from chatforge.model.folder import load_model
    from chatforge.model.gguf_import import open_gguf, read_gguf
    from chatforge.model.gpt import GPT

    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    rows = windows(tok, Path(args.data), args.tokens, args.window)
    n_pos = sum(len(r) - 1 for r in rows)
    prompt, _ = tok.render_chat([{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    stop = {tok.im_end_id, tok.eot_id}
    t0 = time.perf_counter()
    ours = list(chatforge_logits(model, rows))
    ours_nll = np.concatenate([nll(lg, r) for lg, r in zip(ours, rows)])
    results = {"chatforge fp32": {"ppl": float(math.exp(ours_nll.mean())),
                                  "seconds": round(time.perf_counter() - t0, 1)}}
    ours_greedy = greedy_chatforge(model, prompt, 64, stop)

    for quant in args.quants.split(","):
        t0 = time.perf_counter()
        res = export_model(args.model, "gguf", Path(args.out) / quant, quant)
        export_s = time.perf_counter() - t0
        path = next(p for p in res.files if p.suffix == ".gguf")
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(args.window, 512), n_batch=args.window,
                              n_threads=args.threads, logits_all=True, verbose=False)
        try:
            row = compare(llama_logits(llm, rows), ours, rows)
            greedy = greedy_llama(llm, prompt, 64, stop)
        finally:
            llm.close()
        results[f"llama.cpp {quant}"] = {"file_mb": round(path.stat().st_size / 1e6, 1), "export_s": round(export_s, 1),
                                         **row, "greedy64_same": greedy == ours_greedy}
        if quant not in ("f32", "f16", "bf16"):
            ckpt = read_gguf(open_gguf(path), path)
            back = GPT(ckpt.config)
            back.load_state_dict(ckpt.state)
            results[f"chatforge {quant}"] = compare(chatforge_logits(back.eval(), rows), ours, rows)
            del back, ckpt

    f16 = results.get("llama.cpp f16", results["chatforge fp32"])["ppl"]
    print(f"{n_pos} next-token positions of {args.data}/val.jsonl in {len(rows)} windows of {args.window}; "
          f"{args.threads} threads; load {os.getloadavg()[0]:.1f}")
    # Run times are in the JSON line only: on a shared machine they say little.
    print(f"{'model':<16} {'file MB':>8} {'export s':>9} {'top-1':>7} {'max|dlogit|':>11} "
          f"{'ppl':>8} {'vs f16':>7} {'greedy 64':>9}")
    for name, r in results.items():
        print(f"{name:<16} {r.get('file_mb', ''):>8} {r.get('export_s', ''):>9} "
              f"{r.get('top1', ''):>7} {r.get('max_logit_diff', ''):>11} {r['ppl']:>8.3f} "
              f"{(r['ppl'] / f16 - 1) * 100:>+6.2f}% {str(r.get('greedy64_same', '')):>9}")
    for r in results.values():
        r["ppl"] = round(r["ppl"], 4)
    print(json.dumps({"bench": "export", "model": args.model, "positions": n_pos, "window": args.window,
                      "threads": args.threads, "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
