"""`chatforge ppo`: reinforcement learning of a chat model against a reward model (PPO or GRPO).

    chatforge ppo --policy runs/demo/sft --reward runs/demo/reward --prompts questions.jsonl \\
        --docs ~/.cache/chatforge/sources/debian-faq --out runs/demo/ppo
    chatforge ppo ... --algo grpo --samples 4         # group-relative advantages, no value head
    chatforge ppo ... --resume                        # continue from runs/demo/ppo/last/

A run is a sequence of phases. Each phase takes the next `--rollout-prompts` prompts, samples
`--samples` replies to each with the policy's current weights through the inference engine
(batched, seeded, temperature `--temperature`), scores each whole reply with the reward model
(`train/reward.py`, `RewardModel.score_ids`), computes the policy's, the reference's and the
value head's per-token numbers once, and then trains `--epochs` passes over the phase's replies
in minibatches of `--minibatch` prompts: one optimizer step each, on the shared training loop
(`train/loop.py`: AdamW, schedule, clipping, bf16 autocast, checkpoints, `--resume`). The losses
are the pure functions of `train/rl_losses.py`; sampling and measuring is `train/rollouts.py`.

PPO (`--algo ppo`, Ziegler et al. 2019 / Ouyang et al. 2022): per-token rewards are -beta * k1
(the log-ratio to the reference) on every token plus the reply's score on its last token;
scores are normalised once by the mean and standard deviation of the first phase's scores (the
SFT policy's replies, as Ziegler et al. normalise their reward model), so the value head starts
out near right. Advantages by GAE (`--gamma`, `--lam`), whitened over the phase; the loss is
the clipped surrogate (`--clip`) plus `--vf-coef` times the clipped value loss (`--vf-clip`).
GRPO (`--algo grpo`, Shao et al. 2024): `--samples` replies per prompt, each reply's advantage
is its score minus its group's mean over the group's standard deviation, on all its tokens; no
value head; the KL to the reference is a loss term, beta times the mean k3 estimate per token.

The KL coefficient beta (`--kl-coef`) is adaptive (`--kl-target`, `--kl-horizon`): after each
phase, the mean sequence KL of its replies (sum of k1 over a reply, in nats) moves beta up when
above the target and down when below (`AdaptiveKLController`). The reference is the model
`--policy` names: with `--method lora` (default) the policy IS the reference with its adapters
switched off (no second copy in memory); `--method full` keeps a frozen copy.

Value head: a `ValueHead` (model/heads.py) on the policy's own final hidden states, the state
before each reply token, trained through the shared LoRA adapters. A separate value model
would double every forward and backward pass on a CPU, and the adapters are all the backbone
the value loss can move (scaled by `--vf-coef`).

Rollouts (`train/rollouts.py`): the engine samples from a copy of the policy made once, in bf16
with LoRA where the CPU has native bf16 (fp32 for `--method full`, whose small updates bf16 would
round away; `--rollout-dtype`), whose adapters are refreshed in place each phase; the training
forward recomputes the log-probabilities.

Prompts (`--prompts`, and `--eval-prompts` or a seeded `--holdout` share of them for the
held-out evaluation): JSONL lines `{"messages": [...]}` (turns after the last user turn are
dropped, so a Q&A file works), `{"prompt": "text" or messages}` or `{"question": "text"}`.
With `--docs`, each prompt's last user turn gets retrieval's grounded prompt (the format SFT and
eval use: passages, then "Question: ..."), earlier user/assistant turns kept as history. A bad
line is an error naming file and line.

Logged in `OUT/metrics.jsonl` at every step: `loss`, `policy_loss`, `value_loss`,
`clip_fraction`, `value_clip_fraction`, `entropy` (per token), `approx_kl` (rollout policy vs
current, k3), and the phase's rollout numbers: `reward` (mean raw score), `reward_std`, `kl`
(mean sequence KL to the reference), `kl_coef`, `length` (reply tokens), `truncated` (replies cut
at `--max-new-tokens`), `distinct` (share of distinct replies). The held-out evaluation (every
`--eval-every` phases, and at the end): the reward model's mean score of greedy and of sampled
replies, the sampled replies' KL to the reference, lengths and distinct shares, in `ppo.json`.
The policy is saved as a plain model folder (adapters merged) in `--out`.
"""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path
from typing import Any

