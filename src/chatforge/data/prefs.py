"""Preference pairs: a prompt, a better reply (chosen) and a worse one (rejected).

    prefs = read_preferences("runs/demo/feedback-data/preferences.jsonl")
    prefs[0].prompt            # [{"role": "system", ...}, {"role": "user", ...}]: what the model saw
    prefs[0].chosen            # "the better answer" (the assistant's reply text)
    prefs[0].conversation("rejected")   # prompt + the rejected reply, ready for `render_chat`
    train, held = split_by_question(prefs, 0.2, seed=0)

Every reward-model, DPO and PPO stage reads pairs through `read_preferences`. Accepted lines are
TRL's preference formats, one JSON object a line:

    conversational, explicit prompt (what `chatforge feedback export` and `chatforge prefs make` write):
      {"prompt": [{"role": "system", ...}, {"role": "user", ...}],
       "chosen": [{"role": "assistant", "content": ...}], "rejected": [{"role": "assistant", ...}]}
    conversational, implicit prompt:
      {"chosen": [...the whole conversation...], "rejected": [...the whole conversation...]}
    standard (strings), explicit or implicit prompt:
      {"prompt": "question", "chosen": "answer", "rejected": "answer"}   /   {"chosen": "...", "rejected": "..."}

An implicit prompt is what the two sides share: the longest common run of messages (the
replies are then the one assistant message after it), or for strings the longest common
prefix, moved back to the space before the first differing word (as TRL extracts it).

chatforge's models are chat models, so every pair is rendered with the chat template: a string
prompt is one user turn and string replies are the assistant's reply. (TRL trains the standard
format as raw text; a file meant for that trains here as a chat.) A prompt must end with a user
turn, each side must be one assistant reply, and the two replies must differ. Other keys of a
line (`kind`, `source`, `margin`, ...) are kept in `Preference.meta`. A bad line is a
`ChatforgeError` naming `file:line` and what to fix.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from chatforge import files
from chatforge.data.feedback import normalize_question
from chatforge.errors import ChatforgeError

ROLES = ("system", "user", "assistant")
SIDES = ("chosen", "rejected")


@dataclass
class Preference:
    """One pair: `prompt` (messages ending with the user's turn), `chosen` and `rejected` (reply texts)."""

    prompt: list[dict]
    chosen: str
    rejected: str
    meta: dict = field(default_factory=dict)   # the line's other keys, as read

    def conversation(self, side: str) -> list[dict]:
        """The prompt followed by the `side` ("chosen" or "rejected") reply."""
        if side not in SIDES:
            raise ValueError(f"side must be 'chosen' or 'rejected', got {side!r}")
        return [*self.prompt, {"role": "assistant", "content": getattr(self, side)}]

    @property
    def question(self) -> str:
        """The last user turn; for a grounded prompt (`chatforge.retrieval`) the text after "Question:"."""
        text = self.prompt[-1]["content"]
        head, sep, tail = text.rpartition("\nQuestion: ")
        return tail.strip() if sep and head.startswith("Context:") else text.strip()

    def to_record(self) -> dict:
        """The line in TRL's conversational format with an explicit prompt (other keys kept after)."""
        return {"prompt": self.prompt, "chosen": [{"role": "assistant", "content": self.chosen}],
                "rejected": [{"role": "assistant", "content": self.rejected}], **self.meta}


# ---------------------------------------------------------------------------------------------
# Parsing


def _messages(value, what: str) -> list[dict]:
    if not isinstance(value, list):
        raise ValueError(f'"{what}" must be a string or a list of messages')
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f'{what} message {i} must be {{"role": one of {"/".join(ROLES)}, "content": a string}}')
        out.append({"role": m["role"], "content": m["content"]})
    return out


def prompt_messages(value) -> list[dict]:
    """A prompt as messages: a string is one user turn; a list must be messages ending with a user
    turn. Raises ValueError with a short reason."""
    prompt = [{"role": "user", "content": value}] if isinstance(value, str) else _messages(value, "prompt")
    if not prompt or prompt[-1]["role"] != "user":
        raise ValueError("the prompt must end with a user turn (the question the replies answer)")
    return prompt


