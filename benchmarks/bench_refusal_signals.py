"""How well can the demo assistant know that nothing answers? The limit of the signals it has.

    python benchmarks/bench_refusal_signals.py --model runs/demo/sft \\
        --answerable runs/demo/eval runs/demo/eval-unseen runs/demo/eval-manual \\
        --unanswerable runs/demo/eval-unanswerable-git runs/demo/eval-unanswerable-company

Reads the `examples.jsonl` that `chatforge eval` wrote (each answer's prompt, the passages it was
given, the model's own reply) and scores every question with three signals a refusal could be
decided on:
- greedy: the model's own reply is the not-found sentence (what chatforge does by default);
- model: the log-probability the model gives the first tokens of NOT_FOUND_REPLY after the prompt
  (one forward pass; a calibrated version of the greedy decision);
- cosine: the embedding model's cosine between the question and the best retrieved passage (the
  score hybrid retrieval ranks by, and `--score-threshold` can fit).
For each signal, and an even mix of the two scores (z-scored), it prints the share of
unanswerable questions refused when the threshold is set so that 3%, 5% and 10% of the answerable
ones are refused. The thresholds are chosen on these very sets, so the figures are an upper bound
of what a threshold fitted on the company's own Q&A would reach on them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from chatforge.infer.answer import is_refusal
from chatforge.model.folder import load_model
from chatforge.retrieval import NOT_FOUND_REPLY
from chatforge.retrieval.embed import Embedder

REFUSAL_TOKENS = 4      # "I could not find": the first tokens carry the decision


def examples(folder: Path) -> list[dict]:
    path = folder / "examples.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path} does not exist: run `chatforge eval --out {folder}` first")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if isinstance(r.get("prompt"), list)]


@torch.no_grad()
def refusal_logprob(model, tokenizer, prompt: list[dict]) -> float:
    """log P(the first REFUSAL_TOKENS tokens of NOT_FOUND_REPLY | prompt) under `model`."""
    head = tokenizer.render_chat(prompt, add_generation_prompt=True)[0]
    full = tokenizer.render_chat([*prompt, {"role": "assistant", "content": NOT_FOUND_REPLY}],
                                 add_generation_prompt=False)[0]
    if full[:len(head)] != head:
        raise SystemExit("the chat template does not render the reply after the generation prompt")
    ids = torch.tensor([full[:len(head) + REFUSAL_TOKENS]])
    logits = model(ids)
    logits = logits[0] if isinstance(logits, tuple) else logits
    logprobs = torch.log_softmax(logits[0, len(head) - 1:-1].float(), dim=-1)
    return logprobs.gather(-1, ids[0, len(head):, None]).sum().item()


def cosines(embedder: Embedder, rows: list[dict]) -> np.ndarray:
    q = embedder.encode([r["question"] for r in rows])
    p = embedder.encode([r.get("extractive") or "" for r in rows])
    return (q * p).sum(1) / (np.linalg.norm(q, axis=1) * np.linalg.norm(p, axis=1) + 1e-9)


def refused_at(answerable: np.ndarray, unanswerable: np.ndarray, rate: float) -> float:
    """Share of `unanswerable` at or above the threshold that refuses `rate` of `answerable`
    (higher score = refuse)."""
    t = np.quantile(answerable, 1 - rate)
    return float(np.mean(unanswerable >= t))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="the model folder the eval outputs came from")
    ap.add_argument("--answerable", nargs="+", required=True, help="eval output folders of answerable questions")
    ap.add_argument("--unanswerable", nargs="+", required=True, help="eval output folders of unanswerable ones")
    ap.add_argument("--embedding-model", default=None, help="default: the fetched all-MiniLM-L6-v2")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    model.eval()
    embedder = Embedder.load(args.embedding_model)

    signals: dict[str, dict[str, np.ndarray]] = {"answerable": {}, "unanswerable": {}}
    for side in signals:
        rows = [r for folder in getattr(args, side) for r in examples(Path(folder))]
        if not rows:
            raise SystemExit(f"no examples with prompts among the {side} folders")
        print(f"{side}: {len(rows)} questions", flush=True)
        signals[side] = {
            "greedy": np.array([float(is_refusal(r.get("model_reply", r.get("answer", "")))) for r in rows]),
            "model": np.array([refusal_logprob(model, tokenizer, r["prompt"]) for r in rows]),
            "cosine": -cosines(embedder, rows),          # low cosine = refuse
        }
    a, u = signals["answerable"], signals["unanswerable"]
    both = np.concatenate
    for name in ("model", "cosine"):
        allv = both([a[name], u[name]])
        a[name + "_z"], u[name + "_z"] = (a[name] - allv.mean()) / allv.std(), (u[name] - allv.mean()) / allv.std()
    a["mix"], u["mix"] = (a["model_z"] + a["cosine_z"]) / 2, (u["model_z"] + u["cosine_z"]) / 2

    print(f"\ngreedy (the model's own reply): answerable refused {a['greedy'].mean():.3f}, "
          f"unanswerable refused {u['greedy'].mean():.3f}")
    print(f"{'signal':<34}{'unanswerable refused when answerable refused =':>48}")
    print(f"{'':<34}{'3%':>16}{'5%':>16}{'10%':>16}")
    for name, label in (("model", "model: log P(not-found reply)"), ("cosine", "cosine(question, best passage)"),
                        ("mix", "mix of the two (z-scored mean)")):
        print(f"{label:<34}" + "".join(f"{refused_at(a[name], u[name], r):>16.3f}" for r in (0.03, 0.05, 0.10)))


if __name__ == "__main__":
    main()
