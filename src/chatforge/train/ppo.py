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

Options: `PPOConfig` (its `rollout` group, `RolloutConfig`, is what `Rollouts` reads); from Python,
`run_ppo(policy, reward, prompts, out, algo="grpo", samples=4, ...)` with the flags' names.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from chatforge import files, runtime
from chatforge.data.prefs import prompt_messages
from chatforge.errors import ChatforgeError
from chatforge.model.folder import load_model
from chatforge.model.lora import LoraConfig
from chatforge.options import build, flatten, group, option
from chatforge.retrieval import DEFAULT_CONTEXT_TOKENS, grounded_messages
from chatforge.retrieval.fusion import RetrievalOptions, load_retriever, search_turn
from chatforge.train import recipe
from chatforge.train.loop import PRECISIONS, SCHEDULES, TrainConfig, train
from chatforge.train.reward import load_reward_model
from chatforge.train.rl_losses import clipped_policy_loss, clipped_value_loss, kl_estimate, masked_mean
from chatforge.train.rollouts import PolicyValue, RolloutConfig, Rollouts

METHODS = ("lora", "full")
DEFAULT_LR = {"lora": 1e-4, "full": 1e-6}


# ---------------------------------------------------------------------------------------------
# Options


@dataclass
class PPOConfig:
    """`chatforge ppo`'s options: the rollouts' (`rollout`: sampling, scoring, advantages; what
    `Rollouts` reads), the prompts', the losses' and the training loop's."""
    rollout: RolloutConfig = group(RolloutConfig)
    phases: int = option(20, "rollout phases: sample, score, then --epochs passes")
    docs: list[str] | None = option(None, "documents (files or folders): each prompt gets the grounded prompt, as "
                                          "in chat and eval")
    context_tokens: int | None = option(None, "passage budget of a grounded prompt (default: the one eval uses)")
    retriever: RetrievalOptions = group(RetrievalOptions)
    eval_prompts: str | None = option(None, "held-out prompts, same formats (default: a --holdout share of --prompts)")
    holdout: float = option(0.1, "share of --prompts held out for evaluation when there is no --eval-prompts")
    max_eval_prompts: int = option(16, "most held-out prompts (0 = no evaluation)")
    rollout_dtype: str = option("auto", "weights the engine samples with: auto = bf16 where native with lora, "
                                        "else fp32", choices=("auto", "fp32", "bf16"))
    clip: float = option(0.2, "ratio clipping: a token whose ratio left 1 +- clip gets no gradient")
    vf_coef: float = option(0.1, "weight of the value loss (ppo)")
    vf_clip: float = option(0.2, "an update moves a value at most this far from its rollout estimate")
    method: str = option("lora", "lora: adapters (the policy without them is the reference); full: every weight "
                                 "(a frozen copy)", choices=METHODS)
    # No --lora-dropout (the command leaves it out): the ratio needs the rollout's forward at training.
    lora: LoraConfig = group(LoraConfig, "lora")
    save_every: int = option(1, "phases between last/ checkpoints")
    lr: float | None = option(None, "peak learning rate (default: 1e-4 lora, 1e-6 full)")
    warmup: int = option(0, "warm-up optimizer steps")
    schedule: str = option("constant", "learning-rate schedule", choices=SCHEDULES)
    weight_decay: float = option(0.0, "AdamW weight decay (matrices only)")
    grad_clip: float = option(1.0, "max gradient norm (0 = off)")
    log_every: int = option(1, "steps between metrics.jsonl lines")
    precision: str = option("auto", "training precision", choices=PRECISIONS)
    device: str = option("auto", "auto (cuda > mps > cpu), cpu, cuda, mps")
    resume: bool = option(False, "continue the run in --out from its last/ checkpoint")

    def __post_init__(self) -> None:
        for name in ("phases", "save_every"):
            if getattr(self, name) < 1:
                raise ChatforgeError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not (0 < self.clip < 1 and self.vf_clip > 0):
            raise ChatforgeError("--clip must be in (0, 1) and --vf-clip positive")
        if self.vf_coef < 0:
            raise ChatforgeError(f"--vf-coef must be >= 0, got {self.vf_coef}")
        if not 0 <= self.holdout < 1:
            raise ChatforgeError(f"--holdout must be in [0, 1), got {self.holdout}")
        if self.lora.dropout:
            raise ChatforgeError("ppo takes no LoRA dropout: the ratios need the forward the replies were sampled with")


