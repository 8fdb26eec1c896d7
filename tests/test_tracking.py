import os

import pytest
from mlflow import MlflowClient

from workbench.errors import WorkbenchError
from workbench.tracking import Tracker, metric_key, resolve_tracking_uri


def start(uri, **kw):
    return Tracker.start(uri, "tests", tags={"workbench.stage": "test"}, **kw)


def test_metric_names_are_sanitised_once():
    assert metric_key("geom/lid_twonn/layer_02") == "geom/lid_twonn/layer_02"
    assert metric_key("acc@1 (top,k)") == "acc_1 _top_k_"


def test_tracking_uri_precedence(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None) == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri(None) == "http://127.0.0.1:5000"
    assert resolve_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"


def test_success_is_finished_and_every_buffered_value_arrives(tracking_uri):
    with start(tracking_uri, flush_seconds=3600) as tracker:
        for step in range(1200):  # more than one 1000-value batch, fewer than one flush interval
            tracker.log_metrics({"train/loss": 1.0 / (step + 1), "weird(key)": step}, step)
    client = MlflowClient(tracking_uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(tracker.run_id, "train/loss")) == 1200
    assert len(client.get_metric_history(tracker.run_id, "weird_key_")) == 1200


def test_exception_marks_failed_and_keeps_what_was_logged(tracking_uri):
    with pytest.raises(RuntimeError), start(tracking_uri) as tracker:
        tracker.log_metrics({"train/loss": 0.5}, 3)
        raise RuntimeError("boom")
    client = MlflowClient(tracking_uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert run.data.metrics["train/loss"] == 0.5
    assert "boom" in run.data.tags["workbench.error"]


def test_ctrl_c_marks_killed_and_keeps_what_was_logged(tracking_uri):
    with pytest.raises(KeyboardInterrupt), start(tracking_uri) as tracker:
        tracker.log_metrics({"train/loss": 0.25}, 1)
        raise KeyboardInterrupt
    run = MlflowClient(tracking_uri).get_run(tracker.run_id)
    assert run.info.status == "KILLED"
    assert run.data.metrics["train/loss"] == 0.25


def test_unwritable_tracking_location_is_a_user_error(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores permission bits: use a path under a file instead
            (tmp_path / "a_file").write_text("")
            uri = f"sqlite:///{tmp_path / 'a_file' / 'mlflow.db'}"
        else:
            uri = f"sqlite:///{locked / 'mlflow.db'}"
        with pytest.raises(WorkbenchError, match=r"tracking.uri: cannot use tracking store"):
            start(uri)
    finally:
        locked.chmod(0o700)


def test_unreachable_tracking_server_fails_fast_with_one_line():
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(WorkbenchError, match=rf"tracking.uri: cannot reach MLflow server at http://127.0.0.1:{port}"):
        start(f"http://127.0.0.1:{port}")  # without the check, MLflow retries for ~2 minutes first
