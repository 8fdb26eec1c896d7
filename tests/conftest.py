import os
from pathlib import Path

# Nothing may download weights or datasets during tests.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.pop("MLFLOW_TRACKING_URI", None)

import pytest  # noqa: E402


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch):
    """A fresh embedded sqlite store; the working directory is the test's so artifacts land there too."""
    monkeypatch.chdir(tmp_path)
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


DEFAULT_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "grokking.yaml")
# The default grokking job shrunk to a few seconds: 11x11 pairs, 20 steps, snapshots at 0, 10, 20.
TINY_GROKKING = [
    "task.p=11",
    "train.max_steps=20",
    "train.eval_every=5",
    "snapshot.every=10",
    "model.hidden_size=32",
    "model.intermediate_size=64",
]


@pytest.fixture
def run_grokking(tracking_uri):
    """Run the tiny grokking job through the CLI into the test's store; returns the newest MLflow run."""
    from mlflow import MlflowClient

    from workbench.cli import main

    def run(*overrides: str, exit_code: int = 0):
        assert main(["run", DEFAULT_CONFIG, *TINY_GROKKING, *overrides, f"tracking.uri={tracking_uri}"]) == exit_code
        client = MlflowClient(tracking_uri)
        experiment = client.get_experiment_by_name("grokking").experiment_id
        return client.search_runs([experiment], order_by=["attribute.start_time DESC"], max_results=1)[0]

    return run
