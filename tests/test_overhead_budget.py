"""`snapshot.max_overhead`: the snapshot interval doubles while one snapshot costs more than that share of the
training time between two, with an alert; the interval survives a resume."""

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
    """perf_counter as the test sets it: each snapshot reads it at its start and at its end."""

    def __init__(self, readings):
        self.readings = iter(readings)

    def __call__(self):
        return next(self.readings)


def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(vocab_size=20, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    )


def test_the_interval_doubles_until_a_snapshot_fits_the_budget_and_the_alert_says_why(monkeypatch):
    import torch

    probe = ProbeSet(ids=[0, 1], input_ids=torch.arange(8).reshape(2, 4), attention_mask=torch.ones(2, 4))
    tracker = Tracker()
    config = SnapshotConfig(every=5, max_overhead=0.1, geometry=["eff_rank"])
    instrument = Instrument(config, probe, tracker)
    # (start, end) of each snapshot. Step 0: 2 s. Step 5: 10 s of training for 5 steps (2 s a step) before it, and
    # it costs 2 s, 20 % of those 10 s: over 10 %, so every 10 (2 s of 20 s fits). Step 10: 1 s, fits. Step 20:
    # 2 s a step again, and 9 s: 9 > 0.1 x 2 s x 10, 20, 40 steps; 9 <= 0.1 x 2 s x 80 steps.
    clock = Clock([0, 2, 12, 14, 24, 25, 45, 54])
    monkeypatch.setattr(instrument_module, "time", SimpleNamespace(perf_counter=clock))
    model = tiny_model()
    taken = [step for step in range(0, 21) if instrument(model, step)]
    assert taken == [0, 5, 10, 20]
    assert instrument.every == 80 and instrument.due(160) and not instrument.due(120)
    intervals = [(step, m["snapshot/every"]) for step, m in tracker.metrics if "snapshot/every" in m]
    assert intervals == [(5, 10.0), (20, 80.0)]
    assert [step for step, m in tracker.metrics if "event/snapshot_interval" in m] == [5, 20]
    alert = json.loads(tracker.tags["workbench.alert.snapshot_interval"])
    assert alert == {
        "step": 20,
        "message": "snapshot interval 10 -> 80 steps: the snapshot at step 20 took 9.00 s, 45% of the 20.0 s of "
        "training between two, over snapshot.max_overhead=0.1",
    }
    # A resumed run goes on at the interval it had reached.
    resumed = Instrument(config, probe, Tracker())
    resumed.restore(instrument.state())
    assert resumed.every == 80


def test_without_a_budget_the_interval_stays_as_set(monkeypatch):
    import torch

    probe = ProbeSet(ids=[0], input_ids=torch.arange(4).reshape(1, 4), attention_mask=torch.ones(1, 4))
    instrument = Instrument(SnapshotConfig(every=5, geometry=["eff_rank"]), probe, Tracker())
    monkeypatch.setattr(
        instrument_module, "time", SimpleNamespace(perf_counter=Clock([0, 2, 12, 30, 40, 60]))
    )  # 18 and 20 s each
    model = tiny_model()
    assert [step for step in range(0, 11) if instrument(model, step)] == [0, 5, 10]
    assert instrument.every == 5
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
