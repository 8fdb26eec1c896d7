"""Early-stop policies: rules over a run's metric stream that alert, checkpoint, stop, or hold other rules' stops.

A policy is data (DESIGN.md, "Early-stop policies"): a YAML list of rules, each a condition (`when`) and its
actions. Condition knobs are those Keras, Lightning and Hugging Face users know from their EarlyStopping
callbacks (`metric` is their `monitor`), plus conditions on the shape of a series (drop from its running peak,
fraction of its first value, slope over a window, sustained for k observations) and forecaster events.
Nothing in a policy is evaluated as code. docs/policies.md describes every knob.

`PolicyEngine.observe(step, metrics)` is the one entry point: the grokking loop and the HF callback call it at
every logged step, and `workbench backtest` replays logged histories through a fresh engine, so a policy stops
a backtest at the step it stops the live run.
"""

from __future__ import annotations

import difflib
import json
import math
import sys
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from workbench.config import StageConfig, _describe, _Strict, read_yaml, yaml_problem
from workbench.errors import WorkbenchError
from workbench.tracking import metric_key, open_run

if TYPE_CHECKING:
    from analysis.forecast import Forecaster
    from workbench.tracking import Tracker

ACTIONS = ("alert", "checkpoint", "stop", "hold")
STOP_REQUEST_TAG = "workbench.stop_requested"  # set by `workbench stop` and the app, polled by the engine
CHECKPOINT_REQUEST_TAG = "workbench.checkpoint_requested"  # set by the app's "Checkpoint now", polled likewise
ATTACH_REQUEST_TAG = "workbench.attached_policy"  # a policy attached to a live run (`workbench attach`), polled too
ATTACHED_AT_TAG = "workbench.attached_policy_applied"  # set by the run: the step it took the attached rules at
ATTACH_MAX_CHARS = 5000  # tag values: 8 000 characters in MLflow 3, 5 000 before; longer ones are truncated
STOP_REASON_TAG = "workbench.stop_reason"
STOPPED_AT_TAG = "workbench.stopped_at_step"
ALERT_TAG_PREFIX = "workbench.alert."
EVENT_TAG_PREFIX = "workbench.event."
STOP_POLL_SECONDS = 2.0  # three get_run a poll (stop, checkpoint, attach): ~5 ms each on sqlite, a request on a server
_TESTS = (
    "patience",
    "patience_steps",
    "stopping_threshold",
    "divergence_threshold",
    "check_finite",
    "above",
    "below",
    "drop_from_peak",
    "fraction_of_initial",
    "slope_below",
)
_DIRECTIONAL = ("patience", "patience_steps", "baseline", "stopping_threshold", "divergence_threshold")


# --- the language ---------------------------------------------------------------------------------------


