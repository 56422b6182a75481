"""PPO / GRPO rollouts: replies sampled through the engine, scored by the reward model and
measured by the policy, its value head and the reference; the training loop's batch source.

    source = Rollouts(PolicyValue(gpt, value_head=True), tokenizer, reward_model, prompt_ids,
                      eval_prompt_ids, RolloutConfig(algo="ppo"), device, precision, rollout_model)
    batch = source.next_batch()          # a minibatch of the current phase (a new phase when spent)
    logps, values, entropy = policy(batch)

Each phase (`Rollouts.rollout`): the engine samples `samples` replies to each of
`rollout_prompts` prompts (the next ones of a seeded shuffle), the reward model scores each whole
reply, then one forward pass without gradient gives the policy's per-token log-probabilities and
values and one the reference's (`measure`), and the advantages are computed (`rl_losses`: PPO's
per-token rewards and GAE, or GRPO's group-relative scores). The phase is then served as
`epochs` seeded shuffles of minibatches of `minibatch` prompts, each with all its replies.

The engine generates from `rollout_model`, a copy of the policy in the generation dtype made
once by the caller, adapters included; each phase refreshes it in place (`refresh_weights`:
with LoRA only the adapters, a few hundred KB, since the base never changes), and one Engine over
that copy (`dtype=None`: no copy of its own) serves the whole run. The adapters stay unmerged on
purpose: merged into bf16 weights, the updates of a short run are below bf16's resolution (a
first demo run: after 32 steps the adapters moved the adapted weights by 0.08% on average, and
66% of them rounded back to their old bf16 value), so the engine sampled from a coarsely rounded
policy that stopped changing between evaluations. Unmerged, the engine computes what the training
forward computes under bf16 autocast (frozen weights in bf16, the adapter product added). A full
fine-tune (`--method full`) is sampled in fp32 by default for the same reason. Measured on the
demo model (8 grounded prompts of ~400 tokens, 48 new tokens, sampling, the busy 2-core
machine): the live LoRA model in fp32 sampled 15 tokens/s, a bf16 copy with adapters 30, a
merged bf16 copy 38-42 (see `benchmarks/bench_rollout.py` against HF `generate`). The
log-probabilities PPO uses are recomputed by the training forward (standard practice), so the
ratio starts at 1.

A minibatch (`collate`) holds B prompts and their n * B replies sample-major (row r answers
prompt r % B). `response_forward` runs each prompt once and its n replies against its keys and
values (a grounded prompt is several times longer than a reply, and GRPO's n replies share it;
the same two-pass layout as DPO's pairs), then the LM head on reply positions only.

The reference: with LoRA, the policy itself with its adapters switched off (`adapters_off`: no
second copy in memory); otherwise a frozen copy the caller passes.

Options: `RolloutConfig`, the part of `chatforge ppo`'s config (`train/ppo.py`) that concerns
sampling, scoring and advantages; `samples` and `kl_coef` left unset take the algorithm's default.

State (`state_dict`, JSON): the phase counter, the KL coefficient, the score normalisation, the
held-out evaluations and, mid-phase, the phase's replies and per-token numbers (float32 values
round-trip exactly through JSON), so `--resume` from any checkpoint continues exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import random
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from chatforge import runtime
from chatforge.errors import ChatforgeError
from chatforge.infer.engine import Engine, GenerationConfig
from chatforge.model.heads import ValueHead, hidden_states
from chatforge.model.lora import lora_modules, lora_state_dict, merged_state_dict
from chatforge.options import option
from chatforge.train.rl_losses import (AdaptiveKLController, gae, group_advantages, kl_estimate, token_rewards,
                                       whiten)

ALGOS = ("ppo", "grpo")
DEFAULT_KL_COEF = {"ppo": 0.2, "grpo": 0.04}   # TRL's PPO and the GRPO paper's starting values
DEFAULT_SAMPLES = {"ppo": 1, "grpo": 4}


@dataclass
class RolloutConfig:
    """The options of sampling, scoring and advantages: what `Rollouts` reads (a group of
    `PPOConfig`, so its flags are `chatforge ppo`'s `--algo`, `--samples`, ...)."""
    algo: str = option("ppo", "ppo: value head + GAE; grpo: advantages relative to each prompt's group of samples",
                       choices=ALGOS)
    rollout_prompts: int = option(16, "prompts sampled in each phase")
    samples: int | None = option(None, "replies per prompt (default: 1 ppo, 4 grpo)")
    minibatch: int = option(4, "prompts (with all their replies) per optimizer step")
    epochs: int = option(2, "passes over each phase's replies")
    max_new_tokens: int = option(64, "longest reply")
    temperature: float = option(1.0, "sampling temperature; log-probabilities are taken at the same temperature")
    gamma: float = option(1.0, "discount (ppo)")
    lam: float = option(0.95, "GAE lambda (ppo)")
    kl_coef: float | None = option(None, "starting KL coefficient beta (default: 0.2 ppo, 0.04 grpo)")
    kl_target: float = option(6.0, "target KL to the reference per reply, in nats; beta adapts towards it "
                                   "(0 = fixed beta)")
    kl_horizon: int = option(1000, "replies over which beta may change by 20%% (Ziegler et al. used 10000 on far "
                                   "longer runs)")
    eval_every: int = option(5, "phases between held-out evaluations")
    eval_samples: int = option(4, "sampled replies per held-out prompt (besides the greedy one)")
    seed: int = option(1337, "seed of the prompt order, sampling, adapters and the loop")

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ChatforgeError(msg)

        need(self.algo in ALGOS, f"--algo must be one of {', '.join(ALGOS)}, got {self.algo!r}")
        for name in ("rollout_prompts", "samples", "minibatch", "epochs", "max_new_tokens", "eval_every",
                     "eval_samples", "kl_horizon"):
            value = getattr(self, name)
            need(value is None or value >= 1, f"--{name.replace('_', '-')} must be at least 1, got {value}")
        need(self.algo != "grpo" or self.n_samples >= 2,
             "--algo grpo compares the replies to one prompt: give --samples 2 or more")
        need(self.minibatch <= self.rollout_prompts, "--minibatch cannot exceed --rollout-prompts")
        need(self.temperature > 0, f"--temperature must be positive (sampling), got {self.temperature}")
        need(0 < self.gamma <= 1 and 0 <= self.lam <= 1, "--gamma must be in (0, 1] and --lam in [0, 1]")
        need((self.kl_coef is None or self.kl_coef >= 0) and self.kl_target >= 0,
             "--kl-coef and --kl-target must be >= 0")

    @property
    def n_samples(self) -> int:
        """`samples`, or the algorithm's default."""
        return self.samples if self.samples is not None else DEFAULT_SAMPLES[self.algo]

    def resolved(self) -> "RolloutConfig":
        """A copy with `samples` and `kl_coef` set (the algorithm's defaults where unset)."""
        return dataclasses.replace(self, samples=self.n_samples,
                                   kl_coef=self.kl_coef if self.kl_coef is not None else DEFAULT_KL_COEF[self.algo])


class _PromptCache:
    """The GPT's KV-cache interface (`update(layer, k, v) -> (all keys, all values)`) for the two
    passes of `response_forward`: the prompt pass records each layer's keys and values (with their
    gradients); the response pass puts them in front of each response row's own, row r reading
    prompt r % B."""

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.recording = True

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.recording:
            self.keys[layer], self.values[layer] = k, v
            return k, v
        times = k.shape[0] // self.keys[layer].shape[0]
        return (torch.cat([self.keys[layer].repeat(times, 1, 1, 1), k], 2),
                torch.cat([self.values[layer].repeat(times, 1, 1, 1), v], 2))


def response_attention_mask(prompt_len: torch.Tensor, P: int, R: int, times: int) -> torch.Tensor:
    """(times * B, 1, R, P + R) bool, True = may attend: response row r sees the real tokens of
    prompt r % B (not its padding) and its own earlier tokens."""
    real = torch.arange(P, device=prompt_len.device)[None, :] < prompt_len[:, None]            # (B, P)
    causal = torch.ones(R, R, dtype=torch.bool, device=prompt_len.device).tril()
    N = real.shape[0] * times
    return torch.cat([real.repeat(times, 1)[:, None, None, :].expand(N, 1, R, P),
                      causal[None, None].expand(N, 1, R, R)], dim=3)


def collate(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> dict:
    """A batch of B prompts and their n * B responses, sample-major (row r answers prompt r % B):
    `prompt_ids` (B, P) and `response_ids` (nB, R) right-padded, `prompt_len`, `response_mask`."""
    B, N = len(prompts), len(responses)
    P, R = max(map(len, prompts)), max(1, max(map(len, responses)))
    prompt_ids = torch.full((B, P), pad_id, dtype=torch.long)
    response_ids = torch.full((N, R), pad_id, dtype=torch.long)
    mask = torch.zeros((N, R), dtype=torch.bool)
    for b, p in enumerate(prompts):
        prompt_ids[b, :len(p)] = torch.tensor(p)
    for r, resp in enumerate(responses):
        response_ids[r, :len(resp)] = torch.tensor(resp, dtype=torch.long)
        mask[r, :len(resp)] = True
    return {"prompt_ids": prompt_ids, "prompt_len": torch.tensor([len(p) for p in prompts]),
            "response_ids": response_ids, "response_mask": mask}


def response_forward(gpt, batch: dict, temperature: float = 1.0, value_head=None):
    """(logps, values or None, entropy), each (nB, R) float32 and 0 at padding, for the response
    tokens of a `collate` batch. Each prompt runs once; its n responses then read its keys and
    values (`_PromptCache`), with positions continuing the prompt. Token j is
    predicted by the state before it (the prompt's last for j = 0); the value of that state is
    V_j. The LM head runs on response positions only; entropy is computed without gradient."""
    prompt_ids, prompt_len = batch["prompt_ids"], batch["prompt_len"]
    ids, mask = batch["response_ids"], batch["response_mask"]
    (B, P), (N, R) = prompt_ids.shape, ids.shape
    cache = _PromptCache()
    prompt_states = hidden_states(gpt, prompt_ids, cache=cache,
                                  positions=torch.arange(P, device=ids.device).expand(B, P))
    cache.recording = False
    lengths = prompt_len.repeat(N // B)
    states = hidden_states(gpt, ids, cache=cache, positions=lengths[:, None] + torch.arange(R, device=ids.device),
                           attn_mask=response_attention_mask(prompt_len, P, R, N // B))
    rows = torch.arange(N, device=ids.device)
    before = torch.cat([prompt_states[rows % B, lengths - 1][:, None], states[:, :-1]], dim=1)       # (N, R, C)
    logits = gpt.lm_head(before[mask]).float() / temperature                                         # (M, vocab)
    logps = torch.zeros(mask.shape, device=ids.device).masked_scatter(
        mask, -F.cross_entropy(logits, ids[mask], reduction="none"))
    with torch.no_grad():
        logp_all = F.log_softmax(logits, dim=-1)
        entropy = torch.zeros(mask.shape, device=ids.device).masked_scatter(mask, -(logp_all.exp() * logp_all).sum(-1))
    values = None if value_head is None else value_head(before).float() * mask
    return logps, values, entropy


def refresh_weights(target: nn.Module, gpt: nn.Module) -> None:
    """Copy `gpt`'s current weights into `target`, the engine's copy (in its own dtype), in place.

    A `target` with the same LoRA adapters gets the adapters alone (the frozen base it was copied
    with never changes); a plain `target` gets every weight, adapters merged in."""
    with torch.no_grad():
        if lora_modules(target):
            missing, unexpected = target.load_state_dict(lora_state_dict(gpt), strict=False)
            if unexpected:
                raise ChatforgeError(f"the engine's copy has other adapters than the policy ({unexpected[:3]})")
        else:
            target.load_state_dict(merged_state_dict(gpt) if lora_modules(gpt) else gpt.state_dict())


class PolicyValue(nn.Module):
    """The GPT being trained and, for PPO, a `ValueHead` on its final hidden states: what the
    training loop trains. `forward(batch)` is `response_forward`."""

    def __init__(self, model: nn.Module, value_head: bool, temperature: float = 1.0):
        super().__init__()
        self.model, self.temperature = model, temperature
        self.value_head = ValueHead(model.config.d_model) if value_head else None

    def forward(self, batch: dict):
        return response_forward(self.model, batch, self.temperature, self.value_head)


@contextlib.contextmanager
def adapters_off(model):
    """Within the block, every LoRA adapter of `model` adds nothing: the model is its base."""
    layers = list(lora_modules(model).values())
    saved = [m.scaling for m in layers]
    for m in layers:
        m.scaling = 0.0
    try:
        yield model
    finally:
        for m, s in zip(layers, saved):
            m.scaling = s


class Rollouts:
    """Serves minibatches of the current phase's replies; samples a new phase when they run out.

    Its state (`state_dict`, JSON) holds the phase counter, the KL coefficient, the score
    normalisation, the held-out evaluations and, mid-phase, the phase's replies and numbers, so a
    run resumed from any checkpoint continues exactly as it would have."""

    def __init__(self, policy, tokenizer, reward_model, prompts: list[list[int]], eval_prompts: list[list[int]],
                 config: RolloutConfig, device, precision: str, rollout_model, reference=None):
        o = self.config = config.resolved()   # samples and kl_coef set
        self.policy, self.tok, self.rm = policy, tokenizer, reward_model
        self.prompts, self.eval_prompts = prompts, eval_prompts
        self.device, self.precision, self.reference = device, precision, reference
        self.rollout_model = rollout_model
        self.engine = Engine(rollout_model, tokenizer, dtype=None)    # no copy: refreshed in place
        vocab = lambda t: t.hf_tokenizer.get_vocab(with_added_tokens=True)   # noqa: E731
        if vocab(reward_model.tokenizer) != vocab(tokenizer):
            # Replies are scored as the token ids the policy sampled, which only the same vocabulary reads.
            raise ChatforgeError("the reward model's tokenizer differs from the policy's; train the reward model "
                                 "on the policy's model (`chatforge reward train --base POLICY_DIR ...`)")
        self.kl = AdaptiveKLController(o.kl_coef, o.kl_target or None, o.kl_horizon)
        self.phase, self.position, self.data, self.score_norm, self.heldout = 0, 0, None, None, []
        self._plan: tuple[int | None, list[list[int]]] = (None, [])
        self.steps_per_phase = o.epochs * math.ceil(o.rollout_prompts / o.minibatch)

    # -- the loop's interface

    def next_batch(self) -> dict:
        if self.data is None or self.position >= len(self.plan):
            self.rollout()
        group = self.plan[self.position]
        self.position += 1
        return self.batch(group)

    # The options a saved phase and its prompt order depend on: a resumed run must keep them.
    SETUP = ("algo", "samples", "rollout_prompts", "minibatch", "epochs", "max_new_tokens", "seed")

    def state_dict(self) -> dict:
        mid_phase = self.data is not None and self.position < len(self.plan)
        return {"phase": self.phase, "position": self.position, "kl_coef": self.kl.coef,
                "score_norm": self.score_norm, "heldout": self.heldout, "data": self.data if mid_phase else None,
                "setup": self.setup(), "prompts": self.prompts_digest()}

    def setup(self) -> dict:
        return {k: getattr(self.config, k) for k in self.SETUP}

    def prompts_digest(self) -> str:
        """A digest of the training and held-out prompts' token ids: a resumed run must see the same."""
        return hashlib.sha256(json.dumps([self.prompts, self.eval_prompts]).encode()).hexdigest()

    def load_state_dict(self, state: dict) -> None:
        setup = self.setup()
        changed = [k for k in self.SETUP if state.get("setup", {}).get(k, setup[k]) != setup[k]]
        if changed:
            raise ChatforgeError("cannot resume: " + ", ".join(f"--{k.replace('_', '-')} was {state['setup'][k]}"
                                                              for k in changed) + "; resume with the same options")
        if state.get("prompts", self.prompts_digest()) != self.prompts_digest():
            raise ChatforgeError("cannot resume: the prompts (--prompts, --eval-prompts, --docs or the tokenizer) "
                                 "changed since the run was saved; resume with the same ones or start a new --out")
        self.phase, self.position, self.data = state["phase"], state["position"], state["data"]
        self.kl.coef, self.score_norm, self.heldout = state["kl_coef"], state["score_norm"], state["heldout"]

    @property
    def plan(self) -> list[list[int]]:
        """The current phase's minibatches (prompt positions), `epochs` seeded shuffles."""
        if self._plan[0] != self.phase:
            self._plan = (self.phase, self._make_plan())
        return self._plan[1]

    def _make_plan(self) -> list[list[int]]:
        rng = random.Random(f"{self.config.seed}-plan-{self.phase}")
        B, m, out = len(self.data["prompts"]), self.config.minibatch, []
        for _ in range(self.config.epochs):
            order = rng.sample(range(B), B)
            out += [order[i:i + m] for i in range(0, B, m)]
        return out

    # -- sampling and measuring

    def refresh_engine(self) -> None:
        refresh_weights(self.rollout_model, self.policy.model)

    def sample(self, prompts: list[list[int]], n: int, seed: int | None) -> list[list[int]]:
        """n replies to each prompt, sample-major; each ends with its stop token when it stopped."""
        greedy = seed is None
        cfg = GenerationConfig(strategy="greedy" if greedy else "sample", max_new_tokens=self.config.max_new_tokens,
                               temperature=self.config.temperature, num_return_sequences=n, seed=seed)
        results = self.engine.generate(prompts, cfg)
        return [c.tokens + ([c.stop] if isinstance(c.stop, int) else []) for s in range(n) for c in
                [r.completions[s] for r in results]]

    def score(self, prompts: list[list[int]], responses: list[list[int]]):
        """(nB,) float32 reward-model scores of the sample-major responses."""
        return self.rm.score_ids([prompts[r % len(prompts)] + resp for r, resp in enumerate(responses)])

    def measure(self, prompts: list[list[int]], responses: list[list[int]]) -> dict:
        """The policy's log-probs and values and the reference's log-probs of every response,
        in minibatches, without gradient, in eval mode and the training precision."""
        B, n = len(prompts), len(responses) // len(prompts)
        out: dict[str, list] = {"logps": [None] * len(responses), "values": [None] * len(responses),
                                "ref_logps": [None] * len(responses)}
        was_training = self.policy.training
        self.policy.eval()
        with torch.no_grad(), runtime.autocast(self.device, self.precision):
            for start in range(0, B, self.config.minibatch):
                group = range(start, min(B, start + self.config.minibatch))
                rows = [s * B + b for s in range(n) for b in group]
                batch = collate([prompts[b] for b in group], [responses[r] for r in rows], self.tok.pad_id)
                batch = {k: v.to(self.device) for k, v in batch.items()}
                logps, values, _ = self.policy(batch)
                if self.reference is not None:
                    ref = response_forward(self.reference, batch, self.config.temperature)[0]
                else:
                    with adapters_off(self.policy.model):
                        ref = response_forward(self.policy.model, batch, self.config.temperature)[0]
                for i, r in enumerate(rows):
                    k = len(responses[r])
                    out["logps"][r], out["ref_logps"][r] = logps[i, :k].cpu(), ref[i, :k].cpu()
                    out["values"][r] = values[i, :k].cpu() if values is not None else torch.zeros(k)
        self.policy.train(was_training)
        return out

    def rollout(self) -> None:
        """Sample, score and measure the next phase's replies; compute their advantages."""
        o, k = self.config, self.phase
        if self.eval_prompts and k % o.eval_every == 0:
            self.heldout.append(self.evaluate(step=k * self.steps_per_phase))
        count, P = o.rollout_prompts, len(self.prompts)
        picks = []
        for i in range(k * count, (k + 1) * count):    # a seeded shuffle of all prompts per pass
            picks.append(random.Random(f"{o.seed}-prompts-{i // P}").sample(range(P), P)[i % P])
        prompts = [self.prompts[i] for i in picks]
        self.refresh_engine()
        n = o.samples
        responses = self.sample(prompts, n, seed=o.seed * 100003 + k)
        scores = self.score(prompts, responses)
        m = self.measure(prompts, responses)
        batch = collate(prompts, responses, self.tok.pad_id)
        mask = batch["response_mask"]

        def padded(rows: list) -> torch.Tensor:
            t = torch.zeros(mask.shape)
            for r, v in enumerate(rows):
                t[r, :len(v)] = v
            return t
        logps, ref, values = padded(m["logps"]), padded(m["ref_logps"]), padded(m["values"])
        seq_kl = (kl_estimate(logps, ref, "k1") * mask).sum(1)
        coef = self.kl.coef
        if o.algo == "ppo":
            if self.score_norm is None:     # the SFT policy's replies set the scale, once
                std = float(scores.std()) if len(scores) > 1 else 0.0
                self.score_norm = [float(scores.mean()), std if std > 1e-6 else 1.0]
            mean, std = self.score_norm
            rewards = token_rewards((scores - mean) / std, logps, ref, mask, coef)
            advantages, returns = gae(rewards, values, mask, o.gamma, o.lam)
            advantages = whiten(advantages, mask)
        else:
            group = group_advantages(scores.view(n, count).T).T.reshape(-1)     # sample-major like the rows
            advantages, returns = group[:, None] * mask, torch.zeros(mask.shape)
        self.kl.update(float(seq_kl.mean()), len(responses))
        texts = [tuple(r) for r in responses]
        stats = {"reward": float(scores.mean()), "reward_std": float(scores.std()) if len(scores) > 1 else 0.0,
                 "kl": float(seq_kl.mean()), "kl_coef": coef,
                 "length": sum(len(r) - (r[-1] in self.engine.stop_ids) for r in responses) / len(responses),
                 "truncated": sum(r[-1] not in self.engine.stop_ids for r in responses) / len(responses),
                 "distinct": len(set(texts)) / len(texts)}
        def rows(t: torch.Tensor) -> list[list[float]]:   # JSON, for the checkpoint (float32 round-trips exactly)
            return [t[r, :len(resp)].tolist() for r, resp in enumerate(responses)]
        self.data = {"prompts": picks, "responses": responses, "old_logps": rows(logps), "ref_logps": rows(ref),
                     "values": rows(values), "advantages": rows(advantages), "returns": rows(returns),
                     "kl_coef": coef, "stats": stats}
        self.phase, self.position = k + 1, 0

    def batch(self, group: list[int]) -> dict:
        """The minibatch of the current phase's prompts at positions `group`, with all their replies."""
        d, B = self.data, len(self.data["prompts"])
        rows = [s * B + b for s in range(len(d["responses"]) // B) for b in group]
        batch = collate([self.prompts[d["prompts"][b]] for b in group], [d["responses"][r] for r in rows],
                        self.tok.pad_id)
        for key in ("old_logps", "ref_logps", "values", "advantages", "returns"):
            t = torch.zeros(batch["response_mask"].shape)
            for i, r in enumerate(rows):
                t[i, :len(d[key][r])] = torch.tensor(d[key][r])
            batch["old_values" if key == "values" else key] = t
        batch["kl_coef"] = torch.tensor(d["kl_coef"])
        batch.update({f"stat_{k}": torch.tensor(float(v)) for k, v in d["stats"].items()})
        return batch

    def evaluate(self, step: int) -> dict:
        """The reward model's mean score of greedy and of `eval_samples` sampled (fixed seed) replies
        to each held-out prompt, the sampled replies' KL to the reference, lengths and distinct shares."""
        self.refresh_engine()
        prompts, row = self.eval_prompts, {"phase": self.phase, "step": step}
        for kind, seed, n in (("greedy", None, 1), ("sampled", self.config.seed, self.config.eval_samples)):
            responses = self.sample(prompts, n, seed)
            row[f"reward_{kind}"] = round(float(self.score(prompts, responses).mean()), 4)
            row[f"length_{kind}"] = round(sum(len(r) - (bool(r) and r[-1] in self.engine.stop_ids)
                                              for r in responses) / len(responses), 2)
            row[f"distinct_{kind}"] = round(len({tuple(r) for r in responses}) / len(responses), 4)
            if kind == "sampled":
                m = self.measure(prompts, responses)
                row["kl"] = round(sum(float(kl_estimate(a, b, "k1").sum()) for a, b in zip(m["logps"], m["ref_logps"]))
                                  / len(responses), 4)
            else:
                row["examples"] = [self.tok.decode([t for t in r if t not in self.engine.stop_ids])
                                   for r in responses[:3]]
        print(f"held-out @ step {step}: reward greedy {row['reward_greedy']:.3f}, sampled {row['reward_sampled']:.3f}, "
              f"kl {row['kl']:.3f}, length {row['length_sampled']:.1f}, distinct {row['distinct_sampled']:.2f}")
        return row
