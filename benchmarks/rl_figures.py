"""The RL stages' figures: PPO and GRPO over the SFT model, and each failure config against its control.

    python benchmarks/rl_figures.py --seeds 0 1      # ~40 min on 2 shared cores; resumable (finished runs kept)
    python benchmarks/rl_figures.py --seeds 0 & python benchmarks/rl_figures.py --seeds 1   # a seed per core

Each seed's runs go to their own store (`benchmarks/.rl_figures/s<seed>/mlflow.db`); the results cover every
seed asked for, so a last call with all seeds, once each is done, writes the table of all of them.

Per seed it trains the SFT model (pretrain on the fly) and two reward models from it (an unbiased labeller,
and a labeller with `task.length_bias=0.5`), then runs `configs/ppo.yaml`, `configs/grpo.yaml` and every
`configs/failure/*.yaml` from that SFT model. A config whose reward model would be trained on the fly gets
the prepared one trained the same way (same SFT model, same labeller, `reward.rm_steps` steps) instead.
Results: `benchmarks/results/rl_figures.{json,md}`. `FAILURES` says what counts as each failure; the tests
(tests/test_rl.py) apply the same checks to tiny versions.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow.entities import Run

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STORE = ROOT / "benchmarks" / ".rl_figures"
RESULTS = ROOT / "benchmarks" / "results"
ENTROPY_FLOOR = 0.05  # nats per token; this task's SFT model samples at ~0.3, a healthy RL run ends ~0.15-0.2
KL_CEILING = 10.0  # nats per answer, the collapse forecaster's default `kl_ceiling`
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # one core per run: a seed per process, side by side
GOLD_DROP = 0.1  # held-out gold accuracy this far under its start: the policy got worse at the task

# failure config -> (what goes wrong, its control)
FAILURES = {
    "reward_hacking": (
        f"proxy reward rises while held-out gold accuracy falls by {GOLD_DROP} (last vs first quarter of the run)",
        "reward_hacking_control",
    ),
    "entropy_collapse": (f"policy entropy falls below {ENTROPY_FLOOR} nats per token", "entropy_collapse_control"),
    "kl_blowup": (f"KL to the reference exceeds {KL_CEILING} nats per answer", "kl_blowup_control"),
}


def failure_shown(kind: str, series: dict[str, list[float]]) -> bool:
    """Whether a run's logged series (metric -> values in step order) show failure `kind` (FAILURES)."""
    if kind == "reward_hacking":  # first and last quarter of the run, not single (noisy) logs
        reward, gold = series["reward"], series["gold/accuracy"]
        proxy_rises = mean(_last_quarter(reward)) > mean(_first_quarter(reward))
        return proxy_rises and mean(_last_quarter(gold)) <= mean(_first_quarter(gold)) - GOLD_DROP
    if kind == "entropy_collapse":
        return min(series["entropy"]) < ENTROPY_FLOOR
    if kind == "kl_blowup":
        return max(series.get("kl", []) + series.get("objective/kl", [])) > KL_CEILING
    raise ValueError(kind)


