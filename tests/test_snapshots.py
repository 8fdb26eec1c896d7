import json
import os

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from workbench.errors import WorkbenchError
from workbench.snapshots import (
    Pooler,
    ProbeSet,
    SnapshotWriter,
    choose_probe_ids,
    load_snapshots,
    read_snapshot_dir,
)
from workbench.tracking import Tracker

# Two probes of length 4; the second is left-padded by one token.
MASK = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
PROBE = ProbeSet(
    ids=[10, 20],
    input_ids=torch.zeros(2, 4, dtype=torch.long),
    attention_mask=MASK,
    answer_positions=torch.tensor([2, 3]),
    labels=[0, 1],
)
HIDDEN = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)


def test_probe_ids_are_a_fixed_seeded_sample_of_held_out_ids():
    held_out = np.arange(100, 200)
    ids = choose_probe_ids(held_out, 10, seed=3)
    assert ids == choose_probe_ids(held_out, 10, seed=3) != choose_probe_ids(held_out, 10, seed=4)
    assert len(ids) == 10 and set(ids) <= set(held_out.tolist()) and ids == sorted(ids)


def test_token_pooling_keeps_every_real_token_and_skips_padding():
    pooled = Pooler(PROBE, "token", max_points=100, seed=0)(HIDDEN)
    assert pooled.shape == (7, 3)
    assert not any(torch.equal(row, HIDDEN[1, 0]) for row in pooled)


def test_token_pooling_subsample_is_the_same_points_every_time():
    a, b = Pooler(PROBE, "token", 4, seed=1), Pooler(PROBE, "token", 4, seed=1)
    assert a(HIDDEN).shape == (4, 3) and torch.equal(a(HIDDEN), b(HIDDEN))
    assert len(a.points(PROBE)) == 4


def test_last_mean_and_answer_pooling():
    assert torch.equal(Pooler(PROBE, "last", 100, 0)(HIDDEN), HIDDEN[:, 3])
    assert torch.allclose(Pooler(PROBE, "mean", 100, 0)(HIDDEN)[1], HIDDEN[1, 1:].mean(0))
    assert torch.equal(Pooler(PROBE, "answer", 100, 0)(HIDDEN), torch.stack([HIDDEN[0, 2], HIDDEN[1, 3]]))
    assert Pooler(PROBE, "answer", 100, 0).points(PROBE) == [[10, 2], [20, 3]]


@pytest.mark.parametrize("pooling", ["token", "last", "mean", "answer"])
def test_pooling_probe_batches_gives_the_points_of_the_whole_probe_set(pooling):
    pooler = Pooler(PROBE, pooling, max_points=5, seed=2)  # token: a subsample spanning both probes
    batches = torch.cat([pooler(HIDDEN[:1], first_row=0), pooler(HIDDEN[1:], first_row=1)])
    assert torch.equal(batches, pooler(HIDDEN))
    assert len(batches) == len(pooler.points(PROBE))


def test_answer_pooling_without_answer_positions_is_a_user_error():
    probe = ProbeSet(ids=[1], input_ids=torch.zeros(1, 2, dtype=torch.long), attention_mask=torch.ones(1, 2))
    with pytest.raises(WorkbenchError, match="snapshot.pooling"):
        Pooler(probe, "answer", 10, 0)


def write_run(tracking_uri, steps=(0, 50, 100)):
    tracker = Tracker.start(tracking_uri, "snapshots")
    writer = SnapshotWriter(
        tracker,
        {
            "pooling": "token",
            "dtype": "float16",
            "layers": ["layer_00", "layer_01"],
            "hidden_size": 3,
            "probe_ids": [10, 20],
            "points": [[10, 0], [20, 1]],
        },
    )
    arrays = {}
    for step in steps:
        layers = {name: torch.randn(2, 3) for name in ("layer_00", "layer_01")}
        writer.write(step, layers)
        arrays[step] = layers
    tracker.finish()
    return tracker.run_id, arrays


def test_snapshots_round_trip_through_the_tracking_store(tracking_uri):
    run_id, arrays = write_run(tracking_uri)
    snaps = load_snapshots(run_id, tracking_uri=tracking_uri)
    assert snaps.steps == [0, 50, 100]
    assert snaps.layers["layer_01"].shape == (3, 2, 3) and snaps.layers["layer_01"].dtype == np.float16
    expected = arrays[50]["layer_01"].half().numpy()
    np.testing.assert_array_equal(snaps.layers["layer_01"][1], expected)
    assert snaps.index["probe_ids"] == [10, 20]


def snapshot_dir(tracking_uri):
    run_id, _ = write_run(tracking_uri)
    run = MlflowClient(tracking_uri).get_run(run_id)
    return run.info.artifact_uri.removeprefix("file://") + "/snapshots"


def test_truncated_snapshot_file_is_rejected_with_its_name(tracking_uri):
    directory = snapshot_dir(tracking_uri)
    path = f"{directory}/step_00000050.safetensors"
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(WorkbenchError, match=r"step_00000050.safetensors: corrupt snapshot file"):
        read_snapshot_dir(directory)


def test_snapshot_not_matching_the_index_is_rejected(tracking_uri):
    directory = snapshot_dir(tracking_uri)
    index = json.loads(open(f"{directory}/index.json").read())
    index["hidden_size"] = 4
    open(f"{directory}/index.json", "w").write(json.dumps(index))
    with pytest.raises(WorkbenchError, match=r"layer_0\d is float16\[2, 3\], index says float16\[2, 4\]"):
        read_snapshot_dir(directory)


def test_missing_step_file_and_missing_index_are_rejected(tracking_uri):
    directory = snapshot_dir(tracking_uri)
    os.remove(f"{directory}/step_00000100.safetensors")
    with pytest.raises(WorkbenchError, match="listed in the index but missing"):
        read_snapshot_dir(directory)
    os.remove(f"{directory}/index.json")
    with pytest.raises(WorkbenchError, match="snapshot index is missing"):
        read_snapshot_dir(directory)


def test_run_without_snapshots_is_a_clear_error(tracking_uri):
    tracker = Tracker.start(tracking_uri, "snapshots")
    tracker.finish()
    with pytest.raises(WorkbenchError, match=f"run {tracker.run_id}: no snapshots found"):
        load_snapshots(tracker.run_id, tracking_uri=tracking_uri)


def test_snapshot_layers_a_loaded_model_lacks_are_a_user_error_at_its_first_snapshot(tracking_uri):
    # A model built from config is checked before the run exists (tests/test_config.py); a loaded one only here.
    from test_callback import tiny_llama

    from workbench.callback import probe_set_from_rows
    from workbench.config import SnapshotConfig
    from workbench.instrument import Instrument
    from workbench.tracking import Tracker

    probe = probe_set_from_rows([{"input_ids": [1, 2, 3]}] * 2, None, n_probes=2, seed=0)
    with Tracker.start(tracking_uri, "layers") as tracker:
        instrument = Instrument(SnapshotConfig(layers=[0, 7]), probe, tracker)
        with pytest.raises(WorkbenchError, match=r"^snapshot.layers: \[7\] out of range for a model with layers 0..1$"):
            instrument(tiny_llama(), 0)
