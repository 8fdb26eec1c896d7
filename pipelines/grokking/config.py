"""Settings of the grokking stage: the modular-arithmetic task, the tiny decoder and AdamW (`stage: grokking`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from workbench.config import StageConfig, TrainConfig, check_built_model_layers
from workbench.schema import Strict


class TaskConfig(Strict):
    op: Literal["+", "-", "*", "/", "x^2+xy+y^2"] = Field("+", description="The binary operation a∘b mod p.")
    p: int = Field(97, ge=2, description="The modulus.")
    train_fraction: float = Field(0.4, gt=0, lt=1, description="Fraction of all (a, b) pairs trained on.")
    split: Literal["ordered", "unordered"] = Field(
        "ordered",
        description="'ordered': each (a, b) goes to the train or test split on its own; 'unordered': (a, b) and "
        "(b, a) go together, so for a commutative op (+, *) no test pair is answered by its mirror in the train "
        "split (whose test accuracy otherwise sits near train_fraction, not chance, before the jump).",
    )

    @model_validator(mode="after")
    def _division_needs_a_field(self) -> TaskConfig:
        if self.op == "/" and not _is_prime(self.p):
            raise ValueError(f"p={self.p} is not prime, but op '/' needs every b != 0 to have an inverse")
        return self


class GrokkingModelConfig(Strict):
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


class OptimConfig(Strict):
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


class GrokkingStageConfig(StageConfig):
    stage: Literal["grokking"] = "grokking"
    train: GrokkingTrainConfig = GrokkingTrainConfig()
    task: TaskConfig = TaskConfig()
    model: GrokkingModelConfig = GrokkingModelConfig()
    optim: OptimConfig = OptimConfig()

    @model_validator(mode="after")
    def _snapshot_layers_exist(self) -> GrokkingStageConfig:
        check_built_model_layers(self.snapshot, self.model.num_layers)
        return self


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n**0.5) + 1))
