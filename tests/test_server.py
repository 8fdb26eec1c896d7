"""Server-backed tracking: `mlflow server` over PostgreSQL (Debian's `postgresql` package) on 127.0.0.1.

The set-up docs/scale-out.md describes, started by the `mlflow_server` fixture (tests/conftest.py). The grokking
job, `workbench analyze`, `workbench backtest`, `workbench ls` and the app run against the server's URL,
unchanged.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import DEFAULT_CONFIG, TINY_GROKKING
from mlflow import MlflowClient
from streamlit.testing.v1 import AppTest

from workbench.cli import main
from workbench.runs import bulk_metric_histories, run_table
from workbench.snapshots import load_snapshots

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_grokking_job_analyze_backtest_ls_and_app_work_against_a_postgres_backed_server(
    mlflow_server, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)  # nothing may land beside the test: artifacts go through the server
    uri = mlflow_server
    experiment = "served-grokking"  # the server is shared by the session's tests
    overrides = [*TINY_GROKKING, f"tracking.uri={uri}", f"tracking.experiment={experiment}"]
    assert main(["run", DEFAULT_CONFIG, *overrides]) == 0
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
    assert len(client.get_metric_history(run_id, "eval/acc")) == 5  # steps 0, 5, ..., 20
    assert load_snapshots(run_id, uri).steps == [0, 10, 20]  # artifacts through the server's proxy

    # Offline geometry: a feature the run did not log online, written back to the same run over HTTP.
    assert main(["analyze", run_id, "--features", "pr", "--tracking-uri", uri]) == 0
    assert [m.step for m in client.get_metric_history(run_id, "geom/pr/layer_01")] == [0, 10, 20]
    assert main(["analyze", run_id, "--features", "pr", "--tracking-uri", uri]) == 0  # idempotent
    assert len(client.get_metric_history(run_id, "geom/pr/layer_01")) == 3

    policy = tmp_path / "policy.yaml"
    rule = "{name: memorised, when: {metric: train/acc, mode: max, stopping_threshold: 0.99}, actions: [stop]}"
    policy.write_text(f"- {rule}\n")
    capsys.readouterr()
    assert main(["backtest", str(policy), run_id, "--tracking-uri", uri]) == 0
    assert run_id[:8] in capsys.readouterr().out
    assert main(["ls", "--tracking-uri", uri]) == 0
    assert run_id[:8] in capsys.readouterr().out

    assert [row["run_id"] for row in run_table(uri, experiment)] == [run_id]
    histories = bulk_metric_histories([run_id], "geom/lid_twonn/", uri)[run_id]
    assert sorted(histories) == ["geom/lid_twonn/layer_00", "geom/lid_twonn/layer_01"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    app = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    app.query_params.update(page="geometry", runs=run_id)
    app.run()
    assert not app.exception and not app.error
