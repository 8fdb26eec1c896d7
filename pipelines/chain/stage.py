"""Chains: stages in order (pretrain -> sft -> dpo, ...), each starting from the previous stage's model.

The chain is one parent MLflow run with a nested run per stage (tag `mlflow.parentRunId`). A stage hands
the next one its model by reference (`runs:/<run_id>/model`, set as the next stage's `model.name_or_path`),
so `resume_from: <parent run id>` reuses every finished stage whose settings are unchanged and runs the
rest; earlier runs and their artifacts are never modified. The parent logs each stage's final metrics at
step = stage index, so `gold/accuracy` over steps is the task improving stage by stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.chain.config import ChainStageConfig
from workbench import tags
from workbench.config import config_hash, load_config
from workbench.errors import WorkbenchError
from workbench.launch import run_nested
from workbench.policies import attach_policies
from workbench.stages import StageResult

if TYPE_CHECKING:
    from mlflow.entities import Run

    from workbench.tracking import Tracker

REPO_ROOT = Path(__file__).resolve().parents[2]
TABLE_METRICS = (
    "gold/accuracy",
    "gold/reward",
    "eval/loss",
    "rm/accuracy",
    "rm/kendall_tau",
    "eval/rewards/accuracies",
)


def run(config: ChainStageConfig, tracker: Tracker) -> StageResult:
    finished = _finished_stages(config.resume_from, tracker) if config.resume_from else {}
    rows: list[tuple[int, str, str, str, dict[str, float]]] = []
    previous_uri: str | None = None
    for index, step in enumerate(config.stages):
        path = _stage_file(step.config)
        overrides = [f"seed={config.seed}", f"device={config.device}", *step.overrides]
        if previous_uri is not None:
            overrides.append(f"model.name_or_path={previous_uri}")
        stage_config = attach_policies(load_config(path, overrides), path)  # a policy file beside the stage's config
        old = finished.get(index)
        if old is not None and old.data.tags.get(tags.CONFIG_HASH) == config_hash(stage_config):
            result = StageResult(old.data.tags[tags.MODEL_URI], dict(old.data.metrics))
            run_id, how = old.info.run_id, "reused"
        else:
            try:
                result, run_id = run_nested(stage_config, tracker, f"{index}: {stage_config.stage}", str(path))
            except WorkbenchError as exc:
                raise WorkbenchError(f"chain stage {index} ({stage_config.stage}, {path}): {exc}") from None
            except Exception as exc:
                raise RuntimeError(
                    f"chain stage {index} ({stage_config.stage}) failed: {type(exc).__name__}: {exc}; the stages "
                    f"before it are finished and kept: rerun with resume_from={tracker.run_id}"
                ) from exc
            how = "ran"
        tracker.set_tags(tags.chain_stage_tags(index, run_id, step.config))
        shown = {k: v for k, v in result.metrics.items() if k in TABLE_METRICS}
        tracker.log_metrics(shown, index)
        rows.append((index, stage_config.stage, run_id, how, shown))
        previous_uri = result.model_uri
    table = _table(rows)
    tracker.log_text("\n".join(table) + "\n", "chain.md")
    return StageResult(model_uri=previous_uri, metrics=rows[-1][4], summary=table)


def _stage_file(name: str) -> Path:
    """A stage config path as given, else relative to the repository (`configs/sft.yaml` works anywhere)."""
    path = Path(name)
    if path.is_file() or path.is_absolute():
        return path
    return REPO_ROOT / path


def _finished_stages(parent_run_id: str, tracker: Tracker) -> dict[int, Run]:
    """Stage index -> the FINISHED run an earlier run of this chain ran or itself reused for that stage."""
    client = tracker.client
    try:
        parent = client.get_run(parent_run_id)
    except Exception:  # MLflow raises several types for an unknown run id
        raise WorkbenchError(f"resume_from: no run {parent_run_id} in {tracker.tracking_uri}") from None
    if parent.data.tags.get(tags.STAGE) != "chain":
        raise WorkbenchError(f"resume_from: run {parent_run_id} is not a chain run")
    finished = {}
    for key, run_id in parent.data.tags.items():
        if key.startswith(tags.CHAIN_PREFIX) and key.endswith(".run_id"):
            run = client.get_run(run_id)
            if run.info.status == "FINISHED":
                finished[int(key.split(".")[2])] = run
    return finished


def _table(rows: list[tuple[int, str, str, str, dict[str, float]]]) -> list[str]:
    columns = [m for m in TABLE_METRICS if any(m in r[4] for r in rows)]
    lines = ["| # | stage | run | " + " | ".join(columns) + " |", "|---" * (3 + len(columns)) + "|"]
    for index, stage, run_id, how, metrics in rows:
        values = " | ".join(f"{metrics[c]:.3f}" if c in metrics else "" for c in columns)
        lines.append(f"| {index} | {stage} | {run_id[:8]} ({how}) | {values} |")
    return lines
