"""The `tod_continual` stage: one dialogue policy trained with PPO on a sequence of domains, naively or with CLEAR.

CLEAR (Rolnick et al. 2019, "Experience Replay for Continual Learning"): every rollout goes into a replay buffer
as pieces of consecutive turns (reservoir sampling when it is full, so each piece seen so far is kept with the same
probability) with the behaviour policy mu's log-probabilities and logits and the values of the time; every minibatch
update adds, on replayed pieces, (1) V-trace's off-policy actor-critic loss (Espeholt et al. 2018): the policy
gradient rho_s (r_s + gamma v_{s+1} - V(x_s)) grad log pi with rho_s = min(rho_bar, pi/mu) outside the gradient,
and the value network regressed on the V-trace targets v_s, both computed under the current networks; (2) policy
cloning, KL(mu || pi) to the stored act distribution; and (3) value cloning, the squared distance to the stored
values. An earlier version put the truncated ratio inside PPO's clipped surrogate on one-step "stored return minus
current value" advantages: min(pi/mu, 1) has no gradient once pi/mu > 1, so an act the policy had come to prefer
was never pushed down however bad, while acts it had left were pulled back whenever their stale advantage was
positive; that pulled the policy towards old behaviour and it forgot more than plain PPO (docs/tod.md).

Cloning targets. CLEAR clones the behaviour stored with each turn, and reservoir sampling keeps every stage of
training alike, so the targets of an old domain mix its untrained start with its trained end; a greedy multi-hot
policy (an act is taken when p > 0.5) pulled towards that mixture loses acts it needs. By default
(`clear.cloning_targets: final`) the targets are instead relabelled when a domain ends, with the networks' logits
and values of that moment, and cloning acts only on earlier domains' turns: behaviour cloning from the policy at
the end of each task (Wolczyk et al. 2022, "Disentangling Transfer in Continual Reinforcement Learning", ClonEx),
which they found to be what makes replay protect. V-trace still uses the behaviour's own log-probabilities.
"Naive" is plain PPO on each new domain, starting from where the previous domain left the network.

The state and action spaces are those of all `env.domains`, so one network serves every domain; goals of stage
i are single-domain goals of `continual.domains[i]`. After each stage the greedy policy is evaluated on every
domain of the sequence and the held-out ones: R[i][j], success on domain j after stage i. From it, as the
continual-learning literature defines them: average success at the end, forgetting (Chaudhry et al. 2018:
f_j = max_{l<T-1} R[l][j] - R[T-1][j], mean over earlier domains) and forward transfer (Lopez-Paz and Ranzato
2017: mean over i >= 1 of R[i-1][i] - b_i, b_i the untrained network's success on domain i). Held-out domains
are zero-shot: never trained on.

The experiment is one parent run with a nested run per domain (tag `tod.domain`); each nested run holds the
snapshots of its domain's training on one probe set fixed for the whole sequence (dialogue states of every
domain, labelled by domain), so the app compares the policy's representation before and after each switch.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.distributions import Bernoulli, kl_divergence

from pipelines.tod.data import TODDataset, load_dataset
from pipelines.tod.ddpt import (
    INITIAL_ACT_LOGIT,
    DDPTPolicy,
    DescribedSpace,
    encode_descriptions,
    load_descriptions,
)
from pipelines.tod.env import DialogueEnv, env_factory
from pipelines.tod.evaluator import summarize
from pipelines.tod.policy import MLPPolicy, Policy, RandomPolicy, RuleExpert, ValueNetwork, log_policy, run_dialogues
from pipelines.tod.ppo import PPO
from pipelines.tod.simulator import GoalGenerator
from pipelines.tod.synthetic import write_synthetic_dataset
from workbench import tags
from workbench.config import flatten
from workbench.instrument import Instrument
from workbench.launch import base_tags, start_run
from workbench.policies import PolicyEngine
from workbench.snapshots import ProbeSet, choose_probe_ids
from workbench.stages import StageResult

if TYPE_CHECKING:
    from pipelines.tod.config import ClearConfig, TODContinualStageConfig, TODPPOSettings
    from workbench.tracking import Tracker

STREAM_EVAL_GOALS, STREAM_EVAL_USER, STREAM_GOALS, STREAM_ENVS, STREAM_RANDOM, STREAM_PROBES, STREAM_REPLAY = range(
    20, 27
)
PROBE_DIALOGUES = 20  # rule-expert dialogues per domain whose states make the probe set
REPLAY_PIECE = 16  # consecutive turns per replayed piece (its gcd with ppo.num_steps): V-trace needs trajectories


def replay_piece(num_steps: int) -> int:
    """Turns per replayed piece: REPLAY_PIECE, or a divisor of `num_steps` so every rollout cuts into whole pieces."""
    return math.gcd(num_steps, REPLAY_PIECE)


class ReservoirBuffer:
    """Reservoir sampling (Vitter 1985, algorithm R) over rows of every stored tensor (here: pieces of turns)."""

    def __init__(self, capacity: int, rng: np.random.Generator) -> None:
        self.capacity, self.rng, self.seen = capacity, rng, 0
        self.data: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return min(self.seen, self.capacity)

    def add(self, rows: dict[str, torch.Tensor]) -> None:
        n = len(next(iter(rows.values())))
        if not self.data:
            self.data = {k: torch.zeros(self.capacity, *v.shape[1:], dtype=v.dtype) for k, v in rows.items()}
        slots = {}  # buffer slot -> row; a later row replacing the same slot wins, as in the sequential algorithm
        for i in range(n):
            if self.seen < self.capacity:
                slots[self.seen] = i
            else:
                j = int(self.rng.integers(self.seen + 1))
                if j < self.capacity:
                    slots[j] = i
            self.seen += 1
        if slots:
            target, source = torch.tensor(list(slots)), torch.tensor(list(slots.values()))
            for k, v in rows.items():
                self.data[k][target] = v[source]

    def sample(self, n: int) -> dict[str, torch.Tensor]:
        rows = torch.from_numpy(self.rng.integers(len(self), size=n))
        return {k: v[rows] for k, v in self.data.items()}


def vtrace(
    log_rhos: torch.Tensor,
    rewards: torch.Tensor,
    dones: torch.Tensor,
    values: torch.Tensor,
    bootstrap: torch.Tensor,
    gamma: float,
    lam: float,
    rho_bar: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """V-trace targets v_s and policy-gradient advantages rho_s (r_s + gamma v_{s+1} - V(x_s)) (Espeholt et al.
    2018, eq. 1 and section 4.2, by the recursion of remark 1) over `[B, L]` trajectory pieces, log_rhos = log pi/mu;
    rho_s = min(rho_bar, pi/mu), c_s = lambda min(1, pi/mu). With pi = mu, v_s is PPO's GAE(lambda) return."""
    ratio = log_rhos.exp()
    rho, c = ratio.clamp(max=rho_bar), lam * ratio.clamp(max=1.0)
    nonterminal = 1.0 - dones
    following = torch.cat([values[:, 1:], bootstrap[:, None]], 1)
    delta = rho * (rewards + gamma * nonterminal * following - values)
    correction, acc = torch.zeros_like(values), torch.zeros_like(bootstrap)
    for t in reversed(range(values.shape[1])):
        acc = delta[:, t] + gamma * nonterminal[:, t] * c[:, t] * acc
        correction[:, t] = acc
    vs = values + correction
    vs_following = torch.cat([vs[:, 1:], bootstrap[:, None]], 1)
    return vs, rho * (rewards + gamma * nonterminal * vs_following - values)


