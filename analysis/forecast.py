"""Forecasters: pure functions of a run's metric series, so they run identically online and in backtests.

A forecaster is fed one logged step at a time (`observe(step, metrics)`, the metrics logged at that step)
and returns a `ForecastEvent` the step it fires. `active(step)` says whether its forecast still holds;
the policy engine's `hold` action uses it to suppress stop rules while, e.g., grokking is forecast.

`FORECASTERS` holds the forecasters the workbench ships; `CANDIDATES` the grokking forecasters that
`benchmarks/forecast_suite.py` compares the shipped one with (hit rate, lead, false alarms: the table is in
`docs/forecasting.md`, the figures in `benchmarks/results/forecast_suite.md`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping

import numpy as np

from analysis.early_warning import CALIBRATED, FAMILIES, AnyOf
from analysis.events import Forecaster, ForecastEvent

# The grokking thresholds, defined here and only here: import them from this module.
MEMORISED_ACC = 0.99  # train accuracy that counts as memorised
GROKKED_ACC = 0.5  # test accuracy in the middle of the jump: the grokking step
GENERALISED_ACC = 0.95  # test accuracy that counts as generalised: the jump is over


_LAYER = re.compile(r"^(.*)/layer_(\d+)$")


def resolve_last_layer(pattern: str, keys: Mapping[str, float]) -> str | None:
    """`geom/lid_twonn/layer_last` -> the highest-numbered `geom/lid_twonn/layer_NN` among ``keys``."""
    if not pattern.endswith("/layer_last"):
        return pattern
    prefix = pattern.removesuffix("/layer_last")
    layers = [(int(m[2]), key) for key in keys if (m := _LAYER.match(key)) and m[1] == prefix]
    return max(layers)[1] if layers else None


class PrecursorForecaster:
    """Grokking forecast from one series: after memorisation, the series leaves its plateau extreme.

    The run is *memorised* at the first step with ``train/acc >= MEMORISED_ACC`` while
    ``eval/acc < GROKKED_ACC``. From then on the forecaster tracks the extreme of ``metric`` (its running peak
    for ``direction='fall'``, trough for 'rise') and fires once the metric has moved ``move`` (relative) away
    from it, and past its value at memorisation, on ``sustain`` consecutive observations, provided test
    accuracy has never reached ``GROKKED_ACC`` in the run (afterwards it is no forecast, even if accuracy dips
    back). ``rule``, when given, names the exact rule in every event's details, so a logged forecast says which
    version of a forecaster fired. Any series can be plugged in, so
    geometry, test loss and weight norm are compared under one rule (``CANDIDATES``).

    ``heldout_labels=False`` makes it a label-free forecaster that a run without held-out labels can use: it
    never reads ``eval/acc`` (memorised means train accuracy alone; nothing stops it after the jump but its
    own firing), and it raises, which disables it and the rules on it with an alert, when its series is
    missing from the first ``sustain`` logged steps with a train accuracy (a stage without a train/held-out
    split, or a run that logs no held-out states).

    The predicted onset is ``fire + onset_ratio * (fire - memorised)``: ``onset_ratio`` is the ratio of the
    remaining plateau to the elapsed one at the fire step (the shipped value is the suite's median). The
    forecast stays active until test accuracy reaches ``GENERALISED_ACC`` or ``expire_ratio`` times the
    elapsed plateau has passed without it (a forecast that does not come true must not hold stop rules
    forever).
    """

    def __init__(
        self,
        name: str,
        metric: str,
        direction: str = "fall",
        move: float = 0.15,
        sustain: int = 3,
        onset_ratio: float = 1.0,
        expire_ratio: float = 3.0,
        rule: str | None = None,
        heldout_labels: bool = True,
    ) -> None:
        if direction not in ("fall", "rise"):
            raise ValueError(f"direction must be 'fall' or 'rise', got {direction!r}")
        self.name = name
        self.metric = metric
        self.direction = direction
        self.move = move
        self.sustain = sustain
        self.onset_ratio = onset_ratio
        self.expire_ratio = expire_ratio
        self.rule = rule
        self.heldout_labels = heldout_labels
        self._without_signal = 0  # logged steps with a train accuracy but not the series
        self.memorised: int | None = None
        self.fired: ForecastEvent | None = None
        self.generalised = False
        self._key: str | None = None
        self._extreme = math.nan
        self._at_memorisation = math.nan
        self._streak = 0
        self._eval_acc = 0.0
        self._grokked = False  # test accuracy has reached GROKKED_ACC at some step

    def observe(self, step: int, metrics: Mapping[str, float]) -> ForecastEvent | None:
        if self.heldout_labels:
            self._eval_acc = metrics.get("eval/acc", self._eval_acc)
            self._grokked |= self._eval_acc >= GROKKED_ACC
            self.generalised |= self._eval_acc >= GENERALISED_ACC
        else:
            self._check_logged(metrics)
        if self.memorised is None:
            if metrics.get("train/acc", 0.0) >= MEMORISED_ACC and self._eval_acc < GROKKED_ACC:
                self.memorised = step
            else:
                return None
        if self._key is None and resolve_last_layer(self.metric, metrics) in metrics:
            self._key = resolve_last_layer(self.metric, metrics)  # fixed at its first logged step
        value = metrics.get(self._key) if self._key else None
        if value is None or not math.isfinite(value) or self.fired is not None:
            return None
        sign = 1.0 if self.direction == "fall" else -1.0
        if math.isnan(self._extreme):
            self._at_memorisation = value
        if math.isnan(self._extreme) or sign * value > sign * self._extreme:
            self._extreme = value
        moved = sign * (self._extreme - value) / abs(self._extreme) if self._extreme else 0.0
        # Past its value at memorisation too: a series that first ran away (test loss of a run without weight
        # decay climbs for the whole run) and then drops back part of the way is not a precursor.
        past_start = sign * (self._at_memorisation - value) > 0
        self._streak = self._streak + 1 if moved >= self.move and past_start else 0
        if self._streak < self.sustain or self._grokked:
            return None
        predicted = step + self.onset_ratio * (step - self.memorised)
        details = {
            "signal": self._key,
            "memorised_step": float(self.memorised),
            "predicted_onset_step": round(predicted),
            "moved_from_extreme": round(moved, 4),
        }
        self.fired = ForecastEvent(self.name, step, {**details, **({"rule": self.rule} if self.rule else {})})
        return self.fired

    def _check_logged(self, metrics: Mapping[str, float]) -> None:
        if self._key is not None or "train/acc" not in metrics:
            return
        if resolve_last_layer(self.metric, metrics) in metrics:
            self._key = resolve_last_layer(self.metric, metrics)
            return
        self._without_signal += 1
        if self._without_signal >= self.sustain:
            raise ValueError(
                f"{self.metric} is not logged: this label-free forecast reads it, and this run does not log it (the "
                "grokking stage logs heldout/* at every evaluation, embed/fourier_gini with every snapshot)"
            )

    def active(self, step: int) -> bool:
        if self.fired is None or self.generalised:
            return False
        elapsed = self.fired.step - (self.memorised or 0)
        return step <= self.fired.step + self.expire_ratio * max(elapsed, 1)


class CollapseDetector:
    """Fires `collapse` when training goes bad in one of these three ways, whichever comes first, reading only
    what a real run logs (no gold signal):

    * representation collapse: a layer's effective rank (RankMe, Garrido et al. 2023) falls below
      ``rank_fraction`` of its first value on ``sustain`` consecutive snapshots;
    * policy-entropy collapse: on an RL run (one that logs a proxy ``reward``), TRL's ``entropy`` below
      ``entropy_fraction`` of its first logged value. Relative, because the entropy a healthy policy keeps depends
      on the task (the entropy column of the table in docs/rl.md has it for the built-in task), and RL-only,
      because falling entropy on demonstrations is what supervised fine-tuning is for;
    * KL blow-up: ``kl`` (or ``objective/kl``) above ``kl_ceiling``.

    These see a failure once it is there. The shipped `collapse` forecaster (`FORECASTERS`) adds the early-warning
    drift detectors calibrated on the failure suite (analysis/early_warning.py). Reward hacking seen through a gold
    signal is `RewardHackingAudit`'s, an offline audit. Active from firing to the end of the run: a collapse does
    not heal by itself.
    """

    name = "collapse"
    PROXY_KEYS = ("reward",)
    KL_KEYS = ("kl", "objective/kl")

    def __init__(
        self, rank_fraction: float = 0.2, sustain: int = 2, entropy_fraction: float = 0.1, kl_ceiling: float = 10.0
    ) -> None:
        self.rank_fraction = rank_fraction
        self.sustain = sustain
        self.entropy_fraction = entropy_fraction
        self._entropy_first: float | None = None
        self.kl_ceiling = kl_ceiling
        self.fired: ForecastEvent | None = None
        self._rank_first: dict[str, float] = {}
        self._rank_streak: dict[str, int] = {}

    def observe(self, step: int, metrics: Mapping[str, float]) -> ForecastEvent | None:
        if self.fired is not None:
            return None
        found = self._check(metrics)
        if found is None:
            return None
        kind, details = found
        self.fired = ForecastEvent(self.name, step, {"kind": kind, **details})
        return self.fired

    def active(self, step: int) -> bool:
        return self.fired is not None

    def _check(self, metrics: Mapping[str, float]) -> tuple[str, dict[str, float | str]] | None:
        for key, value in metrics.items():
            if key.startswith("geom/eff_rank/") and math.isfinite(value):
                first = self._rank_first.setdefault(key, value)
                low = value < self.rank_fraction * first
                self._rank_streak[key] = self._rank_streak.get(key, 0) + 1 if low else 0
                if self._rank_streak[key] >= self.sustain:
                    return "representation", {"metric": key, "value": value, "first": first}
        entropy = metrics.get("entropy")
        if entropy is not None and math.isfinite(entropy) and any(k in metrics for k in self.PROXY_KEYS):
            first = self._entropy_first = entropy if self._entropy_first is None else self._entropy_first
            if entropy < self.entropy_fraction * first:
                return "entropy", {"metric": "entropy", "value": entropy, "first": first}
        for key in self.KL_KEYS:
            if metrics.get(key, -math.inf) > self.kl_ceiling:
                return "kl", {"metric": key, "value": metrics[key]}
        return None


class RewardHackingAudit:
    """Fires `reward_hacking_audit` when, over the last ``window`` observations, the proxy reward (``reward``,
    TRL's name) trends up while the gold check (``gold/reward`` or ``gold/accuracy``) trends down and sits
    ``gold_drop`` below its running peak (Gao et al. 2023, "Scaling laws for reward model overoptimization": proxy
    up, gold down).

    An offline audit, named as such: it reads a gold signal that real RL runs do not have, so it says afterwards
    (`workbench backtest`, or a run on the built-in task) what happened, and no live policy relies on it by default.
    The gold-free warning is the `collapse` forecaster.
    """

    name = "reward_hacking_audit"
    PROXY_KEYS = ("reward",)
    GOLD_KEYS = ("gold/reward", "gold/accuracy")

    def __init__(self, window: int = 5, gold_drop: float = 0.1) -> None:
        self.window = window
        self.gold_drop = gold_drop
        self.fired: ForecastEvent | None = None
        self._proxy: list[float] = []
        self._gold: list[float] = []
        self._gold_peak = -math.inf

    def observe(self, step: int, metrics: Mapping[str, float]) -> ForecastEvent | None:
        if self.fired is not None:
            return None
        proxy = next((metrics[k] for k in self.PROXY_KEYS if k in metrics), None)
        gold = next((metrics[k] for k in self.GOLD_KEYS if k in metrics), None)
        if proxy is None or gold is None:
            return None
        self._proxy = (self._proxy + [proxy])[-self.window :]
        self._gold = (self._gold + [gold])[-self.window :]
        self._gold_peak = max(self._gold_peak, gold)
        if len(self._gold) < self.window:
            return None
        proxy_slope, gold_slope = _slope(self._proxy), _slope(self._gold)
        below_peak = self._gold_peak - gold >= self.gold_drop * abs(self._gold_peak)
        if proxy_slope > 0 and gold_slope < 0 and below_peak:
            details = {"kind": "reward_hacking", "proxy_slope": proxy_slope, "gold_slope": gold_slope, "gold": gold}
            self.fired = ForecastEvent(self.name, step, details)
            return self.fired
        return None

    def active(self, step: int) -> bool:
        return self.fired is not None


def _slope(values: list[float]) -> float:
    """Least-squares slope per observation."""
    x = np.arange(len(values), dtype=float)
    return float(np.polyfit(x, np.asarray(values, dtype=float), 1)[0])


COLLAPSE_RULE = "collapse/v2: rank, entropy or KL collapse, or a drift calibrated on the failure suite"


def shipped_collapse() -> AnyOf:
    """`collapse` as the workbench ships it: `CollapseDetector`'s rules, or any drift detector the failure suite
    calibrated (`analysis.early_warning.CALIBRATED`), the latter on RL runs only (`requires='reward'`)."""
    drift = [f.detector(CALIBRATED[f.name], requires="reward") for f in FAMILIES if f.name in CALIBRATED]
    return AnyOf("collapse", [CollapseDetector(), *drift], rule=COLLAPSE_RULE)


# The forecaster the workbench ships for `event: grokking_forecast`, and its competitors on the suite.
CANDIDATES: dict[str, Callable[[], PrecursorForecaster]] = {
    f"{signal}_{round(100 * move)}": (lambda m=metric, v=move: PrecursorForecaster("grokking_forecast", m, move=v))
    for signal, metric in (
        ("eval_loss", "eval/loss"),
        ("weight_norm", "weight_norm"),
        ("lid_twonn", "geom/lid_twonn/layer_last"),
        ("lid_mle", "geom/lid_mle/layer_last"),
        ("eff_rank", "geom/eff_rank/layer_last"),
    )
    for move in (0.05, 0.15)
}

# Label-free competitors (`heldout_labels=False`): series a run without held-out labels has. heldout/* compare
# the states of held-out inputs with those of train inputs (analysis/heldout.py); weight norm and train loss
# read no held-out data at all.
LABEL_FREE_CANDIDATES: dict[str, Callable[[], PrecursorForecaster]] = {
    f"{signal}_{direction}_{round(100 * move)}": (
        lambda m=metric, d=direction, v=move: PrecursorForecaster(
            "grokking_forecast_label_free", m, direction=d, move=v, heldout_labels=False
        )
    )
    for signal, metric, directions in (
        ("knn_gap", "heldout/knn_gap/layer_last", ("fall",)),
        ("nn_agreement", "heldout/nn_agreement/layer_last", ("rise",)),
        ("lid_ratio", "heldout/lid_ratio/layer_last", ("fall", "rise")),
        ("confidence", "heldout/confidence", ("rise",)),
        ("weight_norm", "weight_norm", ("fall",)),
        ("train_loss", "train/loss", ("fall",)),
    )
    for direction in directions
    for move in (0.05, 0.15)
} | {
    # Logged with each snapshot (every 50 steps by default), so 2 observations running span as many steps as 10
    # evaluations do; it starts near its value at initialisation, so only large relative rises mean anything.
    f"fourier_gini_rise_{round(100 * move)}": (
        lambda v=move: PrecursorForecaster(
            "grokking_forecast_label_free", "embed/fourier_gini", direction="rise", move=v, sustain=2,
            heldout_labels=False,
        )
    )
    for move in (0.5, 0.75, 1.0)
}  # fmt: skip

# v1: the rule as chosen on the suite; v2: v1, and never once test accuracy has reached GROKKED_ACC in the run.
GROKKING_FORECAST_RULE = "grokking_forecast/v2: eval/loss 5% under its peak and its memorisation value, 3 evals"

GROKKING_FORECAST_LABEL_FREE_RULE = (
    "grokking_forecast_label_free/v1: embed/fourier_gini 100% over its trough and its memorisation value, 2 snapshots"
)

FORECASTERS: dict[str, Callable[[], Forecaster]] = {
    # The suite's winner (docs/forecasting.md): test loss 5 % under its post-memorisation peak and under its
    # value at memorisation, 3 evaluations running; onset_ratio is the suite's median ratio of remaining to
    # elapsed plateau at the fire step (docs/forecasting.md gives it and how it was calibrated).
    # Its `rule` string changes whenever any of these does, so logged events say which rule fired.
    "grokking_forecast": lambda: PrecursorForecaster(
        "grokking_forecast", "eval/loss", move=0.05, onset_ratio=2.4, rule=GROKKING_FORECAST_RULE
    ),
    # The label-free candidate `best_label_free` picks on the held-out suite (at most one false alarm, then the
    # most hits): it fired in all 23 held-out grokking runs and 1 of 12 controls, but before test accuracy 0.5
    # in only 5 (docs/forecasting.md); onset_ratio is its median remaining / elapsed plateau there (in-sample).
    "grokking_forecast_label_free": lambda: PrecursorForecaster(
        "grokking_forecast_label_free", "embed/fourier_gini", direction="rise", move=1.0, sustain=2,
        onset_ratio=0.16, rule=GROKKING_FORECAST_LABEL_FREE_RULE, heldout_labels=False,
    ),
    "collapse": shipped_collapse,
    "reward_hacking_audit": RewardHackingAudit,
}  # fmt: skip
