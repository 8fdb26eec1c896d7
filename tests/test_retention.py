"""`snapshot.keep`: which snapshot files a run stores, while the geometry of every snapshot is logged."""

import json
from pathlib import Path

import pytest
from conftest import DEFAULT_CONFIG, TINY_GROKKING
from mlflow import MlflowClient

from workbench.cli import main
from workbench.config import CallbackSnapshotConfig, SnapshotConfig
from workbench.instrument import Instrument
from workbench.snapshots import ProbeSet, kept


def test_the_callback_default_keeps_a_long_real_model_run_under_one_gigabyte():
    config = CallbackSnapshotConfig()
    assert (config.keep, config.every, config.max_points, config.dtype) == ("log", 50, 1024, "float16")
    # A 10 000-step run snapshotting every 50 steps takes 201 snapshots (steps 0, 50, ..., 10 000); `log` stores
    # snapshot number k = step / 50 when k is 0 or a power of 2: k = 0, 1, 2, 4, ..., 128.
    steps = [step for step in range(0, 10_001, 50) if kept(config.keep, 50, step)]
    assert steps == [0, 50, 100, 200, 400, 800, 1600, 3200, 6400]
    # 30 layers x 576 (SmolLM2-135M): 31 hidden states (embeddings + 30 layers) x 1 024 points x 576 x 2 bytes.
    snapshot_bytes = 31 * 1024 * 576 * 2
    assert snapshot_bytes == 36_569_088  # ~35 MB
    assert len(steps) * snapshot_bytes == 329_121_792 < 1e9
    assert 201 * snapshot_bytes == 7_350_386_688  # what `all` would store: ~7 GB
    assert SnapshotConfig().keep == "all"  # the built-in tiny stages store every snapshot, as before


def test_keep_every_n_stores_the_multiples_of_n():
    assert [s for s in range(0, 101, 10) if kept("every:30", 10, s)] == [0, 30, 60, 90]
    assert [s for s in range(0, 101, 10) if kept("all", 10, s)] == list(range(0, 101, 10))


def test_a_thinned_run_stores_exactly_the_kept_steps_logs_every_snapshots_geometry_and_analyze_says_so(
    run_grokking, tracking_uri, tmp_path, capsys
):
    # Snapshots every 5 steps over 40 steps: k = 0 ... 8; `log` stores k = 0, 1, 2, 4, 8.
    run = run_grokking("train.max_steps=40", "snapshot.every=5", "snapshot.keep=log")
    run_id, client = run.info.run_id, MlflowClient(tracking_uri)
    stored = [0, 5, 10, 20, 40]
    files = sorted(a.path.split("/")[-1] for a in client.list_artifacts(run_id, "snapshots"))
    assert files == ["index.json", *(f"step_{s:08d}.safetensors" for s in stored)]
    index = json.loads(Path(client.download_artifacts(run_id, "snapshots/index.json", str(tmp_path))).read_text())
    assert (index["steps"], index["dropped"], index["keep"]) == (stored, [15, 25, 30, 35], "log")
    history = client.get_metric_history(run_id, "geom/eff_rank/layer_01")
    assert sorted(m.step for m in history) == [0, 5, 10, 15, 20, 25, 30, 35, 40]

    capsys.readouterr()
    assert main(["analyze", run_id, "--tracking-uri", tracking_uri, "--features", "pr", "--layers", "1"]) == 0
    out, err = capsys.readouterr()
    assert [line for line in err.splitlines() if "not computed" in line] == [
        "  not computed: cannot recompute steps 15, 25, 30, 35 (snapshot.keep=log did not store them; their "
        "online geometry is logged); recomputing steps 0, 5, 10, 20, 40"
    ]
    assert sorted(m.step for m in client.get_metric_history(run_id, "geom/pr/layer_01")) == stored
    assert f"run {run_id}: logged 5 values" in out


class RecordingTracker:
    """The two artifact calls the snapshot writer makes, recorded."""

    run_id = "run"

    def __init__(self):
        self.files, self.index = [], None

    def log_artifact(self, path, folder):
        self.files.append(Path(path).name)

    def log_text(self, text, artifact_file):
        self.index = json.loads(text)

    def log_metrics(self, metrics, step):
        pass


def test_a_resumed_run_keeps_the_stored_and_dropped_steps_from_before_its_checkpoint():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=20, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    )
    probe = ProbeSet(ids=[0, 1], input_ids=torch.arange(8).reshape(2, 4), attention_mask=torch.ones(2, 4))
    tracker = RecordingTracker()
    instrument = Instrument(SnapshotConfig(every=5, keep="log", geometry=["eff_rank"]), probe, tracker)
    # The checkpoint of a run killed at step 17: snapshots 0, 5, 10 stored (k = 0, 1, 2), 15 (k = 3) dropped.
    instrument.restore({"snapshot_steps": [0, 5, 10], "dropped_steps": [15], "online_geometry": ["eff_rank"]})
    for step in (20, 25):  # k = 4 is stored, k = 5 is not
        instrument(model, step)
    assert tracker.files == ["step_00000020.safetensors"]
    assert (tracker.index["steps"], tracker.index["dropped"]) == ([0, 5, 10, 20], [15, 25])
    assert instrument.state()["snapshot_steps"] == [0, 5, 10, 20]
    assert instrument.state()["dropped_steps"] == [15, 25]


@pytest.mark.parametrize("keep", ["last:0", "every:15", "every:0", "log:2"])
def test_a_retention_that_contradicts_the_interval_is_one_line_naming_the_field(keep, tracking_uri, capsys):
    capsys.readouterr()
    code = main(["run", DEFAULT_CONFIG, *TINY_GROKKING, f"snapshot.keep={keep}", f"tracking.uri={tracking_uri}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.splitlines() == [
        f"workbench: error: override 'snapshot.keep={keep}': snapshot.keep: expected all, log or every:N with N a "
        f"positive multiple of snapshot.every (10) (got '{keep}')"
    ]
