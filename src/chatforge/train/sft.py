"""`chatforge sft`: supervised fine-tuning of a pretrained model into a chat assistant.

    chatforge sft --base runs/demo/pretrain --data runs/demo/data --out runs/demo/sft
    chatforge sft ... --method lora --lora-rank 8 --lora-save adapter
    chatforge sft ... --method freeze --freeze-top 2
    chatforge sft ... --resume                 # continue from runs/demo/sft/last/

    run_sft(base, data, out, SFTConfig(method="lora"))   # from Python; or run_sft(..., method="lora")

`SFTConfig` holds every option and its default (the command line, `commands/sft.py`, is
generated from it; YAML keys and pipeline settings use the same flat names).

Data: the data stage's `qa_train.jsonl` / `qa_val.jsonl` (FAQ pairs and multi-turn
conversations, `{"messages": [...]}` or `{"prompt", "completion"}` lines), rendered in ChatML
and packed several to a row with a block-diagonal mask (`--packing pack`, the default) or
batched by length with plain causal attention (`--packing bucket`; `chatforge.data.chat_data`).
Measured on this 2-core CPU: with 512-token rows of mostly short examples the two cost about
the same per example (packing 0.084 s, buckets 0.094 s), with 1024-token rows of long grounded
examples buckets trained ~1.7x faster (the masked attention path grows with the row length).
The loss counts assistant tokens only. Grounded examples are mixed in: for `--grounded-fraction` of the single-turn
pairs, the question comes with passages retrieved from the documents (`--docs`, or the data
folder's `corpus.jsonl`) in the prompt format `chat` uses (`retrieval/`), so the model
learns to answer from the context and to name its source (`--grounded-history` of them after an
earlier turn of the conversation, as chat shows it); `--section-examples N` adds N
reading-comprehension examples made from the documents' own sections (a question about a
section, the reply copied from its passage), because Q&A pairs alone are too few for a small
model to learn to copy from its context. `--seq-len` above the base model's context extends
it (`GPT.extend_context`).

Methods (`--method`):
- `full`: every parameter trains (default lr 3e-4, lower than pretraining's).
- `lora`: low-rank adapters on `--lora-targets` (`model/lora.py`); the base stays frozen
  (default lr 1e-3, as adapters start from zero and are small). The output is merged into a
  plain model; `--lora-save adapter` also keeps `adapter.safetensors` + `adapter_config.json`
  (whose `base` key points at `--base`).
- `freeze`: only the top `--freeze-top` blocks, the final norm and the LM head train. With
  tied embeddings the head IS the token embedding matrix: it trains too (the head is where the
  model learns to end its turn with `<|im_end|>`), so the input embeddings change with it;
  every lower block stays bit-identical.

The training itself is `chatforge.train.loop.train` (validation loss and perplexity on
qa_val, the best checkpoint kept, `last/` for `--resume`). `--out` ends up a model folder
(`load_model` works on it) for every method. With `--method lora`, `last/` holds the wrapped
(unmerged) weights, which is what `--resume` needs. `OUT/sft.json` records the data statistics
(examples kept / truncated / dropped, padding fraction) and the result.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from chatforge import files
from chatforge.data.chat_data import PackedBatches, eval_batches, pack, read_chat_records, tokenize_examples
from chatforge.errors import ChatforgeError
from chatforge.infer.answer import (AnswerSettings, fit_min_score, fit_refusal_bias, refusal_margin,
                                    refusal_token)
from chatforge.infer.engine import Engine, GenerationConfig
from chatforge.model.folder import load_model
from chatforge.model.lora import LoraConfig
from chatforge.options import build, flatten, group, option
from chatforge.retrieval import DEFAULT_CONTEXT_TOKENS, GROUNDED_SYSTEM_PROMPT
from chatforge.retrieval.examples import grounded_sft_examples, section_sft_examples
from chatforge.retrieval.fusion import RetrievalOptions, load_retriever
from chatforge.train import recipe
from chatforge.train.loop import LoopOptions, train

METHODS = ("full", "lora", "freeze")
DEFAULT_LR = {"full": 3e-4, "lora": 1e-3, "freeze": 3e-4}
MAX_SEQ_LEN = 32768     # --seq-len above the model's context extends it (RoPE), up to this
MIN_CONTEXT_TOKENS = 64  # below this the context cannot hold a useful passage: no grounded copy
FRACTIONS = ("grounded_fraction", "grounded_history", "missing_fraction", "hide_headings", "refusal_history",
             "hard_missing", "refusal_budget")


# ---------------------------------------------------------------------------------------------
# Options


@dataclass
class SFTLora(LoraConfig):
    """LoRA as SFT and the classifier train it: a little dropout on the adapters' input."""
    dropout: float = option(0.05, "LoRA: dropout on the adapters' input")


