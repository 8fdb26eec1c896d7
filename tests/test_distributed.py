"""Multi-process training through `accelerate launch` (2 CPU processes, gloo), against the same run in one process.

Each launch is a real `accelerate launch --multi_gpu --num_processes 2 -m workbench run ...`: on a machine
without GPUs accelerate's torchrun-based launcher starts the processes and `workbench` joins them in a gloo
group (no special path for it: it is the command users run on GPUs).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import DEFAULT_CONFIG
from mlflow import MlflowClient

from workbench.cli import main
from workbench.snapshots import load_snapshots

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# Memorisation of 11 x 11 pairs takes a few dozen steps: a stop rule there ends the run before max_steps.
GROKKING = ["task.p=11", "train.max_steps=120", "train.eval_every=5", "snapshot.every=10", "snapshot.probes=64"]
STOP_AT_MEMORISATION = """\
- name: memorised
  when: {metric: train/acc, mode: max, stopping_threshold: 0.99}
  actions: [checkpoint, stop]
"""


def launch_two_processes(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    with socket.socket() as s:  # a free rendezvous port: tests may run beside other launches
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    accelerate = Path(sys.executable).parent / "accelerate"
    command = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*command, "-m", "workbench", "run", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=420
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def runs_by_name(tracking_uri: str, experiment: str) -> dict:
    client = MlflowClient(tracking_uri)
    found = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return {run.info.run_name: run for run in found}


def history(client: MlflowClient, run_id: str, key: str) -> tuple[list[int], np.ndarray]:
    points = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
    return [m.step for m in points], np.array([m.value for m in points])


@pytest.mark.slow
def test_two_processes_train_like_one_log_once_and_stop_together(tracking_uri, tmp_path):
    policy = tmp_path / "stop.yaml"
    policy.write_text(STOP_AT_MEMORISATION)
    common = [*GROKKING, f"tracking.uri={tracking_uri}", "tracking.experiment=ddp", "--policy", str(policy)]
    assert main(["run", DEFAULT_CONFIG, *common, "tracking.run_name=one"]) == 0
    launch_two_processes(tmp_path, DEFAULT_CONFIG, *common, "tracking.run_name=two")

    runs = runs_by_name(tracking_uri, "ddp")
    assert set(runs) == {"one", "two"}  # rank 1 opened no run of its own
    one, two = runs["one"], runs["two"]
    assert (one.data.tags["workbench.processes"], two.data.tags["workbench.processes"]) == ("1", "2")
    assert two.info.status == "FINISHED"
    client = MlflowClient(tracking_uri)
    # Geometry by effective rank, a smooth function of the states: TwoNN of ~80 distinct points moves by a few
    # percent when float16 rounding of states that differ by round-off moves one point's nearest neighbour.
    for key in ("train/loss", "train/acc", "eval/acc", "eval/loss", "weight_norm", "geom/eff_rank/layer_01"):
        steps_one, values_one = history(client, one.info.run_id, key)
        steps_two, values_two = history(client, two.info.run_id, key)
        # One value per step: only rank 0 logged. Both stopped at the same step, at memorisation.
        assert steps_two == sorted(set(steps_two)) == steps_one, key
        # Same full-batch gradient up to summation order: float32 round-off, grown over the steps.
        np.testing.assert_allclose(values_two, values_one, rtol=2e-2, atol=2e-3, err_msg=key)
    stopped = steps_one[-1]
    assert 0 < stopped < 120
    assert two.data.tags["workbench.stop_reason"] == one.data.tags["workbench.stop_reason"]
    checkpoints = [a.path for a in client.list_artifacts(two.info.run_id, "checkpoints")]
    assert checkpoints == [f"checkpoints/step_{stopped:08d}"]  # saved once, by rank 0

    # The probe snapshot does not depend on the world size: same steps, same points at initialisation.
    snaps_one, snaps_two = load_snapshots(one.info.run_id, tracking_uri), load_snapshots(two.info.run_id, tracking_uri)
    assert snaps_two.steps == snaps_one.steps
    assert snaps_two.index["probe_ids"] == snaps_one.index["probe_ids"]
    for layer, states in snaps_one.layers.items():
        np.testing.assert_array_equal(snaps_two.layers[layer][0], states[0])


@pytest.mark.slow
def test_sft_stage_trains_under_two_processes_into_one_run(tracking_uri, tmp_path):
    from test_stages import TINY

    launch_two_processes(
        tmp_path,
        str(CONFIGS / "sft.yaml"),
        *TINY,
        f"tracking.uri={tracking_uri}",
        "tracking.experiment=ddp-sft",
        "tracking.run_name=sft",
    )
    runs = runs_by_name(tracking_uri, "ddp-sft")
    # The SFT run and the pretraining it started on the fly (nested), each once; the SFT ranks loaded the
    # model rank 0 logged for the nested run.
    assert sorted(runs) == ["pretrain (on the fly, for sft)", "sft"]
    sft = runs["sft"]
    assert sft.info.status == "FINISHED" and sft.data.tags["workbench.processes"] == "2"
    client = MlflowClient(tracking_uri)
    steps, _ = history(client, sft.info.run_id, "train/loss")
    assert steps == sorted(set(steps)) and steps[-1] == 6
    assert load_snapshots(sft.info.run_id, tracking_uri).steps == [0, 3, 6]
