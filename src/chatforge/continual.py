"""The continual-learning round: what users up-vote, down-vote and correct becomes the next model.

    chatforge pipeline --feedback runs/demo/feedback.db              # a round on the users' feedback
    chatforge pipeline --feedback runs/demo/feedback.db --align ppo  # PPO against a reward model, not DPO
    chatforge pipeline --generated-prefs                             # a round on pairs made from the Q&A
    chatforge pipeline --feedback runs/demo/feedback.db --train-retriever  # the retriever too
    chatforge pipeline --rollback                                    # serve the previous model again

The pipeline runs its own stages first (all up to date after `make demo`), then the round in
`runs/NAME/rounds/N/`, each step through the command a user would type:

  feedback    `chatforge feedback export` of all the feedback so far: preferences.jsonl (a
              correction over the reply it corrects, up- over down-voted replies to the same
              question) and sft.jsonl
  prefs       `chatforge prefs make` on the served model (with --generated-prefs or align.generated),
              plus the JSONL files align.prefs names; all the pairs go to preferences.jsonl
  retriever   (align.retriever or --train-retriever; off by default) `chatforge retriever train`
              from the served model's embedding model (its answer.json's, at first the fetched
              all-minilm-l6-v2) on the Q&A and feedback/sft.jsonl: each corrected or up-voted
              answer copied from a passage teaches question -> that passage. Kept when hit@3 (in
              the mode the evaluations retrieve with, hybrid by default) does not fall on the
              validation Q&A (held out, never trained on) nor on the held-out manual's
              questions; the feedback's own questions are reported, never decide
  sft         `chatforge sft` from the served model on the corrections and up-voted replies, in
              the prompt the server showed (passages included); skipped with fewer than two
  reward      `chatforge reward train` on the round's pairs: it judges the win-rate below and is
              PPO's reward (or align.reward names an existing reward model folder, or `none`)
  dpo | ppo | kto  the round's aligner (`ALIGNERS`, align.algo or --align): `chatforge dpo` on the
              pairs (the default), `chatforge ppo` on their prompts, or `chatforge kto` on the
              feedback's kto.jsonl (every up- and down-voted reply, corrections as desirable)
              plus the other pairs unpaired; a kto round needs thumbs, not pairs
  eval        the new model on the questions and settings the served model was measured on
              (`eval`, and `eval-unseen` on the held-out manual)
  compare     the metrics side by side and the reward model's win-rate of the new answers over
              the served model's (`eval/compare.py`)

The new model gets the served model's answer settings (answer.json: DPO and PPO keep the prompt
shape SFT trained) with `embedding_model` naming the retriever it uses: the one the round kept,
else the served model's. So the round's evaluations measure the new model with its retriever,
chat, serve and eval retrieve with it without --embedding-model, a retriever reaches users only
with a promoted model, and `--rollback` brings the previous model's retriever back with it.

The model served is `runs/NAME/assistant`, a symbolic link to the promoted model folder (at first
`sft`). The new model is promoted when it does not lose (align.promote: better, always or never):
its win-rate on the validation questions is at least 0.5 where there is a reward model, and its
ROUGE-L there at most align.max_rouge_drop below the served model's. The unseen manual is
reported, never used to decide. Nothing is deleted: `--rollback` points the link back at the
model the round started from, and `chatforge serve --model runs/NAME/assistant` picks either
change up on SIGHUP or `POST /admin/reload` without dropping requests in flight (the weights: a
server reads the answer settings, the retriever included, when it starts). With
`chatforge serve --upstream` another engine holds the weights: the aligners (and the round's SFT)
keep their LoRA adapter beside the merged model, and a promotion or rollback loads it on that
engine with `--server URL` where it loads adapters at runtime (vLLM), else prints the commands
that serve it (continual_engine.py).

A round is named by what it learns from (the exported feedback, the extra pair files and the
settings): running the pipeline again with nothing new reports the last round; new votes start
round N+1 from the model served then. A round stopped half-way resumes, its finished steps
skipped (the pipeline's stamps, kept per round).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from chatforge import files
from chatforge.continual_engine import reach_engine
from chatforge.data.feedback import FeedbackStore, export_training_data
from chatforge.data.feedback_db import is_url, redact
from chatforge.data.prefs import read_preferences, write_preferences
from chatforge.data.unpaired import Unpaired, read_unpaired, write_unpaired
from chatforge.errors import ChatforgeError
from chatforge.eval.compare import compare, format_comparison
from chatforge.infer.answer import ANSWER_FILE, AnswerSettings
from chatforge.options import build
from chatforge.retrieval.fusion import auto_mode
from chatforge.stages import RunCommand, Runner, to_flags
from chatforge.train.dpo import DPOConfig
from chatforge.train.kto import KTOConfig
from chatforge.train.ppo import PPOConfig
from chatforge.train.reward import load_reward_model

LINK = "assistant"          # runs/NAME/assistant -> the served model folder
ROUND_FILE = "round.json"
PROMOTE = ("better", "always", "never")
MIN_SFT_EXAMPLES = 2        # sft holds one out for validation


def served_model(run_dir: Path) -> Path:
    """The model folder `runs/NAME/assistant` points at, else the pipeline's `sft`."""
    link = run_dir / LINK
    return Path(os.path.normpath(run_dir / os.readlink(link))) if link.is_symlink() else run_dir / "sft"


