"""Each page of the app through Streamlit's AppTest, on one store of runs made here, and its bad inputs."""

import base64
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
from conftest import DEFAULT_CONFIG, TINY_GROKKING
from mlflow import MlflowClient
from mlflow.entities import Metric
from streamlit.testing.v1 import AppTest
from test_tod_continual import CONFIG as CONTINUAL_CONFIG
from test_tod_continual import TINY as TINY_CONTINUAL

from workbench import runs
from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.policies import parse_policy
from workbench.runs import bulk_metric_histories, continual_histories, metric_histories, run_table
from workbench.snapshots import load_snapshots
from workbench.tracking import Tracker

ROOT = Path(__file__).resolve().parents[1]
STOPS_AT_FIRST_EVAL = "- name: done\n  when: {metric: eval/acc, mode: max, stopping_threshold: 0}\n  actions: [stop]\n"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Runs of every kind the pages show: with geometry, without, a continual run (a parent and a nested run per
    domain), live, stopped by the user, deleted."""
    directory = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{directory / 'mlflow.db'}"
    cwd = os.getcwd()
    os.chdir(directory)  # artifacts land beside the store
    try:
        ids = {}
        for name, extra in (("geometry", []), ("plain", ["snapshot.enabled=false"])):
            assert main(["run", DEFAULT_CONFIG, *TINY_GROKKING, *extra, f"tracking.run_name={name}"]) == 0
        assert main(["run", CONTINUAL_CONFIG, *TINY_CONTINUAL, "tracking.run_name=continual"]) == 0
        client = MlflowClient(uri)
        for run in client.search_runs([e.experiment_id for e in client.search_experiments()]):
            ids[run.info.run_name] = run.info.run_id
        live = Tracker.start(uri, "grokking", "live", {"workbench.stage": "grokking"})
        live.log_metrics({"eval/acc": 0.1, "train/acc": 0.2}, 0)
        live.flush()
        ids["live"] = live.run_id  # left RUNNING
        with Tracker.start(uri, "grokking", "stopped") as stopped:
            stopped.log_metrics({"eval/acc": 0.5}, 40)
            stopped.set_tags({"workbench.stop_reason": "stop requested", "workbench.stopped_at_step": "40"})
            stopped.finish("KILLED")  # as a stage ended by a stop request is
        ids["stopped"] = stopped.run_id
        with Tracker.start(uri, "grokking", "deleted") as deleted:
            deleted.log_metrics({"eval/acc": 0.5}, 0)
        client.delete_run(deleted.run_id)
        ids["deleted"] = deleted.run_id
    finally:
        os.chdir(cwd)
    return directory, uri, ids


def open_page(store, monkeypatch, page: str, **params: str) -> AppTest:
    directory, uri, _ = store
    monkeypatch.chdir(directory)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    app = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    app.query_params.update(page=page, **params)
    app.run()
    assert not app.exception
    return app


def figures(app: AppTest) -> list[dict]:
    return [json.loads(chart.proto.spec) for chart in app.get("plotly_chart")]


def values(array) -> list:
    """A plotly JSON array: a list, or numpy data plotly encoded as {dtype, bdata}."""
    if isinstance(array, dict):
        return np.frombuffer(base64.b64decode(array["bdata"]), dtype=array["dtype"]).tolist()
    return array


def texts(elements) -> list[str]:
    return [e.value for e in elements]


def test_runs_page_lists_every_live_run_and_filters_by_status(store, monkeypatch):
    app = open_page(store, monkeypatch, "runs")
    assert len(app.dataframe[0].value) == 7  # the deleted run is not listed; the continual run's domains are
    assert "7 of 7 runs; refreshing every 2 s" in texts(app.caption)  # a live run: the table refreshes
    app.multiselect(key="filter-status").set_value(["KILLED"]).run()
    table = app.dataframe[0].value
    assert list(table["name"]) == ["stopped"] and list(table["stop_reason"]) == ["stop requested"]


def test_runs_page_name_filter_is_plain_text_not_a_pattern(store, monkeypatch):
    app = open_page(store, monkeypatch, "runs")
    app.text_input(key="filter-text").set_value(".*").run()
    assert not app.exception and len(app.dataframe[0].value) == 0


def test_compare_overlays_the_chosen_metric_of_each_run_by_step(store, monkeypatch):
    ids = store[2]
    app = open_page(store, monkeypatch, "compare", runs=f"{ids['geometry']},{ids['stopped']}")
    app.multiselect(key="compare-metrics").set_value(["eval/acc"]).run()
    [figure] = figures(app)
    assert len(figure["data"]) == 2 and all(trace["xaxis"] == "x" for trace in figure["data"])
    steps = {trace["name"].split(" (")[0]: values(trace["x"]) for trace in figure["data"]}
    assert steps["geometry"] == [0, 5, 10, 15, 20] and steps["stopped"] == [40]


def test_geometry_heatmap_has_a_row_per_layer_and_a_column_per_snapshot(store, monkeypatch):
    ids = store[2]
    app = open_page(store, monkeypatch, "geometry", runs=ids["geometry"])
    heatmap, lines = figures(app)
    [trace] = heatmap["data"]
    short = ids["geometry"][:8]
    assert trace["type"] == "heatmap" and trace["x"] == [0, 10, 20]
    title, *layers = trace["y"]  # a blank row naming the run, then a row per layer
    assert "2 layers × 3 snapshots" in title and layers == [f"layer_00 · {short}", f"layer_01 · {short}"]
    assert trace["z"]["shape"].replace(" ", "") == "3,3"  # rows x snapshots, as numpy sent it
    assert np.isnan(values(trace["z"])[:3]).all() and not np.isnan(values(trace["z"])[3:]).any()
    assert heatmap["layout"]["yaxis"]["ticktext"][1:] == ["layer_00", "layer_01"]
    assert {trace["name"] for trace in lines["data"]} == {"layer_00", "layer_01"}
    assert "eff_rank" in app.selectbox[0].options


def test_heatmap_stacks_runs_in_bands_with_each_runs_markers_across_its_own_band(store, monkeypatch):
    ids = store[2]
    app = open_page(store, monkeypatch, "geometry", runs=f"{ids['geometry']},{ids['continual']}")
    heatmap = figures(app)[0]
    rows = heatmap["data"][0]["y"]
    second = next(i for i, row in enumerate(rows) if i > 0 and "snapshots" in row)  # the continual run's title row
    assert second == 3 and len(heatmap["data"]) == 1
    switches = [s for s in heatmap["layout"]["shapes"] if s["y0"] == second + 0.5]
    assert switches and all(s["y1"] == len(rows) - 0.5 for s in switches)  # down to the band's last layer only


def test_continual_run_geometry_is_joined_across_domain_switches(store, monkeypatch):
    _, uri, ids = store
    client = MlflowClient(uri)
    nested = client.search_runs(
        [client.get_run(ids["continual"]).info.experiment_id], f"tags.mlflow.parentRunId = '{ids['continual']}'"
    )
    domains = sorted(nested, key=lambda r: r.data.tags["tod.stage_index"])
    per_domain = [metric_histories(r.info.run_id, uri, "geom/lid_twonn/") for r in domains]
    joined, switches = continual_histories(ids["continual"], "geom/lid_twonn/", uri)
    for key, (steps, vals) in joined.items():
        assert steps == [s for h in per_domain for s in h[key][0]] and vals == [
            v for h in per_domain for v in h[key][1]
        ]
        assert steps == sorted(steps) and len(set(steps)) == len(steps)  # the domains share one step count
    assert switches == [
        (h["geom/lid_twonn/" + "layer_00"][0][0], f"domain {d}")
        for h, d in zip(per_domain, ("restaurant", "hotel"), strict=True)
    ]

    app = open_page(store, monkeypatch, "geometry", runs=ids["continual"])  # the parent run has no geom/ itself
    heatmap, lines = figures(app)
    assert heatmap["data"][0]["x"] == sorted({s for h in per_domain for s, _ in h.values() for s in s})
    marks = {(a["x"], a["text"]) for a in heatmap["layout"]["annotations"]}
    assert set(switches) <= marks and {s["x0"] for s in heatmap["layout"]["shapes"]} >= {s for s, _ in switches}
    assert {a["text"] for a in lines["layout"]["annotations"]} >= {"domain restaurant", "domain hotel"}


def test_snapshot_explorer_projects_every_point_of_the_chosen_step(store, monkeypatch):
    ids = store[2]
    app = open_page(store, monkeypatch, "geometry", runs=ids["geometry"])
    app.toggle(key="explore").set_value(True).run()
    app.select_slider(key="snapshot-step").set_value(10).run()
    scatter = figures(app)[-1]
    assert "at step 10" in scatter["layout"]["title"]["text"]
    points = len(load_snapshots(ids["geometry"], store[1]).index["points"])  # every token of every probe
    answers = {trace["name"] for trace in scatter["data"]}
    assert len(answers) > 1 and sum(len(values(trace["x"])) for trace in scatter["data"]) == points


def test_bulk_histories_equal_the_per_key_mlflow_calls(store):
    _, uri, ids = store
    runs = [ids["geometry"], ids["plain"], ids["stopped"]]
    for prefix in ("geom/lid_twonn/", "eval/", "geom/eff_rank/layer_01"):
        bulk = bulk_metric_histories(runs, prefix, uri)
        assert bulk == {run_id: metric_histories(run_id, uri, prefix) for run_id in runs}
    assert len(bulk[ids["geometry"]]["geom/eff_rank/layer_01"][0]) == 3 and bulk[ids["plain"]] == {}


def test_bulk_histories_fall_back_on_the_public_api_if_mlflows_table_model_changes(store, monkeypatch):
    import mlflow.store.tracking.dbmodels.models as models

    _, uri, ids = store
    expected = bulk_metric_histories([ids["geometry"]], "geom/", uri)
    public_calls = []
    monkeypatch.setattr(runs, "metric_histories", lambda *a: public_calls.append(a) or metric_histories(*a))
    monkeypatch.setattr(models, "SqlMetric", type("Renamed", (), {}))  # a model without the columns read
    assert bulk_metric_histories([ids["geometry"]], "geom/", uri) == expected
    assert public_calls == [(ids["geometry"], uri, "geom/")]


def test_geometry_page_opens_on_the_newest_run_that_has_geometry(store, monkeypatch):
    ids = store[2]
    app = open_page(store, monkeypatch, "geometry")  # the newest runs, stopped and live, have none
    assert app.multiselect(key="geometry-runs").value == [ids["continual"]]  # through its domains' runs
    assert not app.info and figures(app)[0]["data"][0]["type"] == "heatmap"


def test_geometry_page_on_a_run_without_geometry_says_so(store, monkeypatch):
    app = open_page(store, monkeypatch, "geometry", runs=store[2]["plain"])
    assert any("No geometry logged yet" in t for t in texts(app.info)) and not figures(app)


def test_policy_editor_names_the_line_and_field_of_an_error(store, monkeypatch):
    app = open_page(store, monkeypatch, "policies", runs=store[2]["geometry"])
    app.text_area[0].set_value(
        "- name: p\n  when:\n    metric: eval/acc\n    mode: max\n    patiense: 3\n  actions: [stop]\n"
    ).run()
    assert texts(app.error) == ["policy: line 5: rule 'p' (#1): when.patiense: unknown key"]
    app.text_area[0].set_value("- name: p\n  when: {metric: eval/acc, above: 1\n").run()
    assert texts(app.error)[0].startswith("policy: line 3: invalid YAML")
    app.text_area[0].set_value("- name: p\n  when: {metric: eval/acuracy, above: 1}\n  actions: [alert]\n").run()
    assert not app.error
    assert texts(app.warning) == [
        "policy: line 2: metric 'eval/acuracy' is logged by none of these runs (did you mean eval/acc?)"
    ]


def test_backtest_shows_where_each_run_would_have_stopped(store, monkeypatch):
    ids = store[2]
    app = open_page(store, monkeypatch, "policies", runs=f"{ids['geometry']},{ids['plain']}")
    app.text_area[0].set_value(STOPS_AT_FIRST_EVAL).run()
    app.button(key="backtest").click().run()
    table = app.dataframe[0].value
    assert list(table["would stop at"]) == ["0", "0"] and list(table["compute saved"]) == ["100% of 20"] * 2
    stops = [shape["x0"] for figure in figures(app) for shape in figure["layout"].get("shapes", [])]
    assert stops == [0, 0]


def test_a_policy_is_saved_under_configs_policies_and_a_bad_name_refused(store, monkeypatch):
    app = open_page(store, monkeypatch, "policies")
    app.text_area[0].set_value(STOPS_AT_FIRST_EVAL).run()
    app.text_input(key="policy-name").set_value("../escape").run()
    app.button(key="policy-save").click().run()
    assert "letters, digits" in texts(app.error)[0] and not (store[0] / "configs" / "escape.yaml").exists()
    app.text_input(key="policy-name").set_value("first-eval").run()
    app.button(key="policy-save").click().run()
    saved = store[0] / "configs" / "policies" / "first-eval.yaml"
    assert saved.read_text() == STOPS_AT_FIRST_EVAL and parse_policy(saved.read_text())[0].name == "done"


def test_a_saved_policy_is_checked_with_a_config_and_shown_as_the_run_command(store, monkeypatch):
    configs = store[0] / "configs"
    (configs / "policies").mkdir(parents=True, exist_ok=True)
    grokking = (ROOT / "configs" / "grokking.yaml").read_text()
    (configs / "grokking.yaml").write_text(grokking)
    (configs / "clash.yaml").write_text(
        grokking + "policies:\n- {name: done, when: {metric: m, above: 1}, actions: [alert]}\n"
    )
    policy = "- name: done\n  when: {metric: eval/acc, above: 0.99}\n  actions: [stop]\n"  # no other test saves it
    app = open_page(store, monkeypatch, "policies")
    app.text_area[0].set_value(policy).run()
    assert "Save the policy" in texts(app.caption)[0]  # nothing saved yet: nothing to pair
    app.text_input(key="policy-name").set_value("for-config").run()
    app.button(key="policy-save").click().run()
    app.selectbox(key="policy-config").set_value("grokking.yaml").run()
    assert texts(app.code) == ["workbench run configs/grokking.yaml --policy configs/policies/for-config.yaml"]
    app.selectbox(key="policy-config").set_value("clash.yaml").run()  # the config has a rule named 'done' too
    assert texts(app.error) == [
        "configs/policies/for-config.yaml: rule 'done': name: already a rule of configs/clash.yaml: policies"
    ]


def test_a_policy_is_attached_to_a_running_run_from_the_page(store, monkeypatch):
    _, uri, ids = store
    app = open_page(store, monkeypatch, "policies")
    app.text_area[0].set_value(STOPS_AT_FIRST_EVAL).run()
    target = app.selectbox(key="attach-run")
    assert target.value == ids["live"] and len(target.options) == 1  # running runs only
    app.button(key="attach").click().run()
    assert "the run takes the rules at its next poll" in texts(app.success)[-1]
    client = MlflowClient(uri)
    assert (
        json.loads(client.get_run(ids["live"]).data.tags["workbench.attached_policy"])["policy"] == STOPS_AT_FIRST_EVAL
    )
    [kept] = client.list_artifacts(ids["live"], "policies")
    assert Path(client.download_artifacts(ids["live"], kept.path, str(store[0]))).read_text() == STOPS_AT_FIRST_EVAL


def test_live_page_says_where_a_run_took_an_attached_policy(store, monkeypatch):
    tag = json.dumps({"step": 30, "rules": ["done"]})  # what the run's engine sets when it takes the rules
    MlflowClient(store[1]).set_tag(store[2]["plain"], "workbench.attached_policy_applied", tag)
    app = open_page(store, monkeypatch, "live", run=store[2]["plain"])
    assert "attached policy taken at step 30: rules done" in texts(app.caption)


def test_live_page_stops_a_running_run_and_shows_why_a_run_stopped(store, monkeypatch):
    ids = store[2]
    app = open_page(store, monkeypatch, "live", run=ids["stopped"])
    assert texts(app.warning) == ["Stopped at step 40: stop requested (ended KILLED)"]
    app = open_page(store, monkeypatch, "live", run=ids["live"])
    app.button(key="checkpoint").click().run()
    app.button(key="stop").click().run()
    assert not app.exception
    tags = MlflowClient(store[1]).get_run(ids["live"]).data.tags
    assert tags["workbench.stop_requested"].startswith("requested ")
    assert tags["workbench.checkpoint_requested"].startswith("requested ")


@pytest.mark.parametrize("page", ["compare", "geometry", "policies"])
def test_a_deleted_run_is_a_message_not_a_stack_trace(store, monkeypatch, page):
    app = open_page(store, monkeypatch, page, runs=store[2]["deleted"])
    assert any("was deleted" in t for t in texts(app.error))


def test_live_page_on_a_deleted_run_says_so(store, monkeypatch):
    app = open_page(store, monkeypatch, "live", run=store[2]["deleted"])
    assert any("was deleted" in t for t in texts(app.error))


def test_an_unreachable_tracking_server_is_a_message(monkeypatch, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    app = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    assert not app.exception and "cannot reach MLflow server" in app.error[0].value


@pytest.mark.slow
def test_the_geometry_page_reads_an_mlflow_server_through_the_public_api(mlflow_server, tmp_path, monkeypatch):
    client = MlflowClient(mlflow_server)
    experiment = client.create_experiment("served")
    logged = {}
    for name, offset in (("a", 0.0), ("b", 1.0)):
        run = client.create_run(experiment, run_name=name, tags={"workbench.stage": "grokking"})
        metrics = [Metric(f"geom/lid_twonn/layer_{i:02d}", offset + i + s / 10, 0, s) for i in range(3) for s in (0, 5)]
        client.log_batch(run.info.run_id, metrics=[*metrics, Metric("grokking/grokking_step", 5.0, 0, 5)])
        client.set_terminated(run.info.run_id)
        logged[run.info.run_id] = metrics
    expected = {
        run_id: {
            f"geom/lid_twonn/layer_{i:02d}": ([0, 5], [float(m.value) for m in metrics if m.key.endswith(f"_{i:02d}")])
            for i in range(3)
        }
        for run_id, metrics in logged.items()
    }
    assert bulk_metric_histories(list(logged), "geom/lid_twonn/", mlflow_server) == expected
    assert [row["name"] for row in run_table(mlflow_server, "served")] == ["b", "a"]

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    app = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    app.query_params.update(page="geometry", runs=",".join(logged))
    app.run()
    assert not app.exception and not app.error
    heatmap = figures(app)[0]
    assert len(heatmap["data"][0]["y"]) == 2 * (1 + 3) and heatmap["data"][0]["x"] == [0, 5]
    assert [a["text"] for a in heatmap["layout"]["annotations"]] == ["grokking", "grokking"]  # each run's landmark


def test_app_on_an_empty_store_says_how_to_start(tracking_uri, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    app = AppTest.from_file(str(ROOT / "app.py"), default_timeout=30).run()
    assert not app.exception
    assert "workbench run configs/grokking.yaml" in app.info[0].value


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- name: a\n  when: {metric: m, mode: max, patience: -1}\n  actions: [stop]\n", "line 2: rule 'a' (#1)"),
        ("- name: a\n  when: {metric: m, above: 1}\n  actions: [pause]\n", "line 3: rule 'a' (#1): actions"),
        ("- name: a\n  when: {metric: m, above: 1}\n  actions: [stop]\n- 3\n", "line 4: rule #2: expected a mapping"),
        ("- name: a\n  when: {event: nope}\n  actions: [hold]\n", "line 2: rule 'a' (#1): when.event: unknown event"),
        ("- name: a\n  when: {metric: m, above: 1}\n  actions: [stop]\n- name: a\n", "line 4: rule 'a' (#2)"),
        ("- name: [a\n", "line 2: invalid YAML"),
    ],
)
def test_policy_text_errors_name_the_line(text, message):
    with pytest.raises(WorkbenchError, match=rf"^policy: {message}".replace("(", r"\(").replace(")", r"\)")):
        parse_policy(text)
