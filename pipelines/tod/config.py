"""Settings of the task-oriented dialogue stages: `tod_ppo` (imitation, then PPO against the simulated user) and
`tod_continual` (PPO on a sequence of domains, naive or CLEAR); docs/tod.md."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from workbench.config import SnapshotConfig, StageConfig, TrainConfig
from workbench.schema import Strict


class TODDataConfig(Strict):
    path: str | None = Field(
        None,
        description="A ConvLab-3 unified dataset: a directory with data.zip, or with ontology.json, dialogues.json "
        "and <domain>_db.json (MultiWOZ 2.1 as ConvLab ships it). Empty: a synthetic corpus and databases in that "
        "layout, generated at run time.",
    )
    dialogues: int = Field(
        100, ge=10, description="Dialogues in the synthetic corpus (80/10/10 train/validation/test splits)."
    )
    wizard_noise: float = Field(
        0.3,
        ge=0,
        le=1,
        description="Share of the synthetic corpus's system turns where the wizard (the rule expert) makes one "
        "mistake: an act added or left out, as human wizards do.",
    )


class TODEnvConfig(Strict):
    domains: list[str] = Field(
        ["restaurant", "hotel", "attraction", "train", "taxi"], min_length=1, description="Domains goals draw from."
    )
    max_domains: int = Field(3, ge=1, description="Most domains in one goal (at least 1).")
    book_probability: float = Field(0.5, ge=0, le=1, description="Chance a bookable domain's goal has a booking.")
    max_turns: int = Field(30, gt=0, description="System turns before a dialogue is cut off (a failure).")
    max_user_acts: int = Field(3, gt=0, description="Most dialogue acts the simulated user says per turn.")
    eval_dialogues: int = Field(200, gt=0, description="Fixed held-out goals every evaluation runs (greedy policy).")
    reward_success: float = Field(80.0, description="Final reward of a successful dialogue (ConvLab's).")
    reward_failure: float = Field(-40.0, description="Final reward of a failed dialogue (ConvLab's).")
    reward_turn: float = Field(-1.0, description="Reward of every other turn (ConvLab's).")
    reward_dissatisfied: float = Field(
        0.0, le=0, description="Reward of every turn the simulated user is dissatisfied (EmoWOZ-style emotion)."
    )


class TODPolicyModelConfig(Strict):
    hidden_size: int = Field(128, gt=0, description="Width of the policy and value MLPs.")
    num_layers: int = Field(2, gt=0, description="Hidden layers after the input projection.")


class ImitationConfig(Strict):
    epochs: int = Field(60, ge=0, description="Passes over the corpus's training dialogues (0: start PPO untrained).")
    batch_size: int = Field(64, gt=0)
    lr: float = Field(1e-3, gt=0, description="Adam learning rate of the behaviour-cloning loss (multi-label BCE).")
    keep_best: bool = Field(
        True, description="PPO starts from the epoch with the lowest held-out loss (early stopping), not the last."
    )


class TODPPOSettings(Strict):
    num_envs: int = Field(8, gt=0, description="Dialogues run side by side in a rollout.")
    num_steps: int = Field(64, gt=0, description="Turns per dialogue slot per rollout (batch = num_envs x num_steps).")
    lr: float = Field(1e-4, gt=0, description="Adam learning rate of the policy.")
    value_lr: float = Field(1e-3, gt=0, description="Adam learning rate of the value network.")
    gamma: float = Field(0.99, ge=0, le=1, description="Discount (ConvLab's).")
    gae_lambda: float = Field(0.95, ge=0, le=1, description="lambda of GAE (Schulman et al. 2016).")
    clip_coef: float = Field(0.2, gt=0, description="epsilon of the clipped surrogate (PPO eq. 7).")
    ent_coef: float = Field(0.0, ge=0, description="Weight of the entropy bonus.")
    update_epochs: int = Field(4, gt=0, description="Passes over each rollout batch.")
    num_minibatches: int = Field(4, gt=0)
    max_grad_norm: float = Field(0.5, gt=0, description="Gradient clipping, per network.")


class TODTrainConfig(TrainConfig):
    max_steps: int = Field(60, gt=0, description="PPO iterations (one rollout batch and its update each).")
    eval_every: int = Field(5, gt=0, description="Evaluate the greedy policy on the held-out goals every N steps.")


class TODSnapshotConfig(SnapshotConfig):
    every: int = Field(5, gt=0, description="Snapshot the probe set every N steps (and at step 0).")
    pooling: Literal["token", "last", "mean", "answer"] = Field(
        "last", description="A dialogue state is one position: every pooling gives the same point."
    )
    probes: int = Field(512, gt=0, description="Dialogue states from held-out corpus dialogues.")


class _DialoguePPOStageConfig(StageConfig):
    """What both dialogue stages train with: PPO, its iterations, snapshots of dialogue states."""

    ppo: TODPPOSettings = TODPPOSettings()
    train: TODTrainConfig = TODTrainConfig()
    snapshot: TODSnapshotConfig = TODSnapshotConfig()


class TODStageConfig(_DialoguePPOStageConfig):
    """Imitation on a dialogue corpus, then PPO against the agenda-based user (docs/tod.md). Steps 0..epochs are
    imitation epochs, then one step per PPO iteration."""

    stage: Literal["tod_ppo"] = "tod_ppo"
    data: TODDataConfig = TODDataConfig()
    env: TODEnvConfig = TODEnvConfig()
    policy: TODPolicyModelConfig = TODPolicyModelConfig()
    imitation: ImitationConfig = ImitationConfig()


class TODContinualEnvConfig(TODEnvConfig):
    domains: list[str] = Field(
        ["restaurant", "hotel", "attraction", "train", "taxi"],
        min_length=1,
        description="Domains of the state and action spaces: every domain of the sequence and the held-out ones.",
    )
    eval_dialogues: int = Field(100, gt=0, description="Fixed held-out single-domain goals per domain and evaluation.")


class TODDescribedPolicyConfig(TODPolicyModelConfig):
    kind: Literal["ddpt", "mlp"] = Field(
        "ddpt", description="ddpt: acts and state features described in words, attention over them; mlp: fixed indices."
    )
    hidden_size: int = Field(64, gt=0, description="Width of the word embeddings, attention and MLPs.")
    descriptions: str | None = Field(
        None,
        description="JSON {domains: {d: text}, intents: {i: text}, slots: {d: {slot: text}}} describing every "
        "domain, intent and slot in use; empty: each name describes itself.",
    )
    encoder: str | None = Field(
        None,
        description="A local `transformers` model directory (model and tokenizer) that encodes the descriptions, "
        "frozen and mean-pooled (ddpt only); empty: word embeddings trained with the policy.",
    )


class ClearConfig(Strict):
    replay_size: int = Field(
        20000, gt=0, description="Transitions the replay buffer keeps (reservoir sampling once full)."
    )
    replay_ratio: float = Field(0.5, gt=0, description="Replayed rows per on-policy row in every minibatch.")
    rho_bar: float = Field(1.0, gt=0, description="Truncation of the importance weight pi/mu (V-trace's rho-bar).")
    policy_cloning: float = Field(
        0.1, ge=0, description="Weight of KL(target || pi) on replayed states (CLEAR's 0.01 is for its own targets)."
    )
    value_cloning: float = Field(0.005, ge=0, description="Weight of the squared error to replayed values (CLEAR's).")
    cloning_targets: Literal["final", "behaviour"] = Field(
        "final",
        description="final: clone, on earlier domains' replay only, the networks as they were when that domain "
        "ended (Wolczyk et al. 2022); behaviour: clone the stored behaviour on all replay (CLEAR as published).",
    )


class TODContinualSettings(Strict):
    domains: list[str] = Field(
        ["restaurant", "hotel", "train"], min_length=1, description="The domains trained on, in order."
    )
    held_out: list[str] = Field(["attraction"], description="Domains never trained on: zero-shot success.")
    method: Literal["clear", "naive"] = Field(
        "naive", description="naive: PPO on each domain in turn; clear: with CLEAR's replay terms."
    )
    clear: ClearConfig = ClearConfig()

    @model_validator(mode="after")
    def _disjoint(self) -> TODContinualSettings:
        both = sorted(set(self.domains) & set(self.held_out))
        if both:
            raise ValueError(f"held_out: {both[0]} is also in continual.domains")
        return self


class TODContinualStageConfig(_DialoguePPOStageConfig):
    """PPO on a sequence of single-domain dialogue tasks, naive or CLEAR; one nested run per domain
    (docs/tod.md). `train.max_steps` PPO iterations per domain; steps run on across domains."""

    stage: Literal["tod_continual"] = "tod_continual"
    data: TODDataConfig = TODDataConfig(dialogues=10)
    env: TODContinualEnvConfig = TODContinualEnvConfig()
    policy: TODDescribedPolicyConfig = TODDescribedPolicyConfig()
    continual: TODContinualSettings = TODContinualSettings()

    @model_validator(mode="after")
    def _domains_in_env(self) -> TODContinualStageConfig:
        for field, names in (
            ("continual.domains", self.continual.domains),
            ("continual.held_out", self.continual.held_out),
        ):
            missing = [d for d in names if d not in self.env.domains]
            if missing:
                raise ValueError(f"{field}: {missing[0]} not in env.domains {self.env.domains}")
        return self
