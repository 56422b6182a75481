"""`chatforge eval`: perplexity, BLEU, ROUGE and retrieval hit-rate of a model, with an HTML report
(what is measured and written: `chatforge.eval.evaluate`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from chatforge.commands import add_answer_overrides, add_retrieval, leaf
from chatforge.errors import ChatforgeError
from chatforge.eval.evaluate import evaluate


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("example:\n  chatforge eval --model runs/demo/sft --data runs/demo/data "
                     "--docs examples/my_docs --out runs/demo/eval")
    parser.add_argument("--model", metavar="DIR", default=None, help="model folder to evaluate (needed)")
    parser.add_argument("--data", metavar="DIR", default=None,
                        help="data folder (chatforge data build): val.jsonl for perplexity, qa_val.jsonl as questions")
    parser.add_argument("--questions", metavar="FILE.jsonl", default=None,
                        help='questions: {"question","answer"} or {"messages"} lines; without it, DATA/qa_val.jsonl')
    parser.add_argument("--docs", metavar="PATH", nargs="+", default=None,
                        help="documents to retrieve passages from (files or folders)")
    parser.add_argument("--no-retrieval", action="store_true", default=False,
                        help="the model answers without passages (hit@k and the extractive baseline still use --docs)")
    parser.add_argument("--skip-bare", action="store_true", default=False,
                        help="with retrieval: do not also answer every question without its passages "
                             "(the no_retrieval baseline; it costs as much as the answers themselves)")
    parser.add_argument("--max-questions", type=int, default=200, help="evaluate at most this many questions")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="longest answer, in tokens (default: the model's answer settings, answer.json)")
    parser.add_argument("--batch-size", type=int, default=8, help="questions generated together")
    parser.add_argument("--k", type=int, default=None,
                        help="passages put in the prompt (default: the model's answer settings)")
    parser.add_argument("--min-score", type=float, default=None,
                        help="reply not-found when the best passage scores below this (default: the model's "
                             "answer settings; 0 = off: the model decides alone)")
    parser.add_argument("--context-tokens", type=int, default=None,
                        help="most tokens of retrieved passages in a prompt (default: the model's answer "
                             "settings, SFT's budget; the model's context minus the answer when smaller)")
    parser.add_argument("--max-ppl-batches", type=int, default=20, help="batches of 8 windows for perplexity")
    parser.add_argument("--index-cache", metavar="DIR", default=None,
                        help="where the passage index is cached; without it, $CHATFORGE_CACHE/index "
                             "or ~/.cache/chatforge/index")
    parser.add_argument("--feedback-db", metavar="FILE|URL", default=None,
                        help="feedback database of `chatforge serve --db` (file or postgresql:// URL): adds user satisfaction to eval.json "
                             "and the report")
    parser.add_argument("--quant", choices=["int8", "int4"], default=None,
                        help="evaluate the model with weight-only 8- or 4-bit linear layers")
    add_answer_overrides(parser)
    parser.add_argument("--second-turn", type=int, default=10, metavar="N",
                        help="with retrieval: also ask the first N questions as a conversation's second turn, "
                             "after an earlier question and the model's answer to it (0 = off)")
    parser.add_argument("--out", metavar="DIR", default=None, help="output folder; without it, MODEL/eval")
    add_retrieval(parser)
    leaf(parser, run)


def run(args: argparse.Namespace) -> int:
    if not args.model:
        raise ChatforgeError("--model is required: the model folder to evaluate (e.g. runs/demo/sft)")
    if not args.data and not args.questions:
        raise ChatforgeError("nothing to evaluate: give --data (validation text and Q&A) and/or --questions FILE.jsonl")
    out = args.out or str(Path(args.model) / "eval")
    evaluate(args.model, out, questions=args.questions, docs=args.docs, data=args.data,
             retrieval=not args.no_retrieval, max_questions=args.max_questions,
             max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, k=args.k,
             index_cache=args.index_cache, max_ppl_batches=args.max_ppl_batches, context_tokens=args.context_tokens,
             feedback_db=args.feedback_db, quant=args.quant, second_turn=args.second_turn, min_score=args.min_score,
             refusal_bias=args.refusal_bias, reply_ngram=args.reply_ngram,
             bare=not args.skip_bare, retrieval_mode=args.retrieval, embedding_model=args.embedding_model)
    sys.stdout.flush()
    return 0
