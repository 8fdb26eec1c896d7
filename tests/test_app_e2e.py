"""The app in a real browser: Debian's Chromium driven by Playwright against `streamlit run app.py` on 127.0.0.1,
on runs this test creates (a finished tiny grokking run, and a live one in a subprocess that the test stops)."""

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import pytest
import requests
from conftest import DEFAULT_CONFIG, TINY_GROKKING
from mlflow import MlflowClient
from playwright.sync_api import sync_playwright

from workbench.tracking import open_store

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
SNAPSHOT_EVERY = 50  # the live run's snapshot interval, in steps
EVAL_EVERY = 10
LIVE_RUN = [
    *TINY_GROKKING,
    "train.max_steps=100000",
    f"train.eval_every={EVAL_EVERY}",
    f"snapshot.every={SNAPSHOT_EVERY}",
    "tracking.flush_seconds=0.5",
    "tracking.run_name=live",
]
WAIT_MS = 60_000

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture
def live_run(tracking_uri, tmp_path):
    """A grokking run with a budget it will not finish, training in a subprocess into the test's store."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    code = "import sys; from workbench.cli import main; sys.exit(main(sys.argv[1:]))"
    # The store's tables first, under the workbench's lock: a plain client creating them while the child does
    # races it through MLflow's schema migration, and the loser dies (the child, before its first metric).
    client, _ = open_store(tracking_uri)
    log_path = tmp_path / "live_run.log"
    with open(log_path, "w") as log:
        command = [sys.executable, "-c", code, "run", DEFAULT_CONFIG, *LIVE_RUN]
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=log)

    def running_with_metrics():
        if process.poll() is not None:
            tail = log_path.read_text().strip().splitlines()[-5:]
            raise AssertionError(
                f"the live run exited ({process.returncode}) before its first metrics:\n" + "\n".join(tail)
            )
        found = client.get_experiment_by_name("grokking")
        runs = client.search_runs([found.experiment_id], "attributes.run_name = 'live'") if found else []
        return runs[0].info.run_id if runs and "eval/acc" in runs[0].data.metrics else None

    try:
        yield wait_until(running_with_metrics, 120, "the live run's first metrics")
    finally:
        process.kill()
        process.wait()


@pytest.fixture
def app_url(tracking_uri, tmp_path):
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.address", "127.0.0.1"]
    command += ["--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false"]
    command += ["--server.fileWatcherType", "none"]  # as .streamlit/config.toml, which a server in another cwd skips
    with open(tmp_path / "streamlit.log", "w") as log:
        server = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"

    def healthy():
        try:
            return requests.get(f"{url}/_stcore/health", timeout=2).text == "ok"
        except requests.RequestException:
            return False

    try:
        wait_until(healthy, 60, "streamlit to serve")
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture
def page(tmp_path):
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS)
        yield browser.new_page(viewport={"width": 1400, "height": 1000})
        browser.close()


@contextmanager
def screenshot_on_failure(page, path: Path):
    try:
        yield
    except BaseException:
        page.screenshot(path=str(path), full_page=True)
        raise


def heatmap_shapes(page) -> list[list[int]]:
    """[layers, steps] of every heatmap trace plotly drew on the page."""
    return page.evaluate(
        """() => [...document.querySelectorAll('.js-plotly-plot')]
            .flatMap(g => g.data.filter(t => t.type === 'heatmap'))
            .map(t => [t.y.length, t.x.length])"""
    )


def test_every_page_in_a_browser_and_stop_ends_a_live_run_killed(run_grokking, live_run, app_url, page, tmp_path):
    finished = run_grokking().info.run_id  # snapshots at steps 0, 10, 20 of the embeddings and one block
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")

    with screenshot_on_failure(page, tmp_path / "runs.png"):
        page.goto(f"{app_url}/?page=runs")
        page.get_by_text("2 of 2 runs; refreshing every 2 s").wait_for(timeout=WAIT_MS)

    with screenshot_on_failure(page, tmp_path / "compare.png"):
        page.goto(f"{app_url}/?page=compare&runs={finished},{live_run}")
        page.locator(".js-plotly-plot").first.wait_for(timeout=WAIT_MS)
        names = page.evaluate("() => document.querySelector('.js-plotly-plot').data.map(t => t.name)")
        assert len(names) == 4 and len(set(names)) == 2  # eval/acc and train/acc (by default) of each run

    with screenshot_on_failure(page, tmp_path / "geometry.png"):
        page.goto(f"{app_url}/?page=geometry&runs={finished}")
        page.get_by_text("2 layers × 3 snapshots").first.wait_for(timeout=WAIT_MS)
        assert heatmap_shapes(page) == [[3, 3]]  # a row naming the run, a row per layer; a column per snapshot
        sidebar = page.locator('[data-testid="stSidebar"]')
        for name in ("Runs", "Geometry"):  # moving between pages in the app, without a page load
            sidebar.get_by_text(name, exact=True).click()
            page.get_by_role("heading", name=name).wait_for(timeout=WAIT_MS)

    with screenshot_on_failure(page, tmp_path / "policies.png"):
        page.goto(f"{app_url}/?page=policies&runs={finished}")
        editor = page.get_by_label("Policy (YAML, docs/policies.md)")
        editor.fill("- name: done\n  when: {metric: eval/acc, mode: max, patience: soon}\n  actions: [stop]\n")
        editor.press("Control+Enter")
        page.get_by_text("policy: line 2: rule 'done' (#1): when.patience").wait_for(timeout=WAIT_MS)
        editor.fill("- name: done\n  when: {metric: eval/acc, mode: max, stopping_threshold: 0.0}\n  actions: [stop]\n")
        editor.press("Control+Enter")
        page.get_by_text("valid: 1 rule(s)").wait_for(timeout=WAIT_MS)
        page.get_by_role("button", name="Backtest").click()
        page.get_by_text("stop: 100% saved").wait_for(timeout=WAIT_MS)  # stopped at step 0 of 20
        editor.fill("- name: watch\n  when: {metric: eval/acc, above: 2}\n  actions: [alert]\n")  # never fires
        editor.press("Control+Enter")
        page.get_by_text("valid: 1 rule(s): watch").wait_for(timeout=WAIT_MS)
        page.get_by_role("button", name="Attach", exact=True).click()  # to the one running run, the live one
        page.get_by_text("the run takes the rules at its next poll").wait_for(timeout=WAIT_MS)

    with screenshot_on_failure(page, tmp_path / "live.png"):
        page.goto(f"{app_url}/?page=live&run={live_run}")
        page.get_by_text("attached policy taken at step").wait_for(timeout=WAIT_MS)  # read back from the run
        page.get_by_role("button", name="Checkpoint now", exact=True).click(timeout=WAIT_MS)
        page.get_by_text("checkpoints at steps").wait_for(timeout=WAIT_MS)  # saved by the run, read back
        page.get_by_role("button", name="Stop run", exact=True).click(timeout=WAIT_MS)
        clicked = time.monotonic()
        page.get_by_text("(ended KILLED)").wait_for(timeout=WAIT_MS)
        shown = time.monotonic() - clicked
        page.get_by_text("stop requested").first.wait_for(timeout=WAIT_MS)
    run = client.get_run(live_run)
    assert run.info.status == "KILLED" and run.data.tags["workbench.stop_reason"] == "stop requested"
    checkpoints = [a.path for a in client.list_artifacts(live_run, "checkpoints")]
    assert len(checkpoints) == 2  # "Checkpoint now", then the stop's own
    # Honoured within one snapshot interval: the stop step is at most SNAPSHOT_EVERY steps after the step the run
    # was at when the request was made. That step is known to one eval interval (the last eval logged before the
    # request's timestamp), and a request written while the run polls may be seen one eval later.
    requested = datetime.fromisoformat(run.data.tags["workbench.stop_requested"].removeprefix("requested "))
    history = client.get_metric_history(live_run, "eval/acc")
    before = max(m.step for m in history if m.timestamp <= requested.timestamp() * 1000)
    stopped_at = int(run.data.tags["workbench.stopped_at_step"])
    print(f"stop requested at step >= {before}, honoured at step {stopped_at} (snapshot every {SNAPSHOT_EVERY}); ")
    print(f"the page showed the run KILLED {shown:.1f} s after the click")
    assert 0 <= stopped_at - before <= SNAPSHOT_EVERY + EVAL_EVERY
