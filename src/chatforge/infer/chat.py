"""`chatforge chat`: talk to a model in the terminal, optionally grounded in your documents.

    chatforge chat --model runs/demo/sft
    chatforge chat --model runs/demo/sft --system examples/system_prompt.md --docs examples/my_docs
    printf 'How do I reset my password?\\nAnd my e-mail?\\n' | chatforge chat --model runs/demo/sft

What this file holds
- `ChatSession`: one conversation with a model: history rendered through the ChatML template,
  oldest turns dropped when the context is full, optional retrieval (`--docs`), replies streamed
  through the safety filter (`infer/safety.py`). The HTTP server reuses it.
- `converse(...)`: the read-reply loop, for a terminal and for pipes.
- the command's options and its terminal: `chatforge.commands.chat`.

In a terminal: a `you>` prompt, replies streamed as they are generated, `/help`, `/reset`,
`/exit` (or Ctrl-D); Ctrl-C during a reply stops that reply only. When stdin is not a terminal
the chat is scriptable: no prompt or banner, one output line per input line (a reply's line
breaks become spaces), flushed per line; notes (sources, dropped turns, errors) go to stderr.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator, TextIO

from chatforge.errors import ChatforgeError
from chatforge.infer.answer import AnswerSettings, AnswerStream
from chatforge.infer.engine import Engine
from chatforge.infer.plugin_builtins import DocsPlugin
from chatforge.infer.plugins import PluginRunner
from chatforge.infer.prompting import SystemPrompt
from chatforge.infer.safety import ReplyFilter
from chatforge.infer.turn import MIN_CONTEXT_TOKENS, Prompt, _messages, fit_prompt, refused_below_threshold

COMMANDS_HELP = """\
Commands:
  /help    show this help
  /reset   forget the conversation so far (the system prompt stays)
  /exit    leave (Ctrl-D does the same)
Ctrl-C while a reply is being written stops that reply."""
COMMANDS = ("/help", "/reset", "/exit")


class ChatSession:
    """A conversation with a model. `reply(text)` streams the answer and extends `history`.

    `history` holds the plain user and assistant turns (never the retrieved context, to save
    space); the system prompt and its few-shot examples are kept apart and always sent. When
    the prompt would not leave room for `gen_cfg.max_new_tokens` (at most half the context),
    the oldest turns are dropped for good: `last_dropped` says how many messages (user and
    assistant turns) the last reply dropped, `dropped` how many this conversation has. `last_sources` names the documents the
    last reply was given. Replies are filtered by `guard` (PII always, blocked terms if any)
    before they are yielded, and the history keeps the filtered text, what the user saw.
    """

    def __init__(self, model, tokenizer, system: SystemPrompt | str | None = None, index=None,
                 gen_cfg=None, guard: ReplyFilter | None = None, engine=None, passages: int | None = None,
                 quant: str | None = None, tools=None, settings: AnswerSettings | None = None):
        # The answer settings the model was trained for (`infer/answer.py`): passages, their token
        # budget, decoding and the score threshold, the same as serve and eval use.
        self.settings = settings or AnswerSettings()
        passages = self.settings.passages if passages is None else passages

        if tools is None and index is not None:
            # Retrieval is the docs plugin: one code path with or without other plugins.
            tools = PluginRunner([DocsPlugin(index, passages)])
        self.tools = tools
        self.index = tools.get("docs") if tools is not None else None
        self.tokenizer, self.k = tokenizer, passages
        self.gen_cfg = gen_cfg or self.settings.generation()
        self.refusal_bias = self.settings.refusal_logit_bias(tokenizer)
        self.guard = guard or ReplyFilter()
        if engine is None:
            # A new <|im_start|> means the model began another turn: its reply is over.
            stops = [tokenizer.eot_id, tokenizer.im_end_id, tokenizer.im_start_id]
            engine = Engine(model, tokenizer, stop_ids=stops, quant=quant)
        self.engine = engine
        self.prompt = SystemPrompt(system.strip()) if isinstance(system, str) else system
        self.context = model.config.max_seq_len
        reserve = min(self.gen_cfg.max_new_tokens, self.context // 2)
        self.budget = self.context - reserve          # prompt tokens allowed before the reply
        self.history: list[dict[str, str]] = []
        self.dropped = self.last_dropped = 0
        self.last_sources: list[str] = []
        self.last_used: list[dict] = []     # what the last reply used: {"plugin", "source", "text"}
        fixed = len(self._render(_messages(self.prompt, self.index, "", [], [], MIN_CONTEXT_TOKENS, tokenizer)))
        if fixed >= self.budget:
            raise ChatforgeError(
                f"the system prompt and its examples take {fixed} tokens, but the model's context is "
                f"{self.context} tokens with {reserve} kept for the reply; shorten the system prompt "
                "or lower --max-new-tokens")

    def reset(self) -> None:
        """Start a new conversation (the system prompt and examples stay)."""
        self.history.clear()
        self.dropped = self.last_dropped = 0
        self.last_sources = []
        self.last_used = []

    def reply(self, user_text: str) -> Iterator[str]:
        """Yield the filtered reply to `user_text` in pieces; the turn joins `history` at the end,
        or when the generator is closed or interrupted (with the part that was shown)."""
        prompt = self._prompt(user_text)
        stream = self.guard.stream()
        shown: list[str] = []
        # A plugin's direct reply (already filtered) stands in for the model's.
        if prompt.reply is not None:
            pieces: Iterable[str] = [prompt.reply]
        else:
            pieces = self._generate(prompt.ids, prompt.generation(self.gen_cfg, self.refusal_bias))
            if prompt.grounded:
                pieces = self._checked(pieces, prompt)
        try:
            for piece in pieces:
                safe = stream.push(piece)
                if safe:
                    shown.append(safe)
                    yield safe
            safe = stream.finish()
            if safe:
                shown.append(safe)
                yield safe
        finally:
            self.history += [{"role": "user", "content": user_text},
                             {"role": "assistant", "content": "".join(shown).strip()}]

    # ------------------------------------------------------------------------------ helpers

    def _checked(self, pieces: Iterable[str], prompt: "Prompt") -> Iterator[str]:
        """A grounded reply with its citation checked (`AnswerStream`); a refusal lists no sources."""
        answer = AnswerStream(prompt.passages)
        for piece in pieces:
            yield answer.push(piece)
        yield answer.finish()
        if answer.refusal:
            self.last_sources, self.last_used = [], [u for u in self.last_used if u["plugin"] != "docs"]

    def _generate(self, ids: list[int], cfg) -> Iterator[str]:
        if cfg.strategy == "beam":
            # Beam search knows its best sequence only at the end: one piece.
            yield self.engine.generate([ids], cfg)[0].text or ""
        else:
            yield from self.engine.stream(ids, cfg)

    def _render(self, messages: list[dict]) -> list[int]:
        return self.tokenizer.render_chat(messages, add_generation_prompt=True)[0]

    def _prompt(self, user_text: str) -> "Prompt":
        """The prompt for `user_text`; the oldest turns that did not fit are dropped for good."""
        prompt = fit_prompt(self.tokenizer, self.prompt, self.index, self.history, user_text, self.budget, self.k,
                            tools=self.tools, guard=self.guard, context_tokens=self.settings.context_tokens)
        prompt = refused_below_threshold(prompt, self.settings.threshold(getattr(self.index, "mode", None)))
        # Only now that the prompt fits are the turns dropped (a failed message keeps them).
        del self.history[:prompt.skipped]
        self.last_dropped = prompt.skipped
        self.dropped += prompt.skipped
        self.last_sources = list(dict.fromkeys(p.source for p in prompt.passages))
        self.last_used = prompt.sources()
        return prompt


# ---------------------------------------------------------------------------------- the loop

def style(color: bool) -> Callable[[str, str], str]:
    """`paint(text, "dim" | "bold" | "cyan")`: ANSI styles when `color`, else the text as it is."""
    codes = {"dim": "2", "bold": "1", "cyan": "36"}
    return (lambda text, s: f"\x1b[{codes[s]}m{text}\x1b[0m") if color else (lambda text, s: text)


def tty_reader(prompt: str, out: TextIO) -> Callable[[], str | None]:
    """Read a line from the terminal; None on Ctrl-D. Ctrl-C at the prompt clears the line."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  lazy: importing it changes input() (line editing, history); only the chat wants that

    def read() -> str | None:
        while True:
            try:
                return input(prompt)
            except EOFError:
                out.write("\n")
                return None
            except KeyboardInterrupt:
                out.write("\n(type /exit or press Ctrl-D to leave)\n")

    return read


