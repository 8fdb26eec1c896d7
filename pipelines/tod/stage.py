"""The `tod_ppo` stage: a dialogue policy pre-trained by imitation on a corpus, then trained with PPO.

Steps 0..imitation.epochs are imitation epochs (step 0: the untrained network), then one step per PPO
iteration. The greedy policy is evaluated on fixed held-out goals (`tod/*`, ConvLab's figures) at step 0, every
`train.eval_every` steps and at the end of each phase; the rule expert and the random baseline once, on the same
goals (`baseline/<policy>/*`). The policy network's layers are snapshotted on a fixed probe set of dialogue
states from held-out corpus dialogues through `workbench.instrument.Instrument`, and every logged step goes to
the run's `PolicyEngine`, as in every stage. The network is tiny and the environment Python: it runs on CPU.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from pipelines.tod.data import TODDataset, load_dataset
from pipelines.tod.env import DialogueEnv, env_factory
from pipelines.tod.evaluator import summarize
from pipelines.tod.policy import (
    MLPPolicy,
    Policy,
    RandomPolicy,
    RuleExpert,
    ValueNetwork,
    act_accuracy,
    behaviour_cloning_epoch,
    log_policy,
    run_dialogues,
)
from pipelines.tod.ppo import PPO
from pipelines.tod.simulator import GoalGenerator
from pipelines.tod.synthetic import write_synthetic_dataset
from workbench import tags
from workbench.artifacts import model_checkpoint_path
from workbench.errors import WorkbenchError
from workbench.instrument import Instrument
from workbench.policies import PolicyEngine
from workbench.snapshots import ProbeSet, choose_probe_ids
from workbench.stages import StageResult

if TYPE_CHECKING:
    from collections.abc import Callable

    from pipelines.tod.config import TODStageConfig
    from pipelines.tod.data import Goal
    from workbench.tracking import Tracker

# Independent random streams per purpose, so e.g. the evaluation goals do not depend on the corpus size.
STREAM_CORPUS, STREAM_GOALS, STREAM_EVAL_GOALS, STREAM_EVAL_USER, STREAM_RANDOM, STREAM_ENVS = range(6)


@dataclass
class Demonstrations:
    """The corpus's system turns as (state vector, act targets), train and held out, with the held-out domains."""

    states: torch.Tensor
    targets: torch.Tensor
    held_states: torch.Tensor
    held_targets: torch.Tensor
    held_domains: list[int] = field(default_factory=list)