from chatforge import files
from chatforge.commands import leaf, option_defaults
from chatforge.errors import ChatforgeError

ALGOS = ("ppo", "grpo")
METHODS = ("lora", "full")
DEFAULT_KL_COEF = {"ppo": 0.2, "grpo": 0.04}   # TRL's PPO and the GRPO paper's starting values
DEFAULT_SAMPLES = {"ppo": 1, "grpo": 4}
DEFAULT_LR = {"lora": 1e-4, "full": 1e-6}


# ---------------------------------------------------------------------------------------------
# Options


def add_options(p: argparse.ArgumentParser) -> None:
    from chatforge.train.sft import add_lora_options

    p.add_argument("--policy", default=None, help="model folder to start from and stay near (e.g. runs/demo/sft)")
    p.add_argument("--reward", default=None, help="reward model folder from `chatforge reward train`")
    p.add_argument("--prompts", default=None,
                   help='JSONL of {"messages": [...]}, {"prompt": ...} or {"question": ...} lines to sample replies to')
    p.add_argument("--out", default=None, help="output folder (default: a `ppo` folder beside --policy)")
    p.add_argument("--algo", default="ppo", choices=ALGOS,
                   help="ppo: value head + GAE; grpo: advantages relative to each prompt's group of samples")
    p.add_argument("--docs", nargs="*", default=None,
                   help="documents (files or folders): each prompt gets the grounded prompt, as in chat and eval")
    p.add_argument("--context-tokens", type=int, default=None,
                   help="passage budget of a grounded prompt (default: the one eval uses)")
    from chatforge.commands import add_retrieval as add_retrieval_arguments

    add_retrieval_arguments(p)
    p.add_argument("--eval-prompts", default=None,
                   help="held-out prompts, same formats (default: a --holdout share of --prompts)")
    p.add_argument("--holdout", type=float, default=0.1,
                   help="share of --prompts held out for evaluation when there is no --eval-prompts")
    p.add_argument("--max-eval-prompts", type=int, default=16, help="most held-out prompts (0 = no evaluation)")
    p.add_argument("--eval-samples", type=int, default=4,
                   help="sampled replies per held-out prompt (besides the greedy one)")
    p.add_argument("--phases", type=int, default=20, help="rollout phases: sample, score, then --epochs passes")
    p.add_argument("--rollout-prompts", type=int, default=16, help="prompts sampled in each phase")
    p.add_argument("--samples", type=int, default=None, help="replies per prompt (default: 1 ppo, 4 grpo)")
    p.add_argument("--minibatch", type=int, default=4, help="prompts (with all their replies) per optimizer step")
    p.add_argument("--epochs", type=int, default=2, help="passes over each phase's replies")
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest reply")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature; log-probabilities are taken at the same temperature")
    p.add_argument("--rollout-dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="weights the engine samples with: auto = bf16 where native with lora, else fp32")
    p.add_argument("--clip", type=float, default=0.2,
                   help="ratio clipping: a token whose ratio left 1 +- clip gets no gradient")
    p.add_argument("--vf-coef", type=float, default=0.1, help="weight of the value loss (ppo)")
    p.add_argument("--vf-clip", type=float, default=0.2,
                   help="an update moves a value at most this far from its rollout estimate")
    p.add_argument("--gamma", type=float, default=1.0, help="discount (ppo)")
    p.add_argument("--lam", type=float, default=0.95, help="GAE lambda (ppo)")
    p.add_argument("--kl-coef", type=float, default=None,
                   help="starting KL coefficient beta (default: 0.2 ppo, 0.04 grpo)")
    p.add_argument("--kl-target", type=float, default=6.0,
                   help="target KL to the reference per reply, in nats; beta adapts towards it (0 = fixed beta)")
    p.add_argument("--kl-horizon", type=int, default=1000,
                   help="replies over which beta may change by 20%% (Ziegler et al. used 10000 on far longer runs)")
    p.add_argument("--method", default="lora", choices=METHODS,
                   help="lora: adapters (the policy without them is the reference); full: every weight (a frozen copy)")
    add_lora_options(p, dropout=None)
    p.add_argument("--eval-every", type=int, default=5, help="phases between held-out evaluations")
    p.add_argument("--save-every", type=int, default=1, help="phases between last/ checkpoints")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 1e-4 lora, 1e-6 full)")
    p.add_argument("--warmup", type=int, default=0, help="warm-up optimizer steps")
    p.add_argument("--schedule", default="constant", choices=["cosine", "wsd", "constant"],
                   help="learning-rate schedule")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (matrices only)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0 = off)")
    p.add_argument("--log-every", type=int, default=1, help="steps between metrics.jsonl lines")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="training precision")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, mps")
    p.add_argument("--seed", type=int, default=1337, help="seed of the prompt order, sampling and adapters")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last/ checkpoint")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("examples:\n"
                     "  chatforge ppo --policy runs/demo/sft --reward runs/demo/reward --prompts questions.jsonl "
                     "--docs my_docs/ --out runs/demo/ppo\n"
                     "  chatforge ppo ... --algo grpo --samples 4 --max-new-tokens 48\n"
                     "  chatforge ppo ... --resume\n\n"
                     'prompts: one JSON object a line: {"question": "How do I ...?"}, {"prompt": ...} or\n'
                     '  {"messages": [...]}\n'
                     "reward model: chatforge reward train --base runs/demo/sft --prefs prefs.jsonl "
                     "--out runs/demo/reward")
    add_options(parser)
    leaf(parser, run)