# ---------------------------------------------------------------------------------------------
# Prompts


def parse_prompt(obj: object) -> list[dict]:
    """One line's object as prompt messages ending with a user turn; ValueError saying what is wrong."""
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
    return files.read_parsed(path, parse_prompt, "prompts", 'write one {"question": "..."} a line')


def ground(prompts: list[list[dict]], index, tokenizer, budget: int, k: int = 3) -> list[list[dict]]:
    """Each prompt's last user turn as a grounded question (retrieval's prompt format), earlier
    user/assistant turns as its history; prompts already grounded ("Context:") stay as they are."""
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


def split_prompts(train_msgs: list, o: PPOConfig) -> tuple[list, list]:
    """(training, held-out) prompts: `--eval-prompts`, else a seeded `--holdout` share of the training ones."""
    eval_msgs = read_prompts(o.eval_prompts) if o.eval_prompts else []
    if not o.eval_prompts and o.holdout > 0 and o.max_eval_prompts > 0 and len(train_msgs) > 1:
        order = random.Random(o.rollout.seed).sample(range(len(train_msgs)), len(train_msgs))
        n_held = min(len(train_msgs) - 1, o.max_eval_prompts, max(1, round(o.holdout * len(train_msgs))))
        eval_msgs = [train_msgs[i] for i in sorted(order[:n_held])]
        train_msgs = [train_msgs[i] for i in sorted(order[n_held:])]
    return train_msgs, eval_msgs[:o.max_eval_prompts]