def read_demonstrations(dataset: TODDataset, env: DialogueEnv, domains: list[str]) -> Demonstrations:
    """Replay the corpus's dialogues whose goals stay within `domains`; held out: the validation split (or the
    last tenth of the training dialogues when there is none)."""
    usable = [i for i, g in enumerate(dataset.goals) if g.domains and set(g.domains) <= set(domains)]
    train = [i for i in usable if dataset.dialogues[i].get("data_split", "train") == "train"]
    held = [i for i in usable if dataset.dialogues[i].get("data_split") == "validation"]
    if not held:
        train, held = train[: len(train) * 9 // 10], train[len(train) * 9 // 10 :]
    if not train or not held:
        raise WorkbenchError(f"{dataset.source}: dialogues.json: too few dialogues within env.domains {domains}")

    def turns(indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        rows = [
            row
            for i in indices
            for row in env.replay(dataset.dialogues[i], f"{dataset.source}: {dataset.dialogues[i].get('dialogue_id')}")
        ]
        states = torch.from_numpy(np.stack([r[0] for r in rows]))
        targets = torch.from_numpy(np.stack([env.actions.mask(r[1]) for r in rows]))
        return states, targets, [domains.index(r[2]) if r[2] in domains else -1 for r in rows]

    states, targets, _ = turns(train)
    held_states, held_targets, held_domains = turns(held)
    return Demonstrations(states, targets, held_states, held_targets, held_domains)


def make_probe_set(demos: Demonstrations, n_probes: int, seed: int) -> ProbeSet:
    """Held-out dialogue states, each a sequence of one position; labels: the active domain's index."""
    ids = choose_probe_ids(np.arange(len(demos.held_states)), n_probes, seed)
    rows = torch.tensor(ids)
    return ProbeSet(
        ids=ids,
        input_ids=demos.held_states[rows].unsqueeze(1),
        attention_mask=torch.ones(len(ids), 1, dtype=torch.long),
        answer_positions=torch.zeros(len(ids), dtype=torch.long),
        labels=[demos.held_domains[i] for i in ids],
    )


@dataclass
class Experiment:
    """What the two phases share: the environment and its held-out goals, the policy network, the run's
    observers, the greedy policy's latest figures per phase (`history`) and the policy engine's stop messages."""

    config: TODStageConfig
    tracker: Tracker
    make_env: Callable[..., DialogueEnv]
    env: DialogueEnv
    eval_goals: list[Goal]
    demos: Demonstrations
    model: MLPPolicy
    instrument: Instrument
    engine: PolicyEngine
    history: dict[str, dict[str, float]] = field(default_factory=dict)
    stopped: list[str] = field(default_factory=list)

    def evaluate(self, policy: Policy) -> dict[str, float]:
        # A fresh user stream each time: every evaluation hears the same users given the same system acts.
        return summarize(run_dialogues(self.make_env(STREAM_EVAL_USER), policy, self.eval_goals))

    def observe(self, step: int, metrics: dict[str, float]) -> bool:
        """Snapshot, log, and ask the policy engine; True: stop here."""
        geometry = self.instrument(self.model, step)
        self.tracker.log_metrics(metrics, step)
        decision = self.engine.observe(step, {**geometry, **metrics}, snapshot=self.instrument.due(step))
        if decision.checkpoint:
            log_policy(self.model, self.tracker, model_checkpoint_path(step))
        if decision.stop:
            self.stopped.append(f"stopped at step {step}: {decision.reason}")
        return decision.stop

    def evaluated(self, phase: str, metrics: dict[str, float], due: bool) -> dict[str, float]:
        """The greedy policy's figures when due; a stop is due too: the last figures describe the final policy."""
        if due:
            figures = self.evaluate(self.model.greedy(self.env))
            self.history[phase] = figures
            metrics.update(figures)
        return metrics

    def stops(self, phase: str, step: int, metrics: dict[str, float]) -> bool:
        """`observe`; on a stop, the greedy policy's figures too, unless this step has them already."""
        if not self.observe(step, metrics):
            return False
        if "tod/success_rate" not in metrics:
            self.tracker.log_metrics(self.evaluated(phase, {}, True), step)
        return True


def imitation_metrics(model: MLPPolicy, demos: Demonstrations) -> dict[str, float]:
    """Loss and exact match of the act sets on the held-out corpus turns."""
    loss, exact = act_accuracy(model, demos.held_states, demos.held_targets)
    return {"imitation/eval_loss": loss, "imitation/exact_match": exact}


def imitate(exp: Experiment, stop: bool) -> tuple[int, bool]:
    """Phase 1, step = epoch; (the last step, whether the policy engine stopped the run)."""
    config, model, demos = exp.config, exp.model, exp.demos
    epochs = config.imitation.epochs
    optimizer = torch.optim.Adam(model.parameters(), lr=config.imitation.lr)
    generator = torch.Generator().manual_seed(config.seed)
    best_loss, best_state, best_epoch = float("inf"), None, 0
    step = 0
    for epoch in tqdm(range(1, 0 if stop else epochs + 1), desc="imitation", unit="epoch"):
        step = epoch
        loss = behaviour_cloning_epoch(
            model, optimizer, demos.states, demos.targets, config.imitation.batch_size, generator
        )
        held_out = imitation_metrics(model, demos)
        if held_out["imitation/eval_loss"] < best_loss:
            best_loss, best_epoch = held_out["imitation/eval_loss"], epoch
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        metrics = {"imitation/loss": loss}
        if epoch == epochs and config.imitation.keep_best:  # early stopping: step `epochs` is the best epoch's model
            model.load_state_dict(best_state)
            metrics["imitation/best_epoch"] = best_epoch
            held_out = imitation_metrics(model, demos)
        metrics.update(held_out)
        exp.evaluated("imitation", metrics, epoch == epochs or epoch % config.train.eval_every == 0)
        if stop := exp.stops("imitation", step, metrics):
            break
    return step, stop


def reinforce(exp: Experiment, ppo: PPO, step: int, stop: bool) -> int:
    """Phase 2, step = imitation.epochs + iteration; the last step (`step` when no iteration runs)."""
    epochs, last, eval_every = exp.config.imitation.epochs, exp.config.train.max_steps, exp.config.train.eval_every
    for iteration in tqdm(range(1, 0 if stop else last + 1), desc="ppo", unit="iteration"):
        step = epochs + iteration
        metrics = exp.evaluated("ppo", ppo.iteration(), iteration == last or iteration % eval_every == 0)
        if exp.stops("ppo", step, metrics):
            break
    return step


def summary_lines(exp: Experiment, baselines: dict[str, dict[str, float]], final: dict[str, float]) -> list[str]:
    """Stops, then success from untrained to imitation to PPO against the baselines, then the final figures."""
    history = exp.history
    return [
        *exp.stopped,
        f"success rate on {len(exp.eval_goals)} held-out goals (rule expert "
        f"{baselines['rule_expert']['tod/success_rate']:.3f}, random {baselines['random']['tod/success_rate']:.3f}):",
        f"  untrained {history['untrained']['tod/success_rate']:.3f} -> imitation "
        f"{history['imitation']['tod/success_rate']:.3f}"
        + (f" -> PPO {final['tod/success_rate']:.3f}" if "ppo" in history else " (no PPO)"),
        f"final: inform F1 {final['tod/inform_f1']:.3f}, book rate {final['tod/book_rate']:.3f}, "
        f"turns {final['tod/turns']:.2f}",
    ]


def run(config: TODStageConfig, tracker: Tracker) -> StageResult:
    seed, env_config = config.seed, config.env
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory(prefix="workbench-tod-") as tmp:
        source = config.data.path or write_synthetic_dataset(tmp, config.data.dialogues, config.data.wizard_noise, seed)
        dataset = load_dataset(source, env_config.domains)
    make_env = env_factory(dataset, env_config, seed)
    goals = GoalGenerator(
        dataset.ontology,
        dataset.db,
        env_config.domains,
        max_domains=env_config.max_domains,
        book_probability=env_config.book_probability,
    )
    eval_rng = np.random.default_rng([seed, STREAM_EVAL_GOALS])
    eval_goals = [goals.sample(eval_rng) for _ in range(env_config.eval_dialogues)]

    env = make_env(STREAM_CORPUS)
    demos = read_demonstrations(dataset, env, env_config.domains)
    model = MLPPolicy(len(env.vectorise), len(env.actions), config.policy.hidden_size, config.policy.num_layers)
    value = ValueNetwork(len(env.vectorise), config.policy.hidden_size)
    instrument = Instrument(config.snapshot, make_probe_set(demos, config.snapshot.probes, seed), tracker, seed=seed)
    engine = PolicyEngine.from_config(config.policies, tracker=tracker)
    tracker.set_tags({tags.DEVICE: "cpu", "tod.data": config.data.path or "synthetic (generated at run time)"})
    exp = Experiment(config, tracker, make_env, env, eval_goals, demos, model, instrument, engine)

    baselines = {
        "rule_expert": exp.evaluate(RuleExpert(env)),
        "random": exp.evaluate(RandomPolicy(env, np.random.default_rng([seed, STREAM_RANDOM]))),
    }
    tracker.log_metrics(
        {f"baseline/{name}/{k.removeprefix('tod/')}": v for name, fig in baselines.items() for k, v in fig.items()}, 0
    )
    tracker.log_text(json.dumps({"state": env.vectorise.names, "acts": env.actions.acts}), "model/policy_io.json")

    exp.history["untrained"] = exp.evaluate(model.greedy(env))
    start_loss = act_accuracy(model, demos.states, demos.targets)[0]
    stop = exp.observe(0, {**exp.history["untrained"], "imitation/loss": start_loss, **imitation_metrics(model, demos)})

    # --- phase 1: imitation (ConvLab's MLE policy): multi-label BCE on the corpus's system acts ----------------
    step, stop = imitate(exp, stop)
    exp.history.setdefault("imitation", exp.history["untrained"])

    # --- phase 2: PPO against the user simulator ------------------------------------------------------------
    goal_rng = np.random.default_rng([seed, STREAM_GOALS])
    envs = [make_env(STREAM_ENVS, i) for i in range(config.ppo.num_envs)]
    ppo = PPO(model, value, envs, lambda: goals.sample(goal_rng), config.ppo)
    step = reinforce(exp, ppo, step, stop)
    engine.finish()

    final = exp.history.get("ppo", exp.history["imitation"])
    facts = {**final, **{f"imitation/{k.removeprefix('tod/')}": v for k, v in exp.history["imitation"].items()}}
    tracker.log_metrics({f"final/{k.removeprefix('tod/')}": v for k, v in final.items()}, step)
    summary = summary_lines(exp, baselines, final)
    return StageResult(log_policy(model, tracker), facts, summary, ended_by_user=engine.ended_by_user)