def default_options() -> dict[str, Any]:
    return option_defaults(add_options)


# ---------------------------------------------------------------------------------------------
# Prompts


def parse_prompt(obj: object) -> list[dict]:
    """One line's object as prompt messages ending with a user turn; ValueError saying what is wrong."""
    from chatforge.data.prefs import prompt_messages

    if not isinstance(obj, dict):
        raise ValueError("expected a JSON object")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list):
            raise ValueError('"messages" must be a list of {"role", "content"} messages')
        users = [i for i, m in enumerate(msgs) if isinstance(m, dict) and m.get("role") == "user"]
        if not users:
            raise ValueError('"messages" holds no user turn to reply to')
        return prompt_messages(msgs[:users[-1] + 1])     # a reply after the last question is dropped
    if "prompt" in obj:
        if isinstance(obj["prompt"], str) and not obj["prompt"].strip():
            raise ValueError('"prompt" is empty')
        return prompt_messages(obj["prompt"])
    if "question" in obj:
        if not isinstance(obj["question"], str) or not obj["question"].strip():
            raise ValueError('"question" must be a non-empty string')
        return [{"role": "user", "content": obj["question"]}]
    raise ValueError('expected {"messages": [...]}, {"prompt": ...} or {"question": "..."}')


def read_prompts(path: str | Path) -> list[list[dict]]:
    """Every prompt of a JSONL file (blank lines skipped); a bad line names file:line."""
    out = []
    for lineno, obj in files.iter_jsonl(path, 'write one {"question": "..."} a line'):
        try:
            out.append(parse_prompt(obj))
        except ValueError as e:
            raise ChatforgeError(f"{path}:{lineno}: {e}") from None
    if not out:
        raise ChatforgeError(f'{path} holds no prompts; write one {{"question": "..."}} a line')
    return out


def ground(prompts: list[list[dict]], index, tokenizer, budget: int, k: int = 3) -> list[list[dict]]:
    """Each prompt's last user turn as a grounded question (retrieval's prompt format), earlier
    user/assistant turns as its history; prompts already grounded ("Context:") stay as they are."""
    from chatforge.retrieval import grounded_messages
    from chatforge.retrieval.fusion import search_turn

    out = []
    for msgs in prompts:
        question = msgs[-1]["content"]
        if question.startswith("Context:"):
            out.append(msgs)
            continue
        history = [m for m in msgs[:-1] if m["role"] != "system"]
        out.append(grounded_messages(question, search_turn(index, question, k, history), history=history,
                                     max_context_tokens=budget, tokenizer=tokenizer))
    return out


# ---------------------------------------------------------------------------------------------
# The loss


