"""`chatforge prefs make`: preference pairs generated from the company's own Q&A.

    chatforge prefs make --model runs/demo/sft --data runs/demo/data --docs DOCS... --out runs/demo/prefs.jsonl
    chatforge prefs make ... --max-questions 200 --kinds model,wrong_passage,invented --context-tokens 512
    chatforge prefs make ... --skip-voted runs/demo/feedback-data/preferences.jsonl

Before users have voted, the Q&A pairs of the data folder (`DATA/qa_train.jsonl`) already say
what a good reply is. This command turns them into pairs for `chatforge reward train` and
`chatforge dpo`, in the grounded prompt format `chatforge sft` trains on and `chat` / `serve` use
(`retrieval/`). For each question whose source is among `--docs` (a seeded
`--max-questions` sample; those in `--skip-voted`, pairs users already made, left out):

- a seeded `--missing-fraction` are asked with the answer's documents left out: the prompt holds
  `--k` passages of other documents only, as SFT's "missing" examples do. Kind `invented`:
  chosen = "I could not find that in the documentation I have. ..." (SFT's refusal), rejected =
  the model's own answer when it answers anyway (an invented answer, `origin: "model"`), else the
  reference answer's opening sentences cited from the first passage shown (a confident answer
  the context does not hold, `origin: "reference"`).
- the others get SFT's grounded prompt (the question's retrieved passages, the answer's among
  them) and chosen = the reference answer with its citation, "ANSWER (source: NAME)", built
  exactly as `chatforge sft` builds its grounded examples (`grounded_sft_examples`). Then
  kind `model`: rejected = the model's own greedy answer to that prompt, when it is worse: its
  ROUGE-L F1 against the reference (citations removed, stemmed, as `chatforge eval` scores) is
  below `--max-rouge`. It may run to 1.5 times the reference's tokens plus 16 (at most
  `--max-new-tokens`); an answer that does not end by then is skipped (a cut-off answer is not a
  reply the model gives);
  kind `wrong_passage`: rejected = an answer built from the best-ranked passage of the context
  that is not the answer's: its opening sentences, about as many words as the reference (so that
  length does not tell the two apart), cited with that passage's name; kept when its ROUGE-L
  against the reference is below `--max-rouge`.

Generation goes through the engine (greedy, batches of similar prompt length, bf16 weights
where the CPU computes them natively). Deterministic: the same model, data, documents and
options give the same file. Output: one pair a line in TRL's conversational format with an
explicit prompt (what `chatforge feedback export` writes), plus `kind`, `source` (the answer's
document), `origin` (invented pairs) and `rouge_l` (the rejected reply against the reference).
The counts are printed and written to OUT with the suffix `.report.json`.

Options: `PrefsConfig`; from Python, `make_preferences(model, data, docs, out, kinds=["model"], ...)`
with the flags' names. The command is `chatforge.commands.prefs`.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from rouge_score import rouge_scorer
from tqdm import tqdm

from chatforge import files
from chatforge.data.chat_data import read_chat_records
from chatforge.data.feedback import normalize_question
from chatforge.data.prefs import Preference, read_preferences, write_preferences
from chatforge.data.tokenizer import ChatTokenizer
from chatforge.errors import ChatforgeError
from chatforge.infer.answer import is_refusal
from chatforge.infer.engine import Engine, GenerationConfig
from chatforge.model.folder import load_model
from chatforge.options import build, flatten, group, option
from chatforge.retrieval import DEFAULT_CONTEXT_TOKENS, NOT_FOUND_REPLY, cite, strip_citation
from chatforge.retrieval.examples import grounded_sft_examples
from chatforge.retrieval.fusion import RetrievalOptions, load_retriever
from chatforge.train.sft import document_paths

KINDS = ("model", "wrong_passage", "invented")
MAX_REFERENCE_WORDS = 120       # an invented answer made from the reference: its opening sentences
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


# ---------------------------------------------------------------------------------------------
# Options


@dataclass
class PrefsConfig:
    """`chatforge prefs make`'s options (besides its inputs: the model, data, documents and output)."""
    kinds: str = option(",".join(KINDS), "which pairs to make: model (the model's worse answer), wrong_passage (an "
                                         "answer from another passage), invented (an answer where the documents "
                                         "hold none)")
    max_questions: int = option(0, "use a seeded sample of this many questions (0 = all)")
    missing_fraction: float = option(0.2, "share of the questions asked without their documents (invented pairs)")
    max_rouge: float = option(0.5, "a rejected reply must score below this ROUGE-L against the reference")
    max_new_tokens: int = option(384, "longest model answer (a question's own limit is 1.5x its reference + 16); "
                                      "longer ones are skipped")
    batch_size: int = option(8, "prompts generated together")
    k: int = option(3, "passages in each prompt")
    context_tokens: int | None = option(None, "most tokens of passages in a prompt (default: retrieval's, 320; use "
                                              "SFT's value)")
    skip_voted: str | None = option(None, "preferences.jsonl from `chatforge feedback export`: its questions are "
                                          "left out")
    seed: int = option(0, "seed of the question sample and the prompts")
    retriever: RetrievalOptions = group(RetrievalOptions)

    def __post_init__(self) -> None:
        if not isinstance(self.kinds, str):      # Python callers may give a list
            self.kinds = ",".join(self.kinds)
        if not self.kind_list() or any(kind not in KINDS for kind in self.kind_list()):
            raise ChatforgeError(f"--kinds must be a comma-separated subset of {','.join(KINDS)}, got {self.kinds}")
        if not 0 <= self.missing_fraction <= 1 or not 0 < self.max_rouge <= 1:
            raise ChatforgeError("--missing-fraction must be in [0, 1] and --max-rouge in (0, 1]")
        if self.max_questions < 0 or self.batch_size < 1 or self.k < 1 or self.max_new_tokens < 1:
            raise ChatforgeError("--max-questions must be >= 0; --batch-size, --k and --max-new-tokens >= 1")

    def kind_list(self) -> tuple[str, ...]:
        return tuple(k.strip() for k in self.kinds.split(",") if k.strip())