@dataclass
class SFTConfig(LoopOptions):
    """`chatforge sft`'s options (the loop's: `LoopOptions`; the adapters': `lora`)."""
    method: str = option("full", "full: all weights; lora: low-rank adapters; freeze: only the top blocks and the head",
                         choices=METHODS)
    lora: LoraConfig = group(SFTLora, "lora")
    lora_save: str = option("merged", "LoRA: merged = a plain model folder; adapter = that plus adapter.safetensors",
                            choices=("merged", "adapter"))
    freeze_top: int = option(2, "freeze: number of top blocks that train")
    docs: list[str] | None = option(None, "documents (files or folders) for grounded examples (default: the data "
                                          "folder's corpus.jsonl)")
    # The passages of grounded examples are found as chat finds them.
    retrieval: RetrievalOptions = group(RetrievalOptions)
    grounded_fraction: float = option(0.3, "share of single-turn Q&A pairs that also get a grounded copy (0 = none)")
    grounded_history: float = option(0.3, "share of the grounded copies that come after an earlier turn of the "
                                          "conversation (another question and its cited reply), as in chat: without "
                                          "them a model copies its previous reply on the second question (0 = none)")
    grounded_only: bool = option(False, "pairs whose source is among the documents are trained only in grounded form "
                                        "(no plain copy without passages); other pairs (chat transcripts) stay plain")
    context_tokens: int | None = option(None, "most tokens of retrieved passages in a grounded example (default: the "
                                              "retrieval module's, the same budget eval uses)")
    missing_fraction: float = option(0.15, "share of the grounded copies whose passages come from other documents "
                                           "only and whose reply is the not-found sentence (0 = the model never "
                                           "learns to refuse)")
    hard_missing: float = option(0.0, "share of the not-found examples (--missing-fraction) whose passages are the "
                                      "best of every document but the answer's own: on topic, yet not answering "
                                      "(the others are from other documents only)")
    hide_headings: float = option(0.0, "share of the grounded examples that show the answer's passage under its "
                                       "document's name alone, not under a heading that repeats the question: "
                                       "teaches answering from manuals, whose headings are not the customers' "
                                       "questions")
    refusal_history: float = option(0.0, "share of the earlier turns (--grounded-history) that are a not-found "
                                         "reply, followed by a question the context answers: an earlier refusal "
                                         "must not make the next one")
    score_threshold: bool = option(False, "record in answer.json a retrieval-score threshold fitted on the Q&A: "
                                          "below it chat, serve and eval reply not-found without asking the model "
                                          "(off: the model decides)")
    refusal_budget: float = option(0.02, "record in answer.json the smallest refusal bias (logits taken from the "
                                         "not-found reply's first token) at which at most this share of the "
                                         "held-out grounded examples the context answers are refused (1 = no bias)")
    section_examples: int = option(0, "reading-comprehension examples made from the documents' named sections "
                                      "(question about a section, reply copied from its passage); 10%% more go to "
                                      "validation")
    seq_len: int = option(0, "tokens per packed row (0 = the model's context; longer extends the context)")
    packing: str = option("pack", "pack: several examples per row with a block-diagonal mask (least padding); "
                                  "bucket: batches of similar length with plain causal attention (faster for long "
                                  "rows)", choices=("pack", "bucket"))
    truncate: str = option("left", "too-long examples: cut the prompt from the left, or drop them",
                           choices=("left", "drop"))
    epochs: float = option(3.0, "passes over the training rows (ignored with --steps)")
    lr: float | None = option(None, "peak learning rate (default: 3e-4 full / freeze, 1e-3 lora)")
    eval_every: int = option(0, "steps between validations and checkpoints (0 = once an epoch)")

    def __post_init__(self) -> None:
        for name in FRACTIONS:
            if not 0 <= getattr(self, name) <= 1:
                raise ChatforgeError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)}")
        if self.epochs <= 0 and not self.steps:
            raise ChatforgeError(f"--epochs must be positive, got {self.epochs}")
        if self.seq_len and not 16 <= self.seq_len <= MAX_SEQ_LEN:
            raise ChatforgeError(f"--seq-len must be 0 (the model's context) or between 16 and {MAX_SEQ_LEN}, "
                                 f"got {self.seq_len}")


