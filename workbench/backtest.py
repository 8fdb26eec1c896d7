"""Policies on logged runs: `workbench backtest` replays a policy over a run's metric histories, and
`workbench events` lists what a policy and the forecasters logged to a run.

A replay feeds a fresh `PolicyEngine` (no tracker: nothing is logged) the metrics of each logged step, in step
order, exactly as the live loop fed them, so it stops where the live run with the same policy stopped. Keys
the engine itself logs (`event/...`) are left out, as the live engine never saw them; geometry that
`workbench analyze` added afterwards is replayed too, which is how a policy on offline features is tried.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench import tags
from workbench.errors import WorkbenchError
from workbench.policies import Condition, Firing, PolicyEngine, Rule, load_rules
from workbench.runs import bulk_metric_histories, metric_histories
from workbench.tracking import metric_key, open_run, open_store, resolve_tracking_uri

RUN_ID = re.compile(r"[0-9a-f]{1,64}")
BUDGET_PARAM = "train.max_steps"  # the step budget every stage config has


@dataclass
class Monitored:
    """A metric a stop rule watches: its value at the stop, its best (when the rule says which way is better)
    and its final value."""

    metric: str
    at_stop: float | None
    best: tuple[int, float] | None  # (step, value)
    final: tuple[int, float]


@dataclass
class BacktestResult:
    run_id: str
    run_name: str
    budget: int  # the run's step budget (its train.max_steps), else its last logged step
    logged_steps: int
    stop_step: int | None
    reason: str | None
    firings: list[Firing] = field(default_factory=list)
    monitored: list[Monitored] = field(default_factory=list)

    @property
    def saved(self) -> float:
        """The share of the step budget the policy would not have trained."""
        if self.stop_step is None or self.budget <= 0:
            return 0.0
        return (self.budget - self.stop_step) / self.budget


def backtest(
    policy: str | Path, run_ids: Sequence[str], experiment: str | None = None, tracking_uri: str | None = None
) -> list[BacktestResult]:
    """Replay the policy file over each run (and every run of `experiment`)."""
    rules = load_rules(policy)
    ids = list(dict.fromkeys([*run_ids, *_experiment_runs(experiment, tracking_uri)]))
    if not ids:
        raise WorkbenchError("backtest: no runs given (RUN_ID... or --experiment NAME)")
    return [backtest_run(rules, run_id, tracking_uri, source=str(policy)) for run_id in ids]


def _experiment_runs(experiment: str | None, tracking_uri: str | None) -> list[str]:
    if experiment is None:
        return []
    client, uri = open_store(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise WorkbenchError(f"--experiment: no experiment named {experiment!r} in {uri}")
    runs = client.search_runs([found.experiment_id], order_by=["attribute.start_time ASC"], max_results=10000)
    return [run.info.run_id for run in runs]


def backtest_run(
    rules: Sequence[Rule], run_id: str, tracking_uri: str | None = None, source: str = "policy"
) -> BacktestResult:
    """Where the rules would have stopped one logged run, and what the stop would have cost."""
    _, run, uri = open_run(run_id, tracking_uri)
    histories = {k: v for k, v in metric_histories(run_id, uri).items() if not k.startswith("event/")}
    by_step: dict[int, dict[str, float]] = {}
    for key, (steps, values) in histories.items():
        for step, value in zip(steps, values, strict=True):
            by_step.setdefault(step, {})[key] = value
    engine = PolicyEngine(rules, console=False, source=source)
    for step in sorted(by_step):
        if engine.observe(step, by_step[step]).stop:
            break
    engine.finish()
    last = max(by_step, default=0)
    budget = run.data.params.get(BUDGET_PARAM)
    stopped = engine.stopped
    result = BacktestResult(
        run_id=run_id,
        run_name=run.info.run_name or "",
        budget=int(budget) if budget and budget.isdigit() else last,
        logged_steps=len(by_step),
        stop_step=stopped.step if stopped else None,
        reason=stopped.message if stopped else None,
        firings=engine.firings,
    )
    stop_rules = [r for r in rules if "stop" in r.actions and (stopped is None or r.name == stopped.name)]
    result.monitored = [
        _monitored(key, mode, histories[key], result.stop_step)
        for key, mode in _watched_metrics(stop_rules).items()
        if key in histories
    ]
    return result


def _watched_metrics(rules: Sequence[Rule]) -> dict[str, str | None]:
    """The metrics the rules watch, with the direction that is better where a rule gives one."""
    found: dict[str, str | None] = {}

    def walk(condition: Condition) -> None:
        for child in (condition.all or []) + (condition.any or []):
            walk(child)
        if condition.metric is not None:
            key = metric_key(condition.metric)
            found[key] = found.get(key) or condition.mode

    for rule in rules:
        walk(rule.when)
    return found


def _monitored(key: str, mode: str | None, history: tuple[list, list], stop_step: int | None) -> Monitored:
    points = list(zip(*history, strict=True))
    before = [value for step, value in points if stop_step is not None and step <= stop_step]
    best = None
    if mode is not None:
        best = (max if mode == "max" else min)(points, key=lambda p: p[1])
    return Monitored(key, before[-1] if before else None, best, points[-1])


def format_results(results: Sequence[BacktestResult]) -> list[str]:
    """A table (one row per run and watched metric), then each run's firings in step order."""
    header = ("run", "name", "stop step", "saved", "metric", "at stop", "best", "final")
    rows = []
    for r in results:
        stop = "never" if r.stop_step is None else str(r.stop_step)
        saved = f"{r.saved:.0%} of {r.budget}"
        for m in r.monitored or [None]:
            cells = ("", "", "", "") if m is None else _metric_cells(m)
            rows.append((r.run_id[:12], r.run_name, stop, saved, *cells))
    lines = format_table(header, rows)
    for r in results:
        lines.append("")
        lines.append(f"run {r.run_id} ({r.logged_steps} logged steps): " + (r.reason or "no stop"))
        lines += [f"  step {f.step:>7}  {f.kind:<10}  {f.message}" for f in r.firings] or ["  nothing fired"]
    return lines


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns, two spaces apart."""
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]


def _metric_cells(m: Monitored) -> tuple[str, str, str, str]:
    at_stop = "" if m.at_stop is None else f"{m.at_stop:.4g}"
    best = "" if m.best is None else f"{m.best[1]:.4g} @{m.best[0]}"
    return m.metric, at_stop, best, f"{m.final[1]:.4g} @{m.final[0]}"


# --- `workbench events` -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunEvent:
    step: int | None  # None: not tied to a step (a Ctrl-C, a stop request)
    kind: str  # forecast, alert, stop, stop requested
    name: str
    details: str


def run_events(run_id: str, tracking_uri: str | None = None) -> list[RunEvent]:
    """The run's `event/*` metrics and its alert/stop tags, in step order."""
    _, run, _ = open_run(run_id, tracking_uri)
    return _events(run, metric_histories(run_id, tracking_uri, "event/", keys=run.data.metrics))


