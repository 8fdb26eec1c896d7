"""The main job's default (`configs/grokking.yaml`), chosen by a measured search and confirmed on other seeds.

    python benchmarks/main_job.py search --jobs 2   # the grid on seeds 100, 101 (~9 min on 2 cores; resumable)
    python benchmarks/main_job.py confirm           # the chosen setting on seeds 0-4, one run at a time, both cores
    python benchmarks/main_job.py report            # writes benchmarks/results/main_job.{json,md}

What is wanted is grokking as the papers show it (Power et al. 2022, fig. 1): test accuracy at chance long after
the train split is memorised, then a jump. Addition is commutative, so a test pair (b, a) whose mirror (a, b) is
in the train split is answered from memory: with each ordered pair split on its own, about `train_fraction` of
the test pairs are, and test accuracy sits there, not at chance, from memorisation on. The grid is therefore of
addition with `task.split=unordered` ((a, b) and (b, a) in the same split). An earlier grid of subtraction, which
has no mirrors, found no setting (commit a291cd2 holds that script and its results): test accuracy left chance
at memorisation and most runs fell back after reaching 0.95.

The selection rule: among the settings where both search seeds stay within 5 points of chance (1/p) until at
least 3x the memorisation step, reach test accuracy 0.95 within the step budget and still have it at the end of
the budget, the one whose slower seed gets there first. The first two conditions were fixed before the
subtraction grid ran; the third was added after this grid's results were seen (the rule without it picked
train fraction 0.5 and weight decay 2.0, one of whose seeds fell back to 0.86): the confirmation seeds are the
figures that were not looked at. Run time is measured by `confirm` alone (the search runs two jobs at once, a
core each).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from queue import Queue

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from forecast_suite import finished_runs, landmarks, run_member  # noqa: E402

STORE = ROOT / "benchmarks" / ".main_job"
SEARCH, CONFIRM = "main-job-search", "main-job-confirm"
BUDGET = 1500  # steps: the main job's train.max_steps
CHANCE_MARGIN = 0.05  # "within a few points of chance"
STAYS_AT = 0.95  # test accuracy at the end of the budget: a run that fell back from 0.95 has not generalised
SEARCH_SEEDS, CONFIRM_SEEDS = (100, 101), (0, 1, 2, 3, 4)
GRID = {"task.train_fraction": (0.45, 0.5, 0.55), "optim.weight_decay": (1.0, 2.0)}
FIXED = ["task.op=+", "task.p=59", "task.split=unordered", "optim.lr=3e-3"]


def settings() -> list[list[str]]:
    return [[f"{k}={v}" for k, v in zip(GRID, values, strict=True)] for values in itertools.product(*GRID.values())]


def run_name(setting: list[str], seed: int) -> str:
    return "-".join(o.split("=", 1)[1] for o in setting) + f"-s{seed}"


def cmd_search(args: argparse.Namespace) -> None:
    from concurrent.futures import ThreadPoolExecutor

    done = finished_runs(STORE, SEARCH)
    todo = [(s, seed) for s in settings() for seed in SEARCH_SEEDS if run_name(s, seed) not in done]
    print(f"{len(todo)} search runs to go, {args.jobs} at a time", flush=True)
    cores: Queue = Queue()
    for core in sorted(os.sched_getaffinity(0))[: args.jobs]:
        cores.put(core)
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [
            pool.submit(run_member, run_name(s, seed), [*FIXED, *s, f"seed={seed}"], cores, STORE, SEARCH, [], BUDGET)
            for s, seed in todo
        ]
        for future in futures:
            name, code = future.result()
            print(f"  {name}: exit {code}", flush=True)


def measure(run_id: str, experiment_store: Path = STORE) -> dict:
    """Landmarks of one run, where its chance plateau ends, its run time and its last layer's TwoNN."""
    from workbench.runs import metric_histories

    uri = f"sqlite:///{experiment_store / 'mlflow.db'}"
    histories = metric_histories(run_id, uri)
    by_step: dict[int, dict[str, float]] = {}
    for key in ("train/acc", "eval/acc"):
        for step, value in zip(*histories[key], strict=True):
            by_step.setdefault(step, {})[key] = value
    marks = landmarks(by_step)
    from mlflow import MlflowClient

    run = MlflowClient(uri).get_run(run_id)
    chance = 1 / int(run.data.params["task.p"])
    after = [s for s in sorted(by_step) if marks["memorised"] is not None and s >= marks["memorised"]]
    left_chance = next((s for s in after if by_step[s]["eval/acc"] > chance + CHANCE_MARGIN), None)
    since = [by_step[s]["eval/acc"] for s in sorted(by_step) if marks["generalised"] and s >= marks["generalised"]]
    twonn = sorted(k for k in histories if k.startswith("geom/lid_twonn/layer_"))
    return {
        **marks,
        "left_chance": left_chance,
        "plateau_ratio": None if left_chance is None or not marks["memorised"] else left_chance / marks["memorised"],
        "final_eval_acc": histories["eval/acc"][1][-1],
        # loss spikes after generalising (train and test accuracy fall for a few evaluations, then recover)
        "evals_under_0.9_after": sum(a < 0.9 for a in since) if since else None,
        "min_eval_acc_after": min(since) if since else None,
        "last_layer_twonn": histories[twonn[-1]][1][-1] if twonn else None,
        "run_s": (run.info.end_time - run.info.start_time) / 1000,
        # wall time from the run's start to the evaluation that first read test acc >= 0.95
        "s_to_generalised": None
        if marks["generalised"] is None
        else next(
            (m.timestamp - run.info.start_time) / 1000
            for m in MlflowClient(uri).get_metric_history(run_id, "eval/acc")
            if m.step == marks["generalised"]
        ),
    }


