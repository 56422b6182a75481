"""The evaluation report: one self-contained `report.html` (inline SVG and CSS, no scripts, no
external assets), readable offline and safe to open: every piece of text is HTML-escaped.

    html = render_report(results, examples, curves=load_curves([Path("runs/demo/sft/metrics.jsonl")]))
    write_report("runs/demo/eval/report.html", results, examples, curves)

Sections: training curves (loss and val_loss against step for each metrics.jsonl, and for
alignment stages the reward, reward accuracy and margin, and KL to the reference), the
metric table (the model's row, then one row per baseline), a bar chart of the metrics on a
common 0-1 scale (BLEU divided by 100), the examples side by side, and, when `results` has
"user_satisfaction" (`chatforge eval --feedback-db`, computed by `chatforge.data.feedback`),
the users' verdict: the share of thumbs up, a per-day chart, the per-document table and the
most down-voted questions.
`results` is the dict `chatforge eval` writes to eval.json.
"""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from chatforge import files

METRICS = ("perplexity", "bleu", "rouge1", "rouge2", "rougeL", "grounded", "hit@1", "hit@3")
BAR_METRICS = ("bleu", "rouge1", "rouge2", "rougeL", "grounded", "hit@1", "hit@3")
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")
EXAMPLE_COLUMNS = (("question", "question"), ("reference", "reference"), ("answer", "answer"),
                   ("extractive", "extractive baseline"), ("no_retrieval", "without retrieval"),
                   ("source", "source"))
_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
table.examples td{white-space:pre-wrap;max-width:22em}svg{margin:.5em 1em .5em 0}
.charts{display:flex;flex-wrap:wrap}.note{color:#666;font-size:.85em}
"""


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def fmt(metric: str, value: Any) -> str:
    """A metric value for the table: n/a when missing; perplexity and BLEU with 2 decimals."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if metric in ("perplexity", "bleu"):
        return f"{value:.2f}"
    return f"{value:.3f}"


def load_curves(paths: Iterable[str | os.PathLike]) -> dict[str, list[dict]]:
    """{label: records} from metrics.jsonl files; the label is the file's folder name.

    Missing files are skipped and so are lines that are not JSON objects (a run interrupted
    mid-write leaves at most one such line).
    """
    curves: dict[str, list[dict]] = {}
    for p in paths:
        p = Path(p)
        if not p.is_file():
            continue
        records = []
        for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if isinstance(r, dict) and isinstance(r.get("step"), (int, float)):
                records.append(r)
        if records:
            label = p.parent.name or str(p)
            while label in curves:
                label += "'"
            curves[label] = records
    return curves


# --------------------------------------------------------------------------- SVG

def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def _num(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.2e}"


def line_chart(series: dict[str, Sequence[tuple[float, float]]], title: str,
               xlabel: str = "step", ylabel: str = "loss", width: int = 520, height: int = 300) -> str:
    """An SVG line chart of named (x, y) series."""
    pts = [(x, y) for s in series.values() for x, y in s if math.isfinite(y)]
    left, right, top, bottom = 56, 110, 28, 40
    w, h = width - left - right, height - top - bottom
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
           f'aria-label="{esc(title)}"><title>{esc(title)}</title>',
           f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13">{esc(title)}</text>',
           f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#999"/>']
    if pts:
        x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
        y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
        x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

        def sx(x: float) -> float:
            return left + (x - x0) / (x1 - x0) * w

        def sy(y: float) -> float:
            return top + h - (y - y0) / (y1 - y0) * h

        for t in _ticks(y0, y1):
            out.append(f'<line x1="{left}" x2="{left + w}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#eee"/>'
                       f'<text x="{left - 4}" y="{sy(t) + 4:.1f}" text-anchor="end" font-size="10">{_num(t)}</text>')
        for t in _ticks(x0, x1):
            out.append(f'<text x="{sx(t):.1f}" y="{top + h + 14}" text-anchor="middle" font-size="10">{_num(t)}</text>')
        for i, (name, s) in enumerate(series.items()):
            color = COLORS[i % len(COLORS)]
            coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s if math.isfinite(y))
            if len(s) == 1:
                out.append(f'<circle cx="{sx(s[0][0]):.1f}" cy="{sy(s[0][1]):.1f}" r="3" fill="{color}"/>')
            elif coords:
                out.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="1.5"/>')
            ly = top + 12 + 16 * i
            out.append(f'<line x1="{left + w + 8}" x2="{left + w + 24}" y1="{ly}" y2="{ly}" stroke="{color}" '
                       f'stroke-width="2"/><text x="{left + w + 28}" y="{ly + 4}" font-size="11">{esc(name)}</text>')
    else:
        out.append(f'<text x="{left + w / 2}" y="{top + h / 2}" text-anchor="middle" font-size="12">no data</text>')
    out.append(f'<text x="{left + w / 2}" y="{height - 6}" text-anchor="middle" font-size="11">{esc(xlabel)}</text>'
               f'<text x="12" y="{top + h / 2}" font-size="11" transform="rotate(-90 12 {top + h / 2})" '
               f'text-anchor="middle">{esc(ylabel)}</text></svg>')
    return "".join(out)


