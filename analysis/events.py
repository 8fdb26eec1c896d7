"""What a forecaster is: `observe(step, metrics)` returns a `ForecastEvent` the step it fires, `active(step)` says
whether its forecast still holds (analysis/forecast.py, analysis/early_warning.py implement it)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class ForecastEvent:
    """A forecaster firing: logged as `event/<name>` = 1 at `step`, with `details` in a tag."""

    name: str
    step: int
    details: dict[str, float | str] = field(default_factory=dict)


class Forecaster(Protocol):
    name: str  # the event it fires: "grokking_forecast", "collapse"

    def observe(self, step: int, metrics: Mapping[str, float]) -> ForecastEvent | None: ...

    def active(self, step: int) -> bool: ...
