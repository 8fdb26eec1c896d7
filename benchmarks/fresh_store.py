"""A fresh sqlite store opened by another MLflow client at the same moment as a workbench run: does either fail?

Each trial makes a new store file and two openers race to create its schema: the workbench's (`Tracker.start`,
what `workbench run` and `WorkbenchCallback` do first; `ls`, `analyze` and the app open the store the same way)
against another one, which is a plain `MlflowClient(uri).get_experiment_by_name(...)`, `mlflow ui` on the same
file, or another workbench run. The order varies:
- other-first: the other opener starts; the workbench opens as soon as the store file appears, while the other
  is still creating the schema;
- same-moment: both start together (both pre-imported, released by one event);
- workbench-first: the workbench starts; the other opens 0-300 ms later.

    python benchmarks/fresh_store.py                 # 10 trials of each opener and order
    python benchmarks/fresh_store.py --trials 3 --out /tmp/fresh_store.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OPENERS = ("client", "mlflow-ui", "workbench")
ORDERS = ("other-first", "same-moment", "workbench-first")
UI_ORDERS = ("other-first", "workbench-first")  # `mlflow ui` needs seconds to start: it is never at the same moment


def _open(opener: str, uri: str, go: Any, delay: float, results: Any) -> None:
    """One opener in its own process: wait for `go`, then `delay` s, then open the store; put the error or None."""
    go.wait(timeout=120)
    time.sleep(delay)
    try:
        if opener == "client":
            from mlflow import MlflowClient

            MlflowClient(uri).get_experiment_by_name("fresh-store")
        else:
            from workbench.tracking import Tracker

            Tracker.start(uri, "fresh-store", opener).finish()
        results.put((opener, None))
    except Exception as exc:  # counted, not raised: the trial reports it
        from workbench.errors import first_line

        results.put((opener, f"{type(exc).__name__}: {first_line(exc)}"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ui_outcome(ui: subprocess.Popen, port: int, log: Path, timeout: float = 120) -> str | None:
    """None once `mlflow ui` answers its health check; the last line of its log if it exits first."""
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ui.poll() is not None:
            lines = [line for line in log.read_text().splitlines() if line.strip()]
            return f"mlflow ui exited {ui.returncode}: {lines[-1] if lines else ''}"
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).ok:
                return None
        except requests.RequestException:
            pass
        time.sleep(0.1)
    return "mlflow ui did not answer in time"


def _wait_for_file(path: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.002)


def trial(opener: str, order: str, directory: Path, seed: int) -> dict[str, Any]:
    """One race on a new store file: {opener, order, workbench: error or None, other: error or None}."""
    rng = random.Random(seed)
    db = directory / "mlflow.db"
    uri = f"sqlite:///{db}"
    context = mp.get_context("fork")  # the children inherit the imported MLflow: the race is on the store only
    results = context.Queue()
    go_workbench, go_other = context.Event(), context.Event()
    workbench = context.Process(target=_open, args=("workbench", uri, go_workbench, 0.0, results))
    workbench.start()
    other_delay = rng.uniform(0, 0.3) if order == "workbench-first" else 0.0
    ui = other = None
    if opener == "mlflow-ui":
        if order == "workbench-first":
            go_workbench.set()
            time.sleep(other_delay)
        port = _free_port()
        command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1"]
        with (directory / "mlflow-ui.log").open("w") as log:  # its own session: the ui and its workers stop together
            ui = subprocess.Popen(
                [*command, "--port", str(port), "--workers", "1"],
                cwd=directory,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
    else:
        other = context.Process(target=_open, args=(opener, uri, go_other, other_delay, results))
        other.start()
        time.sleep(0.5)  # both processes ready and waiting
        if order != "other-first":
            go_workbench.set()
        go_other.set()
    if order == "other-first":
        _wait_for_file(db)  # the other opener is creating the schema now
        time.sleep(rng.uniform(0, 0.05))
        go_workbench.set()
    workbench.join(timeout=300)
    outcome: dict[str, Any] = {"opener": opener, "order": order, "workbench": None, "other": None}
    outcomes = dict(results.get(timeout=10) for _ in range(1 if ui else 2))
    outcome["workbench"] = outcomes["workbench"]
    if ui is not None:
        outcome["other"] = _ui_outcome(ui, port, directory / "mlflow-ui.log")
        os.killpg(ui.pid, signal.SIGKILL)  # a benchmark's throwaway server: no shutdown to wait for
        ui.wait(timeout=30)
    else:
        other.join(timeout=60)
        outcome["other"] = outcomes[opener]
    return outcome


def measure(trials: int, openers: tuple[str, ...] = OPENERS, directory: Path | None = None) -> dict[str, Any]:
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401  (imported before forking)

    import workbench.tracking  # noqa: F401

    base = Path(directory or tempfile.mkdtemp(prefix="fresh-store-"))
    outcomes = []
    for opener in openers:
        for order in UI_ORDERS if opener == "mlflow-ui" else ORDERS:
            for i in range(trials):
                folder = base / f"{opener}-{order}-{i}"
                folder.mkdir(parents=True)
                outcomes.append(trial(opener, order, folder, seed=i))
    cells = []
    for opener in openers:
        for order in UI_ORDERS if opener == "mlflow-ui" else ORDERS:
            mine = [o for o in outcomes if o["opener"] == opener and o["order"] == order]
            cells.append(
                {
                    "opener": opener,
                    "order": order,
                    "trials": len(mine),
                    "workbench_failed": sum(o["workbench"] is not None for o in mine),
                    "other_failed": sum(o["other"] is not None for o in mine),
                    "errors": sorted({e for o in mine for e in (o["workbench"], o["other"]) if e}),
                }
            )
    return {
        "trials": len(outcomes),
        "workbench_failed": sum(c["workbench_failed"] for c in cells),
        "other_failed": sum(c["other_failed"] for c in cells),
        "cells": cells,
    }


def _commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "workbench"], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10, help="trials of each opener and order")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fresh_store.json")
    args = parser.parse_args()
    import mlflow

    commit = _commit()  # the code the trials import, before anything can change it
    result = measure(args.trials)
    result.update(commit=commit, mlflow=mlflow.__version__, machine=f"{platform.machine()}, {os.cpu_count()} cores")
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"fresh store, {result['trials']} trials at {result['commit']} (MLflow {result['mlflow']}):"]
    for cell in result["cells"]:
        lines.append(
            f"  {cell['opener']:>10} {cell['order']:<16} {cell['trials']:>3} trials: workbench failed "
            f"{cell['workbench_failed']}, other opener failed {cell['other_failed']}"
        )
        lines.extend(f"      {error}" for error in cell["errors"])
    print("\n".join(lines))


if __name__ == "__main__":
    main()
