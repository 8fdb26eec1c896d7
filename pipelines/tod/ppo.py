"""PPO for the dialogue policy (Schulman et al. 2017), laid out like CleanRL's `ppo.py`.

One iteration: `num_envs` dialogues run side by side for `num_steps` turns (a finished dialogue restarts with a
new goal), the policy samples a multi-hot act set per turn (independent Bernoulli acts); advantages by GAE
(Schulman et al. 2016); then `update_epochs` passes of minibatches over the clipped surrogate
L = E[max(-A r, -A clip(r, 1-eps, 1+eps))] - c_ent H, and the value network's squared error. The two networks
are separate (as in ConvLab's PPO), with their own learning rates and gradient clipping.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.distributions import Bernoulli

from pipelines.policy_gradient import approx_kl, clipped_surrogate, gae
from pipelines.tod.config import TODPPOSettings
from pipelines.tod.data import Goal
from pipelines.tod.env import DialogueEnv
from pipelines.tod.policy import MLPPolicy, ValueNetwork


class PPO:
    def __init__(
        self,
        policy: MLPPolicy,
        value: ValueNetwork,
        envs: Sequence[DialogueEnv],
        sample_goal: Callable[[], Goal],
        settings: TODPPOSettings,
    ) -> None:
        self.policy, self.value, self.envs, self.sample_goal, self.args = policy, value, envs, sample_goal, settings
        self.optimizer = torch.optim.Adam(
            [
                {"params": policy.parameters(), "lr": settings.lr},
                {"params": value.parameters(), "lr": settings.value_lr},
            ],
            eps=1e-5,
        )
        self.states = [env.reset(sample_goal()) for env in envs]
        self.returns = np.zeros(len(envs))  # running return of each env's current dialogue

    def iteration(self) -> dict[str, float]:
        """Collect one rollout batch and update on it; returns CleanRL-style statistics."""
        args, n_envs = self.args, len(self.envs)
        obs = torch.zeros(args.num_steps, n_envs, len(self.envs[0].vectorise))
        actions = torch.zeros(args.num_steps, n_envs, len(self.envs[0].actions))
        logprobs, rewards, dones, values = (torch.zeros(args.num_steps, n_envs) for _ in range(4))
        finished: list[tuple[float, bool, int]] = []  # (return, success, turns) of dialogues ended in the rollout

        self.policy.eval()
        for t in range(args.num_steps):
            obs[t] = self._observe()
            with torch.no_grad():
                dist = Bernoulli(logits=self.policy(obs[t]).logits)
                actions[t] = dist.sample()
                logprobs[t] = dist.log_prob(actions[t]).sum(-1)
                values[t] = self.value(obs[t])
            for e, env in enumerate(self.envs):
                state, reward, done = env.step(env.actions.decode(actions[t, e].numpy()))
                rewards[t, e], dones[t, e] = reward, float(done)
                self.returns[e] += reward
                if done:
                    score = env.score()
                    finished.append((self.returns[e], score.success, score.turns))
                    self.returns[e] = 0.0
                    state = env.reset(self.sample_goal())
                self.states[e] = state

        next_obs = self._observe()
        with torch.no_grad():
            next_value = self.value(next_obs)
        # [num_steps, num_envs]: time is the first dim here, the last for gae
        advantages = gae(rewards.T, values.T, dones.T, next_value, args.gamma, args.gae_lambda).T
        returns = advantages + values

        self.store({"obs": obs, "actions": actions, "logprobs": logprobs, "rewards": rewards, "dones": dones}, next_obs)
        stats = self.update(
            obs.flatten(0, 1), actions.flatten(0, 1), logprobs.flatten(), advantages.flatten(), returns.flatten()
        )
        variance = returns.var().item()
        if variance > 0:
            stats["train/explained_variance"] = 1.0 - (returns - values).var().item() / variance
        if finished:
            stats["reward"] = float(np.mean([f[0] for f in finished]))
            stats["rollout/success_rate"] = float(np.mean([f[1] for f in finished]))
            stats["rollout/turns"] = float(np.mean([f[2] for f in finished]))
        return stats

    def store(self, rollout: dict[str, torch.Tensor], next_obs: torch.Tensor) -> None:
        """Sees every rollout (`[num_steps, num_envs, ...]`, the state after it) before its update; CLEAR's
        replay buffer (`continual.py`) keeps it here."""

    def auxiliary_loss(self) -> torch.Tensor | float:
        """Added to every minibatch's loss; CLEAR's replay terms (`continual.py`) come in here."""
        return 0.0

    def _observe(self) -> torch.Tensor:
        return torch.from_numpy(np.stack([env.vectorise(s) for env, s in zip(self.envs, self.states, strict=True)]))

    def update(
        self,
        obs: torch.Tensor,
        actions: torch.Tensor,
        old_logprobs: torch.Tensor,
        advantages: torch.Tensor,
        returns: torch.Tensor,
    ) -> dict[str, float]:
        args = self.args
        batch = len(obs)
        minibatch = max(1, batch // args.num_minibatches)
        self.policy.train()
        pg_losses, v_losses, entropies, kls, clipped = [], [], [], [], []
        for _ in range(args.update_epochs):
            order = torch.randperm(batch)
            for start in range(0, batch, minibatch):
                rows = order[start : start + minibatch]
                dist = Bernoulli(logits=self.policy(obs[rows]).logits)
                logratio = dist.log_prob(actions[rows]).sum(-1) - old_logprobs[rows]
                ratio = logratio.exp()
                with torch.no_grad():
                    kls.append(approx_kl(logratio).mean().item())
                    clipped.append(((ratio - 1.0).abs() > args.clip_coef).float().mean().item())
                adv = advantages[rows]
                adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                pg_loss = clipped_surrogate(ratio, adv, args.clip_coef).mean()
                entropy = dist.entropy().sum(-1).mean()
                v_loss = 0.5 * (self.value(obs[rows]) - returns[rows]).pow(2).mean()
                loss = pg_loss - args.ent_coef * entropy + v_loss + self.auxiliary_loss()

                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.policy.parameters(), args.max_grad_norm)
                torch.nn.utils.clip_grad_norm_(self.value.parameters(), args.max_grad_norm)
                self.optimizer.step()
                pg_losses.append(pg_loss.item())
                v_losses.append(v_loss.item())
                entropies.append(entropy.item())
        return {
            "train/policy_loss": float(np.mean(pg_losses)),
            "train/value_loss": float(np.mean(v_losses)),
            "entropy": float(np.mean(entropies)),
            "approx_kl": float(np.mean(kls)),
            "clip_ratio": float(np.mean(clipped)),
        }
