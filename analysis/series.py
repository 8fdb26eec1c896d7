"""Landmarks in a logged metric series (steps ascending, values aligned)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def first_step_at_least(steps: Sequence[int], values: Sequence[float], threshold: float) -> int | None:
    """First step whose value is >= threshold (e.g. test accuracy ``analysis.forecast.GROKKED_ACC``: the
    grokking step); None if never."""
    for step, value in zip(steps, values, strict=True):
        if value >= threshold:
            return int(step)
    return None


def largest_change(steps: Sequence[int], values: Sequence[float], start_step: int = 0) -> tuple[int, float] | None:
    """The step ending the largest relative change between consecutive points at or after `start_step`.

    Returns (step, change relative to the previous value), or None with fewer than two finite points there.
    """
    steps_arr, values_arr = np.asarray(steps), np.asarray(values, dtype=float)
    keep = (steps_arr >= start_step) & np.isfinite(values_arr)
    steps_arr, values_arr = steps_arr[keep], values_arr[keep]
    if len(values_arr) < 2:
        return None
    previous = values_arr[:-1]
    relative = np.diff(values_arr) / np.where(previous == 0, np.nan, np.abs(previous))
    if np.all(np.isnan(relative)):
        return None
    i = int(np.nanargmax(np.abs(relative)))
    return int(steps_arr[i + 1]), float(relative[i])
