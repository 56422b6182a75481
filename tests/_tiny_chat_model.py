"""A tiny real chat model for tests: a tokenizer and a GPT fitted to four support conversations
(assistant tokens only), so that greedy decoding repeats their replies. One reply holds an e-mail
address, which chat and the server must mask. Used by the chat, server and web page tests."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

CONVERSATIONS = [
    ("hello", "Hello! How can I help you today?"),
    ("How do I contact support?", "Write to help.desk@acme-support.example and we answer within a day."),
    ("How do I reset my password?", "Open the sign-in page and choose Forgot password."),
    ("What does the free plan include?", "The free plan includes five gigabytes of storage."),
]
EMAIL = "help.desk@acme-support.example"
CONTEXT = 256          # the tiny model's context: small, so that a few turns overflow it


def train_tiny_chat_model(out: Path, extra: Sequence[tuple[str, str]] = (), steps: int = 80,
                          prompt: Callable[[object, str], list[dict]] | None = None,
                          config: dict | None = None) -> Path:
    """A tokenizer and a tiny GPT fitted to CONVERSATIONS and `extra` ones (assistant tokens only),
    saved to `out`. Longer `extra` replies need more `steps`. `prompt(tokenizer, question)`: the
    messages the model is to answer from (e.g. the grounded prompt a server with documents builds),
    instead of the bare question. `config`: GPTConfig fields over the "tiny" preset (vLLM's CPU
    attention, for one, wants heads of a usual width such as 64, not the preset's 24)."""
    from chatforge.data.tokenizer import train_tokenizer
    from chatforge.model.gpt import GPT, preset
    from chatforge.model.folder import save_model

    conversations = [*CONVERSATIONS, *extra]
    tok = train_tokenizer([f"{q}\n{a}" for q, a in conversations] * 20, 400, None)
    torch.manual_seed(0)
    model = GPT(preset("tiny", **{"vocab_size": tok.vocab_size, "max_seq_len": CONTEXT, **(config or {})}))
    asked = prompt or (lambda _, q: [{"role": "user", "content": q}])
    rows = [tok.render_chat([*asked(tok, q), {"role": "assistant", "content": a}]) for q, a in conversations]
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), tok.pad_id)
    targets = torch.full((len(rows), width), -100)
    for r, (row, mask) in enumerate(rows):
        ids[r, :len(row)] = torch.tensor(row)
        # Predict token t+1 at position t, only where t+1 is assistant content.
        targets[r, :len(row) - 1] = torch.tensor([t if m else -100 for t, m in zip(row[1:], mask[1:])])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # the machine is shared: one core is plenty for this
    try:
        # 80 steps: with single punctuation pieces ("help" "." "desk") 40 did not yet tell a
        # sentence-ending "." from the one inside the e-mail address
        for _ in range(steps):
            _, loss = model(ids, targets)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    assert loss.item() < 0.5
    return save_model(out, model.eval(), tok)
