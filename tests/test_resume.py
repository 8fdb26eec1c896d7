"""Crash and resume: training-state checkpoints, the stale-run check, SIGTERM, and `workbench resume`."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import DEFAULT_CONFIG
from mlflow import MlflowClient

from workbench import tags
from workbench.checkpoint import load_training_state, save_training_state
from workbench.cli import main
from workbench.liveness import (
    PROCESS_GONE,
    StopSignals,
    mark_stale_runs,
    pending_stop_signal,
    process_tags,
)
from workbench.runs import recent_runs
from workbench.snapshots import load_snapshots
from workbench.tracking import Tracker

# A tiny grokking job that takes seconds: checkpoints every 15 steps, metrics every 2, flushed every 0.1 s.
JOB = [
    "task.p=11",
    "train.max_steps=120",
    "train.eval_every=2",
    "train.checkpoint_every=15",
    "snapshot.every=40",
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "tracking.flush_seconds=0.1",
    "snapshot.geometry_budget_s=1000",  # never move geometry offline by time: the two runs must log the same keys
]


def _histories(client, run_id):
    """key -> [(step, value), ...] in step order, every value the run holds."""
    keys = client.get_run(run_id).data.metrics
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}


def _start(tmp_path, tracking_uri):
    log = open(tmp_path / "run.log", "w")  # noqa: SIM115 - the child writes to it until it dies
    cmd = [sys.executable, "-m", "workbench.cli", "run", DEFAULT_CONFIG, *JOB, f"tracking.uri={tracking_uri}"]
    return subprocess.Popen(cmd, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)


def _wait_for_step(client, process, step, timeout=120.0):
    """The run id once the child's flushed `train/loss` reaches `step`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the training process ended before the step was reached"
        experiment = client.get_experiment_by_name("grokking")
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
        if runs:
            history = client.get_metric_history(runs[0].info.run_id, "train/loss")
            if history and max(m.step for m in history) >= step:
                return runs[0].info.run_id
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def _uninterrupted(tracking_uri, client):
    assert main(["run", DEFAULT_CONFIG, *JOB, f"tracking.uri={tracking_uri}"]) == 0
    experiment = client.get_experiment_by_name("grokking").experiment_id
    return client.search_runs([experiment], order_by=["attribute.start_time DESC"], max_results=1)[0].info.run_id


@pytest.mark.slow
def test_kill_9_then_resume_matches_an_uninterrupted_run(tmp_path, tracking_uri, capsys):
    client = MlflowClient(tracking_uri)
    process = _start(tmp_path, tracking_uri)
    kill_at = random.Random(11).randint(20, 80)
    run_id = _wait_for_step(client, process, kill_at)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    flushed = _histories(client, run_id)  # everything the store had when the process died
    assert client.get_run(run_id).info.status == "RUNNING"  # nobody could mark it

    rows = {r["run_id"]: r for r in recent_runs(tracking_uri)}  # `workbench ls`: the stale-run check
    assert rows[run_id]["status"] == "FAILED"
    assert client.get_run(run_id).data.tags["workbench.stop_reason"] == PROCESS_GONE

    assert main(["resume", run_id, "--tracking-uri", tracking_uri]) == 0
    out = capsys.readouterr().out
    recomputed = re.search(r"(\d+) values logged before the crash were recomputed.*largest difference (\S+)", out)
    assert recomputed[2] == "0", out  # the steps between checkpoint and kill were recomputed bit for bit
    resumed = client.get_run(run_id)
    assert resumed.info.status == "FINISHED"
    history = _histories(client, run_id)
    for key, points in history.items():
        steps = [s for s, _ in points]
        assert len(steps) == len(set(steps)), f"{key}: two values at one step"
        assert set(flushed.get(key, [])) <= set(points), f"{key}: a value flushed before the kill was lost"

    reference_id = _uninterrupted(tracking_uri, client)
    reference = _histories(client, reference_id)
    assert history.keys() == reference.keys()
    for key in reference:  # on CPU the resumed curve is the uninterrupted one exactly (tolerance 0)
        assert history[key] == reference[key], key
    ours, theirs = load_snapshots(run_id, tracking_uri), load_snapshots(reference_id, tracking_uri)
    assert ours.steps == theirs.steps == [0, 40, 80, 120]
    for layer, points in theirs.layers.items():
        assert (ours.layers[layer] == points).all(), layer