# ---------------------------------------------------------------------------------------------
# Pieces


def sft_loss(model, batch: dict):
    """Mean next-token loss over the assistant tokens of the packed rows, and their count."""
    _, loss = model(batch["input_ids"], batch["labels"], positions=batch["positions"],
                    attn_mask=batch.get("attn_mask"), loss_only=True)
    return loss, (batch["labels"] != -100).sum()


def read_records(data: Path, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, val) `{"messages", "source"}` records of a data folder; without qa_val.jsonl, a
    seeded 10% of qa_train.jsonl is held out."""
    if not data.is_dir():
        raise ChatforgeError(f"data folder {data} does not exist; run `chatforge data build --out {data}`")
    train = read_chat_records(data / "qa_train.jsonl")
    if (data / "qa_val.jsonl").is_file():
        return train, read_chat_records(data / "qa_val.jsonl")
    if len(train) < 2:
        raise ChatforgeError(f"{data}/qa_train.jsonl has {len(train)} example(s): too few to hold out a validation set")
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    k = max(1, len(train) // 10)
    return [train[i] for i in order[k:]], [train[i] for i in order[:k]]


def document_paths(data: Path, docs: list[str] | None) -> list[Path]:
    """The documents to ground in: `--docs`, else the inputs the data folder's report.json lists."""
    if docs:
        return [Path(d) for d in docs]
    report = data / "report.json"
    if not report.is_file():
        return []
    try:
        inputs = files.read_json(report).get("inputs") or []
    except (OSError, ValueError, AttributeError):
        return []
    return [Path(p) for p in inputs if Path(p).exists()]


