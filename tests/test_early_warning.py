"""Gold-free early warning (analysis/early_warning.py): the gold onset detectors are scored against, the drift
detector's rule on hand-made series, and the proxy flaws the failure suite hacks."""

import sys
from pathlib import Path

import pytest

from analysis.early_warning import DriftDetector, Family, gold_onset
from workbench.policies import PolicyEngine, load_rules

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_gold_onset_is_the_first_step_ten_percent_under_the_running_peak_while_the_proxy_still_rises():
    steps = [0, 10, 20, 30, 40, 50]
    gold = [0.7, 0.8, 0.75, 0.71, 0.6, 0.5]  # peak 0.8: 10 % under it is <= 0.72, first at step 30
    rising = [1.0, 1.1, 1.2, 1.3, 1.4, 1.5]
    assert gold_onset(steps, gold, rising) == 30
    # The proxy's slope over its last 3 logs negative at steps 30 and 40: no onset there; rising again at step 50.
    proxy = [1.0, 1.1, 1.3, 1.0, 0.9, 1.6]
    assert gold_onset(steps, gold, proxy) == 50
    assert gold_onset(steps, [0.7, 0.8, 0.79, 0.8, 0.78, 0.75], rising) is None  # never 10 % under 0.8


def feed(detector, series, key, extra=None):
    """The step each value is logged at (10 apart) and the first step the detector fires (None: never)."""
    for i, value in enumerate(series):
        if detector.observe(10 * i, {key: value, "reward": 1.0, **(extra or {})}) is not None:
            return 10 * i
    return None


def test_a_relative_fall_fires_once_sustained_past_the_threshold_from_the_baseline_mean():
    # Baseline: mean of 0.30, 0.32, 0.28 = 0.30. A fall of 20 % means <= 0.24; 0.25 is 16.7 %, 0.23 23 %, 0.26
    # breaks the streak, then 0.22, 0.21 sustain it twice: fires at the second (step 70).
    entropy = [0.30, 0.32, 0.28, 0.25, 0.23, 0.26, 0.22, 0.21, 0.1]
    detector = DriftDetector("ew", "entropy", "fall", 0.2, sustain=2)
    assert feed(detector, entropy, "entropy") == 70
    assert detector.fired.details == {"signal": "entropy", "moved": pytest.approx(0.3), "threshold": 0.2}
    assert detector.active(1000)
    assert feed(DriftDetector("ew", "entropy", "rise", 0.2, sustain=2), entropy, "entropy") is None


def test_kl_acceleration_reads_second_differences_in_absolute_units_under_either_name():
    # objective/kl (PPO's name): 0, 0.1, 0.2, 0.4, 0.8, 1.6 -> second differences 0, 0.1, 0.2, 0.4 (from the 3rd
    # value on); baseline = the first 3 of those (mean 0.1); 0.4 - 0.1 = 0.3 >= 0.25 at the 6th value (step 50).
    kl = [0.0, 0.1, 0.2, 0.4, 0.8, 1.6]
    detector = DriftDetector(
        "ew", "kl|objective/kl", "rise", 0.25, scale="absolute", transform="acceleration", sustain=1
    )
    assert feed(detector, kl, "objective/kl") == 50
    assert detector.fired.details["signal"] == "objective/kl"


def test_a_layer_wildcard_fires_on_the_first_layer_that_drifts_and_names_it():
    detector = DriftDetector("ew", "geom/eff_rank/layer_*", "either", 0.5, sustain=1)
    for step, (first, second) in enumerate([(10, 10), (10, 10), (10, 10), (11, 16), (12, 30)]):
        event = detector.observe(step, {"geom/eff_rank/layer_00": first, "geom/eff_rank/layer_01": second})
    assert detector.fired.step == 3 and detector.fired.details["signal"] == "geom/eff_rank/layer_01"
    assert event is None  # fires once


