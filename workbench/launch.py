"""Where a run is started, nested and ended: the one place that writes a run's identity (tags, params, config).

The CLI (`workbench run`, `resume`), chains, the continual stage's per-domain runs and `WorkbenchCallback` all
start their runs here, so every run carries the same tags (workbench/tags.py): which stage, which settings
(config hash), which code, which process (the stale-run check in workbench/liveness.py reads it).
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench import tags
from workbench.config import StageConfig, config_hash, flatten, to_yaml
from workbench.liveness import process_tags
from workbench.runtime import rank_and_world, wait_for_everyone
from workbench.stages import StageResult, stage_runner
from workbench.tracking import Tracker

if TYPE_CHECKING:
    from workbench.config import TrackingConfig


def project_commit() -> str:
    """Git commit of the workbench's own source tree ('unknown' outside a checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def base_tags(stage: str) -> dict[str, str]:
    """The tags every run carries: which stage, which code, how many processes train it and which one this is."""
    return {
        tags.STAGE: stage,
        tags.GIT_COMMIT: project_commit(),
        tags.PROCESSES: str(rank_and_world()[1]),
        **process_tags(),
    }


def stage_run_tags(config: StageConfig, config_file: str) -> dict[str, str]:
    """A stage run's tags: `base_tags`, and which settings (hash) from which file."""
    return {**base_tags(config.stage), tags.CONFIG_HASH: config_hash(config), tags.CONFIG_FILE: config_file}


def start_run(
    tracking: TrackingConfig,
    run_tags: Mapping[str, str],
    params: Mapping[str, Any],
    *,
    run_name: str | None = None,
    parent: Tracker | None = None,
    config_yaml: str | None = None,
    every_rank: bool = True,
) -> Tracker:
    """Start a run, nested under `parent` in the parent's store and experiment, and log its params (and
    `config.yaml`); a failure while logging them ends the run FAILED, not RUNNING. With `every_rank` every rank of
    a multi-process launch calls this at once and rank 0 creates the run (`Tracker.start_on_every_rank`);
    without, only the caller's process starts it."""
    uri, experiment = tracking.uri, tracking.experiment
    if parent is not None:
        uri = parent.tracking_uri
        experiment = parent.client.get_experiment(parent.client.get_run(parent.run_id).info.experiment_id).name
    start = Tracker.start_on_every_rank if every_rank else Tracker.start
    tracker = start(
        uri,
        experiment,
        run_name if run_name is not None else tracking.run_name,
        run_tags,
        tracking.flush_seconds,
        parent_run_id=parent.run_id if parent is not None else None,
    )
    try:
        tracker.log_params(params)
        if config_yaml is not None:
            tracker.log_text(config_yaml, "config.yaml")
    except BaseException as exc:
        tracker.__exit__(type(exc), exc, exc.__traceback__)
        raise
    return tracker


def start_stage_run(
    config: StageConfig, config_file: str, *, parent: Tracker | None = None, run_name: str | None = None
) -> Tracker:
    """A stage's run: its tags, the resolved config as flat params and as the `config.yaml` artifact."""
    return start_run(
        config.tracking,
        stage_run_tags(config, config_file),
        flatten(config),
        run_name=run_name,
        parent=parent,
        config_yaml=to_yaml(config),
    )


def run_stage(config: StageConfig, tracker: Tracker, **kwargs: Any) -> StageResult:
    """Train the stage in `tracker`'s run (`kwargs`: `resume=` for a resumable stage) and end the run: FINISHED,
    KILLED (a user's stop request, MLflow's status for that, or Ctrl-C) or FAILED (the exception is raised on);
    then, however it ended, write its `report.html` from what it logged (workbench/report.py)."""
    from workbench.report import write_run_report  # plotly: only once a run trains

    try:
        with tracker:
            result = stage_runner(config.stage)(config, tracker, **kwargs)
            if result.ended_by_user:
                tracker.finish("KILLED")
    finally:
        write_run_report(tracker)
    return result


def run_nested(config: StageConfig, parent: Tracker, run_name: str, config_file: str = "") -> tuple[StageResult, str]:
    """Run one stage as a run nested under `parent`, in the parent's store: (its result, its run id). The
    stage's run is FAILED if it raises; its model URI is kept as the tag `workbench.model_uri`."""
    child = start_stage_run(config, config_file, parent=parent, run_name=run_name)
    result = run_stage(config, child)
    child.set_tags({tags.MODEL_URI: result.model_uri})
    wait_for_everyone()  # under a multi-process launch the next stage's ranks load what rank 0 logged here
    return result, child.run_id