def grounded_records(records: list[dict], index, fraction: float, seed: int, tokenizer, seq_len: int,
                     missing_fraction: float = 0.15, context_tokens: int | None = None,
                     history_fraction: float = 0.0, hide_heading: float = 0.0,
                     refusal_history: float = 0.0, hard_missing: float = 0.0) -> list[dict]:
    """Grounded copies of a seeded `fraction` of `records` (`{"messages", "source"}` dicts).

    Each copy's context budget is what the row has left after the system prompt, the question
    and the answer, at most `context_tokens` (default: retrieval's DEFAULT_CONTEXT_TOKENS, the
    budget eval and chat use too), so that the example fits whole: cutting it from the
    left would remove the instructions and perhaps the passage that holds the answer. Records
    with too long an answer get no copy. A seeded `missing_fraction` of the copies get only
    passages from other documents and learn to say the answer is not there.

    Chat and the server put the conversation's earlier turns (the plain question, the cited reply)
    before a new grounded question. A model trained on single turns alone answers the second
    question of a conversation by copying its previous reply, the nearest text that looks like an
    answer (the demo assistant did, every time). So a seeded `history_fraction` of the single-turn
    copies get an earlier turn first: another copy's question and reply, from another document,
    kept only where the example still fits the row. A `refusal_history` share of those earlier
    turns are not-found replies (when there are any) before an answered question: a model that
    saw refusals only after refusals went on refusing for the rest of a conversation.
    `hide_heading`: see `grounded_sft_examples`.
    """
    context_tokens = context_tokens or DEFAULT_CONTEXT_TOKENS
    if fraction <= 0 or not records:
        return []
    rng = random.Random(seed)
    chosen = [r for r in records if r["source"]]
    rng.shuffle(chosen)
    chosen = chosen[:round(fraction * len(chosen))]
    missing = set(rng.sample(range(len(chosen)), round(missing_fraction * len(chosen))))
    fixed = len(tokenizer.encode(GROUNDED_SYSTEM_PROMPT)) + 24  # the template and "Question:"
    out, questions = [], []
    for i, rec in enumerate(chosen):
        text = sum(len(tokenizer.encode(m["content"])) for m in rec["messages"] if m["role"] != "system")
        budget = min(context_tokens, seq_len - fixed - text)
        # The citation's length is known only once the answer's passage is found: measure, and
        # shrink the context by the overflow once.
        for _ in range(2):
            if budget < MIN_CONTEXT_TOKENS:
                break
            ex = grounded_sft_examples([rec], index, k=3, missing_fraction=1.0 if i in missing else 0.0,
                                       seed=seed + i, tokenizer=tokenizer, max_context_tokens=budget,
                                       hide_heading=hide_heading, hard_missing=hard_missing)
            over = len(tokenizer.render_chat(ex[0]["messages"])[0]) - (seq_len + 1) if ex else 0
            if over <= 0:
                out += ex
                questions += [next(m["content"] for m in reversed(rec["messages"]) if m["role"] == "user")] * len(ex)
                break
            budget -= over
    singles = [i for i, e in enumerate(out) if len(e["messages"]) == 3]      # system, user, assistant
    refusals = [i for i in singles if out[i]["missing"]]
    for i in rng.sample(singles, round(history_fraction * len(singles))):
        after_refusal = refusals and not out[i]["missing"] and rng.random() < refusal_history
        j = rng.choice(refusals if after_refusal else singles)
        if out[j]["source"] == out[i]["source"]:
            continue
        system, *rest = out[i]["messages"]
        turn = [{"role": "user", "content": questions[j]}, out[j]["messages"][-1]]
        longer = [system, *turn, *rest]
        if len(tokenizer.render_chat(longer)[0]) <= seq_len + 1:
            out[i] = {**out[i], "messages": longer}
    return out


def refusal_threshold(index, records: list[dict], limit: int = 400) -> dict:
    """The retrieval-score threshold below which no passage likely answers (`infer.answer`),
    fitted on the company's own Q&A: each question's best score with every document, against its
    best score with the documents holding its answer left out (a question the documents cannot
    answer). Returns {"min_score", "answerable", "unanswerable"} (the latter two: the shares the
    threshold refuses)."""
    rng = random.Random(0)
    rows = [r for r in records if r["source"] and index.matching_docs(r["source"])]
    rows = rng.sample(rows, min(limit, len(rows)))
    with_answer, without = [], []
    for r in rows:
        q = next(m["content"] for m in reversed(r["messages"]) if m["role"] == "user")
        hits = index.search(q, 1)
        other = index.search(q, 1, exclude_docs=index.matching_docs(r["source"]))
        with_answer.append(hits[0].score if hits else 0.0)
        without.append(other[0].score if other else 0.0)
    threshold = fit_min_score(with_answer, without)
    share = (lambda xs: sum(s < threshold for s in xs) / len(xs) if xs else None)
    return {"min_score": threshold, "answerable": share(with_answer), "unanswerable": share(without),
            "questions": len(rows)}


