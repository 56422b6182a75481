"""The pieces of PPO and GRPO as small pure functions of tensors (no model, no state but the KL
controller's coefficient), each tested on hand-computed values in tests/test_ppo.py.

Shapes: per-token tensors are (N, T) for N responses right-padded to T tokens, with a bool `mask`
(N, T) of the real response tokens (a prefix of each row). Token t of a response is the action
taken in state t (the prompt and the response's first t tokens).

    kl_estimate(logp, ref_logp, "k1" | "k2" | "k3")      per-token estimators of KL(pi || pi_ref)
    token_rewards(scores, logp, ref_logp, mask, coef)   -coef * k1 on every token, + the score on the last
    gae(rewards, values, mask, gamma, lam)              -> (advantages, returns)
    whiten(x, mask)                                     zero mean, unit variance over the real tokens
    group_advantages(scores, eps)                       GRPO: (r - group mean) / group std, (G, n) scores
    clipped_policy_loss(logp, old_logp, adv, mask, clip) -> (loss, clip fraction)
    clipped_value_loss(values, old_values, returns, mask, clip) -> (loss, clip fraction)
    AdaptiveKLController(coef, target, horizon)         Ziegler et al.'s proportional controller

Losses are means over the real tokens of the batch (`masked_mean`), the unit the training loop
weights micro-batches by.
"""

from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over the positions where `mask` is true (0 when there are none)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the log-probabilities of tokens sampled from pi.

    With r = ref_logp - logp (Schulman, "Approximating KL divergence", 2020):
    k1 = -r (unbiased, can be negative: PPO's reward penalty, summed over a response it is the
    sequence's log-ratio), k2 = r^2 / 2 (biased, low variance), k3 = exp(r) - 1 - r (unbiased,
    never negative: GRPO's loss term)."""
    r = ref_logp - logp
    if kind == "k1":
        return -r
    if kind == "k2":
        return 0.5 * r * r
    if kind == "k3":
        return torch.expm1(r) - r
    raise ValueError(f"unknown KL estimator {kind!r}; choose one of {', '.join(KL_ESTIMATORS)}")


def token_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float) -> torch.Tensor:
    """(N, T) per-token rewards: -kl_coef * k1 on every response token, plus the response's (N,)
    score on its last token (the reward model judges the whole reply once it is finished)."""
    rewards = -kl_coef * kl_estimate(logp, ref_logp, "k1") * mask
    last = mask.long().sum(1) - 1                                                     # (N,)
    rows = torch.arange(len(scores), device=scores.device)
    has = last >= 0
    rewards[rows[has], last[has]] += scores[has].to(rewards.dtype)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al., 2016): (advantages, returns), both (N, T).

    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1}, with V and A
    zero after a response's last token (the episode ends there); returns = A + V, the value
    function's targets. Padding positions are 0 in both."""
    mask = mask.to(values.dtype)
    N, T = rewards.shape
    advantages = torch.zeros_like(values)
    next_value = torch.zeros(N, dtype=values.dtype, device=values.device)
    next_adv = torch.zeros_like(next_value)
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_adv) * mask[:, t]
        # Past a response's end (mask 0) the next step's value and advantage are zero.
        next_value, next_adv = values[:, t] * mask[:, t], advantages[:, t]
    return advantages, (advantages + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """`x` shifted and scaled to mean 0 and standard deviation 1 over the real tokens (0 elsewhere)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask.to(x.dtype)


def group_advantages(scores: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """GRPO (Shao et al., 2024): each of the (G, n) scores minus its group's mean, over its group's
    standard deviation (unbiased) plus `eps`; a group whose samples all score alike gets 0."""
    mean = scores.mean(1, keepdim=True)
    std = scores.std(1, keepdim=True) if scores.shape[1] > 1 else torch.zeros_like(mean)
    return (scores - mean) / (std + eps)


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                        clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate (Schulman et al., 2017) as a loss: the mean over real tokens of
    max(-A * ratio, -A * clip(ratio, 1 - clip, 1 + clip)), ratio = exp(logp - old_logp); and the
    share of tokens where the clipped term is the larger (their gradient is zero)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).to(logp.dtype), mask).detach()


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """The value loss with PPO's clipping: 0.5 * mean over real tokens of max((V - R)^2, (V' - R)^2),
    V' = old V + clip(V - old V, -clip, clip), so one update moves a value at most `clip` from its
    rollout estimate; and the share of tokens where the clipped term is the larger."""
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    plain, clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(plain, clipped), mask)
    return loss, masked_mean((clipped > plain).to(values.dtype), mask).detach()


class AdaptiveKLController:
    """The KL coefficient, steered towards a target KL (Ziegler et al., 2019):

        error = clip(KL / target - 1, -0.2, 0.2);   coef <- coef * (1 + error * n / horizon)

    after each rollout batch of `n` responses whose mean sequence KL (sum of k1 over a response)
    was `KL`. Above the target the penalty grows, below it shrinks, by at most 20% per `horizon`
    responses. `target` None (or 0) keeps the coefficient fixed."""

    def __init__(self, coef: float, target: float | None = None, horizon: int = 10000):
        self.coef, self.target, self.horizon = float(coef), target, horizon

    def update(self, kl: float, n: int) -> float:
        if self.target:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.coef *= 1.0 + error * n / self.horizon
        return self.coef
