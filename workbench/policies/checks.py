"""A rule's condition compiled to a stateful check: fed one step's metrics at a time, it says whether it holds."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from workbench.policies.rules import Condition
from workbench.tracking import metric_key

if TYPE_CHECKING:
    from analysis.events import Forecaster


class Check:
    """The state of one condition over the run. `update` returns whether this step brought it new data."""

    true = False
    why = ""

    def update(self, step: int, metrics: Mapping[str, float], forecasters: Mapping[str, Forecaster]) -> bool:
        raise NotImplementedError

    def metrics(self) -> set[str]:
        return set()

    def events(self) -> set[str]:
        return set()


class _MetricCheck(Check):
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


class _EventCheck(Check):
    def __init__(self, name: str) -> None:
        self.name = name

    def events(self) -> set[str]:
        return {self.name}

    def update(self, step: int, metrics: Mapping[str, float], forecasters: Mapping[str, Forecaster]) -> bool:
        self.true = bool(forecasters[self.name].active(step))
        self.why = f"forecast '{self.name}' is active" if self.true else ""
        return True


class _Combined(Check):
    def __init__(self, children: list[Check], need_all: bool) -> None:
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


def compile_condition(condition: Condition) -> Check:
    if condition.all is not None:
        return _Combined([compile_condition(c) for c in condition.all], need_all=True)
    if condition.any is not None:
        return _Combined([compile_condition(c) for c in condition.any], need_all=False)
    if condition.event is not None:
        return _EventCheck(condition.event)
    return _MetricCheck(condition)
