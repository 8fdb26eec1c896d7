"""A run's data in a notebook: its metrics, geometry and events as pandas DataFrames, its snapshots as arrays.

    from workbench.frames import events, geometry, metrics, snapshots

    m = metrics(RUN_ID)                                  # step, key, value: every value the run logged
    m[m.key == "eval/acc"].plot(x="step", y="value")
    g = geometry(RUN_ID)                                 # step, layer, feature, value
    g[g.feature == "lid_twonn"].pivot(index="layer", columns="step", values="value")
    events(RUN_ID)                                       # step, kind, name, details: `workbench events`
    points = snapshots(RUN_ID, layer=-1)                 # step -> [points, hidden] of the last layer

Each reads the store the CLI and the app read (`tracking_uri`, else $MLFLOW_TRACKING_URI, else ./mlflow.db),
through the same functions: a run's metrics in one query on a SQL store (`workbench.runs.bulk_metric_histories`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from workbench.backtest import run_events
from workbench.errors import WorkbenchError
from workbench.runs import bulk_metric_histories
from workbench.snapshots import load_snapshots
from workbench.tracking import open_run


def metrics(run_id: str, tracking_uri: str | None = None) -> pd.DataFrame:
    """Every value of every metric of the run, `geom/` and `event/` ones included: columns step, key, value,
    sorted by key, then step."""
    return long_frame(_histories(run_id, "", tracking_uri))


def geometry(run_id: str, tracking_uri: str | None = None) -> pd.DataFrame:
    """The run's geometry series (`geom/<feature>/<layer>`): columns step, layer, feature, value, sorted by feature,
    layer, then step."""
    histories = _histories(run_id, "geom/", tracking_uri)
    frame = long_frame({key: h for key, h in histories.items() if key.count("/") == 2})  # as geometry_features reads
    parts = frame["key"].str.split("/")
    columns = {"layer": parts.str[2].astype(str), "feature": parts.str[1].astype(str)}
    return frame.assign(**columns)[["step", "layer", "feature", "value"]]


def events(run_id: str, tracking_uri: str | None = None) -> pd.DataFrame:
    """What the run's forecasters and policy logged, as `workbench events` lists it: columns step (missing for
    a stop request, which is not tied to a step), kind, name, details; in step order."""
    found = run_events(run_id, tracking_uri)
    return pd.DataFrame(
        {
            "step": pd.array([e.step for e in found], dtype="Int64"),
            "kind": pd.Series([e.kind for e in found], dtype=str),
            "name": pd.Series([e.name for e in found], dtype=str),
            "details": pd.Series([e.details for e in found], dtype=str),
        }
    )


def snapshots(run_id: str, layer: int | str = -1, tracking_uri: str | None = None) -> dict[int, np.ndarray]:
    """One layer's snapshots, step -> points [points, hidden]; `layer` by name (`layer_01`) or by position among
    the snapshot's layers (0 = the embeddings, -1 = the last). Which probe and position each point is:
    `workbench.snapshots.load_snapshots(run_id).index["points"]`."""
    found = load_snapshots(run_id, tracking_uri)
    names = list(found.layers)
    if isinstance(layer, str):
        name = layer if layer in found.layers else None
    else:
        name = names[layer] if -len(names) <= layer < len(names) else None
    if name is None:
        raise WorkbenchError(f"layer {layer!r}: run {run_id}'s snapshots hold {', '.join(names) or 'no layer'}")
    return dict(zip(found.steps, found.layers[name], strict=True))


def _histories(run_id: str, prefix: str, tracking_uri: str | None) -> dict[str, tuple[list, list]]:
    open_run(run_id, tracking_uri)  # a one-line error for a run the store lacks, or deleted
    return bulk_metric_histories([run_id], prefix, tracking_uri)[run_id]


def long_frame(histories: dict[str, tuple[list, list]]) -> pd.DataFrame:
    """Histories (key -> (steps, values)) as one row per value: columns step, key, value, sorted by key, then step
    as logged."""
    keys = sorted(histories)
    return pd.DataFrame(
        {
            "step": np.array([step for key in keys for step in histories[key][0]], dtype=np.int64),
            "key": pd.Series([key for key in keys for _ in histories[key][0]], dtype=str),
            "value": np.array([value for key in keys for value in histories[key][1]], dtype=np.float64),
        }
    )
