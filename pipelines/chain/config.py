"""Settings of a chain (`stage: chain`): stages run in order, each from the previous one's model."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from workbench.config import StageConfig
from workbench.schema import Strict


class ChainStep(Strict):
    config: str = Field(
        ..., min_length=1, description="A stage config file: a path, or relative to the repository (configs/sft.yaml)."
    )
    overrides: list[str] = Field([], description="key.sub=value overrides for this stage.")


class ChainStageConfig(StageConfig):
    """Stages run in order, each from the previous one's model; one parent run, a nested run per stage."""

    stage: Literal["chain"] = "chain"
    stages: list[ChainStep] = Field(..., min_length=1, description="The stages, in order.")
    resume_from: str | None = Field(
        None, description="A parent run id of this chain: its finished stages are reused, not run again."
    )
