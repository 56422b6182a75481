"""Unpaired preference rows for KTO: a prompt, one reply, and whether the reply is good.

    rows = read_unpaired("runs/demo/feedback-data/kto.jsonl")
    rows[0].prompt        # [{"role": "system", ...}, {"role": "user", ...}]: what the model saw
    rows[0].completion    # the reply text
    rows[0].label         # True = desirable (a thumbs up, a correction), False = undesirable

Accepted lines are TRL's unpaired preference formats, one JSON object a line:

    conversational (what `chatforge feedback export` writes to kto.jsonl):
      {"prompt": [{"role": "system", ...}, {"role": "user", ...}],
       "completion": [{"role": "assistant", "content": ...}], "label": true}
    standard (strings):
      {"prompt": "question", "completion": "answer", "label": false}

and, as TRL's KTOTrainer does, preference pairs (`chatforge.data.prefs`' formats): each pair
becomes two rows, its chosen reply desirable and its rejected one undesirable. A string prompt is
one user turn (chatforge's models are chat models). Other keys of a line are kept in `meta`. A
bad line is a `ChatforgeError` naming `file:line` and what to fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from chatforge import files
from chatforge.data.prefs import Preference, _messages, _reply, parse_preference, prompt_messages


@dataclass
class Unpaired:
    """One row: `prompt` (messages ending with the user's turn), `completion` (the reply text), `label`."""

    prompt: list[dict]
    completion: str
    label: bool
    meta: dict = field(default_factory=dict)

    def conversation(self) -> list[dict]:
        return [*self.prompt, {"role": "assistant", "content": self.completion}]

    # The question, found as a pair's is (so `split_by_question` groups rows and pairs alike).
    question = Preference.question

    def to_record(self) -> dict:
        """The line in TRL's conversational unpaired format (other keys kept after)."""
        return {"prompt": self.prompt, "completion": [{"role": "assistant", "content": self.completion}],
                "label": self.label, **self.meta}


def parse_unpaired(obj: object) -> list[Unpaired]:
    """One line's object as rows (one, or two for a preference pair); ValueError with a short reason."""
    if isinstance(obj, dict) and "chosen" in obj and "rejected" in obj:
        pair = parse_preference(obj)
        return [Unpaired(pair.prompt, pair.chosen, True, dict(pair.meta)),
                Unpaired(pair.prompt, pair.rejected, False, dict(pair.meta))]
    if not isinstance(obj, dict):
        raise ValueError("expected a JSON object")
    missing = [k for k in ("prompt", "completion", "label") if k not in obj]
    if missing:
        raise ValueError(f'missing {" and ".join(repr(k) for k in missing)}: a row needs "prompt", "completion" '
                         'and "label" (true = a good reply), or a pair\'s "chosen" and "rejected"')
    if not isinstance(obj["label"], bool):
        raise ValueError(f'"label" must be true or false, got {obj["label"]!r}')
    completion = obj["completion"]
    if not isinstance(completion, str):
        completion = _reply(_messages(completion, "completion"), "completion")
    if not completion.strip():
        raise ValueError("the completion is empty")
    meta = {k: v for k, v in obj.items() if k not in ("prompt", "completion", "label")}
    return [Unpaired(prompt_messages(obj["prompt"]), completion, obj["label"], meta)]


def read_unpaired(path: str | Path) -> list[Unpaired]:
    """Every row of a KTO JSONL file (see the module docstring); blank lines are skipped."""
    hint = "export thumbs with `chatforge feedback export` (kto.jsonl), or give preference pairs"
    return [row for rows in files.read_parsed(path, parse_unpaired, "rows", hint) for row in rows]   # a pair gives two


def write_unpaired(path: str | Path, rows: Sequence[Unpaired]) -> None:
    """Write rows in TRL's conversational unpaired format, atomically."""
    with files.atomic_open(path) as f:
        for r in rows:
            f.write(json.dumps(r.to_record(), ensure_ascii=False) + "\n")