def section_records(index, n: int, seed: int, tokenizer, seq_len: int, hide_heading: float = 0.0,
                    exclude_docs: Iterable[str] = ()) -> tuple[list[dict], list[dict]]:
    """(validation, train) reading-comprehension examples (`section_sft_examples`): `n` for
    training and n / 10 (at least 1) for validation, from different passages, each fitting a row,
    none from `exclude_docs`."""
    n_val = max(1, n // 10)
    max_words = 120
    # Room for the system prompt, the template, a question and a reply of max_words words.
    fixed = len(tokenizer.encode(GROUNDED_SYSTEM_PROMPT)) + 40 + 2 * max_words
    budget = min(320, seq_len - fixed)
    if budget < MIN_CONTEXT_TOKENS:
        return [], []
    examples = section_sft_examples(index, n + n_val, seed=seed, tokenizer=tokenizer, max_context_tokens=budget,
                                    max_reply_words=max_words, hide_heading=hide_heading, exclude_docs=exclude_docs)
    examples = [e for e in examples if len(tokenizer.render_chat(e["messages"])[0]) <= seq_len + 1]
    return examples[:n_val], examples[n_val:]


def build_rows(train_recs: list[dict], val_recs: list[dict], tok, seq_len: int, data: Path, o: SFTConfig):
    """(train rows, val rows, grounded summary, held-out grounded examples): the records plus
    grounded copies, tokenized and packed; the last are the validation side's grounded examples
    (the refusal bias is fitted on them)."""
    doc_paths = document_paths(data, o.docs) if o.grounded_fraction > 0 else []
    grounded = {"train": 0, "val": 0, "documents": [str(p) for p in doc_paths]}
    g_val: list[dict] = []
    if doc_paths:
        index = load_retriever(doc_paths, mode=o.retrieval.retrieval, model=o.retrieval.embedding_model)
        shape = {"context_tokens": o.context_tokens, "history_fraction": o.grounded_history,
                 "missing_fraction": o.missing_fraction, "hide_heading": o.hide_headings,
                 "refusal_history": o.refusal_history, "hard_missing": o.hard_missing}
        g_train = grounded_records(train_recs, index, o.grounded_fraction, o.seed, tok, seq_len, **shape)
        g_val = grounded_records(val_recs, index, o.grounded_fraction, o.seed + 1, tok, seq_len, **shape)
        if o.section_examples > 0:
            # The documents the Q&A pairs come from (FAQs) already teach through their pairs: the
            # sections teach the rest, the manuals, whose headings are not questions.
            with_pairs = {d for r in train_recs + val_recs if r["source"] for d in index.matching_docs(r["source"])}
            s_val, s_train = section_records(index, o.section_examples, o.seed, tok, seq_len,
                                             hide_heading=o.hide_headings, exclude_docs=with_pairs)
            g_train, g_val = g_train + s_train, g_val + s_val
            grounded["sections"] = len(s_train) + len(s_val)
        grounded.update(train=len(g_train), val=len(g_val), passages=len(index),
                        multi_turn=sum(len(e["messages"]) > 3 for e in g_train),
                        refusals=sum(e["missing"] for e in g_train), retrieval=getattr(index, "mode", "bm25"),
                        # Fitted only when asked for: 2 searches a Q&A pair, for nothing otherwise.
                        min_score=refusal_threshold(index, train_recs + val_recs) if o.score_threshold else None)
        if o.grounded_only:
            # Pairs answered from the documents are learned only with their passages in front
            # of them: the plain copy would teach reciting the manual from memory instead.
            def plain(recs: list[dict]) -> list[dict]:
                return [r for r in recs if not (r["source"] and index.matching_docs(r["source"]))]
            grounded["plain_dropped"] = len(train_recs) - len(plain(train_recs))
            train_recs, val_recs = plain(train_recs), plain(val_recs)
        train_recs, val_recs = train_recs + g_train, val_recs + g_val
    elif o.docs:
        raise ChatforgeError(f"none of the --docs paths exist: {', '.join(o.docs)}")
    elif o.section_examples > 0:
        raise ChatforgeError("--section-examples needs documents: give --docs or a data folder with report.json")

    train_ex, train_stats = tokenize_examples((r["messages"] for r in train_recs), tok, seq_len, o.truncate)
    val_ex, val_stats = tokenize_examples((r["messages"] for r in val_recs), tok, seq_len, o.truncate)
    if not val_ex:
        raise ChatforgeError(f"no validation example fits in {seq_len} tokens; raise --seq-len or check qa_val.jsonl")
    bucket = o.batch_size if o.packing == "bucket" else 0
    return (pack(train_ex, seq_len, tok.pad_id, train_stats, bucket),
            pack(val_ex, seq_len, tok.pad_id, val_stats, bucket), grounded, g_val)


def fit_refusal(model_dir: Path, examples: list[dict], budget: float) -> dict:
    """The refusal bias for the model saved in `model_dir`, fitted on held-out grounded
    `examples`: the smallest at which at most `budget` of those the context answers are refused
    (`infer.answer.fit_refusal_bias`). Also the shares refused before and after, of those and of the
    not-found examples (whose passages do not hold the answer)."""
    if budget >= 1 or not examples:
        return {"refusal_bias": 0.0, "budget": budget, "examples": len(examples)}
    model, tok = load_model(model_dir)
    model.eval()
    token = refusal_token(tok)
    margins = [(refusal_margin(model, tok, e["messages"][:-1], token), bool(e["missing"])) for e in examples]
    answerable = [m for m, missing in margins if not missing]
    unanswerable = [m for m, missing in margins if missing]
    bias = fit_refusal_bias(answerable, budget)
    share = (lambda xs, b: round(sum(m > b for m in xs) / len(xs), 4) if xs else None)
    return {"refusal_bias": bias, "budget": budget, "examples": len(examples),
            "answerable": len(answerable), "answerable_refused": {"before": share(answerable, 0.0),
                                                                  "after": share(answerable, bias)},
            "not_found": len(unanswerable), "not_found_refused": {"before": share(unanswerable, 0.0),
                                                                  "after": share(unanswerable, bias)}}


def reply_sample(model, tokenizer, messages: list[dict], max_new_tokens: int = 48) -> str:
    """The model's greedy reply to `messages` (the engine switches to eval; restore the mode)."""
    was_training = model.training
    prompt, _ = tokenizer.render_chat(messages, add_generation_prompt=True)
    limit = model.config.max_seq_len - max_new_tokens
    try:
        # The live model, not a bf16 copy: it changes every step (and an FSDP model cannot be copied).
        result = Engine(model, tokenizer, dtype=None).generate([prompt[-limit:]], GenerationConfig(max_new_tokens=max_new_tokens))
        return result[0].text or ""
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------------
# The stage


def steps_and_epoch(o: SFTConfig, batches_per_epoch: int, seq_len: int) -> tuple[int, int]:
    """(optimizer steps, steps an epoch). An epoch is a whole number of steps, so that validating
    "once an epoch" (--eval-every 0) falls at the end of each (`recipe.steps` rounds the run as a
    whole; the demo's figures were measured with this rounding)."""
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / o.accumulation(seq_len)))
    return o.steps or max(1, math.ceil(o.epochs * steps_per_epoch)), steps_per_epoch


