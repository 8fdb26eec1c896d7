"""Time to first full render of the app's Geometry page: 20 runs x 12 layers x 200 snapshots, cold and warm cache.

A synthetic sqlite store holds 20 finished runs, each with the default online features (`geom/lid_twonn`,
`geom/lid_mle`, `geom/eff_rank`) on 12 layers at 200 snapshot steps, eval/train accuracy at the same steps, the
grokking landmarks and a forecast event (the markers). `streamlit run app.py` serves on 127.0.0.1 and Debian's
Chromium (Playwright) opens `?page=geometry&runs=<the 20 ids>`; the clock runs from navigation until plotly has
drawn all 20 heatmaps and the per-layer lines. "cold" is the first load of the page after the server starts
(empty caches; the store was already opened by a first page, as it is for anyone who navigates there), "warm" a
reload of the same page. Each repeat starts a fresh server.

    python benchmarks/app_render.py                 # 3 repeats; writes benchmarks/results/app_render.{json,md}
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FEATURES = ("lid_twonn", "lid_mle", "eff_rank")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


def make_store(uri: str, runs: int, layers: int, snapshots: int) -> list[str]:
    """Finished runs shaped like grokking runs, logged with `log_batch` as the tracker does."""
    import numpy as np
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    logging.getLogger("alembic").setLevel(logging.WARNING)
    client = MlflowClient(uri)
    experiment = client.create_experiment("render")
    rng = np.random.default_rng(0)
    steps = np.arange(snapshots) * 50
    ids = []
    for n in range(runs):
        run = client.create_run(experiment, run_name=f"run-{n:02d}", tags={"workbench.stage": "grokking"})
        grok = int(steps[len(steps) // 3])
        metrics = [
            Metric(f"geom/{f}/layer_{layer:02d}", float(v), 0, int(s))
            for f in FEATURES
            for layer in range(layers)
            for s, v in zip(steps, 5 + layer + np.cumsum(rng.normal(0, 0.1, snapshots)), strict=True)
        ]
        accuracy = 1 / (1 + np.exp(-(steps - grok) / 200))
        curve = list(zip(steps, accuracy, strict=True))
        metrics += [Metric(k, float(v), 0, int(s)) for k in ("eval/acc", "train/acc") for s, v in curve]
        metrics += [
            Metric("grokking/memorisation_step", 50.0, 0, int(steps[-1])),
            Metric("grokking/grokking_step", float(grok), 0, int(steps[-1])),
            Metric("event/grokking_forecast", 1.0, 0, grok - 500),
        ]
        for start in range(0, len(metrics), 1000):
            client.log_batch(run.info.run_id, metrics=metrics[start : start + 1000])
        client.set_tag(run.info.run_id, "workbench.event.grokking_forecast", json.dumps({"step": grok - 500}))
        client.set_terminated(run.info.run_id)
        ids.append(run.info.run_id)
    return ids


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def browser_render(uri: str, ids: list[str], workdir: Path) -> tuple[float, float, float]:
    """(cold, warm, floor) seconds from navigation until every heatmap and the line chart are drawn, on a fresh
    server; floor: the same navigation to the Compare page of one run, one small chart (what any page costs)."""
    import requests
    from playwright.sync_api import sync_playwright

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
        drawn = f"""() => {{
            const plots = [...document.querySelectorAll('.js-plotly-plot')].filter(g => g.querySelector('.main-svg'));
            const heatmaps = plots.flatMap(g => g.data.filter(t => t.type === 'heatmap'));
            return plots.length >= 2 && heatmaps.length === {len(ids)};
        }}"""
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{url}/?page=runs")  # the session and the app's JavaScript, not timed
            page.get_by_text("runs").first.wait_for(timeout=120_000)
            timings = []
            for _ in range(2):  # cold, then warm
                started = time.perf_counter()
                page.goto(f"{url}/?page=geometry&runs={','.join(ids)}")
                page.wait_for_function(drawn, timeout=300_000, polling=50)
                timings.append(time.perf_counter() - started)
            started = time.perf_counter()
            page.goto(f"{url}/?page=compare&runs={ids[0]}")
            page.wait_for_function("() => document.querySelector('.js-plotly-plot .main-svg')", polling=50)
            timings.append(time.perf_counter() - started)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    return timings[0], timings[1], timings[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--snapshots", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="app-render-") as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        started = time.perf_counter()
        ids = make_store(uri, args.runs, args.layers, args.snapshots)
        shape = f"{args.runs} runs x {args.layers} layers x {args.snapshots} snapshots"
        print(f"store: {shape} in {time.perf_counter() - started:.0f} s")
        rows = []
        for repeat in range(args.repeats):
            cold, warm, floor = browser_render(uri, ids, Path(tmp))
            load = os.getloadavg()[0]  # the machine is shared: say how busy it was
            rows.append({"repeat": repeat, "cold_s": cold, "warm_s": warm, "floor_s": floor, "load_1min": load})
            print(f"repeat {repeat}: cold cache {cold:.2f} s, warm cache {warm:.2f} s, one small chart {floor:.2f} s")
    medians = {key: statistics.median(r[key] for r in rows) for key in ("cold_s", "warm_s", "floor_s")}
    result = {
        "shape": {"runs": args.runs, "layers": args.layers, "snapshots": args.snapshots, "features": list(FEATURES)},
        "repeats": rows,
        "median": medians,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "app_render.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Geometry page render time",
        "",
        f"`python benchmarks/app_render.py`: {args.runs} runs x {args.layers} layers x {args.snapshots} snapshots "
        f"({len(FEATURES)} features each), {result['machine']}; load average in the table.",
        "",
        "Seconds from navigation until every chart is drawn in Chromium:",
        "",
        "| repeat | cold cache (first render) | warm cache | floor: one run's Compare page | load average |",
        "|---|---|---|---|---|",
        *[
            f"| {r['repeat']} | {r['cold_s']:.2f} s | {r['warm_s']:.2f} s | {r['floor_s']:.2f} s "
            f"| {r['load_1min']:.1f} |"
            for r in rows
        ],
        f"| median | {medians['cold_s']:.2f} s | {medians['warm_s']:.2f} s | {medians['floor_s']:.2f} s | |",
        "",
    ]
    (RESULTS / "app_render.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
