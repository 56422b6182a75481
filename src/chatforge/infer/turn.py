"""The prompt for one user turn: retrieval (or the plugins), the conversation so far, all fitted
to the model's context. `chat` and the server both build their prompts here.

    prompt = fit_prompt(tokenizer, system, index, history, "How do I restore a folder?", budget=2048,
                        k=3, context_tokens=settings.context_tokens)
    prompt.ids, prompt.messages, prompt.passages     # what the model sees and what it was given

`fit_prompt` retrieves `k` passages (or runs the routed plugins), then leaves out the oldest turns
and shrinks the retrieved context until the rendering fits in `budget` tokens; exchanges the
assistant refused are left out of what the model sees (`infer.answer.answered_history`).
`refused_below_threshold` turns a prompt whose best passage scores below the answer settings'
threshold into the not-found reply, without asking the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

from chatforge.errors import ChatforgeError
from chatforge.infer.answer import answered_history, below_min_score
from chatforge.infer.plugins import with_facts
from chatforge.infer.prompting import SystemPrompt
from chatforge.infer.safety import ReplyFilter
from chatforge.retrieval import CITATION_END, NOT_FOUND_REPLY, grounded_messages
from chatforge.retrieval.fusion import search_turn

MIN_CONTEXT_TOKENS = 16   # below this a retrieved context is not worth sending


@dataclass
class Prompt:
    """A conversation rendered for the model, within its token budget."""

    ids: list[int]                 # the rendered prompt, ending with the assistant's turn opening
    messages: list[dict]           # what the model sees: system, examples, kept history, the question
    passages: list                 # the retrieved passages that made it into the context block
    skipped: int                   # oldest history messages left out to make it fit
    facts: list = field(default_factory=list)   # plugin facts in the prompt (plugins.Fact)
    reply: str | None = None       # a plugin's direct reply: the model is not asked (ids are empty)
    reply_plugin: str | None = None
    grounded: bool = False         # in the grounded format: the reply ends with its citation

    def generation(self, cfg, refusal_bias: tuple = ()):
        """`cfg` for this prompt: a grounded reply ends with its first citation (`CITATION_END`),
        which can only name a passage or fact it was given (`GenerationConfig.cite_names`), and
        starts under the answer settings' refusal bias (`AnswerSettings.refusal_logit_bias`)."""
        if not self.grounded:
            return cfg

        names = tuple(dict.fromkeys(n for n in [*(p.source for p in self.passages), *(f.source for f in self.facts)]
                                    if n.strip() and "\n" not in n))
        return replace(cfg, stop_after=(*cfg.stop_after, CITATION_END), cite_names=names or cfg.cite_names,
                       first_token_bias=tuple(refusal_bias) or cfg.first_token_bias)

    def sources(self) -> list[dict]:
        """What the answer used, as the server's `sources` items: passages (plugin "docs"), then facts."""
        return ([{"source": p.source, "text": p.text, "plugin": "docs"} for p in self.passages]
                + [{"source": f.source, "text": f.text, "plugin": f.plugin} for f in self.facts])


def _messages(system: SystemPrompt | None, index, user_text: str, history: list[dict], passages: list,
              context_tokens: int, tokenizer, facts: Sequence = ()) -> list[dict]:
    examples = system.examples if system else []
    text = system.text if system and system.text else None
    if index is None:
        head = [{"role": "system", "content": text}] if text else []
        question = f"{with_facts('', facts)}Question: {user_text}" if facts else user_text
        return [*head, *examples, *history, {"role": "user", "content": question}]

    # system=None gives retrieval's grounded system prompt, the one grounded SFT teaches. Refused
    # exchanges are left out of what the model sees (`answered_history`).
    messages = grounded_messages(user_text, passages, system=text, history=[*examples, *answered_history(history)],
                                 max_context_tokens=context_tokens, tokenizer=tokenizer)
    messages[-1]["content"] = with_facts(messages[-1]["content"], facts)
    return messages


