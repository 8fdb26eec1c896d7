"""`workbench resume RUN_ID`: reopen a killed or crashed run and continue it from its latest checkpoint.

The same MLflow run goes back to RUNNING and the stage continues at the checkpoint's step with the same step
numbering. Steps between the checkpoint and the crash are recomputed; a value already logged at a (key,
step) is not logged again (MLflow would keep both), only compared with the recomputed one, so the history
holds one value per step and the resume reports how far the recomputation strayed (0 on CPU: the loop is
deterministic). Policies and forecasters are brought to their state at the checkpoint by replaying the
logged metrics before it, silently, as a backtest does. docs/resume.md.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench import tags
from workbench.checkpoint import TrainingState, load_training_state
from workbench.errors import WorkbenchError
from workbench.liveness import mark_stale_runs, process_alive, process_tags
from workbench.stages import resumable
from workbench.tracking import Tracker, metric_key, open_run

if TYPE_CHECKING:
    from workbench.config import StageConfig
    from workbench.policies import PolicyEngine


@dataclass
class Resumption:
    """What a stage needs to continue a run: the checkpoint, and every value the run logged before the crash."""

    checkpoint: TrainingState
    logged: dict[str, dict[int, float]]  # metric key -> step -> value

    def before_checkpoint(self) -> dict[int, dict[str, float]]:
        """The values logged at steps before the checkpoint's, by step, without the engine's own `event/` keys:
        what the loop fed its policy engine at each step."""
        by_step: dict[int, dict[str, float]] = {}
        for key, points in self.logged.items():
            if key.startswith("event/"):
                continue
            for step, value in points.items():
                if step < self.checkpoint.step:
                    by_step.setdefault(step, {})[key] = value
        return dict(sorted(by_step.items()))

    def replay(self, engine: PolicyEngine) -> None:
        """Bring rules and forecasters to their state at the checkpoint, logging and printing nothing."""
        engine.replay(self.before_checkpoint().items())


class ResumedTracker(Tracker):
    """A reopened run. A value at a (key, step) the run already has is compared, not logged again."""

    def __init__(self, client: Any, run_id: str, tracking_uri: str, flush_seconds: float, logged: dict) -> None:
        super().__init__(client, run_id, tracking_uri, flush_seconds)
        self.logged = logged
        self.recomputed = 0  # already-logged values computed again
        self.max_difference = 0.0  # the largest |recomputed - logged| among them

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        fresh = {}
        for key, value in metrics.items():
            before = self.logged.get(metric_key(key), {}).get(step)
            if before is None:
                fresh[key] = value
                continue
            self.recomputed += 1
            if not (math.isnan(before) and math.isnan(value)):
                self.max_difference = max(self.max_difference, abs(float(value) - before))
        if fresh:
            super().log_metrics(fresh, step)


@dataclass
class Reopened:
    tracker: ResumedTracker
    config: StageConfig
    resumption: Resumption
    was: str  # status (and reason) before the resume
    _tmp: Any = field(repr=False, default=None)  # the checkpoint's download folder, removed with this object


def reopen_run(run_id: str, tracking_uri: str | None = None, force: bool = False) -> Reopened:
    """Check the run can be resumed (one-line errors otherwise), load its config and checkpoint, set it RUNNING."""
    client, run, uri = open_run(run_id, tracking_uri)
    run = mark_stale_runs([run], uri, client)[0]
    status, run_tags = run.info.status, run.data.tags
    if status == "FINISHED":
        raise WorkbenchError(f"run {run_id}: is FINISHED; there is nothing to resume")
    if status == "RUNNING" and not force:
        alive = process_alive(run_tags)
        where = f"pid {run_tags.get(tags.PID, '?')} on {run_tags.get(tags.HOST, 'an unknown host')}"
        if alive:
            raise WorkbenchError(f"run {run_id}: is RUNNING ({where}); stop it first (`workbench stop {run_id}`)")
        raise WorkbenchError(f"run {run_id}: is RUNNING ({where}), which cannot be checked from here; pass --force")
    config = _logged_config(client, run_id)
    if not resumable(config.stage):
        raise WorkbenchError(f"run {run_id}: stage {config.stage!r} cannot resume yet (grokking can)")
    tmp = tempfile.TemporaryDirectory(prefix="workbench-resume-")
    checkpoint = load_training_state(client, run_id, tmp.name)
    logged = {
        key: {m.step: m.value for m in client.get_metric_history(run_id, key)} for key in sorted(run.data.metrics)
    }
    reason = run_tags.get(tags.STOP_REASON)
    was = f"{status}: {reason}" if reason else status
    for tag in (tags.STOP_REASON, tags.STOPPED_AT, tags.STOP_REQUESTED):  # a stale stop request would end it at once
        if tag in run_tags:
            client.delete_tag(run_id, tag)
    now = datetime.now().isoformat(timespec="seconds")
    client.set_tag(run_id, tags.RESUMED, f"from step {checkpoint.step} at {now} (was {was})")
    for key, value in process_tags().items():
        client.set_tag(run_id, key, value)
    client.update_run(run_id, status="RUNNING")
    tracker = ResumedTracker(client, run_id, uri, config.tracking.flush_seconds, logged)
    return Reopened(tracker, config, Resumption(checkpoint, logged), was, tmp)


def _logged_config(client: Any, run_id: str) -> StageConfig:
    """The resolved config the run was started with (its `config.yaml` artifact), validated again."""
    from workbench.config import load_config

    with tempfile.TemporaryDirectory(prefix="workbench-resume-config-") as tmp:
        try:
            path = client.download_artifacts(run_id, "config.yaml", tmp)
        except Exception:  # MLflow raises several types for a missing artifact
            raise WorkbenchError(
                f"run {run_id}: has no config.yaml artifact (not started by `workbench run`?)"
            ) from None
        try:
            return load_config(Path(path))
        except WorkbenchError as exc:  # name the run's artifact, not the download folder
            raise WorkbenchError(str(exc).replace(str(path), f"run {run_id}: config.yaml")) from None
