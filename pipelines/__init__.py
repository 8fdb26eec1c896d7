"""Stage runners. Every stage module has `run(config, tracker) -> StageResult`.

The CLI resolves a config's `stage:` through `STAGES` and imports the module only then, so the core
never imports a stage and `workbench --help` stays fast.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

STAGES: dict[str, str] = {
    "grokking": "pipelines.grokking",
    "pretrain": "pipelines.pretrain",
    "sft": "pipelines.sft",
    "rm": "pipelines.rm",
    "dpo": "pipelines.dpo",
    "grpo": "pipelines.grpo",
    "ppo": "pipelines.ppo",
    "tod_ppo": "pipelines.tod.stage",
    "tod_continual": "pipelines.tod.continual",
    "chain": "pipelines.chain",
}


@dataclass
class StageResult:
    """What a stage hands back: where its model is, its final metrics, and lines for the CLI summary."""

    model_uri: str
    metrics: dict[str, float]
    summary: list[str] = field(default_factory=list)


def stage_runner(stage: str) -> Callable[..., StageResult]:
    module: Any = importlib.import_module(STAGES[stage])
    return module.run