def fit_prompt(tokenizer, system: SystemPrompt | None, index, history: list[dict], user_text: str,
               budget: int, k: int = 3, tools=None, guard: ReplyFilter | None = None,
               conversation_id: str | None = None, context_tokens: int | None = None) -> Prompt:
    """The prompt for `user_text` after `history`: retrieve `k` passages (with an index), then drop
    the oldest turns and shrink the retrieved context until it fits in `budget` tokens. A message
    that cannot fit even alone is a `ChatforgeError`. `chat` and the HTTP server share this.

    With `tools` (a `plugins.PluginRunner`) the routed plugins run first (`index` is then not
    searched: the `docs` plugin retrieves, and its presence selects the grounded format); their
    facts join the last user message in the facts format (`infer/plugins.py`), and a plugin's
    direct reply comes back as `Prompt.reply` with no ids. `context_tokens` caps the passages' token
    budget (the model's answer settings: what SFT trained it on); without it they get up to two
    thirds of what the history leaves."""
    def render(messages: list[dict]) -> list[int]:
        return tokenizer.render_chat(messages, add_generation_prompt=True)[0]

    facts: list = []
    if tools is not None:
        found = tools.run(user_text, history, guard, conversation_id)
        if found.reply is not None:
            turn = {"role": "user", "content": user_text}
            return Prompt([], [*history, turn], [], 0, found.facts, found.reply, found.reply_plugin)
        index = tools.get("docs")               # the grounded format comes with the docs plugin
        passages, facts = found.passages, found.facts
    else:
        passages = search_turn(index, user_text, k, history) if index is not None else []
    fixed = len(render(_messages(system, index, "", [], [], MIN_CONTEXT_TOKENS, tokenizer)))
    room = (budget - fixed) * 2 // 3
    context_tokens = max(MIN_CONTEXT_TOKENS, min(room, context_tokens) if context_tokens else room)
    # Oldest history messages left out: first estimated from each message's tokens, counted once,
    # so a long history costs linear time (rendering it whole once per dropped turn was quadratic:
    # 8,000 short messages took 100 s). The loop below checks the estimate on the real rendering.
    bare = len(render(_messages(system, index, user_text, [], passages, context_tokens, tokenizer, facts)))
    skip = _first_fitting_skip(tokenizer, history, budget - bare)
    while True:
        messages = _messages(system, index, user_text, history[skip:], passages, context_tokens, tokenizer, facts)
        ids = render(messages)
        if len(ids) <= budget:
            break
        if skip < len(history):
            skip += 2                              # one user turn and its reply
        elif passages and context_tokens > MIN_CONTEXT_TOKENS:
            context_tokens = max(MIN_CONTEXT_TOKENS, context_tokens // 2)
        elif passages:
            passages = []
        elif facts:
            facts = facts[:-1]                     # the last plugin's facts go before the question does
        else:
            raise ChatforgeError(
                f"the message is too long: with the system prompt it takes {len(ids)} tokens and the "
                f"model's context holds {budget} before the reply; shorten it")
    return Prompt(ids, messages, _passages_used(passages, messages[-1]["content"]), skip, facts,
                  grounded=index is not None)


def refused_below_threshold(prompt: Prompt, min_score: float) -> Prompt:
    """`prompt`, or the not-found reply in its place when the answer settings' score threshold says no
    retrieved passage answers (and no plugin brought facts): the model is not asked."""
    if not prompt.grounded or prompt.reply is not None or prompt.facts or not below_min_score(prompt.passages, min_score):
        return prompt

    return replace(prompt, ids=[], passages=[], reply=NOT_FOUND_REPLY)


def _first_fitting_skip(tokenizer, history: list[dict], room: int) -> int:
    """The fewest oldest messages (whole turns: an even number) to leave out so that the rest of
    `history` takes at most `room` tokens; past the end of it if none fits.

    A rendered conversation is the sum of its messages' renderings (each is its own
    `<|im_start|>role\ncontent<|im_end|>\n`, encoded apart from the others), so each message is
    rendered once, after a fixed system message that keeps the template's default one out."""
    if not history:
        return 0
    anchor = {"role": "system", "content": ""}
    base = len(tokenizer.render_chat([anchor])[0])
    costs = [len(tokenizer.render_chat([anchor, {"role": m["role"], "content": m["content"]}])[0]) - base
             for m in history]
    kept = sum(costs)                              # tokens of history[skip:]
    skip = 0
    while skip < len(history) and kept > room:
        kept -= sum(costs[skip:skip + 2])
        skip += 2
    return skip


def _passages_used(passages: list, user_content: str) -> list:
    """The passages that made it into the context block (the budget may cut the last ones), in order."""
    return [p for i, p in enumerate(passages) if f"[{i + 1}] (source: {p.source})" in user_content]
