"""Run configuration: YAML files validated by pydantic, with `key.sub=value` overrides.

One pydantic model per stage, registered by its `stage:` name in `STAGE_CONFIGS`; the sub-configs every
stage shares (`train`, `snapshot`, `tracking`, `policies`) are defined once here. Every field is
documented, in the manner of TRL's `*Config` dataclasses.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from workbench.errors import WorkbenchError
from workbench.geometry import ONLINE_DEFAULT, Feature

_Model = TypeVar("_Model", bound=BaseModel)


class _Strict(BaseModel):
    # A typo'd key must be an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid")


class TrainConfig(_Strict):
    max_steps: int = Field(3000, gt=0, description="Optimizer steps to run.")
    eval_every: int = Field(10, gt=0, description="Evaluate and log train/eval metrics every N steps.")


class SnapshotConfig(_Strict):
    enabled: bool = Field(True, description="Snapshot hidden states and log online geometry.")
    every: int = Field(50, gt=0, description="Snapshot the probe set every N steps (and at step 0).")
    layers: Literal["all"] | list[int] = Field(
        "all", description="Hidden-state layers to keep: 'all' or indices (0 = embeddings, -1 = last)."
    )
    pooling: Literal["token", "last", "mean", "answer"] = Field(
        "token",
        description="token: every non-pad token (subsampled to max_points); last: last token; "
        "mean: mean over tokens; answer: the position that predicts the answer.",
    )
    max_points: int = Field(4096, gt=0, description="Cap on points per snapshot (token pooling).")
    probes: int = Field(1024, gt=0, description="Size of the fixed held-out probe set.")
    probe_batch_size: int = Field(
        256, gt=0, description="Probes per forward pass of a snapshot: bounds the memory of all layers' states."
    )
    dtype: Literal["float16", "float32"] = Field("float16", description="Stored precision of snapshots.")
    geometry: list[Feature] = Field(
        list(ONLINE_DEFAULT),
        description="Online geometry logged as geom/<feature>/layer_<i> (workbench/geometry.py lists them); "
        "heavy ones (lid_local, tda) cost seconds per snapshot and are better left to `workbench analyze`.",
    )
    geometry_budget_s: float = Field(
        1.0,
        gt=0,
        description="Online geometry time per snapshot; when a snapshot takes longer, its costliest features "
        "move offline for the rest of the run (compute them with `workbench analyze`).",
    )
    mle_neighbors: int = Field(20, gt=1, description="k of the Levina-Bickel MLE estimator.")
    local_neighbors: int = Field(64, gt=2, description="Neighbourhood size of the pointwise (local) LID.")
    tda_landmarks: int = Field(500, gt=1, description="Max-min landmarks persistent homology is computed on.")


class TrackingConfig(_Strict):
    uri: str | None = Field(
        None, description="MLflow tracking URI; default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here."
    )
    experiment: str = Field("workbench", min_length=1, description="MLflow experiment name.")
    run_name: str | None = Field(None, description="MLflow run name (MLflow picks one when empty).")
    flush_seconds: float = Field(5.0, gt=0, description="Send buffered metrics at least this often.")


class StageConfig(_Strict):
    """Keys every stage accepts (DESIGN.md, public interface)."""

    stage: str
    seed: int = Field(0, description="Seeds data split, model init and probe choice.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when present.")
    train: TrainConfig = TrainConfig()
    snapshot: SnapshotConfig = SnapshotConfig()
    tracking: TrackingConfig = TrackingConfig()
    policies: list[dict[str, Any]] | str = Field(
        [],
        description="Early-stop policy rules, or a path to a YAML file of them, relative to the config file "
        "(docs/policies.md).",
    )

    @field_validator("policies")
    @classmethod
    def _valid_rules(cls, value: list[dict[str, Any]] | str) -> list[dict[str, Any]] | str:
        # Inline rules are checked with the file; a path is read by `workbench run`, which knows the config's folder.
        if isinstance(value, list):
            from workbench.policies import load_rules

            try:
                load_rules(value)
            except WorkbenchError as exc:
                raise ValueError(str(exc)) from None
        return value


# --- the grokking stage -------------------------------------------------------------------------------


class TaskConfig(_Strict):
    op: Literal["+", "-", "*", "/", "x^2+xy+y^2"] = Field("+", description="The binary operation a∘b mod p.")
    p: int = Field(97, ge=2, description="The modulus.")
    train_fraction: float = Field(0.4, gt=0, lt=1, description="Fraction of all (a, b) pairs trained on.")

    @model_validator(mode="after")
    def _division_needs_a_field(self) -> TaskConfig:
        if self.op == "/" and not _is_prime(self.p):
            raise ValueError(f"p={self.p} is not prime, but op '/' needs every b != 0 to have an inverse")
        return self


class GrokkingModelConfig(_Strict):
    arch: Literal["llama", "gpt2"] = Field("llama", description="transformers architecture built from config.")
    hidden_size: int = Field(128, gt=0)
    intermediate_size: int = Field(512, gt=0, description="Width of the MLP block.")
    num_layers: int = Field(1, gt=0)
    num_heads: int = Field(4, gt=0)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> GrokkingModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        return self


class OptimConfig(_Strict):
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(1.0, ge=0, description="AdamW (decoupled) weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.98), description="AdamW betas.")
    warmup_steps: int = Field(10, ge=0, description="Linear learning-rate warm-up.")


class GrokkingTrainConfig(TrainConfig):
    checkpoint_every: int = Field(
        200,
        ge=0,
        description="Save the full training state (resume/, docs/resume.md) every N steps, for `workbench resume`; "
        "only the latest is kept. 0: never (a SIGINT/SIGTERM still saves one).",
    )


class GrokkingConfig(StageConfig):
    stage: Literal["grokking"] = "grokking"
    train: GrokkingTrainConfig = GrokkingTrainConfig()
    task: TaskConfig = TaskConfig()
    model: GrokkingModelConfig = GrokkingModelConfig()
    optim: OptimConfig = OptimConfig()


# --- the supervised stages on the field's libraries (pretrain, sft, rm, dpo) and their chains -----------


class ModelConfig(GrokkingModelConfig):
    """A causal LM: an existing one (`name_or_path`) or a tiny Llama built from the size fields."""

    name_or_path: str | None = Field(
        None,
        description="Start from this model: a local directory written by save_pretrained (with its tokenizer) or "
        "an MLflow artifact URI such as runs:/<run_id>/model. Empty: pretrain builds a model from the fields "
        "below; later stages first train the stages before them, quickly, with their defaults.",
    )
    hidden_size: int = Field(64, gt=0)
    intermediate_size: int = Field(256, gt=0, description="Width of the MLP block.")
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(4, gt=0)
    max_position_embeddings: int = Field(64, gt=0, description="Longest sequence the model is built for.")
    vocab_size: int = Field(
        320, ge=258, description="Byte-level BPE vocabulary trained on the corpus (256 bytes + 2 specials + merges)."
    )


class DataConfig(_Strict):
    path: str | None = Field(
        None,
        description="A JSONL file or a directory of *.jsonl in TRL's formats: text; prompt/completion; messages; "
        "prompt/chosen/rejected; prompt/completions/ranking (turned into preferred-first pairs). "
        "Empty: the built-in task's data, generated at run time.",
    )
    eval_path: str | None = Field(None, description="Held-out JSONL; empty: hold out eval_fraction of `path`.")
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="Share of `path` held out when no eval_path.")


class GoldTaskConfig(_Strict):
    """The built-in task (pipelines/task.py): reverse a short string of letters; correctness is computable."""

    letters: int = Field(8, ge=2, le=26, description="Alphabet: the first N lowercase letters.")
    length: int = Field(4, ge=2, le=12, description="Letters per string.")
    n_pretrain: int = Field(20000, gt=0, description="Sentences in the generated pretraining corpus.")
    n_train: int = Field(4000, gt=0, description="Training examples generated for a supervised stage.")
    n_eval: int = Field(200, gt=0, description="Held-out prompts the gold check and eval loss use.")
    pretrain_noise: float = Field(
        0.3, ge=0, le=1, description="Share of the pretraining corpus stating a wrong reversal, as on the web."
    )
    sft_noise: float = Field(
        0.25, ge=0, le=1, description="Share of SFT demonstrations with a mistake, as human demonstrations have."
    )
    length_bias: float = Field(
        0.0,
        ge=0,
        description="Labeller bias: utility per extra letter of an answer, added to its gold reward when "
        "preferences and rankings are labelled (0: an unbiased labeller; > 0 rewards longer answers).",
    )


class SupervisedTrainConfig(TrainConfig):
    """Trainer knobs of the supervised stages; each stage's subclass sets the defaults its demo was tuned with
    (docs/stages.md), which are also what a stage trained on the fly for a later one uses."""

    eval_every: int = Field(50, gt=0, description="Evaluate and log train/eval metrics every N steps.")
    batch_size: int = Field(32, gt=0, description="Examples per optimizer step.")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate (linear decay after warm-up).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW (decoupled) weight decay.")
    warmup_steps: int = Field(20, ge=0, description="Linear learning-rate warm-up.")
    max_length: int = Field(32, gt=0, description="Longest tokenized example; longer ones are truncated.")


class PretrainTrainConfig(SupervisedTrainConfig):
    max_steps: int = Field(600, gt=0, description="Optimizer steps to run.")
    lr: float = Field(3e-3, gt=0, description="AdamW learning rate (linear decay after warm-up).")
    warmup_steps: int = Field(30, ge=0, description="Linear learning-rate warm-up.")


class SFTTrainConfig(SupervisedTrainConfig):
    max_steps: int = Field(300, gt=0, description="Optimizer steps to run.")


class RewardTrainConfig(SupervisedTrainConfig):
    max_steps: int = Field(3000, gt=0, description="Optimizer steps to run.")
    eval_every: int = Field(250, gt=0, description="Evaluate and log train/eval metrics every N steps.")


class DPOTrainConfig(SupervisedTrainConfig):
    max_steps: int = Field(200, gt=0, description="Optimizer steps to run (plain DPO degrades past ~200 here).")
    lr: float = Field(5e-5, gt=0, description="AdamW learning rate: DPO drifts off with SFT-sized rates.")
    warmup_steps: int = Field(10, ge=0, description="Linear learning-rate warm-up.")


class LoraSettings(_Strict):
    enabled: bool = Field(False, description="Train LoRA adapters (peft) instead of all weights (Hu et al. 2021).")
    r: int = Field(8, gt=0, description="Rank of the update B A.")
    alpha: int = Field(16, gt=0, description="Scale alpha / r applied to the update.")
    dropout: float = Field(0.0, ge=0, lt=1)


class _SupervisedStageConfig(StageConfig):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    task: GoldTaskConfig = GoldTaskConfig()


class PretrainConfig(_SupervisedStageConfig):
    stage: Literal["pretrain"] = "pretrain"
    train: PretrainTrainConfig = PretrainTrainConfig()


class SFTConfig(_SupervisedStageConfig):
    stage: Literal["sft"] = "sft"
    train: SFTTrainConfig = SFTTrainConfig()
    lora: LoraSettings = LoraSettings()
    max_new_tokens: int = Field(16, gt=0, description="Tokens generated per held-out prompt in the gold check.")


class RewardConfig(_SupervisedStageConfig):
    stage: Literal["rm"] = "rm"
    train: RewardTrainConfig = RewardTrainConfig()


class DPOConfig(_SupervisedStageConfig):
    stage: Literal["dpo"] = "dpo"
    train: DPOTrainConfig = DPOTrainConfig()
    beta: float = Field(0.1, gt=0, description="DPO's beta: strength of the implicit KL penalty to the reference.")
    sft_weight: float = Field(
        0.0,
        ge=0,
        description="Weight of a negative log-likelihood term on the chosen answers added to the DPO loss (RPO, "
        "Pang et al. 2024): keeps their likelihood from falling with the rejected ones'. 0: plain DPO.",
    )
    max_new_tokens: int = Field(16, gt=0, description="Tokens generated per held-out prompt in the gold check.")


# --- the RL stages on language (grpo, ppo; pipelines/rl.py) -------------------------------------------------


class RLTrainConfig(TrainConfig):
    max_steps: int = Field(150, gt=0, description="Policy updates to run (one rollout batch each).")
    eval_every: int = Field(10, gt=0, description="Log RL statistics and the held-out gold check every N steps.")
    batch_size: int = Field(64, gt=0, description="Sampled answers per update (GRPO: prompts x group_size).")
    lr: float = Field(1e-5, gt=0, description="AdamW learning rate (constant after warm-up).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW (decoupled) weight decay.")
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warm-up.")


class RLRewardSettings(_Strict):
    function: Literal["rm", "gold", "self_confidence"] = Field(
        "rm",
        description="rm: the trained reward model (proxy); gold: the task's gold reward; self_confidence: the "
        "policy's own mean token probability of its answer (self-feedback, RLSF-style).",
    )
    model: str | None = Field(
        None,
        description="The reward model for function rm: a save_pretrained dir or runs:/<id>/model of the rm stage, "
        "with the policy's tokenizer. Empty: an RM is trained on the fly from the starting model (rm defaults).",
    )
    rm_steps: int = Field(1500, gt=0, description="Steps of an RM trained on the fly (empty `model`).")


class _RLStageConfig(StageConfig):
    model: ModelConfig = ModelConfig()
    task: GoldTaskConfig = GoldTaskConfig()
    train: RLTrainConfig = RLTrainConfig()
    lora: LoraSettings = LoraSettings()
    reward: RLRewardSettings = RLRewardSettings()
    kl_coef: float = Field(0.05, ge=0, description="beta: weight of the KL penalty to the frozen reference.")
    entropy_coef: float = Field(0.0, ge=0, description="Weight of an entropy bonus in the policy loss.")
    clip_eps: float = Field(0.2, gt=0, description="epsilon of the clipped surrogate (PPO eq. 7).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the rollouts.")
    max_new_tokens: int = Field(12, gt=0, description="Longest sampled answer, in tokens.")


class GRPOConfig(_RLStageConfig):
    stage: Literal["grpo"] = "grpo"
    group_size: int = Field(
        8, ge=2, description="Answers sampled per prompt; advantages are rewards standardised within a group."
    )


class PPOConfig(_RLStageConfig):
    stage: Literal["ppo"] = "ppo"
    ppo_epochs: int = Field(4, gt=0, description="Passes over each rollout batch.")
    minibatches: int = Field(4, gt=0, description="Minibatches per pass.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount of GAE.")
    lam: float = Field(0.95, ge=0, le=1, description="lambda of GAE (Schulman et al. 2016).")
    vf_coef: float = Field(0.5, ge=0, description="Weight of the value loss.")


# --- the task-oriented dialogue stage (tod_ppo; pipelines/tod/) ---------------------------------------------


class TODDataConfig(_Strict):
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


class TODEnvConfig(_Strict):
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


class TODPolicyModelConfig(_Strict):
    hidden_size: int = Field(128, gt=0, description="Width of the policy and value MLPs.")
    num_layers: int = Field(2, gt=0, description="Hidden layers after the input projection.")


class ImitationConfig(_Strict):
    epochs: int = Field(60, ge=0, description="Passes over the corpus's training dialogues (0: start PPO untrained).")
    batch_size: int = Field(64, gt=0)
    lr: float = Field(1e-3, gt=0, description="Adam learning rate of the behaviour-cloning loss (multi-label BCE).")
    keep_best: bool = Field(
        True, description="PPO starts from the epoch with the lowest held-out loss (early stopping), not the last."
    )


class TODPPOSettings(_Strict):
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


class TODConfig(StageConfig):
    """Imitation on a dialogue corpus, then PPO against the agenda-based user (docs/tod.md). Steps 0..epochs are
    imitation epochs, then one step per PPO iteration."""

    stage: Literal["tod_ppo"] = "tod_ppo"
    data: TODDataConfig = TODDataConfig()
    env: TODEnvConfig = TODEnvConfig()
    policy: TODPolicyModelConfig = TODPolicyModelConfig()
    imitation: ImitationConfig = ImitationConfig()
    ppo: TODPPOSettings = TODPPOSettings()
    train: TODTrainConfig = TODTrainConfig()
    snapshot: TODSnapshotConfig = TODSnapshotConfig()


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


class ClearConfig(_Strict):
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


class TODContinualSettings(_Strict):
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


class TODContinualConfig(StageConfig):
    """PPO on a sequence of single-domain dialogue tasks, naive or CLEAR; one nested run per domain
    (docs/tod.md). `train.max_steps` PPO iterations per domain; steps run on across domains."""

    stage: Literal["tod_continual"] = "tod_continual"
    data: TODDataConfig = TODDataConfig(dialogues=10)
    env: TODContinualEnvConfig = TODContinualEnvConfig()
    policy: TODDescribedPolicyConfig = TODDescribedPolicyConfig()
    continual: TODContinualSettings = TODContinualSettings()
    ppo: TODPPOSettings = TODPPOSettings()
    train: TODTrainConfig = TODTrainConfig()
    snapshot: TODSnapshotConfig = TODSnapshotConfig()

    @model_validator(mode="after")
    def _domains_in_env(self) -> TODContinualConfig:
        for field, names in (
            ("continual.domains", self.continual.domains),
            ("continual.held_out", self.continual.held_out),
        ):
            missing = [d for d in names if d not in self.env.domains]
            if missing:
                raise ValueError(f"{field}: {missing[0]} not in env.domains {self.env.domains}")
        return self


class ChainStep(_Strict):
    config: str = Field(
        ..., min_length=1, description="A stage config file: a path, or relative to the repository (configs/sft.yaml)."
    )
    overrides: list[str] = Field([], description="key.sub=value overrides for this stage.")


class ChainConfig(StageConfig):
    """Stages run in order, each from the previous one's model; one parent run, a nested run per stage."""

    stage: Literal["chain"] = "chain"
    stages: list[ChainStep] = Field(..., min_length=1, description="The stages, in order.")
    resume_from: str | None = Field(
        None, description="A parent run id of this chain: its finished stages are reused, not run again."
    )


