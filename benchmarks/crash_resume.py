"""Crash and resume: `kill -9` a real `workbench run` at random steps, resume it, compare with an uninterrupted run.

Each trial starts `workbench run configs/grokking.yaml` (shortened by the overrides below) in a subprocess,
waits until its flushed metrics reach a random step, kills it with SIGKILL, lets the stale-run check (as
`workbench ls` runs it) mark it, runs `workbench resume`, and then checks, over every metric key:
- lost: values the store held at the moment of the kill that are gone or changed after the resume (want 0);
- duplicates: steps holding two values (want 0);
- the largest |resumed - uninterrupted| against one uninterrupted run with the same seed (want 0 on CPU).

    python benchmarks/crash_resume.py                     # 5 trials
    python benchmarks/crash_resume.py --trials 2 --max-steps 200
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import redirect_stderr, redirect_stdout
from io import StringIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIG = str(ROOT / "configs" / "grokking.yaml")


def histories(client, run_id: str) -> dict[str, list[tuple[int, float]]]:
    keys = client.get_run(run_id).data.metrics
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}


def wait_for_step(client, process: subprocess.Popen, experiment: str, step: int) -> str:
    """The child's run id once its flushed `train/loss` reaches `step`."""
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the run ended (exit {process.returncode}) before step {step}")
        found = client.get_experiment_by_name(experiment)
        runs = client.search_runs([found.experiment_id]) if found else []
        if runs:
            points = client.get_metric_history(runs[0].info.run_id, "train/loss")
            if points and max(m.step for m in points) >= step:
                return runs[0].info.run_id
        time.sleep(0.05)


def trial(workdir: Path, overrides: list[str], kill_at: int, reference: dict) -> dict:
    from mlflow import MlflowClient

    from workbench.cli import main
    from workbench.runs import recent_runs

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    client = MlflowClient(uri)
    cmd = [sys.executable, "-m", "workbench.cli", "run", CONFIG, *overrides, f"tracking.uri={uri}"]
    with open(workdir / "run.log", "w") as log:
        process = subprocess.Popen(cmd, cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
        run_id = wait_for_step(client, process, "grokking", kill_at)
        process.send_signal(signal.SIGKILL)
        process.wait()
    flushed = histories(client, run_id)
    last_flushed = max(s for points in flushed.values() for s, _ in points)
    status = {r["run_id"]: r["status"] for r in recent_runs(uri)}[run_id]
    reason = client.get_run(run_id).data.tags.get("workbench.stop_reason")
    started = time.perf_counter()
    out = StringIO()
    with redirect_stdout(out), redirect_stderr(StringIO()):  # the progress bar
        code = main(["resume", run_id, "--tracking-uri", uri])
    resume_s = time.perf_counter() - started
    text = out.getvalue()
    from_step = int(re.search(r"resumed from its checkpoint at step (\d+)", text)[1])
    recomputed = re.search(r"(\d+) values logged before the crash were recomputed.*largest difference (\S+)", text)
    after = histories(client, run_id)
    lost = sum(len(set(points) - set(after.get(key, []))) for key, points in flushed.items())
    duplicates = sum(len(points) - len({s for s, _ in points}) for points in after.values())
    differences = [
        abs(a - b)
        for key in reference
        for (sa, a), (sb, b) in zip(after.get(key, []), reference[key], strict=False)
        if sa == sb
    ]
    same_points = all([s for s, _ in after.get(key, [])] == [s for s, _ in reference[key]] for key in reference)
    return {
        "kill_at_step": kill_at,
        "last_flushed_step": last_flushed,
        "flushed_values": sum(len(p) for p in flushed.values()),
        "status_after_stale_check": status,
        "stop_reason": reason,
        "resumed_from_step": from_step,
        "resume_exit": code,
        "final_status": client.get_run(run_id).info.status,
        "recomputed_values": int(recomputed[1]),
        "recomputed_max_difference": float(recomputed[2]),
        "lost_values": lost,
        "duplicate_steps": duplicates,
        "same_keys_and_steps_as_uninterrupted": same_points and after.keys() == reference.keys(),
        "max_abs_difference_vs_uninterrupted": max(differences),
        "resume_seconds": round(resume_s, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--max-steps", type=int, default=400)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill steps")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "crash_resume")
    args = parser.parse_args()
    from mlflow import MlflowClient

    from workbench.cli import main as workbench

    overrides = [
        f"train.max_steps={args.max_steps}",
        f"train.checkpoint_every={args.checkpoint_every}",
        "tracking.flush_seconds=0.5",
    ]
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="crash-resume-") as tmp:
        uri = f"sqlite:///{Path(tmp) / 'reference.db'}"
        started = time.perf_counter()
        with redirect_stdout(StringIO()), redirect_stderr(StringIO()):
            assert workbench(["run", CONFIG, *overrides, f"tracking.uri={uri}"]) == 0
        reference_s = time.perf_counter() - started
        client = MlflowClient(uri)
        run = client.search_runs([client.get_experiment_by_name("grokking").experiment_id])[0]
        reference = histories(client, run.info.run_id)
        results = []
        for i in range(args.trials):
            workdir = Path(tmp) / f"trial_{i}"
            workdir.mkdir()
            kill_at = rng.randint(args.max_steps // 10, args.max_steps * 9 // 10)
            results.append(trial(workdir, overrides, kill_at, reference))
            print(json.dumps(results[-1]), flush=True)
    report = {
        "command": f"python benchmarks/crash_resume.py --trials {args.trials} --max-steps {args.max_steps} "
        f"--checkpoint-every {args.checkpoint_every} --seed {args.seed}",
        "config": CONFIG.removeprefix(str(ROOT) + "/"),
        "overrides": overrides,
        "machine": f"{platform.machine()}, {platform.python_version()}, shared and loaded (2 cores, other jobs)",
        "uninterrupted_run_seconds": round(reference_s, 1),
        "trials": results,
    }
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))


def markdown(report: dict) -> str:
    lines = [
        "# Crash and resume (`benchmarks/crash_resume.py`)",
        "",
        f"`{report['command']}`: `workbench run {report['config']} {' '.join(report['overrides'])}` in a "
        "subprocess, `kill -9` when its flushed metrics reach a random step, the stale-run check, `workbench "
        "resume`, then every metric compared with an uninterrupted run of the same seed "
        f"({report['uninterrupted_run_seconds']} s). Machine: {report['machine']}.",
        "",
        "| kill once flushed step >= | last flushed step | marked | resumed from | recomputed (max diff) | lost | "
        "duplicates | max diff vs uninterrupted | resume |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in report["trials"]:
        lines.append(
            f"| {t['kill_at_step']} | {t['last_flushed_step']} | {t['status_after_stale_check']} | "
            f"{t['resumed_from_step']} | {t['recomputed_values']} ({t['recomputed_max_difference']:g}) | "
            f"{t['lost_values']} of {t['flushed_values']} | {t['duplicate_steps']} | "
            f"{t['max_abs_difference_vs_uninterrupted']:g} | {t['resume_seconds']} s |"
        )
    trials = report["trials"]
    lines += [
        "",
        f"{len(trials)} trials: {sum(t['lost_values'] for t in trials)} lost of "
        f"{sum(t['flushed_values'] for t in trials)} values flushed before the kills, "
        f"{sum(t['duplicate_steps'] for t in trials)} duplicate steps, largest difference from the uninterrupted "
        f"run {max(t['max_abs_difference_vs_uninterrupted'] for t in trials):g} (every key and step compared). "
        "Resume time: the whole `workbench resume`, training from the checkpoint to the last step included.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
