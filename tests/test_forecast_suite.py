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

    forecast_suite.cmd_run(argparse.Namespace(jobs=2))
    assert sorted(forecast_suite.finished_runs()) == ["tiny-s0", "tiny-s1"]
    forecast_suite.cmd_run(argparse.Namespace(jobs=2))  # resumable: nothing is trained twice
    assert len(forecast_suite.finished_runs()) == 2

    out = tmp_path / "results"
    forecast_suite.cmd_report(argparse.Namespace(out=out))
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