STAGE_CONFIGS: dict[str, type[StageConfig]] = {
    "grokking": GrokkingConfig,
    "pretrain": PretrainConfig,
    "sft": SFTConfig,
    "rm": RewardConfig,
    "dpo": DPOConfig,
    "grpo": GRPOConfig,
    "ppo": PPOConfig,
    "tod_ppo": TODConfig,
    "tod_continual": TODContinualConfig,
    "chain": ChainConfig,
}


class CallbackSnapshotConfig(SnapshotConfig):
    """Snapshots in someone's own trainer. Its probes are eval rows at their full length through a model of any
    size, and a snapshot's forward pass costs about probes / batch size training forwards, and online geometry
    grows with the square of the points, so fewer probes and points than the built-in stages use: +2.9 % of a
    30 ms SFT step at `every: 50`, against +7.6 % with the stage defaults (benchmarks/results/README.md)."""

    probes: int = Field(256, gt=0, description="Size of the fixed probe set, sampled from the eval dataset.")
    max_points: int = Field(1024, gt=0, description="Cap on points per snapshot (token pooling).")


class CallbackConfig(_Strict):
    """`WorkbenchCallback.from_config`: the keys a stage config has for snapshots, tracking and policies."""

    seed: int = Field(0, description="Seeds the probe choice.")
    snapshot: CallbackSnapshotConfig = CallbackSnapshotConfig()
    tracking: TrackingConfig = TrackingConfig()
    policies: list[dict[str, Any]] | str = Field([], description="Early-stop policy rules, or a path to a YAML file.")


