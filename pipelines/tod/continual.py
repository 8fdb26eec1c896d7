"""The `tod_continual` stage: one dialogue policy trained with PPO on a sequence of domains, naively or with CLEAR.

The state and action spaces are those of all `env.domains`, so one network serves every domain; stage i trains on
single-domain goals of `continual.domains[i]` from where stage i-1 left the network ("naive": plain PPO). CLEAR
(Rolnick et al. 2019, "Experience Replay for Continual Learning") also stores every rollout in a reservoir buffer,
as pieces of consecutive turns with the behaviour policy mu's log-probabilities, logits and values, and adds to
every minibatch, on replayed pieces, V-trace's off-policy actor-critic loss (Espeholt et al. 2018; `vtrace`),
policy cloning KL(target || pi) and value cloning. The cloning targets are each domain's final networks, on earlier
domains' turns (`clear.cloning_targets: final`; Wolczyk et al. 2022, "Disentangling Transfer in Continual
Reinforcement Learning", ClonEx; `ClearPPO.relabel`), or CLEAR's stored behaviour (`behaviour`). After each stage
the greedy policy is evaluated on every domain, the held-out ones zero-shot: R[i][j], whence `continual_metrics`.
One parent run, a nested run per domain (tag `tod.domain`), each snapshotting one probe set fixed for the sequence
(dialogue states of every domain, labelled by domain), so the app compares the policy's representation before and
after each switch. Measured figures: docs/tod.md and benchmarks/results/tod_continual.md.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.distributions import Bernoulli, kl_divergence

from pipelines.tod.data import Goal, TODDataset, load_dataset
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
        and values now (`cloning_targets: final`); their log-probabilities stay the behaviour's, for V-trace.
        CLEAR's own targets, the behaviour stored with each turn, mix an old domain's untrained start with its
        trained end (reservoir sampling keeps every moment of training alike), and a greedy multi-hot policy (an
        act is taken when p > 0.5) pulled towards that mixture loses acts it needs."""
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
        # (A truncated ratio inside PPO's clipped surrogate has no gradient where pi/mu > rho_bar: an act the policy
        # came to prefer would never be pushed down however bad; docs/tod.md.)
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
    """From R[i][j] = `success[i][j]`, success on domain j after stage i, as the continual-learning literature
    defines them: average success at the end, forgetting (Chaudhry et al. 2018: f_j = max_{l<T-1} R[l][j] -
    R[T-1][j], mean over earlier domains) and forward transfer (Lopez-Paz and Ranzato 2017: mean over i >= 1 of
    R[i-1][i] - b_i, b_i the untrained network's success on domain i)."""
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


@dataclass
class Experiment:
    """What every domain's training shares: the environments, the fixed evaluation goals of every domain (sequence
    and held out), the networks, the probe set, and the policy engines' stop messages."""

    config: TODContinualStageConfig
    make_env: Callable[..., DialogueEnv]
    env: DialogueEnv
    generators: dict[str, GoalGenerator]
    eval_goals: dict[str, list[Goal]]
    model: MLPPolicy | DDPTPolicy
    value: ValueNetwork
    probe: ProbeSet
    stopped: list[str] = field(default_factory=list)

    def evaluate_on(self, policy: Policy, domain: str) -> dict[str, float]:
        return summarize(run_dialogues(self.make_env(STREAM_EVAL_USER), policy, self.eval_goals[domain]))

    def evaluate(self, policy: Policy) -> dict[str, dict[str, float]]:
        return {d: self.evaluate_on(policy, d) for d in self.eval_goals}


def success_rates(figures: dict[str, dict[str, float]]) -> dict[str, float]:
    return {d: f["tod/success_rate"] for d, f in figures.items()}


def build_policy(config: TODContinualStageConfig, env: DialogueEnv) -> MLPPolicy | DDPTPolicy:
    """`policy.kind`'s network over the env's state and acts; either kind's acts start at INITIAL_ACT_LOGIT."""
    policy = config.policy
    if policy.kind == "ddpt":
        space = DescribedSpace(
            env.actions, env.vectorise, load_descriptions(policy.descriptions, env.actions, env.vectorise)
        )
        encoded = encode_descriptions(policy.encoder, space) if policy.encoder else None
        return DDPTPolicy(space, policy.hidden_size, policy.num_layers, encoded)
    model = MLPPolicy(len(env.vectorise), len(env.actions), policy.hidden_size, policy.num_layers)
    torch.nn.init.constant_(model.head.bias, INITIAL_ACT_LOGIT)
    return model


def domain_learner(exp: Experiment, buffer: ReservoirBuffer, stage: int) -> PPO:
    """The stage's learner, plain PPO (`naive`) or `ClearPPO`, on single-domain goals of the stage's domain; its
    rollout environments and goals draw from random streams of their own."""
    config, domain = exp.config, exp.config.continual.domains[stage]
    goal_rng = np.random.default_rng([config.seed, STREAM_GOALS, stage])
    envs = [exp.make_env(STREAM_ENVS, 100 * stage + e) for e in range(config.ppo.num_envs)]
    sample_goal = partial(exp.generators[domain].sample, goal_rng)
    if config.continual.method == "clear":
        return ClearPPO(exp.model, exp.value, envs, sample_goal, config.ppo, config.continual.clear, buffer, stage)
    return PPO(exp.model, exp.value, envs, sample_goal, config.ppo)