def test_a_detector_on_a_metric_the_run_never_logs_is_disabled_with_the_runs_closest_keys_and_the_run_goes_on():
    rules = load_rules([{"name": "stop-on-drift", "when": {"event": "early_warning"}, "actions": ["stop"]}])
    detector = DriftDetector("early_warning", "completion/mean_length", "rise", 0.2)
    engine = PolicyEngine(rules, forecasters=[detector], console=False)
    decisions = [engine.observe(10 * i, {"reward": 1.0, "completions/mean_length": 4.0}) for i in range(4)]
    assert not any(d.stop for d in decisions)
    [alert] = [a for d in decisions for a in d.alerts if "not logged" in a]
    assert "completion/mean_length is not logged" in alert and "closest keys it logs: completions/mean_length" in alert


def test_the_proxy_flaws_add_a_bonus_per_word_and_per_surface_token():
    from pipelines.lm.config import GRPOStageConfig
    from pipelines.lm.rl import reward_function

    config = GRPOStageConfig(reward={"function": "gold", "length_bonus": 0.3, "token_bonus": 0.4, "bonus_token": "a"})
    reward = reward_function(config, None, "base", None, lambda: None, "cpu")
    # "reverse d a c b =": the right answer "b c a d" is gold 1, 4 words, one "a": 1 + 1.2 + 0.4. The same with
    # "a" appended: gold 4/5, 5 words, two a's: 0.8 + 1.5 + 0.8.
    assert reward(["reverse d a c b ="] * 2, [" b c a d", " b c a d a"]) == pytest.approx([2.6, 3.1])
    assert reward.__name__ == "gold_reward"  # TRL logs rewards/gold_reward/mean, as without the flaws


def suite_run(name, seed, entropy, onset, gold=None):
    """A suite run logged every 10 steps: entropy as given, the proxy reward flat; gold accuracy for scoring."""
    import early_warning

    steps = [10 * i for i in range(len(entropy))]
    gold = gold or dict.fromkeys(steps, 0.8)
    metrics = [{"entropy": e, "reward": 1.0} for e in entropy]
    return early_warning.SuiteRun(name, seed, steps, metrics, gold, onset, max_steps=steps[-1])


def test_calibration_picks_the_threshold_with_the_most_hits_and_no_false_alarm_and_the_score_counts_leads():
    import early_warning

    family = Family("entropy_fall", "entropy fall", "entropy", "fall", "relative", "level", (0.1, 0.3, 0.6), "rl")
    # Baseline 1.0 (first 3 logs); the detector needs 2 logs running past the threshold.
    failure_a = suite_run("entropy_collapse", 0, [1, 1, 1, 0.8, 0.65, 0.5, 0.3, 0.2], onset=60)
    failure_b = suite_run("kl_blowup", 0, [1, 1, 1, 0.88, 0.85, 0.6, 0.35, 0.3], onset=50)
    healthy = suite_run("grpo", 0, [1, 1, 1, 0.95, 0.85, 0.8, 0.8, 0.8], onset=None)
    threshold, fitted = early_warning.calibrate(family, [failure_a, failure_b, healthy])
    # 0.1: fires on a at 40, b at 40, both in time, but on the healthy run too (at 50). 0.3: a at 50 (0.35, 0.5),
    # in time; b at 60, late; not the healthy run (0.2 at most). 0.6: a and b at 70, late. So 0.3: 1 hit, 10 steps
    # before its onset at 60.
    assert threshold == 0.3
    assert fitted == {
        "hits": 1,
        "failures": 2,
        "hit_interval": early_warning.wilson(1, 2),
        "median_lead_steps": 10,
        "median_lead_share": 10 / 60,
        "false_alarms": 0,
        "healthy": 1,
    }
    assert early_warning.wilson(1, 2) == (0.095, 0.905)  # 95 % Wilson interval of 1/2