def choose(search: dict[str, dict]) -> list[str] | None:
    """The selection rule of the module's docstring."""
    best, best_step = None, None
    for setting in settings():
        seeds = [search.get(run_name(setting, seed)) for seed in SEARCH_SEEDS]
        if any(m is None for m in seeds):
            continue
        ok = all(
            m["generalised"] is not None and (m["plateau_ratio"] or 0) >= 3 and m["final_eval_acc"] >= STAYS_AT
            for m in seeds
        )
        slower = max((m["generalised"] or BUDGET + 1) for m in seeds)
        if ok and (best_step is None or slower < best_step):
            best, best_step = setting, slower
    return best


def cmd_confirm(args: argparse.Namespace) -> None:
    chosen = choose(_measured(SEARCH))
    if chosen is None:
        raise SystemExit("no setting of the grid meets the rule; nothing to confirm")
    done = finished_runs(STORE, CONFIRM)
    for seed in CONFIRM_SEEDS:
        name = run_name(chosen, seed)
        if name in done:
            continue
        started = time.monotonic()
        cmd = [
            sys.executable, "-m", "workbench.cli", "run", str(ROOT / "configs" / "grokking.yaml"),
            *FIXED, *chosen, f"seed={seed}", f"train.max_steps={BUDGET}",
            f"tracking.uri=sqlite:///{STORE / 'mlflow.db'}", f"tracking.experiment={CONFIRM}",
            f"tracking.run_name={name}",
        ]  # fmt: skip
        with (STORE / "logs" / f"{name}.log").open("w") as out:
            code = subprocess.run(cmd, cwd=STORE, stdout=out, stderr=subprocess.STDOUT).returncode
        print(f"  {name}: exit {code} in {time.monotonic() - started:.0f} s", flush=True)


def _measured(experiment: str) -> dict[str, dict]:
    return {name: measure(run_id) for name, run_id in sorted(finished_runs(STORE, experiment).items())}


def cmd_report(args: argparse.Namespace) -> None:
    search = _measured(SEARCH)
    chosen = choose(search)
    confirm = _measured(CONFIRM)
    result = {"grid": GRID, "fixed": FIXED, "budget": BUDGET, "chosen": chosen, "search": search, "confirm": confirm}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "main_job.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "main_job.md").write_text(markdown(result))
    print(f"chosen: {chosen}; wrote {args.out / 'main_job.md'}")


def markdown(result: dict) -> str:
    def f(value, fmt="{}"):
        return "-" if value is None else fmt.format(value)

    header = (
        "| run | memorised | left chance (+5 pts) | plateau / memorisation | test acc 0.5 | test acc 0.95 "
        "| final test acc | evals under 0.9 after 0.95 (lowest) "
        "| last layer TwoNN | s to test acc 0.95 | run time (s) |\n|---|---|---|---|---|---|---|---|---|---|---|"
    )

    def rows(runs: dict) -> list[str]:
        return [
            f"| {name} | {f(m['memorised'])} | {f(m['left_chance'])} | {f(m['plateau_ratio'], '{:.1f}')} "
            f"| {f(m['grokked'])} | {f(m['generalised'])} | {m['final_eval_acc']:.3f} "
            f"| {f(m['evals_under_0.9_after'])} ({f(m['min_eval_acc_after'], '{:.2f}')}) "
            f"| {f(m['last_layer_twonn'], '{:.2f}')} | {f(m['s_to_generalised'], '{:.0f}')} | {m['run_s']:.0f} |"
            for name, m in runs.items()
        ]

    return (
        "\n".join(
            [
                "# The main job's default (`python benchmarks/main_job.py search / confirm / report`)",
                "",
                f"Grid over {', '.join(result['grid'])} with {' '.join(result['fixed'])}, {result['budget']} steps, "
                f"seeds {SEARCH_SEEDS} (two runs at a time, a core each: their run times are not the main job's). "
                f"Chosen by the rule in the script's docstring: `{' '.join(result['chosen'] or ['none'])}`.",
                "",
                header,
                *rows(result["search"]),
                "",
                f"## The chosen setting on seeds {CONFIRM_SEEDS} (one run at a time, both cores)",
                "",
                header,
                *rows(result["confirm"]),
            ]
        )
        + "\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    search = verbs.add_parser("search", help="run the grid (resumable)")
    search.add_argument("--jobs", type=int, default=2)
    verbs.add_parser("confirm", help="run the chosen setting on the confirmation seeds")
    report = verbs.add_parser("report", help="measure every run and write the results")
    report.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    STORE.mkdir(parents=True, exist_ok=True)
    {"search": cmd_search, "confirm": cmd_confirm, "report": cmd_report}[args.verb](args)


if __name__ == "__main__":
    main()