def run_ppo(policy: str | Path, reward: str | Path, prompts: str | Path, out: str | Path | None = None,
            config: PPOConfig | None = None, **options: Any) -> dict:
    """Train `policy` against the reward model in `reward` on `prompts` into `out`; returns the
    report (also `OUT/ppo.json`). `config` holds the options (default: `PPOConfig()`); `options`
    change some by their flat names (`algo="grpo"`, `samples=4`, `lora_rank=16`, ...)."""
    o = build(PPOConfig, {**(flatten(config) if config else {}), **options}, "ppo")
    o = dataclasses.replace(o, rollout=o.rollout.resolved())     # samples and kl_coef for the report
    r = o.rollout
    if not policy:
        raise ChatforgeError("pass --policy DIR: the model folder to train (e.g. the output of `chatforge sft`)")
    if not reward:
        raise ChatforgeError("pass --reward DIR: a reward model folder (`chatforge reward train`)")
    if not prompts:
        raise ChatforgeError('pass --prompts FILE.jsonl: one {"question": "..."} (or "prompt" / "messages") a line')
    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise ChatforgeError("chatforge ppo runs in one process; start it without torchrun")
    policy, out = Path(policy), Path(out) if out else Path(policy).parent / "ppo"

    model, tok = load_model(policy)
    device = runtime.pick_device(o.device)
    precision = runtime.resolve_precision(o.precision, device)
    rm = load_reward_model(reward, str(device))
    train_msgs, eval_msgs = split_prompts(read_prompts(prompts), o)
    ctx = model.config.max_seq_len
    if o.docs:
        paths = [Path(d) for d in o.docs if Path(d).exists()]
        if not paths:
            raise ChatforgeError(f"none of the --docs paths exist: {', '.join(o.docs)}")
        index = load_retriever(paths, mode=o.retriever.retrieval, model=o.retriever.embedding_model)
        # Room for the question, the template and the reply within the context, as eval leaves.
        budget = max(64, min(o.context_tokens or DEFAULT_CONTEXT_TOKENS, ctx - r.max_new_tokens - 96))
        train_msgs, eval_msgs = ground(train_msgs, index, tok, budget), ground(eval_msgs, index, tok, budget)

    def encode(msgs: list[list[dict]]) -> tuple[list[list[int]], int]:
        ids = [tok.render_chat(m, add_generation_prompt=True)[0] for m in msgs]
        kept = [i for i in ids if len(i) + r.max_new_tokens <= ctx]
        return kept, len(ids) - len(kept)
    (train_ids, long_train), (eval_ids, long_eval) = encode(train_msgs), encode(eval_msgs)
    if not train_ids:
        raise ChatforgeError(f"no prompt of {prompts} leaves room for --max-new-tokens {r.max_new_tokens} in the "
                             f"model's {ctx}-token context; shorten them or lower --context-tokens / --max-new-tokens")

    reference = copy.deepcopy(model).to(device).eval().requires_grad_(False) if o.method == "full" else None
    recipe.prepare(model, o.method, o.lora, r.seed)
    gen_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(o.rollout_dtype)
    if gen_dtype is None:
        # bf16 would round away a full fine-tune's small updates; LoRA keeps its adapters apart.
        native = runtime.bf16_supported(device) and o.method == "lora"
        gen_dtype = torch.bfloat16 if native else torch.float32
    # The engine's model, adapters included, refreshed in place each phase (train/rollouts.py).
    rollout_model = copy.deepcopy(model).to(device=device, dtype=gen_dtype).eval().requires_grad_(False)
    module = PolicyValue(model, r.algo == "ppo", r.temperature)
    params = [p for p in module.parameters() if p.requires_grad]
    source = Rollouts(module.to(device), tok, rm, train_ids, eval_ids, r, device, precision, rollout_model, reference)
    steps = o.phases * source.steps_per_phase
    lr = recipe.learning_rate(o, DEFAULT_LR, o.method)
    # One minibatch an optimizer step; no validation batches (the held-out evaluation is the source's);
    # no compilation (every minibatch has its own shape).
    cfg = TrainConfig(max_steps=steps, lr=lr, min_lr_ratio=0.1, warmup_steps=o.warmup, schedule=o.schedule,
                      weight_decay=o.weight_decay, grad_clip=o.grad_clip, batch_size=r.minibatch * r.samples,
                      seq_len=r.max_new_tokens, eval_every=steps, save_every=o.save_every * source.steps_per_phase,
                      log_every=o.log_every, precision=o.precision, compile="off", device=o.device, seed=r.seed)
    print(f"{r.algo} ({o.method}): {len(train_ids)} prompts, {len(eval_ids)} held out"
          f"{f' ({long_train + long_eval} too long for the context, left out)' if long_train + long_eval else ''}; "
          f"{o.phases} phases of {r.rollout_prompts} prompts x {r.samples} replies of up to "
          f"{r.max_new_tokens} tokens, {source.steps_per_phase} steps each at lr {lr:g}; training "
          f"{sum(p.numel() for p in params) / 1e6:.2f}M parameters; sampling in "
          f"{str(gen_dtype).removeprefix('torch.')}")
    out.mkdir(parents=True, exist_ok=True)
    # The policy (adapters merged) at the top of OUT; the value head only in last/, for --resume.
    result = train(module, source, make_loss_fn(r.algo, o.clip, o.vf_coef, o.vf_clip), cfg, out, tokenizer=tok,
                   resume=o.resume, params=params, save_fn=recipe.save_fn(out, tok, policy, o.method, inner="model"))
    if eval_ids and not result.interrupted and (not source.heldout or source.heldout[-1]["step"] != result.step):
        source.heldout.append(source.evaluate(step=result.step))
    report = {"policy": str(policy), "reward": str(reward), "prompts": str(prompts), "algo": r.algo,
              "method": o.method, "steps": result.step, "phases": source.phase, "lr": lr,
              "train_prompts": len(train_ids), "eval_prompts": len(eval_ids), "grounded": bool(o.docs),
              "prompt_tokens": {"min": min(map(len, train_ids)), "max": max(map(len, train_ids)),
                                "mean": round(sum(map(len, train_ids)) / len(train_ids))}, "kl_target": r.kl_target,
              "kl_coef": source.kl.coef, "score_norm": source.score_norm, "heldout": source.heldout,
              "options": {k: v for k, v in flatten(o).items() if k not in ("resume", "lora_dropout")},
              "seconds": round(result.seconds, 1), "interrupted": result.interrupted}
    files.write_json(out / "ppo.json", report)
    if len(source.heldout) >= 2:
        a, b = source.heldout[0], source.heldout[-1]
        print(f"held-out reward (greedy) {a['reward_greedy']:.3f} -> {b['reward_greedy']:.3f}, (sampled) "
              f"{a['reward_sampled']:.3f} -> {b['reward_sampled']:.3f}; kl {b['kl']:.3f} "
              f"(target {r.kl_target:g}) -> {out}")
    return report
