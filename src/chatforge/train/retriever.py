"""`chatforge retriever train`: fine-tune the embedding model on the company's own Q&A.

    chatforge retriever train --data runs/demo/data --out runs/demo/retriever
    chatforge retriever train --data runs/demo/data --docs examples/my_docs --steps 200 \\
        --questions evalsets/customer-company.jsonl --eval-docs examples/my_docs
    chatforge chat --model runs/demo/sft --docs examples/my_docs --retrieval dense \\
        --embedding-model runs/demo/retriever
    chatforge retriever train --data runs/demo/data --feedback runs/demo/rounds/1/feedback/sft.jsonl
    run_retriever("runs/demo/data", "runs/demo/retriever", docs=["examples/my_docs"], steps=200)   # Python

Every FAQ is a ready set of (question, answer passage) pairs: `DATA/qa_train.jsonl`'s questions
whose `source` is among the documents, each with its gold passage (the passage of its document
closest to question + answer, as grounded SFT examples pick it). The encoder
(`retrieval.embed.BertEncoder`, all-MiniLM-L6-v2 by default) learns to put a question next to
its passage with the in-batch-negatives loss (each question's passage against every other
passage of the batch: cross-entropy over scaled cosines, as sentence-transformers'
MultipleNegativesRankingLoss) plus `--hard-negatives` BM25 negatives per question: BM25's best
passages for the question that are not its gold passage nor a passage of the same section,
the near misses a word-based search makes. The shared loop (`train/loop.py`) runs it.

Corrected answers (`--feedback`, the sft.jsonl `chatforge feedback export` writes, as the
continual-learning round passes it): such a record names no source, so its gold passage is the
passage of all indexed documents its answer was copied from (`copied_passage`: among BM25's 10
best for question + answer, the one holding the most of the answer's word 4-grams, at least
half of them). A correction in the user's own words teaches the retriever nothing and is left
out, as are follow-ups (their last turn alone does not say what they are about). The question
is the user's own turn, taken out of the grounded prompt the server stored. All of these pairs
are trained on; their hit@k before and after is reported as "feedback (trained on)", never as a
held-out figure.

Held out: `DATA/qa_val.jsonl` is never read for training, and `--val-fraction` of the training
pairs (by question) is kept for the validation loss. Before and after: hit@1 / hit@3 of dense
and hybrid retrieval (BM25 beside) with the base model and with the trained one, on qa_val against `--docs` and on each
`--questions` file against `--eval-docs` (the hand-written sets in evalsets/), in
`OUT/retriever.json` and printed. The output folder is an embedding model folder
(safetensors, the base's tokenizer and pooling files, LICENSE/NOTICE): `--embedding-model OUT`.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.nn import functional as F

from chatforge import files
from chatforge.data.chat_data import read_chat_records
from chatforge.errors import ChatforgeError
from chatforge.options import build, flatten, option
from chatforge.retrieval import strip_citation
from chatforge.retrieval.dense import DenseIndex, cache_folder
from chatforge.retrieval.embed import PAD_MULTIPLE, Embedder, passage_text
from chatforge.retrieval.fusion import Retriever
from chatforge.retrieval.hits import load_questions, retrieval_hits
from chatforge.retrieval.index import PassageIndex, _resolved, default_cache_dir
from chatforge.retrieval.prompt import prompt_question
from chatforge.train.loop import TrainConfig, train
from chatforge.train.sft import document_paths

SCALE = 20.0          # cosine x 20 as logits (sentence-transformers' default for this loss)
# A feedback answer (no `source`) teaches the retriever only when it was copied from a passage:
# at least half of its word 4-grams in one passage. `infer.answer.copied_from` accepts a third
# to pick a citation among the three passages a prompt showed; here the passage is picked among
# all documents and then trained on, so a wrong pick costs more and the bar is higher: half
# means most of the answer is the passage's own words (a correction pasted from the manual,
# maybe with a sentence of its own), while an answer merely on the same topic shares few.
MIN_COPIED_SHARE = 0.5
CANDIDATES = 10       # BM25's best passages for question + answer among which the copied one is sought


def _fold(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def _grams(text: str, n: int = 4) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def _copied_share(answer_grams: set, passage_text: str) -> float:
    return len(answer_grams & _grams(passage_text)) / len(answer_grams) if answer_grams else 0.0


def _question_and_answer(record: dict) -> tuple[str, str, bool]:
    """(question, answer, is a follow-up) of a chat record: the last user turn (the question alone
    when it is a grounded prompt, as the server stores it) and the last assistant turn."""
    msgs = [m for m in record.get("messages") or [] if isinstance(m, dict) and isinstance(m.get("content"), str)]
    users = [m["content"] for m in msgs if m.get("role") == "user"]
    answers = [m["content"] for m in msgs if m.get("role") == "assistant"]
    if not users or not answers:
        return "", "", False
    if "source" in record:      # a data folder's Q&A pair: its first turns, as before
        return users[0], answers[0], False
    return prompt_question(users[-1]), strip_citation(answers[-1]), len(users) > 1


def copied_passage(index: Any, question: str, answer: str, min_share: float = MIN_COPIED_SHARE) -> Any | None:
    """The passage of all `index`'s documents an answer was copied from: among BM25's best
    CANDIDATES for question + answer (as grounded SFT examples pick a gold passage, over every
    document since feedback names none), the one holding the largest share of the answer's word
    4-grams, when that share is at least `min_share`; else None."""
    grams = _grams(answer)
    if not grams:
        return None
    best, share = None, 0.0
    for p in index.search(f"{question}\n{answer}", CANDIDATES):
        s = _copied_share(grams, p.text)
        if s > share:
            best, share = p, s
    return best if share >= min_share else None


def training_pairs(records: Sequence[dict], index: Any, hard_negatives: int = 1) -> list[dict]:
    """(question, positive passage text, [hard negative texts]) for every usable record.

    A record with a `source` (a data folder's Q&A pair) is usable when the source is among the
    indexed documents: its gold passage is the passage of those documents closest to question +
    answer. A record without one (the round's corrected or up-voted replies, `feedback export`'s
    sft.jsonl: the user turn may be the grounded prompt the server showed) is usable when its
    answer was copied from a passage (`copied_passage`): a correction that copies no passage
    teaches the retriever nothing, and a guessed gold passage would teach it wrongly. A follow-up
    ("and how do I undo that?") is left out: its last turn alone does not say what it is about."""
    out = []
    for r in records:
        q, a, follow_up = _question_and_answer(r)
        if not (q.strip() and a.strip()) or follow_up:
            continue
        if "source" in r:
            docs = index.matching_docs(r["source"]) if r.get("source") else []
            gold = index.best_in_docs(docs, f"{q}\n{a}") if docs else None
        else:
            gold = copied_passage(index, q, a)
        if gold is None:
            continue
        negs = []
        for p in index.search(q, 10 + hard_negatives):
            if len(negs) >= hard_negatives:
                break
            if p.id != gold.id and (p.doc, p.section) != (gold.doc, gold.section) and p.text != gold.text:
                negs.append(passage_text(p.heading, p.text))
        if len(negs) == hard_negatives:
            # A FAQ entry's heading is its question: left in, the pair teaches only to match a
            # question with itself. The answer text must carry the match.
            heading = gold.title if _fold(gold.section) == _fold(q) else gold.heading
            out.append({"question": q, "positive": passage_text(heading, gold.text), "negatives": negs,
                        "passage": gold.id, "source": gold.source})
    return out


class PairBatches:
    """The loop's batch source: `batch_size` pairs a micro-batch, reshuffled (seeded) each epoch;
    no two pairs of a batch share a gold passage (it would be a false in-batch negative)."""

    def __init__(self, pairs: list[dict], embedder: Any, batch_size: int, seed: int):
        self.pairs, self.embedder, self.batch_size, self.seed = pairs, embedder, batch_size, seed
        self.epoch, self.pos = 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        order = list(range(len(self.pairs)))
        random.Random(self.seed * 1000 + self.epoch).shuffle(order)
        return order

    def next_batch(self) -> dict:
        rows: list[int] = []
        seen: set[int] = set()
        while len(rows) < self.batch_size:
            if self.pos >= len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._shuffle()
                if rows:
                    break
            i = self._order[self.pos]
            self.pos += 1
            if self.pairs[i]["passage"] not in seen:
                rows.append(i)
                seen.add(self.pairs[i]["passage"])
        return make_batch([self.pairs[i] for i in rows], self.embedder)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._shuffle()


def make_batch(pairs: Sequence[dict], embedder: Any) -> dict:
    """Tensors of B questions and their B positives followed by the B x h hard negatives, padded
    to multiples of PAD_MULTIPLE (few shapes: oneDNN keeps kernels per shape)."""
    q_ids, q_mask = embedder.batch(embedder.token_ids([p["question"] for p in pairs]), PAD_MULTIPLE)
    texts = [p["positive"] for p in pairs] + [n for p in pairs for n in p["negatives"]]
    p_ids, p_mask = embedder.batch(embedder.token_ids(texts), PAD_MULTIPLE)
    return {"q_ids": q_ids, "q_mask": q_mask, "p_ids": p_ids, "p_mask": p_mask}


def contrastive_loss(model: Any, batch: dict) -> tuple:
    """In-batch negatives: question i's passage is column i among all the batch's passages
    (positives, then hard negatives); cross-entropy over SCALE x cosine. Also the share of
    questions whose own passage scores highest (`acc`)."""
    q = model.embed(batch["q_ids"], batch["q_mask"])                      # (B, C)
    p = model.embed(batch["p_ids"], batch["p_mask"])                      # (B + B h, C)
    logits = SCALE * q @ p.T                                              # (B, B + B h)
    labels = torch.arange(len(q), device=q.device)
    loss = F.cross_entropy(logits.float(), labels)
    acc = (logits.argmax(-1) == labels).float().mean()
    return loss, len(q), {"acc": acc}


def dense_hits(embedder: Any, docs: Sequence[Path], questions: Sequence[dict], cache_dir: Any = None) -> dict:
    """hit@1/hit@3 of BM25, dense and hybrid retrieval with `embedder` over `docs` (vectors cached
    as usual)."""
    index = PassageIndex.load_or_build(docs, cache_dir)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    dense = DenseIndex.load_or_build(index.passages, embedder, cache_folder(root, _resolved(docs)), _resolved(docs))
    return retrieval_hits(Retriever(index, dense, "dense"), questions, ("bm25", "dense", "hybrid"))


def _load_sets(data: Path, docs: Sequence[Path], questions: Sequence[str], eval_docs: Sequence[str]) -> dict:
    """{name: (docs, questions)}: qa_val against the training documents, then each --questions file."""
    sets: dict[str, tuple] = {}
    if (data / "qa_val.jsonl").is_file():
        sets["qa_val"] = (list(docs), load_questions(data / "qa_val.jsonl"))
    for q in questions:
        sets[Path(q).stem] = ([Path(d) for d in eval_docs] or list(docs), load_questions(q))
    return sets


@dataclass
class RetrieverConfig:
    """`chatforge retriever train`'s options besides --data and --out. Its own loop settings
    (AdamW with beta2 0.999, 10% warm-up, fp32 on CPU), not `LoopOptions`: an embedding model
    fine-tunes with a few hundred small steps."""
    docs: list[str] | None = option(None, "documents holding the answers (default: the inputs the data folder's "
                                          "report.json lists)")
    base: str | None = option(None, "embedding model to start from: a folder or a fetched source (default "
                                    "all-minilm-l6-v2)")
    steps: int = option(300, "optimizer steps")
    batch_size: int = option(32, "questions a step (each one's passage is the others' negative)")
    lr: float = option(2e-5, "peak learning rate")
    hard_negatives: int = option(1, "BM25 hard negatives per question")
    max_tokens: int = option(128, "tokens of a passage seen in training")
    val_fraction: float = option(0.1, "share of the training questions held out for validation loss")
    feedback: list[str] = option([], "corrected and up-voted replies to train on too (sft.jsonl of `chatforge "
                                     "feedback export`): each answer copied from a passage teaches its question -> "
                                     "that passage", metavar="FILE.jsonl")
    questions: list[str] = option([], "more question files scored before and after (evalsets/*.jsonl)")
    eval_docs: list[str] = option([], "documents for --questions (default: --docs)")
    index_cache: str | None = option(None, "where passage indexes and vectors are cached")
    threads: int = option(2, "CPU threads")
    seed: int = option(0, "seed of the held-out split and the batches")

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 2 or self.hard_negatives < 0 or not 0 <= self.val_fraction < 1:
            raise ChatforgeError("--steps >= 1, --batch-size >= 2, --hard-negatives >= 0, --val-fraction in [0, 1)")


def run_retriever(data: str | Path, out: str | Path | None = None, config: RetrieverConfig | None = None,
                  **options: Any) -> dict:
    """Fine-tune the embedding model `base` on `data`'s Q&A over `docs`, plus the corrected and
    up-voted replies of the `feedback` files (sft.jsonl of `chatforge feedback export`), into
    `out` (default: a `retriever` folder beside `data`); returns the report (also
    `OUT/retriever.json`). `config` holds the options (default: `RetrieverConfig()`); `options`
    change some by their flat names (`docs=[...]`, `steps=200`, ...)."""
    o = build(RetrieverConfig, {**(flatten(config) if config else {}), **options}, "retriever train")
    if not data:
        raise ChatforgeError("pass --data DIR: the folder written by `chatforge data build`")
    data = Path(data)
    out = Path(out) if out else data.parent / "retriever"
    if not (data / "qa_train.jsonl").is_file():
        raise ChatforgeError(f"{data}/qa_train.jsonl does not exist; pass --data, a folder from `chatforge data build`")
    torch.set_num_threads(max(1, o.threads))
    doc_paths = document_paths(data, list(o.docs) if o.docs else None)
    if not doc_paths:
        raise ChatforgeError("no documents: pass --docs (or a --data folder whose report.json lists its inputs)")
    index = PassageIndex.load_or_build(doc_paths, o.index_cache)
    records = read_chat_records(data / "qa_train.jsonl")
    pairs = training_pairs(records, index, o.hard_negatives)
    if len(pairs) < 4:
        raise ChatforgeError(f"only {len(pairs)} training pairs: qa_train.jsonl needs questions whose source is "
                             "among --docs")
    fed: list[dict] = []
    fed_records = 0
    for path in o.feedback:
        if not Path(path).is_file():
            raise ChatforgeError(f"--feedback {path} does not exist: give sft.jsonl of `chatforge feedback export`")
        rows = [{k: v for k, v in r.items() if k != "source"} for r in read_chat_records(path)]
        fed_records += len(rows)
        fed += training_pairs(rows, index, o.hard_negatives)
    # Held out by question: a question (asked twice in a FAQ) is on one side only.
    questions_seen = sorted({p["question"] for p in pairs})
    random.Random(o.seed).shuffle(questions_seen)
    held = set(questions_seen[:int(len(questions_seen) * o.val_fraction)])
    train_pairs = [p for p in pairs if p["question"] not in held] + fed   # feedback: all trained on
    val_pairs = [p for p in pairs if p["question"] in held]

    before_model = Embedder.load(o.base)
    sets = _load_sets(data, doc_paths, o.questions, o.eval_docs)
    if fed:     # trained on, so not held out: shows what the feedback taught, never decides
        sets["feedback (trained on)"] = (doc_paths, [{"question": p["question"], "source": p["source"]} for p in fed])
    report: dict[str, Any] = {"base": str(before_model.folder), "pairs": len(train_pairs), "val_pairs": len(val_pairs),
                              "feedback": {"records": fed_records, "pairs": len(fed)},
                              "documents": [str(p) for p in doc_paths], "out": str(out), "before": {}, "after": {}}
    for name, (d, qs) in sets.items():
        report["before"][name] = dense_hits(before_model, d, qs, o.index_cache)

    embedder = Embedder.load(o.base, max_tokens=o.max_tokens, precision="fp32")
    source = PairBatches(train_pairs, embedder, o.batch_size, o.seed)
    val = [make_batch(val_pairs[i:i + o.batch_size], embedder) for i in range(0, len(val_pairs), o.batch_size)]
    cfg = TrainConfig(max_steps=o.steps, lr=o.lr, warmup_steps=max(1, o.steps // 10), weight_decay=0.01,
                      batch_size=o.batch_size, seq_len=o.max_tokens, eval_every=max(1, o.steps // 3),
                      log_every=max(1, o.steps // 20), precision="fp32", compile="off", device="cpu", seed=o.seed,
                      beta2=0.999, min_lr_ratio=0.0)

    def save(folder: Path, model: Any, state: dict) -> None:
        # Into the loop's folder (the top of OUT, or last/), beside what the loop writes there.
        Embedder(model, embedder.tokenizer, before_model.folder).save_files(folder, state)

    result = train(embedder.encoder, source, contrastive_loss, cfg, out, val_batches=val or None, save_fn=save)
    after_model = Embedder.load(out)
    for name, (d, qs) in sets.items():
        report["after"][name] = dense_hits(after_model, d, qs, o.index_cache)
    report.update(steps=result.step, seconds=round(result.seconds, 1), val_loss=result.best_val_loss)
    files.write_json(out / "retriever.json", report)
    return report


def report_text(report: dict) -> str:
    """Dense hit@1/hit@3 before and after, hybrid hit@3 before -> after, BM25 beside."""
    lines = [f"{'set':<24}{'bm25 hit@3':>12}{'dense before hit@1':>20}{'hit@3':>8}{'after hit@1':>13}{'hit@3':>8}"
             f"{'hybrid hit@3':>16}"]

    def f(x: Any) -> str:
        return "-" if x is None else f"{x:.3f}"

    for name, b in report["before"].items():
        a = report["after"][name]
        hybrid = f"{f(b['hybrid']['hit@3'])} -> {f(a['hybrid']['hit@3'])}" if "hybrid" in b else "-"
        lines.append(f"{name:<24}{f(b['bm25']['hit@3']):>12}{f(b['dense']['hit@1']):>20}{f(b['dense']['hit@3']):>8}"
                     f"{f(a['dense']['hit@1']):>13}{f(a['dense']['hit@3']):>8}{hybrid:>16}")
    return "\n".join(lines)
