"""Two evaluations of the same questions side by side: the metrics of each, and a reward model's
win-rate of one model's answers over the other's.

Used by the continual-learning round (`chatforge/continual.py`) to decide whether the new model
replaces the previous one. Both evaluation folders are `chatforge eval` outputs (`eval.json`,
`examples.jsonl`) made with the same questions and settings.

The win-rate: for every question both models answered, the reward model scores the previous
answer and the new one after the same prompt (the grounded prompt the new evaluation recorded
in `examples.jsonl`, which is the one the previous model saw too: same question, same index, same
tokenizer); the new answer wins when it scores higher, a tie counts half. It is only as good as the
reward model: its held-out pair accuracy belongs beside it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from chatforge import files
from chatforge.errors import ChatforgeError

# The metrics shown side by side (higher is better for all but perplexity).
METRICS = ("perplexity", "rougeL", "bleu", "grounded", "hit@1")


def read_eval(folder: str | Path) -> tuple[dict, list[dict]]:
    """(eval.json, examples.jsonl lines) of a `chatforge eval` output folder."""
    folder = Path(folder)
    path = folder / "eval.json"
    if not path.is_file():
        raise ChatforgeError(f"{folder} holds no eval.json; run `chatforge eval --out {folder}` first")
    examples = [obj for _, obj in files.iter_jsonl(folder / "examples.jsonl")] \
        if (folder / "examples.jsonl").is_file() else []
    return json.loads(path.read_text(encoding="utf-8")), examples


def metric_rows(before: dict, after: dict) -> dict[str, dict[str, Any]]:
    """{metric: {"before", "after", "change"}} for the metrics both evaluations hold."""
    rows = {}
    for key in METRICS:
        b, a = before.get(key), after.get(key)
        if isinstance(b, (int, float)) and isinstance(a, (int, float)):
            rows[key] = {"before": round(b, 4), "after": round(a, 4), "change": round(a - b, 4)}
    return rows


def answer_pairs(before: list[dict], after: list[dict]) -> list[tuple[list[dict], str, str]]:
    """(prompt messages, previous answer, new answer) for each question both evaluations answered."""
    previous = {e["question"]: e.get("answer") for e in before}
    out = []
    for e in after:
        old, new = previous.get(e["question"]), e.get("answer")
        if isinstance(old, str) and isinstance(new, str):
            prompt = e.get("prompt") or [{"role": "user", "content": e["question"]}]
            out.append((prompt, old, new))
    return out


def win_rate(reward_model, pairs: list[tuple[list[dict], str, str]], batch_size: int = 8) -> dict:
    """The share of `pairs` whose new answer the reward model scores above the previous one
    (ties count half), with the mean scores. `reward_model` is a loaded `RewardModel`."""
    if not pairs:
        return {"questions": 0, "win_rate": None}
    items = [(prompt, answer) for prompt, old, new in pairs for answer in (old, new)]
    scores = reward_model.score(items, batch_size).tolist()
    old, new = scores[0::2], scores[1::2]
    wins = sum(1.0 if n > o else 0.5 if n == o else 0.0 for o, n in zip(old, new))
    return {"questions": len(pairs), "win_rate": round(wins / len(pairs), 4),
            "same_answer": sum(p[1].strip() == p[2].strip() for p in pairs),
            "reward_before": round(sum(old) / len(old), 4), "reward_after": round(sum(new) / len(new), 4)}


def compare(before_dir: str | Path, after_dir: str | Path, reward_model=None) -> dict:
    """{"metrics": metric_rows, "win": win_rate or None, "questions": n} of two eval folders."""
    before, before_ex = read_eval(before_dir)
    after, after_ex = read_eval(after_dir)
    pairs = answer_pairs(before_ex, after_ex)
    return {"before": str(before_dir), "after": str(after_dir), "questions": len(pairs),
            "metrics": metric_rows(before, after),
            "win": win_rate(reward_model, pairs) if reward_model is not None else None}


def format_comparison(name: str, result: dict) -> str:
    lines = [f"{name} ({result['questions']} questions answered by both)",
             f"  {'metric':<12}{'before':>10}{'after':>10}{'change':>10}"]
    for key, row in result["metrics"].items():
        lines.append(f"  {key:<12}{row['before']:>10.3f}{row['after']:>10.3f}{row['change']:>+10.3f}")
    win = result.get("win")
    if win and win.get("win_rate") is not None:
        lines.append(f"  reward win-rate of the new answers: {win['win_rate']:.3f} over {win['questions']} "
                     f"questions ({win['same_answer']} answered identically; mean reward "
                     f"{win['reward_before']:.3f} -> {win['reward_after']:.3f})")
    return "\n".join(lines)
