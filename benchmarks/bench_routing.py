"""Plugin routing on held-out messages: the intent classifier against the plugins' keyword rules.

    chatforge classify train --base runs/demo/base --data examples/intents.jsonl --out runs/demo/intents --layer 18
    .venv/bin/python benchmarks/bench_routing.py --router runs/demo/intents

Reads `examples/intents_heldout.jsonl` (48 messages, 12 per intent, written apart from the
training lines) and prints one JSON line: accuracy and macro-F1 of the keyword baseline
(`plugins.keyword_intent`: the first built-in whose rule matches, else docs), of the classifier
alone, and of the two combined as `PluginRunner.route` combines them (a rule that matches wins;
otherwise the classifier's intent), plus the messages each gets wrong.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from chatforge.infer.plugin_builtins import CalculatorPlugin, HandoffPlugin, OrdersPlugin
from chatforge.infer.plugins import IntentRouter, keyword_intent
from chatforge.train.baselines import accuracy, macro_f1

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--router", required=True, help="classifier folder from `chatforge classify train`")
    ap.add_argument("--data", default=str(ROOT / "examples" / "intents_heldout.jsonl"))
    args = ap.parse_args()
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()]
    texts, gold = [r["text"] for r in rows], [r["label"] for r in rows]
    plugins = [OrdersPlugin(ROOT / "examples" / "orders.csv"), CalculatorPlugin(), HandoffPlugin()]
    router = IntentRouter(args.router)
    labels = sorted(set(gold) | set(router.labels))
    keyword = [keyword_intent(plugins, t) for t in texts]
    classifier = [label for label, _ in router.predict(texts)]
    combined = [k if k != "docs" else c for k, c in zip(keyword, classifier)]

    def scores(pred):
        p, g = [labels.index(x) for x in pred], [labels.index(x) for x in gold]
        return {"accuracy": round(accuracy(p, g), 4), "macro_f1": round(macro_f1(p, g, len(labels)), 4),
                "wrong": [[t, y, x] for t, y, x in zip(texts, gold, pred) if x != y]}

    print(json.dumps({"held_out": len(rows), "keyword": scores(keyword), "classifier": scores(classifier),
                      "classifier_plus_rules": scores(combined)}, ensure_ascii=False))


if __name__ == "__main__":
    main()