def _first_quarter(values: list[float]) -> list[float]:
    return values[: max(1, len(values) // 4)]


def _last_quarter(values: list[float]) -> list[float]:
    return values[-max(1, len(values) // 4) :]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    runs: dict[str, dict] = {}
    for seed in args.seeds:
        (STORE / f"s{seed}").mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{STORE / f's{seed}' / 'mlflow.db'}"
        sft = workbench(uri, f"sft-s{seed}", "configs/sft.yaml", seed, ["snapshot.enabled=false"])
        prepared = {}
        for name, bias in (("rm", 0.0), ("rm-biased", 0.5)):
            overrides = [f"model.name_or_path={sft['model']}", f"task.length_bias={bias}", "train.max_steps=1500"]
            prepared[bias] = workbench(uri, f"{name}-s{seed}", "configs/rm.yaml", seed, overrides)["model"]
        configs = [
            "configs/ppo.yaml",
            "configs/grpo.yaml",
            *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs" / "failure").glob("*.yaml")),
        ]
        for config in configs:
            overrides = [f"model.name_or_path={sft['model']}"]
            settings = _read(ROOT / config)
            if settings.get("reward", {}).get("function", "rm") == "rm":
                bias = settings.get("task", {}).get("length_bias", 0.0)
                overrides.append(f"reward.model={prepared[bias]}")
            name = Path(config).stem
            runs[f"{name}/s{seed}"] = workbench(uri, f"{name}-s{seed}", config, seed, overrides)
        runs[f"sft/s{seed}"] = sft
    write_results(runs, args.seeds)


def _read(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def ensure_run(uri: str, name: str, config: str, seed: int, overrides: list[str]) -> Run:
    """The FINISHED run `name` in the store at `uri`, made by `workbench run CONFIG` (a core each) if there is none
    yet: what makes a suite resumable."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)

    def find():
        experiments = [e.experiment_id for e in client.search_experiments()]
        done = client.search_runs(experiments, f"attributes.run_name = '{name}' and attributes.status = 'FINISHED'")
        return done[0] if done else None

    run = find()
    if run is None:
        command = ["workbench", "run", str(ROOT / config), f"seed={seed}", *overrides, f"tracking.uri={uri}"]
        command.append(f"tracking.run_name={name}")
        print(time.strftime("%H:%M:%S"), " ".join(command), flush=True)
        store = Path(uri.removeprefix("sqlite:///")).parent
        with open(store / f"{name}.log", "w") as log:
            subprocess.run(command, cwd=store, check=True, stdout=log, stderr=subprocess.STDOUT, env=ENV)
        run = find()
    return run


def workbench(uri: str, name: str, config: str, seed: int, overrides: list[str]) -> dict:
    """`ensure_run`, and the run's series, model and minutes."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    run = ensure_run(uri, name, config, seed, overrides)
    keys = ("reward", "kl", "objective/kl", "entropy", "gold/accuracy", "gold/reward")
    histories = {k: client.get_metric_history(run.info.run_id, k) for k in keys}
    histories.update({k: client.get_metric_history(run.info.run_id, k) for k in run.data.metrics if "eff_rank" in k})
    return {
        "run_id": run.info.run_id,
        "model": f"runs:/{run.info.run_id}/model",
        "minutes": (run.info.end_time - run.info.start_time) / 60000,
        "series": {k: [m.value for m in sorted(histories[k], key=lambda m: m.step)] for k in keys if histories[k]},
        "collapse": replay_collapse(histories),
    }


def replay_collapse(histories: dict[str, list]) -> str:
    """Where today's `collapse` forecaster and the gold-reading `reward_hacking_audit` fire on a run's logged
    histories ('step what', one per forecaster that fires), replayed step by step as the run fed them, so the table
    follows the forecasters rather than the version the run was made with."""
    from analysis.forecast import FORECASTERS

    by_step: dict[int, dict[str, float]] = {}
    for key, points in histories.items():
        for m in points:
            by_step.setdefault(m.step, {})[key] = m.value
    fired = []
    for name in ("collapse", "reward_hacking_audit"):
        forecaster = FORECASTERS[name]()
        for step in sorted(by_step):
            event = forecaster.observe(step, by_step[step])
            if event is not None:
                what = event.details.get("kind") or event.details.get("detector")
                fired.append(f"{step} {name}: {what}")
                break
    return "; ".join(fired) or "-"


def write_results(runs: dict[str, dict], seeds: list[int]) -> None:
    table = {}
    for key, run in runs.items():
        name, seed = key.split("/")
        s = run["series"]
        row = {"minutes": run["minutes"], "collapse": run["collapse"]}
        if "gold/accuracy" in s:
            row.update(gold_before=s["gold/accuracy"][0], gold_after=s["gold/accuracy"][-1])
        for kind in FAILURES:
            base = name.removesuffix("_control")
            if base == kind:
                row["failure_shown"] = failure_shown(kind, s)
        if "entropy" in s:
            row.update(entropy_min=min(s["entropy"]))
        kl = s.get("kl", []) + s.get("objective/kl", [])
        if kl:
            row.update(kl_max=max(kl))
        if "reward" in s:
            row.update(reward_first=s["reward"][0], reward_last=s["reward"][-1])
        table.setdefault(name, {})[seed] = row
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "rl_figures.json").write_text(json.dumps({"seeds": seeds, "runs": table}, indent=1) + "\n")
    lines = [
        f"# RL figures (seeds {', '.join(map(str, seeds))}; 2 shared, loaded CPU cores)",
        "",
        "| config | gold acc. before -> after (mean) | failure shown | entropy min | KL max | proxy first -> last | "
        "`collapse`, `reward_hacking_audit` (replayed) | minutes (mean) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, by_seed in table.items():
        rows = list(by_seed.values())

        def avg(key: str, rows: list[dict] = rows) -> str:
            values = [r[key] for r in rows if key in r]
            return f"{mean(values):.3f}" if values else ""

        gold = f"{avg('gold_before')} -> {avg('gold_after')}" if any("gold_after" in r for r in rows) else ""
        shown = " ".join(str(r["failure_shown"]) for r in rows if "failure_shown" in r)
        proxy = f"{avg('reward_first')} -> {avg('reward_last')}" if any("reward_first" in r for r in rows) else ""
        events = ", ".join(r["collapse"] for r in rows)
        lines.append(
            f"| {name} | {gold} | {shown} | {avg('entropy_min')} | {avg('kl_max')} | {proxy} | {events} | "
            f"{avg('minutes')} |"
        )
    (RESULTS / "rl_figures.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