class Condition(_Strict):
    """A rule's `when`: tests on one metric's series, a forecaster event, or `all` / `any` of conditions.

    The tests given on one metric combine with "or", as in Lightning's EarlyStopping (check_finite,
    stopping_threshold, divergence_threshold and patience are each a reason to stop); `all` expresses "and".
    """

    metric: str | None = Field(None, min_length=1, description="The monitored MLflow key (Keras' `monitor`).")
    mode: Literal["min", "max"] | None = Field(
        None, description="Which way is better; required by patience, baseline and the two thresholds."
    )
    patience: int | None = Field(
        None, ge=0, description="Observations of `metric` without improvement (Keras/Lightning/HF patience)."
    )
    patience_steps: int | None = Field(None, ge=0, description="Like patience, counted in steps since the best.")
    min_delta: float = Field(0.0, ge=0, description="An improvement must beat the best by more than this.")
    baseline: float | None = Field(
        None, description="Patience runs out unless the metric also beats this value (Keras' baseline)."
    )
    stopping_threshold: float | None = Field(None, description="Holds once the metric is at least this good.")
    divergence_threshold: float | None = Field(None, description="Holds once the metric is worse than this.")
    check_finite: bool = Field(False, description="Holds when the metric is NaN or infinite.")
    warmup_steps: int = Field(0, ge=0, description="Values logged before this step are ignored (start_from_epoch).")
    above: float | None = Field(None, description="Holds while metric > above.")
    below: float | None = Field(None, description="Holds while metric < below.")
    drop_from_peak: float | None = Field(
        None, gt=0, lt=1, description="Holds when the metric is this fraction below its running peak."
    )
    fraction_of_initial: float | None = Field(
        None, gt=0, description="Holds when metric <= this fraction of its first value."
    )
    slope_below: float | None = Field(
        None, description="Holds when the least-squares slope per step over the last `window` steps is below this."
    )
    window: int | None = Field(None, gt=0, description="Steps the slope is fitted over.")
    for_snapshots: int = Field(1, ge=1, description="The metric's tests must hold on this many observations in a row.")
    event: str | None = Field(None, min_length=1, description="A forecaster's event; holds while it is active.")
    all: list[Condition] | None = Field(None, min_length=1, description="Holds when every condition holds.")
    any: list[Condition] | None = Field(None, min_length=1, description="Holds when one condition holds.")

    @model_validator(mode="after")
    def _coherent(self) -> Condition:
        kinds = [k for k in ("metric", "event", "all", "any") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"expected exactly one of metric, event, all, any; got {', '.join(kinds) or 'none'}")
        given = self.model_fields_set - {kinds[0]}
        if kinds[0] != "metric":
            if given:
                raise ValueError(f"{', '.join(sorted(given))}: only valid with metric, not with {kinds[0]}")
            return self
        if all(getattr(self, t) is None or getattr(self, t) is False for t in _TESTS):  # `below: 0` is a test
            raise ValueError(f"metric {self.metric!r}: no test given (expected one of {', '.join(_TESTS)})")
        if self.patience is not None and self.patience_steps is not None:
            raise ValueError("patience and patience_steps: give one of them")
        if self.patience is None and self.patience_steps is None:
            for knob in ("min_delta", "baseline"):
                if knob in given:
                    raise ValueError(f"{knob}: only used with patience or patience_steps")
        directional = [k for k in _DIRECTIONAL if getattr(self, k) is not None]
        if directional and self.mode is None:
            raise ValueError(f"mode: required with {directional[0]} (min or max)")
        if (self.slope_below is None) != (self.window is None):
            raise ValueError("slope_below and window: give both")
        return self


class Rule(_Strict):
    """A named condition and what to do when it holds."""

    name: str = Field(min_length=1, max_length=100, description="Names the rule in tags, metrics and messages.")
    when: Condition
    actions: list[str] = Field(min_length=1, description="Some of alert, checkpoint, stop, hold.")
    once: bool = Field(False, description="Fire at most once per run.")
    cooldown: int = Field(0, ge=0, description="Steps after a firing during which the rule does not fire again.")

    @field_validator("actions")
    @classmethod
    def _known_actions(cls, actions: list[str]) -> list[str]:
        for action in actions:
            if action not in ACTIONS:
                raise ValueError(f"unknown action {action!r} (expected {', '.join(ACTIONS)})")
        if "hold" in actions and "stop" in actions:
            raise ValueError("hold and stop in one rule contradict each other")
        return list(dict.fromkeys(actions))


def load_rules(
    value: Sequence[Any] | str | Path,
    source: str | None = None,
    base_dir: Path | None = None,
    node: yaml.Node | None = None,
) -> list[Rule]:
    """Validate a policy: a list of rule mappings, or a YAML file of one (relative paths from `base_dir`).

    Errors are one-line `WorkbenchError`s naming the source (the file, or `source`), the rule and the field;
    given the composed YAML `node` of `value` (`parse_policy`), also the line.
    """
    if isinstance(value, str | Path):
        path = Path(value)
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        source, value = str(path), read_yaml(path, "policy")
    prefix = f"{source}: " if source else ""
    if not isinstance(value, list):
        raise WorkbenchError(f"{prefix}expected a list of rules, got {type(value).__name__}")
    rules: list[Rule] = []
    for index, raw in enumerate(value, start=1):
        label = f"rule #{index}"
        if isinstance(raw, Mapping) and isinstance(raw.get("name"), str):
            label = f"rule {raw['name']!r} (#{index})"
        if not isinstance(raw, Mapping):
            line = _line(node, [index - 1])
            raise WorkbenchError(f"{prefix}{line}{label}: expected a mapping with name, when, actions; got {raw!r}")
        try:
            rule = Rule.model_validate(raw)
        except ValidationError as exc:
            line = _line(node, [index - 1, *exc.errors()[0]["loc"]])
            raise WorkbenchError(f"{prefix}{line}{label}: {_describe(exc)}") from None
        taken = [i for i, other in enumerate(rules, start=1) if other.name == rule.name]
        if taken:
            line = _line(node, [index - 1, "name"])
            raise WorkbenchError(f"{prefix}{line}{label}: name: {rule.name!r} is already rule #{taken[0]}")
        rules.append(rule)
    return rules


