"""PPO for language (Ouyang et al. 2022, InstructGPT; Schulman et al. 2017), a compact own loop.

Why not TRL's: the installed TRL (1.16) no longer ships a PPO trainer (`trl.experimental` holds no `ppo`), so
the loop is written here in the CleanRL spirit (`cleanrl/ppo.py`), one update per rollout batch:

1. Rollout: sample an answer per prompt from pi_theta (temperature `temperature`, up to `max_new_tokens`,
   stopping at EOS); score it once with the reward (`reward.function`, pipelines/lm/rl.py: the frozen RM, the
   gold reward or self-feedback).
2. Per-token reward: r_t = -beta (log pi_theta(y_t|s_t) - log pi_ref(y_t|s_t)), plus the score at the last
   token (InstructGPT eq. 2 as a per-token KL penalty; beta = `kl_coef`, pi_ref the frozen starting policy).
3. GAE (Schulman et al. 2016): delta_t = r_t + gamma V(s_{t+1}) - V(s_t), A_t = sum_l (gamma lambda)^l
   delta_{t+l}, bootstrapping the value only if not done (after EOS the episode has ended: V = 0).
4. `ppo_epochs` passes over `minibatches` minibatches: clipped surrogate (PPO eq. 7) on whitened advantages,
   clipped value loss, entropy bonus `entropy_coef`; approx-KL is the k3 estimator (ratio - 1) - log ratio
   (Schulman, "Approximating KL divergence", 2020), as CleanRL logs it. These pieces live in
   `pipelines/policy_gradient.py`, shared with the dialogue PPO.

The value head is a linear layer on the policy's last hidden state (as TRL's former
`AutoModelForCausalLMWithValueHead`), trained on detached features so the value loss leaves the policy as it
is. Metric names are TRL's PPO ones (`objective/kl` = the summed per-answer KL to the reference,
`objective/rlhf_reward`, `policy/approxkl_avg`, `policy/clipfrac_avg`, `loss/policy_avg`, `loss/value_avg`,
`val/clipfrac_avg`) plus GRPO's where they mean the same (`reward`, `reward_std`, `entropy`,
`completions/mean_length`), the held-out gold check (`gold/*`) and the answers' geometry (`geom/answer_*`,
pipelines/lm/rl.py: `AnswerGeometry`).
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from pipelines.lm import supervised
from pipelines.lm.config import PPOStageConfig
from pipelines.lm.rl import RewardFunction, answer_geometry, gold_check, reward_function, start
from pipelines.policy_gradient import approx_kl, clipped_surrogate, clipped_value_loss, gae
from workbench import tags
from workbench.artifacts import MODEL_DIR, log_pretrained, model_checkpoint_path
from workbench.callback import probe_set_from_rows
from workbench.instrument import Instrument
from workbench.policies import PolicyEngine
from workbench.stages import StageResult

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from workbench.tracking import Tracker


class PolicyWithValueHead(torch.nn.Module):
    """pi_theta(. | s_t) and V(s_t) from one forward pass of the causal LM."""

    def __init__(self, lm: PreTrainedModel) -> None:
        super().__init__()
        self.lm = lm
        self.value_head = torch.nn.Linear(lm.config.hidden_size, 1)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # left-padded prompts, as in generation
        out = self.lm(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, output_hidden_states=True
        )
        # The critic reads the policy's features but does not train them: a value loss on the scale of the
        # reward would otherwise dominate the shared trunk's gradient and pull the policy off (measured here).
        return out.logits.float(), self.value_head(out.hidden_states[-1].detach().float()).squeeze(-1)


def run(config: PPOStageConfig, tracker: Tracker) -> StageResult:
    device, task = supervised.stage_start(config)
    config, lm, tokenizer, base = start(config, tracker)
    tracker.set_tags({tags.DEVICE: device, tags.REWARD: config.reward.function})
    reference = copy.deepcopy(lm).to(device).eval().requires_grad_(False)  # pi_ref: the starting policy, frozen
    if config.lora.enabled:
        from peft import get_peft_model

        lm = get_peft_model(lm, supervised.lora_config(config.lora))
    agent = PolicyWithValueHead(lm).to(device)
    reward = reward_function(config, tracker, base, tokenizer, lambda: agent.lm, device)
    answers = answer_geometry(config, task, tokenizer)
    plain_lm = lm.get_base_model() if config.lora.enabled else lm  # the adapted model, its hidden states for snapshots
    probe = probe_set_from_rows(task.rl_prompts("eval"), tokenizer, config.snapshot.probes, config.seed)
    instrument = Instrument(config.snapshot, probe.to(device), tracker, seed=config.seed)
    engine = PolicyEngine.from_config(config.policies, tracker=tracker)

    train = config.train
    optimizer = torch.optim.AdamW(
        [p for p in agent.parameters() if p.requires_grad], lr=train.lr, eps=1e-5, weight_decay=train.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (train.warmup_steps + 1)))
    prompts = [row["prompt"] for row in task.rl_prompts()]
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(config.seed)).tolist()
    autocast = torch.autocast(
        "cuda", torch.bfloat16, enabled=device.startswith("cuda") and torch.cuda.is_bf16_supported()
    )

    stats: dict[str, list[float]] = defaultdict(list)  # since the last log; logged as means, as TRL does
    checks: dict[int, dict[str, float]] = {}  # step -> the gold check of the policy at that step
    stopped = None
    step = 0
    for step in tqdm(range(train.max_steps + 1), desc="ppo", unit="step"):
        due = step % train.eval_every == 0 or step == train.max_steps
        metrics = {k: sum(v) / len(v) for k, v in stats.items()} if due else {}
        if due:
            checks[step] = gold_check(lm, tokenizer, task, config.max_new_tokens)
            metrics.update(checks[step], lr=schedule.get_last_lr()[0])
            metrics.update(answers(lm) if answers is not None else {})
            tracker.log_metrics(metrics, step)
            stats.clear()
        geometry = instrument(plain_lm, step)
        snapshot = instrument.due(step)
        decision = engine.observe(step, {**geometry, **metrics}, snapshot=snapshot) if snapshot or metrics else None
        if decision is not None and decision.checkpoint:
            log_pretrained(tracker, model_checkpoint_path(step), lm)
        if decision is not None and decision.stop:
            stopped = f"stopped at step {step} of {train.max_steps}: {decision.reason}"
            break
        if step == train.max_steps:
            break
        start_at = step * train.batch_size % len(order)
        batch = [prompts[order[(start_at + i) % len(order)]] for i in range(train.batch_size)]
        with autocast:
            rollout = collect_rollout(agent, reference, tokenizer, batch, reward, config)
            for key, value in update(agent, optimizer, rollout, config).items():
                stats[key].append(value)
        for key, value in rollout.stats.items():
            stats[key].append(value)
        schedule.step()
    engine.finish()

    if step not in checks:  # stopped between logs: the final figures describe the model the run ends with
        checks[step] = gold_check(lm, tokenizer, task, config.max_new_tokens)
        tracker.log_metrics(checks[step], step)
    before, after = checks[0], checks[step]
    model = lm.merge_and_unload() if config.lora.enabled else lm
    summary = [f"{key}: {before[key]:.3f} before PPO -> {after[key]:.3f} after" for key in sorted(after)]
    if stopped:
        summary.insert(0, stopped)
    model_uri = log_pretrained(tracker, MODEL_DIR, model, tokenizer)
    return StageResult(model_uri, after, summary, ended_by_user=engine.ended_by_user)


@dataclass
class Rollout:
    """One batch of sampled answers with everything the update needs, per response token (masked after EOS)."""

    sequences: torch.Tensor  # [B, prompt + response]: left-padded prompt, then the sampled answer
    attention: torch.Tensor
    mask: torch.Tensor  # [B, response]: 1 up to and including the first EOS
    logprobs: torch.Tensor  # log pi_old(y_t | s_t)
    values: torch.Tensor  # V_old(s_t)
    advantages: torch.Tensor  # GAE, whitened
    returns: torch.Tensor  # advantages + values: the value target
    prompt_length: int
    stats: dict[str, float]


@torch.no_grad()
def collect_rollout(
    agent: PolicyWithValueHead,
    reference: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    reward: RewardFunction,
    config: PPOStageConfig,
) -> Rollout:
    device = next(agent.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    tokenizer.padding_side = side
    agent.eval()
    sequences = agent.lm.generate(
        **encoded,
        do_sample=True,
        temperature=config.temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=config.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    agent.train()
    prompt_length = encoded["input_ids"].shape[1]
    responses = sequences[:, prompt_length:]
    # The answer runs up to and including the first EOS; what generate padded on after it is not part of it.
    is_eos = responses == tokenizer.eos_token_id
    after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0
    mask = (~after_eos).float()
    attention = torch.cat([encoded["attention_mask"], mask.long()], dim=1)

    logits, values = agent(sequences, attention)
    logprobs, entropy = _token_logprobs(logits, sequences, prompt_length, config.temperature)
    ref_logits = reference(
        input_ids=sequences, attention_mask=attention, position_ids=(attention.cumsum(-1) - 1).clamp(min=0)
    ).logits.float()
    ref_logprobs, _ = _token_logprobs(ref_logits, sequences, prompt_length, config.temperature)
    values = values[:, prompt_length - 1 : -1] * mask  # V(s_t) before each response token; 0 once done

    answers = responses.masked_fill(mask == 0, tokenizer.pad_token_id)
    completions = tokenizer.batch_decode(answers, skip_special_tokens=True)
    score = torch.tensor(reward(prompts=prompts, completions=completions), device=device, dtype=torch.float)

    kl = (logprobs - ref_logprobs) * mask
    rewards = -config.kl_coef * kl
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(prompts)), last] += score

    advantages = response_advantages(rewards, values, mask, config.gamma, config.lam)
    returns = advantages + values

    tokens = mask.sum()
    stats = {
        "reward": score.mean().item(),
        "reward_std": score.std().item() if len(score) > 1 else 0.0,
        "objective/kl": kl.sum(1).mean().item(),
        "objective/rlhf_reward": (score - config.kl_coef * kl.sum(1)).mean().item(),
        "entropy": ((entropy * mask).sum() / tokens).item(),
        "completions/mean_length": mask.sum(1).mean().item(),
    }
    return Rollout(
        sequences, attention, mask, logprobs, values, _whiten(advantages, mask), returns, prompt_length, stats
    )


def update(
    agent: PolicyWithValueHead, optimizer: torch.optim.Optimizer, rollout: Rollout, config: PPOStageConfig
) -> dict[str, float]:
    """`ppo_epochs` passes of clipped PPO over `minibatches` minibatches of the rollout."""
    n = rollout.sequences.shape[0]
    size = math.ceil(n / config.minibatches)
    prompt_length = rollout.prompt_length
    stats: dict[str, list[float]] = defaultdict(list)
    eps = config.clip_eps
    for _ in range(config.ppo_epochs):
        permutation = torch.randperm(n, device=rollout.sequences.device)
        for start_at in range(0, n, size):
            idx = permutation[start_at : start_at + size]
            mask = rollout.mask[idx]
            tokens = mask.sum().clamp(min=1)
            logits, values = agent(rollout.sequences[idx], rollout.attention[idx])
            logprobs, entropy = _token_logprobs(logits, rollout.sequences[idx], prompt_length, config.temperature)
            values = values[:, prompt_length - 1 : -1]

            logratio = logprobs - rollout.logprobs[idx]
            ratio = logratio.exp()
            advantages = rollout.advantages[idx]
            pg_loss = clipped_surrogate(ratio, advantages, eps)
            old_values = rollout.values[idx]
            vf_loss = clipped_value_loss(values, old_values, rollout.returns[idx], eps)
            pg_loss, vf_loss = (pg_loss * mask).sum() / tokens, (vf_loss * mask).sum() / tokens
            entropy_avg = (entropy * mask).sum() / tokens
            loss = pg_loss - config.entropy_coef * entropy_avg + config.vf_coef * vf_loss

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(agent.parameters(), 1.0)
            optimizer.step()

            with torch.no_grad():
                stats["policy/approxkl_avg"].append(_masked_mean(approx_kl(logratio), mask))
                stats["policy/clipfrac_avg"].append(_masked_mean(((ratio - 1).abs() > eps).float(), mask))
                stats["val/clipfrac_avg"].append(_masked_mean(((values - old_values).abs() > eps).float(), mask))
                stats["loss/policy_avg"].append(pg_loss.item())
                stats["loss/value_avg"].append(vf_loss.item())
                stats["policy/entropy_avg"].append(entropy_avg.item())
    return {k: sum(v) / len(v) for k, v in stats.items()}


def response_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> torch.Tensor:
    """GAE per response token `[B, response]`: the episode ends at the answer's last token (its first EOS, or
    the token limit), so nothing is bootstrapped past it; 0 on the padding after it."""
    dones = torch.cat([1.0 - mask[:, 1:], torch.ones_like(mask[:, :1])], 1)
    return gae(rewards, values, dones, torch.zeros_like(values[:, 0]), gamma, lam) * mask


def _token_logprobs(
    logits: torch.Tensor, sequences: torch.Tensor, prompt_length: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(y_t | s_t) of each response token under the sampling distribution (logits / temperature) and
    that distribution's entropy H(pi(. | s_t))."""
    logits = logits[:, prompt_length - 1 : -1] / temperature
    logp = logits.log_softmax(-1)
    taken = logp.gather(-1, sequences[:, prompt_length:, None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return taken, entropy


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    return ((values * mask).sum() / mask.sum().clamp(min=1)).item()


def _whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    tokens = mask.sum().clamp(min=1)
    mean = (values * mask).sum() / tokens
    var = (((values - mean) ** 2) * mask).sum() / tokens
    return (values - mean) * torch.rsqrt(var + 1e-8) * mask