def point_at(run_dir: Path, model: Path) -> None:
    """Make `runs/NAME/assistant` point at `model`, atomically (a new link renamed over the old)."""
    tmp = run_dir / f".{LINK}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(os.path.relpath(Path(model).resolve(), run_dir.resolve()), tmp)
    os.replace(tmp, run_dir / LINK)


def round_dirs(run_dir: Path) -> list[Path]:
    base = run_dir / "rounds"
    found = [p for p in base.iterdir() if p.is_dir() and p.name.isdigit()] if base.is_dir() else []
    return sorted(found, key=lambda p: int(p.name))


def read_round(round_dir: Path) -> dict:
    path = round_dir / ROUND_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def rollback(run_dir: Path, server: str | None = None) -> Path:
    """Serve the model the round that made the served one started from; returns it. With
    `server` (a `chatforge serve --upstream`) its engine moves back too, else the commands that
    do it are printed (`continual_engine.reach_engine`)."""
    current = served_model(run_dir)
    for round_dir in reversed(round_dirs(run_dir)):
        info = read_round(round_dir)
        if info.get("model") and Path(info["model"]).resolve() == current.resolve():
            previous = Path(info["previous"])
            point_at(run_dir, previous)
            info.update(promoted=False, rolled_back=time.strftime("%Y-%m-%d %H:%M:%S"),
                        engine_rollback=reach_engine(run_dir, previous, server))
            files.write_json(round_dir / ROUND_FILE, info)
            return previous
    raise ChatforgeError(f"{run_dir / LINK} serves {current}, which no round made: there is nothing to roll back to")


def _digest(paths: list[Path]) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "-" for p in paths]


def _h(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _count_lines(path: Path) -> int:
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip()) if path.is_file() else 0


