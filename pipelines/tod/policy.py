"""Dialogue policies: the rule expert, a random baseline, and the MLP policy with its imitation pre-training.

The MLP reads the state vector and gives one logit per atomic system act; acts are sampled independently
(Bernoulli per act: ConvLab's MultiDiscretePolicy) and the greedy policy takes those with probability > 0.5.
Pre-training is behaviour cloning with a multi-label BCE loss on the corpus's system turns, ConvLab's MLE
policy. The network answers `model(input_ids=..., output_hidden_states=True)` like a `transformers` model,
so the workbench's `Instrument` snapshots it: a dialogue state is a sequence of one position, layer_00 is the
input projection (the state's embedding) and layer_i the i-th hidden layer's activations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from pipelines.tod.data import TAXI, Goal
from pipelines.tod.dst import DialogueState
from pipelines.tod.env import AtomicAct, DialogueEnv
from pipelines.tod.evaluator import DialogueScore
from workbench.artifacts import MODEL_DIR, log_folder

if TYPE_CHECKING:
    from workbench.tracking import Tracker

Policy = Callable[[DialogueState], Sequence[AtomicAct]]


class RuleExpert:
    """A hand-written system, ConvLab's rule policy in spirit. Answer what the user asked; when the user gives
    booking details, ask for the missing ones, then book; otherwise narrow the search by asking for one missing
    constraint while more than one entity matches (taxi: until it can be ordered); else offer more help."""

    def __init__(self, env: DialogueEnv) -> None:
        self.schemas = {s.name: s for s in env.schemas}

    def __call__(self, state: DialogueState) -> list[AtomicAct]:
        domain = state.domain
        if domain is None:
            return [("reqmore", "general", "")]
        schema, belief = self.schemas[domain], state.belief[domain]
        acts: list[AtomicAct] = []
        if state.matches.get(domain, 0):
            acts += [("inform", domain, s) for s in schema.requestable if s in state.requested[domain]]
        if schema.book and not state.booked[domain] and any(belief[s] for s in schema.book):
            missing = [s for s in schema.book if not belief[s]]
            acts += [("request", domain, s) for s in missing] or [("book", domain, "")]
        if not acts:
            unfilled = [s for s in schema.informable if not belief[s]]
            if domain == TAXI:
                unfilled = [s for s in ("departure", "destination") if not belief[s]] or (
                    ["leave at"] if not (belief["leave at"] or belief["arrive by"]) else []
                )
            elif state.matches.get(domain, 0) <= 1:
                unfilled = []
            acts += [("request", domain, unfilled[0])] if unfilled else [("reqmore", "general", "")]
        return acts


class RandomPolicy:
    """1 to 3 atomic acts drawn uniformly at random each turn."""

    def __init__(self, env: DialogueEnv, rng: np.random.Generator) -> None:
        self.acts, self.rng = env.actions.acts, rng

    def __call__(self, state: DialogueState) -> list[AtomicAct]:
        k = int(self.rng.integers(1, 4))
        return [self.acts[i] for i in self.rng.choice(len(self.acts), size=k, replace=False)]


@dataclass
class PolicyOutput:
    logits: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None


class MLPPolicy(nn.Module):
    """state -> Linear (embedding) -> [ReLU -> Linear] x num_layers -> ReLU -> one logit per act."""

    def __init__(self, state_size: int, n_acts: int, hidden_size: int = 128, num_layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(state_size, hidden_size)
        self.layers = nn.ModuleList(nn.Linear(hidden_size, hidden_size) for _ in range(num_layers))
        self.head = nn.Linear(hidden_size, n_acts)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> PolicyOutput:
        h = self.embed(input_ids.float())
        hidden = [h]
        for layer in self.layers:
            h = layer(F.relu(h))
            hidden.append(F.relu(h))
        return PolicyOutput(self.head(F.relu(h)), tuple(hidden) if output_hidden_states else None)

    def greedy(self, env: DialogueEnv) -> Policy:
        """The deterministic policy: every act with probability > 0.5."""

        def act(state: DialogueState) -> list[AtomicAct]:
            with torch.inference_mode():
                logits = self(torch.from_numpy(env.vectorise(state))).logits
            return env.actions.decode((logits > 0).numpy())

        return act


class ValueNetwork(nn.Module):
    def __init__(self, state_size: int, hidden_size: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(state_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, hidden_size), nn.ReLU()
        )
        self.out = nn.Linear(hidden_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.net(x)).squeeze(-1)


def run_dialogues(env: DialogueEnv, policy: Policy, goals: Sequence[Goal]) -> list[DialogueScore]:
    """One dialogue per goal; each score carries the dialogue's undiscounted return."""
    scores = []
    for goal in goals:
        state, total, done = env.reset(goal), 0.0, False
        while not done:
            state, reward, done = env.step(policy(state))
            total += reward
        score = env.score()
        score.reward = total
        scores.append(score)
    return scores


def behaviour_cloning_epoch(
    model: MLPPolicy,
    optimizer: torch.optim.Optimizer,
    states: torch.Tensor,
    targets: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
) -> float:
    """One pass of multi-label BCE over (state, system acts) pairs in a seeded order; the mean loss."""
    model.train()
    order = torch.randperm(len(states), generator=generator)
    losses = []
    for start in range(0, len(states), batch_size):
        rows = order[start : start + batch_size]
        loss = F.binary_cross_entropy_with_logits(model(states[rows]).logits, targets[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return float(np.mean(losses))


def act_accuracy(model: MLPPolicy, states: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """(BCE loss, share of turns whose greedy act set equals the corpus's) on held-out turns."""
    with torch.inference_mode():
        logits = model(states).logits
        loss = F.binary_cross_entropy_with_logits(logits, targets).item()
        exact = ((logits > 0).float() == targets).all(dim=-1).float().mean().item()
    return loss, exact


def log_policy(model: MLPPolicy, tracker: Tracker, artifact_path: str = MODEL_DIR) -> str:
    """The policy's weights as `<artifact_path>/policy.safetensors` (both TOD stages); their `runs:/` URI."""
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    return log_folder(tracker, artifact_path, lambda folder: save_file(weights, str(folder / "policy.safetensors")))
