"""Forecasters on synthetic series whose right answer is known by construction."""

from __future__ import annotations

import pytest

from analysis.forecast import (
    FORECASTERS,
    LABEL_FREE_CANDIDATES,
    CollapseDetector,
    PrecursorForecaster,
    RewardHackingAudit,
    resolve_last_layer,
)


def _grokking_run(loss_drop_from: int, grok: int, steps: int = 600) -> list[tuple[int, dict[str, float]]]:
    """Memorised at 50; eval loss peaks at 100, flat, then falls 1 % per step from `loss_drop_from`; test acc
    jumps to 1 at `grok`."""
    run = []
    for step in range(0, steps + 1, 10):
        loss = 5.0 if step < loss_drop_from else 5.0 * 0.99 ** (step - loss_drop_from)
        run.append(
            (
                step,
                {
                    "train/acc": 1.0 if step >= 50 else 0.5,
                    "eval/acc": 1.0 if step >= grok else 0.02,
                    "eval/loss": loss if step >= 100 else 4.0,
                },
            )
        )
    return run


def _replay(forecaster, run):
    for step, metrics in run:
        event = forecaster.observe(step, metrics)
        if event is not None:
            return event
    return None


def test_precursor_fires_when_the_series_has_left_its_peak_for_three_observations():
    forecaster = PrecursorForecaster("grokking_forecast", "eval/loss", move=0.15, sustain=3, onset_ratio=0.5)
    event = _replay(forecaster, _grokking_run(loss_drop_from=200, grok=400))
    # 15 % below the peak 5.0 needs 0.99^n <= 0.85 (n >= 17), and below the value at memorisation (4.0) needs
    # 0.99^n < 0.8 (n >= 23): first at step 230, so the third such observation is step 250.
    assert event is not None and event.step == 250
    assert event.details["memorised_step"] == 50
    assert event.details["predicted_onset_step"] == 250 + round(0.5 * (250 - 50))
    assert event.details["signal"] == "eval/loss"


def test_a_series_that_ran_away_and_drops_back_part_of_the_way_is_no_precursor():
    # Test loss of a run without weight decay: climbs from 4 to 9 after memorisation, then a spike drops it
    # 20 % - still far above where it stood at memorisation.
    run = [(s, {"train/acc": 1.0, "eval/acc": 0.3, "eval/loss": 4.0 + s / 100}) for s in range(50, 550, 10)]
    run += [(s, {"train/acc": 1.0, "eval/acc": 0.3, "eval/loss": 7.2}) for s in range(550, 700, 10)]
    assert _replay(PrecursorForecaster("grokking_forecast", "eval/loss"), run) is None


def test_precursor_does_not_fire_once_test_accuracy_has_already_jumped():
    # The loss falls only after the jump: that is no forecast.
    forecaster = PrecursorForecaster("grokking_forecast", "eval/loss")
    assert _replay(forecaster, _grokking_run(loss_drop_from=420, grok=400)) is None


def test_precursor_ignores_moves_before_memorisation():
    run = [(s, {"train/acc": 0.5, "eval/acc": 0.0, "eval/loss": 5.0 * 0.9 ** (s / 10)}) for s in range(0, 300, 10)]
    assert _replay(PrecursorForecaster("grokking_forecast", "eval/loss"), run) is None


def test_forecast_holds_until_generalisation_or_expiry():
    forecaster = PrecursorForecaster("grokking_forecast", "eval/loss", expire_ratio=3.0)
    run = _grokking_run(loss_drop_from=200, grok=400)
    event = _replay(forecaster, run)
    assert forecaster.active(event.step) and forecaster.active(390)
    forecaster.observe(400, {"eval/acc": 0.97})
    assert not forecaster.active(410)

    never = PrecursorForecaster("grokking_forecast", "eval/loss", expire_ratio=1.0)
    event = _replay(never, _grokking_run(loss_drop_from=200, grok=10_000, steps=300))
    elapsed = event.step - 50
    assert never.active(event.step + elapsed) and not never.active(event.step + elapsed + 1)


def test_rising_precursor_watches_the_trough():
    run = [
        (s, {"train/acc": 1.0, "eval/acc": 0.0, "x": 1.0 if s < 100 else 1.0 + (s - 100) / 100})
        for s in range(0, 300, 10)
    ]
    event = _replay(PrecursorForecaster("f", "x", direction="rise", move=0.15, sustain=2), run)
    assert event is not None and event.step == 130  # 1.2 at 120 is the first >= 15 % above 1.0; second at 130


