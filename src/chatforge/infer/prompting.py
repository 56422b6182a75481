"""System prompt files: structured Markdown sections -> the ChatML system message and few-shot turns.

    prompt = load_system_prompt("examples/system_prompt.md")
    prompt.text        # the system message
    prompt.examples    # [{"role": "user", ...}, {"role": "assistant", ...}, ...]
    prompt.messages()  # [system, *examples]: what goes before the conversation

`chatforge chat --system FILE` (and later `serve`) read their system prompt through here.

The file format
- A file without any level-1 heading is plain text: its contents (stripped) are the system message.
- Otherwise it is split at level-1 Markdown headings (`# Name` at the start of a line, outside
  ``` code fences). The known sections, matched case-insensitively, are
  `# Role` (who the assistant is), `# Goal` (what it is for), `# Do not` (what it must avoid),
  `# Output format` (how replies look) and `# Examples` (few-shot turns). Any other level-1
  heading is an error that names the file and line, because a typo such as `# Rol` would
  otherwise silently drop instructions. Deeper headings (`## ...`) are ordinary content.
- Text before the first heading is kept as a preamble at the top of the system message.
- `# Examples` holds turns that start with `User:` or `Assistant:` at the start of a line; a turn
  runs until the next one, so a turn may span several lines. Turns must alternate, starting with
  `User:` and ending with `Assistant:`.

The system message lists the sections in a fixed order (Role, Goal, Do not, Output format),
whatever their order in the file, so two files that say the same thing give the same prompt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from chatforge.errors import ChatforgeError

# Canonical name -> the label that introduces it in the system message ("" = no label).
SECTIONS: dict[str, str] = {
    "role": "",
    "goal": "Goal:",
    "do not": "Do not:",
    "output format": "Output format:",
    "examples": "",
}
_HEADING = re.compile(r"^#[ \t]+(.+?)[ \t]*#*[ \t]*$")      # `# Name` (closing #s allowed)
_FENCE = re.compile(r"^[ \t]*(```|~~~)")
_TURN = re.compile(r"^(User|Assistant)[ \t]*:[ \t]?(.*)$", re.IGNORECASE)


@dataclass
class SystemPrompt:
    """A parsed system prompt: the system message text and the few-shot turns that follow it."""

    text: str
    examples: list[dict[str, str]] = field(default_factory=list)
    source: str = "<string>"

    def messages(self) -> list[dict[str, str]]:
        """The messages that open every conversation: the system message (if any), then the examples."""
        head = [{"role": "system", "content": self.text}] if self.text else []
        return head + [dict(m) for m in self.examples]


def load_system_prompt(path: str | Path) -> SystemPrompt:
    """Read and parse a system prompt file; a missing or unreadable file is a `ChatforgeError`."""
    path = Path(path)
    if not path.is_file():
        raise ChatforgeError(f"system prompt file {path} does not exist; pass a text or Markdown file "
                             "(see examples/system_prompt.md)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ChatforgeError(f"{path} is not UTF-8 text; save the system prompt as UTF-8") from None
    except OSError as e:
        raise ChatforgeError(f"cannot read system prompt file {path}: {e.strerror}") from None
    return parse_system_prompt(text, source=str(path))


def parse_system_prompt(text: str, source: str = "<string>") -> SystemPrompt:
    """Parse the contents of a system prompt file (see the module docstring for the format)."""
    lines = text.splitlines()
    headings = _find_headings(lines)
    if not headings:
        return SystemPrompt(text.strip(), [], source)

    def fail(line_no: int, msg: str) -> ChatforgeError:
        return ChatforgeError(f"{source}, line {line_no}: {msg}")

    sections: dict[str, tuple[int, str]] = {}   # name -> (heading line number, body)
    for i, (idx, name) in enumerate(headings):
        key = " ".join(name.lower().split())
        if key not in SECTIONS:
            known = ", ".join(f"# {k.capitalize()}" for k in SECTIONS)
            raise fail(idx + 1, f"unknown section '# {name}'; the sections are {known} "
                                "(use ## for a sub-heading)")
        if key in sections:
            raise fail(idx + 1, f"section '# {name}' appears twice (first on line {sections[key][0]})")
        end = headings[i + 1][0] if i + 1 < len(headings) else len(lines)
        body = "\n".join(lines[idx + 1:end]).strip()
        if not body:
            raise fail(idx + 1, f"section '# {name}' is empty; write its text or remove the heading")
        sections[key] = (idx + 1, body)

    parts = []
    preamble = "\n".join(lines[:headings[0][0]]).strip()
    if preamble:
        parts.append(preamble)
    for key, label in SECTIONS.items():
        if key == "examples" or key not in sections:
            continue
        body = sections[key][1]
        # A one-line body reads as "Goal: ..."; a multi-line one (a list) goes under its label.
        if not label:
            parts.append(body)
        elif "\n" in body:
            parts.append(f"{label}\n{body}")
        else:
            parts.append(f"{label} {body}")
    examples: list[dict[str, str]] = []
    if "examples" in sections:
        line_no, body = sections["examples"]
        examples = _parse_examples(body, first_line=line_no + 1, fail=fail, lines=lines)
    return SystemPrompt("\n\n".join(parts), examples, source)


def _find_headings(lines: list[str]) -> list[tuple[int, str]]:
    """(line index, heading text) of every level-1 heading outside code fences."""
    out, fenced = [], False
    for i, line in enumerate(lines):
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            m = _HEADING.match(line)
            if m:
                out.append((i, m.group(1)))
    return out


def _parse_examples(body: str, first_line: int, fail, lines: list[str]) -> list[dict[str, str]]:
    """Turns of the `# Examples` section. `first_line` is the 1-based line number just after the
    heading; since `body` is stripped, line numbers are recovered by locating it in `lines`."""
    # The stripped body starts at the first non-blank line after the heading.
    start = first_line
    while start - 1 < len(lines) and not lines[start - 1].strip():
        start += 1
    turns: list[tuple[int, str, list[str]]] = []          # (line number, role, content lines)
    for offset, line in enumerate(body.splitlines()):
        m = _TURN.match(line)
        if m:
            turns.append((start + offset, m.group(1).lower(), [m.group(2)]))
        elif turns:
            turns[-1][2].append(line)
        elif line.strip():
            raise fail(start + offset, "text in '# Examples' before the first 'User:' turn; "
                                       "start each example turn with 'User:' or 'Assistant:'")
    examples = []
    expected = "user"
    for line_no, role, content in turns:
        if role != expected:
            raise fail(line_no, f"expected a '{expected.capitalize()}:' turn here; example turns must "
                                "alternate User:, Assistant:, User:, ...")
        text = "\n".join(content).strip()
        if not text:
            raise fail(line_no, f"the '{role.capitalize()}:' turn is empty")
        examples.append({"role": role, "content": text})
        expected = "assistant" if role == "user" else "user"
    if examples and examples[-1]["role"] != "assistant":
        raise fail(turns[-1][0], "the last example turn is a 'User:' turn without an 'Assistant:' answer")
    return examples
