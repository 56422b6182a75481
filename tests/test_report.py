"""The HTML report: parsed with html.parser; table values, escaping, inline SVG, no external assets."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

from chatforge.eval.report import load_curves, render_report, write_report

RESULTS = {
    "model": "runs/demo/sft", "questions": 2, "retrieval": True,
    "perplexity": 12.3456, "bleu": 21.5, "rouge1": 0.4567, "rouge2": 0.2, "rougeL": 0.41, "hit@1": 0.5, "hit@3": 1.0,
    "baselines": {
        "extractive": {"perplexity": None, "bleu": 9.87, "rouge1": 0.3, "rouge2": 0.1, "rougeL": 0.25,
                       "hit@1": 0.5, "hit@3": 1.0},
        "no_retrieval": {"perplexity": None, "bleu": 1.0, "rouge1": 0.1, "rouge2": 0.0, "rougeL": 0.09,
                         "hit@1": None, "hit@3": None},
    },
}
EXAMPLES = [
    {"question": "How do I get a refund?", "reference": "Press Request refund.",
     "answer": "<script>alert('x')</script> & more", "extractive": "Refunds are possible...",
     "no_retrieval": "I don't know.", "source": "docs/billing.md"},
    {"question": "Which port?", "reference": "8443", "answer": "Port 8443.", "source": "docs/network.md"},
]


class Collector(HTMLParser):
    """Tags, table cells (per table id) and text, as the browser would see them."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.tables: dict[str, list[list[str]]] = {}
        self.table = None
        self.cell: list[str] | None = None
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "table":
            self.table = attrs.get("id") or attrs.get("class")
            self.tables[self.table] = []
        elif tag == "tr" and self.table:
            self.tables[self.table].append([])
        elif tag in ("td", "th") and self.table:
            self.cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.cell is not None:
            self.tables[self.table][-1].append("".join(self.cell))
            self.cell = None
        elif tag == "table":
            self.table = None

    def handle_data(self, data):
        self.text.append(data)
        if self.cell is not None:
            self.cell.append(data)


def parse(html: str) -> Collector:
    c = Collector()
    c.feed(html)
    c.close()
    return c


def write_metrics(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 7, "lo')   # a torn last line
    return path


def test_report_tables_svg_and_escaping(tmp_path):
    pre = write_metrics(tmp_path / "run" / "pretrain" / "metrics.jsonl",
                        [{"step": s, "loss": 5.0 - s / 10, **({"val_loss": 5.1 - s / 10} if s % 2 else {})}
                         for s in range(1, 7)])
    sft = write_metrics(tmp_path / "run" / "sft" / "metrics.jsonl", [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}])
    curves = load_curves([sft, pre, tmp_path / "missing.jsonl"])
    assert list(curves) == ["sft", "pretrain"] and len(curves["pretrain"]) == 6

    out = write_report(tmp_path / "eval" / "report.html", RESULTS, EXAMPLES, curves)
    html = out.read_text(encoding="utf-8")
    doc = parse(html)

    metrics = doc.tables["metrics"]
    header, rows = metrics[0], {r[0]: dict(zip(metrics[0], r)) for r in metrics[1:]}
    assert header == ["system", "perplexity", "bleu", "rouge1", "rouge2", "rougeL", "grounded", "hit@1", "hit@3"]
    assert list(rows) == ["model", "extractive", "no_retrieval"]
    assert rows["model"]["perplexity"] == "12.35" and rows["model"]["bleu"] == "21.50"
    assert rows["model"]["rouge1"] == "0.457" and rows["model"]["hit@3"] == "1.000"
    assert rows["extractive"]["bleu"] == "9.87" and rows["extractive"]["perplexity"] == "n/a"
    assert rows["no_retrieval"]["hit@1"] == "n/a"

    examples = doc.tables["examples"]
    assert examples[0] == ["question", "reference", "answer", "extractive baseline", "without retrieval", "source"]
    assert examples[1][2] == "<script>alert('x')</script> & more"      # shown as text...
    assert "<script>" not in html and "&lt;script&gt;" in html         # ...never as markup
    assert not any(tag == "script" for tag, _ in doc.tags)
    assert examples[2][4] == ""                                         # missing field: empty cell

    svgs = [a for tag, a in doc.tags if tag == "svg"]
    assert len(svgs) == 3                                               # 2 curve charts + the bar chart
    assert sum(1 for tag, _ in doc.tags if tag == "polyline") == 3      # pretrain loss, val_loss; sft loss
    assert sum(1 for tag, _ in doc.tags if tag == "rect") > 10          # bars
    # Self-contained: nothing loaded from elsewhere.
    assert not any(k in ("src", "href") for _, a in doc.tags for k in a)
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_report_without_curves_or_examples():
    results = {"perplexity": None, "bleu": None, "baselines": {}}
    doc = parse(render_report(results))
    assert doc.tables["metrics"][1][1:3] == ["n/a", "n/a"]
    assert "No metrics.jsonl" in "".join(doc.text)
    assert "No questions were evaluated" in "".join(doc.text)


def test_alignment_curves_get_their_own_charts(tmp_path):
    """DPO and PPO metrics.jsonl: the reward, reward accuracy / margin and KL charted beside the loss."""
    dpo = write_metrics(tmp_path / "round" / "dpo" / "metrics.jsonl",
                        [{"step": s, "loss": 0.69 - s / 100, "reward_accuracy": 0.5 + s / 10, "reward_margin": s / 50,
                          "kl": s / 1000, **({"val_loss": 0.68, "val_kl": 0.002} if s == 3 else {})} for s in range(1, 4)])
    ppo = write_metrics(tmp_path / "round" / "ppo" / "metrics.jsonl",
                        [{"step": s, "loss": 0.1, "reward": -4.0 + s / 4, "kl": s / 10} for s in range(1, 5)])
    html = write_report(tmp_path / "r.html", RESULTS, EXAMPLES, load_curves([dpo, ppo])).read_text(encoding="utf-8")
    for title in ("dpo: loss", "dpo: reward accuracy", "dpo: reward margin", "dpo: KL to the reference",
                  "ppo: loss", "ppo: reward", "ppo: KL to the reference"):
        assert title in html
    assert "ppo: reward accuracy" not in html and "dpo: reward<" not in html
    doc = parse(html)
    assert sum(1 for tag, _ in doc.tags if tag == "svg") == 8                 # 7 curve charts + the bar chart
    # A line per series of 2+ points: dpo loss, accuracy, margin, kl; ppo loss, reward, kl (the
    # one-point val_loss and val_kl are drawn as points).
    assert sum(1 for tag, _ in doc.tags if tag == "polyline") == 7
