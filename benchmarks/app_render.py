"""Time to first full render of the app's Geometry page, cold and warm cache, in two scenarios.

A synthetic sqlite store holds finished runs with the default online features (`geom/lid_twonn`, `geom/lid_mle`,
`geom/eff_rank`) on every layer at 200 snapshot steps:

- `grokking` (the default): 20 grokking runs x 12 layers, eval/train accuracy at the snapshot steps, the grokking
  landmarks and a forecast event (the markers);
- `real`: one LoRA SFT run of the real model (SmolLM2-135M: 30 blocks, so 31 hidden states, layer_00 = the
  embeddings .. layer_30) x 200 snapshots (every 50 steps from step 0), all three features although at 31
  layers the online geometry budget may move some offline (the worst case), and what the trainer logs through
  `WorkbenchCallback` every 10 steps (train/loss, grad_norm, lr, epoch, eval/loss and the eval timings) and the
  stage's checks before and after training (eval/exact_match, eval/rougeL, gold/accuracy, gold/reward).

`streamlit run app.py` serves on 127.0.0.1 and Debian's Chromium (Playwright) shows the Geometry page of the
runs; the clock runs from navigation until plotly has drawn the heatmap of all runs and the per-layer lines.
Two kinds of navigation, each on a fresh server:

- in the app: the Runs page is open (`?page=runs&runs=<the ids>`), the user clicks "Geometry" in the sidebar;
- a full page load of `?page=geometry&runs=<the ids>` (a link, a reload): the browser boots Streamlit's front
  end again, which costs what the "floor" column shows (a one-run Compare page loaded the same way).

"cold" is the first render after the server starts (empty caches; the store was already opened by a first
page, as it is for anyone who navigates there), "warm" the same page again.

    python benchmarks/app_render.py                   # 3 repeats; writes benchmarks/results/app_render.{json,md}
    python benchmarks/app_render.py --scenario real   # writes benchmarks/results/app_render_real.{json,md}
    python benchmarks/app_render.py --scenario real --layers 2 --snapshots 3   # app_render_real_1x2x3.{json,md}
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FEATURES = ("lid_twonn", "lid_mle", "eff_rank")
# scenario -> the store's shape, the stage its runs carry and the results' file name (without suffix)
SCENARIOS = {
    "grokking": {"runs": 20, "layers": 12, "snapshots": 200, "stage": "grokking", "results": "app_render"},
    "real": {"runs": 1, "layers": 31, "snapshots": 200, "stage": "sft", "results": "app_render_real"},
}
SNAPSHOT_EVERY = 50  # WorkbenchCallback's default snapshot interval, in steps
LOG_EVERY = 10  # the real scenario's trainer logging and evaluation interval, in steps
# What a trainer's log and evaluation carry, under the workbench's names (workbench/callback.py)
TRAINER_KEYS = ("train/loss", "grad_norm", "lr", "epoch", "eval/loss", "eval/runtime")
TRAINER_KEYS += ("eval/samples_per_second", "eval/steps_per_second")
CHECK_KEYS = ("eval/exact_match", "eval/rougeL", "gold/accuracy", "gold/reward")  # the SFT stage's checks
COLUMNS = ("app_cold_s", "app_warm_s", "load_cold_s", "load_warm_s", "floor_s")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


def make_store(uri: str, scenario: str, runs: int, layers: int, snapshots: int) -> list[str]:
    """Finished runs shaped like the scenario's (grokking runs, or LoRA SFT runs of the real model), logged with
    `log_batch` as the tracker does."""
    import numpy as np
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    logging.getLogger("alembic").setLevel(logging.WARNING)
    client = MlflowClient(uri)
    experiment = client.create_experiment("render")
    rng = np.random.default_rng(0)
    steps = np.arange(snapshots) * SNAPSHOT_EVERY
    stage = SCENARIOS[scenario]["stage"]
    ids = []
    for n in range(runs):
        run = client.create_run(experiment, run_name=f"run-{n:02d}", tags={"workbench.stage": stage})
        metrics = [
            Metric(f"geom/{f}/layer_{layer:02d}", float(v), 0, int(s))
            for f in FEATURES
            for layer in range(layers)
            for s, v in zip(steps, 5 + layer + np.cumsum(rng.normal(0, 0.1, snapshots)), strict=True)
        ]
        if scenario == "grokking":
            grok = int(steps[len(steps) // 3])
            accuracy = 1 / (1 + np.exp(-(steps - grok) / 200))
            curve = list(zip(steps, accuracy, strict=True))
            metrics += [Metric(k, float(v), 0, int(s)) for k in ("eval/acc", "train/acc") for s, v in curve]
            metrics += [
                Metric("grokking/memorisation_step", 50.0, 0, int(steps[-1])),
                Metric("grokking/grokking_step", float(grok), 0, int(steps[-1])),
                Metric("event/grokking_forecast", 1.0, 0, grok - 500),
            ]
        else:  # the trainer's logs every LOG_EVERY steps to the last snapshot, the stage's checks at both ends
            logged = np.arange(LOG_EVERY, int(steps[-1]) + 1, LOG_EVERY)
            metrics += [
                Metric(key, float(v), 0, int(s))
                for key in TRAINER_KEYS
                for s, v in zip(logged, np.abs(1 + np.cumsum(rng.normal(0, 0.01, len(logged)))), strict=True)
            ]
            metrics += [Metric(key, float(rng.uniform()), 0, s) for key in CHECK_KEYS for s in (0, int(steps[-1]))]
        for start in range(0, len(metrics), 1000):
            client.log_batch(run.info.run_id, metrics=metrics[start : start + 1000])
        if scenario == "grokking":
            client.set_tag(run.info.run_id, "workbench.event.grokking_forecast", json.dumps({"step": grok - 500}))
        client.set_terminated(run.info.run_id)
        ids.append(run.info.run_id)
    return ids


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def app_server(uri: str, workdir: Path) -> Iterator[str]:
    """`streamlit run app.py` on a free port of 127.0.0.1; yields its URL once it answers."""
    import requests

    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.address", "127.0.0.1"]
    command += ["--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false"]
    command += ["--server.fileWatcherType", "none"]  # as .streamlit/config.toml, which a server in another cwd skips
    server = subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if requests.get(f"{url}/_stcore/health", timeout=2).text == "ok":
                    break
            except requests.RequestException:
                time.sleep(0.2)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def browser_render(uri: str, ids: list[str], layers: int, workdir: Path) -> dict[str, float]:
    """Seconds from navigation until the heatmap (every run's band) and the per-layer lines are drawn: in the
    app (cold, warm) on one fresh server, by full page loads (cold, warm, and the floor) on another."""
    from playwright.sync_api import sync_playwright

    drawn = f"""() => {{
        const plots = [...document.querySelectorAll('.js-plotly-plot')].filter(g => g.querySelector('.main-svg'));
        const heatmaps = plots.flatMap(g => g.data.filter(t => t.type === 'heatmap'));
        return plots.length >= 2 && heatmaps.length === 1 && heatmaps[0].y.length === {len(ids) * (layers + 1)};
    }}"""
    runs = ",".join(ids)
    timings = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        with app_server(uri, workdir) as url:
            page.goto(f"{url}/?page=runs&runs={runs}")  # the session and the app's JavaScript, not timed
            page.get_by_text(f"{len(ids)} of {len(ids)} runs").wait_for(timeout=120_000)
            sidebar = page.locator('[data-testid="stSidebar"]')
            for kind in ("app_cold_s", "app_warm_s"):
                started = time.perf_counter()
                sidebar.get_by_text("Geometry", exact=True).click()
                page.wait_for_function(drawn, timeout=300_000, polling=50)
                timings[kind] = time.perf_counter() - started
                sidebar.get_by_text("Runs", exact=True).click()
                page.wait_for_function("() => !document.querySelector('.js-plotly-plot')", timeout=120_000)
        with app_server(uri, workdir) as url:
            page.goto(f"{url}/?page=runs")
            page.get_by_text(f"{len(ids)} of {len(ids)} runs").wait_for(timeout=120_000)
            for kind in ("load_cold_s", "load_warm_s"):
                started = time.perf_counter()
                page.goto(f"{url}/?page=geometry&runs={runs}")
                page.wait_for_function(drawn, timeout=300_000, polling=50)
                timings[kind] = time.perf_counter() - started
            started = time.perf_counter()
            page.goto(f"{url}/?page=compare&runs={ids[0]}")
            page.wait_for_function("() => document.querySelector('.js-plotly-plot .main-svg')", polling=50)
            timings["floor_s"] = time.perf_counter() - started
        browser.close()
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=SCENARIOS, default="grokking")
    parser.add_argument("--runs", type=int, help="default: the scenario's")
    parser.add_argument("--layers", type=int, help="default: the scenario's")
    parser.add_argument("--snapshots", type=int, help="default: the scenario's")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    scenario = SCENARIOS[args.scenario]
    runs, layers, snapshots = (getattr(args, k) or scenario[k] for k in ("runs", "layers", "snapshots"))
    name = scenario["results"]  # another shape than the scenario's goes to a file of its own, named by the shape
    if (runs, layers, snapshots) != (scenario["runs"], scenario["layers"], scenario["snapshots"]):
        name += f"_{runs}x{layers}x{snapshots}"
    shape = f"{runs} run{'s' if runs > 1 else ''} x {layers} layers x {snapshots} snapshots"
    with tempfile.TemporaryDirectory(prefix="app-render-") as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        started = time.perf_counter()
        ids = make_store(uri, args.scenario, runs, layers, snapshots)
        print(f"store: {shape} ({args.scenario}) in {time.perf_counter() - started:.0f} s")
        rows = []
        for repeat in range(args.repeats):
            timings = browser_render(uri, ids, layers, Path(tmp))
            load = os.getloadavg()[0]  # the machine is shared: say how busy it was
            rows.append({"repeat": repeat, **timings, "load_1min": load})
            print(f"repeat {repeat}: " + ", ".join(f"{k} {v:.2f}" for k, v in rows[-1].items() if k != "repeat"))
    medians = {key: statistics.median(r[key] for r in rows) for key in COLUMNS}
    result = {
        "scenario": args.scenario,
        "shape": {"runs": runs, "layers": layers, "snapshots": snapshots, "features": list(FEATURES)},
        **({"other_metrics": {"every": LOG_EVERY, "keys": [*TRAINER_KEYS]}} if args.scenario == "real" else {}),
        "repeats": rows,
        "median": medians,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip(),
    }
    command = "python benchmarks/app_render.py" + (
        "" if args.scenario == "grokking" else f" --scenario {args.scenario}"
    )
    command += "".join(
        f" --{k} {v}"
        for k, v in zip(("runs", "layers", "snapshots"), (args.runs, args.layers, args.snapshots), strict=True)
        if v
    )
    extra = f" and the trainer's {', '.join(TRAINER_KEYS)} every {LOG_EVERY} steps" if args.scenario == "real" else ""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Geometry page render time" + ("" if args.scenario == "grokking" else f": {args.scenario} model"),
        "",
        f"`{command}` at commit {result['commit']}: {shape} ({len(FEATURES)} features each{extra}), "
        f"{result['machine']}; load average in the table.",
        "",
        "Seconds from navigation until the heatmap and the per-layer lines are drawn in Chromium: clicking",
        "Geometry in the open app, or loading the page's URL (which boots Streamlit's front end again; the floor is",
        "a one-run Compare page loaded so):",
        "",
        "| repeat | in the app, cold cache (first render) | in the app, warm | page load, cold | page load, warm "
        "| floor: page load of a small page | load average |",
        "|---|---|---|---|---|---|---|",
        *[
            f"| {r['repeat']} | " + " | ".join(f"{r[k]:.2f} s" for k in COLUMNS) + f" | {r['load_1min']:.1f} |"
            for r in rows
        ],
        "| median | " + " | ".join(f"{medians[k]:.2f} s" for k in COLUMNS) + " | |",
        "",
    ]
    (RESULTS / f"{name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
