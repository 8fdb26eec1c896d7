"""Reading runs back from the tracking store: shared by the CLI and the app."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench import tags
from workbench.artifacts import checkpoint_steps
from workbench.errors import WorkbenchError
from workbench.liveness import mark_stale_runs
from workbench.tracking import open_run, open_store, resolve_tracking_uri

if TYPE_CHECKING:
    from mlflow.entities import Run

KEY_METRICS = ("train/acc", "eval/acc", "grokking/grokking_step")
DOMAIN_TAG = "tod.domain"  # a continual run's nested per-domain runs carry it, and their place in the sequence:
DOMAIN_INDEX_TAG = "tod.stage_index"


def recent_runs(tracking_uri: str | None = None, experiment: str | None = None, limit: int = 20) -> list[dict]:
    """`run_table`'s rows as the display strings `workbench ls` prints (id, experiment, stage, status, metrics)."""
    return [
        {
            **{key: row[key] for key in ("run_id", "experiment", "name", "stage", "status")},
            "started": row["started"].strftime("%Y-%m-%d %H:%M"),
            **{key: "" if row[key] is None else f"{row[key]:g}" for key in KEY_METRICS},
        }
        for row in run_table(tracking_uri, experiment, limit)
    ]


def _search_runs(tracking_uri: str | None, experiment: str | None, limit: int) -> tuple[dict[str, str], list[Run]]:
    """(experiment id -> name, the runs newest first) of a store; a missing sqlite store has none."""
    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return {}, []  # listing must not create an empty store as a side effect
    client, _ = open_store(uri)
    try:
        experiments = client.search_experiments()
    except Exception as exc:  # MLflow raises several types for an unusable store
        reason = str(exc).splitlines()[0]
        raise WorkbenchError(f"--tracking-uri: cannot read tracking store {uri!r}: {reason}") from None
    names = {e.experiment_id: e.name for e in experiments}
    if experiment is not None:
        names = {i: n for i, n in names.items() if n == experiment}
        if not names:
            raise WorkbenchError(f"--experiment: no experiment named {experiment!r} in {uri}")
    if not names:
        return names, []
    return names, client.search_runs(list(names), order_by=["attribute.start_time DESC"], max_results=limit)


def run_table(tracking_uri: str | None = None, experiment: str | None = None, limit: int = 1000) -> list[dict]:
    """Newest runs first (of one experiment, or all) with what the app lists: ids, the chain run a stage is
    nested in, experiment, stage, status, start, key metrics (floats), the events that fired and why the run
    stopped."""
    names, runs = _search_runs(tracking_uri, experiment, limit)
    runs = mark_stale_runs(runs, tracking_uri)  # RUNNING runs whose process is gone become FAILED (liveness.py)
    run_names = {run.info.run_id: run.info.run_name or run.info.run_id[:8] for run in runs}
    return [_row(run, names[run.info.experiment_id], run_names) for run in runs]


def run_rows(run_ids: Sequence[str], tracking_uri: str | None = None) -> list[dict]:
    """`run_table`'s rows of the given runs, in that order; a run the store lacks, or deleted, is a one-line error."""
    opened = [open_run(run_id, tracking_uri) for run_id in run_ids]
    if not opened:
        return []
    client = opened[0][0]
    runs = mark_stale_runs([run for _, run, _ in opened], tracking_uri, client)
    names = {i: client.get_experiment(i).name for i in {run.info.experiment_id for run in runs}}
    parents = {run.data.tags.get("mlflow.parentRunId", "") for run in runs} - {""}
    run_names = {parent: client.get_run(parent).info.run_name or parent[:8] for parent in parents}
    return [_row(run, names[run.info.experiment_id], run_names) for run in runs]


def _row(run: Run, experiment: str, run_names: dict[str, str]) -> dict:
    """A run as the app lists it; `run_names`: run id -> name, where its chain run's name is looked up."""
    run_tags, metrics = run.data.tags, run.data.metrics
    parent = run_tags.get("mlflow.parentRunId", "")
    return {
        "run_id": run.info.run_id,
        "name": run.info.run_name or "",
        "chain": run_names.get(parent, parent[:8]),
        "experiment": experiment,
        "stage": run_tags.get(tags.STAGE, ""),
        "status": run.info.status,
        "started": datetime.fromtimestamp(run.info.start_time / 1000),
        **{key: metrics.get(key) for key in KEY_METRICS},
        "events": ", ".join(sorted(k.removeprefix("event/") for k in metrics if k.startswith("event/"))),
        "stop_reason": run_tags.get(tags.STOP_REASON, ""),
        "parent_run_id": parent,
        "metric_keys": sorted(metrics),
    }


def metric_histories(
    run_id: str, tracking_uri: str | None = None, prefix: str = "", keys: Iterable[str] | None = None
) -> dict[str, tuple[list, list]]:
    """Every logged value of a run's metrics whose key starts with `prefix`: key -> (steps, values).

    `keys`: the run's metric keys where the caller has them (`run_table`), which saves reading the run first.
    """
    if keys is None:
        client, run, _ = open_run(run_id, tracking_uri)
        keys = run.data.metrics
    else:
        client, _ = open_store(tracking_uri)
    keys = sorted(k for k in keys if k.startswith(prefix))
    histories = {}
    for key in keys:
        points = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        histories[key] = ([m.step for m in points], [m.value for m in points])
    return histories