def load_callback_config(source: str | Path | Mapping[str, Any]) -> CallbackConfig:
    """A callback config from a YAML file or a dict; errors name the file (or 'callback config') and field."""
    if isinstance(source, Mapping):
        return _validate(CallbackConfig, dict(source), source="callback config")
    return _validate(CallbackConfig, read_yaml_mapping(Path(source)), source=str(source))


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n**0.5) + 1))


# --- loading ----------------------------------------------------------------------------------------


def load_config(path: str | Path, overrides: list[str] = ()) -> StageConfig:
    """Read a YAML config, validate it, then apply `key.sub=value` overrides and validate again.

    Errors are `WorkbenchError`s on one line naming the file (or the override) and the field.
    """
    path = Path(path)
    data = read_yaml_mapping(path)
    stage = data.get("stage")
    if stage not in STAGE_CONFIGS:
        raise WorkbenchError(f"{path}: stage: expected one of {sorted(STAGE_CONFIGS)}, got {stage!r}")
    model = STAGE_CONFIGS[stage]
    config = _validate(model, data, source=str(path))
    for override in overrides:
        _apply_override(data, override)
        config = _validate(model, data, source=f"override '{override}'")
    return config


def read_yaml(path: Path, what: str = "config") -> Any:
    """The parsed YAML file; a missing, unreadable or malformed file is a one-line error naming it."""
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise WorkbenchError(f"{path}: no such {what} file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkbenchError(f"{path}: cannot read {what}: {exc}") from None
    except yaml.YAMLError as exc:
        line, problem = yaml_problem(exc)
        where = f" at line {line}" if line else ""
        raise WorkbenchError(f"{path}: invalid YAML{where}: {problem}") from None


def yaml_problem(exc: yaml.YAMLError) -> tuple[int | None, str]:
    """(line, what is wrong) of a YAML error, on one line: PyYAML's own text spans several."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or getattr(exc, "reason", None) or str(exc)
    return (mark.line + 1 if mark else None), " ".join(str(problem).split())


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """A YAML file holding a mapping; anything else is a one-line error naming the file."""
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise WorkbenchError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def _apply_override(data: dict[str, Any], override: str) -> None:
    key, sep, raw = override.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise WorkbenchError(f"override '{override}': expected key.sub=value")
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise WorkbenchError(f"override '{override}': {part} is not a section")
        node = child
    try:
        value = yaml.safe_load(raw)  # typed like YAML: 3 -> int, 0.5 -> float, [1, 2] -> list
    except yaml.YAMLError:
        value = raw
    # Block syntax is not what a command line means: `task.op=-` is the string "-", not a list [None].
    if isinstance(value, list | dict) and not raw.lstrip().startswith(("[", "{")):
        value = raw
    node[leaf] = value


def _validate(model: type[_Model], data: dict[str, Any], source: str) -> _Model:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise WorkbenchError(f"{source}: {_describe(exc)}") from None


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"]) or "(top level)"
        if error["type"] == "extra_forbidden":
            problems.append(f"{field}: unknown key")
        else:
            value = error.get("input")
            got = f" (got {value!r})" if isinstance(value, str | int | float) and error["type"] != "missing" else ""
            problems.append(f"{field}: {error['msg'].removeprefix('Value error, ')}{got}")
    return "; ".join(problems)


def flatten(config: StageConfig) -> dict[str, str]:
    """The resolved config as flat MLflow params: {'task.p': '97', ...}."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, sub in value.items():
                walk(f"{prefix}.{key}" if prefix else key, sub)
        else:
            flat[prefix] = json.dumps(value) if isinstance(value, list | dict) else str(value)

    walk("", config.model_dump(mode="json"))
    return flat


def config_hash(config: StageConfig) -> str:
    """Short content hash of the resolved config: equal hashes, equal settings."""
    canonical = json.dumps(config.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def to_yaml(config: StageConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
