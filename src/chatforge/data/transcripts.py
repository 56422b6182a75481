"""Transcript cleaning for `chatforge data build`: what a help-desk export holds besides the
conversation itself goes before training.

    rules = load_rules(Path("my_rules.txt"))        # the built-in rules, then yours (optional)
    result = clean_conversation(messages, rules)     # messages: [{"role", "content"[, "speaker"]}]
    result.messages, result.removed, result.reason, result.ends_mid_sentence

The rules are data, not code: `chatforge/resources/transcript_rules.txt` documents the format
and holds the built-in rules (platform speakers, join/leave/transfer notices, recording notices,
survey prompts, ticket auto-replies, signatures, quoted earlier messages, test and spam
conversations, small talk); `--transcript-rules FILE` adds the user's own. A bad rule is a
`ChatforgeError` naming the file and line.

What happens to one conversation, in order:
1. rows from a platform speaker (speaker rules) are dropped;
2. in every agent and customer turn, a quoted earlier message (quote rules) and then a closing
   signature (signature rules) are cut off, and platform lines (line rules) removed;
3. turns left empty are dropped and consecutive turns of one role merged (one person typing
   several messages, or an agent's two messages around a removed platform line);
4. the conversation gets a drop reason, the first that applies of `REASONS`:
     empty_side   nothing is left of the customer or of the agent
     spam         a customer turn matches a spam rule
     test         the customer only says test messages and small talk
     no_question  the customer only says small talk: a greeting and a goodbye, nothing asked
5. `ends_mid_sentence`: the last turn is the agent's and stops in the middle of a sentence
   (see `ends_mid_sentence`: an export cut off, a chat closed while the agent typed). It is
   kept: the report counts and lists such conversations for a look.

System messages (the "system" role of JSONL conversations: a system prompt) are left as they
are. Everything here is a pure function of its input, so the build streams conversations
through it one at a time.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from chatforge.errors import ChatforgeError

KINDS = ("speaker", "quote", "signature", "line", "spam", "test", "smalltalk")
REASONS = ("empty_side", "spam", "test", "no_question")
BUILTIN = "chatforge/resources/transcript_rules.txt"   # how messages and the report name it

# A signature is short: a name, a title, a company, a phone number or two.
SIGNATURE_MAX_LINES = 6
SIGNATURE_MAX_CHARS = 80

# Longer pieces of a customer turn are never small talk (keeps the phrase search cheap).
MAX_SMALLTALK_WORDS = 12

_NAME = re.compile(r"[a-z][a-z0-9_]*")
_PIECES = re.compile(r"[.!?,;:\n…]+")
_LETTER = re.compile(r"[^\W\d_]")
_BLANK_RUNS = re.compile(r"\n{3,}")
# Words a finished English sentence hardly ever ends with.
_OPEN_WORDS = frozenset("a an the and or but to of for with from into then if because until when your "
                        "my our their".split())
_SENTENCE_END = re.compile(r"[.!?…](?:\s|$)")
# Chat replies often skip the final full stop ("Sure", "Have a nice day"): only a longer
# unpunctuated run of words reads as a sentence that was cut off.
MID_SENTENCE_WORDS = 10


@dataclass
class Rule:
    name: str
    kind: str
    patterns: list[re.Pattern] = field(default_factory=list)
    where: str = ""     # "file:line" of its first pattern

    def whole(self, text: str) -> bool:
        return any(p.fullmatch(text) for p in self.patterns)

    def anywhere(self, text: str) -> bool:
        return any(p.search(text) for p in self.patterns)


class TranscriptRules:
    """The rules in force: by name (in file order) and by kind."""

    def __init__(self, rules: dict[str, Rule], files: list[str]) -> None:
        self.rules = rules
        self.files = files
        self.by_kind = {kind: [r for r in rules.values() if r.kind == kind] for kind in KINDS}

    def names(self) -> list[str]:
        return list(self.rules)

    def first_whole(self, kind: str, text: str) -> str | None:
        """The name of the first rule of `kind` that matches all of `text` (stripped), or None."""
        text = text.strip()
        if not text:
            return None
        for rule in self.by_kind[kind]:
            if rule.whole(text):
                return rule.name
        return None

    def platform_speaker(self, speaker: str) -> str | None:
        """The speaker rule that names `speaker` a platform (system, bot) speaker, or None."""
        for rule in self.by_kind["speaker"]:
            if rule.anywhere(speaker):
                return rule.name
        return None


# --------------------------------------------------------------------------- the rule files

def parse_rules(text: str, origin: str, rules: dict[str, Rule] | None = None) -> dict[str, Rule]:
    """Add the rules of one file's `text` to `rules` (name -> Rule); `origin` names the file in errors."""
    rules = {} if rules is None else rules
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{origin}:{lineno}"
        parts = line.split(None, 2)
        kind = parts[0].lower()
        if kind == "off":
            if len(parts) != 2:
                raise ChatforgeError(f"{where}: expected 'off NAME', got {line!r}")
            if parts[1] not in rules:
                raise ChatforgeError(f"{where}: 'off {parts[1]}': no rule of that name is defined above; "
                                     f"known rules: {', '.join(rules) or 'none'}")
            del rules[parts[1]]
            continue
        if kind not in KINDS:
            raise ChatforgeError(f"{where}: unknown rule kind {parts[0]!r}; expected one of "
                                 f"{', '.join(KINDS)} (or 'off NAME'), as in 'line join Agent \\w+ joined'")
        if len(parts) < 3:
            raise ChatforgeError(f"{where}: expected 'KIND NAME PATTERN', got {line!r}")
        name, source = parts[1], parts[2]
        if not _NAME.fullmatch(name):
            raise ChatforgeError(f"{where}: rule name {name!r} must be lower-case letters, digits and _, "
                                 "starting with a letter")
        try:
            pattern = re.compile(source, re.IGNORECASE)
        except re.error as e:
            raise ChatforgeError(f"{where}: rule {name!r} has a bad pattern ({e}): {source}") from None
        if pattern.search(""):
            raise ChatforgeError(f"{where}: rule {name!r}'s pattern matches an empty text, so it would "
                                 f"match everything; make it require some characters: {source}")
        rule = rules.get(name)
        if rule is None:
            rule = rules[name] = Rule(name, kind, where=where)
        elif rule.kind != kind:
            raise ChatforgeError(f"{where}: rule {name!r} is a {rule.kind} rule ({rule.where}), not {kind}; "
                                 "give this one another name")
        rule.patterns.append(pattern)
    return rules


