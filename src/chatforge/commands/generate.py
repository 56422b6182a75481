"""`chatforge generate`: complete a prompt with a trained model (greedy, beam search or sampling;
the decoding itself: `chatforge.infer.engine`).

    chatforge generate --model runs/demo/sft --prompt "How do I reset my password?" --chat
    chatforge generate --model runs/demo/base --prompt "The printer" --strategy beam --beams 4 --num-return 2
    chatforge generate --model runs/demo/base --prompt "Once" --strategy sample --temperature 0.8 --top-p 0.9 --seed 1

The prompt is plain text to continue; with `--chat` it becomes a user message in the model's
chat template, followed by the assistant's generation prompt. Greedy decoding and sampling
stream the text to stdout as it is generated; beam search prints its best sequence(s) at the
end (with their scores on stderr). Generation stops at the end-of-text / end-of-turn token, at a
`--stop` string (not printed) or after `--max-new-tokens`.
"""

from __future__ import annotations

import argparse
import sys

from chatforge.commands import leaf
from chatforge.errors import ChatforgeError
from chatforge.infer.engine import Engine, GenerationConfig
from chatforge.model.folder import load_model


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = 'example:\n  chatforge generate --model runs/demo/sft --prompt "How do I reset my password?" --chat'
    parser.add_argument("--model", default=None, help="model folder (the output of pretrain or sft)")
    parser.add_argument("--prompt", default=None, help="text to complete")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    parser.add_argument("--strategy", choices=["greedy", "beam", "sample"], default="greedy", help="decoding strategy")
    parser.add_argument("--beams", type=int, default=4, help="beam width (beam search)")
    parser.add_argument("--length-penalty", type=float, default=1.0,
                        help="beam score = sum of log-probs / length ** this (> 0 favours longer outputs)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0 = greedy)")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1] (1 = off)")
    parser.add_argument("--min-p", type=float, default=0.0,
                        help="drop tokens less likely than this times the top token (0 = off)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="penalise tokens already seen (1 = off)")
    parser.add_argument("--no-repeat-ngram", type=int, default=0, help="never repeat an n-gram of this size (0 = off)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="most tokens to generate")
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling (reproducible output)")
    parser.add_argument("--stop", nargs="+", default=[], metavar="STR", help="stop at any of these strings")
    parser.add_argument("--num-return", type=int, default=1, help="sequences to return (beam: the n best)")
    parser.add_argument("--truncate", action="store_true",
                        help="drop the oldest prompt tokens when the prompt is longer than the context")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--quant", choices=["int8", "int4"], default=None,
                        help="weight-only 8- or 4-bit linear layers (CPU): smaller, faster decoding")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                        help="weights to generate with: auto = bfloat16 where the device has native bf16 "
                             "(faster), else the model's own; float32 = exactly the fp32 model")
    leaf(parser, run)


def run(args: argparse.Namespace) -> int:
    if not args.model:
        raise ChatforgeError("--model is required: a model folder (the output of pretrain or sft)")
    if args.prompt is None:
        raise ChatforgeError("--prompt is required: the text to complete")
    # Settings first: a typo fails before the model loads.
    cfg = GenerationConfig(strategy=args.strategy, num_beams=args.beams, length_penalty=args.length_penalty,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                           repetition_penalty=args.repetition_penalty, no_repeat_ngram_size=args.no_repeat_ngram,
                           max_new_tokens=args.max_new_tokens, seed=args.seed, stop_strings=tuple(args.stop),
                           num_return_sequences=args.num_return, truncate_prompt=args.truncate)

    model, tokenizer = load_model(args.model, device=args.device)
    if args.chat:
        ids = tokenizer.render_chat([{"role": "user", "content": args.prompt}], add_generation_prompt=True)[0]
    else:
        ids = tokenizer.encode(args.prompt)
        if not ids:
            raise ChatforgeError("--prompt is empty; give some text to complete")
    # A chat reply also ends where the model opens another turn.
    stops = [tokenizer.eot_id, tokenizer.im_end_id] + ([tokenizer.im_start_id] if args.chat else [])
    engine = Engine(model, tokenizer, stop_ids=stops, dtype=args.dtype, quant=args.quant)
    out = sys.stdout
    if args.num_return == 1 and cfg.strategy != "beam":
        for piece in engine.stream(ids, cfg):
            out.write(piece)
            out.flush()
        out.write("\n")
        return 0
    (result,) = engine.generate([ids], cfg)
    for i, c in enumerate(result.completions):
        if len(result.completions) > 1:
            score = f" score {c.score:.4f}" if c.score is not None else ""
            print(f"--- {i + 1}/{len(result.completions)}{score} ({c.finish_reason})", file=sys.stderr)
        out.write(c.text + "\n")
    out.flush()
    return 0