def parse_policy(text: str, source: str = "policy") -> list[Rule]:
    """Validate a policy given as YAML text (the app's editor): rules and forecaster events, as a run would.

    Errors name the line, the rule and the field: ``policy: line 4: rule 'p' (#1): when.patience: ...``.
    """
    try:
        node = yaml.compose(text)
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        line, problem = yaml_problem(exc)
        where = f"line {line}: " if line else ""
        raise WorkbenchError(f"{source}: {where}invalid YAML: {problem}") from None
    # A policy's text is its rules: a bare string in it is a malformed rule, never a path to read another file from.
    rules = load_rules([] if value is None else [value] if isinstance(value, str) else value, source, node=node)
    _check_events(rules, {f.name for f in default_forecasters()}, source, node)
    return rules


def _line(node: yaml.Node | None, path: Sequence[Any]) -> str:
    """'line N: ' of the deepest node along `path` (list indices and mapping keys) in a composed YAML tree."""
    found = node
    for part in path:
        if isinstance(found, yaml.SequenceNode) and isinstance(part, int) and part < len(found.value):
            found = found.value[part]
        elif isinstance(found, yaml.MappingNode):
            child = next((v for k, v in found.value if k.value == part), None)
            if child is None:
                break
            found = child
        else:
            break
    return "" if found is None else f"line {found.start_mark.line + 1}: "


def attach_policies(config: StageConfig, config_path: Path, policy_files: Sequence[Path] = ()) -> StageConfig:
    """The config with every rule inline: its `policies` file (relative to the config file) and `--policy` files.

    Everything is validated here, forecaster events included, so a bad policy refuses the run before it starts;
    the inlined rules are then what the run logs as its config.
    """
    sources: list[tuple[str, Any]] = []  # (source named in errors, its rules)
    if isinstance(config.policies, str):
        path = config_path.parent / config.policies
        sources.append((str(path), read_yaml(path, "policy")))
    elif config.policies:
        sources.append((f"{config_path}: policies", config.policies))
    sources += [(str(path), read_yaml(path, "policy")) for path in policy_files]
    names = {f.name for f in default_forecasters()}
    inline: list[Any] = []
    seen: dict[str, str] = {}
    for source, raw in sources:
        rules = load_rules([raw] if isinstance(raw, str) else raw, source)  # file content, never a further path
        _check_events(rules, names, source)
        for rule in rules:
            if rule.name in seen:
                raise WorkbenchError(f"{source}: rule {rule.name!r}: name: already a rule of {seen[rule.name]}")
            seen[rule.name] = source
        inline += raw
    return config.model_copy(update={"policies": inline})


# --- conditions, compiled to stateful checks ------------------------------------------------------------


class _Check:
    """The state of one condition over the run. `update` returns whether this step brought it new data."""

    true = False
    why = ""

    def update(self, step: int, metrics: Mapping[str, float], forecasters: Mapping[str, Forecaster]) -> bool:
        raise NotImplementedError

    def metrics(self) -> set[str]:
        return set()

    def events(self) -> set[str]:
        return set()


