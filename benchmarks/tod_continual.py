"""TOD continual-learning figures: CLEAR vs naive fine-tuning, zero-shot DDPT vs MLP vs random, the emotion term.

Runs `configs/tod_continual.yaml` (restaurant -> hotel -> train, attraction held out) per seed and variant, in
worker processes, each into a throw-away sqlite store, and reads back the stage's final metrics:
    naive          DDPT policy, plain PPO fine-tuning
    clear          DDPT policy, CLEAR replay (V-trace, policy and value cloning)
    naive_mlp      MLP policy (fixed act indices), plain PPO, 60 PPO iterations per domain (it learns slower)
    clear_mlp      the same with CLEAR (cloning the networks of each domain's end)
    clear_behaviour_mlp   the same cloning CLEAR's stored behaviour instead (the paper's targets)
    naive_emotion  as naive, with env.reward_dissatisfied = EMOTION_PENALTY per dissatisfied turn
    clear_emotion  as clear, with the same penalty (which penalises talking about other domains: a conflict)
Snapshots are off here (they do not change training); mean ± sample std over seeds. Writes
`benchmarks/results/tod_continual.json` and `tod_continual.md`.

    python benchmarks/tod_continual.py --seeds 0 1 2 --workers 2 --override train.eval_every=1000 env.eval_dialogues=40
    # 1-3 min CPU per run; 5-15 min wall per run on 2 CPU cores shared with other jobs. --resume keeps every run the
    # output already holds (same overrides, any variant and seed) and runs only the requested ones it lacks.
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
from multiprocessing import Pool
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

CONFIG = ROOT / "configs" / "tod_continual.yaml"
EMOTION_PENALTY = -5.0  # per dissatisfied turn; success is +80, a turn -1
MLP_60 = ["policy.kind=mlp", "train.max_steps=60"]  # the MLP learns slower, and is where plain fine-tuning forgets
VARIANTS = {
    "naive": ["continual.method=naive"],
    "clear": ["continual.method=clear"],
    "naive_mlp": ["continual.method=naive", *MLP_60],
    "clear_mlp": ["continual.method=clear", *MLP_60],
    "clear_behaviour_mlp": ["continual.method=clear", "continual.clear.cloning_targets=behaviour", *MLP_60],
    "naive_emotion": ["continual.method=naive", f"env.reward_dissatisfied={EMOTION_PENALTY}"],
    "clear_emotion": ["continual.method=clear", f"env.reward_dissatisfied={EMOTION_PENALTY}"],
}
SHOWN = (
    "continual/earlier_success",
    "continual/newest_success",
    "continual/average_success",
    "continual/forgetting",
    "continual/forward_transfer",
    "continual/zero_shot/attraction",
    "baseline/random/zero_shot/attraction",
    "continual/dissatisfied_rate",
)


def one_run(job: tuple[str, int, list[str]]) -> tuple[str, int, dict[str, float], float]:
    import torch

    from pipelines.tod.continual import run
    from workbench.config import load_config
    from workbench.tracking import Tracker

    torch.set_num_threads(1)
    variant, seed, overrides = job
    config = load_config(CONFIG, [f"seed={seed}", "snapshot.enabled=false", *VARIANTS[variant], *overrides])
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp, Tracker.start(f"sqlite:///{tmp}/mlflow.db", "bench") as tracker:
        result = run(config, tracker)
    return variant, seed, result.metrics, time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--override", nargs="*", default=[], help="key=value for every run")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--resume", action="store_true", help="keep the runs the output already holds; run the rest")
    args = parser.parse_args()
    runs = []
    previous = args.out / "tod_continual.json"
    if args.resume and previous.exists():  # runs of the same overrides, measured before, are kept
        old = json.loads(previous.read_text())
        if old["overrides"] == args.override:
            runs = [r for r in old["runs"] if r["variant"] in VARIANTS]
    done = {(r["variant"], r["seed"]) for r in runs}
    jobs = [(v, s, args.override) for s in args.seeds for v in args.variants if (v, s) not in done]  # seed by seed
    if runs:
        write(runs, args)
    with Pool(args.workers) as pool:
        for variant, seed, metrics, seconds in pool.imap_unordered(one_run, jobs):
            runs.append({"variant": variant, "seed": seed, "metrics": metrics, "seconds": round(seconds, 1)})
            write(runs, args)  # what has finished is kept if the rest is cut short
            print(f"{variant} seed {seed}: {seconds:.0f} s", flush=True)


def write(runs: list[dict], args: argparse.Namespace) -> None:
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in runs)]
    summary: dict[str, dict[str, list[float]]] = {}
    for variant in variants:
        rows = [r["metrics"] for r in runs if r["variant"] == variant]
        keys = sorted({k for m in rows for k in m})
        ddof = 1 if len(rows) > 1 else 0
        summary[variant] = {
            k: [float(np.mean([m[k] for m in rows])), float(np.std([m[k] for m in rows], ddof=ddof))] for k in keys
        }
    out = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared with other jobs)",
        "config": str(CONFIG.relative_to(ROOT)),
        "overrides": args.override,
        "seeds": sorted({r["seed"] for r in runs}),
        "runs": runs,
        "summary": summary,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tod_continual.json").write_text(json.dumps(out, indent=1) + "\n")
    from workbench.config import load_config

    settings = load_config(CONFIG, args.override).continual
    lines = [
        "# TOD continual learning (`benchmarks/tod_continual.py`)",
        "",
        f"{out['date']}, {out['machine']}; seeds {out['seeds']}; overrides {args.override or 'none'}; "
        f"mean ± sample std over seeds. Sequence {' -> '.join(settings.domains)}, {', '.join(settings.held_out)} held "
        "out (never trained on).",
        "",
        "| variant | seeds | " + " | ".join(k.removeprefix("continual/") for k in SHOWN) + " | wall s |",
        "|---" * (len(SHOWN) + 3) + "|",
    ]
    for variant, figures in summary.items():
        cells = [f"{figures[k][0]:.3f} ± {figures[k][1]:.3f}" if k in figures else "" for k in SHOWN]
        seconds = [r["seconds"] for r in runs if r["variant"] == variant]
        seeds = ",".join(str(r["seed"]) for r in sorted(runs, key=lambda r: r["seed"]) if r["variant"] == variant)
        lines.append(f"| {variant} | {seeds} | " + " | ".join(cells) + f" | {min(seconds):.0f}-{max(seconds):.0f} |")
    (args.out / "tod_continual.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