def train_domain(
    exp: Experiment, tracker: Tracker, learner: PPO, stage: int, step: int, start: dict[str, float] | None
) -> tuple[str, int, dict[str, dict[str, float]]]:
    """The stage's domain in its own nested run: `start` logged at `step` (if given), `train.max_steps` PPO
    iterations after it, then the greedy policy's figures on every domain; (the nested run's id, the last step,
    those figures)."""
    config, model, domain = exp.config, exp.model, exp.config.continual.domains[stage]
    child_tags = {**base_tags("tod_continual.domain"), "tod.domain": domain, "tod.stage_index": str(stage)}
    params = {**flatten(config), "tod.domain": domain}
    child = start_run(config.tracking, child_tags, params, run_name=f"{stage}: {domain}", parent=tracker)
    with child:
        instrument = Instrument(config.snapshot, exp.probe, child, seed=config.seed)
        engine = PolicyEngine.from_config(config.policies, tracker=child)

        def observe(step: int, metrics: dict[str, float]) -> bool:
            geometry = instrument(model, step)
            child.log_metrics(metrics, step)
            return engine.observe(step, {**geometry, **metrics}, snapshot=instrument.due(step)).stop

        if start is not None:
            observe(step, {**start})
        for iteration in range(1, config.train.max_steps + 1):
            step += 1
            metrics = learner.iteration()
            if iteration % config.train.eval_every == 0 and iteration < config.train.max_steps:
                metrics.update(exp.evaluate_on(model.greedy(exp.env), domain))
            if observe(step, metrics):
                exp.stopped.append(f"{domain}: stopped at step {step}")
                break
        engine.finish()
        if isinstance(learner, ClearPPO) and config.continual.clear.cloning_targets == "final":
            learner.relabel()
        figures = exp.evaluate(model.greedy(exp.env))
        end = {**figures[domain], **{f"continual/success/{d}": s for d, s in success_rates(figures).items()}}
        end.update({f"continual/dissatisfied_rate/{d}": f["tod/dissatisfied_rate"] for d, f in figures.items()})
        child.log_metrics(end, step)
        if engine.ended_by_user:  # a stop request to this domain's run: it ends KILLED, the sequence goes on
            child.finish("KILLED")
    return child.run_id, step, figures


def final_metrics(
    config: TODContinualStageConfig,
    success: list[dict[str, float]],
    untrained: dict[str, float],
    baselines: dict[str, dict[str, float]],
    figures: dict[str, dict[str, float]],
) -> dict[str, float]:
    """`continual_metrics`, the dissatisfied rate over the sequence at the end (`figures`: the last stage's), and
    zero-shot success on each held-out domain beside the random policy's."""
    sequence = config.continual.domains
    final = continual_metrics(success, untrained, sequence)
    final["continual/dissatisfied_rate"] = float(np.mean([figures[d]["tod/dissatisfied_rate"] for d in sequence]))
    for d in config.continual.held_out:
        final[f"continual/zero_shot/{d}"] = success[-1][d]
        final[f"baseline/random/zero_shot/{d}"] = baselines[d]["tod/success_rate"]
    return final


def success_matrix(
    sequence: list[str], everywhere: list[str], untrained: dict[str, float], success: list[dict[str, float]]
) -> list[str]:
    """R[i][j] as a Markdown table: a row per stage after the untrained network's, a column per domain."""
    matrix = ["| after \\ on | " + " | ".join(everywhere) + " |", "|---" * (len(everywhere) + 1) + "|"]
    matrix.append("| untrained | " + " | ".join(f"{untrained[d]:.3f}" for d in everywhere) + " |")
    for stage, row in enumerate(success):
        matrix.append(f"| {stage}: {sequence[stage]} | " + " | ".join(f"{row[d]:.3f}" for d in everywhere) + " |")
    return matrix


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
    env = make_env(STREAM_ENVS)
    model = build_policy(config, env)
    value = ValueNetwork(len(env.vectorise), config.policy.hidden_size)
    probe = _probe_set(env, generators, everywhere, seed, config.snapshot.probes)
    tracker.set_tags({tags.DEVICE: "cpu", "tod.sequence": ",".join(sequence), "tod.held_out": ",".join(held_out)})
    exp = Experiment(config, make_env, env, generators, eval_goals, model, value, probe)

    baselines = exp.evaluate(RandomPolicy(env, np.random.default_rng([seed, STREAM_RANDOM])))
    untrained_figures = exp.evaluate(model.greedy(env))
    untrained = success_rates(untrained_figures)
    tracker.log_metrics({f"baseline/random/success/{d}": s for d, s in success_rates(baselines).items()}, 0)
    tracker.log_metrics({f"baseline/untrained/success/{d}": s for d, s in untrained.items()}, 0)

    capacity = max(1, settings.clear.replay_size // replay_piece(config.ppo.num_steps))  # in pieces
    buffer = ReservoirBuffer(capacity, np.random.default_rng([seed, STREAM_REPLAY]))
    success: list[dict[str, float]] = []
    step = 0
    for stage, domain in enumerate(sequence):
        learner = domain_learner(exp, buffer, stage)
        start = untrained_figures[domain] if stage == 0 else None  # step 0 (the untrained network) is the first run's
        run_id, step, figures = train_domain(exp, tracker, learner, stage, step, start)
        success.append(success_rates(figures))
        tracker.log_metrics({f"continual/success/{d}": s for d, s in success[-1].items()}, stage)
        tracker.set_tags({f"tod.continual.{stage}.run_id": run_id})

    final = final_metrics(config, success, untrained, baselines, figures)
    tracker.log_metrics(final, len(sequence) - 1)
    matrix = success_matrix(sequence, everywhere, untrained, success)
    tracker.log_text("\n".join(matrix) + "\n", "continual.md")
    summary = [*exp.stopped, f"{settings.method} over {' -> '.join(sequence)} ({config.policy.kind} policy):", *matrix]
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