class _MetricCheck(_Check):
    def __init__(self, condition: Condition) -> None:
        self.c = condition
        self.key = metric_key(condition.metric)
        self.seen = 0  # observations since warm-up
        self.streak = 0  # consecutive observations on which a test held (for_snapshots)
        self.best: float | None = None
        self.best_step = 0
        self.wait = 0  # Keras' counter: observations since the last improvement that also beat the baseline
        self.since = 0  # the step that counter was reset at
        self.peak: float | None = None
        self.initial: float | None = None
        self.first_step: int | None = None
        self.recent: deque[tuple[int, float]] = deque()

    def metrics(self) -> set[str]:
        return {self.key}

    def update(self, step: int, metrics: Mapping[str, float], forecasters: Mapping[str, Forecaster]) -> bool:
        if self.key not in metrics or step < self.c.warmup_steps:
            return False
        value = float(metrics[self.key])
        self.seen += 1
        reasons = self._tests(step, value)
        self.streak = self.streak + 1 if reasons else 0
        self.true = self.streak >= self.c.for_snapshots
        sustained = f" ({self.streak} observations in a row)" if self.c.for_snapshots > 1 else ""
        self.why = "; ".join(reasons) + sustained if self.true else ""
        return True

    def _better(self, a: float, b: float) -> bool:
        return a > b if self.c.mode == "max" else a < b

    def _tests(self, step: int, value: float) -> list[str]:
        c, key, out = self.c, self.key, []
        if c.check_finite and not math.isfinite(value):
            out.append(f"{key} is {value} (not finite)")
        if c.stopping_threshold is not None and (
            value == c.stopping_threshold or self._better(value, c.stopping_threshold)
        ):
            out.append(f"{key} = {value:.4g} reached stopping_threshold {c.stopping_threshold:g}")
        if c.divergence_threshold is not None and self._better(c.divergence_threshold, value):
            out.append(f"{key} = {value:.4g} is worse than divergence_threshold {c.divergence_threshold:g}")
        if c.patience is not None or c.patience_steps is not None:
            out += self._patience(step, value)
        if c.above is not None and value > c.above:
            out.append(f"{key} = {value:.4g} > {c.above:g}")
        if c.below is not None and value < c.below:
            out.append(f"{key} = {value:.4g} < {c.below:g}")
        if math.isfinite(value):  # the series tests describe the curve; a NaN is check_finite's business
            out += self._shape(step, value)
        return out

    def _patience(self, step: int, value: float) -> list[str]:
        """Keras' EarlyStopping (its documented baseline behaviour): count observations since an improvement."""
        c = self.c
        delta = c.min_delta if c.mode == "max" else -c.min_delta
        if self.seen == 1:
            self.since = step
        self.wait += 1
        if math.isfinite(value) and (self.best is None or self._better(value - delta, self.best)):
            self.best, self.best_step = value, step
            if c.baseline is None or self._better(value - delta, c.baseline):
                self.wait, self.since = 0, step
        if self.seen == 1 or self.wait == 0:  # as in Keras, never on the first value or on an improvement
            return []
        if c.baseline is not None and not self._better(self.best - delta, c.baseline):
            context = f"baseline {c.baseline:g} not beaten, best {self.best:.4g}"
        else:
            context = f"best {self.best:.4g} at step {self.best_step}"
        without = f"by more than {c.min_delta:g} " if c.min_delta else ""
        if c.patience is not None and self.wait >= c.patience:
            return [f"{self.key} has not improved {without}for {self.wait} evaluations ({context})"]
        if c.patience_steps is not None and step - self.since >= c.patience_steps:
            return [f"{self.key} has not improved {without}for {step - self.since} steps ({context})"]
        return []

    def _shape(self, step: int, value: float) -> list[str]:
        c, key, out = self.c, self.key, []
        if c.drop_from_peak is not None:
            self.peak = value if self.peak is None else max(self.peak, value)
            drop = (self.peak - value) / abs(self.peak) if self.peak else 0.0
            if drop >= c.drop_from_peak:
                out.append(f"{key} = {value:.4g} is {drop:.0%} below its running peak {self.peak:.4g}")
        if c.fraction_of_initial is not None:
            self.initial = value if self.initial is None else self.initial
            if value <= c.fraction_of_initial * self.initial:
                out.append(f"{key} = {value:.4g} <= {c.fraction_of_initial:g} x its first value {self.initial:.4g}")
        if c.slope_below is not None:
            self.first_step = step if self.first_step is None else self.first_step
            self.recent.append((step, value))
            while self.recent[0][0] < step - c.window:
                self.recent.popleft()
            # Only once the series spans a whole window: two early points are not a trend.
            if self.first_step <= step - c.window and len(self.recent) >= 2:
                slope = _least_squares_slope(self.recent)
                if slope < c.slope_below:
                    out.append(f"{key} slope {slope:.3g}/step over the last {c.window} steps < {c.slope_below:g}")
        return out


def _least_squares_slope(points: Sequence[tuple[int, float]]) -> float:
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / sxx


class _EventCheck(_Check):
    def __init__(self, name: str) -> None:
        self.name = name

    def events(self) -> set[str]:
        return {self.name}

    def update(self, step: int, metrics: Mapping[str, float], forecasters: Mapping[str, Forecaster]) -> bool:
        self.true = bool(forecasters[self.name].active(step))
        self.why = f"forecast '{self.name}' is active" if self.true else ""
        return True


