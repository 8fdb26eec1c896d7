import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DEFAULT_CONFIG, TINY_GROKKING
from mlflow import MlflowClient

import pipelines.grokking.stage as grokking
import workbench.policies.engine as policy_engine
from analysis.events import ForecastEvent
from workbench.cli import main
from workbench.config import load_config
from workbench.errors import WorkbenchError
from workbench.policies import PolicyEngine, attach_policies, attach_policy, load_rules

EXAMPLE_POLICY = Path(__file__).resolve().parents[1] / "configs" / "policies" / "grokked_and_flat.yaml"


class FakeTracker:
    """What the engine logs, and a stop-request tag the test can set."""

    def __init__(self):
        self.metrics, self.tags, self.polls = [], {}, 0

    def log_metrics(self, metrics, step):
        self.metrics += [(key, value, step) for key, value in metrics.items()]

    def set_tags(self, tags):
        self.tags.update(tags)

    def get_tag(self, key):
        self.polls += 1
        return self.tags.get(key)


class WindowForecaster:
    """Fires at `start` and stays active until `end` (exclusive)."""

    name = "fake_forecast"

    def __init__(self, start, end):
        self.start, self.end = start, end

    def observe(self, step, metrics):
        return ForecastEvent(self.name, step, {"onset": self.end}) if step == self.start else None

    def active(self, step):
        return self.start <= step < self.end


def make_engine(*rules, forecasters=(), **kwargs):
    return PolicyEngine(load_rules(list(rules)), forecasters=list(forecasters), console=False, **kwargs)


def fired(when, values, steps=None, **rule):
    """The steps at which a one-rule alert policy on metric `m` fires over a series."""
    engine = make_engine({"name": "r", "when": when, "actions": ["alert"], **rule})
    for step, value in zip(steps or range(len(values)), values, strict=True):
        engine.observe(step, {"m": value})
    return [f.step for f in engine.firings if f.kind == "alert"]


# --- the classic knobs, as Keras / Lightning / HF define them -------------------------------------------


def test_patience_counts_evaluations_without_improvement_by_more_than_min_delta():
    series = [0.1, 0.5, 0.5005, 0.5008, 0.52, 0.5201, 0.5202, 0.5203]
    assert fired({"metric": "m", "mode": "max", "patience": 3, "min_delta": 0.001}, series) == [7]
    assert fired({"metric": "m", "mode": "max", "patience": 3}, series) == []  # every value is a new best


def test_mode_says_which_way_is_better():
    loss = [1.0, 0.9, 0.95, 0.92, 0.91, 0.8]
    assert fired({"metric": "m", "mode": "min", "patience": 3}, loss) == [4]
    assert fired({"metric": "m", "mode": "max", "patience": 3}, loss) == [3, 4, 5]


def test_patience_steps_counts_steps_since_the_best():
    steps = list(range(0, 70, 10))
    assert fired({"metric": "m", "mode": "min", "patience_steps": 25}, [1.0] * 7, steps) == [30, 40, 50, 60]


def test_baseline_stops_after_patience_unless_the_metric_beats_it():
    series = [0.5, 0.6, 0.7, 0.9, 0.9, 0.9]  # improving, but below the baseline until 0.9
    assert fired({"metric": "m", "mode": "max", "patience": 2, "baseline": 0.8}, series)[0] == 1
    assert fired({"metric": "m", "mode": "max", "patience": 2}, series) == [5]


def test_stopping_threshold_holds_once_the_metric_is_that_good():
    assert fired({"metric": "m", "mode": "max", "stopping_threshold": 0.95}, [0.5, 0.94, 0.95, 0.97]) == [2, 3]
    assert fired({"metric": "m", "mode": "min", "stopping_threshold": 0.1}, [0.5, 0.2, 0.1]) == [2]


def test_divergence_threshold_holds_once_the_metric_is_worse():
    assert fired({"metric": "m", "mode": "min", "divergence_threshold": 5.0}, [1.0, 4.9, 5.0, 5.1]) == [3]
    assert fired({"metric": "m", "mode": "max", "divergence_threshold": 0.2}, [0.5, 0.2, 0.1]) == [2]