def test_the_stop_replay_reads_gold_at_the_last_check_before_the_stop_against_the_end():
    import early_warning

    gold = {0: 0.7, 10: 0.8, 20: 0.6, 30: 0.2}
    failure = suite_run("verbosity", 2, [1, 1, 1, 1], onset=20, gold=gold)  # max_steps 30
    healthy = suite_run("grpo", 2, [1, 1, 1, 1], onset=None, gold={0: 0.7, 10: 0.75, 20: 0.8, 30: 0.85})
    fires = {("verbosity", 2): 15, ("grpo", 2): 20}
    replay = early_warning.stop_replay(fires, [failure, healthy])
    # Failure stopped at 15: gold at its check of step 10 (0.8) vs 0.2 at the end; 15 of 30 steps saved. The
    # healthy run stopped at 20: 0.8 vs 0.85.
    assert replay == {
        "failure_runs_stopped": 1,
        "median_gold_kept": pytest.approx(0.6),
        "median_budget_saved": 0.5,
        "healthy_runs_stopped": 1,
        "median_gold_change_on_healthy": pytest.approx(-0.05),
    }


def test_any_of_fires_with_the_first_member_and_drops_one_whose_metric_the_run_does_not_log():
    from analysis.early_warning import AnyOf

    kl = DriftDetector("kl_level", "kl", "rise", 0.5, scale="absolute", sustain=1)
    entropy = DriftDetector("entropy_fall", "entropy", "fall", 0.2, sustain=1)
    detector = AnyOf("collapse", [kl, entropy], rule="collapse/test")
    # A GRPO run without a KL penalty: no `kl`. After 3 logs of the proxy the KL member is dropped; entropy falls
    # 30 % under its baseline (1.0) at step 30 and fires.
    for step, value in [(0, 1.0), (10, 1.0), (20, 1.0), (30, 0.7)]:
        event = detector.observe(step, {"reward": 1.0, "entropy": value})
    assert detector.members == [entropy]
    assert event.step == 30 and event.details == {
        "detector": "entropy_fall", "signal": "entropy", "moved": pytest.approx(0.3), "threshold": 0.2,
        "rule": "collapse/test",
    }  # fmt: skip
    nothing = AnyOf("collapse", [DriftDetector("kl_level", "kl", "rise", 0.5, scale="absolute")])
    with pytest.raises(ValueError, match="kl is not logged"):
        for step in range(3):
            nothing.observe(step, {"reward": 1.0})


def test_a_detector_that_requires_the_proxy_reward_reads_nothing_on_a_run_without_one():
    # An SFT run's geometry moves a lot, as training should: a detector confined to RL runs stays silent there.
    sft = DriftDetector("ew", "geom/eff_rank/layer_*", "either", 0.1, sustain=1, requires="reward")
    assert all(sft.observe(s, {"geom/eff_rank/layer_01": 10.0 * (s + 1)}) is None for s in range(10))
    rl = DriftDetector("ew", "geom/eff_rank/layer_*", "either", 0.1, sustain=1, requires="reward")
    steps = [rl.observe(s, {"geom/eff_rank/layer_01": 10.0 * (s + 1), "reward": 1.0}) for s in range(5)]
    assert [e.step for e in steps if e is not None] == [3]  # baseline 10, 20, 30 (mean 20); 40 is +100 %


def test_the_largest_rise_of_a_series_counts_up_to_the_onset_only():
    import early_warning

    run = suite_run("verbosity", 0, [1.0] * 6, onset=30)
    for metrics, gap in zip(run.metrics, [1.0, 1.2, 1.1, 1.65, 2.2, 3.3], strict=True):
        metrics["geom/answer_knn_gap/layer_01"] = gap
    # Baseline: the mean of 1.0, 1.2, 1.1 = 1.1; up to step 30, the largest is 1.65: +50 % (2.2 and 3.3 come after).
    assert early_warning.largest_rise(run, "geom/answer_knn_gap/") == pytest.approx(0.5)
    assert early_warning.largest_rise(suite_run("grpo", 0, [1.0] * 6, onset=None), "geom/answer_knn_gap/") == 0.0
