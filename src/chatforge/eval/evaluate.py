"""`chatforge eval`: perplexity, BLEU, ROUGE and retrieval hit-rate of a model, with an HTML report.

    chatforge eval --model runs/demo/sft --data runs/demo/data --docs examples/my_docs --out runs/demo/eval

What it measures
- perplexity on the validation split: the data folder's token shards made with this model's
  tokenizer (`DATA/tokens-<hash>/val.bin`) when present, else `DATA/val.jsonl` tokenized here.
- for each question (`--questions FILE.jsonl`, default `DATA/qa_val.jsonl`; lines are
  `{"question", "answer"[, "source"]}` or `{"messages": [...][, "source"]}`, where the last
  assistant message is the reference and earlier turns are history): a greedy answer,
  continuously batched through the server's scheduler, grounded in the top `--k` passages of
  `--docs` (the prompt format of `chatforge.retrieval`) and decoded with the model's answer
  settings (its refusal bias included), scored with BLEU and ROUGE-1/2/L F1 after the answer's
  "(source: ...)" citation is removed.
- with documents, retrieval hit@1 / hit@3: a top passage comes from the document holding the
  reference answer, which is the question's `source` field, or, without one, the document of the
  passage closest to the reference (highest ROUGE-L among its 20 best BM25 passages). A question
  whose `source` is not among the documents (a chat transcript, say) is left out of hit@k.
- with documents, also hit@1 / hit@3 on passages (`retrieval.hits`: the gold passage when
  `source` names one, "DOC > TITLE > SECTION" as in evalsets/) for `--retrieval`'s mode with
  BM25 alone beside, and for follow-ups (questions with earlier turns) with the last message
  alone beside: eval.json's "retrieval_hits", printed under the table.
- baselines, scored the same way: "extractive" (the reply is the top retrieved passage) and
  "no_retrieval" (the model answers the bare question).
- grounded precision (`grounded`): the share of the answers' word 4-grams that occur in the
  passages put in the prompt (`chatforge.eval.metrics.grounded_precision`), for the model, and
  for the model without retrieval against the passages it would have been given (how much of
  its answer it could have copied), so invention is measured. The "not in the documents" reply
  is left out (it copies nothing on purpose). 1.0 for the extractive baseline by construction.
- the second turn (`--second-turn N`, 10): the first N single-turn questions asked again after an
  earlier question and the model's own answer to it, as chat keeps a conversation: ROUGE-L beside
  their first-turn score, and the share of answers closer to that earlier answer than to their
  reference (a model that repeats its previous reply).

Outputs in `--out`: `eval.json` (`perplexity`, `bleu`, `rouge1`, `rouge2`, `rougeL`, `hit@1`,
`hit@3`, `grounded`, and `baselines: {"extractive": {...}, "no_retrieval": {...}}`), `examples.jsonl` (one
line per question: the answers, and with retrieval the grounded prompt the model saw) and `report.html` (training curves from the model folder's `metrics.jsonl`
and those of its sibling stage folders). The metric table is printed too.
With `--feedback-db FILE` (the database `chatforge serve --db` writes), eval.json also holds
"user_satisfaction" (`chatforge.data.feedback.satisfaction_stats`: the share of thumbs up
overall, per day, per document, the most down-voted questions) and the report a section on it.
`evaluate(model_dir, out_dir, ...)` does the same from Python; the command's options are in
`chatforge.commands.eval`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from chatforge import files
from chatforge.data.feedback import user_satisfaction
from chatforge.data.shards import load_tokens
from chatforge.errors import ChatforgeError
from chatforge.eval.metrics import bleu, grounded_precision, hit_at_k, perplexity, rouge, rouge_l
from chatforge.eval.report import METRICS, fmt, load_curves, metric_rows, write_report
from chatforge.infer.answer import (AnswerSettings, answered_history, checked_citation, cited_name, copied_from,
                                    is_refusal)
from chatforge.infer.batching import Done, Scheduler
from chatforge.infer.engine import Engine
from chatforge.model.folder import load_model
from chatforge.model.quant import quantize_model
from chatforge.retrieval import CITATION_END, NOT_FOUND_REPLY, context_sources, grounded_messages, strip_citation
from chatforge.retrieval.fusion import load_retriever, search_turn
from chatforge.retrieval.hits import hits_table, retrieval_hits

GOLD_CANDIDATES = 20     # BM25 candidates searched for the passage closest to a reference
PPL_SEQ_LEN = 1024       # longest perplexity window (the model's context when shorter)
_QUESTIONS_EXPECTED = ('expected {"question": str, "answer": str} or {"messages": [...]} ending with '
                       'an assistant reply, optionally with "source", "section" and "answerable": false '
                       '(a question the documents do not answer: "answer" may be "")')
# The earlier turn of the after-refusal measure: a question no support document answers, refused.
OFF_TOPIC = "Can you book me a table for two at an Italian restaurant tonight?"


# --------------------------------------------------------------------------- inputs

def load_questions(path: str | Path, limit: int | None = None) -> list[dict]:
    """Questions from a JSONL file: [{"question", "reference", "source", "history"}, ...].

    A malformed line is a `ChatforgeError` naming FILE:LINE.
    """
    out: list[dict] = []
    for lineno, obj in files.iter_jsonl(path, _QUESTIONS_EXPECTED):
        if limit is not None and len(out) >= limit:
            break
        out.append(_question(obj, f"{path}:{lineno}"))
    if not out:
        raise ChatforgeError(f"{path} holds no questions; {_QUESTIONS_EXPECTED}")
    return out


def _question(obj: Any, where: str) -> dict:
    if not isinstance(obj, dict):
        raise ChatforgeError(f"{where}: {_QUESTIONS_EXPECTED}")
    source = obj.get("source")
    if source is not None and not isinstance(source, str) and not (
            isinstance(source, list) and source and all(isinstance(s, str) for s in source)):
        raise ChatforgeError(f'{where}: "source" must be a string or a list of strings')
    section = obj.get("section")
    if section is not None and not isinstance(section, str):
        raise ChatforgeError(f'{where}: "section" must be a string')
    answerable = obj.get("answerable", True)
    if not isinstance(answerable, bool):
        raise ChatforgeError(f'{where}: "answerable" must be true or false')
    extra = {"section": section, "answerable": answerable}
    if isinstance(obj.get("question"), str) and isinstance(obj.get("answer"), str):
        if answerable and not obj["answer"].strip():
            raise ChatforgeError(f'{where}: an empty "answer" needs "answerable": false')
        # "history": the earlier turns of a follow-up (evalsets/followups.jsonl)
        history = obj.get("history") or []
        if not (isinstance(history, list) and all(isinstance(m, dict) and m.get("role") in ("user", "assistant")
                                                  and isinstance(m.get("content"), str) for m in history)):
            raise ChatforgeError(f'{where}: "history" must be a list of {{"role": "user"|"assistant", "content"}}')
        return {"question": obj["question"], "reference": obj["answer"], "source": source,
                "history": [{"role": m["role"], "content": m["content"]} for m in history], **extra}
    msgs = obj.get("messages")
    ok = isinstance(msgs, list) and all(isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                                        and isinstance(m.get("content"), str) for m in msgs)
    if ok:
        last_a = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        last_q = None if last_a is None else max(
            (i for i, m in enumerate(msgs[:last_a]) if m["role"] == "user"), default=None)
        if last_q is not None:
            history = [{"role": m["role"], "content": m["content"]} for m in msgs[:last_q] if m["role"] != "system"]
            return {"question": msgs[last_q]["content"], "reference": msgs[last_a]["content"],
                    "source": source, "history": history, **extra}
    raise ChatforgeError(f"{where}: {_QUESTIONS_EXPECTED}")


def _sha12(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def val_tokens(data_dir: Path, model_dir: Path, tokenizer, max_tokens: int) -> Any:
    """The validation tokens: the shards built with this tokenizer if present, else val.jsonl encoded."""
    tok_file = model_dir / "tokenizer.json"
    shards = data_dir / f"tokens-{_sha12(tok_file)}" if tok_file.is_file() else None
    if shards is not None and (shards / "val.bin").is_file() and (shards / "meta.json").is_file():
        return load_tokens(shards, "val")
    path = data_dir / "val.jsonl"
    if not path.is_file():
        raise ChatforgeError(f"{path} is missing; point --data at the output of `chatforge data build`")
    ids: list[int] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (ValueError, KeyError, TypeError):
                raise ChatforgeError(f'{path}:{lineno}: expected {{"text": str, ...}}') from None
            ids += tokenizer.encode(text) + [tokenizer.eot_id]
            if len(ids) >= max_tokens:
                break
    return np.asarray(ids, dtype=np.int64)


def _curve_files(model_dir: Path) -> list[Path]:
    """metrics.jsonl of the model folder, then of the other stage folders of its run folder."""
    paths = [model_dir / "metrics.jsonl"]
    parent = model_dir.resolve().parent
    for sibling in sorted(parent.glob("*/metrics.jsonl")):
        if sibling.parent.resolve() != model_dir.resolve():
            paths.append(sibling)
    return [p for p in paths if p.is_file()]


# --------------------------------------------------------------------------- generation

class Answerer:
    """Greedy answers for many conversations at once, continuously batched (`infer.batching`,
    the server's scheduler): a finished answer's row takes the next question at once. Answers
    run from a few words to 512 tokens, and a static batch decodes until its longest is done:
    on the demo's evaluation sets that was about twice the decode steps."""

    def __init__(self, model, tokenizer, max_new_tokens: int, batch_size: int, settings=None):
        self.tokenizer, self.batch_size = tokenizer, batch_size
        self.engine = Engine(model, tokenizer)
        # The model's answer settings' decoding (greedy unless it says otherwise, the same in chat
        # and serve). truncate_prompt: a prompt longer than the context loses its oldest tokens
        # instead of failing. An answer ends with its citation (`infer.turn.Prompt.generation`).
        # The refusal bias goes on grounded prompts only (the not-found reply is theirs).
        settings = settings or AnswerSettings()
        self.plain_cfg = settings.generation(max_new_tokens=max_new_tokens, truncate_prompt=True,
                                             stop_after=(CITATION_END,))
        self.cfg = replace(self.plain_cfg, first_token_bias=settings.refusal_logit_bias(tokenizer))
        self.seen: dict[tuple[int, ...], str] = {}

    def answer(self, conversations: Sequence[list[dict]], desc: str = "generate", grounded: bool = True) -> list[str]:
        cfg = self.cfg if grounded else self.plain_cfg
        prompts = [self.tokenizer.render_chat(c, add_generation_prompt=True)[0] for c in conversations]
        # A prompt answered before in this evaluation keeps its answer (greedy decoding repeats it).
        replies: list[str] = [self.seen.get(tuple(p), "") for p in prompts]
        todo = [i for i, p in enumerate(prompts) if tuple(p) not in self.seen]
        if todo:
            # Its cache grows with the answers being decoded (the budget is only a ceiling).
            scheduler = Scheduler(self.engine, max_batch=self.batch_size, max_queue=len(todo))
            with tqdm(total=len(todo), desc=desc, unit="answer", disable=None) as bar:
                def finished(event) -> None:
                    if isinstance(event, Done):
                        bar.update(1)
                # A grounded answer's citation can only name a passage in its context, as in chat
                # and the server (`Prompt.generation`).
                requests = [(i, scheduler.submit(prompts[i], self._for(cfg, conversations[i]) if grounded else cfg,
                                                 on_event=finished)) for i in todo]
                scheduler.run_until_idle()         # on this thread: no server loop to start or stop
            for i, request in requests:
                done = request.outcome
                if done is None or done.finish_reason == "error":
                    raise ChatforgeError(f"generating an answer failed: {done.error if done else 'no result'}")
                replies[i] = (done.text or "").strip()
        if self.cfg.strategy == "greedy":
            self.seen.update((tuple(prompts[i]), replies[i]) for i in todo)
        return replies

    @staticmethod
    def _for(cfg, conversation: list[dict]):
        names = tuple(context_sources(conversation[-1]["content"]))
        return replace(cfg, cite_names=names) if names else cfg


def _scores(hyps: list[str], refs: list[str]) -> dict:
    return {"bleu": bleu(hyps, refs), **rouge(hyps, refs)}


# --------------------------------------------------------------------------- evaluate

def evaluate(model_dir: str | Path, out_dir: str | Path, questions: str | Path | None = None,
             docs: Sequence[str | Path] | None = None, data: str | Path | None = None,
             retrieval: bool = True, max_questions: int | None = 200, max_new_tokens: int | None = None,
             batch_size: int = 8, k: int | None = None, index_cache: str | Path | None = None,
             max_ppl_batches: int = 20, seq_len: int | None = None, context_tokens: int | None = None,
             feedback_db: str | Path | None = None, quant: str | None = None, second_turn: int = 10,
             min_score: float | None = None, bare: bool = True, verbose: bool = True,
             retrieval_mode: str = "auto", embedding_model: str | None = None,
             refusal_bias: float | None = None, reply_ngram: int | None = None) -> dict:
    """Evaluate a model folder; write eval.json, examples.jsonl and report.html into `out_dir`.

    `bare=False` skips the no-retrieval baseline (the model answering without passages).
    `k`, `max_new_tokens`, `context_tokens`, `min_score`, `refusal_bias` and `reply_ngram` (its
    `reply_no_repeat_ngram_size`) default to the model's answer settings
    (`infer.answer`, MODEL/answer.json), as chat and serve use them.
    Returns the eval.json dict. See the module docstring for what is measured.
    """
    settings = AnswerSettings.load(model_dir).replace(refusal_bias=refusal_bias, reply_no_repeat_ngram_size=reply_ngram)
    k = settings.passages if k is None else k
    max_new_tokens = settings.max_new_tokens if max_new_tokens is None else max_new_tokens
    context_tokens = settings.context_tokens if context_tokens is None else context_tokens

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    data_dir = Path(data) if data is not None else None
    if data_dir is not None and not data_dir.is_dir():
        raise ChatforgeError(f"data folder {data_dir} does not exist; build it with `chatforge data build`")
    if questions is None and data_dir is not None and (data_dir / "qa_val.jsonl").is_file():
        questions = data_dir / "qa_val.jsonl"
    if k < 1 or batch_size < 1 or (max_questions is not None and max_questions < 1):
        raise ChatforgeError("--k, --batch-size and --max-questions must be at least 1")
    if second_turn < 0:
        raise ChatforgeError(f"--second-turn must be 0 (off) or more, got {second_turn}")
    qs = load_questions(questions, max_questions) if questions is not None else []
    satisfaction = None
    if feedback_db is not None:   # read first: a bad path fails before the model loads
        satisfaction = user_satisfaction(feedback_db)
    embedding_model = embedding_model or settings.embedding_model_for(model_dir)   # answer.json's retriever
    index = load_retriever(list(docs), index_cache, retrieval_mode, embedding_model) if docs else None
    if min_score is None:      # the answer settings' threshold, for the scores it was fitted on
        min_score = settings.threshold(getattr(index, "mode", None))

    torch.set_num_threads(min(torch.get_num_threads(), 2))   # a shared laptop: stay modest
    model, tokenizer = load_model(model_dir)
    if quant:
        # Perplexity and answers both come from the int8/int4 weights.
        model = quantize_model(model, quant)
    ctx = model.config.max_seq_len
    results: dict[str, Any] = {"model": str(model_dir), "quantization": quant, "questions": len(qs),
                               "retrieval": bool(index is not None and retrieval),
                               "embedding_model": getattr(index, "embedding_model", None), "perplexity": None}
    if data_dir is not None:
        # Windows of at most PPL_SEQ_LEN: a pretrained model's 8k context would cost minutes per batch.
        n = seq_len or min(ctx, PPL_SEQ_LEN)
        tokens = val_tokens(data_dir, model_dir, tokenizer, max_tokens=max_ppl_batches * 8 * (n + 1))
        results["perplexity"] = perplexity(model, tokens, n, max_ppl_batches)

    examples: list[dict] = [{"question": q["question"], "reference": q["reference"],
                             **({"source": q["source"]} if q["source"] else {}),
                             **({"answerable": False} if not q["answerable"] else {})} for q in qs]
    baselines: dict[str, dict] = {}
    # Scores count the questions the documents answer; the others measure refusals only.
    ok = [i for i, q in enumerate(qs) if q["answerable"]]
    if qs:
        refs = [qs[i]["reference"] for i in ok]
        answerer = Answerer(model, tokenizer, max_new_tokens, batch_size, settings)
        plain = [[*q["history"], {"role": "user", "content": q["question"]}] for q in qs]
        if index is not None:
            hits = [search_turn(index, q["question"], max(k, 3), q["history"]) for q in qs]
            gold = [_gold_keys(index, q, rouge_l) if q["answerable"] else None for q in qs]
            retrieved = [[_key(p, q) for p in h] for h, q in zip(hits, qs)]
            hit = {"hit@1": hit_at_k(retrieved, gold, 1), "hit@3": hit_at_k(retrieved, gold, 3)}
            results["retrieval_hits"] = mode_hits(index, _at(qs, ok))     # per passage, this mode and BM25 beside
            extractive = [h[0].text if h else "" for h in hits]
            given = [[p.text for p in h[:k]] for h in hits]   # the passages a grounded prompt holds
            baselines["extractive"] = {"perplexity": None, **_scores(_at(extractive, ok), refs), **hit,
                                       "grounded": _grounded(_at(extractive, ok), _at(given, ok))}
            for e, h, ext in zip(examples, hits, extractive):
                e["extractive"], e["retrieved"] = ext, [p.source for p in h[:k]]
            if retrieval:
                # Leave room for the question, the template and the answer within the context.
                budget = max(64, min(context_tokens, ctx - max_new_tokens - 96))
                grounded = [grounded_messages(q["question"], h[:k], history=answered_history(q["history"]),
                                              max_context_tokens=budget, tokenizer=tokenizer)
                            for q, h in zip(qs, hits)]
                raw = answerer.answer(grounded, "answer (grounded)")
                # What a customer is shown: a trusted citation, and the not-found reply where no
                # passage scores above the answer settings' threshold.
                answers = [NOT_FOUND_REPLY if min_score and (not h or h[0].score < min_score)
                           else checked_citation(a, h[:k]) for a, h in zip(raw, hits)]
                if bare:
                    plain_answers = answerer.answer(plain, "answer (no retrieval)", grounded=False)
                    baselines["no_retrieval"] = {"perplexity": None, **_scores(_at(plain_answers, ok), refs),
                                                 "hit@1": None, "hit@3": None,
                                                 "grounded": _grounded(_at(plain_answers, ok), _at(given, ok))}
                    for e, b in zip(examples, plain_answers):
                        e["no_retrieval"] = b
                results["grounded"] = _grounded(_at(answers, ok), _at(given, ok))
                in_context = [g is not None and any(key in g for key in r[:k]) for r, g in zip(retrieved, gold)]
                results["answering"] = {**_refusals(qs, answers, in_context), "min_score": min_score,
                                        "refusal_bias": settings.refusal_bias,
                                        "reply_ngram": settings.reply_no_repeat_ngram_size,
                                        "model_alone": _refusals(qs, raw, in_context),
                                        **_citations(raw, answers, hits, k)}
                for e, a, r, g, prompt in zip(examples, answers, raw, given, grounded):
                    e["grounded"] = _grounded([a], [g])
                    e["prompt"] = prompt     # what the model saw (a reward model can score the answer after it)
                    if r != a:
                        e["model_reply"] = r
                def prompt_for(q, h, history):
                    # as chat and the server build it: refused exchanges left out (`answered_history`)
                    return grounded_messages(q, h[:k], history=answered_history(history), max_context_tokens=budget,
                                             tokenizer=tokenizer)
                if second_turn:
                    results["second_turn"] = _second_turn(answerer, qs, hits, answers, examples, second_turn,
                                                          prompt_for)
                    results["after_refusal"] = _after_refusal(answerer, qs, hits, raw, examples, second_turn,
                                                              prompt_for)
            else:
                answers = answerer.answer(plain, "answer (no retrieval)", grounded=False)
            results.update(hit if retrieval else {"hit@1": None, "hit@3": None})
        else:
            answers = answerer.answer(plain, "answer", grounded=False)
            results.update({"hit@1": None, "hit@3": None})
        for e, a in zip(examples, answers):
            e["answer"] = a
        results.update(_scores([strip_citation(a) for a in _at(answers, ok)], refs) if ok
                       else {m: None for m in ("bleu", "rouge1", "rouge2", "rougeL")})
    else:
        results.update({m: None for m in METRICS if m != "perplexity"})
    results["baselines"] = baselines
    if satisfaction is not None:
        results["user_satisfaction"] = satisfaction

    out_dir.mkdir(parents=True, exist_ok=True)
    files.write_json(out_dir / "eval.json", results)
    with files.atomic_open(out_dir / "examples.jsonl") as f:
        for e in examples:
            f.write(json.dumps(e, ensure_ascii=False) + "\n")
    write_report(out_dir / "report.html", results, examples, load_curves(_curve_files(model_dir)),
                 title=f"chatforge evaluation: {model_dir.name}")
    if verbose:
        print(format_table(results))
        if results.get("retrieval_hits"):
            print(mode_hits_text(results["retrieval_hits"], results["embedding_model"]))
        if results.get("second_turn"):
            print(second_turn_line(results["second_turn"]))
        if answering_line(results):
            print(answering_line(results))
        if satisfaction is not None:
            share = satisfaction["satisfaction"]
            print(f"user satisfaction: {'n/a' if share is None else f'{share:.1%}'} thumbs up of "
                  f"{satisfaction['rated']} rated replies")
        print(f"wrote {out_dir / 'eval.json'}, {out_dir / 'examples.jsonl'}, {out_dir / 'report.html'}")
    return results


def _second_turn(answerer, qs: list[dict], hits: list, answers: list[str], examples: list[dict], n: int,
                 prompt) -> dict | None:
    """The first `n` single-turn questions asked again as a conversation's second turn, after the
    question before them (the last one for the first) and the model's own answer to it, as chat
    and the server keep them. ROUGE-L beside the same questions' first-turn score, and the share
    of second-turn answers closer to that earlier answer than to their reference: a model that
    repeats its previous reply (the demo assistant did, before SFT showed it earlier turns)."""
    rows = [i for i, q in enumerate(qs) if not q["history"]][:n]
    if len(rows) < 2:
        return None
    convs = []
    for pos, i in enumerate(rows):
        j = rows[pos - 1]
        history = [{"role": "user", "content": qs[j]["question"]}, {"role": "assistant", "content": answers[j]}]
        convs.append(prompt(qs[i]["question"], hits[i], history))
    second = answerer.answer(convs, "answer (second turn)")
    copied = 0
    for pos, (i, a) in enumerate(zip(rows, second)):
        examples[i]["second_turn"] = a
        earlier = strip_citation(answers[rows[pos - 1]])
        copied += rouge_l(strip_citation(a), earlier) > rouge_l(strip_citation(a), qs[i]["reference"])
    refs = [qs[i]["reference"] for i in rows]
    return {"questions": len(rows),
            "rougeL": _scores([strip_citation(a) for a in second], refs)["rougeL"],
            "rougeL_first_turn": _scores([strip_citation(answers[i]) for i in rows], refs)["rougeL"],
            "closer_to_earlier_answer": copied / len(rows)}


def second_turn_line(turn: dict) -> str:
    """eval.json's "second_turn" as one line of text (printed by `eval` and the pipeline)."""
    return (f"second turn: ROUGE-L {turn['rougeL']:.3f} on {turn['questions']} questions asked after an earlier "
            f"one (first turn {turn['rougeL_first_turn']:.3f}); {turn['closer_to_earlier_answer']:.0%} closer "
            "to the earlier answer than to the reference")


def _grounded(answers: Sequence[str], passages: Sequence[Sequence[str]]) -> float | None:
    """Grounded precision of `answers` (citations stripped, "not in the documents" replies left out)."""
    kept = [(strip_citation(a), ps) for a, ps in zip(answers, passages)
            if strip_citation(a).strip() != NOT_FOUND_REPLY]
    return grounded_precision([a for a, _ in kept], [ps for _, ps in kept])


def _at(values: Sequence, rows: Sequence[int]) -> list:
    return [values[i] for i in rows]


def _key(passage, q: dict) -> str:
    """What hit@k compares: the passage's document, and its section when the question names one."""
    return f"{passage.doc}#{passage.section.lower()}" if q.get("section") else passage.doc


def _gold_keys(index, q: dict, rouge_l) -> list[str] | None:
    """The keys (`_key`) of the passages that answer `q`: its documents, or with a "section" that
    section of them (a manual's answer is one section, not the whole manual)."""
    docs = _gold_docs(index, q, rouge_l)
    if docs is None or not q.get("section"):
        return docs
    return [f"{d}#{q['section'].strip().lower()}" for d in docs]


def _refusals(qs: list[dict], answers: Sequence[str], in_context: Sequence[bool]) -> dict:
    """False refusals (answerable questions whose answer's passage was in the context, yet the reply
    says not found; also over all answerable questions) and refusals of unanswerable questions."""
    def share(rows: list[int]) -> float | None:
        return sum(is_refusal(answers[i]) for i in rows) / len(rows) if rows else None

    answerable = [i for i, q in enumerate(qs) if q["answerable"]]
    return {"false_refusals": share([i for i in answerable if in_context[i]]),
            "refusals_answerable": share(answerable),
            "refusals_unanswerable": share([i for i, q in enumerate(qs) if not q["answerable"]]),
            "answerable": len(answerable), "unanswerable": len(qs) - len(answerable)}


def _citations(raw: Sequence[str], shown: Sequence[str], hits: Sequence, k: int) -> dict:
    """Of the model's own cited replies: the share whose citation names a given passage exactly,
    and the share naming the passage the answer was copied from; and the source names shown to a
    user (after `checked_citation`) that no given passage has (0 by construction)."""
    cited = exact = right = invented = 0
    for r, s, h in zip(raw, shown, hits):
        names = {p.source for p in h[:k]}
        name = cited_name(r)
        if name is not None and not is_refusal(r):
            cited += 1
            exact += name in names
            source = copied_from(r, h[:k])
            right += source is not None and source.source == name
        shown_name = cited_name(s)
        invented += shown_name is not None and shown_name not in names
    return {"cited": cited, "citation_exact": exact / cited if cited else None,
            "citation_copied": right / cited if cited else None, "invented_names_shown": invented}


def _after_refusal(answerer, qs: list[dict], hits: list, answers: list[str], examples: list[dict], n: int,
                   prompt) -> dict | None:
    """The first `n` answerable single-turn questions asked after an earlier question that no
    document answers and the not-found reply to it: the share the model refused, beside its share
    on the same questions as a first turn (`answers`: the model's own replies, before any score
    threshold). An earlier refusal must not make the next answerable question another: chat, the
    server and `prompt` leave refused exchanges out of the model's prompt (`answered_history`), so
    the prompts equal the first turn's and the answers are reused (`Answerer`); a prompt path that
    kept the refusal would show here."""
    rows = [i for i, q in enumerate(qs) if not q["history"] and q["answerable"]][:n]
    if not rows:
        return None
    history = [{"role": "user", "content": OFF_TOPIC}, {"role": "assistant", "content": NOT_FOUND_REPLY}]
    later = answerer.answer([prompt(qs[i]["question"], hits[i], history) for i in rows], "answer (after a refusal)")
    for i, a in zip(rows, later):
        examples[i]["after_refusal"] = a
    return {"questions": len(rows), "refused": sum(map(is_refusal, later)) / len(rows),
            "refused_first_turn": sum(is_refusal(answers[i]) for i in rows) / len(rows)}


def answering_line(results: dict) -> str | None:
    """eval.json's refusal and citation figures as lines of text (printed by `eval` and the pipeline)."""
    a = results.get("answering")
    if not a:
        return None
    pct = (lambda v: "n/a" if v is None else f"{v:.1%}")
    lines = [f"false refusals {pct(a['false_refusals'])} (answer's passage in the context; "
             f"{pct(a['refusals_answerable'])} of all {a['answerable']} answerable), "
             f"refused unanswerable {pct(a['refusals_unanswerable'])} of {a['unanswerable']}"
             + (f"; score threshold {a['min_score']:.2f} (model alone: false refusals "
                f"{pct(a['model_alone']['false_refusals'])}, refused unanswerable "
                f"{pct(a['model_alone']['refusals_unanswerable'])})" if a.get("min_score") else ""),
             *([f"refusal bias {a['refusal_bias']:.2f} (fitted by SFT; `--refusal-bias 0` measures without it)"]
               if a.get("refusal_bias") else []),
             f"citations: {a['cited']} cited replies, {pct(a['citation_exact'])} name a given passage exactly, "
             f"{pct(a['citation_copied'])} the one copied from; invented names shown: {a['invented_names_shown']}"]
    turn = results.get("after_refusal")
    if turn:
        lines.append(f"after a refusal: {pct(turn['refused'])} of {turn['questions']} answerable questions refused "
                     f"(first turn {pct(turn['refused_first_turn'])})")
    return "\n".join(lines)


def _gold_docs(index, q: dict, rouge_l) -> list[str] | None:
    """The docs holding a question's answer: those its `source` names (None when none is indexed:
    the question is left out of hit@k), else the doc of the passage closest to the reference."""
    if q["source"]:
        # A passage name ("DOC > TITLE > SECTION", evalsets/) counts its document here.
        names = [q["source"]] if isinstance(q["source"], str) else q["source"]
        return [d for s in names for d in index.matching_docs(s.split(" > ", 1)[0])] or None
    candidates = index.search(q["reference"], GOLD_CANDIDATES)
    if not candidates:
        return None
    best = max(candidates, key=lambda p: rouge_l(p.text, q["reference"]))
    return [best.doc]


def mode_hits(index, qs: list[dict]) -> dict:
    """Passage-level hit@1/hit@3 (`retrieval.hits`) of the retrieval mode in use with BM25 alone beside;
    for questions with earlier turns also with the last message alone (what follow-ups gain)."""
    modes = list(dict.fromkeys(["bm25", getattr(index, "mode", "bm25")]))
    out = {"modes": retrieval_hits(index, qs, modes)}
    if any(q["history"] for q in qs):
        out["last_message_only"] = retrieval_hits(index, qs, modes, last_message_only=True)
    return out


def mode_hits_text(hits: dict, model: str | None = None) -> str:
    """eval.json's "retrieval_hits" as lines of text (printed by `eval`); `model`: the embedding
    model, named in the title."""
    lines = [hits_table(hits["modes"], f"retrieval (passages{', ' + model if model else ''})")]
    if hits.get("last_message_only"):
        lines.append(hits_table(hits["last_message_only"], "last message only"))
    return "\n".join(lines)


def format_table(results: dict) -> str:
    """The metric table as text: one row for the model, one per baseline."""
    lines = [f"{'system':<14}" + "".join(f"{m:>12}" for m in METRICS)]
    for name, row in metric_rows(results):
        lines.append(f"{name:<14}" + "".join(f"{fmt(m, row.get(m)):>12}" for m in METRICS))
    return "\n".join(lines)


# --------------------------------------------------------------------------- the command