def bar_chart(groups: Sequence[str], series: dict[str, Sequence[float | None]], title: str,
              width: int = 640, height: int = 300, label_every: int = 1) -> str:
    """An SVG grouped bar chart on a 0-1 scale: one group per metric, one bar per series.

    `label_every` > 1 writes only every n-th group name under the axis (many groups); every
    bar's tooltip still names its group."""
    left, right, top, bottom = 40, 130, 28, 40
    w, h = width - left - right, height - top - bottom
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
           f'aria-label="{esc(title)}"><title>{esc(title)}</title>',
           f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13">{esc(title)}</text>']
    for t in _ticks(0.0, 1.0):
        y = top + h - t * h
        out.append(f'<line x1="{left}" x2="{left + w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>'
                   f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end" font-size="10">{t:.2g}</text>')
    n = max(len(series), 1)
    gw = w / max(len(groups), 1)
    bw = gw * 0.8 / n
    for g, group in enumerate(groups):
        gx = left + g * gw
        if g % label_every == 0:
            out.append(f'<text x="{gx + gw / 2:.1f}" y="{top + h + 14}" text-anchor="middle" '
                       f'font-size="11">{esc(group)}</text>')
        for i, values in enumerate(series.values()):
            v = values[g]
            if v is None or not math.isfinite(v):
                continue
            v = min(max(v, 0.0), 1.0)
            x = gx + gw * 0.1 + i * bw
            out.append(f'<rect x="{x:.1f}" y="{top + h - v * h:.1f}" width="{bw:.1f}" height="{v * h:.1f}" '
                       f'fill="{COLORS[i % len(COLORS)]}"><title>{esc(group)}: {v:.3f}</title></rect>')
    for i, name in enumerate(series):
        ly = top + 12 + 16 * i
        out.append(f'<rect x="{left + w + 8}" y="{ly - 8}" width="12" height="10" fill="{COLORS[i % len(COLORS)]}"/>'
                   f'<text x="{left + w + 24}" y="{ly + 1}" font-size="11">{esc(name)}</text>')
    out.append(f'<line x1="{left}" x2="{left + w}" y1="{top + h}" y2="{top + h}" stroke="#999"/></svg>')
    return "".join(out)


# --------------------------------------------------------------------------- HTML

def metric_rows(results: dict) -> list[tuple[str, dict]]:
    """(name, metrics) for the model and each baseline, in table order."""
    return [("model", results), *((name, b) for name, b in (results.get("baselines") or {}).items())]


# The charts of a metrics.jsonl: loss always; what alignment stages log besides, where present
# (DPO: reward accuracy and margin; PPO: the reward model's score and the KL to the reference).
CURVES = (("loss", ("loss", "val_loss")),
          ("reward accuracy", ("reward_accuracy", "val_reward_accuracy")),
          ("reward margin", ("reward_margin", "val_reward_margin")),
          ("reward", ("reward",)),
          ("KL to the reference", ("kl", "val_kl")))


def _curve_charts(curves: dict[str, list[dict]]) -> str:
    charts = []
    for label, records in curves.items():
        for title, keys in CURVES:
            series = {}
            for key in keys:
                pts = [(float(r["step"]), float(r[key])) for r in records if isinstance(r.get(key), (int, float))]
                if pts:
                    series[key] = pts
            if series:
                charts.append(line_chart(series, f"{label}: {title}", ylabel=title))
    return "".join(charts) or '<p class="note">No metrics.jsonl found next to the model.</p>'


def _table(results: dict) -> str:
    head = "".join(f"<th>{esc(m)}</th>" for m in METRICS)
    rows = []
    for name, r in metric_rows(results):
        cells = "".join(f'<td class="num" data-metric="{esc(m)}">{esc(fmt(m, r.get(m)))}</td>' for m in METRICS)
        rows.append(f'<tr><th scope="row">{esc(name)}</th>{cells}</tr>')
    return f'<table id="metrics"><thead><tr><th>system</th>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _examples(examples: Sequence[dict]) -> str:
    cols = [(k, label) for k, label in EXAMPLE_COLUMNS if any(k in e for e in examples)]
    if not examples:
        return '<p class="note">No questions were evaluated.</p>'
    head = "".join(f"<th>{esc(label)}</th>" for _, label in cols)
    rows = ["<tr>" + "".join(f"<td>{esc(e.get(k))}</td>" for k, _ in cols) + "</tr>" for e in examples]
    return f'<table class="examples"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


SATISFACTION_DAYS = 30   # days shown in the per-day chart (the most recent; eval.json has them all)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _satisfaction(stats: dict) -> str:
    """The "User satisfaction" section from `chatforge.data.feedback.satisfaction_stats`."""
    if not stats.get("rated"):
        return (f'<p class="note">No rated replies in the feedback database yet '
                f'({esc(stats.get("replies", 0))} replies recorded).</p>')
    reasons = ", ".join(f"{k}: {v}" for k, v in (stats.get("reasons") or {}).items())
    out = [f'<p id="satisfaction"><b>{esc(_pct(stats["satisfaction"]))}</b> of {esc(stats["rated"])} rated replies '
           f'were thumbs up ({esc(stats["up"])} up, {esc(stats["down"])} down; {esc(stats["replies"])} replies '
           f'recorded).{esc(" Down-vote reasons: " + reasons + ".") if reasons else ""}</p>']
    days = stats.get("per_day") or []
    shown = days[-SATISFACTION_DAYS:]
    # Days as MM-DD under the axis: all of them when they fit, else every few (the bars' tooltips
    # name their day).
    chart = bar_chart([d["day"][5:] for d in shown], {"thumbs up": [d["satisfaction"] for d in shown]},
                      "share of thumbs up per day (UTC)", label_every=max(1, -(-len(shown) // 12)))
    out.append(f'<div class="charts">{chart}</div>')
    if len(days) > len(shown):
        out.append(f'<p class="note">The last {len(shown)} of {len(days)} days with ratings.</p>')
    rows = "".join(f'<tr><td>{esc(d["document"] or "(no sources)")}</td><td class="num">{esc(d["rated"])}</td>'
                   f'<td class="num">{esc(d["up"])}</td><td class="num">{esc(d["down"])}</td>'
                   f'<td class="num">{esc(_pct(d["satisfaction"]))}</td></tr>' for d in stats.get("per_document") or [])
    out.append('<h3>Per source document</h3><table id="satisfaction-documents"><thead><tr><th>document</th>'
               '<th>rated</th><th>up</th><th>down</th><th>thumbs up</th></tr></thead>'
               f'<tbody>{rows}</tbody></table>')
    worst = stats.get("most_down_voted") or []
    if worst:
        rows = "".join(f'<tr><td>{esc(q["question"])}</td><td class="num">{esc(q["down"])}</td>'
                       f'<td class="num">{esc(q["up"])}</td></tr>' for q in worst)
        out.append('<h3>Most down-voted questions</h3><table id="down-voted"><thead><tr><th>question</th>'
                   f'<th>down</th><th>up</th></tr></thead><tbody>{rows}</tbody></table>')
    out.append('<p class="note">Each rated reply counts once, with its latest rating; a reply counts for every '
               "document it cited.</p>")
    return "".join(out)


def render_report(results: dict, examples: Sequence[dict] = (), curves: dict[str, list[dict]] | None = None,
                  title: str = "chatforge evaluation") -> str:
    """The whole report as one HTML string."""
    rows = metric_rows(results)
    bars = {name: [(r.get(m) / 100 if m == "bleu" and r.get(m) is not None else r.get(m)) for m in BAR_METRICS]
            for name, r in rows}
    labels = [("BLEU/100" if m == "bleu" else m) for m in BAR_METRICS]
    info = ", ".join(f"{k}: {results[k]}" for k in ("model", "questions", "retrieval") if k in results)
    return "".join([
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1><p class=\"note\">{esc(info)}</p>",
        "<h2>Training curves</h2><div class=\"charts\">", _curve_charts(curves or {}), "</div>",
        "<h2>Metrics</h2>", _table(results),
        '<p class="note">BLEU: sacrebleu corpus BLEU (0-100). ROUGE: F1 with stemming (0-1). hit@k: share of '
        "questions whose answer's document is among the top k passages. Perplexity on the validation split.</p>",
        '<div class="charts">', bar_chart(labels, bars, "metrics (higher is better)"), "</div>",
        f"<h2>Examples ({len(examples)})</h2>", _examples(examples),
        *(["<h2>User satisfaction</h2>", _satisfaction(results["user_satisfaction"])]
          if results.get("user_satisfaction") is not None else []),
        "</body></html>\n",
    ])


def write_report(path: str | os.PathLike, results: dict, examples: Sequence[dict] = (),
                 curves: dict[str, list[dict]] | None = None, title: str = "chatforge evaluation") -> Path:
    path = Path(path)
    files.write_text(path, render_report(results, examples, curves, title))
    return path