def test_check_finite_holds_on_nan_and_inf_and_thresholds_ignore_nan():
    assert fired({"metric": "m", "check_finite": True}, [1.0, math.nan, math.inf]) == [1, 2]
    assert fired({"metric": "m", "above": 0.5}, [math.nan, 0.2, 0.7]) == [2]


def test_warmup_steps_ignores_earlier_values():
    series = [0.9, 0.1, 0.1, 0.1, 0.1]
    assert fired({"metric": "m", "mode": "max", "patience": 2}, series)[0] == 2  # 0.9 at step 0 is the best
    assert fired({"metric": "m", "mode": "max", "patience": 2, "warmup_steps": 1}, series)[0] == 3
    assert fired({"metric": "m", "above": 0.5, "warmup_steps": 1}, series) == []


def test_drop_from_peak_sustained_for_snapshots():
    series = [10, 12, 9.5, 9.0, 11, 9.0, 9.0, 9.0]  # 20 % below the peak 12 is 9.6
    assert fired({"metric": "m", "drop_from_peak": 0.2}, series) == [2, 3, 5, 6, 7]
    assert fired({"metric": "m", "drop_from_peak": 0.2, "for_snapshots": 3}, series) == [7]


def test_fraction_of_initial():
    assert fired({"metric": "m", "fraction_of_initial": 0.2}, [50, 30, 11, 10, 9]) == [3, 4]


def test_slope_below_over_a_window_waits_for_a_full_window():
    steps = list(range(0, 110, 10))
    rising_then_flat = [min(s, 50) for s in steps]
    assert fired({"metric": "m", "slope_below": 0.01, "window": 30}, rising_then_flat, steps)[0] == 80
    assert fired({"metric": "m", "slope_below": 0.01, "window": 30}, [1.0] * 11, steps)[0] == 30


def test_all_and_any_combine_the_latest_value_of_each_metric():
    rules = {"a": {"metric": "a", "above": 1}, "b": {"metric": "b", "below": 0}}
    observations = [{"a": 2, "b": 1}, {"a": 2}, {"a": 0, "b": -1}, {"a": 2}]  # b is logged every other step
    for combinator, expected in (("all", [3]), ("any", [0, 1, 2, 3])):
        engine = make_engine({"name": "r", "when": {combinator: list(rules.values())}, "actions": ["alert"]})
        for step, metrics in enumerate(observations):
            engine.observe(step, metrics)
        assert [f.step for f in engine.firings if f.kind == "alert"] == expected, combinator


def test_a_rule_fires_only_at_steps_where_its_metric_is_logged():
    engine = make_engine({"name": "r", "when": {"metric": "m", "above": 0}, "actions": ["alert"]})
    for step in range(6):
        engine.observe(step, {"m": 1.0} if step % 3 == 0 else {"other": 0.0})
    assert [f.step for f in engine.firings if f.kind == "alert"] == [0, 3]


def test_once_and_cooldown():
    ones = [1.0] * 11
    assert fired({"metric": "m", "above": 0}, ones) == list(range(11))
    assert fired({"metric": "m", "above": 0}, ones, once=True) == [0]
    assert fired({"metric": "m", "above": 0}, ones, cooldown=5) == [0, 5, 10]


# --- actions, hold, forecasters, stop requests ----------------------------------------------------------

PLATEAU_STOP = {
    "name": "plateau",
    "when": {"metric": "eval/acc", "mode": "max", "patience": 2},
    "actions": ["checkpoint", "stop"],
}
HOLD = {"name": "protect", "when": {"event": "fake_forecast"}, "actions": ["hold"]}


def run_steps(engine, n=11):
    decisions = {}
    for step in range(n):
        decisions[step] = engine.observe(step, {"eval/acc": 0.1})  # a flat plateau: patience runs out at step 2
        if decisions[step].stop:
            break
    return decisions


def test_patience_alone_stops_in_the_plateau():
    decisions = run_steps(make_engine(PLATEAU_STOP))
    assert max(decisions) == 2 and decisions[2].stop and decisions[2].checkpoint
    assert decisions[2].reason.startswith("rule 'plateau': eval/acc has not improved for 2 evaluations")


