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
    from pipelines.tod.config import TODStageConfig
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

    def evaluate(policy: Policy) -> dict[str, float]:
        # A fresh user stream each time: every evaluation hears the same users given the same system acts.
        return summarize(run_dialogues(make_env(STREAM_EVAL_USER), policy, eval_goals))

    env = make_env(STREAM_CORPUS)
    demos = read_demonstrations(dataset, env, env_config.domains)
    model = MLPPolicy(len(env.vectorise), len(env.actions), config.policy.hidden_size, config.policy.num_layers)
    value = ValueNetwork(len(env.vectorise), config.policy.hidden_size)
    instrument = Instrument(config.snapshot, make_probe_set(demos, config.snapshot.probes, seed), tracker, seed=seed)
    engine = PolicyEngine.from_config(config.policies, tracker=tracker)
    tracker.set_tags({tags.DEVICE: "cpu", "tod.data": config.data.path or "synthetic (generated at run time)"})

    baselines = {
        "rule_expert": evaluate(RuleExpert(env)),
        "random": evaluate(RandomPolicy(env, np.random.default_rng([seed, STREAM_RANDOM]))),
    }
    tracker.log_metrics(
        {f"baseline/{name}/{k.removeprefix('tod/')}": v for name, fig in baselines.items() for k, v in fig.items()}, 0
    )
    tracker.log_text(json.dumps({"state": env.vectorise.names, "acts": env.actions.acts}), "model/policy_io.json")

    stopped: list[str] = []

    def observe(step: int, metrics: dict[str, float]) -> bool:
        """Snapshot, log, and ask the policy engine; True: stop here."""
        geometry = instrument(model, step)
        tracker.log_metrics(metrics, step)
        decision = engine.observe(step, {**geometry, **metrics}, snapshot=instrument.due(step))
        if decision.checkpoint:
            log_policy(model, tracker, model_checkpoint_path(step))
        if decision.stop:
            stopped.append(f"stopped at step {step}: {decision.reason}")
        return decision.stop

    def imitation_metrics() -> dict[str, float]:
        loss, exact = act_accuracy(model, demos.held_states, demos.held_targets)
        return {"imitation/eval_loss": loss, "imitation/exact_match": exact}

    history: dict[str, dict[str, float]] = {"untrained": evaluate(model.greedy(env))}
    step, epochs = 0, config.imitation.epochs
    start_loss = act_accuracy(model, demos.states, demos.targets)[0]
    stop = observe(0, {**history["untrained"], "imitation/loss": start_loss, **imitation_metrics()})

    def evaluated(phase: str, metrics: dict[str, float], due: bool) -> dict[str, float]:
        """The greedy policy's figures when due; a stop is due too: the last figures describe the final policy."""
        if due:
            figures = evaluate(model.greedy(env))
            history[phase] = figures
            metrics.update(figures)
        return metrics

    # --- phase 1: imitation (ConvLab's MLE policy): multi-label BCE on the corpus's system acts ----------------
    optimizer = torch.optim.Adam(model.parameters(), lr=config.imitation.lr)
    generator = torch.Generator().manual_seed(seed)
    best_loss, best_state, best_epoch = float("inf"), None, 0
    for epoch in tqdm(range(1, 0 if stop else epochs + 1), desc="imitation", unit="epoch"):
        step = epoch
        loss = behaviour_cloning_epoch(
            model, optimizer, demos.states, demos.targets, config.imitation.batch_size, generator
        )
        held_out = imitation_metrics()
        if held_out["imitation/eval_loss"] < best_loss:
            best_loss, best_epoch = held_out["imitation/eval_loss"], epoch
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        metrics = {"imitation/loss": loss}
        if epoch == epochs and config.imitation.keep_best:  # early stopping: step `epochs` is the best epoch's model
            model.load_state_dict(best_state)
            metrics["imitation/best_epoch"] = best_epoch
            held_out = imitation_metrics()
        metrics.update(held_out)
        evaluated("imitation", metrics, epoch == epochs or epoch % config.train.eval_every == 0)
        if stop := observe(step, metrics):
            if "tod/success_rate" not in metrics:
                tracker.log_metrics(evaluated("imitation", {}, True), step)
            break
    history.setdefault("imitation", history["untrained"])

    # --- phase 2: PPO against the user simulator ------------------------------------------------------------
    goal_rng = np.random.default_rng([seed, STREAM_GOALS])
    envs = [make_env(STREAM_ENVS, i) for i in range(config.ppo.num_envs)]
    ppo = PPO(model, value, envs, lambda: goals.sample(goal_rng), config.ppo)
    last = config.train.max_steps
    for iteration in tqdm(range(1, 0 if stop else last + 1), desc="ppo", unit="iteration"):
        step = epochs + iteration
        metrics = evaluated("ppo", ppo.iteration(), iteration == last or iteration % config.train.eval_every == 0)
        if observe(step, metrics):
            if "tod/success_rate" not in metrics:
                tracker.log_metrics(evaluated("ppo", {}, True), step)
            break
    engine.finish()

    final = history.get("ppo", history["imitation"])
    facts = {
        **final,
        **{f"imitation/{k.removeprefix('tod/')}": v for k, v in history["imitation"].items()},
    }
    tracker.log_metrics({f"final/{k.removeprefix('tod/')}": v for k, v in final.items()}, step)
    summary = [
        *stopped,
        f"success rate on {len(eval_goals)} held-out goals (rule expert "
        f"{baselines['rule_expert']['tod/success_rate']:.3f}, random {baselines['random']['tod/success_rate']:.3f}):",
        f"  untrained {history['untrained']['tod/success_rate']:.3f} -> imitation "
        f"{history['imitation']['tod/success_rate']:.3f}"
        + (f" -> PPO {final['tod/success_rate']:.3f}" if "ppo" in history else " (no PPO)"),
        f"final: inform F1 {final['tod/inform_f1']:.3f}, book rate {final['tod/book_rate']:.3f}, "
        f"turns {final['tod/turns']:.2f}",
    ]
    return StageResult(log_policy(model, tracker), facts, summary, ended_by_user=engine.ended_by_user)
