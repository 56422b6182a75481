"""`chatforge feedback stats` and `chatforge feedback export`: read the server's feedback database.

    chatforge feedback stats --db runs/demo/feedback.db            # tables of user satisfaction
    chatforge feedback stats --db runs/demo/feedback.db --json     # the same as one JSON object
    chatforge feedback export --db runs/demo/feedback.db --out runs/demo/feedback-data
    chatforge feedback stats --db postgresql://chatforge@db.internal/support   # a shared PostgreSQL database

`stats` prints the share of thumbs up among rated replies: overall, among the replies the user
stopped, per day, per source document, and the questions with the most down-voted replies.
`export` writes `preferences.jsonl` (TRL's conversational preference pairs), `sft.jsonl` (chat examples in
the `qa_train.jsonl` format) and `kto.jsonl` (TRL's unpaired rows: each rated reply with its label,
for `chatforge kto`). What counts and what becomes a pair: `chatforge.data.feedback`.
"""

from __future__ import annotations

import argparse
import json

from chatforge.commands import add_parser, leaf, subcommands
from chatforge.data.feedback import FeedbackStore, export_training_data, user_satisfaction
from chatforge.data.feedback_db import redact
from chatforge.errors import ChatforgeError

QUESTION_WIDTH = 80   # characters of a question shown in the table
DB_HELP = "the feedback database `chatforge serve --db` writes: a SQLite file or a postgresql:// URL (needed)"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("example:\n  chatforge feedback stats --db runs/demo/feedback.db\n"
                     "  chatforge feedback export --db runs/demo/feedback.db --out runs/demo/feedback-data")
    sub = subcommands(parser)
    p = add_parser(sub, "stats", "user satisfaction: share of thumbs up overall, per day, per document; "
                                 "the most down-voted questions",
                   "chatforge feedback stats --db runs/demo/feedback.db --top 5")
    p.add_argument("--db", metavar="FILE|URL", default=None, help=DB_HELP)
    p.add_argument("--top", type=int, default=10, help="how many of the most down-voted questions to list")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    leaf(p, run_stats)

    p = add_parser(sub, "export", "write preference pairs, SFT examples and KTO rows from corrections and votes",
                   "chatforge feedback export --db runs/demo/feedback.db --out runs/demo/feedback-data")
    p.add_argument("--db", metavar="FILE|URL", default=None, help=DB_HELP)
    p.add_argument("--out", metavar="DIR", default=None,
                   help="folder for preferences.jsonl, sft.jsonl and kto.jsonl (needed; the files are replaced)")
    leaf(p, run_export)


def _need_db(args: argparse.Namespace) -> None:
    if not args.db:
        raise ChatforgeError("--db is required: the feedback database `chatforge serve --db FILE|URL` writes")


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _table(title: str, label: str, rows: list[tuple[str, dict]]) -> list[str]:
    width = max([len(label), *(len(name) for name, _ in rows)])
    lines = ["", title, f"{label:<{width}}  {'rated':>6} {'up':>6} {'down':>6} {'satisfaction':>12}"]
    for name, r in rows:
        lines.append(f"{name:<{width}}  {r['rated']:>6} {r['up']:>6} {r['down']:>6} {_pct(r['satisfaction']):>12}")
    return lines


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= QUESTION_WIDTH else text[:QUESTION_WIDTH - 3] + "..."


def format_stats(stats: dict, db: str) -> str:
    """The stats as plain-text tables."""
    if not stats["rated"]:
        return f"no rated replies yet in {db} ({stats['replies']} replies recorded)"
    lines = [f"user satisfaction: {_pct(stats['satisfaction'])} thumbs up of {stats['rated']} rated replies "
             f"({stats['up']} up, {stats['down']} down; {stats['replies']} replies recorded)"]
    if stats["reasons"]:
        lines.append("down-vote reasons: " + ", ".join(f"{k} {v}" for k, v in stats["reasons"].items()))
    stopped = stats.get("stopped") or {}
    if stopped.get("rated"):
        lines.append(f"stopped by the user while streaming: {stopped['rated']} of the rated replies "
                     f"({stopped['up']} up, {stopped['down']} down)")
    lines += _table("per day (UTC)", "day", [(r["day"], r) for r in stats["per_day"]])
    lines += _table("per document", "document",
                    [(r["document"] or "(no sources)", r) for r in stats["per_document"]])
    if stats["most_down_voted"]:
        lines += ["", "most down-voted questions", f"{'down':>4} {'up':>4}  question"]
        lines += [f"{q['down']:>4} {q['up']:>4}  {_short(q['question'])}" for q in stats["most_down_voted"]]
    return "\n".join(lines)


def run_stats(args: argparse.Namespace) -> int:
    _need_db(args)
    if args.top < 0:
        raise ChatforgeError("--top must be 0 or more")
    stats = user_satisfaction(args.db, args.top)
    print(json.dumps(stats, indent=2, ensure_ascii=False) if args.json else format_stats(stats, redact(str(args.db))))
    return 0


def run_export(args: argparse.Namespace) -> int:
    _need_db(args)
    if not args.out:
        raise ChatforgeError("--out is required: the folder for preferences.jsonl, sft.jsonl and kto.jsonl")
    with FeedbackStore(args.db, create=False) as store:
        counts = export_training_data(store, args.out)
    print(f"wrote {counts['preferences']} preference pairs ({counts['corrections']} from corrections, "
          f"{counts['vote_pairs']} from up- against down-voted replies, before removing duplicates) to "
          f"{args.out}/preferences.jsonl, {counts['sft']} SFT examples to {args.out}/sft.jsonl and {counts['kto']} "
          f"KTO rows ({counts['kto_desirable']} desirable, {counts['kto_undesirable']} undesirable) to "
          f"{args.out}/kto.jsonl")
    return 0
