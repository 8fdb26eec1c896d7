"""Gold-free early warning for RL runs: detectors that read only what a real run logs, and the gold onset they
are scored against.

A real RLHF/RLVR run has no gold signal; that is what makes reward hacking hard to see. A `DriftDetector` watches
one logged series (KL to the reference, policy entropy, answer length, the proxy reward's spread, a layer's
geometry) and fires when it has drifted from where the run started. It is a `Forecaster` (analysis/forecast.py),
so policies can alert, checkpoint or stop on it and `workbench backtest` replays it. Which series and how far is
chosen on a calibration suite and scored on runs it never saw (`benchmarks/early_warning.py`).

`gold_onset` is the scoring side, and only that: the first step where held-out gold accuracy is 10 % under its
running peak while the proxy reward is still rising (Gao et al. 2023: proxy up, gold down).
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from analysis.events import ForecastEvent

GOLD_DROP = 0.1  # relative fall of gold accuracy under its running peak that counts as the damage
PROXY_WINDOW = 3  # logged values over which the proxy's least-squares slope must be positive: "still rising"


def gold_onset(
    steps: Sequence[int], gold: Sequence[float], proxy: Sequence[float], drop: float = GOLD_DROP
) -> int | None:
    """The first step where `gold` is `drop` (relative) under its running peak while `proxy` is still rising (its
    slope over the last `PROXY_WINDOW` logged values, this one included, is positive); None if never. The three
    sequences are aligned, one value per logged step."""
    peak = -math.inf
    for i, (step, value) in enumerate(zip(steps, gold, strict=True)):
        peak = max(peak, value)
        window = proxy[max(0, i - PROXY_WINDOW + 1) : i + 1]
        rising = len(window) == PROXY_WINDOW and np.polyfit(np.arange(PROXY_WINDOW), window, 1)[0] > 0
        if peak > 0 and value <= (1 - drop) * peak and rising:
            return int(step)
    return None


_LAYER_WILDCARD = re.compile(r"^(.*)/layer_\*$")


class DriftDetector:
    """Fires `name` when `metric` has drifted from its start: its statistic moved `threshold` from the baseline (the
    mean of its first `baseline` logged values) in `direction` ('rise', 'fall' or 'either'), on `sustain` logged
    values running.

    The statistic is the series itself (`transform='level'`) or its second difference between consecutive logged
    values (`'acceleration'`: a KL that speeds up). `scale='relative'` measures the move as a share of the
    baseline's magnitude (entropy, length, geometry), `'absolute'` in the metric's own units (KL starts at 0).
    A `metric` ending in `/layer_*` watches every layer's series and fires on the first that drifts (per-layer
    geometry: which layer moves first is not known in advance); the event names it. Several names separated by
    `|` watch whichever the run logs (`kl|objective/kl`: GRPO's and PPO's name for the same KL).

    `requires` names a key the run must have logged (at this step or before) for the detector to read anything:
    `'reward'` confines it to RL runs, where geometry that drifts is news, not what training is for.

    A metric the run never logs, by the `baseline`-th log of the proxy `reward`, raises: the policy engine then
    disables the detector and its rules with an alert that lists the run's closest keys, and the run goes on.
    Active from firing to the end of the run: drift does not heal by itself.
    """

    def __init__(
        self,
        name: str,
        metric: str,
        direction: str,
        threshold: float,
        scale: str = "relative",
        transform: str = "level",
        baseline: int = 3,
        sustain: int = 2,
        rule: str | None = None,
        requires: str | None = None,
    ) -> None:
        if direction not in ("rise", "fall", "either"):
            raise ValueError(f"direction must be 'rise', 'fall' or 'either', got {direction!r}")
        if scale not in ("relative", "absolute") or transform not in ("level", "acceleration"):
            raise ValueError(f"scale {scale!r}, transform {transform!r}: want relative|absolute, level|acceleration")
        self.name, self.metric, self.direction, self.threshold = name, metric, direction, threshold
        self.scale, self.transform, self.baseline, self.sustain, self.rule = scale, transform, baseline, sustain, rule
        self.requires, self._required_seen = requires, requires is None
        self.fired: ForecastEvent | None = None
        self._values: dict[str, list[float]] = {}  # key -> its logged values (the statistic's input)
        self._stats: dict[str, list[float]] = {}  # key -> statistic values, the first `baseline` of them the base
        self._streak: dict[str, int] = {}
        self._rewards_seen = 0

    def observe(self, step: int, metrics: Mapping[str, float]) -> ForecastEvent | None:
        self._required_seen |= self.requires in metrics
        if not self._required_seen:
            return None
        keys = self._keys(metrics)
        if not keys and "reward" in metrics:
            self._rewards_seen += 1
            if self._rewards_seen >= self.baseline and not self._values:
                raise ValueError(self._missing_message(metrics))
        if self.fired is not None:
            return None
        for key in keys:
            value = metrics[key]
            if not math.isfinite(value):
                continue
            values = self._values.setdefault(key, [])
            values.append(value)
            if self.transform == "acceleration":
                if len(values) < 3:
                    continue
                value = values[-1] - 2 * values[-2] + values[-3]
            stats = self._stats.setdefault(key, [])
            stats.append(value)
            moved = self._moved(stats)
            self._streak[key] = self._streak.get(key, 0) + 1 if moved is not None and moved >= self.threshold else 0
            if self._streak[key] >= self.sustain:
                details = {"signal": key, "moved": round(float(moved), 4), "threshold": self.threshold}
                self.fired = ForecastEvent(self.name, step, {**details, **({"rule": self.rule} if self.rule else {})})
                return self.fired
        return None

    def active(self, step: int) -> bool:
        return self.fired is not None

    def _keys(self, metrics: Mapping[str, float]) -> list[str]:
        keys = []
        for name in self.metric.split("|"):
            wildcard = _LAYER_WILDCARD.match(name)
            if wildcard:
                prefix = wildcard[1] + "/layer_"
                keys += sorted(k for k in metrics if k.startswith(prefix) and k[len(prefix) :].isdigit())
            elif name in metrics:
                keys.append(name)
        return keys

    def _moved(self, stats: list[float]) -> float | None:
        """How far the latest statistic has moved from the baseline in `direction` (None while still the base)."""
        if len(stats) <= self.baseline:
            return None
        base = float(np.mean(stats[: self.baseline]))
        delta = stats[-1] - base
        if self.scale == "relative":
            if base == 0:
                return None
            delta /= abs(base)
        return {"rise": delta, "fall": -delta, "either": abs(delta)}[self.direction]

    def _missing_message(self, metrics: Mapping[str, float]) -> str:
        wanted = self.metric.split("|")[0].replace("/layer_*", "/layer_00")
        close = difflib.get_close_matches(wanted, list(metrics), n=3, cutoff=0.4)
        hint = f"; closest keys it logs: {', '.join(close)}" if close else ""
        return f"{self.metric} is not logged: detector '{self.name}' reads it, and this run does not log it{hint}"


class AnyOf:
    """Fires `name` when the first of several detectors fires (their details, and which one, in the event).

    A member whose metric the run does not log (it raises, as `DriftDetector` does) is dropped and the others go
    on: GRPO without a KL penalty logs no KL, and its entropy and geometry are still watched. Only when every
    member is dropped does it raise, which disables it with an alert listing why.
    """

    def __init__(self, name: str, members: Sequence[DriftDetector], rule: str | None = None) -> None:
        self.name, self.members, self.rule = name, list(members), rule
        self.fired: ForecastEvent | None = None
        self._dropped: list[str] = []

    def observe(self, step: int, metrics: Mapping[str, float]) -> ForecastEvent | None:
        if self.fired is not None:
            return None
        for member in list(self.members):
            try:
                event = member.observe(step, metrics)
            except ValueError as exc:
                self.members.remove(member)
                self._dropped.append(str(exc))
                if not self.members:
                    raise ValueError("; ".join(self._dropped)) from None
                continue
            if event is not None:
                details = {"detector": member.name, **event.details, **({"rule": self.rule} if self.rule else {})}
                self.fired = ForecastEvent(self.name, step, details)
                return self.fired
        return None

    def active(self, step: int) -> bool:
        return self.fired is not None


@dataclass(frozen=True)
class Family:
    """A kind of drift detector: what it watches and how; the failure suite (benchmarks/early_warning.py) picks its
    threshold from `thresholds` on calibration runs."""

    name: str  # the detector's name, in the events of `collapse`
    label: str
    metric: str
    direction: str
    scale: str
    transform: str
    thresholds: tuple[float, ...]
    kind: str  # "rl statistics" or "geometry"

    def detector(self, threshold: float, requires: str | None = None) -> DriftDetector:
        return DriftDetector(
            self.name, self.metric, self.direction, threshold, scale=self.scale, transform=self.transform,
            requires=requires,
        )  # fmt: skip


RELATIVE = (0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0)
KL_LEVELS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 4.0, 8.0)  # nats per answer
KL_ACCELERATIONS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
FAMILIES = (
    Family("kl_level", "KL level", "kl|objective/kl", "rise", "absolute", "level", KL_LEVELS, "rl statistics"),
    Family(
        "kl_acceleration", "KL acceleration", "kl|objective/kl", "rise", "absolute", "acceleration",
        KL_ACCELERATIONS, "rl statistics",
    ),
    Family("entropy_fall", "entropy fall", "entropy", "fall", "relative", "level", RELATIVE[:8], "rl statistics"),
    Family("entropy_drift", "entropy drift", "entropy", "either", "relative", "level", RELATIVE, "rl statistics"),
    Family(
        "length_rise", "answer length rise", "completions/mean_length", "rise", "relative", "level", RELATIVE,
        "rl statistics",
    ),
    Family(
        "reward_spread_drift", "reward spread drift", "reward_std", "either", "relative", "level", RELATIVE,
        "rl statistics",
    ),
    Family("reward_rise", "proxy reward rise", "reward", "rise", "relative", "level", RELATIVE, "rl statistics"),
    Family(
        "answer_knn_gap", "answers' kNN gap rise, any layer", "geom/answer_knn_gap/layer_*", "rise", "relative",
        "level", RELATIVE, "geometry",
    ),
    Family(
        "answer_eff_rank", "answers' eff. rank drift, any layer", "geom/answer_eff_rank/layer_*", "either",
        "relative", "level", RELATIVE, "geometry",
    ),
    Family(
        "eff_rank_drift", "eff. rank drift, any layer", "geom/eff_rank/layer_*", "either", "relative", "level",
        RELATIVE, "geometry",
    ),
    Family(
        "twonn_drift", "TwoNN drift, any layer", "geom/lid_twonn/layer_*", "either", "relative", "level", RELATIVE,
        "geometry",
    ),
    Family(
        "mle_drift", "MLE LID drift, any layer", "geom/lid_mle/layer_*", "either", "relative", "level", RELATIVE,
        "geometry",
    ),
)  # fmt: skip

# What the shipped `collapse` adds to `CollapseDetector`'s rules on RL runs: family name -> threshold, as the failure
# suite's calibration runs chose it (benchmarks/early_warning.py prints them). Empty: the three it chose on
# 2026-12-08 flagged 2 of 7 held-out failure runs in time and stopped 2 of 4 held-out healthy ones
# (docs/early-warning.md), too many false alarms for a default every RL run carries.
CALIBRATED: dict[str, float] = {}