def make_loss_fn(algo: str, clip: float, vf_coef: float, vf_clip: float):
    """The loop's loss: (mean over the minibatch's reply tokens, token count, metrics)."""
    from chatforge.train.rl_losses import clipped_policy_loss, clipped_value_loss, kl_estimate, masked_mean

    def loss_fn(model, batch: dict):
        logps, values, entropy = model(batch)
        mask = batch["response_mask"]
        loss, clip_fraction = clipped_policy_loss(logps, batch["old_logps"], batch["advantages"], mask, clip)
        metrics = {"policy_loss": loss.detach(), "clip_fraction": clip_fraction, "entropy": masked_mean(entropy, mask),
                   "approx_kl": masked_mean(kl_estimate(batch["old_logps"], logps.detach(), "k3"), mask)}
        if values is not None:
            value_loss, value_clipped = clipped_value_loss(values, batch["old_values"], batch["returns"], mask, vf_clip)
            loss = loss + vf_coef * value_loss
            metrics.update(value_loss=value_loss.detach(), value_clip_fraction=value_clipped)
        if algo == "grpo":
            loss = loss + batch["kl_coef"] * masked_mean(kl_estimate(logps, batch["ref_logps"], "k3"), mask)
        metrics.update({k.removeprefix("stat_"): v for k, v in batch.items() if k.startswith("stat_")})
        return loss, mask.sum(), metrics
    return loss_fn


# ---------------------------------------------------------------------------------------------
# The stage


def _save_fn(out: Path, tokenizer, method: str):
    """At the top of `out` the policy as a plain model folder (adapters merged); in `last/` the
    trained module's own weights (adapters unmerged, the value head), which `--resume` loads."""
    from chatforge.model import folder as model_folder
    from chatforge.model.lora import merged_state_dict

    def save(folder: Path, module, state: dict) -> None:
        if Path(folder).resolve() != out.resolve():
            # Clones: a tied embedding appears twice and safetensors refuses shared memory.
            model_folder.save_weights(Path(folder) / model_folder.WEIGHTS, module,
                                      {k: v.clone() for k, v in state.items()})
            return
        plain = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
        gpt = module.model
        model_folder.save_model(folder, gpt, tokenizer,
                                state=merged_state_dict(gpt, plain) if method == "lora" else plain)
    return save


def _check(o: dict) -> None:
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ChatforgeError(msg)

    need(o["algo"] in ALGOS, f"--algo must be one of {', '.join(ALGOS)}, got {o['algo']!r}")
    need(o["method"] in METHODS, f"--method must be one of {', '.join(METHODS)}, got {o['method']!r}")
    for name in ("phases", "rollout_prompts", "samples", "minibatch", "epochs", "max_new_tokens", "eval_every",
                 "eval_samples", "save_every", "kl_horizon"):
        need(o[name] >= 1, f"--{name.replace('_', '-')} must be at least 1, got {o[name]}")
    need(o["algo"] != "grpo" or o["samples"] >= 2,
         "--algo grpo compares the replies to one prompt: give --samples 2 or more")
    need(o["minibatch"] <= o["rollout_prompts"], "--minibatch cannot exceed --rollout-prompts")
    need(o["temperature"] > 0, f"--temperature must be positive (sampling), got {o['temperature']}")
    need(0 < o["clip"] < 1 and o["vf_clip"] > 0, "--clip must be in (0, 1) and --vf-clip positive")
    need(0 < o["gamma"] <= 1 and 0 <= o["lam"] <= 1, "--gamma must be in (0, 1] and --lam in [0, 1]")
    need(o["kl_coef"] >= 0 and o["kl_target"] >= 0 and o["vf_coef"] >= 0,
         "--kl-coef, --kl-target and --vf-coef must be >= 0")
    need(0 <= o["holdout"] < 1, f"--holdout must be in [0, 1), got {o['holdout']}")
    need(int(os.environ.get("WORLD_SIZE", "1")) == 1, "chatforge ppo runs in one process; start it without torchrun")