class _Combined(_Check):
    def __init__(self, children: list[_Check], need_all: bool) -> None:
        self.children = children
        self.need_all = need_all

    def metrics(self) -> set[str]:
        return set().union(*(child.metrics() for child in self.children))

    def events(self) -> set[str]:
        return set().union(*(child.events() for child in self.children))

    def update(self, step: int, metrics: Mapping[str, float], forecasters: Mapping[str, Forecaster]) -> bool:
        # Every child sees every step: a child's state (best, peak, streak) must not depend on its siblings.
        fresh = [child.update(step, metrics, forecasters) for child in self.children]
        holding = [child for child in self.children if child.true]
        self.true = len(holding) == len(self.children) if self.need_all else bool(holding)
        self.why = (" and " if self.need_all else "; ").join(child.why for child in holding) if self.true else ""
        return any(fresh)


def _compile(condition: Condition) -> _Check:
    if condition.all is not None:
        return _Combined([_compile(c) for c in condition.all], need_all=True)
    if condition.any is not None:
        return _Combined([_compile(c) for c in condition.any], need_all=False)
    if condition.event is not None:
        return _EventCheck(condition.event)
    return _MetricCheck(condition)


# --- forecasters ----------------------------------------------------------------------------------------


def default_forecasters() -> list[Forecaster]:
    """One of each forecaster in `analysis.forecast.FORECASTERS` (name -> zero-argument factory)."""
    from analysis import forecast

    return [factory() for factory in getattr(forecast, "FORECASTERS", {}).values()]


def _check_events(rules: Sequence[Rule], names: set[str], source: str, node: yaml.Node | None = None) -> None:
    for index, rule in enumerate(rules, start=1):
        label = f"{source}: {_line(node, [index - 1, 'when'])}rule {rule.name!r} (#{index})"
        unknown = sorted(_compile(rule.when).events() - names)
        if unknown:
            expected = ", ".join(sorted(names)) or "none: no forecaster is registered"
            raise WorkbenchError(f"{label}: when.event: unknown event {unknown[0]!r} (expected {expected})")
        if "alert" in rule.actions and metric_key(rule.name) in {metric_key(n) for n in names}:
            raise WorkbenchError(f"{label}: name: {rule.name!r} is a forecaster's event; its alerts would mix with it")


# --- the engine -----------------------------------------------------------------------------------------


@dataclass
class Decision:
    """What the loop does after a step: stop (ending the run cleanly), save a checkpoint; and why."""

    stop: bool = False
    checkpoint: bool = False
    reason: str | None = None  # the first stop's rule and why, or "stop requested"
    alerts: list[str] = field(default_factory=list)  # the lines the engine printed at this step


@dataclass(frozen=True)
class Firing:
    """One thing the engine did, in step order: for the backtest report and tests."""

    step: int
    kind: str  # alert, checkpoint, stop, held, hold, release, event, attach
    name: str  # the rule, forecaster or "stop request"
    message: str


class _RuleState:
    def __init__(self, rule: Rule) -> None:
        self.rule = rule
        self.check = _compile(rule.when)
        self.metrics = self.check.metrics()
        self.events = self.check.events()
        self.last_fired: int | None = None
        self.held = False  # its stop is being held; its other actions already ran for this hold
        self.disabled = False


