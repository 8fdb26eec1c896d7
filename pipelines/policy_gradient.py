"""PPO's pure pieces, shared by the language loop (`pipelines/lm/ppo.py`) and the dialogue loop
(`pipelines/tod/ppo.py`). Each returns per-sample values, so every loop reduces them over its own mask or batch."""

from __future__ import annotations

import torch


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    dones: torch.Tensor,
    next_value: torch.Tensor,
    gamma: float,
    lam: float,
) -> torch.Tensor:
    """Generalised advantage estimates over the last dim (Schulman et al. 2016, eq. 16, by its recursion):
    delta_t = r_t + gamma (1 - done_t) V(s_{t+1}) - V(s_t), A_t = delta_t + gamma lambda (1 - done_t) A_{t+1}.
    done_t: an episode ended with step t; `next_value`: V of the state after the last step (the bootstrap)."""
    nonterminal = 1.0 - dones
    following = torch.cat([values[..., 1:], next_value[..., None]], -1)
    delta = rewards + gamma * nonterminal * following - values
    advantages = torch.zeros_like(delta)
    last = torch.zeros_like(delta[..., 0])
    for t in reversed(range(delta.shape[-1])):
        last = delta[..., t] + gamma * lam * nonterminal[..., t] * last
        advantages[..., t] = last
    return advantages


def clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, eps: float) -> torch.Tensor:
    """PPO's clipped policy loss, max(-A r, -A clip(r, 1 - eps, 1 + eps)) (Schulman et al. 2017, eq. 7, negated)."""
    return torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - eps, 1 + eps))


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, eps: float
) -> torch.Tensor:
    """0.5 max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2): no credit for moving V more than eps from
    the rollout's value in one update (OpenAI baselines' ppo2, CleanRL's `clip_vloss`)."""
    clipped = old_values + (values - old_values).clamp(-eps, eps)
    return 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2)


def approx_kl(logratio: torch.Tensor) -> torch.Tensor:
    """k3 estimate of KL(pi_old || pi) from log r = log pi - log pi_old on samples of pi_old: (r - 1) - log r,
    unbiased and never negative (Schulman 2020, "Approximating KL divergence")."""
    return (logratio.exp() - 1) - logratio
