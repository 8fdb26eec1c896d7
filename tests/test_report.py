"""report.html (workbench/report.py) in every stage run and from `workbench report`, the notebook frames
(workbench/frames.py), and the marker labels the app and the report share (workbench/figures.py)."""

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import DEFAULT_CONFIG, TINY_GROKKING
from mlflow import MlflowClient
from playwright.sync_api import sync_playwright
from plotly.offline import get_plotlyjs
from test_app_e2e import CHROMIUM_ARGS

from workbench import launch, report
from workbench.cli import main
from workbench.config import load_config
from workbench.errors import WorkbenchError
from workbench.figures import heatmap, label_levels, layer_lines
from workbench.frames import events, geometry, metrics, snapshots
from workbench.launch import run_stage, start_stage_run
from workbench.report import build_report, write_run_report
from workbench.snapshots import load_snapshots
from workbench.stages import StageResult
from workbench.tracking import Tracker

ROW = {"run_id": "ab" * 16, "name": "r", "chain": "", "status": "FINISHED"}  # a run as run_table lists it


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A tiny grokking run (snapshots at 0, 10, 20), one without snapshots, a run logged by hand with values to
    check by eye, a chain run with its stages, and a run left RUNNING."""
    directory = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{directory / 'mlflow.db'}"
    cwd = os.getcwd()
    os.chdir(directory)  # artifacts land beside the store
    try:
        for name, extra in (("tiny", []), ("plain", ["snapshot.enabled=false"])):
            overrides = [*TINY_GROKKING, *extra, f"tracking.run_name={name}", f"tracking.uri={uri}"]
            assert main(["run", DEFAULT_CONFIG, *overrides]) == 0
        client = MlflowClient(uri)
        ids = {
            r.info.run_name: r.info.run_id
            for r in client.search_runs([client.get_experiment_by_name("grokking").experiment_id])
        }
        with Tracker.start(uri, "by-hand", "by-hand", {"workbench.stage": "grokking"}) as run:
            run.log_metrics({"eval/acc": 0.25, "geom/lid_twonn/layer_00": 3.5, "geom/lid_twonn/layer_01": 1.25}, 0)
            run.log_metrics({"eval/acc": 0.75, "geom/lid_twonn/layer_00": 2.0, "geom/lid_twonn/layer_01": 1.5}, 10)
            run.log_metrics({"grokking/memorisation_step": 10, "event/grokking_forecast": 1.0}, 10)
            forecast = {"step": 10, "predicted_onset_step": 30}
            run.set_tags({"workbench.event.grokking_forecast": json.dumps(forecast)})
            run.set_tags(
                {"workbench.stop_reason": "rule 'done': eval/acc reached 0.7", "workbench.stopped_at_step": "12"}
            )
        ids["by-hand"] = run.run_id
        # A chain resumed from an earlier one: stage 0 reused from it, stage 1 ran here, stage 2 failed here.
        with Tracker.start(uri, "chain", "earlier", {"workbench.stage": "chain"}) as earlier:
            pass
        with Tracker.start(uri, "chain", "chain", {"workbench.stage": "chain"}) as parent:
            for index, (stage_name, under) in enumerate((("sft", earlier), ("sft", parent), ("dpo", parent))):
                stage = Tracker.start(uri, "chain", f"{index}: {stage_name}", {}, parent_run_id=under.run_id)
                stage.log_metrics({"train/loss": 2.0 - index, "geom/eff_rank/layer_00": 5.0 + index}, 0)
                stage.log_metrics({"train/loss": 1.0 - index / 2, "geom/eff_rank/layer_00": 4.0 + index}, 5)
                stage.finish("FAILED" if index == 2 else "FINISHED")
                ids[f"stage {index}"] = stage.run_id
            parent.set_tags({"workbench.chain.0.run_id": ids["stage 0"], "workbench.chain.1.run_id": ids["stage 1"]})
        ids["chain"] = parent.run_id
        live = Tracker.start(uri, "grokking", "live", {"workbench.stage": "grokking"})
        live.log_metrics({"eval/acc": 0.1}, 0)
        live.log_metrics({"eval/acc": 0.2}, 5)
        live.flush()
        ids["live"] = live.run_id  # left RUNNING; its pid tag is absent, so no check marks it FAILED
    finally:
        os.chdir(cwd)
    return directory, uri, ids


def artifact_text(uri: str, run_id: str, path: str, directory: Path) -> str:
    return Path(MlflowClient(uri).download_artifacts(run_id, path, str(directory))).read_text()


# --- the report in every run ---------------------------------------------------------------------------------


def test_a_runs_report_opens_in_chromium_with_its_plots_drawn_and_no_request_leaving_the_machine(store, tmp_path):
    _, uri, ids = store
    page_file = tmp_path / "report.html"
    page_file.write_text(artifact_text(uri, ids["tiny"], "report.html", tmp_path / "download"))
    requested = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("request", lambda request: requested.append(request.url))
        page.route("**/*", lambda route: route.continue_() if route.request.url.startswith("file:") else route.abort())
        page.goto(page_file.as_uri())
        page.wait_for_function("document.documentElement.dataset.figures === 'drawn'", timeout=30_000)
        drawn = page.evaluate(
            """() => [...document.querySelectorAll('.js-plotly-plot')].map(g => ({
                traces: g._fullData.length,
                heatmap: g.data.filter(t => t.type === 'heatmap').map(t => [t.y.length, t.x.length])[0] || null,
            }))"""
        )
        text = page.text_content("body")  # the config too, folded away in its <details>
        browser.close()
    assert requested == [page_file.as_uri()]  # the file itself, and nothing else: plotly.js is inside it
    # curves; then per feature (eff_rank, lid_mle, lid_twonn) a heatmap (a row naming the run + a row per layer, a
    # column per snapshot) and per-layer lines. lid_mle has layer_01 only: 12 distinct embedding points are too few.
    assert [d["heatmap"] for d in drawn] == [None, [3, 3], None, [2, 3], None, [3, 3], None]
    # a curve per metric the store holds more than one value of (geometry and events have their own figures); then
    # a trace per layer. Counted from the store, so a metric the stage starts logging does not change the check.
    client = MlflowClient(uri)
    logged = client.get_run(ids["tiny"]).data.metrics
    repeated = [
        k
        for k in logged
        if not k.startswith(("geom/", "event/")) and len(client.get_metric_history(ids["tiny"], k)) > 1
    ]
    assert {"train/loss", "eval/acc", "embed/fourier_gini", "heldout/confidence"} <= set(repeated)
    assert [d["traces"] for d in drawn] == [len(repeated), 1, 2, 1, 1, 1, 2]
    assert "p: 11" in text and "max_steps: 20" in text  # the resolved config
    assert "FINISHED" in text and "no events" in text


def test_report_size_is_plotly_js_and_little_else(store, tmp_path):
    _, uri, ids = store
    size = len(artifact_text(uri, ids["tiny"], "report.html", tmp_path).encode())
    packed = len(report.packed_plotlyjs())
    data = size - packed
    print(f"tiny run's report.html: {size / 1e6:.2f} MB, {data / 1e3:.0f} kB of it besides packed plotly.js")
    assert 0 < data < 150_000
    assert packed < 0.45 * len(get_plotlyjs().encode())  # gzip + base64: well under half of plotly.js itself


def test_the_report_marks_events_and_says_how_the_run_ended(store):
    _, uri, ids = store
    found = build_report([ids["by-hand"]], uri)
    assert "<td>rule &#x27;done&#x27;: eval/acc reached 0.7</td>" in found.html  # how it ended, escaped
    assert "grokking/memorisation_step = 10" in found.html  # a one-value fact
    assert "<td>10</td><td>forecast</td><td>grokking_forecast</td><td>predicted_onset_step=30</td>" in found.html
    marks = [(10, "forecast grokking_forecast"), (10, "memorisation"), (12, "stop")]  # by step, then label
    for figure in found.figures:  # the curves, the heatmap and the per-layer lines: every mark on each
        layout = figure.to_plotly_json()["layout"]
        assert [(a["x"], a["text"]) for a in layout["annotations"]] == marks
        assert [s["x0"] for s in layout["shapes"]] == [10, 10, 12]


def test_a_chain_runs_report_holds_every_stage_reused_ran_or_failed(store):
    _, uri, ids = store
    found = build_report([ids["chain"]], uri)
    labels = [
        f"earlier › 0: sft ({ids['stage 0'][:8]}, FINISHED)",  # where the reused stage ran
        f"chain › 1: sft ({ids['stage 1'][:8]}, FINISHED)",
        f"chain › 2: dpo ({ids['stage 2'][:8]}, FAILED)",  # no chain tag names a failed stage: it is nested
    ]
    assert all(f"<td>{label}</td>" in found.html for label in labels)
    curves, band, *lines = (figure.to_plotly_json() for figure in found.figures)
    assert [trace["name"] for trace in curves["data"]] == labels  # train/loss of each stage
    assert [row for row in band["data"][0]["y"] if "snapshots" in row] == [
        f"{label}: 1 layers × 2 snapshots" for label in labels
    ]
    assert [figure["layout"]["title"]["text"] for figure in lines] == [f"eff_rank per layer: {s}" for s in labels]
    assert found.notes == []  # the chain itself logs no geometry, its stages do


@pytest.mark.parametrize("ending", ["crash", "stop requested"])
def test_a_run_that_crashes_or_is_stopped_keeps_its_status_and_gets_a_report(store, tmp_path, monkeypatch, ending):
    _, uri, _ = store
    config = load_config(DEFAULT_CONFIG, [*TINY_GROKKING, f"tracking.uri={uri}"])

    def stage(config, tracker):
        tracker.log_metrics({"train/loss": 3.0}, 0)
        tracker.log_metrics({"train/loss": 2.0}, 1)
        if ending == "crash":
            raise RuntimeError("out of memory")
        return StageResult("", {}, ended_by_user=True)

    monkeypatch.setattr(launch, "stage_runner", lambda name: stage)
    tracker = start_stage_run(config, DEFAULT_CONFIG)
    if ending == "crash":
        with pytest.raises(RuntimeError), tracker:
            run_stage(config, tracker)
    else:
        with tracker:
            run_stage(config, tracker)
    run = MlflowClient(uri).get_run(tracker.run_id)
    assert run.info.status == ("FAILED" if ending == "crash" else "KILLED")
    page = artifact_text(uri, tracker.run_id, "report.html", tmp_path)
    assert f"<td>{run.info.status}</td>" in page and 'data-figure="figure-0"' in page
    assert '"y":[3.0,2.0]' in page  # the curve of train/loss, what was logged before the end
    if ending == "crash":
        assert "RuntimeError: out of memory" in page


def test_a_report_that_cannot_be_built_is_one_line_and_a_tag_and_the_run_keeps_its_status(store, monkeypatch, capsys):
    _, uri, _ = store
    with Tracker.start(uri, "grokking", "unlucky") as run:
        run.log_metrics({"eval/acc": 0.5}, 0)

    def broken(run_ids, tracking_uri):
        raise ValueError("no plotly today\nsecond line")

    monkeypatch.setattr(report, "build_report", broken)
    write_run_report(run)  # does not raise
    after = MlflowClient(uri).get_run(run.run_id)
    assert after.info.status == "FINISHED"
    assert after.data.tags["workbench.report_error"] == "ValueError: no plotly today"
    assert (
        capsys.readouterr().err
        == f"workbench: run {run.run_id}: report.html not written: ValueError: no plotly today\n"
    )
    assert not MlflowClient(uri).list_artifacts(run.run_id)


# --- workbench report ----------------------------------------------------------------------------------------


def test_workbench_report_puts_runs_side_by_side(store, tmp_path, capsys):
    _, uri, ids = store
    out = tmp_path / "two.html"
    assert main(["report", ids["tiny"], ids["by-hand"], "-o", str(out), "--tracking-uri", uri]) == 0
    page = out.read_text()
    assert f"wrote {out}" in capsys.readouterr().out
    curves = page.split('id="figure-0"')[1].split("</script>")[0]
    assert curves.count(f'({ids["tiny"][:8]}, FINISHED)"') and curves.count(f'({ids["by-hand"][:8]}, FINISHED)"')
    assert f'"text":"{ids["by-hand"][:8]}: memorisation"' in curves  # several runs: marks name their run


@pytest.mark.parametrize(
    ("run", "note"),
    [
        ("plain", "logged no geometry: `geom/` metrics come with its snapshots"),
        ("live", "is still RUNNING: this report shows what it had logged by"),
    ],
)
def test_workbench_report_of_a_run_without_geometry_or_still_running_says_so(store, tmp_path, capsys, run, note):
    _, uri, ids = store
    out = tmp_path / "report.html"
    assert main(["report", ids[run], "-o", str(out), "--tracking-uri", uri]) == 0
    lines = capsys.readouterr().err.splitlines()  # the live run has no geometry either: a line for each
    assert any(line.startswith(f"workbench: run {ids[run]} {note}") for line in lines)
    assert all(line.startswith(f"workbench: run {ids[run]} ") for line in lines)
    assert note in out.read_text()


@pytest.mark.parametrize("bad", ["unknown run", "unwritable", "a directory"])
def test_workbench_report_bad_input_is_one_line_and_exit_2(store, tmp_path, capsys, bad):
    _, uri, ids = store
    run_id, out = ids["tiny"], tmp_path / "report.html"
    if bad == "unknown run":
        run_id = "0123456789abcdef0123456789abcdef"
    elif bad == "unwritable":
        out = tmp_path / "missing" / "report.html"
    else:
        out = tmp_path
    assert main(["report", run_id, "-o", str(out), "--tracking-uri", uri]) == 2
    [line] = capsys.readouterr().err.splitlines()
    expected = {
        "unknown run": f"workbench: error: run {run_id}: not found in {uri}",
        "unwritable": f"workbench: error: -o {out}: cannot write the report: No such file or directory",
        "a directory": f"workbench: error: -o {out}: cannot write the report: Is a directory",
    }
    assert line == expected[bad]
    assert not (tmp_path / "report.html").exists()


# --- the data in pandas ---------------------------------------------------------------------------------------


def test_frames_of_a_run_logged_by_hand(store):
    _, uri, ids = store
    expected = pd.DataFrame(
        {
            "step": [0, 10, 10, 0, 10, 0, 10, 10],
            "key": ["eval/acc"] * 2
            + ["event/grokking_forecast"]
            + ["geom/lid_twonn/layer_00"] * 2
            + ["geom/lid_twonn/layer_01"] * 2
            + ["grokking/memorisation_step"],
            "value": [0.25, 0.75, 1.0, 3.5, 2.0, 1.25, 1.5, 10.0],
        }
    )
    pd.testing.assert_frame_equal(metrics(ids["by-hand"], uri), expected)
    pd.testing.assert_frame_equal(
        geometry(ids["by-hand"], uri),
        pd.DataFrame(
            {
                "step": [0, 10, 0, 10],
                "layer": ["layer_00", "layer_00", "layer_01", "layer_01"],
                "feature": ["lid_twonn"] * 4,
                "value": [3.5, 2.0, 1.25, 1.5],
            }
        ),
    )
    found = events(ids["by-hand"], uri)
    assert found.to_dict("records") == [
        {"step": 10, "kind": "forecast", "name": "grokking_forecast", "details": "predicted_onset_step=30"},
        {"step": 12, "kind": "stop", "name": "", "details": "rule 'done': eval/acc reached 0.7"},
    ]


def test_frames_hold_exactly_what_mlflow_holds_for_a_training_run(store):
    _, uri, ids = store
    client = MlflowClient(uri)
    run_id = ids["tiny"]
    keys = sorted(client.get_run(run_id).data.metrics)
    held = sorted((m.step, key, m.value) for key in keys for m in client.get_metric_history(run_id, key))
    frame = metrics(run_id, uri)
    assert sorted(frame.itertuples(index=False, name=None)) == held and len(frame) == len(held)
    assert list(frame[frame.key == "eval/acc"].step) == [0, 5, 10, 15, 20]
    geom = geometry(run_id, uri)
    for (feature, layer), rows in geom.groupby(["feature", "layer"]):
        history = client.get_metric_history(run_id, f"geom/{feature}/{layer}")
        assert sorted(zip(rows.step, rows.value, strict=True)) == sorted((m.step, m.value) for m in history)
    assert len(geom) == 3 * 5  # 3 snapshots of eff_rank and lid_twonn at 2 layers, of lid_mle at one


def test_snapshots_by_layer_name_or_position(store):
    _, uri, ids = store
    stored = load_snapshots(ids["tiny"], uri)
    last = snapshots(ids["tiny"], tracking_uri=uri)
    assert list(last) == [0, 10, 20]
    for i, step in enumerate(stored.steps):
        np.testing.assert_array_equal(last[step], stored.layers["layer_01"][i])
    np.testing.assert_array_equal(snapshots(ids["tiny"], "layer_00", uri)[10], stored.layers["layer_00"][1])
    with pytest.raises(WorkbenchError, match=r"^layer 'layer_07': run \w+'s snapshots hold layer_00, layer_01$"):
        snapshots(ids["tiny"], "layer_07", uri)


def test_frames_of_a_run_the_store_lacks_are_a_one_line_error(store):
    with pytest.raises(WorkbenchError, match="^run 0123abcd: not found in"):
        metrics("0123abcd", store[1])


# --- marker labels ---------------------------------------------------------------------------------------------


def test_close_marker_labels_go_on_rows_of_their_own():
    # The main job's marks: memorisation 50, forecast 140, grokking 400, generalisation 540, on 1500 steps.
    marks = [(50, "memorisation"), (140, "forecast grokking_forecast"), (400, "grokking"), (540, "generalisation")]
    assert label_levels(marks, 1500) == [0, 1, 0, 0]
    assert label_levels([(500, "a"), (501, "b"), (502, "c")], 1500) == [0, 1, 2]
    assert label_levels([(0, "a"), (1000, "b")], 1500) == [0, 0]


def test_heatmap_and_layer_lines_stagger_close_labels_without_overlap():
    histories = {"geom/lid/layer_00": ([0, 750, 1500], [1.0, 2.0, 3.0])}
    marks = [(500, "memorisation"), (520, "forecast"), (540, "grokking")]
    band = heatmap("lid", [(ROW, histories, marks)]).to_plotly_json()["layout"]["annotations"]
    lines = layer_lines("lid", "r", histories, marks).to_plotly_json()["layout"]
    assert [a["yshift"] for a in band] == [0, -14, -28]  # from the row naming the run down
    assert [a["yshift"] for a in lines["annotations"]] == [0, 14, 28]  # above the plot, upwards
    assert lines["margin"]["t"] == 50 + 3 * 14  # room for the three rows
    assert [a["hovertext"] for a in band] == ["step 500: memorisation", "step 520: forecast", "step 540: grokking"]
