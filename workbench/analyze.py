"""`workbench analyze RUN_ID`: geometry features over every stored snapshot of a run, logged to that run.

Idempotent and resumable: a (metric, layer, step) already in the run's history is not computed or logged
again, so a second call adds nothing and an interrupted one continues where it stopped. It works on a
run that is still training (the index lists only snapshot files that were completely written). On a run
whose `snapshot.keep` stored only some snapshots, its first problem line says which steps it recomputes and
which it cannot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from workbench.config import SnapshotConfig
from workbench.errors import WorkbenchError
from workbench.geometry import FEATURE_METRICS, compute_geometry
from workbench.snapshots import load_snapshots
from workbench.tracking import Tracker, open_run


@dataclass
class AnalyzeReport:
    logged: int = 0  # metric values written
    skipped: int = 0  # (feature, layer, step) already in the run
    problems: list[str] = field(default_factory=list)


def parse_features(text: str) -> list[str]:
    features = [f.strip() for f in text.split(",") if f.strip()]
    unknown = [f for f in features if f not in FEATURE_METRICS]
    if unknown or not features:
        raise WorkbenchError(f"--features: unknown {unknown or text!r}; expected some of {', '.join(FEATURE_METRICS)}")
    return features


def analyze_run(
    run_id: str,
    features: Sequence[str],
    layers: Sequence[str] | None = None,
    tracking_uri: str | None = None,
    settings: SnapshotConfig | None = None,
) -> AnalyzeReport:
    """Compute `features` on every snapshot of `run_id` (all layers unless `layers`) and log them to it."""
    settings = settings or SnapshotConfig()
    client, run, uri = open_run(run_id, tracking_uri)  # never creates a store for a mistyped URI
    snaps = load_snapshots(run_id, uri)
    names = _select_layers(layers, list(snaps.layers))
    done = {
        (metric, name): {m.step for m in client.get_metric_history(run_id, f"geom/{metric}/{name}")}
        for feature in features
        for metric in FEATURE_METRICS[feature]
        for name in names
        if f"geom/{metric}/{name}" in run.data.metrics
    }
    tracker = Tracker(client, run_id, uri)
    report = AnalyzeReport()
    if snaps.index.get("dropped"):
        report.problems.append(_coverage(snaps.steps, snaps.index["dropped"], snaps.index["keep"]))
    work = [(i, step, name) for i, step in enumerate(snaps.steps) for name in names]
    try:
        for i, step, name in tqdm(work, desc=f"analyze {run_id[:8]}", unit="snapshot"):
            todo = [f for f in features if any(step not in done.get((m, name), ()) for m in FEATURE_METRICS[f])]
            report.skipped += len(features) - len(todo)
            if not todo:
                continue
            values, problems, _ = compute_geometry(
                snaps.layers[name][i],
                todo,
                settings.mle_neighbors,
                settings.local_neighbors,
                settings.tda_landmarks,
            )
            report.problems += [f"step {step} {name}: {p}" for p in problems]
            tracker.log_metrics({f"geom/{metric}/{name}": v for metric, v in values.items()}, step)
            report.logged += len(values)
    finally:
        tracker.flush()  # keep everything computed so far, also on Ctrl-C: the next call resumes
    return report


def _coverage(stored: list[int], dropped: list[int], keep: str) -> str:
    """One line: the steps whose snapshot was not stored (online geometry only) and those it recomputes."""
    return (
        f"cannot recompute steps {_steps(dropped)} (snapshot.keep={keep} did not store them; their online "
        f"geometry is logged); recomputing steps {_steps(stored)}"
    )


def _steps(steps: list[int], shown: int = 10) -> str:
    listed = ", ".join(map(str, steps[:shown])) or "none"
    return listed if len(steps) <= shown else f"{listed}, ... ({len(steps)} in all, the last {steps[-1]})"


def _select_layers(requested: Sequence[str] | None, available: list[str]) -> list[str]:
    if not requested:
        return available
    names = [f"layer_{int(r):02d}" if str(r).isdigit() else str(r) for r in requested]
    missing = [n for n in names if n not in available]
    if missing:
        raise WorkbenchError(f"--layers: {', '.join(missing)} not in this run's snapshots ({', '.join(available)})")
    return names