class PolicyEngine:
    """Evaluates rules and feeds forecasters at every logged step; logs what it does to the tracker's run.

    Args:
        rules: validated rules (`load_rules`).
        tracker: the run to log alerts, events and stop tags to, and to poll for stop requests; None in a
            backtest, where nothing is logged.
        forecasters: objects with `name`, `observe(step, metrics)` and `active(step)` (analysis/forecast.py);
            default: one of each in `analysis.forecast.FORECASTERS`.
        console: print a line for each action (on stderr, above any progress bar).
        stop_poll_seconds: the least time between two polls of the run's stop-request tag (default
            `STOP_POLL_SECONDS`).
        source: names the policy in error messages.
    """

    def __init__(
        self,
        rules: Sequence[Rule],
        tracker: Tracker | None = None,
        forecasters: Sequence[Forecaster] | None = None,
        *,
        console: bool = True,
        stop_poll_seconds: float | None = None,
        source: str = "policies",
    ) -> None:
        self.forecasters = {f.name: f for f in (default_forecasters() if forecasters is None else forecasters)}
        _check_events(rules, set(self.forecasters), source)
        self.rules = [_RuleState(rule) for rule in rules]
        self.tracker = tracker
        self.console = console
        self.stop_poll_seconds = STOP_POLL_SECONDS if stop_poll_seconds is None else stop_poll_seconds
        self.firings: list[Firing] = []
        self.stopped: Firing | None = None
        self.seen: set[str] = set()  # every metric key observed so far
        self._groups: set[str] = set()  # their prefixes: "eval" for eval/acc
        self._holding: list[str] = []
        self._last_step = 0
        self._last_poll: float | None = None
        self._poll_failed = False
        self._checkpoint_request: str | None = None  # the last checkpoint request seen (its tag value)
        self._attach_request: str | None = None  # the last attached policy seen (its tag value)

    @classmethod
    def from_config(
        cls,
        value: Sequence[Any] | str | Path,
        source: str = "config policies",
        *,
        base_dir: Path | None = None,
        **kwargs: Any,
    ) -> PolicyEngine:
        """An engine for a config's `policies` value: rules inline, or a YAML file (relative to `base_dir`)."""
        return cls(load_rules(value, source, base_dir), source=source, **kwargs)

    # --- the step ---------------------------------------------------------------------------------------

    def observe(self, step: int, metrics: Mapping[str, float]) -> Decision:
        """Feed the metrics logged at `step` (only those), evaluate the rules, and say what the loop does."""
        decision = Decision()
        metrics = {metric_key(k): v for k, v in metrics.items()}  # the names MLflow stores, as a backtest reads them
        self._last_step = step
        new_keys = metrics.keys() - self.seen
        self.seen.update(metrics)
        self._groups.update(_group(k) for k in new_keys)
        self._feed_forecasters(step, metrics, decision)
        if new_keys:
            self._report_missing(step, decision, final=False)
        fresh: dict[int, bool] = {}
        for i, state in enumerate(self.rules):
            if state.disabled:
                continue
            try:
                fresh[i] = state.check.update(step, metrics, self.forecasters)
            except Exception as exc:  # a live run never dies of its policy: the rule goes, the run goes on
                self._disable(state, step, f"{type(exc).__name__}: {exc}", decision)
        self._update_hold(step, decision)
        for i, state in enumerate(self.rules):
            if not state.disabled and fresh.get(i):
                self._consider(state, step, decision)
        stop, checkpoint, attached = self._poll_requests(snapshot=any(k.startswith("geom/") for k in metrics))
        if attached is not None:
            self._attach(step, attached, decision)
        if checkpoint and not stop:
            decision.checkpoint = True
            self._record(step, "checkpoint", "checkpoint request", "checkpoint requested", decision)
        if stop:
            decision.stop = decision.checkpoint = True
            decision.reason = "stop requested"
            self._stop(step, "stop request", "stop requested", decision)
            self.tracker.stopped_by_user = True  # the run ends KILLED: MLflow's word for stopped by the user
        return decision

    def finish(self) -> list[str]:
        """At the end of a run (or a replay): report rules whose metrics never appeared. Returns the lines."""
        decision = Decision()
        self._report_missing(self._last_step, decision, final=True)
        return decision.alerts

    # --- rules ------------------------------------------------------------------------------------------

    def _update_hold(self, step: int, decision: Decision) -> None:
        holding = [s.rule.name for s in self.rules if not s.disabled and "hold" in s.rule.actions and s.check.true]
        for name in holding:
            if name not in self._holding:
                self._record(step, "hold", name, f"rule '{name}': stops are held", decision)
        if self._holding and not holding:
            self._record(step, "release", ", ".join(self._holding), "stops are no longer held", decision)
            for state in self.rules:
                state.held = False
        self._holding = holding

    def _consider(self, state: _RuleState, step: int, decision: Decision) -> None:
        rule = state.rule
        if not state.check.true:
            state.held = False
            return
        actions = [a for a in rule.actions if a != "hold"]
        if not actions or (rule.once and state.last_fired is not None):
            return
        if state.last_fired is not None and step - state.last_fired < rule.cooldown:
            return
        why = f"rule '{rule.name}': {state.check.why}"
        if "stop" in actions and self._holding:
            # The stop waits for the hold to end; the rule's alert/checkpoint run once per hold, not every step.
            if not state.held:
                state.held = True
                self._record(step, "held", rule.name, f"{why} (stop held by {', '.join(self._holding)})", decision)
                self._act(state, step, why, [a for a in actions if a != "stop"], decision)
            return
        state.last_fired = step
        self._act(state, step, why, actions, decision)

    def _act(self, state: _RuleState, step: int, why: str, actions: list[str], decision: Decision) -> None:
        name = state.rule.name
        if "alert" in actions:
            self._alert(step, name, why, decision)
        if "checkpoint" in actions:
            decision.checkpoint = True
            self._record(step, "checkpoint", name, why, decision)
        if "stop" in actions:
            decision.stop = True
            decision.reason = decision.reason or why
            self._stop(step, name, why, decision)

    def _stop(self, step: int, name: str, why: str, decision: Decision) -> None:
        firing = self._record(step, "stop", name, why, decision)
        if self.stopped is None:
            self.stopped = firing
            if self.tracker is not None:
                self.tracker.set_tags({STOP_REASON_TAG: why, STOPPED_AT_TAG: str(step)})

    def _alert(self, step: int, name: str, message: str, decision: Decision) -> None:
        self._record(step, "alert", name, message, decision)
        if self.tracker is not None:
            self.tracker.log_metrics({metric_key(f"event/{name}"): 1.0}, step)
            self.tracker.set_tags({ALERT_TAG_PREFIX + metric_key(name): json.dumps({"step": step, "message": message})})

    def _disable(self, state: _RuleState, step: int, why: str, decision: Decision) -> None:
        state.disabled = True
        self._alert(step, state.rule.name, f"rule '{state.rule.name}' disabled: {why}", decision)

    def _report_missing(self, step: int, decision: Decision, final: bool) -> None:
        """A rule on a key this run does not log is a typo: say so against the keys it does log, and drop the rule.

        Keys logged together share a prefix (eval/..., geom/lid_twonn/...): once a rule's prefix has appeared
        without its key, the key is missing; otherwise the end of the run decides.
        """
        for state in self.rules:
            if state.disabled:
                continue
            missing = sorted(k for k in state.metrics - self.seen if final or _group(k) in self._groups)
            if missing:
                self._disable(state, step, self._never_logged(missing[0]), decision)

    def _never_logged(self, key: str) -> str:
        if not self.seen:
            return f"metric '{key}' never logged; this run logged no metrics"
        close = difflib.get_close_matches(key, sorted(self.seen), n=3)
        shown = close + [k for k in sorted(self.seen) if k not in close][: max(0, 8 - len(close))]
        more = f", ... ({len(self.seen) - len(shown)} more)" if len(self.seen) > len(shown) else ""
        hint = f" (did you mean {close[0]}?)" if close else ""
        return f"metric '{key}' never logged{hint}; this run logs {', '.join(shown)}{more}"

    # --- forecasters and stop requests ------------------------------------------------------------------

    def _feed_forecasters(self, step: int, metrics: Mapping[str, float], decision: Decision) -> None:
        for name, forecaster in list(self.forecasters.items()):
            try:
                event = forecaster.observe(step, metrics)
            except Exception as exc:  # a broken forecaster takes its rules with it, never the run
                del self.forecasters[name]
                for state in self.rules:
                    if name in state.events and not state.disabled:
                        self._disable(state, step, f"forecaster '{name}' failed: {type(exc).__name__}: {exc}", decision)
                continue
            if event is None:
                continue
            details = ", ".join(f"{k}={v}" for k, v in event.details.items())
            self._record(step, "event", event.name, f"forecast '{event.name}' fired: {details}", decision)
            if self.tracker is not None:
                self.tracker.log_metrics({metric_key(f"event/{event.name}"): 1.0}, event.step)
                tag = json.dumps({"step": event.step, **event.details}, default=str)
                self.tracker.set_tags({EVENT_TAG_PREFIX + metric_key(event.name): tag})

    def _poll_requests(self, snapshot: bool) -> tuple[bool, bool, str | None]:
        """(stop requested, a new checkpoint request, a newly attached policy's tag value). Polls the tags at most
        every `stop_poll_seconds`, and at every snapshot step, so that a request is honoured within one snapshot
        interval however fast the steps go (a poll costs far less than a snapshot)."""
        if self.tracker is None or self.stopped is not None:
            return False, False, None
        now = time.monotonic()
        if not snapshot and self._last_poll is not None and now - self._last_poll < self.stop_poll_seconds:
            return False, False, None
        self._last_poll = now
        try:
            stop = bool(self.tracker.get_tag(STOP_REQUEST_TAG))
            checkpoint = self.tracker.get_tag(CHECKPOINT_REQUEST_TAG)
            attached = self.tracker.get_tag(ATTACH_REQUEST_TAG)
        except Exception as exc:  # a store hiccup must not end the run; the next poll tries again
            if not self._poll_failed:
                self._poll_failed = True
                self._print(f"policy: cannot poll for stop requests ({type(exc).__name__}: {exc}); will retry")
            return False, False, None
        new = checkpoint is not None and checkpoint != self._checkpoint_request  # each request (its time) once
        self._checkpoint_request = checkpoint
        new_policy = attached if attached is not None and attached != self._attach_request else None
        self._attach_request = attached
        return stop, new, new_policy

    def _attach(self, step: int, value: str, decision: Decision) -> None:
        """Take the rules of a policy attached to the live run (`attach_policy`): an attached rule replaces the
        run's rule of the same name, its state fresh; the others are added. It was validated on attach; a
        policy this run cannot take (an event none of its forecasters raises) is refused with an alert."""
        try:
            rules = parse_policy(json.loads(value)["policy"], source="attached policy")
            _check_events(rules, set(self.forecasters), "attached policy")
        except (WorkbenchError, ValueError, KeyError, TypeError) as exc:
            self._alert(step, "attached_policy", f"attached policy refused: {exc}", decision)
            return
        names = {rule.name for rule in rules}
        replaced = [s.rule.name for s in self.rules if s.rule.name in names]
        self.rules = [s for s in self.rules if s.rule.name not in names] + [_RuleState(rule) for rule in rules]
        added = ", ".join(rule.name for rule in rules)
        message = f"attached policy taken: {added}" + (f" (replacing {', '.join(replaced)})" if replaced else "")
        self._record(step, "attach", "attached policy", message, decision)
        self.tracker.set_tags({ATTACHED_AT_TAG: json.dumps({"step": step, "rules": sorted(names)})})
        self._report_missing(step, decision, final=False)  # a rule on a key this run does not log says so now

    # --- output -----------------------------------------------------------------------------------------

    def _record(self, step: int, kind: str, name: str, message: str, decision: Decision) -> Firing:
        firing = Firing(step, kind, name, message)
        self.firings.append(firing)
        line = f"policy, step {step}: {kind}: {message}"
        decision.alerts.append(line)
        self._print(line)
        return firing

    def _print(self, line: str) -> None:
        if self.console:
            from tqdm.auto import tqdm

            tqdm.write(line, file=sys.stderr)


