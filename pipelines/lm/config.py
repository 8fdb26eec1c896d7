"""Settings of the language-model stages: pretrain, sft, rm and dpo on the field's libraries, and the RL stages
grpo and ppo. Each stage's class sets the defaults its demo was tuned with (docs/stages.md, docs/rl.md)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipelines.grokking.config import GrokkingModelConfig
from workbench.config import StageConfig, TrainConfig, check_built_model_layers
from workbench.schema import Strict


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


class DataConfig(Strict):
    path: str | None = Field(
        None,
        description="A JSONL file or a directory of *.jsonl in TRL's formats: text; prompt/completion; messages; "
        "prompt/chosen/rejected; prompt/completions/ranking (turned into preferred-first pairs). "
        "Empty: the built-in task's data, generated at run time.",
    )
    eval_path: str | None = Field(None, description="Held-out JSONL; empty: hold out eval_fraction of `path`.")
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="Share of `path` held out when no eval_path.")


class GoldTaskConfig(Strict):
    """The built-in task (pipelines/lm/task.py): reverse a short string of letters; correctness is computable."""

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
    chat_template: bool = Field(
        False,
        description="Rows in TRL's conversational form (the prompt a user turn, each answer an assistant turn), "
        "so trainers and the gold check go through the model's chat template, as an instruction-tuned model "
        "(smollm2-135m-instruct) is used; the model's tokenizer must have one.",
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


class LoraSettings(Strict):
    enabled: bool = Field(False, description="Train LoRA adapters (peft) instead of all weights (Hu et al. 2021).")
    r: int = Field(8, gt=0, description="Rank of the update B A.")
    alpha: int = Field(16, gt=0, description="Scale alpha / r applied to the update.")
    dropout: float = Field(0.0, ge=0, lt=1)


class _LMStageConfig(StageConfig):
    """What every language-model stage has: a model, and the built-in task its gold metric reads."""

    model: ModelConfig = ModelConfig()
    task: GoldTaskConfig = GoldTaskConfig()

    @model_validator(mode="after")
    def _snapshot_layers_exist(self) -> _LMStageConfig:
        if self.model.name_or_path is None:  # built from `model.*` (a loaded model's depth is known when loaded)
            check_built_model_layers(self.snapshot, self.model.num_layers)
        return self

    @model_validator(mode="after")
    def _chat_template_needs_a_loaded_model(self) -> _LMStageConfig:
        if self.task.chat_template and self.model.name_or_path is None:
            raise ValueError(
                "task.chat_template: the models the workbench builds have no chat template; set model.name_or_path "
                "to one that has (e.g. smollm2-135m-instruct) or task.chat_template=false"
            )
        return self


class _SupervisedStageConfig(_LMStageConfig):
    data: DataConfig = DataConfig()


class PretrainStageConfig(_SupervisedStageConfig):
    stage: Literal["pretrain"] = "pretrain"
    train: PretrainTrainConfig = PretrainTrainConfig()


class SFTStageConfig(_SupervisedStageConfig):
    stage: Literal["sft"] = "sft"
    train: SFTTrainConfig = SFTTrainConfig()
    lora: LoraSettings = LoraSettings()
    max_new_tokens: int = Field(16, gt=0, description="Tokens generated per held-out prompt in the gold check.")


class RewardStageConfig(_SupervisedStageConfig):
    stage: Literal["rm"] = "rm"
    train: RewardTrainConfig = RewardTrainConfig()


class DPOStageConfig(_SupervisedStageConfig):
    stage: Literal["dpo"] = "dpo"
    train: DPOTrainConfig = DPOTrainConfig()
    lora: LoraSettings = LoraSettings()
    beta: float = Field(0.1, gt=0, description="DPO's beta: strength of the implicit KL penalty to the reference.")
    sft_weight: float = Field(
        0.0,
        ge=0,
        description="Weight of a negative log-likelihood term on the chosen answers added to the DPO loss (RPO, "
        "Pang et al. 2024): keeps their likelihood from falling with the rejected ones'. 0: plain DPO.",
    )
    max_new_tokens: int = Field(16, gt=0, description="Tokens generated per held-out prompt in the gold check.")


# --- the RL stages on language (grpo, ppo; pipelines/lm/rl.py) -------------------------------------------------


class RLTrainConfig(TrainConfig):
    max_steps: int = Field(150, gt=0, description="Policy updates to run (one rollout batch each).")
    eval_every: int = Field(10, gt=0, description="Log RL statistics and the held-out gold check every N steps.")
    batch_size: int = Field(64, gt=0, description="Sampled answers per update (GRPO: prompts x group_size).")
    lr: float = Field(1e-5, gt=0, description="AdamW learning rate (constant after warm-up).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW (decoupled) weight decay.")
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warm-up.")


class RLRewardSettings(Strict):
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
    # Flaws a proxy reward can have, added on purpose to any `function`: the failure suite's ways to hack a reward.
    length_bonus: float = Field(
        0.0, ge=0, description="Added per word of the answer: a verbosity-biased reward (0: none)."
    )
    token_bonus: float = Field(
        0.0,
        ge=0,
        description="Added per occurrence of `bonus_token` in the answer: a reward fooled by a surface "
        "token (0: none).",
    )
    bonus_token: str = Field("a", min_length=1, description="The word `token_bonus` rewards.")


class _RLStageConfig(_LMStageConfig):
    train: RLTrainConfig = RLTrainConfig()
    lora: LoraSettings = LoraSettings()
    reward: RLRewardSettings = RLRewardSettings()
    kl_coef: float = Field(0.05, ge=0, description="beta: weight of the KL penalty to the frozen reference.")
    entropy_coef: float = Field(0.0, ge=0, description="Weight of an entropy bonus in the policy loss.")
    clip_eps: float = Field(0.2, gt=0, description="epsilon of the clipped surrogate (PPO eq. 7).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the rollouts.")
    max_new_tokens: int = Field(12, gt=0, description="Longest sampled answer, in tokens.")
    answer_probes: int = Field(
        64,
        ge=0,
        description="Up to this many held-out prompts (at most task.n_eval) whose greedy answers' hidden states are "
        "compared, at every log, with the starting policy's (geom/answer_knn_gap/layer_i, "
        "geom/answer_eff_rank/layer_i; pipelines/lm/rl.py: AnswerGeometry); half of them answered once by the "
        "starting policy. 0: off.",
    )

    @model_validator(mode="after")
    def _answer_probes_split(self) -> _RLStageConfig:
        if 0 < self.answer_probes < 4:
            raise ValueError("answer_probes: at least 4 (two halves of 2, for nearest neighbours), or 0 for none")
        return self


class GRPOStageConfig(_RLStageConfig):
    stage: Literal["grpo"] = "grpo"
    group_size: int = Field(
        8, ge=2, description="Answers sampled per prompt; advantages are rewards standardised within a group."
    )


class PPOStageConfig(_RLStageConfig):
    stage: Literal["ppo"] = "ppo"
    ppo_epochs: int = Field(4, gt=0, description="Passes over each rollout batch.")
    minibatches: int = Field(4, gt=0, description="Minibatches per pass.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount of GAE.")
    lam: float = Field(0.95, ge=0, le=1, description="lambda of GAE (Schulman et al. 2016).")
    vf_coef: float = Field(0.5, ge=0, description="Weight of the value loss.")

    @model_validator(mode="after")
    def _text_prompts_only(self) -> PPOStageConfig:
        if self.task.chat_template:  # its own rollout loop samples from text prompts
            raise ValueError("task.chat_template: the ppo stage samples from text prompts; use the grpo stage")
        return self