def check_settings(align: dict) -> None:
    known = {"algo", "generated", "prefs", "reward", "min_reward_pairs", "sft_epochs", "promote", "max_rouge_drop",
             "retriever"}
    unknown = sorted(set(align) - known)
    if unknown:
        raise ChatforgeError(f"unknown key(s) in the align section: {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    if align["algo"] not in ALGOS:
        raise ChatforgeError(f"align.algo must be one of {', '.join(ALGOS)}, got {align['algo']!r}")
    if align["promote"] not in PROMOTE:
        raise ChatforgeError(f"align.promote must be one of {', '.join(PROMOTE)}, got {align['promote']!r}")
    if not isinstance(align.get("retriever", False), bool):
        raise ChatforgeError(f"align.retriever must be true or false, got {align['retriever']!r}")


def check_aligner_section(settings: dict) -> None:
    """The round's aligner's settings section (e.g. `kto:`) checked against its config before
    anything runs: an unknown key or a bad value fails now, not twenty minutes into the round."""
    algo = settings["align"]["algo"]
    build(ALIGNERS[algo].config, settings.get(algo) or {}, f"{algo} section's")


def served_embedding_model(model: Path) -> str | None:
    """The embedding model retrieval uses with `model` (its answer.json's), None = the default."""
    return AnswerSettings.load(model).embedding_model_for(model)


def retrieval_mode(settings: dict, embedding_model: str | None) -> str:
    """The mode the round's evaluations retrieve in: their `--retrieval`, where auto is the best
    mode when `embedding_model` (None: the default one) can be loaded, else BM25."""
    mode = str(settings.get("eval", {}).get("retrieval") or "auto")
    return auto_mode(embedding_model) if mode == "auto" else mode


def keep_retriever(report: dict, mode: str) -> list[str]:
    """Why the retriever `retriever train` reported on is not kept ([] = keep it): hit@3 in `mode`
    fell on the validation Q&A or on a held-out set. The feedback's own questions were trained on
    and never decide."""
    why_not = []
    for name, before in report["before"].items():
        if name.startswith("feedback"):
            continue
        b, a = before[mode]["hit@3"], report["after"][name][mode]["hit@3"]
        if b is not None and a is not None and a < b:
            why_not.append(f"{mode} hit@3 on {name} fell {b:.3f} -> {a:.3f}")
    return why_not


def retriever_step(settings: dict, runner: Runner, round_dir: Path, data: Path, docs: list[Path],
                   unseen: tuple[Path, Path] | None, previous: Path) -> dict:
    """`chatforge retriever train` from the served model's embedding model on the Q&A and the
    round's corrected and up-voted replies; kept by `keep_retriever`. Returns round.json's
    `retriever` entry; `use` is the embedding model the round's model retrieves with."""
    base = served_embedding_model(previous)
    out = round_dir / "retriever"
    corrections = round_dir / "feedback" / "sft.jsonl"
    argv = ["retriever", "train", "--data", str(data), "--docs", *map(str, docs), "--out", str(out)]
    argv += ["--base", base] if base else []
    argv += ["--feedback", str(corrections)] if _count_lines(corrections) else []
    argv += ["--questions", str(unseen[0]), "--eval-docs", str(unseen[1])] if unseen else []
    runner.stage("retriever", argv + to_flags(settings.get("retriever") or {}), out)
    report = json.loads((out / "retriever.json").read_text(encoding="utf-8"))
    mode = retrieval_mode(settings, base)
    why_not = keep_retriever(report, mode)
    keep = not why_not
    return {"base": base, "trained": str(out), "kept": keep, "kept_because": why_not, "mode": mode,
            "feedback": report.get("feedback"), "before": report["before"], "after": report["after"],
            "use": str(out) if keep else base}


def record_answer_settings(previous: Path, new: Path, embedding_model: str | None) -> None:
    """Give the round's model the served model's answer settings (DPO and PPO write none; the
    prompt shape is unchanged) with `embedding_model`, a folder stored relative to `new`."""
    if embedding_model is None and not (previous / ANSWER_FILE).is_file():
        return
    value = embedding_model
    if value is not None and Path(value).is_dir():
        value = os.path.relpath(Path(value).resolve(), new.resolve())
    replace(AnswerSettings.load(previous), embedding_model=value).save(new)


@dataclass
class AlignStep:
    """What an aligner gets: the round's settings, runner and folder, the model it starts from,
    the round's pairs (`pairs`: their file; `other_prefs`: those not from the feedback), the reward
    model (or None) and the feedback's KTO rows (`kto_rows`: a file, maybe missing). It runs its
    command and returns the new model's folder."""

    settings: dict
    runner: Runner
    round_dir: Path
    start: Path
    pairs: Path
    prefs: list
    other_prefs: list
    reward_dir: Path | None
    kto_rows: Path


def keep_adapter(opts: dict) -> dict:
    """A LoRA step's options with its adapter kept beside the merged model (`--lora-save
    adapter`): an engine in front of which chatforge serves loads that, not a whole new model
    (continual_engine.py)."""
    return {**opts, "lora_save": "adapter"} if opts.get("method", "lora") == "lora" and "lora_save" not in opts else opts


def dpo_step(step: AlignStep) -> Path:
    new = step.round_dir / "dpo"
    dpo_opts = keep_adapter({**step.settings["dpo"], **({"val_fraction": 0} if len(step.prefs) < 20 else {})})
    step.runner.stage("dpo", ["dpo", "--base", str(step.start), "--prefs", str(step.pairs), "--out", str(new),
                              *to_flags(dpo_opts)], new)
    return new


def ppo_step(step: AlignStep) -> Path:
    if step.reward_dir is None:
        raise ChatforgeError("--align ppo needs a reward model: set align.reward to `train` or a reward model folder")
    new = step.round_dir / "ppo"
    prompts = step.round_dir / "prompts.jsonl"
    unique = {json.dumps({"messages": p.prompt}, ensure_ascii=False, sort_keys=True) for p in step.prefs}
    files.write_text(prompts, "".join(line + "\n" for line in sorted(unique)))
    step.runner.stage("ppo", ["ppo", "--policy", str(step.start), "--reward", str(step.reward_dir), "--prompts",
                              str(prompts), "--out", str(new), *to_flags(step.settings["ppo"])], new)
    return new


def kto_step(step: AlignStep) -> Path:
    """`chatforge kto` on the feedback's rows plus the generated and extra pairs, unpaired (the
    feedback's own pairs are its thumbs and corrections, already rows)."""
    rows = read_unpaired(step.kto_rows) if _count_lines(step.kto_rows) else []
    for p in step.other_prefs:
        rows += [Unpaired(p.prompt, p.chosen, True), Unpaired(p.prompt, p.rejected, False)]
    if len(rows) < 2:
        raise ChatforgeError(f"--align kto needs at least two rated replies or pairs; round {step.round_dir.name} "
                             f"has {len(rows)}")
    data = step.round_dir / "kto.jsonl"
    write_unpaired(data, rows)
    new = step.round_dir / "kto"
    kto_opts = keep_adapter({**(step.settings.get("kto") or {}), **({"val_fraction": 0} if len(rows) < 40 else {})})
    step.runner.stage("kto", ["kto", "--base", str(step.start), "--data", str(data), "--out", str(new),
                              *to_flags(kto_opts)], new)
    return new


@dataclass(frozen=True)
class Aligner:
    config: type                       # its command's options: the settings section of its name
    run: Callable[[AlignStep], Path]   # runs the step's command, returns the new model's folder
    thumbs: bool = False               # learns from every rated reply (kto.jsonl): needs no pairs


# The round's alignment methods: align.algo (--align) names one. A new method is one entry here.
ALIGNERS = {"dpo": Aligner(DPOConfig, dpo_step), "ppo": Aligner(PPOConfig, ppo_step),
            "kto": Aligner(KTOConfig, kto_step, thumbs=True)}
ALGOS = tuple(ALIGNERS)


def run_round(settings: dict, run_dir: Path, data: Path, docs: list[Path], unseen: tuple[Path, Path] | None,
              feedback: str | None, generated: bool, force: bool, run_command: RunCommand,
              server: str | None = None) -> dict:
    """One round (see the module docstring); returns its round.json. `unseen` is the held-out
    manual's (questions file, documents) as the pipeline measured it, or None. `run_command(argv)`
    runs a stage's `chatforge` command line (`chatforge.stages.Runner`). `server`: a running
    `chatforge serve --upstream` whose engine gets a promoted model (continual_engine)."""
    align = settings["align"]
    check_settings(align)
    check_aligner_section(settings)
    extra = [Path(p) for p in (align.get("prefs") or [])]
    for p in extra:
        if not p.is_file():
            raise ChatforgeError(f"align.prefs: {p} does not exist")
    generated = bool(generated or align.get("generated"))
    if feedback and not is_url(str(feedback)) and not Path(feedback).is_file():
        raise ChatforgeError(f"--feedback {feedback} does not exist: give the database `chatforge serve --db` writes")
    if not (feedback or generated or extra):
        raise ChatforgeError("a round needs preference pairs: --feedback FILE.sqlite, --generated-prefs or align.prefs")
    served = served_model(run_dir)
    if not (served / "config.json").is_file():
        raise ChatforgeError(f"no model to improve at {served}: run the pipeline to its sft stage first")

    # What the round learns from, exported first (cheap) to know whether anything is new.
    staging = run_dir / ".pipeline" / "feedback-export"
    if feedback:
        with FeedbackStore(feedback, create=False) as store:   # what `chatforge feedback export` writes
            export_training_data(store, staging)
    exported = [staging / "preferences.jsonl", staging / "sft.jsonl"] if feedback else []
    # An aligner that learns from every thumb (kto.jsonl) needs no pairs, and its rows name the round.
    thumbs = ALIGNERS[align["algo"]].thumbs
    learned = [*exported[:1], *extra] + ([staging / "kto.jsonl"] if thumbs and feedback else [])
    if not generated and not sum(_count_lines(p) for p in learned):
        others = [f"--align {name}" for name, a in ALIGNERS.items() if a.thumbs]
        raise ChatforgeError(f"no preference pairs to learn from: {redact(str(feedback))} holds no corrected reply "
                             "and no question with both an up- and a down-voted reply yet; add --generated-prefs or "
                             "wait for more votes" + ("" if thumbs else f" (or {' / '.join(others)}, which learns "
                                                                         "from every thumb)"))
    if thumbs and feedback:
        exported.append(staging / "kto.jsonl")
    keys = ("align", "prefs", "sft", "reward", "dpo", "ppo", "eval")
    named = {k: settings[k] for k in keys}
    if align["algo"] not in named:   # an aligner added later: its section names its rounds (others as before)
        named[align["algo"]] = settings.get(align["algo"]) or {}
    if align.get("retriever"):
        named["retriever"] = settings.get("retriever")
    else:   # a round without the retriever step is named as before it existed
        named["align"] = {k: v for k, v in align.items() if k != "retriever"}
    identity = hashlib.sha256(json.dumps([_digest(exported), _digest(extra), generated, named],
                                         sort_keys=True, default=str)
                              .encode()).hexdigest()
    done = round_dirs(run_dir)
    last = read_round(done[-1]) if done else {}
    if last.get("identity") == identity and not force:
        if last.get("finished"):
            print(f"\n== round {done[-1].name}: up to date (no new feedback or settings since); "
                  f"serving {served_model(run_dir)}")
            return last
        round_dir, info = done[-1], last          # resume the unfinished round
        print(f"\n== round {round_dir.name}: resuming")
    else:
        round_dir = run_dir / "rounds" / str(int(done[-1].name) + 1 if done else 1)
        info = {"identity": identity, "previous": str(served), "algo": align["algo"],
                "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        if feedback:
            (round_dir / "feedback").mkdir(parents=True, exist_ok=True)
            for p in exported:
                shutil.copyfile(p, round_dir / "feedback" / p.name)
        files.write_json(round_dir / ROUND_FILE, info)
        print(f"\n== round {round_dir.name}: from {served}")
    previous = Path(info["previous"])
    runner = Runner(round_dir, force, run_command)
    t0 = time.time()

    # Preference pairs: the users', generated ones, the files the config names.
    parts = [round_dir / "feedback" / "preferences.jsonl"] if feedback else []
    if generated:
        out = round_dir / "prefs-generated.jsonl"
        skip = ["--skip-voted", str(parts[0])] if parts and _count_lines(parts[0]) else []
        runner.stage("prefs", ["prefs", "make", "--model", str(previous), "--data", str(data),
                               "--docs", *map(str, docs), "--out", str(out), *skip,
                               *to_flags(settings["prefs"])], out)
        parts.append(out)
    parts += extra
    prefs = [p for part in parts if _count_lines(part) for p in read_preferences(part)]
    other_prefs = [p for part in parts[1 if feedback else 0:] if _count_lines(part) for p in read_preferences(part)]
    kto_rows = round_dir / "feedback" / "kto.jsonl"
    if not prefs and not (thumbs and _count_lines(kto_rows)):
        raise ChatforgeError(f"round {round_dir.name} has no preference pairs: `prefs make` made none (see its "
                             "report above) and the feedback holds none")
    pairs = round_dir / "preferences.jsonl"
    write_preferences(pairs, prefs)
    counts = {"pairs": len(prefs), "from": {str(p): _count_lines(p) for p in parts}}

    # The retriever, on the Q&A and the answers users wrote or liked (align.retriever).
    retriever = None
    embedding_model = served_embedding_model(previous)
    if align.get("retriever"):
        if retrieval_mode(settings, embedding_model) == "bm25":
            print("note: align.retriever is on but the round's evaluations retrieve with bm25 (see above): "
                  "no retriever is trained")
        else:
            retriever = retriever_step(settings, runner, round_dir, data, docs, unseen, previous)
            embedding_model = retriever["use"]

    # SFT on what users wrote or liked, in the prompt they were served.
    start = previous
    corrections = round_dir / "feedback" / "sft.jsonl"
    counts["sft_examples"] = _count_lines(corrections)
    if counts["sft_examples"] >= MIN_SFT_EXAMPLES:
        sft_data = round_dir / "sft-data"
        sft_data.mkdir(exist_ok=True)
        shutil.copyfile(corrections, sft_data / "qa_train.jsonl")
        sft_opts = {**keep_adapter({"method": "full", **settings["sft"]}), "steps": None, "epochs": align["sft_epochs"], "grounded_fraction": 0.0,
                    "grounded_only": False, "section_examples": None, "docs": None}
        runner.stage("sft", ["sft", "--base", str(previous), "--data", str(sft_data), "--out", str(round_dir / "sft"),
                             *to_flags(sft_opts)], round_dir / "sft")
        start = round_dir / "sft"
    elif feedback:
        print(f"note: {counts['sft_examples']} corrected or up-voted replies: too few for an SFT step; "
              "they still count in the preference pairs")

    # The reward model: the judge of the win-rate, and PPO's reward.
    reward_dir: Path | None = None
    if str(align["reward"]) == "train":
        if len(prefs) >= align["min_reward_pairs"] or align["algo"] == "ppo":
            reward_dir = round_dir / "reward"
            runner.stage("reward", ["reward", "train", "--base", str(start), "--prefs", str(pairs),
                                    "--out", str(reward_dir), *to_flags(settings["reward"])], reward_dir)
        else:
            print(f"note: {len(prefs)} pairs, fewer than align.min_reward_pairs ({align['min_reward_pairs']}): "
                  "no reward model, so no win-rate this round")
    elif str(align["reward"]) != "none":
        reward_dir = Path(align["reward"])
    new = ALIGNERS[align["algo"]].run(AlignStep(settings, runner, round_dir, start, pairs, prefs, other_prefs,
                                                reward_dir, kto_rows))

    # The new model answers as the served one did, with the retriever the round keeps (answer.json).
    record_answer_settings(previous, new, embedding_model)

    # The new model on the served model's questions and settings.
    comparisons: dict[str, dict] = {}
    evals = [("eval", ["--data", str(data), "--questions", str(data / "qa_val.jsonl"), "--docs", *map(str, docs)])]
    if unseen is not None:
        evals.append(("eval-unseen", ["--questions", str(unseen[0]), "--docs", str(unseen[1])]))
    for name, inputs in evals:
        before = previous.parent / name
        if not (before / "eval.json").is_file():   # the served model was never measured so: measure it
            before = round_dir / f"{name}-previous"
            runner.stage(f"{name}-previous", ["eval", "--model", str(previous), *inputs, "--out", str(before),
                                              *to_flags(settings["eval"])], before)
        runner.stage(name, ["eval", "--model", str(new), *inputs, "--out", str(round_dir / name),
                            *to_flags(settings["eval"])], round_dir / name)
        comparisons[name] = (before, round_dir / name)

    judge = None
    if reward_dir is not None:
        judge = load_reward_model(reward_dir)
    results = {name: compare(b, a, judge) for name, (b, a) in comparisons.items()}
    reward_accuracy = None
    if reward_dir is not None and (reward_dir / "reward.json").is_file():
        reward_accuracy = json.loads((reward_dir / "reward.json").read_text()).get("metrics", {}).get("all")

    # Promote or keep the served model.
    why_not = []
    val = results["eval"]
    win = (val.get("win") or {}).get("win_rate")
    if win is not None and win < 0.5:
        why_not.append(f"reward win-rate {win:.3f} < 0.5")
    rouge = val["metrics"].get("rougeL")
    if rouge and rouge["change"] < -float(align["max_rouge_drop"]):
        why_not.append(f"ROUGE-L fell {-rouge['change']:.3f} (> align.max_rouge_drop {align['max_rouge_drop']})")
    promoted = align["promote"] == "always" or (align["promote"] == "better" and not why_not)
    if promoted:
        point_at(run_dir, new)
    info.update(model=str(new), counts=counts, reward=str(reward_dir) if reward_dir else None, retriever=retriever,
                reward_heldout=reward_accuracy, comparison=results, promoted=promoted, kept_because=why_not,
                stages={n: round(s, 1) for n, s, _ in runner.times}, seconds=round(time.time() - t0, 1),
                finished=time.strftime("%Y-%m-%d %H:%M:%S"))
    files.write_json(round_dir / ROUND_FILE, info)

    print(f"\n== round {round_dir.name}: {len(prefs)} preference pairs, {counts['sft_examples']} SFT examples, "
          f"{align['algo']} -> {new}")
    if reward_accuracy:
        print(f"reward model: held-out pair accuracy {reward_accuracy.get('model')} (longer answer wins: "
              f"{reward_accuracy.get('longer_wins')}, chance 0.5) on {reward_accuracy.get('pairs')} pairs")
    if retriever is not None:
        print(f"retriever ({retriever['mode']} hit@1 / hit@3, before -> after; the feedback's "
              f"{(retriever['feedback'] or {}).get('pairs', 0)} copied answers trained on):")
        for name, b in retriever["before"].items():
            a, m = retriever["after"][name], retriever["mode"]
            print(f"  {name:<28} {_h(b[m]['hit@1'])} / {_h(b[m]['hit@3'])} -> {_h(a[m]['hit@1'])} / {_h(a[m]['hit@3'])}")
        print(f"  kept: {retriever['trained']} (in the new model's answer.json)" if retriever["kept"] else
              f"  not kept ({'; '.join(retriever['kept_because'])}): the new model retrieves with "
              f"{retriever['base'] or 'the default embedding model'}")
    for name, result in results.items():
        print(format_comparison(name, result))
    if promoted:
        print(f"promoted: {run_dir / LINK} -> {new}  (undo: chatforge pipeline --rollback)")
    else:
        print(f"kept {previous} ({'; '.join(why_not) or 'align.promote is never'}); the new model stays in {new}")
    print(f"a running `chatforge serve --model {run_dir / LINK}` picks it up on `kill -HUP PID` or "
          "POST /admin/reload")
    if promoted:
        # Through another engine (serve --upstream): load it there, or say how.
        info["engine"] = reach_engine(run_dir, new, server)
        files.write_json(round_dir / ROUND_FILE, info)
    return info
