"""`snapshot.max_overhead`: a due snapshot is skipped when it would take the run's snapshot time over that share of
its training time, with an alert; the share is logged with every snapshot."""

import json
from types import SimpleNamespace

import pytest
from conftest import DEFAULT_CONFIG, TINY_GROKKING

from workbench import instrument as instrument_module
from workbench.cli import main
from workbench.config import CallbackSnapshotConfig, SnapshotConfig
from workbench.instrument import Instrument
from workbench.snapshots import ProbeSet


class Tracker:
    run_id = "run"

    def __init__(self):
        self.metrics, self.tags = [], {}

    def log_artifact(self, path, folder):
        pass

    def log_text(self, text, artifact_file):
        pass

    def log_metrics(self, metrics, step):
        self.metrics.append((step, dict(metrics)))

    def set_tags(self, tags):
        self.tags.update(tags)


class Clock:
    """perf_counter as the test sets it: `now` seconds."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(vocab_size=20, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    )


def run_steps(instrument, clock, monkeypatch, steps, step_s, snapshot_s):
    """Steps of `step_s` seconds each; a snapshot taken after a step lasts `snapshot_s[step]` seconds (the model
    forward is patched to advance the clock)."""
    model = tiny_model()
    forward = model.forward

    def slow_forward(*args, **kwargs):
        clock.now += snapshot_s[current]
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", slow_forward)
    taken = []
    for current in steps:
        if instrument(model, current):
            taken.append(current)
        # Asked again after the step's snapshot (the stages do, for the policy engine): the same answer.
        assert instrument.due(current) == (taken[-1:] == [current])
        clock.now += step_s
    return taken


def test_a_due_snapshot_that_would_take_the_run_over_its_budget_is_skipped_and_the_alert_says_why(monkeypatch):
    import torch

    probe = ProbeSet(ids=[0, 1], input_ids=torch.arange(8).reshape(2, 4), attention_mask=torch.ones(2, 4))
    tracker = Tracker()
    config = SnapshotConfig(every=5, max_overhead=0.1, geometry=["eff_rank"])
    instrument = Instrument(config, probe, tracker)
    clock = Clock()
    monkeypatch.setattr(instrument_module, "time", SimpleNamespace(perf_counter=clock))
    # 2 s a step, so 2 s x step of training before a step's snapshot; snapshots of 2.2 s (step 0), then 5 s. Step
    # 0 is always taken. A due step s is taken when the snapshots so far plus one more costed as the latest fit in
    # 0.1 x 2 s x s: 2.2 + 2.2 <= 0.2 s first at s = 25 (steps 5-20 skipped); 7.2 + 5 at 65; 12.2 + 5 at 90.
    costs = {step: (2.2 if step == 0 else 5.0) for step in range(0, 100, 5)}
    taken = run_steps(instrument, clock, monkeypatch, range(100), 2.0, costs)
    assert taken == [0, 25, 65, 90]
    # The share logged with each snapshot after the first: snapshot seconds over training seconds since the first.
    overhead = [(step, m["snapshot/overhead"]) for step, m in tracker.metrics if "snapshot/overhead" in m]
    assert overhead == [(25, pytest.approx(7.2 / 50)), (65, pytest.approx(12.2 / 130)), (90, pytest.approx(17.2 / 180))]
    assert [step for step, m in tracker.metrics if "event/snapshot_skipped" in m] == [5]  # said once
    alert = json.loads(tracker.tags["workbench.alert.snapshot_skipped"])
    assert alert == {
        "step": 5,
        "message": "snapshot at step 5 skipped: the snapshots so far took 2.2 s beside 10.0 s of training, and "
        "another of 2.2 s would take them over snapshot.max_overhead=0.1; from here a due snapshot is taken when it "
        "fits (snapshot/overhead logs the share)",
    }


def test_without_a_budget_every_due_snapshot_is_taken(monkeypatch):
    import torch

    probe = ProbeSet(ids=[0], input_ids=torch.arange(4).reshape(1, 4), attention_mask=torch.ones(1, 4))
    tracker = Tracker()
    instrument = Instrument(SnapshotConfig(every=5, geometry=["eff_rank"]), probe, tracker)
    clock = Clock()
    monkeypatch.setattr(instrument_module, "time", SimpleNamespace(perf_counter=clock))
    taken = run_steps(instrument, clock, monkeypatch, range(11), 1.0, dict.fromkeys(range(0, 11, 5), 20.0))
    assert taken == [0, 5, 10]
    assert not any("snapshot/overhead" in m for _, m in tracker.metrics)
    assert SnapshotConfig().max_overhead is None and CallbackSnapshotConfig().max_overhead == 0.05


@pytest.mark.parametrize(("value", "expected"), [("0", "greater than 0"), ("1.5", "less than or equal to 1")])
def test_a_budget_out_of_range_is_one_line_naming_the_field(value, expected, tracking_uri, capsys):
    capsys.readouterr()
    code = main(
        ["run", DEFAULT_CONFIG, *TINY_GROKKING, f"snapshot.max_overhead={value}", f"tracking.uri={tracking_uri}"]
    )
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"workbench: error: override 'snapshot.max_overhead={value}': snapshot.max_overhead:")
    assert expected in err[0]