# ---------------------------------------------------------------------------------------------
# Small pieces


def rouge_l(hyp: str, ref: str) -> float:
    """ROUGE-L F1 (stemmed), as `chatforge eval` scores answers."""
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(ref, hyp)["rougeL"].fmeasure


def opening_sentences(text: str, words: int) -> str:
    """`text` up to the first sentence end after at least `words` words (all of it if there is none),
    its own line breaks kept."""
    for m in _SENTENCE_END.finditer(text):
        if len(text[:m.start()].split()) >= words:
            return text[:m.start()].strip()
    return text.strip()


def as_written(shown: str, passages: Sequence) -> str:
    """The passage text a prompt shows (whitespace collapsed, perhaps cut) as its document writes
    it, with its line breaks: the same words, taken from the first of `passages` that starts with them."""
    words = shown.split()
    for p in passages:
        original = p.text.split()
        if original[:len(words)] == words:
            spans = list(re.finditer(r"\S+", p.text))
            return p.text[:spans[len(words) - 1].end()] if words else ""
    return shown


def shown_passages(user_content: str, sources: set[str]) -> list[tuple[str, str]]:
    """(source, text) of each passage a grounded prompt shows, in order; a cut passage without its
    "...". `sources` are the index's names, which tell where a name ends and the text starts."""
    out = []
    for line in user_content.split("\n"):
        m = re.match(r"\[\d+\] \(source: ", line)
        if not m:
            continue
        rest = line[m.end():]
        for cut in (i for i in range(len(rest)) if rest.startswith(") ", i)):
            if rest[:cut] in sources:
                text = rest[cut + 2:]
                out.append((rest[:cut], text[:-3] if text.endswith("...") else text))
                break
    return out


def citation_of(reply: str) -> str:
    """NAME of a reply ending in "(source: NAME)"."""
    return reply.rsplit(" (source: ", 1)[1][:-1]


def generate_replies(model, tokenizer, conversations: Sequence[list[dict]], budgets: Sequence[int],
                     batch_size: int) -> list[tuple[str, bool]]:
    """(reply text, finished) of greedy answers, in input order; `finished` is false when the reply
    did not end within its own budget of new tokens. Prompts go in batches of similar budget and
    length, each batch generating up to its largest budget."""
    engine = Engine(model, tokenizer)
    prompts = [tokenizer.render_chat(c, add_generation_prompt=True)[0] for c in conversations]
    order = sorted(range(len(prompts)), key=lambda i: (budgets[i], len(prompts[i]), i))
    out: list[tuple[str, bool]] = [("", False)] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc="model answers", unit="batch", disable=None):
        rows = order[start:start + batch_size]
        cfg = GenerationConfig(strategy="greedy", max_new_tokens=max(budgets[i] for i in rows), truncate_prompt=True)
        for i, result in zip(rows, engine.generate([prompts[i] for i in rows], cfg)):
            finished = result.finish_reason == "stop" and len(result.tokens) <= budgets[i]
            out[i] = ((result.text or "").strip(), finished)
    return out


