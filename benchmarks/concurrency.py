"""Concurrent runs into one embedded sqlite store: does any metric value get lost, does any call fail?

N writer processes start at once on one fresh `sqlite:///` store (so they also race to create its schema
and experiment) and each does what a stage run does through `Tracker`: start the run with its tags, log
the config as params and `config.yaml`, log `values` metric values step by step (buffered, flushed every
`flush_seconds` and at 1000 values), poll the stop-request tag like the policy engine, set a tag now
and then, and finish. Then every value is read back and compared with what was sent.

    python benchmarks/concurrency.py                          # 4 writers x 5 000 values
    python benchmarks/concurrency.py --writers 8 --values 2000
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METRICS_PER_STEP = 5  # train/loss, train/acc, eval/loss, eval/acc, lr: a grokking eval step
PARAMS = 30  # config keys logged as params at the start
STOP_POLL_EVERY = 10  # steps between two stop-request polls (the engine polls by time; this is denser)
TAG_EVERY = 200  # steps between two progress tags


def expected_value(writer: int, step: int, metric: int) -> float:
    """A value unique to (writer, step, metric), so a value written to the wrong run or step shows."""
    return writer * 1e6 + step * 10 + metric


def write_run(uri: str, writer: int, values: int, flush_seconds: float, start: Any, results: Any) -> None:
    """One writer: a Tracker run as a stage does it. Puts its run id, failures and time on `results`."""
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401  (imported first: the race is on the store)

    from workbench.tags import STOP_REQUESTED
    from workbench.tracking import Tracker

    start.wait(timeout=600)  # all writers hit the fresh store at the same moment
    started = time.perf_counter()
    failures: list[str] = []
    run_id = None
    try:
        tags = {"workbench.stage": "concurrency", "writer": str(writer)}
        with Tracker.start(uri, "concurrency", f"writer-{writer}", tags, flush_seconds) as tracker:
            run_id = tracker.run_id
            tracker.log_params({f"param_{i}": i for i in range(PARAMS)})
            tracker.log_text(f"writer: {writer}\n", "config.yaml")
            for step in range(values // METRICS_PER_STEP):
                metrics = {f"m/{m}": expected_value(writer, step, m) for m in range(METRICS_PER_STEP)}
                tracker.log_metrics(metrics, step)
                if step % STOP_POLL_EVERY == 0:
                    tracker.get_tag(STOP_REQUESTED)
                if step % TAG_EVERY == 0:
                    tracker.set_tags({"workbench.progress": str(step)})
    except Exception as exc:  # counted, not raised: the parent reports every failure
        failures.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        traceback.print_exc()
    results.put({"writer": writer, "run_id": run_id, "failures": failures, "seconds": time.perf_counter() - started})


def count_back(uri: str, results: list[dict], values: int) -> tuple[int, int]:
    """(values found with the exact value at the exact step, values lost or wrong)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    found = lost = 0
    for result in results:
        steps = values // METRICS_PER_STEP
        if result["run_id"] is None:
            lost += steps * METRICS_PER_STEP
            continue
        for m in range(METRICS_PER_STEP):
            history = {h.step: h.value for h in client.get_metric_history(result["run_id"], f"m/{m}")}
            ok = sum(history.get(s) == expected_value(result["writer"], s, m) for s in range(steps))
            found += ok
            lost += steps - ok
    return found, lost


def measure(writers: int, values: int, flush_seconds: float, directory: Path) -> dict:
    """Run the writers on a fresh store in `directory` (artifacts go to the working directory's ./mlruns)."""
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401  (forked writers start with it imported)

    uri = f"sqlite:///{directory / 'mlflow.db'}"
    load = os.getloadavg()[0]  # other jobs' load on the machine as the trial starts
    # Separate processes with their own sqlite connections either way; fork spares each a ~10 s import.
    context = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    start, queue = context.Barrier(writers + 1), context.Queue()
    processes = [
        context.Process(target=write_run, args=(uri, w, values, flush_seconds, start, queue)) for w in range(writers)
    ]
    for process in processes:
        process.start()
    start.wait(timeout=600)  # every writer has imported what it needs
    started = time.perf_counter()
    results = sorted((queue.get(timeout=1800) for _ in processes), key=lambda r: r["writer"])
    wall = time.perf_counter() - started
    for process in processes:
        process.join()
    found, lost = count_back(uri, results, values)
    return {
        "writers": writers,
        "values_per_writer": values,
        "flush_seconds": flush_seconds,
        "values_found": found,
        "lost": lost,
        "failures": sum(len(r["failures"]) for r in results),
        "failure_messages": sorted({f for r in results for f in r["failures"]}),
        "seconds_per_writer": [round(r["seconds"], 2) for r in results],
        "wall_seconds": round(wall, 2),
        "load_average": round(load, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--values", type=int, default=5000, help="metric values per writer")
    parser.add_argument("--flush-seconds", type=float, default=0.05, help="denser than a stage's 5 s: more races")
    parser.add_argument("--repeats", type=int, default=3, help="fresh stores, one after the other")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "concurrency")
    args = parser.parse_args()

    trials = []
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="workbench-concurrency-") as tmp:
            os.chdir(tmp)  # the embedded store's artifacts land next to it
            trial = measure(args.writers, args.values, args.flush_seconds, Path(tmp))
            os.chdir(ROOT)
        trials.append(trial)
        print(json.dumps({"repeat": repeat, **trial}))
    summary = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "writers": args.writers,
        "values_per_writer": args.values,
        "flush_seconds": args.flush_seconds,
        "repeats": args.repeats,
        "lost_total": sum(t["lost"] for t in trials),
        "failures_total": sum(t["failures"] for t in trials),
        "trials": trials,
    }
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    rows = [
        f"| {i} | {t['values_found']} | {t['lost']} | {t['failures']} | {t['wall_seconds']} s | {t['load_average']} |"
        for i, t in enumerate(trials)
    ]
    sent = args.repeats * args.writers * (args.values // METRICS_PER_STEP) * METRICS_PER_STEP
    messages = sorted({m for t in trials for m in t["failure_messages"]})
    command = (
        f"python benchmarks/concurrency.py --writers {args.writers} --values {args.values} "
        f"--flush-seconds {args.flush_seconds} --repeats {args.repeats}"
    )
    args.out.with_suffix(".md").write_text(
        "\n".join(
            [
                f"# {args.writers} concurrent writers x {args.values} metric values, one sqlite store",
                "",
                f"`{command}` on {summary['machine']}. All writers start at once on a fresh store; each starts a "
                f"run, logs {PARAMS} params and config.yaml, then {METRICS_PER_STEP} metrics a step flushed every "
                f"{args.flush_seconds} s (a stage: 5 s), polls the stop tag every {STOP_POLL_EVERY} steps and sets "
                f"a tag every {TAG_EVERY}, and finishes. Every value is read back by step and compared.",
                "",
                "| trial | values found | lost | failed calls | wall | load average at start |",
                "|---|---|---|---|---|---|",
                *rows,
                "",
                f"Lost: {summary['lost_total']} of {sent} values; failed calls: {summary['failures_total']}.",
                *(f"- {m}" for m in messages),
                "",
            ]
        )
    )


if __name__ == "__main__":
    main()