def geometry_features(keys: Iterable[str]) -> dict[str, list[str]]:
    """The `geom/<feature>/<layer>` series among a run's metric keys: feature -> its layers, sorted."""
    found: dict[str, list[str]] = {}
    for key in sorted(keys):
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "geom":
            found.setdefault(parts[1], []).append(parts[2])
    return found


def metric_keys(run_id: str, tracking_uri: str | None = None) -> list[str]:
    """The metric keys a run has logged so far, sorted."""
    return sorted(open_run(run_id, tracking_uri)[1].data.metrics)


def run_state(run_id: str, tracking_uri: str | None = None) -> dict:
    """A run's status now, read fresh: status, the step and reason it stopped at, whether a stop or checkpoint
    request is pending, the steps of its checkpoints (`checkpoints/step_XXXXXXXX`) and where the run took an
    attached policy ({"step": S, "rules": [...]}, `workbench attach`)."""
    client, run, _ = open_run(run_id, tracking_uri)
    run_tags = run.data.tags
    return {
        "status": run.info.status,
        "stop_reason": run_tags.get(tags.STOP_REASON),
        "stopped_at_step": run_tags.get(tags.STOPPED_AT),
        "stop_requested": run_tags.get(tags.STOP_REQUESTED),
        "checkpoint_requested": run_tags.get(tags.CHECKPOINT_REQUESTED),
        "checkpoints": checkpoint_steps(client, run_id),
        "error": run_tags.get(tags.ERROR),
        "attached": json.loads(attached) if (attached := run_tags.get(tags.ATTACHED_POLICY_APPLIED)) else None,
    }


def bulk_metric_histories(
    run_ids: Sequence[str], prefix: str, tracking_uri: str | None = None
) -> dict[str, dict[str, tuple[list, list]]]:
    """`metric_histories` of many runs at once: run id -> key -> (steps, values), for keys starting with `prefix`.

    On a SQL store (the embedded sqlite, or a database the CLI points at) one query reads every value; elsewhere
    (an MLflow server), or where that query fails, it is one `get_metric_history` call per run and key.
    The app's Geometry page reads this way (its render time: `benchmarks/app_render.py`); tests check that both
    paths give the same histories.
    """
    client, _ = open_store(tracking_uri)
    found = _sql_metric_histories(client, list(run_ids), prefix)
    if found is None:
        found = {run_id: metric_histories(run_id, tracking_uri, prefix) for run_id in run_ids}
    return found


def _sql_metric_histories(client: Any, run_ids: list[str], prefix: str) -> dict[str, dict] | None:
    """The one-query read, through MLflow's own table model (`SqlMetric`) as MLflow's server reads it; None where
    the store is not SQL, or the model is not the one this code was written against (another MLflow version),
    so that the caller takes the public API instead."""
    try:
        from mlflow.store.tracking.dbmodels.models import SqlMetric
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
        from sqlalchemy.exc import SQLAlchemyError
    except ImportError:
        return None
    store = getattr(getattr(client, "_tracking_client", None), "store", None)
    if not isinstance(store, SqlAlchemyStore):
        return None
    found: dict[str, dict[str, tuple[list, list]]] = {run_id: {} for run_id in run_ids}
    try:
        columns = (SqlMetric.run_uuid, SqlMetric.key, SqlMetric.step, SqlMetric.value, SqlMetric.is_nan)
        with store.ManagedSessionMaker() as session:
            rows = (
                session.query(*columns)
                .filter(SqlMetric.run_uuid.in_(run_ids), SqlMetric.key.startswith(prefix, autoescape=True))
                .order_by(SqlMetric.run_uuid, SqlMetric.key, SqlMetric.step, SqlMetric.timestamp)
                .all()
            )
    except (AttributeError, TypeError, SQLAlchemyError):
        return None
    for run_id, key, step, value, is_nan in rows:
        steps, values = found[run_id].setdefault(key, ([], []))
        steps.append(step)
        values.append(float("nan") if is_nan else value)
    return found


def continual_histories(
    run_id: str, prefix: str, tracking_uri: str | None = None
) -> tuple[dict[str, tuple[list, list]], list[tuple[int, str]]]:
    """A continual run's series across its domain switches: the histories (keys starting with `prefix`) of its
    nested per-domain runs (tag `tod.domain`, pipelines/tod/continual.py) joined into one series per key (the
    domains share one step count), and the switches, (first step of each domain's series, "domain NAME")."""
    client, run, _ = open_run(run_id, tracking_uri)
    nested = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    domains = sorted(
        (r for r in nested if DOMAIN_TAG in r.data.tags), key=lambda r: int(r.data.tags.get(DOMAIN_INDEX_TAG, 0))
    )
    per_domain = bulk_metric_histories([r.info.run_id for r in domains], prefix, tracking_uri)
    joined: dict[str, tuple[list, list]] = {}
    switches = []
    for domain in domains:
        histories = per_domain[domain.info.run_id]
        starts = [steps[0] for steps, _ in histories.values() if steps]
        if starts:
            switches.append((min(starts), f"domain {domain.data.tags[DOMAIN_TAG]}"))
        for key, (steps, values) in histories.items():
            joined_steps, joined_values = joined.setdefault(key, ([], []))
            joined_steps += steps
            joined_values += values
    return joined, switches