# ---------------------------------------------------------------------------------------------
# Making the pairs


def _question(record: dict) -> str:
    return next(m["content"] for m in reversed(record["messages"]) if m["role"] == "user")


def _answer(record: dict) -> str:
    return next(m["content"] for m in reversed(record["messages"]) if m["role"] == "assistant")


def make_preferences(model_dir: str | Path | None, data: str | Path | None, docs: Sequence[str] | None,
                     out: str | Path | None = None, config: PrefsConfig | None = None, **options: Any) -> dict:
    """Write generated preference pairs to `out` (default: prefs.jsonl beside the data folder; see
    the module docstring); returns the counts, with `out`. `config` holds the options (default:
    `PrefsConfig()`); `options` change some by their flat names (`kinds="model"`, `seed=1`, ...)."""
    o = build(PrefsConfig, {**(flatten(config) if config else {}), **options}, "prefs make")
    started = time.time()
    if not data:
        raise ChatforgeError("pass --data DIR: the folder written by `chatforge data build`")
    out = Path(out) if out else Path(data).parent / "prefs.jsonl"
    kinds, max_questions, missing_fraction, max_rouge = o.kind_list(), o.max_questions, o.missing_fraction, o.max_rouge
    max_new_tokens, batch_size, k, seed = o.max_new_tokens, o.batch_size, o.k, o.seed
    generate = "model" in kinds or "invented" in kinds
    if generate and not model_dir:
        raise ChatforgeError("pass --model DIR (the model whose answers become rejected replies), "
                             "or --kinds wrong_passage, which needs no model")
    data = Path(data)
    if not (data / "qa_train.jsonl").is_file():
        raise ChatforgeError(f"{data}/qa_train.jsonl does not exist; pass --data, a folder from `chatforge data build`")
    doc_paths = document_paths(data, docs)
    if not doc_paths:
        raise ChatforgeError("no documents to ground the answers in: pass --docs FILES_OR_FOLDERS "
                             "(or a --data folder whose report.json lists its inputs)")
    index = load_retriever(doc_paths, mode=o.retriever.retrieval, model=o.retriever.embedding_model)
    by_source: dict[str, list] = {}
    for passage in index.passages:
        by_source.setdefault(passage.source, []).append(passage)
    sources = set(by_source)
    model = tok = None
    if generate:
        model, tok = load_model(model_dir)
    else:
        tok = ChatTokenizer.load(model_dir) if model_dir else None
    budget = o.context_tokens or DEFAULT_CONTEXT_TOKENS
    if model is not None:   # room for the question, the template and the answer within the context
        budget = max(64, min(budget, model.config.max_seq_len - max_new_tokens - 96))

    voted = set()
    if o.skip_voted:
        voted = {normalize_question(p.question) for p in read_preferences(o.skip_voted)}
    counts = {"questions": 0, "answerable": 0, "not_in_documents": 0, "pairs": {kind: 0 for kind in kinds},
              "skipped": {"voted": 0, "no_grounded_example": 0}}
    usable = []
    for rec in read_chat_records(data / "qa_train.jsonl"):
        if not rec["source"] or not index.matching_docs(rec["source"]) or not _answer(rec).strip():
            continue
        if normalize_question(_question(rec)) in voted:
            counts["skipped"]["voted"] += 1
            continue
        usable.append(rec)
    rng = random.Random(seed)
    chosen_ids = list(range(len(usable)))
    if max_questions and max_questions < len(usable):
        chosen_ids = sorted(rng.sample(chosen_ids, max_questions))
    missing = set(rng.sample(chosen_ids, round(missing_fraction * len(chosen_ids)))) if "invented" in kinds else set()
    counts["questions"] = len(chosen_ids)

    # The prompts (and chosen replies): SFT's grounded examples, one question at a time (seeded by its number).
    items = []   # (record, prompt messages, chosen reply, is missing)
    for i in chosen_ids:
        rec, gone = usable[i], i in missing
        if not gone and not {"model", "wrong_passage"} & set(kinds):
            continue
        ex = grounded_sft_examples([rec], index, k=k, missing_fraction=1.0 if gone else 0.0, seed=seed + i,
                                   max_context_tokens=budget, tokenizer=tok)
        if not ex:
            counts["skipped"]["no_grounded_example"] += 1
            continue
        counts["not_in_documents" if gone else "answerable"] += 1
        items.append((rec, ex[0]["messages"][:-1], ex[0]["messages"][-1]["content"], gone, ex[0]["source"]))

    # The model may write up to 1.5 times the reference's tokens (a reply that runs on past that is
    # cut off, and a cut reply is not one the model gives), at most --max-new-tokens.
    wanted = [j for j, item in enumerate(items) if (item[3] and "invented" in kinds) or (not item[3] and "model" in kinds)]
    budgets = [max_new_tokens if items[j][3] else min(max_new_tokens, len(tok.encode(items[j][2])) * 3 // 2 + 16)
               for j in wanted]
    answers: dict[int, tuple[str, bool]] = {}
    if wanted:
        answers = dict(zip(wanted, generate_replies(model, tok, [items[j][1] for j in wanted], budgets, batch_size)))

    def skip(reason: str) -> None:
        counts["skipped"][reason] = counts["skipped"].get(reason, 0) + 1

    prefs: list[Preference] = []
    for j, (rec, prompt, chosen, gone, doc) in enumerate(items):
        reference = _answer(rec)
        if gone:
            answer, finished = answers.get(j, ("", False))
            if answer and finished and not is_refusal(answer):
                rejected, origin = answer, "model"
            else:
                shown = shown_passages(prompt[-1]["content"], sources)
                if not shown:
                    skip("invented_no_passage_shown")
                    continue
                rejected, origin = cite(opening_sentences(reference, MAX_REFERENCE_WORDS), shown[0][0]), "reference"
            prefs.append(Preference(prompt, NOT_FOUND_REPLY, rejected,
                                    {"kind": "invented", "origin": origin, "source": doc}))
            counts.setdefault("invented_origin", {}).setdefault(origin, 0)
            counts["invented_origin"][origin] += 1
            continue
        gold_answer = strip_citation(chosen)
        if "model" in kinds:
            answer, finished = answers[j]
            if not answer:
                skip("model_empty")
            elif not finished:
                skip("model_unfinished")
            else:
                score = rouge_l(strip_citation(answer), gold_answer)
                if score < max_rouge:
                    prefs.append(Preference(prompt, chosen, answer, {"kind": "model", "source": doc,
                                                                      "rouge_l": round(score, 4)}))
                else:
                    skip("model_close_to_reference")
        if "wrong_passage" in kinds:
            gold = citation_of(chosen)
            wrong = [(s, t) for s, t in shown_passages(prompt[-1]["content"], sources) if s != gold and t.strip()]
            if not wrong:
                skip("no_wrong_passage_shown")
                continue
            reply = opening_sentences(as_written(wrong[0][1], by_source[wrong[0][0]]), len(gold_answer.split()))
            score = rouge_l(reply, gold_answer)
            if score < max_rouge:
                prefs.append(Preference(prompt, chosen, cite(reply, wrong[0][0]),
                                        {"kind": "wrong_passage", "source": doc, "rouge_l": round(score, 4)}))
            else:
                skip("wrong_passage_close_to_reference")
    for p in prefs:
        counts["pairs"][p.meta["kind"]] += 1
    counts["pairs"]["total"] = len(prefs)
    if not prefs:
        raise ChatforgeError(f"no preference pair could be made from {len(chosen_ids)} questions "
                             f"(skipped: {counts['skipped']}); give more Q&A or documents, or raise --max-rouge")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_preferences(out, prefs)
    counts["seconds"] = round(time.time() - started, 1)
    counts["options"] = {"model": str(model_dir) if model_dir else None, "data": str(data),
                         "docs": [str(p) for p in doc_paths], "kinds": list(kinds), "max_questions": max_questions,
                         "missing_fraction": missing_fraction, "max_rouge": max_rouge, "max_new_tokens": max_new_tokens,
                         "k": k, "context_tokens": budget, "seed": seed}
    files.write_json(out.with_name(out.name + ".report.json"), counts)
    return {**counts, "out": str(out)}