@pytest.mark.slow
def test_sigterm_checkpoints_ends_killed_with_143_and_resumes(tmp_path, tracking_uri, capsys):
    client = MlflowClient(tracking_uri)
    process = _start(tmp_path, tracking_uri)
    run_id = _wait_for_step(client, process, 30)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 143
    run = client.get_run(run_id)
    reason = run.data.tags["workbench.stop_reason"]
    assert run.info.status == "KILLED" and reason.startswith("SIGTERM received: checkpointed at step ")
    step = int(reason.rsplit(" ", 1)[1])
    latest = client.download_artifacts(run_id, "resume/latest.json", str(tmp_path))
    assert json.loads(Path(latest).read_text()) == {"step": step}
    # Every step before the checkpoint's was flushed; the checkpoint's own step is computed after a resume.
    assert max(m.step for m in client.get_metric_history(run_id, "train/loss")) == step - (1 if step % 2 else 2)

    assert main(["resume", run_id, "--tracking-uri", tracking_uri]) == 0
    assert "0 values logged before the crash were recomputed" in capsys.readouterr().out
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and "workbench.stop_reason" not in run.data.tags
    assert run.data.tags["workbench.resumed"].startswith(f"from step {step} ")
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == list(range(0, 121, 2))


def test_checkpoint_restores_model_optimizer_scheduler_and_rng_without_pickle(tracking_uri, tmp_path):
    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1.0)
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5))

    def step(model, opt, schedule):
        loss = model(torch.randn(16, 4)).pow(2).mean()  # draws from the RNG: its state must come back too
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
        return loss.item()

    model, opt, schedule = build()
    for _ in range(3):
        step(model, opt, schedule)
    with Tracker.start(tracking_uri, "unit") as tracker:
        save_training_state(tracker, 3, model, opt, schedule, "data-a", {"note": [1, 2]})
    expected = [step(model, opt, schedule) for _ in range(3)]

    fresh = build()
    state = load_training_state(MlflowClient(tracking_uri), tracker.run_id, tmp_path)
    assert state.step == 3 and state.extra == {"note": [1, 2]}
    state.restore(*fresh, data_id="data-a")
    assert [step(*fresh) for _ in range(3)] == expected
    files = MlflowClient(tracking_uri).list_artifacts(tracker.run_id, "resume/step_00000003")
    assert [Path(f.path).name for f in files] == ["model.safetensors", "optimizer.safetensors", "state.json"]

    with pytest.raises(Exception, match="trained on other data"):
        state.restore(*build(), data_id="data-b")


def test_stale_check_marks_only_runs_whose_process_is_gone(tracking_uri):
    client = MlflowClient(tracking_uri)
    alive = Tracker.start(tracking_uri, "unit", tags=process_tags())
    reused = Tracker.start(tracking_uri, "unit", tags={**process_tags(), tags.PID_STARTED: "12.000"})  # pid reused
    elsewhere = Tracker.start(tracking_uri, "unit", tags={**process_tags(), "workbench.host": "another-host"})
    runs = [client.get_run(t.run_id) for t in (alive, reused, elsewhere)]
    marked = mark_stale_runs(runs, tracking_uri)
    assert [r.info.status for r in marked] == ["RUNNING", "FAILED", "RUNNING"]
    assert marked[1].data.tags["workbench.stop_reason"] == PROCESS_GONE


def test_resume_refuses_bad_runs_with_one_line_and_exit_2(tracking_uri, run_grokking, capsys):
    finished = run_grokking().info.run_id
    client = MlflowClient(tracking_uri)
    no_checkpoint = Tracker.start(tracking_uri, "unit", tags=process_tags())
    no_checkpoint.log_text("stage: grokking\n", "config.yaml")
    no_checkpoint.finish("KILLED")
    running = Tracker.start(tracking_uri, "unit", tags=process_tags())  # its process (this one) is alive
    capsys.readouterr()
    for run_id, expected in [
        ("0123456789abcdef", "not found"),
        (finished, "is FINISHED"),
        (no_checkpoint.run_id, "has no checkpoint"),
        (running.run_id, f"is RUNNING (pid {os.getpid()}"),
    ]:
        assert main(["resume", run_id, "--tracking-uri", tracking_uri]) == 2
        err = capsys.readouterr().err  # (MLflow's download progress bar may come first)
        assert err.strip().splitlines()[-1].startswith("workbench: error: ") and "Traceback" not in err, err
        assert expected in err.strip().splitlines()[-1], err
    assert client.get_run(no_checkpoint.run_id).info.status == "KILLED"  # a refused resume changes nothing


def test_stop_signals_wait_for_a_polling_loop_and_name_the_signal():
    with StopSignals() as signals:
        with pytest.raises(KeyboardInterrupt, match="SIGINT received"):  # nobody polls: interrupt at once
            os.kill(os.getpid(), signal.SIGINT)
    assert signals.exit_code == 130
    with StopSignals() as signals:
        assert pending_stop_signal() is None  # a loop that polls ...
        os.kill(os.getpid(), signal.SIGTERM)
        assert pending_stop_signal() == "SIGTERM received"  # ... is told at its next step boundary
        with pytest.raises(KeyboardInterrupt):  # a second signal does not wait
            os.kill(os.getpid(), signal.SIGINT)
    assert signals.exit_code == 143 and pending_stop_signal() is None
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