class ClearPPO(PPO):
    """PPO on fresh rollouts plus CLEAR's replay terms on every minibatch (module docstring)."""

    def __init__(
        self,
        policy: MLPPolicy | DDPTPolicy,
        value: ValueNetwork,
        envs: Sequence[DialogueEnv],
        sample_goal: Callable,
        settings: TODPPOSettings,
        clear: ClearConfig,
        buffer: ReservoirBuffer,
        stage: int = 0,
    ) -> None:
        super().__init__(policy, value, envs, sample_goal, settings)
        self.clear, self.buffer, self.stage = clear, buffer, stage
        self.piece = replay_piece(settings.num_steps)
        rows = clear.replay_ratio * settings.num_envs * settings.num_steps / settings.num_minibatches
        self.replay_pieces = max(1, round(rows / self.piece))
        self.replay_stats: dict[str, list[float]] = {}

    def store(self, rollout: dict[str, torch.Tensor], next_obs: torch.Tensor) -> None:
        """Each env's rollout cut into pieces of consecutive turns, with the behaviour policy mu's log-probs and
        logits, the values of the time, and the state after the piece (V-trace's bootstrap)."""
        with torch.no_grad():
            steps = rollout | {"logits": self.policy(rollout["obs"]).logits, "values": self.value(rollout["obs"])}
        (T, E), L = rollout["dones"].shape, self.piece
        pieces = {k: v.transpose(0, 1).reshape(E * T // L, L, *v.shape[2:]) for k, v in steps.items()}
        after = torch.cat([rollout["obs"][L::L], next_obs[None]])  # [T/L, E, state]: the state after each piece
        pieces["next_obs"] = after.transpose(0, 1).reshape(E * T // L, -1)
        pieces["stage"] = torch.full((E * T // L,), self.stage)
        self.buffer.add(pieces)

    def relabel(self) -> None:
        """At the end of this learner's domain: its replayed turns' cloning targets become the networks' logits
        and values now (`cloning_targets: final`, module docstring)."""
        rows = (self.buffer.data["stage"][: len(self.buffer)] == self.stage).nonzero().squeeze(1)
        if not rows.numel():  # a full buffer may keep none of a short domain
            return
        with torch.no_grad():
            for chunk in rows.split(256):
                obs = self.buffer.data["obs"][chunk]
                self.buffer.data["logits"][chunk] = self.policy(obs).logits
                self.buffer.data["values"][chunk] = self.value(obs)

    def update(self, obs, actions, old_logprobs, advantages, returns) -> dict[str, float]:  # noqa: ANN001
        self.replay_stats = {}
        stats = super().update(obs, actions, old_logprobs, advantages, returns)
        stats.update({f"clear/{k}": float(np.mean(v)) for k, v in self.replay_stats.items()})
        stats["clear/buffer_size"] = float(len(self.buffer) * self.piece)
        return stats

    def auxiliary_loss(self) -> torch.Tensor:
        replay = self.buffer.sample(self.replay_pieces)
        dist = Bernoulli(logits=self.policy(replay["obs"]).logits)  # [pieces, L, acts]
        logprob = dist.log_prob(replay["actions"]).sum(-1)
        values = self.value(replay["obs"])
        with torch.no_grad():  # targets and advantages under the current networks, not those stored
            vs, adv = vtrace(
                logprob - replay["logprobs"],
                replay["rewards"],
                replay["dones"],
                values,
                self.value(replay["next_obs"]),
                self.args.gamma,
                self.args.gae_lambda,
                self.clear.rho_bar,
            )
            # On PPO's scale, but not centred: a turn pi no longer takes (rho = 0) must not be pushed either way, and
            # subtracting the batch mean pushes it (a first V-trace run did: newest-domain success 0.45, seeds 0-1).
            adv = adv / (adv.pow(2).mean().sqrt() + 1e-8)
        # V-trace's actor-critic loss: rho_s A_s grad log pi, the weight outside the gradient, and the critic to v_s.
        off_policy = -(adv * logprob).mean() + 0.5 * (values - vs).pow(2).mean()
        # Cloning weight per replayed piece: every piece for CLEAR's targets, earlier domains' for final ones.
        cloned = torch.ones(len(values)) if self.clear.cloning_targets == "behaviour" else replay["stage"] < self.stage
        cloned = cloned.float()[:, None] / max(1.0, float(cloned.sum()) * values.shape[1])
        policy_cloning = (kl_divergence(Bernoulli(logits=replay["logits"]), dist).sum(-1) * cloned).sum()
        value_cloning = ((values - replay["values"]).pow(2) * cloned).sum()
        for name, v in (
            ("off_policy_loss", off_policy),
            ("policy_cloning", policy_cloning),
            ("value_cloning", value_cloning),
            ("rho", (logprob - replay["logprobs"]).exp().clamp(max=self.clear.rho_bar).mean()),
        ):
            self.replay_stats.setdefault(name, []).append(v.item())
        return off_policy + self.clear.policy_cloning * policy_cloning + self.clear.value_cloning * value_cloning


def continual_metrics(
    success: list[dict[str, float]], untrained: dict[str, float], sequence: list[str]
) -> dict[str, float]:
    """Average success, forgetting and forward transfer from R[i][j] (module docstring)."""
    last, T = success[-1], len(sequence)
    out = {
        "continual/average_success": float(np.mean([last[d] for d in sequence])),
        "continual/newest_success": last[sequence[-1]],
    }
    if T > 1:
        earlier = sequence[:-1]
        out["continual/earlier_success"] = float(np.mean([last[d] for d in earlier]))
        out["continual/forgetting"] = float(
            np.mean([max(success[k][d] for k in range(j, T - 1)) - last[d] for j, d in enumerate(earlier)])
        )
        out["continual/forward_transfer"] = float(
            np.mean([success[i - 1][sequence[i]] - untrained[sequence[i]] for i in range(1, T)])
        )
    return out


def run(config: TODContinualStageConfig, tracker: Tracker) -> StageResult:
    seed, env_config, settings = config.seed, config.env, config.continual
    torch.manual_seed(seed)
    sequence, held_out = settings.domains, settings.held_out
    everywhere = [*sequence, *held_out]
    with tempfile.TemporaryDirectory(prefix="workbench-tod-") as tmp:
        source = config.data.path or write_synthetic_dataset(tmp, config.data.dialogues, config.data.wizard_noise, seed)
        dataset: TODDataset = load_dataset(source, env_config.domains)
    make_env = env_factory(dataset, env_config, seed)

    generators = {
        d: GoalGenerator(dataset.ontology, dataset.db, [d], max_domains=1, book_probability=env_config.book_probability)
        for d in everywhere
    }
    eval_goals = {
        d: [
            generators[d].sample(np.random.default_rng([seed, STREAM_EVAL_GOALS, i]))
            for _ in range(env_config.eval_dialogues)
        ]
        for i, d in enumerate(everywhere)
    }

    def evaluate(policy: Policy) -> dict[str, dict[str, float]]:
        return {
            d: summarize(run_dialogues(make_env(STREAM_EVAL_USER), policy, goals)) for d, goals in eval_goals.items()
        }

    env = make_env(STREAM_ENVS)
    if config.policy.kind == "ddpt":
        space = DescribedSpace(
            env.actions, env.vectorise, load_descriptions(config.policy.descriptions, env.actions, env.vectorise)
        )
        encoded = encode_descriptions(config.policy.encoder, space) if config.policy.encoder else None
        model: MLPPolicy | DDPTPolicy = DDPTPolicy(space, config.policy.hidden_size, config.policy.num_layers, encoded)
    else:
        model = MLPPolicy(len(env.vectorise), len(env.actions), config.policy.hidden_size, config.policy.num_layers)
        torch.nn.init.constant_(model.head.bias, INITIAL_ACT_LOGIT)
    value = ValueNetwork(len(env.vectorise), config.policy.hidden_size)
    probe = _probe_set(env, generators, everywhere, seed, config.snapshot.probes)
    tracker.set_tags({tags.DEVICE: "cpu", "tod.sequence": ",".join(sequence), "tod.held_out": ",".join(held_out)})

    baselines = evaluate(RandomPolicy(env, np.random.default_rng([seed, STREAM_RANDOM])))
    untrained_figures = evaluate(model.greedy(env))
    untrained = {d: f["tod/success_rate"] for d, f in untrained_figures.items()}
    tracker.log_metrics({f"baseline/random/success/{d}": f["tod/success_rate"] for d, f in baselines.items()}, 0)
    tracker.log_metrics({f"baseline/untrained/success/{d}": s for d, s in untrained.items()}, 0)

    capacity = max(1, settings.clear.replay_size // replay_piece(config.ppo.num_steps))  # in pieces
    buffer = ReservoirBuffer(capacity, np.random.default_rng([seed, STREAM_REPLAY]))
    success: list[dict[str, float]] = []
    step, stopped = 0, []
    for stage, domain in enumerate(sequence):
        goal_rng = np.random.default_rng([seed, STREAM_GOALS, stage])
        envs = [make_env(STREAM_ENVS, 100 * stage + e) for e in range(config.ppo.num_envs)]
        sample_goal = lambda g=generators[domain], r=goal_rng: g.sample(r)  # noqa: E731
        learner = (
            ClearPPO(model, value, envs, sample_goal, config.ppo, settings.clear, buffer, stage)
            if settings.method == "clear"
            else PPO(model, value, envs, sample_goal, config.ppo)
        )
        child_tags = {**base_tags("tod_continual.domain"), "tod.domain": domain, "tod.stage_index": str(stage)}
        params = {**flatten(config), "tod.domain": domain}
        child = start_run(config.tracking, child_tags, params, run_name=f"{stage}: {domain}", parent=tracker)
        with child:
            instrument = Instrument(config.snapshot, probe, child, seed=seed)
            engine = PolicyEngine.from_config(config.policies, tracker=child)

            def observe(
                step: int,
                metrics: dict[str, float],
                instrument: Instrument = instrument,
                engine: PolicyEngine = engine,
                child: Tracker = child,
            ) -> bool:
                geometry = instrument(model, step)
                child.log_metrics(metrics, step)
                return engine.observe(step, {**geometry, **metrics}, snapshot=instrument.due(step)).stop

            if stage == 0:
                observe(step, {**untrained_figures[domain]})
            for iteration in range(1, config.train.max_steps + 1):
                step += 1
                metrics = learner.iteration()
                if iteration % config.train.eval_every == 0 and iteration < config.train.max_steps:
                    metrics.update(
                        summarize(run_dialogues(make_env(STREAM_EVAL_USER), model.greedy(env), eval_goals[domain]))
                    )
                if observe(step, metrics):
                    stopped.append(f"{domain}: stopped at step {step}")
                    break
            engine.finish()
            if isinstance(learner, ClearPPO) and settings.clear.cloning_targets == "final":
                learner.relabel()
            figures = evaluate(model.greedy(env))
            success.append({d: f["tod/success_rate"] for d, f in figures.items()})
            end = {**figures[domain], **{f"continual/success/{d}": s for d, s in success[-1].items()}}
            end.update({f"continual/dissatisfied_rate/{d}": f["tod/dissatisfied_rate"] for d, f in figures.items()})
            child.log_metrics(end, step)
            if engine.ended_by_user:  # a stop request to this domain's run: it ends KILLED, the sequence goes on
                child.finish("KILLED")
        tracker.log_metrics({f"continual/success/{d}": s for d, s in success[-1].items()}, stage)
        tracker.set_tags({f"tod.continual.{stage}.run_id": child.run_id})

    final = continual_metrics(success, untrained, sequence)
    final["continual/dissatisfied_rate"] = float(np.mean([figures[d]["tod/dissatisfied_rate"] for d in sequence]))
    for d in held_out:
        final[f"continual/zero_shot/{d}"] = success[-1][d]
        final[f"baseline/random/zero_shot/{d}"] = baselines[d]["tod/success_rate"]
    tracker.log_metrics(final, len(sequence) - 1)
    matrix = ["| after \\ on | " + " | ".join(everywhere) + " |", "|---" * (len(everywhere) + 1) + "|"]
    matrix.append("| untrained | " + " | ".join(f"{untrained[d]:.3f}" for d in everywhere) + " |")
    for stage, row in enumerate(success):
        matrix.append(f"| {stage}: {sequence[stage]} | " + " | ".join(f"{row[d]:.3f}" for d in everywhere) + " |")
    tracker.log_text("\n".join(matrix) + "\n", "continual.md")
    summary = [*stopped, f"{settings.method} over {' -> '.join(sequence)} ({config.policy.kind} policy):", *matrix]
    summary.append(", ".join(f"{k.removeprefix('continual/')} {v:.3f}" for k, v in final.items()))
    metrics = {**final, **{f"continual/success/{d}": s for d, s in success[-1].items()}}
    return StageResult(model_uri=log_policy(model, tracker), metrics=metrics, summary=summary)


def _probe_set(
    env: DialogueEnv, generators: dict[str, GoalGenerator], domains: list[str], seed: int, n: int
) -> ProbeSet:
    """Dialogue states of rule-expert dialogues in every domain, labelled by the domain's index."""
    expert, rng = RuleExpert(env), np.random.default_rng([seed, STREAM_PROBES])
    states, labels = [], []
    for index, domain in enumerate(domains):
        for _ in range(PROBE_DIALOGUES):
            state, done = env.reset(generators[domain].sample(rng)), False
            while not done:
                states.append(env.vectorise(state))
                labels.append(index)
                state, _, done = env.step(expert(state))
    ids = choose_probe_ids(np.arange(len(states)), n, seed)
    return ProbeSet(
        ids=ids,
        input_ids=torch.from_numpy(np.stack([states[i] for i in ids])).unsqueeze(1),
        attention_mask=torch.ones(len(ids), 1, dtype=torch.long),
        answer_positions=torch.zeros(len(ids), dtype=torch.long),
        labels=[labels[i] for i in ids],
    )
