"""Reading runs back from the tracking store: shared by the CLI and the app."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.tracking import open_store, resolve_tracking_uri

KEY_METRICS = ("train/acc", "eval/acc", "grokking/grokking_step")


def recent_runs(tracking_uri: str | None = None, experiment: str | None = None, limit: int = 20) -> list[dict]:
    """Newest runs first, one dict of display strings per run (id, experiment, stage, status, metrics)."""
    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return []  # listing must not create an empty store as a side effect
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
        return []
    runs = client.search_runs(list(names), order_by=["attribute.start_time DESC"], max_results=limit)
    rows = []
    for run in runs:
        row = {
            "run_id": run.info.run_id,
            "experiment": names[run.info.experiment_id],
            "name": run.info.run_name or "",
            "stage": run.data.tags.get("workbench.stage", ""),
            "status": run.info.status,
            "started": datetime.fromtimestamp(run.info.start_time / 1000).strftime("%Y-%m-%d %H:%M"),
        }
        for key in KEY_METRICS:
            value = run.data.metrics.get(key)
            row[key] = "" if value is None else f"{value:g}"
        rows.append(row)
    return rows


def metric_histories(run_id: str, tracking_uri: str | None = None, prefix: str = "") -> dict[str, tuple[list, list]]:
    """Every logged value of a run's metrics whose key starts with `prefix`: key -> (steps, values)."""
    client, _ = open_store(tracking_uri)
    keys = sorted(k for k in client.get_run(run_id).data.metrics if k.startswith(prefix))
    histories = {}
    for key in keys:
        points = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        histories[key] = ([m.step for m in points], [m.value for m in points])
    return histories
