"""The stage registry: each `stage:` name, the module path of its config class and of its runner, as strings.

Names resolve to code only when a run needs them (as transformers' `CONFIG_MAPPING_NAMES` does), so the core
never imports a stage, `workbench --help` stays fast, and adding a stage is one line here. A stage runner is
`run(config, tracker) -> StageResult`; a `resumable` one also takes `resume=` (`workbench resume`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydantic import BaseModel


@dataclass(frozen=True)
class Stage:
    config: str  # "module:Class" of the stage's config
    runner: str  # the module whose `run` trains the stage
    resumable: bool = False  # its runner continues a run from a training-state checkpoint


STAGES: dict[str, Stage] = {
    "grokking": Stage("pipelines.grokking.config:GrokkingStageConfig", "pipelines.grokking.stage", resumable=True),
    "pretrain": Stage("pipelines.lm.config:PretrainStageConfig", "pipelines.lm.pretrain"),
    "sft": Stage("pipelines.lm.config:SFTStageConfig", "pipelines.lm.sft"),
    "rm": Stage("pipelines.lm.config:RewardStageConfig", "pipelines.lm.rm"),
    "dpo": Stage("pipelines.lm.config:DPOStageConfig", "pipelines.lm.dpo"),
    "grpo": Stage("pipelines.lm.config:GRPOStageConfig", "pipelines.lm.grpo"),
    "ppo": Stage("pipelines.lm.config:PPOStageConfig", "pipelines.lm.ppo"),
    "tod_ppo": Stage("pipelines.tod.config:TODStageConfig", "pipelines.tod.stage"),
    "tod_continual": Stage("pipelines.tod.config:TODContinualStageConfig", "pipelines.tod.continual"),
    "chain": Stage("pipelines.chain.config:ChainStageConfig", "pipelines.chain.stage"),
}


@dataclass
class StageResult:
    """What a stage hands back: where its model is, its final metrics, and lines for the CLI summary."""

    model_uri: str
    metrics: dict[str, float]
    summary: list[str] = field(default_factory=list)
    ended_by_user: bool = False  # a stop request (`workbench stop`, the app) ended it: the run ends KILLED


def stage_names() -> list[str]:
    return list(STAGES)


def stage_config_class(stage: str) -> type[BaseModel]:
    """The stage's config class (a `workbench.config.StageConfig`), imported now."""
    module, _, name = STAGES[stage].config.partition(":")
    return getattr(importlib.import_module(module), name)


def stage_runner(stage: str) -> Callable[..., StageResult]:
    module: Any = importlib.import_module(STAGES[stage].runner)
    return module.run


def resumable(stage: str) -> bool:
    return STAGES[stage].resumable