def _events(run: Any, histories: dict[str, tuple[list, list]]) -> list[RunEvent]:
    """The events of a run given the histories of its `event/*` metrics."""
    run_tags = run.data.tags
    events = []
    for key in sorted(histories):
        name = key.removeprefix("event/")
        forecast, alert = run_tags.get(tags.EVENT_PREFIX + name), run_tags.get(tags.ALERT_PREFIX + name)
        latest = json.loads(forecast or alert or "{}")  # the tag holds the latest firing's details
        for step in histories[key][0]:
            details = _details(latest) if latest.get("step") == step else ""
            events.append(RunEvent(step, "forecast" if forecast else "alert", name, details))
    if tags.STOP_REASON in run_tags:
        at = run_tags.get(tags.STOPPED_AT)
        events.append(RunEvent(int(at) if at else None, "stop", "", run_tags[tags.STOP_REASON]))
    if tags.STOP_REQUESTED in run_tags:
        events.append(RunEvent(None, "stop requested", "", run_tags[tags.STOP_REQUESTED]))
    return sorted(events, key=lambda e: (e.step is None, e.step or 0))


def _details(latest: dict) -> str:
    if "message" in latest:
        return str(latest["message"])
    return ", ".join(f"{k}={v}" for k, v in latest.items() if k != "step")


def runs_landmarks(run_ids: Sequence[str], tracking_uri: str | None = None) -> dict[str, list[tuple[int, str]]]:
    """Run id -> (step, label) of what happened in the run, for markers on its plots: memorisation and grokking
    (the stage's `grokking/<name>_step` facts), forecasts, policy alerts and the stop. One search reads the runs
    and one query their events, however many runs (the Geometry page marks 20)."""
    for run_id in run_ids:
        if not RUN_ID.fullmatch(run_id):  # the ids go into a search filter
            raise WorkbenchError(f"run {run_id}: not a run id (hexadecimal)")
    if not run_ids:
        return {}
    client, _ = open_store(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    quoted = ", ".join(f"'{run_id}'" for run_id in run_ids)
    runs = client.search_runs(experiments, f"attributes.run_id IN ({quoted})", max_results=len(run_ids))
    events = bulk_metric_histories([run.info.run_id for run in runs], "event/", tracking_uri)
    found = {}
    for run in runs:
        marks = [
            (int(value), key.removeprefix("grokking/").removesuffix("_step"))
            for key, value in run.data.metrics.items()
            if key.startswith("grokking/") and key.endswith("_step")
        ]
        marks += [
            (e.step, f"{e.kind} {e.name}".strip()) for e in _events(run, events[run.info.run_id]) if e.step is not None
        ]
        found[run.info.run_id] = sorted(marks)
    missing = [run_id for run_id in run_ids if run_id not in found]
    if missing:
        raise WorkbenchError(f"run {missing[0]}: not found, or deleted, in {resolve_tracking_uri(tracking_uri)}")
    return found


def unlogged_metrics(
    rules: Sequence[Rule], run_ids: Sequence[str], tracking_uri: str | None = None
) -> list[tuple[str, str]]:
    """(key, message) for each metric the rules watch that none of the runs logged; the message names the
    closest logged key if there is one."""
    logged: set[str] = set()
    for run_id in run_ids:
        logged |= set(open_run(run_id, tracking_uri)[1].data.metrics)
    problems = []
    for key in _watched_metrics(rules):
        if key not in logged:
            close = difflib.get_close_matches(key, sorted(logged), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append((key, f"metric '{key}' is logged by none of these runs{hint}"))
    return problems
