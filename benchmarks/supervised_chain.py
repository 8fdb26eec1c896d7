"""The supervised chain's figures: pretrain -> SFT -> DPO and the reward model, per seed, with the RPO control.

    python benchmarks/supervised_chain.py --seeds 0 1 2          # the chain and the RM; ~5 min a seed, quiet
    python benchmarks/supervised_chain.py --seeds 0 --controls   # and RPO (DPO + NLL of the chosen answers)

Per seed, in a temporary store: `workbench run configs/dpo_chain.yaml seed=S` (pretrain, SFT and plain DPO, each
stage's committed config), then `configs/rm.yaml` from that chain's SFT model: the stage `configs/rm_chain.yaml`
runs after the same pretrain and SFT (same seed, same settings), without training those twice. `--controls`
adds `configs/dpo.yaml` from the same SFT model with `sft_weight=1 train.max_steps=400 train.lr=1e-4` (RPO).
Results: `benchmarks/results/supervised_chain.{json,md}`, each run's final metrics as logged.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import mean

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
METRICS = ("gold/accuracy", "gold/greedy_accuracy", "rm/accuracy", "rm/kendall_tau")
RPO = ["sft_weight=1", "train.max_steps=400", "train.lr=1e-4"]


def workbench(uri: str, name: str, config: str, overrides: list[str], log: Path) -> None:
    command = ["workbench", "run", str(ROOT / config), *overrides, f"tracking.uri={uri}", f"tracking.run_name={name}"]
    print(time.strftime("%H:%M:%S"), " ".join(command), flush=True)
    with open(log / f"{name}.log", "w") as out:
        subprocess.run(command, cwd=log, check=True, stdout=out, stderr=subprocess.STDOUT)


def outcome(run) -> dict[str, float]:
    """A run's final logged metrics of `METRICS`, and its minutes."""
    found = {k: run.data.metrics[k] for k in METRICS if k in run.data.metrics}
    return {**found, "minutes": (run.info.end_time - run.info.start_time) / 60000}


def run_seed(seed: int, controls: bool, tmp: Path) -> dict[str, dict[str, float]]:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(uri)

    def by_name(name: str):
        experiments = [e.experiment_id for e in client.search_experiments()]
        return client.search_runs(experiments, f"attributes.run_name = '{name}'")[0]

    workbench(uri, f"chain-s{seed}", "configs/dpo_chain.yaml", [f"seed={seed}"], tmp)
    chain = by_name(f"chain-s{seed}")
    experiment = chain.info.experiment_id
    stages = {
        r.info.run_name.split(": ")[1]: r
        for r in client.search_runs([experiment], f"tags.mlflow.parentRunId = '{chain.info.run_id}'")
    }
    sft_model = f"model.name_or_path=runs:/{stages['sft'].info.run_id}/model"
    workbench(uri, f"rm-s{seed}", "configs/rm.yaml", [f"seed={seed}", sft_model], tmp)
    stages["rm"] = by_name(f"rm-s{seed}")
    if controls:
        workbench(uri, f"rpo-s{seed}", "configs/dpo.yaml", [f"seed={seed}", sft_model, *RPO], tmp)
        stages["rpo"] = by_name(f"rpo-s{seed}")
    return {name: outcome(run) for name, run in stages.items()}


def markdown(result: dict) -> str:
    seeds = result["seeds"]
    stages = [s for s in ("pretrain", "sft", "dpo", "rpo") if s in result["runs"][str(seeds[0])]]

    def gold(run: dict) -> str:
        return f"{run['gold/accuracy']:.3f} ({run['gold/greedy_accuracy']:.3f})"

    def rm(run: dict) -> str:
        return f"{run['rm/accuracy']:.3f} / {run['rm/kendall_tau']:.3f}"

    lines = [
        f"# The supervised chain (seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}; "
        f"{result['date']}, {result['machine']}, "
        f"load average {result['load_average_1min_at_start']:.1f} at the start, "
        f"{result['load_average_1min_at_end']:.1f} at the end)",
        "",
        "Held-out `gold/accuracy` (4 sampled answers per prompt, exactly right; greedy in brackets) and the RM's "
        "held-out pairwise accuracy / Kendall tau.",
        "",
        f"| seed | {' | '.join(stages)} | rm | minutes ({', '.join([*stages, 'rm'])}) |",
        "|---" * (len(stages) + 3) + "|",
    ]
    for seed in seeds:
        runs = result["runs"][str(seed)]
        minutes = ", ".join(f"{runs[s]['minutes']:.1f}" for s in [*stages, "rm"])
        lines.append(f"| {seed} | {' | '.join(gold(runs[s]) for s in stages)} | {rm(runs['rm'])} | {minutes} |")
    if len(seeds) > 1:

        def mean_of(stage: str, key: str) -> str:
            return f"{mean(result['runs'][str(seed)][stage][key] for seed in seeds):.3f}"

        means = " | ".join(mean_of(s, "gold/accuracy") for s in stages)
        lines.append(f"| mean | {means} | {mean_of('rm', 'rm/accuracy')} / {mean_of('rm', 'rm/kendall_tau')} | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--controls", action="store_true", help="also the RPO control (DPO + NLL, 400 steps)")
    parser.add_argument("--out", type=Path, default=RESULTS / "supervised_chain.json")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    load_at_start = os.getloadavg()[0]
    runs = {}
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            runs[str(seed)] = run_seed(seed, args.controls, Path(tmp))
    result = {
        "what": "configs/dpo_chain.yaml per seed, configs/rm.yaml from its SFT model"
        + (", RPO control: configs/dpo.yaml " + " ".join(RPO) if args.controls else ""),
        "seeds": args.seeds,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average_1min_at_start": load_at_start,
        "load_average_1min_at_end": os.getloadavg()[0],
        "runs": runs,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
