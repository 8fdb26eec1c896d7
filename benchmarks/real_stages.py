"""The real-model configs at their demo defaults: gold accuracy before and after, and wall time, per seed.

    python benchmarks/real_stages.py                        # configs/real/{sft,dpo,grpo}.yaml x seeds 0 1 2
    python benchmarks/real_stages.py --configs sft --seeds 0

Each run is `workbench run configs/real/<name>.yaml seed=S` as a user types it (SmolLM2-135M-Instruct, converted
once into the model cache before the first run, so no run pays the conversion), one at a time, into one sqlite
store under benchmarks/.real_stages/ (ignored by git; it makes the script resumable: a finished run is
read back, not run again). The gold check is the stage's own: held-out prompts answered through the chat
template, `gold/greedy_accuracy` (greedy) and `gold/accuracy` (4 answers per prompt sampled at temperature 1).
"Before" is the starting model's check at step 0 of the first stage; for the grpo chain, "warm start" is the GRPO
stage's check at its step 0 (the SFT model it starts from) and "after" the GRPO stage's at its end.

Results: benchmarks/results/real_stages.{json,md}, with the machine and the load average at each run's start and
end; a config not named in an invocation keeps its figures from the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from statistics import mean, stdev

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
STORE = ROOT / "benchmarks" / ".real_stages"
CONFIGS = ("sft", "dpo", "grpo")
GOLD = ("gold/accuracy", "gold/greedy_accuracy")


def run(name: str, seed: int) -> dict:
    """One run, or its figures read back from the store when it finished before."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{STORE / 'mlflow.db'}"
    run_name = f"{name}-s{seed}"
    client = MlflowClient(uri)
    if not _finished(client, run_name):
        command = ["workbench", "run", str(ROOT / f"configs/real/{name}.yaml"), f"seed={seed}"]
        command += [f"tracking.uri={uri}", f"tracking.run_name={run_name}"]
        print(time.strftime("%H:%M:%S"), " ".join(command), flush=True)
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        with open(STORE / f"{run_name}.log", "w") as log:
            subprocess.run(command, cwd=STORE, check=True, stdout=log, stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - start
        (STORE / f"{run_name}.json").write_text(
            json.dumps({"seconds": seconds, "load_before": load_before, "load_after": os.getloadavg()[0]})
        )
    timing = json.loads((STORE / f"{run_name}.json").read_text())
    parent = _finished(client, run_name)
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'", order_by=["start_time"]
    )
    stages = children or [parent]  # a chain's stages, or the stage run itself
    figures = {"seconds": timing["seconds"], "load": max(timing["load_before"], timing["load_after"])}
    for metric in GOLD:
        first, last = _history(client, stages[0], metric), _history(client, stages[-1], metric)
        figures[f"before {metric}"], figures[f"after {metric}"] = first[0], last[-1]
        if len(stages) > 1:  # the last stage's own check at its step 0, on the prompts of its check at the end
            figures[f"warm start {metric}"] = last[0]
    return figures


def _finished(client, run_name: str):
    experiments = [e.experiment_id for e in client.search_experiments()]
    found = client.search_runs(experiments, f"attributes.run_name = '{run_name}' and attributes.status = 'FINISHED'")
    return found[0] if found else None


def _history(client, run, metric: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run.info.run_id, metric), key=lambda m: m.step)]


def report(results: dict[str, dict[int, dict]]) -> str:
    lines = [
        "# Real-model configs at their demo defaults (SmolLM2-135M-Instruct, LoRA, chat template)",
        "",
        f"`python benchmarks/real_stages.py`: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; one run at a time, beside whatever else the machine ran (the load column). "
        "Gold accuracy on the held-out prompts (mean +- std over the seeds; sampled: 4 answers per prompt at "
        "temperature 1).",
        "",
        "| config | seeds | gold (sampled) before | warm start | after | gold (greedy) before | warm start | after "
        "| minutes per run (max) | 1-min load average at a run's start or end (max) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, by_seed in results.items():
        runs = list(by_seed.values())
        cells = []
        for metric in GOLD:
            for when in ("before", "warm start", "after"):
                values = [r[f"{when} {metric}"] for r in runs if f"{when} {metric}" in r]
                cells.append(_spread(values) if values else "-")
        minutes = max(r["seconds"] for r in runs) / 60
        load = max(r["load"] for r in runs)
        lines.append(
            f"| configs/real/{name}.yaml | {', '.join(map(str, by_seed))} | {' | '.join(cells)} "
            f"| {minutes:.1f} | {load:.1f} |"
        )
    return "\n".join(lines) + "\n"


def _spread(values: list[float]) -> str:
    return f"{mean(values):.3f} +- {stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = parser.parse_args()
    STORE.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from pipelines.lm.real_model import named_model_dir

    named_model_dir("smollm2-135m-instruct")  # the one-time conversion, outside every timed run
    path = RESULTS / "real_stages.json"  # other configs' figures, measured before, are kept
    results = {**(json.loads(path.read_text()) if path.exists() else {})}
    results.update({name: {str(seed): run(name, seed) for seed in args.seeds} for name in args.configs})
    results = {name: results[name] for name in CONFIGS if name in results}
    path.write_text(json.dumps(results, indent=1) + "\n")
    (RESULTS / "real_stages.md").write_text(report(results))
    print(report(results))


if __name__ == "__main__":
    main()