def builtin_rules_text() -> str:
    return resources.files("chatforge").joinpath("resources", "transcript_rules.txt").read_text(encoding="utf-8")


def load_rules(extra: str | Path | None = None) -> TranscriptRules:
    """The built-in rules, then those of the file `extra` (--transcript-rules) when given."""
    rules = parse_rules(builtin_rules_text(), BUILTIN)
    files = [BUILTIN]
    if extra:
        path = Path(extra).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ChatforgeError(f"--transcript-rules {extra}: no such file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ChatforgeError(f"--transcript-rules {extra}: cannot read it as UTF-8 text ({e})") from None
        parse_rules(text, str(path), rules)
        files.append(str(path))
    return TranscriptRules(rules, files)


# --------------------------------------------------------------------------- one turn

def clean_turn(text: str, rules: TranscriptRules, removed: Counter) -> str:
    """`text` without its quoted earlier message, signature and platform lines; counts in `removed`."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        name = rules.first_whole("quote", line)
        if name:
            removed[name] += 1
            lines = lines[:i]
            break
    for i, line in enumerate(lines):
        name = rules.first_whole("signature", line)
        if name:
            tail = [t for t in lines[i + 1:] if t.strip()]
            if len(tail) <= SIGNATURE_MAX_LINES and all(len(t.strip()) < SIGNATURE_MAX_CHARS for t in tail):
                removed[name] += 1
                lines = lines[:i]
                break
    kept = []
    for line in lines:
        name = rules.first_whole("line", line)
        if name:
            removed[name] += 1
        else:
            kept.append(line)
    return _BLANK_RUNS.sub("\n\n", "\n".join(kept)).strip("\n")


# --------------------------------------------------------------------------- one conversation

@dataclass
class Cleaned:
    messages: list[dict]                                 # {"role", "content"}, merged
    removed: Counter = field(default_factory=Counter)    # rule name -> rows, lines or blocks removed
    reason: str | None = None                            # one of REASONS, or None: keep it
    reason_rules: set[str] = field(default_factory=set)  # the conversation rules behind `reason`
    ends_mid_sentence: bool = False


def _pieces(text: str) -> list[str]:
    return [p.strip() for p in _PIECES.split(text) if _LETTER.search(p)]


def _phrases(piece: str, rules: TranscriptRules) -> list[tuple[str, str]] | None:
    """[(kind, rule name)] when `piece` is one or several test or small-talk phrases in a row
    ("ok thanks bye"), else None. Dynamic programming over the piece's words."""
    words = piece.split()
    if len(words) > MAX_SMALLTALK_WORDS:
        return None
    found: list[list[tuple[str, str]] | None] = [[]] + [None] * len(words)
    for end in range(1, len(words) + 1):
        for start in range(end):
            if found[start] is None:
                continue
            phrase = " ".join(words[start:end])
            hit = next(((kind, name) for kind in ("test", "smalltalk")
                        if (name := rules.first_whole(kind, phrase))), None)
            if hit:
                found[end] = found[start] + [hit]
                break
    return found[-1]


def _asks_nothing(user_turns: list[str], rules: TranscriptRules) -> tuple[str | None, set[str]]:
    """("test" | "no_question", the rules that matched) when every piece the customer wrote is
    test messages or small talk; (None, {}) as soon as one piece is anything else."""
    hits: list[tuple[str, str]] = []
    for turn in user_turns:
        for piece in _pieces(turn):
            phrases = _phrases(piece, rules)
            if phrases is None:
                return None, set()
            hits += phrases
    if not hits:
        return None, set()
    test = any(kind == "test" for kind, _ in hits)
    return ("test" if test else "no_question"), {name for _, name in hits}


def ends_mid_sentence(text: str) -> bool:
    """True when `text` stops in the middle of a sentence: it ends with a comma, dash, colon,
    semicolon, slash or opening bracket, or with a word that no sentence ends with ("the",
    "and", "until"...), or with MID_SENTENCE_WORDS or more words since the last full stop."""
    last = text.rstrip().rsplit("\n", 1)[-1].strip()
    if not last:
        return False
    if last[-1] in ",;:-–—(/&":
        return True
    if not last[-1].isalnum():      # . ! ? ) " ' and emoticons end a reply
        return False
    words = _SENTENCE_END.split(last)[-1].split()
    return len(words) >= MID_SENTENCE_WORDS or words[-1].lower() in _OPEN_WORDS


def clean_conversation(messages: list[dict], rules: TranscriptRules) -> Cleaned:
    """Clean one conversation (see the module docstring); never drops it, only names a reason."""
    removed: Counter = Counter()
    turns: list[dict] = []
    for m in messages:
        speaker = m.get("speaker")
        if speaker is not None:
            name = rules.platform_speaker(speaker)
            if name:
                removed[name] += 1
                continue
        content = m["content"] if m["role"] == "system" else clean_turn(m["content"], rules, removed)
        if not content.strip():
            continue
        if turns and turns[-1]["role"] == m["role"]:
            turns[-1]["content"] += "\n" + content
        else:
            turns.append({"role": m["role"], "content": content})
    out = Cleaned(turns, removed)
    user = [t["content"] for t in turns if t["role"] == "user"]
    if not user or not any(t["role"] == "assistant" for t in turns):
        out.reason = "empty_side"
        return out
    for rule in rules.by_kind["spam"]:
        if any(rule.anywhere(u) for u in user):
            out.reason, out.reason_rules = "spam", {rule.name}
            return out
    out.reason, out.reason_rules = _asks_nothing(user, rules)
    out.ends_mid_sentence = turns[-1]["role"] == "assistant" and ends_mid_sentence(turns[-1]["content"])
    return out


# --------------------------------------------------------------------------- the report

class TranscriptStats:
    """Counts for the build report: per rule, per drop reason, and a few examples of each."""

    MAX_EXAMPLES = 5

    def __init__(self, rules: TranscriptRules, keep_conversations: bool = False) -> None:
        self.rules = rules
        self.keep_conversations = keep_conversations
        self.removed = Counter({name: 0 for name in rules.names()})
        self.conversations = Counter({"read": 0, "kept": 0, **{r: 0 for r in REASONS}, "ends_mid_sentence": 0})
        self.examples: dict[str, list[str]] = {r: [] for r in (*REASONS, "ends_mid_sentence")}

    def _example(self, key: str, where: str) -> None:
        if len(self.examples[key]) < self.MAX_EXAMPLES:
            self.examples[key].append(where)

    def add(self, result: Cleaned, where: str) -> bool:
        """Count one cleaned conversation; True when it goes on to the Q&A set.

        --keep-conversations keeps what the spam, test and small-talk rules flag (still counted);
        a conversation without a customer or an agent turn is never a training example.
        """
        self.conversations["read"] += 1
        self.removed.update(result.removed)
        self.removed.update(result.reason_rules)
        if result.reason:
            self.conversations[result.reason] += 1
            self._example(result.reason, where)
        if result.ends_mid_sentence:
            self.conversations["ends_mid_sentence"] += 1
            self._example("ends_mid_sentence", where)
        keep = result.reason is None or (self.keep_conversations and result.reason != "empty_side")
        self.conversations["kept"] += keep
        return keep

    def report(self) -> dict:
        return {"rule_files": self.rules.files, "keep_conversations": self.keep_conversations,
                "rules": dict(self.removed), "conversations": dict(self.conversations),
                "examples": {k: v for k, v in self.examples.items() if v}}


def format_transcripts(t: dict) -> list[str]:
    """The summary lines of a build report's "transcripts" section (none when no conversation was read)."""
    c = t["conversations"]
    if not c["read"]:
        return []
    verb = "flagged (kept: --keep-conversations)" if t["keep_conversations"] else "dropped"
    reasons = ", ".join(f"{r} {c[r]}" for r in REASONS)
    lines = [f"conversations: {c['read']} read, {c['kept']} kept; {verb}: {reasons}; "
             f"{c['ends_mid_sentence']} end mid-sentence (kept, listed in report.json)"]
    hits = [f"{name} {n}" for name, n in t["rules"].items() if n] or ["nothing matched"]
    line = "transcript rules:"
    for i, hit in enumerate(hits):        # wrapped between rules, never inside "name count"
        hit += "," if i < len(hits) - 1 else ""
        if len(line) + 1 + len(hit) > 100:
            lines.append(line)
            line = " "
        line += " " + hit
    return lines + [line]
