"""A two-run subset of the forecast suite, end to end: train through the CLI, replay, write the report."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from conftest import TINY_GROKKING

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import forecast_suite  # noqa: E402


def test_suite_subset_trains_replays_and_reports(tmp_path, monkeypatch):
    monkeypatch.setattr(forecast_suite, "STORE", tmp_path / "store")
    monkeypatch.setattr(forecast_suite, "BUDGET", 20)
    members = [(f"tiny-s{s}", [*TINY_GROKKING, f"seed={s}"]) for s in range(2)]
    monkeypatch.setattr(forecast_suite, "SUITE", members)

    forecast_suite.cmd_run(argparse.Namespace(jobs=2, suite="calibration"))
    assert sorted(forecast_suite.finished_runs()) == ["tiny-s0", "tiny-s1"]
    forecast_suite.cmd_run(argparse.Namespace(jobs=2, suite="calibration"))  # resumable: nothing is trained twice
    assert len(forecast_suite.finished_runs()) == 2

    out = tmp_path / "results"
    forecast_suite.cmd_report(argparse.Namespace(out=out, suite="calibration"))
    result = json.loads((out / "forecast_suite.json").read_text())
    # 20 steps of p=11 never reach test acc 0.5: both runs are controls, and no forecaster may fire on them.
    assert {name: run["kind"] for name, run in result["runs"].items()} == {"tiny-s0": "control", "tiny-s1": "control"}
    for scored in result["forecasters"].values():
        assert scored["controls"] == 2 and scored["grok_runs"] == 0
        assert scored["false_alarms"] == 0 and scored["fire_steps"] == {"tiny-s0": None, "tiny-s1": None}
    for policy in ("policy_with_hold", "policy_patience_only"):
        runs = result[policy]["runs"]
        assert set(runs) == {"tiny-s0", "tiny-s1"}
        assert all(0.0 <= run["saved"] < 1.0 for run in runs.values())
    assert "| tiny-s0 | control |" in (out / "forecast_suite.md").read_text()

    # The same two runs as a held-out suite: every forecaster, the label-free ones too, scored with intervals.
    monkeypatch.setattr(forecast_suite, "HELDOUT_SUITE", members)
    forecast_suite.cmd_report(argparse.Namespace(out=out, suite="heldout"))
    heldout = json.loads((out / "forecast_heldout.json").read_text())
    assert {"shipped", "eval_loss_5", "label_free/knn_gap_fall_5", "label_free/train_loss_fall_15"} <= set(
        heldout["forecasters"]
    )
    for scored in heldout["forecasters"].values():
        assert scored["false_alarms"] == 0 and scored["false_alarm_rate_95ci"] == [0.0, 0.658]
        assert scored["hit_rate_95ci"] is None  # no grokking run: no rate to bound
    assert heldout["leave_one_out"]["label_free"]["fire_steps"] == {"tiny-s0": None, "tiny-s1": None}
    assert set(heldout["second_batch"]) >= {"shipped", "label_free/fourier_gini_rise_100"}

    # ... and as the unordered suite: the same report under its own name, with no second batch to score apart
    monkeypatch.setattr(forecast_suite, "UNORDERED_SUITE", members)
    forecast_suite.cmd_report(argparse.Namespace(out=out, suite="unordered"))
    unordered = json.loads((out / "forecast_unordered.json").read_text())
    assert unordered["forecasters"] == heldout["forecasters"] and "second_batch" not in unordered
    page = (out / "forecast_unordered.md").read_text()
    assert "unordered split" in page and "second batch" not in page and "| tiny-s1 | control |" in page


def test_wilson_interval_matches_the_closed_form_at_the_edges():
    # At k = 0 the upper end is z^2 / (n + z^2); at k = n the lower end is n / (n + z^2) (z = 1.96).
    assert forecast_suite.wilson(0, 5) == [0.0, round(1.96**2 / (5 + 1.96**2), 3)] == [0.0, 0.434]
    assert forecast_suite.wilson(13, 13) == [round(13 / (13 + 1.96**2), 3), 1.0] == [0.772, 1.0]
    assert forecast_suite.wilson(5, 10) == [0.237, 0.763]
    assert forecast_suite.wilson(0, 0) is None
