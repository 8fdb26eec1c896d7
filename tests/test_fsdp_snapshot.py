"""Snapshots under FSDP2 (`fully_shard`): each forward pass gathers the sharded parameters from every rank, so
every rank runs the probe forward passes and rank 0 alone writes. Two CPU processes (gloo) against the same model
in one process.

transformers' Trainer runs no FSDP on CPU (accelerate's FSDP is for accelerators; on CPU it wraps the sharded
model in DDP, which fails), so a short loop drives the callback's events as the Trainer does: `on_train_begin`,
then per step an optimizer step and `on_step_end`, then `on_train_end`. Run as a script (under torchrun), this
file is that loop.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN_ROWS = 4  # one step on all of them: each of 2 ranks takes 2, and FSDP averages their gradients
PROBES = 6  # in 2 forward passes (probe_batch_size 4), of different lengths: padding is exercised


def token_rows(n: int, seed: int, lengths: list[int]) -> list[list[int]]:
    import torch

    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 64, (lengths[i % len(lengths)],), generator=generator).tolist() for i in range(n)]


def train_one_step(tracking_uri: str, run_name: str, out: str) -> None:
    """A tiny Llama, sharded per layer and at the root when launched in several processes; snapshots at step 0 and
    after one SGD step on the same 4 rows whatever the number of processes."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM, TrainerControl, TrainerState, TrainingArguments

    from workbench.callback import WorkbenchCallback
    from workbench.config import CallbackSnapshotConfig, TrackingConfig

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # a collective left waiting fails after 2 minutes instead of hanging (the test's timeout is 5)
        dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank = dist.get_rank() if world > 1 else 0
    torch.manual_seed(0)  # the same initial model on every rank, which each shards
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=32,
    )
    model = LlamaForCausalLM(config)
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    # No overhead budget: both snapshots are taken (one step of a tiny model is cheaper than a snapshot).
    snapshot = CallbackSnapshotConfig(
        every=1, probes=PROBES, probe_batch_size=4, keep="all", geometry=["eff_rank"], max_overhead=None
    )
    probes = [{"input_ids": ids} for ids in token_rows(PROBES, seed=1, lengths=[5, 9, 7])]
    callback = WorkbenchCallback(
        snapshot, TrackingConfig(uri=tracking_uri, experiment="fsdp", run_name=run_name), probes=probes, strict=True
    )
    args = TrainingArguments(output_dir=out, report_to="none", use_cpu=True)
    state = TrainerState(is_world_process_zero=rank == 0, is_local_process_zero=rank == 0)
    control = TrainerControl()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)

    callback.on_train_begin(args, state, control, model=model)  # snapshot of step 0
    batch = torch.tensor(token_rows(TRAIN_ROWS, seed=0, lengths=[12])[rank::world])
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    state.global_step = 1
    callback.on_step_end(args, state, control, model=model)  # snapshot of step 1
    callback.on_train_end(args, state, control, model=model)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()  # gloo's threads abort the process at exit if the group is left open


def launch_two_processes(tracking_uri: str, cwd: Path, timeout: float = 300) -> None:
    """This file under torchrun, 2 processes; a hang fails the test after `timeout` s, its processes killed."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [__file__, tracking_uri, "two", str(cwd / "out")]
    launch = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = launch.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(launch.pid, signal.SIGKILL)  # torchrun and both ranks: they are its session
        output, _ = launch.communicate()
        raise AssertionError(f"2 FSDP processes still running after {timeout} s:\n{output[-3000:]}") from None
    assert launch.returncode == 0, output[-6000:]  # the ranks' tracebacks before torchrun's summary


# About a minute on 2 busy cores, mostly imports and the stores' start in 3 processes. Without every rank running
# the probes (rank 0 alone, as under DDP) rank 0 waits in the probe forward's all-gather, rank 1 in its backward's
# reduce-scatter, until gloo's 2-minute timeout fails the launch.
@pytest.mark.slow
def test_under_fsdp_every_rank_runs_the_probes_and_the_snapshot_is_the_one_process_one(tracking_uri, tmp_path):
    from mlflow import MlflowClient

    from workbench.snapshots import load_snapshots

    train_one_step(tracking_uri, "one", str(tmp_path / "out"))  # the reference: one process, unsharded
    launch_two_processes(tracking_uri, tmp_path)

    client = MlflowClient(tracking_uri)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("fsdp").experiment_id])}
    assert set(runs) == {"one", "two"}  # rank 1 opened no run
    one, two = (load_snapshots(runs[name].info.run_id, tracking_uri) for name in ("one", "two"))
    assert one.steps == two.steps == [0, 1]
    assert list(two.layers) == list(one.layers) == ["layer_00", "layer_01", "layer_02"]
    for name, states in one.layers.items():
        # float16 snapshots of the same states, up to the order of FSDP's gradient sums.
        np.testing.assert_allclose(two.layers[name], states, atol=1e-3, rtol=1e-3, err_msg=name)
        assert not np.allclose(states[0], states[1], atol=1e-2), f"{name}: the step changed nothing to compare"
    logged = client.get_metric_history(runs["two"].info.run_id, "geom/eff_rank/layer_02")
    assert sorted(m.step for m in logged) == [0, 1]  # once per snapshot: rank 0 alone logs


def test_a_pooling_error_is_raised_after_every_probe_batch_has_run():
    # Under FSDP the other ranks run every batch: rank 0 leaving the loop early would leave them waiting.
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from workbench.instrument import probe_forward
    from workbench.snapshots import ProbeSet

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    model = LlamaForCausalLM(config)
    batches = []
    model.register_forward_pre_hook(lambda module, args: batches.append(len(batches)))
    ids = torch.tensor(token_rows(PROBES, seed=1, lengths=[5]))
    probe = ProbeSet(ids=list(range(PROBES)), input_ids=ids, attention_mask=torch.ones_like(ids))

    def failing_pool(hidden_states, first):
        raise RuntimeError("pooling failed")

    with pytest.raises(RuntimeError, match="pooling failed"):
        probe_forward(model, probe, batch_size=2, pool=failing_pool)
    assert batches == [0, 1, 2] and model.training  # all 3 batches ran, and the model is back in training mode


if __name__ == "__main__":  # one rank of `launch_two_processes`
    train_one_step(*sys.argv[1:4])