def _reply(messages: list[dict], what: str) -> str:
    """The text of a side that must be exactly one assistant message."""
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        roles = ", ".join(m["role"] for m in messages) or "nothing"
        raise ValueError(f'"{what}" must be one assistant reply after the prompt, found {roles}')
    return messages[0]["content"]


def _split_strings(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen reply, rejected reply) of two texts that share their beginning."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n and chosen[n - 1] == " ":   # the replies start with their first word's space
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def parse_preference(obj: object) -> Preference:
    """One line's object as a `Preference`; raises ValueError with a short reason when it is not one."""
    if not isinstance(obj, dict):
        raise ValueError("expected a JSON object")
    missing = [k for k in SIDES if k not in obj]
    if missing:
        raise ValueError(f'missing {" and ".join(repr(k) for k in missing)}: a pair needs "chosen" and "rejected" '
                         '(and "prompt", unless both sides hold the whole conversation)')
    chosen, rejected, prompt = obj["chosen"], obj["rejected"], obj.get("prompt")
    if "prompt" in obj:
        prompt = prompt_messages(prompt)
        sides = []
        for side, value in (("chosen", chosen), ("rejected", rejected)):
            sides.append(value if isinstance(value, str) else _reply(_messages(value, side), side))
        chosen, rejected = sides
    elif isinstance(chosen, str) and isinstance(rejected, str):
        text, chosen, rejected = _split_strings(chosen, rejected)
        if not text.strip():
            raise ValueError('no "prompt" and the two texts share no beginning to take it from')
        prompt = [{"role": "user", "content": text}]
    else:
        c, r = _messages(chosen, "chosen"), _messages(rejected, "rejected")
        n = 0
        while n < min(len(c), len(r)) and c[n] == r[n]:
            n += 1
        prompt, chosen, rejected = c[:n], _reply(c[n:], "chosen"), _reply(r[n:], "rejected")
    if not prompt or prompt[-1]["role"] != "user":
        raise ValueError("the prompt must end with a user turn (the question the replies answer)")
    if not chosen.strip() or not rejected.strip():
        raise ValueError("a reply is empty")
    if chosen.strip() == rejected.strip():
        raise ValueError("chosen and rejected are the same reply: the pair teaches nothing; remove the line")
    meta = {k: v for k, v in obj.items() if k not in ("prompt", "chosen", "rejected")}
    return Preference(prompt, chosen, rejected, meta)


def read_preferences(path: str | Path) -> list[Preference]:
    """Every pair of a preference JSONL file (see the module docstring); blank lines are skipped."""
    hint = "export user feedback with `chatforge feedback export` or generate pairs with `chatforge prefs make`"
    return files.read_parsed(path, parse_preference, "preference pairs", hint)


def write_preferences(path: str | Path, prefs: Sequence[Preference]) -> None:
    """Write pairs in TRL's conversational format (explicit prompt), atomically."""
    with files.atomic_open(path) as f:
        for p in prefs:
            f.write(json.dumps(p.to_record(), ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------
# Splitting


def split_by_question(prefs: Sequence[Preference], fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """(kept, held-out) indices: a seeded `fraction` of the questions, with all their pairs, is held out.

    Pairs of one question (generated pairs give several) stay on one side, so a held-out score
    is never measured on a question seen in training. At least one question goes to each side
    when there are two or more.
    """
    if not 0 <= fraction < 1:
        raise ChatforgeError(f"the held-out fraction must be in [0, 1), got {fraction}")
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prefs):
        groups.setdefault(normalize_question(p.question), []).append(i)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    n_held = round(fraction * len(keys))
    if fraction > 0 and len(keys) >= 2:
        n_held = min(max(1, n_held), len(keys) - 1)
    held = sorted(i for k in keys[:n_held] for i in groups[k])
    kept = sorted(i for k in keys[n_held:] for i in groups[k])
    return kept, held