def pipe_reader(stream: TextIO) -> Callable[[], str | None]:
    def read() -> str | None:
        line = stream.readline()
        return line.rstrip("\r\n") if line else None
    return read


def converse(session: ChatSession, read: Callable[[], str | None], out: TextIO, notes: TextIO,
             interactive: bool, color: bool = False) -> int:
    """Run the conversation until /exit or end of input; returns the exit code.

    Interactive: replies stream to `out` behind an `assistant>` label, notes are dim on `out`.
    Scripted: one line on `out` per input line (empty for commands and errors), notes and
    errors on `notes`; exit code 2 if any turn failed.
    """
    paint = style(color)
    failed = told_dropped = False

    def note(text: str) -> None:
        notes.write((paint(text, "dim") if interactive else text) + "\n")
        notes.flush()

    def blank() -> None:                  # keeps output line N = input line N when scripted
        if not interactive:
            out.write("\n")
            out.flush()

    while (line := read()) is not None:
        text = line.strip()
        word = text.split(maxsplit=1)[0].lower() if text else ""
        if word in COMMANDS or (word.startswith("/") and "/" not in word[1:] and text == word):
            if word == "/exit":
                break
            if word == "/help":
                note(COMMANDS_HELP)
            elif word == "/reset":
                session.reset()
                told_dropped = False
                note("(conversation cleared)")
            else:
                note(f"unknown command {word}; type /help for the commands")
            blank()
            continue
        if not text:
            blank()
            continue
        if interactive:
            out.write(paint("assistant> ", "cyan"))
            out.flush()
        error = None
        try:
            with contextlib.closing(session.reply(text)) as pieces:
                for piece in pieces:
                    if interactive:
                        out.write(piece)
                        out.flush()
                    else:
                        out.write(piece.replace("\r", "").replace("\n", " "))
        except KeyboardInterrupt:
            out.write(paint(" [stopped]", "dim"))
        except ChatforgeError as e:
            error = f"error: {e}"
        out.write("\n")
        out.flush()
        if error:
            failed = True
            notes.write(error + "\n")
            notes.flush()
        if session.last_dropped and not told_dropped:
            note(f"(the conversation no longer fits the model's {session.context}-token context: "
                 "the oldest turns are being dropped)")
            told_dropped = True
        if session.last_used:
            # Which plugin gave what: "sources: docs: faq.md > Refunds; orders: orders.csv > 1042".
            used = dict.fromkeys(f"{u['plugin']}: {u['source']}" for u in session.last_used)
            note("sources: " + "; ".join(used))
        if interactive:
            out.write("\n")
    return 2 if failed and not interactive else 0