def _group(key: str) -> str:
    return key.rpartition("/")[0]


def request_stop(run_id: str, tracking_uri: str | None = None) -> str:
    """Ask a RUNNING run to stop at its next step boundary (`workbench stop`, the app's button). Returns the URI."""
    return _request(run_id, tracking_uri, STOP_REQUEST_TAG, "stop")


def request_checkpoint(run_id: str, tracking_uri: str | None = None) -> str:
    """Ask a RUNNING run to save a checkpoint at its next logged step (the app's "Checkpoint now"). Returns the URI."""
    return _request(run_id, tracking_uri, CHECKPOINT_REQUEST_TAG, "checkpoint")


def attach_policy(run_id: str, text: str, tracking_uri: str | None = None, source: str = "policy") -> str:
    """Attach a policy (YAML text) to a RUNNING run (`workbench attach`, the app): validated here with the parser a
    run uses, kept with the run as the artifact `policies/attached_<time>.yaml`, and taken by the run's engine
    at its next poll, where its rules join (or, by name, replace) the run's. Returns the artifact's path."""
    rules = parse_policy(text, source)
    if not rules:
        raise WorkbenchError(f"{source}: no rules to attach")
    value = json.dumps({"requested": datetime.now().isoformat(timespec="milliseconds"), "policy": text})
    if len(value) > ATTACH_MAX_CHARS:
        raise WorkbenchError(f"{source}: {len(text)} characters, too long to attach (about {ATTACH_MAX_CHARS} at most)")
    client, _ = _running(run_id, tracking_uri, "attach a policy to")
    artifact = f"policies/attached_{datetime.now().strftime('%Y%m%d-%H%M%S-%f')}.yaml"
    client.log_text(run_id, text, artifact)
    client.set_tag(run_id, ATTACH_REQUEST_TAG, value)
    return artifact


def _request(run_id: str, tracking_uri: str | None, tag: str, what: str) -> str:
    client, uri = _running(run_id, tracking_uri, what)
    client.set_tag(run_id, tag, f"requested {datetime.now().isoformat(timespec='milliseconds')}")
    return uri


def _running(run_id: str, tracking_uri: str | None, what: str) -> tuple[Any, str]:
    """(client, resolved URI) of a run that must be RUNNING for `what` to make sense."""
    client, run, uri = open_run(run_id, tracking_uri)
    if run.info.status != "RUNNING":
        raise WorkbenchError(f"run {run_id}: is {run.info.status}, not RUNNING; nothing to {what}")
    return client, uri
