import math

import numpy as np
import pytest
from mlflow import MlflowClient

import workbench.analyze as analyze
from workbench.analyze import analyze_run
from workbench.cli import main
from workbench.geometry import FEATURE_METRICS, compute_geometry


def plane(n=600, d=3, D=16, seed=0):
    """A d-dimensional linear cloud in D dimensions, with a 1e-3 noise floor so the spectrum has a tail."""
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, d)) @ rng.normal(size=(d, D)) + 1e-3 * rng.normal(size=(n, D))).astype(np.float32)


def test_every_feature_logs_exactly_its_metric_names_with_finite_values():
    values, problems, _ = compute_geometry(plane(), list(FEATURE_METRICS), local_neighbors=30, tda_landmarks=100)
    assert problems == []
    assert set(values) == {m for metrics in FEATURE_METRICS.values() for m in metrics}
    assert all(math.isfinite(v) for v in values.values())
    assert values["lid_twonn"] == pytest.approx(3, rel=0.15) and values["lid_mle"] == pytest.approx(3, rel=0.15)
    assert values["lid_lpca"] == 3 and values["eff_rank"] < 16


def test_nan_rows_are_dropped_and_said_never_logged_as_nan():
    x = plane()
    x[:5] = np.nan
    values, problems, _ = compute_geometry(x, ["lid_twonn", "lid_mle", "eff_rank"])
    assert "5 of 600 points have NaN/inf" in problems[0]
    assert values["lid_twonn"] == pytest.approx(compute_geometry(plane()[5:], ["lid_twonn"])[0]["lid_twonn"])
    values, problems, _ = compute_geometry(np.full((50, 4), np.nan), ["lid_twonn", "eff_rank"])
    assert values == {} and len(problems) == 3


def test_too_few_points_skips_only_the_feature_that_needs_more():
    values, problems, _ = compute_geometry(plane(n=30), ["lid_twonn", "lid_mle", "lid_local"], local_neighbors=64)
    assert set(values) == {"lid_twonn", "lid_mle"}
    assert len(problems) == 1 and problems[0].startswith("lid_local:") and "got 30" in problems[0]


@pytest.fixture
def tiny_run(run_grokking):
    return run_grokking().info.run_id


def history_steps(uri, run_id, key):
    return [m.step for m in MlflowClient(uri).get_metric_history(run_id, key)]


def test_analyze_logs_every_snapshot_once_and_a_second_call_adds_nothing(tracking_uri, tiny_run):
    report = analyze_run(tiny_run, ["lid_local", "tda", "lid_twonn"], ["layer_01"], tracking_uri)
    assert report.logged == 3 * (2 + 6)  # 3 snapshots x (lid_local + median, six tda metrics); twonn was online
    assert report.skipped == 3
    assert history_steps(tracking_uri, tiny_run, "geom/lid_local/layer_01") == [0, 10, 20]
    assert history_steps(tracking_uri, tiny_run, "geom/tda_h1_total/layer_01") == [0, 10, 20]
    assert history_steps(tracking_uri, tiny_run, "geom/lid_twonn/layer_01") == [0, 10, 20]
    again = analyze_run(tiny_run, ["lid_local", "tda"], ["1"], tracking_uri)
    assert again.logged == 0 and again.skipped == 6
    assert history_steps(tracking_uri, tiny_run, "geom/lid_local/layer_01") == [0, 10, 20]


def test_interrupted_analyze_keeps_its_work_and_resumes(tracking_uri, tiny_run, monkeypatch):
    real, calls = analyze.compute_geometry, []

    def interrupt_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(analyze, "compute_geometry", interrupt_on_second)
    with pytest.raises(KeyboardInterrupt):
        analyze_run(tiny_run, ["pr"], ["layer_01"], tracking_uri)
    assert history_steps(tracking_uri, tiny_run, "geom/pr/layer_01") == [0]
    monkeypatch.setattr(analyze, "compute_geometry", real)
    resumed = analyze_run(tiny_run, ["pr"], ["layer_01"], tracking_uri)
    assert resumed.logged == 2 and resumed.skipped == 1
    assert history_steps(tracking_uri, tiny_run, "geom/pr/layer_01") == [0, 10, 20]


def test_analyze_cli_reports_bad_input_on_one_line(tracking_uri, tiny_run, capsys):
    capsys.readouterr()
    cases = [
        (["analyze", "0" * 32], "not found"),
        (["analyze", tiny_run, "--layers", "layer_07"], "--layers: layer_07 not in this run"),
        (["analyze", tiny_run, "--features", "lid_twonn,volume"], "--features: unknown ['volume']"),
    ]
    for args, expected in cases:
        assert main([*args, "--tracking-uri", tracking_uri]) == 2
        last = capsys.readouterr().err.splitlines()[-1]  # above it, at most MLflow's download progress
        assert last.startswith("workbench: error:") and expected in last


def test_analyze_cli_on_a_run_without_snapshots_exits_2(tracking_uri, run_grokking, capsys):
    run = run_grokking("snapshot.enabled=false")
    capsys.readouterr()
    assert main(["analyze", run.info.run_id, "--tracking-uri", tracking_uri]) == 2
    assert "no snapshots found" in capsys.readouterr().err


def test_analyze_cli_logs_and_summarises(tracking_uri, tiny_run, capsys):
    assert main(["analyze", tiny_run, "--features", "eff_rank,pr", "--tracking-uri", tracking_uri]) == 0
    out = capsys.readouterr().out
    assert "logged 6 values, 6 already there" in out  # pr is new on 2 layers x 3 steps; eff_rank was online


def test_compute_geometry_times_each_feature():
    result = compute_geometry(plane(), ["lid_twonn", "lid_mle", "pr"])
    assert set(result.seconds) == {"lid_twonn", "lid_mle", "pr"} and all(t >= 0 for t in result.seconds.values())


def test_online_geometry_over_budget_moves_the_costliest_features_offline(tracking_uri, run_grokking):
    with pytest.warns(UserWarning, match=r"over snapshot.geometry_budget_s=1e-09; .* no longer computed online"):
        run = run_grokking("snapshot.geometry=[lid_twonn, lid_local, tda]", "snapshot.geometry_budget_s=1e-9")
    offline = run.data.tags["workbench.geometry_offline"].split(",")
    assert set(offline) == {"lid_twonn", "lid_local", "tda"}  # a budget nothing fits in: all move offline
    assert history_steps(tracking_uri, run.info.run_id, "geom/lid_twonn/layer_01") == [0]  # logged once, then not
    later = analyze_run(run.info.run_id, offline, ["layer_01"], tracking_uri)
    assert later.skipped == 3  # the three features of step 0
    assert history_steps(tracking_uri, run.info.run_id, "geom/tda_h1_total/layer_01") == [0, 10, 20]