def test_layer_last_resolves_to_the_highest_layer():
    keys = {"geom/lid_twonn/layer_00": 1.0, "geom/lid_twonn/layer_02": 1.0, "geom/lid_mle/layer_03": 1.0}
    assert resolve_last_layer("geom/lid_twonn/layer_last", keys) == "geom/lid_twonn/layer_02"
    assert resolve_last_layer("geom/eff_rank/layer_last", keys) is None
    assert resolve_last_layer("eval/loss", keys) == "eval/loss"


def test_collapse_of_effective_rank_needs_two_snapshots_below_a_fifth_of_the_start():
    detector = CollapseDetector()
    assert detector.observe(0, {"geom/eff_rank/layer_01": 40.0}) is None
    assert detector.observe(50, {"geom/eff_rank/layer_01": 7.0}) is None  # first low snapshot
    event = detector.observe(100, {"geom/eff_rank/layer_01": 6.0})
    assert event is not None and event.details["kind"] == "representation" and detector.active(500)


def test_entropy_collapse_is_an_rl_policys_entropy_under_a_tenth_of_its_first_value():
    detector = CollapseDetector()
    assert detector.observe(10, {"entropy": 0.3, "reward": 1.0}) is None
    assert detector.observe(20, {"entropy": 0.031, "reward": 1.2}) is None  # just above 0.1 x 0.3
    event = detector.observe(30, {"entropy": 0.029, "reward": 1.3})
    assert event.details == {"kind": "entropy", "metric": "entropy", "value": 0.029, "first": 0.3}
    supervised = CollapseDetector()  # no proxy reward: falling entropy on demonstrations is fitting them
    assert all(supervised.observe(s, {"entropy": 2.0 / (s + 1)}) is None for s in range(100))


def test_collapse_on_kl():
    assert CollapseDetector().observe(3, {"entropy": 0.6, "kl": 12.0}).details["kind"] == "kl"
    assert CollapseDetector().observe(3, {"entropy": 0.6, "objective/kl": 9.0}) is None


@pytest.mark.parametrize(("gold_trend", "fires"), [(-0.05, True), (0.02, False)])
def test_the_reward_hacking_audit_is_proxy_up_while_gold_falls_from_its_peak(gold_trend, fires):
    detector = RewardHackingAudit(window=5, gold_drop=0.1)
    events = [detector.observe(s, {"reward": 1.0 + 0.1 * s, "gold/accuracy": 0.8 + gold_trend * s}) for s in range(10)]
    fired = [e for e in events if e is not None]
    assert bool(fired) == fires
    if fires:
        assert fired[0].name == "reward_hacking_audit" and fired[0].details["kind"] == "reward_hacking"
        assert fired[0].step == 4  # 5 observations; gold 0.6 is 25 % under its 0.8 peak
    # The gold-free collapse detector never reads gold: the same series leave it silent.
    assert all(
        CollapseDetector().observe(s, {"reward": 1.0 + 0.1 * s, "gold/accuracy": 0.8 - 0.05 * s}) is None
        for s in range(10)
    )


def _memorised_at_10(losses: list[float], weight_norm: list[float]) -> list[tuple[int, dict[str, float]]]:
    """Steps 0, 10, 20, ...: memorised at 10 (train acc 1, test acc 0.02 throughout), with these series from 10."""
    run = [(0, {"train/acc": 0.5, "eval/acc": 0.02, "eval/loss": 9.0, "weight_norm": 40.0})]
    for i, (loss, norm) in enumerate(zip(losses, weight_norm, strict=True)):
        run.append((10 * (i + 1), {"train/acc": 1.0, "eval/acc": 0.02, "eval/loss": loss, "weight_norm": norm}))
    return run


def test_the_shipped_grokking_forecast_is_test_loss_5_percent_under_its_peak_for_3_evaluations():
    # Test loss flat at 5.0 from memorisation (step 10), then 4.8 (4 % under the peak) at 30-50, then 4.7 (6 %)
    # at 60-80: the third 6 % evaluation, step 80, fires. A 4 % threshold would fire at 50, sustain 2 at 70, a
    # 15 % one never. The weight norm drops 20 % at step 20: a weight-norm rule would fire at 40.
    losses = [5.0, 5.0, 4.8, 4.8, 4.8, 4.7, 4.7, 4.7]
    event = _replay(FORECASTERS["grokking_forecast"](), _memorised_at_10(losses, [30.0] + [24.0] * 7))
    assert event.step == 80
    # Predicted onset: fire + 2.4 x (fire - memorised) = 80 + 2.4 x 70 = 248.
    assert event.details == {
        "signal": "eval/loss",
        "memorised_step": 10.0,
        "predicted_onset_step": 248,
        "moved_from_extreme": 0.06,
        "rule": "grokking_forecast/v2: eval/loss 5% under its peak and its memorisation value, 3 evals",
    }


