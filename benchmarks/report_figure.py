"""docs/report.png, the README's picture of a run's report.html: the main job, shortened to 600 steps (it memorises
at 50, the forecast fires at 120, it groks at 330 and generalises at 440), run into a throw-away sqlite store;
then the run's own report.html artifact is opened in Chromium (headless, the system's /usr/bin/chromium, as the
app's browser tests) and the picture is its top (the runs table and the first two curves) above the heatmap and
per-layer lines of `lid_twonn`.

    python benchmarks/report_figure.py                          # ~1 minute on 2 CPU cores
    python benchmarks/report_figure.py --run-id ID --tracking-uri sqlite:///mlflow.db   # a run of yours
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlflow import MlflowClient  # noqa: E402
from PIL import Image  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402

from workbench.cli import main as workbench  # noqa: E402
from workbench.tracking import resolve_tracking_uri  # noqa: E402

CONFIG = ROOT / "configs" / "grokking.yaml"
OVERRIDES = ["train.max_steps=600"]
OUT = ROOT / "docs" / "report.png"
WIDTH = 1200
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]


def run_main_job(directory: Path) -> tuple[str, str]:
    """(run id, tracking URI) of the shortened main job, trained in `directory`."""
    uri = f"sqlite:///{directory / 'mlflow.db'}"
    cwd = os.getcwd()
    os.chdir(directory)  # its artifacts land beside the store
    try:
        assert workbench(["run", str(CONFIG), *OVERRIDES, f"tracking.uri={uri}"]) == 0
    finally:
        os.chdir(cwd)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("grokking").experiment_id
    return client.search_runs([experiment], order_by=["attribute.start_time DESC"], max_results=1)[0].info.run_id, uri


def screenshot(page_file: Path, out: Path) -> None:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": WIDTH, "height": 1000})
        page.goto(page_file.as_uri())
        page.wait_for_function("document.documentElement.dataset.figures === 'drawn'")  # set by the report
        # The runs table and the curves down to the bottom of their second panel (eval/loss), in page pixels.
        bottom = page.evaluate(
            """() => { const g = document.getElementById('figure-0'), y = g._fullLayout.yaxis2;
                       return g.getBoundingClientRect().top + window.scrollY + y._offset + y._length + 30; }"""
        )
        parts = [page.screenshot(full_page=True, clip={"x": 0, "y": 0, "width": WIDTH, "height": bottom})]
        for n in (1, 2):  # the heatmap, then the per-layer lines, of lid_twonn
            parts.append(page.locator(f"xpath=//h3[text()='lid_twonn']/following-sibling::div[{n}]").screenshot())
        browser.close()
    images = [Image.open(io.BytesIO(part)).convert("RGB") for part in parts]
    picture = Image.new("RGB", (WIDTH, sum(image.height for image in images)), "white")
    top = 0
    for image in images:
        picture.paste(image, (0, top))
        top += image.height
    picture.save(out, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-id", help="a logged run's report instead of a new run of the main job")
    parser.add_argument(
        "--tracking-uri", help="the store of --run-id (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)"
    )
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="workbench-report-figure-") as tmp:
        directory = Path(tmp)
        run_id, uri = (args.run_id, resolve_tracking_uri(args.tracking_uri)) if args.run_id else run_main_job(directory)
        page_file = Path(MlflowClient(uri).download_artifacts(run_id, "report.html", str(directory / "report")))
        screenshot(page_file, args.out)
        size = page_file.stat().st_size
    print(f"wrote {args.out} from run {run_id}'s report.html ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
