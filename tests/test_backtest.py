import contextlib
import io

import pytest
from conftest import DEFAULT_CONFIG, TINY_GROKKING
from mlflow import MlflowClient

from workbench.backtest import backtest, backtest_run, run_events
from workbench.cli import main
from workbench.policies import load_rules

# Stateful rules (a once-only alert, patience with a warm-up, a threshold) over train, eval and geometry keys.
POLICY = """
- name: lid-seen
  when: {metric: geom/lid_twonn/layer_01, above: 0}
  actions: [alert]
  once: true
- name: eval-flat
  when: {metric: eval/acc, mode: max, patience: 2, min_delta: 0.05, warmup_steps: 5}
  actions: [alert]
- name: half-memorised
  when: {metric: train/acc, mode: max, stopping_threshold: 0.5}
  actions: [checkpoint, stop]
"""
MAX_STEPS = 40


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """One tiny grokking run the policy stops; returns (exit code, run, tracking URI, policy file, stdout)."""
    tmp = tmp_path_factory.mktemp("backtest")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    policy = tmp / "policy.yaml"
    policy.write_text(POLICY)
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out):
        patch.chdir(tmp)
        args = [*TINY_GROKKING, f"train.max_steps={MAX_STEPS}", f"tracking.uri={uri}"]
        code = main(["run", DEFAULT_CONFIG, "--policy", str(policy), *args])
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("grokking").experiment_id])
    return code, run, uri, policy, out.getvalue()


def test_a_policy_stops_a_live_run_cleanly_with_a_checkpoint(stopped_run):
    code, run, uri, _, out = stopped_run
    client, run_id, tags = MlflowClient(uri), run.info.run_id, run.data.tags
    step = int(tags["workbench.stopped_at_step"])
    assert code == 0 and run.info.status == "FINISHED" and 0 < step < MAX_STEPS
    assert tags["workbench.stop_reason"].startswith("rule 'half-memorised': train/acc = ")
    assert [a.path for a in client.list_artifacts(run_id, "checkpoints")] == [f"checkpoints/step_{step:08d}"]
    assert {a.path for a in client.list_artifacts(run_id)} >= {"model", "checkpoints", "config.yaml"}
    assert client.get_metric_history(run_id, "eval/acc")[-1].step == step
    assert [m.step for m in client.get_metric_history(run_id, "final/eval_acc")] == [step]
    assert f"stopped at step {step} of {MAX_STEPS}: rule 'half-memorised'" in out
    assert "half-memorised" in run.data.params["policies"]  # the run records the policy it ran with


def test_backtest_stops_where_the_live_run_stopped(stopped_run):
    _, run, uri, policy, _ = stopped_run
    client, run_id = MlflowClient(uri), run.info.run_id
    result = backtest_run(load_rules(policy), run_id, uri)
    live_step = int(run.data.tags["workbench.stopped_at_step"])
    assert result.stop_step == live_step
    assert result.reason == run.data.tags["workbench.stop_reason"]
    assert result.saved == pytest.approx((MAX_STEPS - live_step) / MAX_STEPS) and result.budget == MAX_STEPS
    for name in ("lid-seen", "eval-flat"):  # alerts at the same steps as the live run logged them
        replayed = [f.step for f in result.firings if f.kind == "alert" and f.name == name]
        logged = run.data.metrics.get(f"event/{name}") and client.get_metric_history(run_id, f"event/{name}")
        assert replayed == [m.step for m in logged or []], name
    [monitored] = result.monitored
    assert monitored.metric == "train/acc" and monitored.at_stop >= 0.5 and monitored.final[0] == live_step


def test_backtest_cli_prints_the_stop_step_and_savings_per_run(stopped_run, capsys):
    _, run, uri, policy, _ = stopped_run
    step = int(run.data.tags["workbench.stopped_at_step"])
    assert main(["backtest", str(policy), "--experiment", "grokking", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    header, row = out.splitlines()[:2]
    assert header.split()[:4] == ["run", "name", "stop", "step"]
    assert row.startswith(run.info.run_id[:12]) and f" {step} " in row
    assert f"{(MAX_STEPS - step) / MAX_STEPS:.0%} of {MAX_STEPS}" in row
    assert f"step {step:>7}  stop" in out


def test_backtest_of_a_policy_that_never_fires_saves_nothing(stopped_run, tmp_path):
    _, run, uri, _, _ = stopped_run
    never = tmp_path / "never.yaml"
    never.write_text("- {name: n, when: {metric: eval/loss, mode: min, divergence_threshold: 1e9}, actions: [stop]}")
    [result] = backtest(never, [run.info.run_id], tracking_uri=uri)
    assert result.stop_step is None and result.saved == 0.0 and result.firings == []
    [monitored] = result.monitored
    values = [m.value for m in MlflowClient(uri).get_metric_history(run.info.run_id, "eval/loss")]
    assert monitored.at_stop is None and monitored.best[1] == min(values) and monitored.final[1] == values[-1]


def test_events_lists_alerts_and_the_stop_in_step_order(stopped_run, capsys):
    _, run, uri, _, _ = stopped_run
    step = int(run.data.tags["workbench.stopped_at_step"])
    events = run_events(run.info.run_id, uri)
    assert (events[0].step, events[0].kind, events[0].name) == (0, "alert", "lid-seen")
    assert (events[-1].step, events[-1].kind) == (step, "stop")
    assert [e.step for e in events] == sorted(e.step for e in events)
    assert main(["events", run.info.run_id, "--tracking-uri", uri]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["step", "kind", "name", "details"] and len(lines) == len(events) + 1
    assert "geom/lid_twonn/layer_01 = " in lines[1] and "rule 'half-memorised'" in lines[-1]


def test_backtest_needs_existing_runs(stopped_run, capsys):
    _, _, uri, policy, _ = stopped_run
    assert main(["backtest", str(policy), "0123abcd", "--tracking-uri", uri]) == 2
    assert "run 0123abcd: not found" in capsys.readouterr().err
    assert main(["backtest", str(policy), "--tracking-uri", uri]) == 2
    assert "no runs given" in capsys.readouterr().err