def run_ppo(policy: str | Path, reward: str | Path, prompts: str | Path, out: str | Path | None = None,
            **options: Any) -> dict:
    """Train `policy` against the reward model in `reward` on `prompts` into `out`; returns the
    report (also `OUT/ppo.json`). `options` are the command's options by their Python names."""
    import copy

    import torch

    from chatforge.retrieval import DEFAULT_CONTEXT_TOKENS
    from chatforge.model.folder import load_model
    from chatforge.model.lora import apply_lora
    from chatforge import runtime
    from chatforge.train.loop import TrainConfig, train
    from chatforge.train.reward import load_reward_model
    from chatforge.train.rollouts import PolicyValue, Rollouts
    from chatforge.train.sft import top_block_targets

    o = default_options()
    unknown = set(options) - set(o)
    if unknown:
        raise ChatforgeError(f"unknown ppo option(s) {sorted(unknown)}; valid: {', '.join(sorted(o))}")
    o.update(options)
    for name, defaults in (("samples", DEFAULT_SAMPLES), ("kl_coef", DEFAULT_KL_COEF)):
        if o[name] is None and o["algo"] in defaults:
            o[name] = defaults[o["algo"]]
    if not policy:
        raise ChatforgeError("pass --policy DIR: the model folder to train (e.g. the output of `chatforge sft`)")
    if not reward:
        raise ChatforgeError("pass --reward DIR: a reward model folder (`chatforge reward train`)")
    if not prompts:
        raise ChatforgeError('pass --prompts FILE.jsonl: one {"question": "..."} (or "prompt" / "messages") a line')
    _check(o)
    policy, out = Path(policy), Path(out) if out else Path(policy).parent / "ppo"

    model, tok = load_model(policy)
    device = runtime.pick_device(o["device"])
    precision = runtime.resolve_precision(o["precision"], device)
    rm = load_reward_model(reward, str(device))
    train_msgs = read_prompts(prompts)
    eval_msgs = read_prompts(o["eval_prompts"]) if o["eval_prompts"] else []
    if not o["eval_prompts"] and o["holdout"] > 0 and o["max_eval_prompts"] > 0 and len(train_msgs) > 1:
        order = random.Random(o["seed"]).sample(range(len(train_msgs)), len(train_msgs))
        n_held = min(len(train_msgs) - 1, o["max_eval_prompts"], max(1, round(o["holdout"] * len(train_msgs))))
        eval_msgs = [train_msgs[i] for i in sorted(order[:n_held])]
        train_msgs = [train_msgs[i] for i in sorted(order[n_held:])]
    eval_msgs = eval_msgs[:o["max_eval_prompts"]]
    ctx = model.config.max_seq_len
    if o["docs"]:
        paths = [Path(d) for d in o["docs"] if Path(d).exists()]
        if not paths:
            raise ChatforgeError(f"none of the --docs paths exist: {', '.join(o['docs'])}")
        from chatforge.retrieval.fusion import load_retriever

        index = load_retriever(paths, mode=o["retrieval"], model=o["embedding_model"])
        # Room for the question, the template and the reply within the context, as eval leaves.
        budget = max(64, min(o["context_tokens"] or DEFAULT_CONTEXT_TOKENS, ctx - o["max_new_tokens"] - 96))
        train_msgs, eval_msgs = ground(train_msgs, index, tok, budget), ground(eval_msgs, index, tok, budget)

    def encode(msgs: list[list[dict]]) -> tuple[list[list[int]], int]:
        ids = [tok.render_chat(m, add_generation_prompt=True)[0] for m in msgs]
        kept = [i for i in ids if len(i) + o["max_new_tokens"] <= ctx]
        return kept, len(ids) - len(kept)
    (train_ids, long_train), (eval_ids, long_eval) = encode(train_msgs), encode(eval_msgs)
    if not train_ids:
        raise ChatforgeError(f"no prompt of {prompts} leaves room for --max-new-tokens {o['max_new_tokens']} in the "
                             f"model's {ctx}-token context; shorten them or lower --context-tokens / --max-new-tokens")

    reference = copy.deepcopy(model).to(device).eval().requires_grad_(False) if o["method"] == "full" else None
    torch.manual_seed(o["seed"])   # LoRA's A matrices
    if o["method"] == "lora":
        targets = [t.strip() for t in str(o["lora_targets"]).split(",") if t.strip()]
        apply_lora(model, o["lora_rank"], o["lora_alpha"], 0.0, top_block_targets(model, targets, o["lora_layers"]))
    gen_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(o["rollout_dtype"])
    if gen_dtype is None:
        # bf16 would round away a full fine-tune's small updates; LoRA keeps its adapters apart.
        native = runtime.bf16_supported(device) and o["method"] == "lora"
        gen_dtype = torch.bfloat16 if native else torch.float32
    # The engine's model, adapters included, refreshed in place each phase (train/rollouts.py).
    rollout_model = copy.deepcopy(model).to(device=device, dtype=gen_dtype).eval().requires_grad_(False)
    module = PolicyValue(model, o["algo"] == "ppo", o["temperature"])
    params = [p for p in module.parameters() if p.requires_grad]
    source = Rollouts(module.to(device), tok, rm, train_ids, eval_ids, o, device, precision, rollout_model, reference)
    steps = o["phases"] * source.steps_per_phase
    lr = o["lr"] if o["lr"] is not None else DEFAULT_LR[o["method"]]
    # One minibatch an optimizer step; no validation batches (the held-out evaluation is the source's);
    # no compilation (every minibatch has its own shape).
    cfg = TrainConfig(max_steps=steps, lr=lr, min_lr_ratio=0.1, warmup_steps=o["warmup"], schedule=o["schedule"],
                      weight_decay=o["weight_decay"], grad_clip=o["grad_clip"],
                      batch_size=o["minibatch"] * o["samples"], seq_len=o["max_new_tokens"], eval_every=steps,
                      save_every=o["save_every"] * source.steps_per_phase, log_every=o["log_every"],
                      precision=o["precision"], compile="off", device=o["device"], seed=o["seed"])
    print(f"{o['algo']} ({o['method']}): {len(train_ids)} prompts, {len(eval_ids)} held out"
          f"{f' ({long_train + long_eval} too long for the context, left out)' if long_train + long_eval else ''}; "
          f"{o['phases']} phases of {o['rollout_prompts']} prompts x {o['samples']} replies of up to "
          f"{o['max_new_tokens']} tokens, {source.steps_per_phase} steps each at lr {lr:g}; training "
          f"{sum(p.numel() for p in params) / 1e6:.2f}M parameters; sampling in "
          f"{str(gen_dtype).removeprefix('torch.')}")
    out.mkdir(parents=True, exist_ok=True)
    result = train(module, source, make_loss_fn(o["algo"], o["clip"], o["vf_coef"], o["vf_clip"]), cfg, out,
                   tokenizer=tok, resume=o["resume"], params=params, save_fn=_save_fn(out, tok, o["method"]))
    if eval_ids and not result.interrupted and (not source.heldout or source.heldout[-1]["step"] != result.step):
        source.heldout.append(source.evaluate(step=result.step))
    report = {"policy": str(policy), "reward": str(reward), "prompts": str(prompts), "algo": o["algo"],
              "method": o["method"], "steps": result.step, "phases": source.phase, "lr": lr,
              "train_prompts": len(train_ids), "eval_prompts": len(eval_ids), "grounded": bool(o["docs"]),
              "prompt_tokens": {"min": min(map(len, train_ids)), "max": max(map(len, train_ids)),
                                "mean": round(sum(map(len, train_ids)) / len(train_ids))}, "kl_target": o["kl_target"],
              "kl_coef": source.kl.coef, "score_norm": source.score_norm, "heldout": source.heldout,
              "options": {k: v for k, v in o.items() if k not in ("resume",)},
              "seconds": round(result.seconds, 1), "interrupted": result.interrupted}
    files.write_json(out / "ppo.json", report)
    if len(source.heldout) >= 2:
        a, b = source.heldout[0], source.heldout[-1]
        print(f"held-out reward (greedy) {a['reward_greedy']:.3f} -> {b['reward_greedy']:.3f}, (sampled) "
              f"{a['reward_sampled']:.3f} -> {b['reward_sampled']:.3f}; kl {b['kl']:.3f} "
              f"(target {o['kl_target']:g}) -> {out}")
    return report


def run(args: argparse.Namespace) -> int:
    options = {k: v for k, v in vars(args).items()
               if not k.startswith("_") and k not in ("config", "policy", "reward", "prompts", "out")}
    report = run_ppo(args.policy, args.reward, args.prompts, args.out, **options)
    return 130 if report["interrupted"] else 0
