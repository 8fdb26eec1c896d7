"""The main job (configs/grokking.yaml) in one process and in two (`accelerate launch`, gloo on CPU), compared.

Both runs go into one fresh sqlite store. For each we record the memorisation and grokking steps, the final
train and test accuracy, wall time, and how many values each metric has per step. The 2-process run must have
exactly one value per step (rank 0 logs alone) and the same steps as the 1-process run. Results go to
benchmarks/results/distributed.{json,md}.

    python benchmarks/distributed.py                          # the default config
    python benchmarks/distributed.py train.max_steps=600      # any overrides
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("train/acc", "eval/acc", "eval/loss", "weight_norm")
FACTS = ("grokking/memorisation_step", "grokking/grokking_step", "final/train_acc", "final/eval_acc")


def launch(processes: int, store: Path, name: str, overrides: list[str]) -> float:
    args = ["run", str(ROOT / "configs" / "grokking.yaml"), *overrides]
    args += [f"tracking.uri=sqlite:///{store}", "tracking.experiment=distributed", f"tracking.run_name={name}"]
    if processes == 1:
        command = [sys.executable, "-m", "workbench", *args]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_machines", "1"]
        command += ["--num_processes", str(processes), "--mixed_precision", "no", "--dynamo_backend", "no"]
        command += ["--main_process_port", str(port), "-m", "workbench", *args]
    started = time.monotonic()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(command, cwd=store.parent, check=True, capture_output=True, env=env)
    return time.monotonic() - started


def describe(client, run) -> dict:
    histories = {key: sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step) for key in KEYS}
    steps = {key: [m.step for m in points] for key, points in histories.items()}
    return {
        "processes": run.data.tags["workbench.processes"],
        **{fact: run.data.metrics.get(fact) for fact in FACTS},
        "values_per_step": int(max(max(np.unique(s, return_counts=True)[1]) for s in steps.values())),
        "steps": steps["eval/acc"],
        "curves": {key: [m.value for m in points] for key, points in histories.items()},
    }


def main() -> None:
    from mlflow import MlflowClient

    overrides = sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "mlflow.db"
        wall = {n: launch(n, store, f"{n} process(es)", overrides) for n in (1, 2)}
        client = MlflowClient(f"sqlite:///{store}")
        experiment = client.get_experiment_by_name("distributed").experiment_id
        runs = client.search_runs([experiment])
        assert len(runs) == 2, f"expected one run per launch, found {len(runs)}"
        by_processes = {int(r.data.tags["workbench.processes"]): describe(client, r) for r in runs}
    one, two = by_processes[1], by_processes[2]
    # Round-off of the gradient's summation order grows over training; near the jump, where accuracy moves by
    # tens of points in a few steps, a shift of a few steps shows as a large pointwise difference.
    gaps = {key: np.abs(np.array(one["curves"][key]) - np.array(two["curves"][key])) for key in KEYS}
    difference = {key: float(gap.max()) for key, gap in gaps.items()}
    worst_step = {key: one["steps"][int(gap.argmax())] for key, gap in gaps.items()}
    apart = np.flatnonzero(gaps["eval/acc"] > 0.05)
    first_apart = one["steps"][int(apart[0])] if len(apart) else None
    result = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU",
        "overrides": overrides,
        "wall_seconds": wall,
        "same_steps": one["steps"] == two["steps"],
        "max_abs_difference": difference,
        "step_of_max_difference": worst_step,
        "first_step_test_acc_differs_by_5_points": first_apart,
        "runs": {n: {k: v for k, v in d.items() if k != "curves"} for n, d in by_processes.items()},
    }
    out = ROOT / "benchmarks" / "results"
    (out / "distributed.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = [
        "| processes | memorisation step | grokking step | final train acc | final test acc | values per step "
        "| wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, d in sorted(by_processes.items()):
        facts = " | ".join("–" if d[f] is None else f"{d[f]:g}" for f in FACTS)
        rows.append(f"| {n} | {facts} | {d['values_per_step']} | {wall[n]:.0f} |")
    lines = [
        "# One process against two (`accelerate launch`, gloo): `benchmarks/distributed.py`",
        "",
        f"{result['when']}, {result['machine']}; configs/grokking.yaml, overrides {overrides or 'none'}.",
        "",
        *rows,
        "",
        f"Same logged steps: {result['same_steps']}. Test accuracy first differs by more than 5 points at step "
        f"{first_apart} (grokking step {one['grokking/grokking_step']}). Largest pointwise difference over the "
        "whole curves: " + ", ".join(f"{k} {v:.3g} (step {worst_step[k]})" for k, v in difference.items()) + ".",
        "",
    ]
    (out / "distributed.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
