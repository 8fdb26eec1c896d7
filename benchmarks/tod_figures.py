"""The task-oriented dialogue figures: success of the rule expert, random, imitation-only and imitation + PPO.

Runs `workbench run configs/tod_ppo.yaml seed=S` for each seed (in this process, into a throw-away sqlite store)
and reads the run's metrics back: `baseline/<policy>/*` (rule expert, random; the same 200 held-out goals),
`tod/*` at step 0 (untrained), at the end of imitation, and at the end of PPO. Then it runs the first seed again
and compares the curves value for value (same seed on CPU, same curve), and, with `--corpus-sizes`, measures
imitation alone against the corpus size. Writes `benchmarks/results/tod_figures.json` and `tod_figures.md`.

    python benchmarks/tod_figures.py                      # 3 seeds + the repeat: ~6 minutes on 2 idle CPU cores
    python benchmarks/tod_figures.py --corpus-sizes 80 100 200
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

from workbench.cli import main  # noqa: E402
from workbench.config import load_config  # noqa: E402

CONFIG = ROOT / "configs" / "tod_ppo.yaml"
FIGURES = ("success_rate", "inform_f1", "book_rate", "turns")
CURVES = ("tod/success_rate", "train/policy_loss", "entropy", "reward")


def run(store: str, seed: int, *overrides: str) -> tuple[str, float, float]:
    """One `workbench run`; returns (run id, wall seconds, CPU seconds of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    args = ["run", str(CONFIG), f"seed={seed}", f"tracking.uri={store}", "tracking.experiment=tod_figures", *overrides]
    if main(args) != 0:
        raise SystemExit(f"workbench run failed for seed {seed}")
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("tod_figures").experiment_id
    latest = client.search_runs([experiment], order_by=["attribute.start_time DESC"], max_results=1)[0]
    return latest.info.run_id, time.perf_counter() - wall, time.process_time() - cpu


def figures_of(client: MlflowClient, run_id: str, epochs: int) -> dict[str, dict[str, float]]:
    metrics = client.get_run(run_id).data.metrics
    out = {name: {f: metrics[f"baseline/{name}/{f}"] for f in FIGURES} for name in ("rule_expert", "random")}
    history = {f: {m.step: m.value for m in client.get_metric_history(run_id, f"tod/{f}")} for f in FIGURES}
    last = max(history["success_rate"])
    out["untrained"] = {f: history[f][0] for f in FIGURES}
    out["imitation"] = {f: history[f][epochs] for f in FIGURES}
    out["imitation+ppo"] = {f: history[f][last] for f in FIGURES}
    return out


def curves(client: MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    return {key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)] for key in CURVES}


def mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}


def main_benchmark() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--corpus-sizes", type=int, nargs="*", default=[], help="imitation-only runs per size")
    args = parser.parse_args()
    config = load_config(CONFIG)
    epochs = config.imitation.epochs
    results: dict = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores "
        "(shared with other jobs while measured: wall times are upper bounds)",
        "config": str(CONFIG.relative_to(ROOT)),
        "seeds": args.seeds,
        "per_seed": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # artifacts land in the throw-away directory
        store = f"sqlite:///{tmp}/mlflow.db"
        client = MlflowClient(store)
        first_run = None
        for seed in args.seeds:
            run_id, wall, cpu = run(store, seed)
            first_run = first_run or run_id
            results["per_seed"][seed] = {
                "figures": figures_of(client, run_id, epochs),
                "imitation_best_epoch": client.get_run(run_id).data.metrics.get("imitation/best_epoch"),
                "wall_s": wall,
                "cpu_s": cpu,
            }
        repeat, _, _ = run(store, args.seeds[0])
        results["same_seed_same_curve"] = {
            "seed": args.seeds[0],
            "curves_compared": list(CURVES),
            "identical": curves(client, first_run) == curves(client, repeat),
        }
        if args.corpus_sizes:
            results["imitation_by_corpus_size"] = {}
            for size in args.corpus_sizes:
                rates = []
                for seed in args.seeds:
                    shrunk = (f"data.dialogues={size}", "train.max_steps=1", "snapshot.enabled=false")
                    run_id, _, _ = run(store, seed, *shrunk)
                    rates.append(figures_of(client, run_id, epochs)["imitation"]["success_rate"])
                results["imitation_by_corpus_size"][size] = {"per_seed": rates, **mean_std(rates)}
    policies = ("rule_expert", "random", "untrained", "imitation", "imitation+ppo")
    results["summary"] = {
        policy: {f: mean_std([s["figures"][policy][f] for s in results["per_seed"].values()]) for f in FIGURES}
        for policy in policies
    }
    results["summary"]["wall_s"] = mean_std([s["wall_s"] for s in results["per_seed"].values()])
    out = ROOT / "benchmarks" / "results"
    (out / "tod_figures.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "tod_figures.md").write_text(markdown(results))
    print(markdown(results))


def markdown(results: dict) -> str:
    summary, seeds = results["summary"], results["seeds"]
    lines = [
        "# Task-oriented dialogue: success on the synthetic multi-domain set",
        "",
        f"`{results['config']}`, seeds {seeds}, {results['date']}; {results['machine']}.",
        "Greedy policies on the same 200 held-out goals (1-3 of restaurant, hotel, attraction, train, taxi), "
        "agenda-based user; mean ± std over seeds (sample std).",
        "",
        "| policy | success rate | inform F1 | book rate | turns |",
        "|---|---|---|---|---|",
    ]
    for policy, figures in summary.items():
        if policy == "wall_s":
            continue
        cells = [f"{figures[f]['mean']:.3f} ± {figures[f]['std']:.3f}" for f in FIGURES[:3]]
        cells.append(f"{figures['turns']['mean']:.2f} ± {figures['turns']['std']:.2f}")
        lines.append(f"| {policy} | {' | '.join(cells)} |")
    lines += ["", "Per seed (success rate): "]
    for seed, run in results["per_seed"].items():
        f = run["figures"]
        lines.append(
            f"- seed {seed}: expert {f['rule_expert']['success_rate']:.3f}, random {f['random']['success_rate']:.3f}, "
            f"imitation {f['imitation']['success_rate']:.3f} (best epoch {run['imitation_best_epoch']:.0f}), "
            f"imitation+PPO {f['imitation+ppo']['success_rate']:.3f}; whole run {run['wall_s']:.0f} s wall, "
            f"{run['cpu_s']:.0f} s CPU"
        )
    same = results["same_seed_same_curve"]
    lines += [
        "",
        f"Same seed twice on CPU (seed {same['seed']}; {', '.join(same['curves_compared'])}): "
        f"{'identical, value for value' if same['identical'] else 'DIFFERENT'}.",
    ]
    if "imitation_by_corpus_size" in results:
        lines += ["", "Imitation alone against the corpus size (dialogues, 80 % for training):", ""]
        lines += ["| dialogues | success rate |", "|---|---|"]
        for size, row in results["imitation_by_corpus_size"].items():
            lines.append(f"| {size} | {row['mean']:.3f} ± {row['std']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main_benchmark()