def test_hold_suppresses_a_stop_while_the_forecast_is_active_and_releases_it_after():
    engine = make_engine(PLATEAU_STOP, HOLD, forecasters=[WindowForecaster(start=1, end=6)])
    decisions = run_steps(engine)
    assert max(decisions) == 6 and decisions[6].stop  # held at 2..5, stopped at the first step after the hold
    assert [s for s, d in decisions.items() if d.checkpoint] == [2, 6]  # once when held, once at the stop
    kinds = [(f.step, f.kind) for f in engine.firings]
    assert (1, "event") in kinds and (1, "hold") in kinds and (2, "held") in kinds and (6, "release") in kinds


def test_alerts_and_forecast_events_are_logged_as_event_metrics_and_tags():
    tracker = FakeTracker()
    rule = {"name": "lid-drop@L2", "when": {"metric": "m", "below": 1}, "actions": ["alert"], "once": True}
    engine = make_engine(rule, forecasters=[WindowForecaster(start=2, end=4)], tracker=tracker)
    decisions = [engine.observe(step, {"m": 2.0 - step}) for step in range(4)]
    assert ("event/lid-drop_L2", 1.0, 2) in tracker.metrics and ("event/fake_forecast", 1.0, 2) in tracker.metrics
    assert json.loads(tracker.tags["workbench.alert.lid-drop_L2"])["step"] == 2
    assert json.loads(tracker.tags["workbench.event.fake_forecast"]) == {"step": 2, "onset": 4}
    assert any("m = 0 < 1" in line for line in decisions[2].alerts) and not decisions[3].alerts
    assert not any(d.stop for d in decisions) and "workbench.stop_reason" not in tracker.tags


def test_a_stop_sets_the_stop_tags():
    tracker = FakeTracker()
    engine = make_engine(PLATEAU_STOP, tracker=tracker)
    run_steps(engine)
    assert tracker.tags["workbench.stopped_at_step"] == "2"
    assert tracker.tags["workbench.stop_reason"].startswith("rule 'plateau'")


def test_a_stop_request_is_polled_at_most_every_poll_interval():
    tracker = FakeTracker()
    slow = make_engine(tracker=tracker, stop_poll_seconds=3600)
    slow.observe(0, {"m": 1.0})
    tracker.tags["workbench.stop_requested"] = "now"
    # One poll reads the stop, the checkpoint and the attached-policy tag; the next poll is an hour away.
    assert not slow.observe(1, {"m": 1.0}).stop and tracker.polls == 3
    assert slow.observe(2, {"m": 1.0}, snapshot=True).by_user  # a snapshot step polls whatever the interval
    engine = make_engine(tracker=tracker, stop_poll_seconds=0)
    decision = engine.observe(1, {"m": 1.0})
    assert decision.stop and decision.checkpoint and decision.reason == "stop requested" and decision.by_user
    assert engine.ended_by_user and tracker.tags["workbench.stopped_at_step"] == "1"


def test_a_checkpoint_request_checkpoints_once_at_the_next_poll():
    tracker = FakeTracker()
    engine = make_engine(tracker=tracker, stop_poll_seconds=0)
    assert not engine.observe(0, {"m": 1.0}).checkpoint
    tracker.tags["workbench.checkpoint_requested"] = "requested 12:00:00.000"
    first, again = engine.observe(1, {"m": 1.0}), engine.observe(2, {"m": 1.0})
    assert first.checkpoint and not first.stop and not again.checkpoint  # one request, one checkpoint
    tracker.tags["workbench.checkpoint_requested"] = "requested 12:00:05.000"
    assert engine.observe(3, {"m": 1.0}).checkpoint
    assert [(f.step, f.kind) for f in engine.firings] == [(1, "checkpoint"), (3, "checkpoint")]


def test_a_stop_request_is_not_held():
    tracker = FakeTracker()
    tracker.tags["workbench.stop_requested"] = "now"
    engine = make_engine(HOLD, forecasters=[WindowForecaster(0, 100)], tracker=tracker, stop_poll_seconds=0)
    assert engine.observe(0, {"m": 1.0}).stop