def test_the_shipped_grokking_forecast_waits_for_test_loss_under_its_value_at_memorisation():
    # 4.0 at memorisation, a peak of 5.0, then 4.5 (10 % under the peak, still above 4.0) at 30-50: not yet;
    # 3.9 at 60-80 is under both, so the third, step 80, fires. Without the clause it would fire at 50.
    losses = [4.0, 5.0, 4.5, 4.5, 4.5, 3.9, 3.9, 3.9]
    assert _replay(FORECASTERS["grokking_forecast"](), _memorised_at_10(losses, [30.0] * 8)).step == 80


def test_the_shipped_grokking_forecast_never_fires_once_test_accuracy_has_reached_one_half():
    # The same falling test loss as above (would fire at 80), but test accuracy touched 0.5 at step 40 and fell
    # back to 0.3: the run has already jumped, so nothing it does afterwards is a forecast.
    run = _memorised_at_10([5.0, 5.0, 4.8, 4.8, 4.8, 4.7, 4.7, 4.7], [30.0] * 8)
    run[4][1]["eval/acc"] = 0.5
    for _, metrics in run[5:]:
        metrics["eval/acc"] = 0.3
    assert _replay(FORECASTERS["grokking_forecast"](), run) is None


def test_registry_names_are_the_events_they_fire():
    for name, factory in FORECASTERS.items():
        assert factory().name == name


def test_a_label_free_forecast_never_reads_test_accuracy():
    # The same series with test accuracy already at 1 from the start: a forecaster that reads held-out labels
    # never fires (the run has jumped), the label-free one fires as it would without any accuracy logged.
    run = [(s, {**m, "eval/acc": 1.0}) for s, m in _grokking_run(loss_drop_from=200, grok=0)]
    assert _replay(PrecursorForecaster("grokking_forecast", "eval/loss", move=0.15), run) is None
    label_free = PrecursorForecaster("f", "eval/loss", move=0.15, heldout_labels=False)
    assert _replay(label_free, run).step == 250  # as in the first test: memorised at 50 by train accuracy alone
    assert label_free.active(260)  # and never ended by a test accuracy it does not read


def test_a_label_free_forecast_on_a_run_without_its_series_raises_after_sustain_steps():
    forecaster = PrecursorForecaster("f", "heldout/knn_gap/layer_last", heldout_labels=False, sustain=3)
    forecaster.observe(0, {"geom/lid_twonn/layer_01": 1.0})  # a snapshot step: no train accuracy, not counted
    forecaster.observe(10, {"train/acc": 0.5})
    forecaster.observe(20, {"train/acc": 0.6})
    with pytest.raises(ValueError, match="heldout/knn_gap/layer_last is not logged"):
        forecaster.observe(30, {"train/acc": 0.7})
    logged = PrecursorForecaster("f", "heldout/knn_gap/layer_last", heldout_labels=False, sustain=1)
    assert logged.observe(10, {"train/acc": 0.5, "heldout/knn_gap/layer_01": 1.2}) is None  # found: no error
    assert logged.observe(20, {"train/acc": 0.6}) is None


def test_the_fourier_sparsity_candidate_reads_its_series_at_snapshot_steps_only():
    # train/acc every 10 steps, embed/fourier_gini with each snapshot (every 50); memorised at 50 (Gini 0.1 there)
    gini = {0: 0.08, 50: 0.1, 100: 0.1, 150: 0.17, 200: 0.18, 250: 0.19, 300: 0.2}
    run = [
        (step, {"train/acc": 0.2 if step < 50 else 1.0, **({"embed/fourier_gini": gini[step]} if step in gini else {})})
        for step in range(0, 310, 10)
    ]
    forecaster = LABEL_FREE_CANDIDATES["fourier_gini_rise_75"]()
    # 150 is 1.7x its trough 0.1 (not 1.75x); 200 and 250 are above 1.75x, two snapshots running: fires at 250
    event = _replay(forecaster, run)
    assert (event.step, event.details["memorised_step"], event.details["moved_from_extreme"]) == (250, 50.0, 0.9)
    # a run with snapshots off logs no such series: the forecaster raises, and the engine disables it
    with pytest.raises(ValueError, match="embed/fourier_gini is not logged"):
        _replay(LABEL_FREE_CANDIDATES["fourier_gini_rise_75"](), [(s, {"train/acc": 1.0}) for s in (0, 10, 20)])
