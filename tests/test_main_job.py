"""The main job's selection rule (benchmarks/main_job.py), on hand-made measurements."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import main_job  # noqa: E402


def _measured(generalised: int | None, plateau_ratio: float | None, final: float = 0.99) -> dict:
    return {"generalised": generalised, "plateau_ratio": plateau_ratio, "final_eval_acc": final}


def test_the_rule_takes_the_setting_whose_slower_seed_generalises_first_among_those_with_a_chance_plateau():
    fast_no_plateau, fell_back, slow, quick, unfinished = main_job.settings()[:5]
    search = {}
    for setting, per_seed in (
        (fast_no_plateau, [_measured(300, 2.0), _measured(320, 3.5)]),  # first, but one seed leaves chance at 2x
        (fell_back, [_measured(400, 4.0), _measured(450, 3.0, final=0.86)]),  # one seed ends under 0.95
        (slow, [_measured(900, 4.0), _measured(1500, 5.0)]),
        (quick, [_measured(1100, 3.0), _measured(700, 6.0)]),  # slower seed at 1 100: beats `slow`'s 1 500
        (unfinished, [_measured(None, 8.0), _measured(400, 4.0)]),  # a seed that never generalised is out
    ):
        for seed, measured in zip(main_job.SEARCH_SEEDS, per_seed, strict=True):
            search[main_job.run_name(setting, seed)] = measured
    assert main_job.choose(search) == quick
    del search[main_job.run_name(quick, main_job.SEARCH_SEEDS[1])]  # a setting with a seed not yet run is out
    assert main_job.choose(search) == slow
    search[main_job.run_name(fell_back, main_job.SEARCH_SEEDS[1])]["final_eval_acc"] = 0.95  # at the bar: in
    assert main_job.choose(search) == fell_back
    assert main_job.choose({}) is None


def test_run_names_say_the_setting_and_seed():
    assert main_job.run_name(["task.train_fraction=0.5", "optim.weight_decay=2.0"], 100) == "0.5-2.0-s100"