def attached(text):
    """The tag value `attach_policy` writes for a policy's YAML text."""
    return json.dumps({"requested": "now", "policy": text})


def test_an_attached_policy_is_taken_at_the_next_poll_and_replaces_a_rule_of_its_name():
    tracker = FakeTracker()
    engine = make_engine(PLATEAU_STOP, tracker=tracker, stop_poll_seconds=0)
    assert not engine.observe(0, {"eval/acc": 0.1, "train/loss": 3.0}).stop
    # Patience 5 replaces 'plateau' (patience 2, which would stop at step 2); 'loss-low' is new.
    tracker.tags["workbench.attached_policy"] = attached(
        "- {name: plateau, when: {metric: eval/acc, mode: max, patience: 5}, actions: [stop]}\n"
        "- {name: loss-low, when: {metric: train/loss, below: 1.0}, actions: [alert]}\n"
    )
    taken = engine.observe(1, {"eval/acc": 0.1, "train/loss": 2.0})
    assert taken.alerts == ["policy, step 1: attach: attached policy taken: plateau, loss-low (replacing plateau)"]
    assert json.loads(tracker.tags["workbench.attached_policy_applied"]) == {
        "step": 1,
        "rules": ["loss-low", "plateau"],
    }
    stops = [step for step in range(2, 12) if engine.observe(step, {"eval/acc": 0.1, "train/loss": 0.5}).stop]
    assert stops[0] == 7  # the attached patience counts from the step it was taken at: 5 evaluations after step 2
    assert [f.step for f in engine.firings if f.kind == "alert" and f.name == "loss-low"][0] == 2
    assert [f.kind for f in engine.firings].count("attach") == 1  # the same tag value, polled ten times, taken once


def test_an_attached_policy_the_run_cannot_take_is_refused_with_an_alert():
    tracker = FakeTracker()
    engine = make_engine(tracker=tracker, stop_poll_seconds=0)  # a run without forecasters: no grokking_forecast event
    hold = "- {name: h, when: {event: grokking_forecast}, actions: [hold]}\n"
    tracker.tags["workbench.attached_policy"] = attached(hold)
    [alert] = engine.observe(0, {"m": 1.0}).alerts
    assert "attached policy refused: attached policy: rule 'h' (#1): when.event: unknown event" in alert
    assert engine.rules == [] and "workbench.attached_policy_applied" not in tracker.tags


def test_workbench_attach_stops_a_live_run_with_the_attached_rule(tracking_uri, run_grokking, monkeypatch, capsys):
    monkeypatch.setattr(policy_engine, "STOP_POLL_SECONDS", 0.0)
    client, real_evaluate, calls = MlflowClient(tracking_uri), grokking._evaluate, []
    policy = Path(tracking_uri.removeprefix("sqlite:///")).parent / "attached.yaml"
    policy.write_text(
        "- {name: any-eval, when: {metric: eval/acc, mode: max, stopping_threshold: 0}, actions: [stop]}\n"
    )

    def attach_from_another_terminal_at_step_5(*args):
        calls.append(1)
        if len(calls) == 2:
            [running] = client.search_runs([client.get_experiment_by_name("grokking").experiment_id])
            assert main(["attach", running.info.run_id, str(policy), "--tracking-uri", tracking_uri]) == 0
        return real_evaluate(*args)

    monkeypatch.setattr(grokking, "_evaluate", attach_from_another_terminal_at_step_5)
    run = run_grokking("snapshot.enabled=false")
    # Without the attached rule the run trains its 20 steps; with it, it stops at the first eval after the poll.
    assert run.info.status == "FINISHED" and run.data.tags["workbench.stopped_at_step"] == "10"
    assert run.data.tags["workbench.stop_reason"].startswith("rule 'any-eval': eval/acc = ")
    assert json.loads(run.data.tags["workbench.attached_policy_applied"]) == {"step": 5, "rules": ["any-eval"]}
    [artifact] = client.list_artifacts(run.info.run_id, "policies")
    assert client.download_artifacts(run.info.run_id, artifact.path, str(policy.parent / "dl")).endswith(".yaml")
    assert "attached to run" in capsys.readouterr().out
    assert main(["attach", run.info.run_id, str(policy), "--tracking-uri", tracking_uri]) == 2
    assert "is FINISHED, not RUNNING; nothing to attach a policy to" in capsys.readouterr().err