def run_sft(base: str | Path, data: str | Path, out: str | Path | None = None, config: SFTConfig | None = None,
            **options: Any) -> dict:
    """Fine-tune `base` on the chat data in `data` into `out`; returns the report (also `OUT/sft.json`).

    `config` holds the options (default: `SFTConfig()`); `options` change some by their flat
    names (`method="lora"`, `lora_rank=8`, `steps=200`, ...)."""
    o = build(SFTConfig, {**(flatten(config) if config else {}), **options}, "sft")
    if not base:
        raise ChatforgeError("pass --base DIR: the model folder to fine-tune (the output of `chatforge pretrain`)")
    if not data:
        raise ChatforgeError("pass --data DIR: the folder written by `chatforge data build`")
    base, data = Path(base), Path(data)
    out = Path(out) if out else base.parent / "sft"

    model, tok = load_model(base)
    model.train()
    seq_len = o.seq_len or model.config.max_seq_len
    if not 16 <= seq_len <= MAX_SEQ_LEN:
        raise ChatforgeError(f"--seq-len must be between 16 and {MAX_SEQ_LEN}, got {seq_len}")
    if seq_len > model.config.max_seq_len:
        print(f"extending the model's context from {model.config.max_seq_len} to {seq_len} tokens")
        model.extend_context(seq_len)

    train_recs, val_recs = read_records(data, o.seed)
    train_rows, val_rows, grounded, held_out = build_rows(train_recs, val_recs, tok, seq_len, data, o)

    params = recipe.prepare(model, o.method, o.lora, o.seed)
    if o.method == "freeze":
        # the LM head trains too: with tied embeddings it is the embedding matrix (see the module docstring)
        params = recipe.freeze_below_top(model, o.freeze_top, keep=(model.lm_head,), least=1)
    source = PackedBatches(train_rows, o.batch_size, seed=o.seed)
    steps, steps_per_epoch = steps_and_epoch(o, source.batches_per_epoch, seq_len)
    lr = recipe.learning_rate(o, DEFAULT_LR, o.method)
    # Every bucket has its own length, and compiling each new shape cost more than it saved.
    compile = "off" if o.packing == "bucket" and o.compile == "auto" else None
    cfg = o.train_config(steps, seq_len, lr, o.eval_every or min(steps, steps_per_epoch), compile=compile)
    n_train = sum(p.numel() for p in params)
    print(f"sft ({o.method}): {train_rows.n_examples} train / {val_rows.n_examples} val examples "
          f"({grounded['train']} + {grounded['val']} grounded) in {len(train_rows)} + {len(val_rows)} rows "
          f"of up to {seq_len} tokens ({train_rows.stats['packing']}), padding {train_rows.padding_fraction:.1%}; "
          f"truncated {train_rows.stats['truncated']}, dropped {train_rows.stats['dropped']}; training "
          f"{n_train / 1e6:.2f}M of {model.num_params() / 1e6:.2f}M parameters for {steps} steps at lr {lr:g}")

    sample_messages = val_recs[0]["messages"]
    sample_messages = sample_messages[:max(i for i, m in enumerate(sample_messages) if m["role"] == "user") + 1]
    out.mkdir(parents=True, exist_ok=True)
    result = train(model, source, sft_loss, cfg, out, val_batches=eval_batches(val_rows, o.batch_size),
                   sample_fn=lambda m: reply_sample(m, tok, sample_messages), tokenizer=tok,
                   resume=o.resume, params=params, save_fn=recipe.save_fn(out, tok, base, o.method, o.lora_save))
    report = {
        "base": str(base), "data": str(data), "method": o.method, "steps": result.step, "lr": lr,
        "trainable_parameters": n_train, "parameters": model.num_params(),
        "train": train_rows.stats, "val": val_rows.stats, "grounded": grounded,
        "val_loss": result.val_loss, "best_val_loss": result.best_val_loss,
        "best_val_ppl": math.exp(min(result.best_val_loss, 50)) if result.best_val_loss is not None else None,
        "seconds": round(result.seconds, 1), "interrupted": result.interrupted,
        **recipe.lora_report(o.method, o.lora),
    }
    if o.method == "lora":
        report["lora"]["lora_save"] = o.lora_save
    if o.method == "freeze":
        report["freeze_top"] = o.freeze_top
    # Fitted on the saved (best) model, which is what chat, serve and eval load.
    report["refusal"] = fit_refusal(out, held_out, o.refusal_budget)
    files.write_json(out / "sft.json", report)
    # The settings the model was trained for, which chat, serve and eval read (`infer.answer`).
    threshold = (grounded.get("min_score") or {}).get("min_score", 0.0) if o.score_threshold else 0.0
    AnswerSettings(context_tokens=o.context_tokens or DEFAULT_CONTEXT_TOKENS, min_score=threshold,
                   retrieval=grounded.get("retrieval") or "bm25",
                   refusal_bias=report["refusal"]["refusal_bias"]).save(out)
    fit = report["refusal"]
    if fit.get("answerable"):
        print(f"refusal bias {fit['refusal_bias']:.2f} (budget {fit['budget']:.0%}): held-out grounded examples "
              f"the context answers refused {fit['answerable_refused']['before']:.1%} -> "
              f"{fit['answerable_refused']['after']:.1%} of {fit['answerable']}, not-found ones "
              + (f"{fit['not_found_refused']['before']:.1%} -> {fit['not_found_refused']['after']:.1%} "
                 f"of {fit['not_found']}" if fit["not_found"] else "none held out"))
    if result.best_val_loss is not None:
        print(f"validation loss {result.best_val_loss:.4f} (perplexity {report['best_val_ppl']:.2f}) -> {out}")
    return report
