"""Concurrent runs into one embedded sqlite store (benchmarks/concurrency.py): every value arrives, no call fails;
and a store that stays busy during training loses nothing.

Four writer processes start at the same moment on a fresh store, so they also race to create its schema and
their experiment, as runs launched together do; each logs params, config.yaml, metric values flushed far more
often than a stage does, stop-request polls and tag updates, then every value is read back by step.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from workbench.tracking import Tracker

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import concurrency  # noqa: E402


def test_four_concurrent_runs_on_a_fresh_sqlite_store_lose_no_value(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = concurrency.measure(writers=4, values=500, flush_seconds=0.02, directory=tmp_path)
    assert result["failure_messages"] == []
    assert result["failures"] == 0
    assert result["values_found"] == 4 * 500 and result["lost"] == 0


class BusyStore:
    """An MLflow client whose `log_batch` fails like a sqlite store locked past its busy timeout."""

    def __init__(self, client, failures: int) -> None:
        self.client, self.failures, self.calls = client, failures, 0

    def __getattr__(self, name):
        return getattr(self.client, name)

    def log_batch(self, *args, **kwargs):
        self.calls += 1
        if self.failures:
            self.failures -= 1
            raise MlflowException("(sqlite3.OperationalError) database is locked")
        return self.client.log_batch(*args, **kwargs)


def test_a_busy_store_keeps_every_value_says_so_once_and_catches_up(tracking_uri, capsys):
    with Tracker.start(tracking_uri, "busy", flush_seconds=0.01) as tracker:
        tracker.client = busy = BusyStore(tracker.client, failures=2)  # retried after ~0.02 s, then ~0.04 s
        for step in range(300):
            tracker.log_metrics({"train/loss": step}, step)
            time.sleep(0.002)
    assert busy.failures == 0 and busy.calls > 3  # it failed twice during training and went on
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tracking:")]
    assert len(warnings) == 1 and "database is locked" in warnings[0] and "kept" in warnings[0]
    history = MlflowClient(tracking_uri).get_metric_history(tracker.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(300)) and all(m.value == m.step for m in history)


def test_a_store_still_failing_at_the_end_raises_instead_of_dropping_values(tracking_uri):
    tracker = Tracker.start(tracking_uri, "busy", flush_seconds=0.001)
    tracker.client = BusyStore(tracker.client, failures=10**6)
    tracker.log_metrics({"train/loss": 1.0}, 0)
    with pytest.raises(MlflowException, match="database is locked"):
        tracker.flush()
    assert len(tracker._buffer) == 1  # still held, for a later flush


def test_a_run_that_loses_the_race_to_create_its_experiment_joins_it(tracking_uri, monkeypatch):
    first = Tracker.start(tracking_uri, "race")
    first.finish()
    real, seen = MlflowClient.get_experiment_by_name, []

    def not_yet_visible(self, name):  # the first look misses the experiment another run is creating
        seen.append(name)
        return None if len(seen) == 1 else real(self, name)

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", not_yet_visible)
    second = Tracker.start(tracking_uri, "race")
    second.finish()
    runs = MlflowClient(tracking_uri)
    assert runs.get_run(second.run_id).info.experiment_id == runs.get_run(first.run_id).info.experiment_id


import fresh_store  # noqa: E402  (benchmarks/fresh_store.py: the same races, counted)


def test_a_fresh_store_opened_by_mlflow_clients_in_every_order_never_fails_the_run(tmp_path):
    # Before the store was built aside and watched, 16 of 40 such trials failed the workbench's run
    # (benchmarks/results/fresh_store_before.json): both openers migrated the same file at once.
    result = fresh_store.measure(trials=3, openers=("client", "workbench"), directory=tmp_path)
    assert [(c["opener"], c["order"], c["trials"]) for c in result["cells"]] == [
        (opener, order, 3) for opener in ("client", "workbench") for order in fresh_store.ORDERS
    ]
    assert [c["errors"] for c in result["cells"]] == [[]] * 6
    assert result["workbench_failed"] == result["other_failed"] == 0


def test_a_run_started_while_mlflow_ui_creates_the_schema_waits_for_it(tmp_path):
    result = fresh_store.measure(trials=2, openers=("mlflow-ui",), directory=tmp_path)
    assert [(c["order"], c["trials"], c["errors"]) for c in result["cells"]] == [
        ("other-first", 2, []),
        ("workbench-first", 2, []),
    ]


def test_a_store_whose_schema_no_one_completes_fails_in_seconds_with_one_line(tmp_path):
    import sqlite3

    from workbench.errors import WorkbenchError
    from workbench.tracking import open_store

    db = tmp_path / "old.db"
    with sqlite3.connect(db) as connection:  # an MLflow store of an old schema version, as an old install leaves
        connection.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
        connection.execute("INSERT INTO alembic_version VALUES ('451aebb31d03')")
        connection.execute("CREATE TABLE experiments (experiment_id INTEGER PRIMARY KEY)")
    started = time.monotonic()
    with pytest.raises(WorkbenchError, match=r"^tracking.uri: cannot use tracking store .*old.db"):
        open_store(f"sqlite:///{db}")
    assert time.monotonic() - started < 30  # waited the settle time, not minutes


def test_one_process_creates_fresh_relative_stores_in_several_folders(tmp_path, monkeypatch):
    from workbench.tracking import open_store

    for folder in ("a", "b"):  # the same relative URI from two folders
        (tmp_path / folder).mkdir()
        monkeypatch.chdir(tmp_path / folder)
        client, _ = open_store("sqlite:///mlflow.db")
        client.create_experiment(f"made in {folder}")
        names = sorted(e.name for e in client.search_experiments())
        assert names == ["Default", f"made in {folder}"]  # this folder's store, fresh: not a store opened before
        assert sorted(p.name for p in (tmp_path / folder).iterdir()) == ["mlflow.db"]  # no file left aside