def test_attach_refuses_a_broken_policy_before_looking_for_the_run(tracking_uri, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- {name: p, when: {metric: eval/acc, patiense: 3}, actions: [stop]}\n")
    assert main(["attach", "0123abcd", str(bad), "--tracking-uri", tracking_uri]) == 2
    assert capsys.readouterr().err == f"workbench: error: {bad}: line 1: rule 'p' (#1): when.patiense: unknown key\n"
    assert not (tmp_path / "mlflow.db").exists()  # not even a store was opened


def test_a_policy_too_long_for_a_tag_is_refused_rather_than_truncated(tracking_uri):
    text = "".join(f"- {{name: r{i}, when: {{metric: eval/acc, above: 0.5}}, actions: [alert]}}\n" for i in range(100))
    with pytest.raises(WorkbenchError, match=r"^big.yaml: \d+ characters, too long to attach"):
        attach_policy("0123abcd", text, tracking_uri, "big.yaml")


def test_an_error_inside_a_rule_becomes_an_alert_and_disables_the_rule():
    tracker = FakeTracker()
    engine = make_engine({"name": "r", "when": {"metric": "m", "above": 0}, "actions": ["stop"]}, tracker=tracker)
    decision = engine.observe(0, {"m": "not a number"})
    assert not decision.stop and "rule 'r' disabled: ValueError" in decision.alerts[0]
    assert not engine.observe(1, {"m": 5.0}).stop
    assert ("event/r", 1.0, 0) in tracker.metrics


def test_a_failing_forecaster_disables_the_rules_on_its_event():
    class Broken(WindowForecaster):
        def observe(self, step, metrics):
            raise RuntimeError("boom")

    engine = make_engine(HOLD, forecasters=[Broken(0, 10)])
    decision = engine.observe(0, {"m": 1.0})
    assert "rule 'protect' disabled: forecaster 'fake_forecast' failed: RuntimeError: boom" in decision.alerts[0]


def test_the_label_free_forecast_on_a_run_without_snapshots_is_disabled_with_an_alert_and_the_run_goes_on():
    from analysis.forecast import FORECASTERS

    hold = {"name": "protect", "when": {"event": "grokking_forecast_label_free"}, "actions": ["hold"]}
    flat = {"name": "flat", "when": {"metric": "train/acc", "mode": "max", "patience": 5}, "actions": ["stop"]}
    engine = make_engine(hold, flat, forecasters=[FORECASTERS["grokking_forecast_label_free"]()])
    decisions = [engine.observe(step, {"train/acc": 1.0}) for step in range(0, 100, 10)]  # no embed/fourier_gini
    disabled = [(step, a) for step, d in zip(range(0, 100, 10), decisions, strict=True) for a in d.alerts]
    assert [step for step, alert in disabled if "'protect' disabled" in alert] == [10]  # sustain 2: at the 2nd
    assert (
        "rule 'protect' disabled: forecaster 'grokking_forecast_label_free' failed: ValueError: "
        "embed/fourier_gini is not logged" in decisions[1].alerts[0]
    )
    assert [d.stop for d in decisions].index(True) == 5  # the other rule goes on: best at 0, 5 steps not beaten


def test_a_metric_the_run_never_logs_is_reported_against_its_keys_and_the_rule_disabled():
    typo = {"name": "typo", "when": {"metric": "eval/accuracy", "mode": "max", "patience": 1}, "actions": ["stop"]}
    absent = {"name": "kl", "when": {"metric": "kl", "above": 10}, "actions": ["stop"]}
    engine = make_engine(typo, absent)
    decision = engine.observe(0, {"eval/acc": 0.1, "eval/loss": 2.0, "train/loss": 1.0})
    assert decision.alerts == [
        "policy, step 0: alert: rule 'typo' disabled: metric 'eval/accuracy' never logged (did you mean eval/acc?); "
        "this run logs eval/acc, eval/loss, train/loss"
    ]
    for step in (1, 2, 3):
        assert not engine.observe(step, {"eval/acc": 0.1}).stop  # the typo'd rule would have stopped here
    # No top-level key is logged, so only the end of the run can tell that `kl` never comes.
    assert engine.finish() == [
        "policy, step 3: alert: rule 'kl' disabled: metric 'kl' never logged; this run logs eval/acc, eval/loss, "
        "train/loss"
    ]


# --- bad input ------------------------------------------------------------------------------------------

GOOD_RULE = "- name: ok\n  when: {metric: eval/acc, above: 0.5}\n  actions: [alert]\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            GOOD_RULE + "- name: lid-drop\n  when: {metric: geom/x, drop_from_peak: 0.2}\n  actions: [pause]\n",
            "rule 'lid-drop' (#2): actions: unknown action 'pause' (expected alert, checkpoint, stop, hold)",
        ),
        (
            "- {name: p, when: {metric: m, mode: max, patience: -1}, actions: [stop]}\n",
            "rule 'p' (#1): when.patience: Input should be greater than or equal to 0 (got -1)",
        ),
        ("- {name: p, when: {metric: m, patiense: 3}, actions: [stop]}\n", "rule 'p' (#1): when.patiense: unknown key"),
        ("- {name: p, when: {metric: m, above: 1}, action: [stop]}\n", "rule 'p' (#1): actions: Field required"),
        ("- {name: p, when: {metric: m, patience: 3}, actions: [stop]}\n", "when: mode: required with patience"),
        ("- {name: p, when: {metric: m}, actions: [stop]}\n", "rule 'p' (#1): when: metric 'm': no test given"),
        ("- {name: p, when: {metric: m, event: e}, actions: [stop]}\n", "expected exactly one of metric, event"),
        ("- {name: p, when: {event: e, above: 1}, actions: [hold]}\n", "when: above: only valid with metric"),
        ("- {name: p, when: {metric: m, slope_below: 0}, actions: [stop]}\n", "slope_below and window: give both"),
        ("- {name: p, when: {any: [{metric: m, min_delta: 1, above: 0}]}, actions: [stop]}\n", "when.any.0: min_delta"),
        ("- {name: p, when: {event: e}, actions: [hold, stop]}\n", "actions: hold and stop in one rule contradict"),
        (GOOD_RULE + GOOD_RULE, "rule 'ok' (#2): name: 'ok' is already rule #1"),
        ("- [1, 2]\n", "rule #1: expected a mapping with name, when, actions"),
        ("name: x\n", "expected a list of rules, got dict"),
        ("- {name: p, when: {metric: m, above: 1}, actions: [stop]\n", "invalid YAML at line"),
    ],
)
def test_bad_policy_is_one_line_naming_file_rule_and_field(tmp_path, text, expected):
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(WorkbenchError) as err:
        load_rules(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and expected in message and "\n" not in message


def test_missing_policy_file_and_unknown_event_are_one_line_errors(tmp_path):
    with pytest.raises(WorkbenchError, match=r"absent.yaml: no such policy file$"):
        load_rules(tmp_path / "absent.yaml")
    with pytest.raises(WorkbenchError, match=r"rule 'protect' \(#1\): when.event: unknown event 'fake_forecast'"):
        make_engine(HOLD)  # no forecaster of that name


def test_inline_policies_in_a_config_are_checked_with_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stage: grokking\npolicies: [{name: x, when: {metric: m, above: 1}, actions: [pause]}]\n")
    with pytest.raises(WorkbenchError) as err:
        load_config(path)
    assert str(err.value) == (
        f"{path}: policies: rule 'x' (#1): actions: unknown action 'pause' (expected alert, checkpoint, stop, hold)"
    )


def test_a_policy_path_is_read_relative_to_the_config_and_policy_files_add_rules(tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    (folder / "policies").mkdir(parents=True)
    (folder / "policies" / "a.yaml").write_text(GOOD_RULE)
    (folder / "c.yaml").write_text("stage: grokking\npolicies: policies/a.yaml\n")
    extra = tmp_path / "b.yaml"
    extra.write_text(GOOD_RULE.replace("name: ok", "name: more"))
    monkeypatch.chdir(tmp_path)  # not the config's folder
    config = attach_policies(load_config(folder / "c.yaml"), folder / "c.yaml", [extra])
    assert [rule["name"] for rule in config.policies] == ["ok", "more"]
    extra.write_text(GOOD_RULE)
    with pytest.raises(WorkbenchError, match=r"b.yaml: rule 'ok': name: already a rule of .*a.yaml"):
        attach_policies(load_config(folder / "c.yaml"), folder / "c.yaml", [extra])


def test_the_example_policy_stops_a_plateau_unless_grokking_is_forecast():
    def stop_step(forecast_until):
        forecaster = WindowForecaster(0, forecast_until)
        forecaster.name = "grokking_forecast"
        engine = PolicyEngine(load_rules(EXAMPLE_POLICY), forecasters=[forecaster], console=False)
        return next(s for s in range(0, 1000, 10) if engine.observe(s, {"eval/acc": 0.1}).stop)

    unheld = stop_step(forecast_until=0)  # a flat test accuracy: the plateau rule ends the run
    assert stop_step(forecast_until=unheld + 100) == unheld + 100  # held until the forecast ends


# --- the command line -----------------------------------------------------------------------------------


def test_policy_verbs_have_help():
    for verb in ("backtest", "stop", "attach", "events"):
        out = subprocess.run([sys.executable, "-m", "workbench.cli", verb, "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and "usage: workbench " + verb in out.stdout


def test_a_bad_policy_refuses_the_run_before_it_is_created(tracking_uri, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- {name: p, when: {metric: m, mode: max, patience: -1}, actions: [stop]}\n")
    code = main(["run", DEFAULT_CONFIG, "--policy", str(bad), *TINY_GROKKING, f"tracking.uri={tracking_uri}"])
    err = capsys.readouterr().err
    assert code == 2 and f"{bad}: rule 'p' (#1): when.patience" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "mlflow.db").exists()  # no run, not even a store


def test_stop_and_events_refuse_unknown_runs(tracking_uri, capsys):
    for verb in ("stop", "events"):
        assert main([verb, "0123abcd", "--tracking-uri", tracking_uri]) == 2
        assert "run 0123abcd: not found" in capsys.readouterr().err


def test_workbench_stop_ends_a_live_run_at_its_next_step_boundary(tracking_uri, run_grokking, monkeypatch, capsys):
    monkeypatch.setattr(policy_engine, "STOP_POLL_SECONDS", 0.0)
    client, real_evaluate, calls = MlflowClient(tracking_uri), grokking._evaluate, []

    def stop_from_another_terminal_at_step_5(*args):
        calls.append(1)
        if len(calls) == 2:
            [running] = client.search_runs([client.get_experiment_by_name("grokking").experiment_id])
            assert main(["stop", running.info.run_id, "--tracking-uri", tracking_uri]) == 0
        return real_evaluate(*args)

    monkeypatch.setattr(grokking, "_evaluate", stop_from_another_terminal_at_step_5)
    run = run_grokking("snapshot.enabled=false")
    run_id = run.info.run_id
    assert run.info.status == "KILLED"  # stopped by the user: MLflow's KILLED; a policy's stop ends FINISHED
    assert run.data.tags["workbench.stop_reason"] == "stop requested"
    assert run.data.tags["workbench.stopped_at_step"] == "5"
    assert [m.step for m in client.get_metric_history(run_id, "eval/acc")] == [0, 5]
    assert [a.path for a in client.list_artifacts(run_id, "checkpoints")] == ["checkpoints/step_00000005"]
    assert "stopped at step 5 of 20: stop requested" in capsys.readouterr().out
    assert main(["stop", run_id, "--tracking-uri", tracking_uri]) == 2
    assert "is KILLED, not RUNNING" in capsys.readouterr().err
