from pathlib import Path

from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[1]


def test_app_lists_runs_and_plots_accuracy_and_geometry(tracking_uri, run_grokking, monkeypatch):
    run_grokking()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    app = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    assert not app.exception
    assert len(app.dataframe) == 1 and len(app.dataframe[0].value) == 1
    charts = app.get("plotly_chart")
    assert len(charts) == 2  # accuracy, and the chosen geometry feature per layer
    assert "eff_rank" in app.selectbox[1].options


def test_app_on_an_empty_store_says_how_to_start(tracking_uri, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    app = AppTest.from_file(str(ROOT / "app.py"), default_timeout=30).run()
    assert not app.exception
    assert "workbench run configs/grokking.yaml" in app.info[0].value
