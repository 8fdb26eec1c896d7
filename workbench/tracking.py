"""One small wrapper over the MLflow client: a run, its buffered metrics, params, tags and artifacts.

Metrics are buffered and sent with `log_batch` (on sqlite one `log_metric` call costs ~7 ms, a batched
value ~0.12 ms: a loop at 40 steps/s must batch). The run's status follows how it ended: FINISHED,
FAILED on an exception, KILLED on Ctrl-C or a user's stop request, and what was buffered is flushed first in
every case.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from workbench.errors import WorkbenchError

if TYPE_CHECKING:
    from workbench.config import StageConfig

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # MLflow's own default: `mlflow ui` here finds the runs
_MAX_METRICS_PER_BATCH = 1000  # MLflow's per-request limits (mlflow/utils/validation.py)
_MAX_PARAMS_PER_BATCH = 100
_MLFLOW_BAD_CHARS = re.compile(r"[^A-Za-z0-9_\-. :/]")


def resolve_tracking_uri(uri: str | None) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else the embedded sqlite store in the working directory."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def metric_key(name: str) -> str:
    """The one place names become MLflow keys: characters MLflow rejects (e.g. `@ ( ,`) become `_`."""
    return _MLFLOW_BAD_CHARS.sub("_", name)


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


def stage_run_tags(config: StageConfig, config_file: str) -> dict[str, str]:
    """The tags every stage run carries: which stage, which settings (hash), which code, which file."""
    from workbench.config import config_hash

    return {
        "workbench.stage": config.stage,
        "workbench.config_hash": config_hash(config),
        "workbench.git_commit": project_commit(),
        "workbench.config_file": config_file,
    }


def _check_server_reachable(tracking_uri: str) -> None:
    """Fail in seconds on a server that is down: MLflow's own retries would hang for minutes first."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        requests.get(f"{tracking_uri.rstrip('/')}/health", timeout=10)
    except requests.RequestException as exc:
        reason = type(exc).__name__
        raise WorkbenchError(f"tracking.uri: cannot reach MLflow server at {tracking_uri} ({reason})") from None


def open_store(uri: str | None) -> tuple[Any, str]:
    """(MlflowClient, resolved URI) for a tracking store; a server that is down is a user error in seconds."""
    from mlflow import MlflowClient

    resolved = resolve_tracking_uri(uri)
    _check_server_reachable(resolved)
    try:
        return MlflowClient(resolved), resolved
    except Exception as exc:  # e.g. a sqlite file that cannot be created
        raise _store_error(resolved, exc) from None


def _store_error(uri: str, exc: Exception) -> WorkbenchError:
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return WorkbenchError(f"tracking.uri: cannot use tracking store {uri!r}: {first_line}")


def open_run(run_id: str, uri: str | None) -> tuple[Any, Any, str]:
    """(MlflowClient, the run, resolved URI) of an existing run; an unknown id is a one-line user error."""
    from mlflow.exceptions import MlflowException

    resolved = resolve_tracking_uri(uri)
    if resolved.startswith("sqlite:///") and not Path(resolved.removeprefix("sqlite:///")).exists():
        raise WorkbenchError(f"run {run_id}: not found (no tracking store at {resolved})")  # and do not create one
    client, resolved = open_store(resolved)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise WorkbenchError(f"run {run_id}: not found in {resolved}") from None
    if run.info.lifecycle_stage == "deleted":
        raise WorkbenchError(f"run {run_id}: was deleted from {resolved}")
    return client, run, resolved


class Tracker:
    """An open MLflow run. Use as a context manager so the status is set however the block ends."""

    def __init__(self, client: Any, run_id: str, tracking_uri: str, flush_seconds: float = 5.0) -> None:
        self.client = client
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.flush_seconds = flush_seconds
        self._buffer: list[Any] = []
        self._last_flush = time.monotonic()
        self.stopped_by_user = False  # set by the policy engine when it honours a stop request

    @classmethod
    def start(
        cls,
        uri: str | None,
        experiment: str,
        run_name: str | None = None,
        tags: Mapping[str, str] | None = None,
        flush_seconds: float = 5.0,
        parent_run_id: str | None = None,
    ) -> Tracker:
        """Open (or create) the store and experiment and start a run; an unusable store is a user error.

        With `parent_run_id` the run is nested under that one (MLflow's `mlflow.parentRunId` tag), as the
        stages of a chain are under the chain's run.
        """
        tags = {**(tags or {}), **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})}
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # no schema-migration chatter on first use
        logging.getLogger("alembic").setLevel(logging.WARNING)
        client, tracking_uri = open_store(uri)
        try:
            found = client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else client.create_experiment(experiment)
            run = client.create_run(experiment_id, run_name=run_name, tags=tags)
        except Exception as exc:  # MLflow raises many types here (sqlalchemy, OSError, REST errors)
            raise _store_error(tracking_uri, exc) from None
        return cls(client, run.info.run_id, tracking_uri, flush_seconds)

    # --- metrics ------------------------------------------------------------------------------------

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Buffer metric values; they are sent every `flush_seconds`, when 1000 are waiting, and at the end."""
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        self._buffer.extend(Metric(metric_key(k), float(v), timestamp, step) for k, v in metrics.items())
        if len(self._buffer) >= _MAX_METRICS_PER_BATCH or time.monotonic() - self._last_flush > self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        while self._buffer:
            batch = self._buffer[:_MAX_METRICS_PER_BATCH]
            self.client.log_batch(self.run_id, metrics=batch)
            del self._buffer[: len(batch)]
        self._last_flush = time.monotonic()

    # --- params, tags, artifacts --------------------------------------------------------------------

    def log_params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(metric_key(k), str(v)) for k, v in params.items()]
        for start in range(0, len(items), _MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[start : start + _MAX_PARAMS_PER_BATCH])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def get_tag(self, key: str) -> str | None:
        """The run's current value of a tag, read back from the store (one get_run call)."""
        return self.client.get_run(self.run_id).data.tags.get(key)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(local_path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    # --- lifecycle ----------------------------------------------------------------------------------

    def finish(self, status: str = "FINISHED") -> None:
        """Flush what is buffered, then mark the run FINISHED, FAILED or KILLED.

        A run that ends normally after honouring a user's stop request (`workbench stop`, the app) is KILLED,
        MLflow's status for a run the user stopped; a stop by a policy rule stays FINISHED.
        """
        if status == "FINISHED" and self.stopped_by_user:
            status = "KILLED"
        try:
            self.flush()
        finally:
            self.client.set_terminated(self.run_id, status=status)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.finish("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.set_tags({"workbench.stop_reason": "interrupted (Ctrl-C)"})
            self.finish("KILLED")
        else:
            self.set_tags({"workbench.error": f"{exc_type.__name__}: {exc}"[:5000]})
            self.finish("FAILED")
