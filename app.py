"""Workbench app: the runs of a tracking store, compared, their geometry, policies backtested on them, and a
stop button for live runs.

    streamlit run app.py      # store: $MLFLOW_TRACKING_URI, else ./mlflow.db (as the CLI), or the sidebar field

Pages: Runs (a filterable table that refreshes while runs are live), Compare (metrics of several runs on
shared axes, by step), Geometry (layer x step heatmaps of a `geom/` feature with markers where things happened,
a continual run's domains joined across their switches, per-layer lines, a snapshot explorer), Policies (edit,
validate, backtest, save, attach to a config or a running run) and Live control (Stop, Checkpoint now).
`?page=geometry&runs=ID,ID` opens a page on given runs. Data access lives in `workbench/` and is shared with
the CLI; this file lays out the pages. Bad input (an unreachable store, a deleted run, a broken policy, a run
without geometry yet) is a message on the page; user text is parsed as YAML data or matched as plain text,
never run.
"""

from __future__ import annotations

import gc
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st
from streamlit.delta_generator import DeltaGenerator

from workbench.backtest import backtest_run, runs_landmarks, unlogged_metrics
from workbench.config import load_config
from workbench.errors import WorkbenchError
from workbench.figures import curves, heatmap, layer_lines, run_label
from workbench.frames import long_frame
from workbench.policies import (
    STOP_POLL_SECONDS,
    attach_policies,
    attach_policy,
    parse_policy,
    request_checkpoint,
    request_stop,
)
from workbench.runs import (
    KEY_METRICS,
    bulk_metric_histories,
    continual_histories,
    geometry_features,
    metric_histories,
    metric_keys,
    run_state,
    run_table,
)
from workbench.snapshots import Snapshots, load_snapshots
from workbench.tracking import resolve_tracking_uri

PAGES = {"runs": "Runs", "compare": "Compare", "geometry": "Geometry", "policies": "Policies", "live": "Live control"}
LIVE_SECONDS = 2  # live runs' data is re-read this often; finished runs' data is cached until they change
POLICY_DIR = Path("configs") / "policies"  # beside the configs, in the directory the app runs in (as the CLI)
POLICY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
CONTINUAL_DOMAIN_STAGE = "tod_continual.domain"  # the stage tag of a continual run's nested per-domain runs


# --- data, cached: a finished run's histories never change, a live run's are re-read every LIVE_SECONDS -----


def freshness(row: dict) -> str:
    """A cache key part: the status for a finished run, the current LIVE_SECONDS window for a live one."""
    return row["status"] if row["status"] != "RUNNING" else f"live-{int(time.time() // LIVE_SECONDS)}"


@st.cache_data(ttl=LIVE_SECONDS, show_spinner=False)
def cached_run_table(uri: str) -> list[dict]:
    return run_table(uri)


@st.cache_data(max_entries=2000, show_spinner=False)
def cached_histories(uri: str, row: dict, prefix: str, fresh: str) -> dict[str, tuple[list, list]]:
    return metric_histories(row["run_id"], uri, prefix, keys=row["metric_keys"])


@st.cache_data(max_entries=200, show_spinner=False)
def cached_geometry(uri: str, runs: tuple[tuple[str, str], ...], feature: str) -> dict[str, dict]:
    """Histories of one feature for many runs, read at once; `runs` = (run id, freshness) pairs."""
    return bulk_metric_histories([run_id for run_id, _ in runs], f"geom/{feature}/", uri)


@st.cache_data(max_entries=200, show_spinner=False)
def cached_continual(uri: str, run_id: str, feature: str, fresh: str) -> tuple[dict, list[tuple[int, str]]]:
    return continual_histories(run_id, f"geom/{feature}/", uri)


@st.cache_data(max_entries=2000, show_spinner=False)
def cached_landmarks(uri: str, runs: tuple[tuple[str, str], ...]) -> dict[str, list[tuple[int, str]]]:
    """Landmarks of many runs, read at once; `runs` = (run id, freshness) pairs."""
    return runs_landmarks([run_id for run_id, _ in runs], uri)


@st.cache_resource(max_entries=2, show_spinner=False)
def cached_snapshots(uri: str, run_id: str, fresh: str) -> Snapshots:  # arrays shared, not copied per rerun
    return load_snapshots(run_id, uri)


@st.cache_resource(show_spinner=False)
def freeze_loaded_objects() -> None:
    """Once per server process, at the end of its first script run, when MLflow, SQLAlchemy, plotly and pandas
    are loaded: their objects (hundreds of thousands) leave the cyclic garbage collector's view for good.
    Streamlit collects garbage after every script run (`runner.postScriptGC`), and scanning them all each time
    was a large part of the Geometry page's first run, holding the GIL while the browser waited for plotly's
    script from this process (docs/app.md, "Speed"). Reference counting still frees them; what later runs make
    is still collected."""
    gc.collect()
    gc.freeze()


# --- helpers ----------------------------------------------------------------------------------------------


def chain_order(rows: list[dict]) -> list[dict]:
    """Runs newest first, each chain's stages right after the chain run, in stage order."""
    children: dict[str, list[dict]] = {}
    for row in rows:
        children.setdefault(row["parent_run_id"], []).append(row)
    ordered: list[dict] = []
    for row in children.get("", []):
        ordered.append(row)
        ordered += sorted(children.get(row["run_id"], []), key=lambda r: r["name"])
    known = {r["run_id"] for r in ordered}
    return ordered + [r for r in rows if r["run_id"] not in known]  # stages whose chain run is not listed


def pick_runs(uri: str, rows: list[dict], label: str, default: list[str], key: str) -> list[str]:
    """A run multiselect; runs named in `?runs=` are preselected, and an id the store lacks is reported."""
    by_id = {r["run_id"]: r for r in rows}
    asked = [i for i in st.query_params.get("runs", "").split(",") if i]
    for run_id in asked:
        if run_id not in by_id:
            try:
                metric_keys(run_id, uri)  # says why: not found, or deleted
            except WorkbenchError as exc:
                st.error(str(exc))
    chosen = [i for i in asked if i in by_id] or default
    ids = [r["run_id"] for r in chain_order(rows)]
    return st.multiselect(label, ids, default=chosen, format_func=lambda i: run_label(by_id[i]), key=key)


# --- pages ------------------------------------------------------------------------------------------------


def page_runs(uri: str, rows: list[dict]) -> None:
    st.header("Runs")
    live = any(r["status"] == "RUNNING" for r in rows)

    @st.fragment(run_every=LIVE_SECONDS if live else None)
    def table() -> None:
        try:
            current = cached_run_table(uri)
        except WorkbenchError as exc:  # a fragment reruns alone, outside main's handler
            st.error(str(exc))
            return
        frame = pd.DataFrame(chain_order(current))
        columns = st.columns(4)
        filters = {
            field: columns[i].multiselect(field.capitalize(), sorted(frame[field].unique()), key=f"filter-{field}")
            for i, field in enumerate(("experiment", "stage", "status"))
        }
        text = columns[3].text_input("Name or id contains", key="filter-text")
        for field, chosen in filters.items():
            if chosen:
                frame = frame[frame[field].isin(chosen)]
        if text:  # plain substring match, never a pattern or code
            frame = frame[
                frame["name"].str.contains(text, regex=False) | frame["run_id"].str.contains(text, regex=False)
            ]
        shown = ["name", "chain", "experiment", "stage", "status", "started", *KEY_METRICS, "events", "stop_reason"]
        st.dataframe(frame[[*shown, "run_id"]], hide_index=True, key="runs-table")
        st.caption(f"{len(frame)} of {len(current)} runs" + (f"; refreshing every {LIVE_SECONDS} s" if live else ""))

    table()


def page_compare(uri: str, rows: list[dict]) -> None:
    st.header("Compare runs")
    by_id = {r["run_id"]: r for r in rows}
    chosen = pick_runs(uri, rows, "Runs", [rows[0]["run_id"]], "compare-runs")
    if not chosen:
        st.info("Pick one or more runs.")
        return
    keys = sorted({k for i in chosen for k in by_id[i]["metric_keys"] if not k.startswith("geom/")})
    default = [k for k in ("eval/acc", "train/acc") if k in keys] or keys[:1]
    metrics = st.multiselect("Metrics", keys, default=default, key="compare-metrics")
    if not metrics:
        st.info("Pick one or more metrics (geometry series are on the Geometry page).")
        return
    runs = []
    for run_id in chosen:
        histories = {}
        for metric in metrics:  # a prefix read: keep the exact key only
            found = cached_histories(uri, by_id[run_id], metric, freshness(by_id[run_id]))
            histories |= {k: v for k, v in found.items() if k == metric}
        runs.append((run_label(by_id[run_id]), histories, []))
    st.plotly_chart(curves(runs, metrics), key="compare-chart")


@st.cache_resource(max_entries=16, show_spinner=False)
def cached_heatmap(key: tuple[str, tuple], feature: str, _runs: list[tuple[dict, dict, list]]) -> go.Figure:
    """`heatmap` cached under `key` (the store, (run id, freshness) pairs), which names the runs `_runs` (row,
    histories, marks) holds: building the figure costs more than reading the data."""
    return heatmap(feature, _runs)


def page_geometry(uri: str, rows: list[dict]) -> None:
    st.header("Geometry")
    by_id = {r["run_id"]: r for r in rows}
    # A continual run (pipelines/tod/continual.py) shows its nested per-domain runs' series joined by step.
    domains: dict[str, list[str]] = {}
    for r in rows:
        if r["stage"] == CONTINUAL_DOMAIN_STAGE:
            domains.setdefault(r["parent_run_id"], []).extend(r["metric_keys"])
    keys = {r["run_id"]: r["metric_keys"] + domains.get(r["run_id"], []) for r in rows}
    newest = next(  # the newest run with geometry (a continual run's domains are shown through it), else the newest
        (r["run_id"] for r in rows if r["stage"] != CONTINUAL_DOMAIN_STAGE and geometry_features(keys[r["run_id"]])),
        rows[0]["run_id"],
    )
    chosen = pick_runs(uri, rows, "Runs", [newest], "geometry-runs")
    if not chosen:
        st.info("Pick one or more runs.")
        return
    features = sorted({f for i in chosen for f in geometry_features(keys[i])})
    if not features:
        st.info("No geometry logged yet for these runs: `geom/` metrics appear at the first snapshot.")
        return
    feature = st.selectbox("Feature", features, index=features.index("lid_twonn") if "lid_twonn" in features else 0)
    plain = tuple((i, freshness(by_id[i])) for i in chosen if i not in domains)
    geometry = cached_geometry(uri, plain, feature) if plain else {}
    marks = cached_landmarks(uri, tuple((i, freshness(by_id[i])) for i in chosen))
    for i in (i for i in chosen if i in domains):
        geometry[i], switches = cached_continual(uri, i, feature, freshness(by_id[i]))
        marks[i] = sorted(switches + marks[i])
    for run_id in (i for i in chosen if not geometry[i]):
        st.info(f"{run_label(by_id[run_id])}: no {feature} logged yet.")
    drawn = [(by_id[i], geometry[i], marks[i]) for i in chosen if geometry[i]]
    if drawn:
        key = (uri, tuple((i, freshness(by_id[i])) for i in chosen))
        st.plotly_chart(cached_heatmap(key, feature, drawn), key="heatmaps")

    focus = st.selectbox("Per-layer lines and snapshots of", chosen, format_func=lambda i: run_label(by_id[i]))
    row = by_id[focus]
    if geometry[focus]:
        st.plotly_chart(layer_lines(feature, run_label(row), geometry[focus], marks[focus]), key="layer-lines")
    if st.toggle("Explore this run's snapshots (downloads them)", key="explore"):
        snapshot_explorer(uri, row)


def snapshot_explorer(uri: str, row: dict) -> None:
    """2-D PCA projection of one snapshot's points at one layer, coloured by the probe's answer or position."""
    try:
        snapshots = cached_snapshots(uri, row["run_id"], freshness(row))
    except WorkbenchError as exc:
        st.info(f"No snapshots to explore: {exc}")
        return
    if not snapshots.steps:
        st.info("This run has written no snapshot yet.")
        return
    index = snapshots.index
    left, middle, right = st.columns(3)
    step = left.select_slider("Step", snapshots.steps, value=snapshots.steps[-1], key="snapshot-step")
    layer = middle.selectbox("Layer", list(snapshots.layers), index=len(snapshots.layers) - 1, key="snapshot-layer")
    points = snapshots.layers[layer][snapshots.steps.index(step)].astype(np.float64)
    centred = points - points.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    xy = centred @ vt[:2].T
    probe, position = zip(*index["points"], strict=True)
    colours = {"position": [str(p) for p in position]}
    if index.get("probe_labels"):
        label_of = dict(zip(index["probe_ids"], index["probe_labels"], strict=True))
        colours = {"answer": [str(label_of[p]) for p in probe], **colours}
    colour = right.selectbox("Colour by", list(colours), key="snapshot-colour")
    frame = pd.DataFrame({"PC 1": xy[:, 0], "PC 2": xy[:, 1], colour: colours[colour], "probe": probe})
    figure = px.scatter(frame, x="PC 1", y="PC 2", color=colour, hover_data=["probe"], opacity=0.7)
    figure.update_layout(title=f"{layer} at step {step}: {len(points)} points ({index['pooling']} pooling)")
    st.plotly_chart(figure, key="snapshot-scatter")


def page_policies(uri: str, rows: list[dict]) -> None:
    st.header("Policies")
    by_id = {r["run_id"]: r for r in rows}
    files = sorted(p.name for p in POLICY_DIR.glob("*.yaml"))
    start = st.selectbox("Start from", ["(empty)", *files], index=1 if files else 0, key="policy-start")
    initial = "" if start == "(empty)" else (POLICY_DIR / start).read_text()
    text = st.text_area("Policy (YAML, docs/policies.md)", initial, height=260, key=f"policy-text-{start}")
    try:
        rules = parse_policy(text, source="policy")
    except WorkbenchError as exc:
        st.error(str(exc))
        rules = None
    else:
        st.success(f"valid: {len(rules)} rule(s): " + ", ".join(f"{r.name} → {'/'.join(r.actions)}" for r in rules))

    st.subheader("Backtest")
    finished = [r["run_id"] for r in rows if r["status"] != "RUNNING"][:5]
    chosen = pick_runs(uri, rows, "On runs", finished, "policy-runs")
    if rules and chosen:
        for key, problem in unlogged_metrics(rules, chosen, uri):
            line = next((n for n, t in enumerate(text.splitlines(), 1) if key in t), None)
            st.warning(f"policy: line {line}: {problem}" if line else f"policy: {problem}")
    if st.button("Backtest", disabled=not (rules and chosen), key="backtest"):
        st.session_state.backtested = (text, chosen, [backtest_run(rules, i, uri, source="policy") for i in chosen])
    done = st.session_state.get("backtested")
    if done and done[:2] == (text, chosen):  # results of this policy on these runs, not of an earlier edit
        show_backtest(uri, done[2], by_id)

    st.subheader("Save and attach")
    left, middle, right = st.columns(3)
    name = left.text_input("Save as (name)", key="policy-name")
    if left.button("Save", disabled=rules is None or not name, key="policy-save"):
        path = POLICY_DIR / f"{name}.yaml"
        if not POLICY_NAME.fullmatch(name):
            st.error(f"name {name!r}: letters, digits, '-' and '_' only (it becomes {POLICY_DIR}/NAME.yaml)")
        elif path.exists():
            st.error(f"{path} exists: choose another name")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            st.success(f"saved {path}")
    names = [f"{name}.yaml" if POLICY_NAME.fullmatch(name) else "", start]  # never a path out of POLICY_DIR
    saved = next((POLICY_DIR / f for f in names if f and (POLICY_DIR / f).is_file()), None)
    attach_to_config(middle, saved if saved and saved.read_text() == text else None)
    attach_to_run(right, uri, rows, text if rules else None)


def attach_to_config(column: DeltaGenerator, policy: Path | None) -> None:
    """The command that runs a config with the saved policy, checked as `workbench run` checks it. The config
    file is left as it is: `--policy` adds the rules to the config's own at launch, and the run logs all of them
    (its config.yaml), so the pairing is recorded where it ran, without rewriting a hand-written config."""
    configs = sorted(p.name for p in POLICY_DIR.parent.glob("*.yaml"))
    config = column.selectbox("Attach to a config", configs, key="policy-config")
    if policy is None or config is None:
        column.caption("Save the policy (or start from a saved one, unchanged) to check it with a config.")
        return
    path = POLICY_DIR.parent / config
    try:
        rules = attach_policies(load_config(path), path, [policy]).policies
    except WorkbenchError as exc:
        column.error(str(exc))
        return
    column.code(f"workbench run {path} --policy {policy}")
    column.caption(f"checked: the run would watch {len(rules)} rule(s), the config's and this policy's")


def attach_to_run(column: DeltaGenerator, uri: str, rows: list[dict], text: str | None) -> None:
    """Attach the (valid) policy to a RUNNING run: the run takes its rules at its next poll (`workbench attach`)."""
    by_id = {r["run_id"]: r for r in rows}
    running = [r["run_id"] for r in rows if r["status"] == "RUNNING"]
    run_id = column.selectbox(
        "Attach to a running run", running, format_func=lambda i: run_label(by_id[i]), key="attach-run"
    )
    if column.button("Attach", disabled=not (text and run_id), key="attach"):
        try:
            artifact = attach_policy(run_id, text, uri)
        except WorkbenchError as exc:
            column.error(str(exc))
            return
        column.success(
            f"attached (kept as {artifact}): the run takes the rules at its next poll, within "
            f"{STOP_POLL_SECONDS:g} s or one snapshot; Live control shows the step"
        )


def show_backtest(uri: str, results: list, by_id: dict[str, dict]) -> None:
    table = []
    for r in results:
        for m in r.monitored or [None]:
            table.append(
                {
                    "run": run_label(by_id[r.run_id]) if r.run_id in by_id else r.run_id,
                    "would stop at": "never" if r.stop_step is None else str(r.stop_step),
                    "compute saved": f"{r.saved:.0%} of {r.budget}",
                    "metric": m.metric if m else "",
                    "at stop": m.at_stop if m else None,
                    "best": f"{m.best[1]:.4g} @{m.best[0]}" if m and m.best else "",
                    "final": f"{m.final[1]:.4g} @{m.final[0]}" if m else "",
                    "reason": r.reason or "",
                }
            )
    st.dataframe(pd.DataFrame(table), hide_index=True, key="backtest-table")
    for r in results:
        if not r.monitored:
            continue
        m = r.monitored[0]
        row = by_id.get(r.run_id)
        history = metric_histories(r.run_id, uri, m.metric)[m.metric]
        figure = px.line(x=history[0], y=history[1], labels={"x": "step", "y": m.metric})
        if r.stop_step is not None:
            figure.add_vline(x=r.stop_step, line_color="red", annotation_text=f"stop: {r.saved:.0%} saved")
        figure.update_layout(title=f"{run_label(row) if row else r.run_id}: {m.metric}", height=260)
        st.plotly_chart(figure, key=f"backtest-{r.run_id}")
    with st.expander("Everything the policy fired"):
        for r in results:
            st.markdown(f"**{r.run_id[:8]}** ({r.logged_steps} logged steps): {r.reason or 'no stop'}")
            if r.firings:
                st.dataframe(pd.DataFrame([vars(f) for f in r.firings]), hide_index=True)
            else:
                st.caption("nothing fired")


def page_live(uri: str, rows: list[dict]) -> None:
    st.header("Live control")
    by_id = {r["run_id"]: r for r in rows}
    asked = st.query_params.get("run")
    if asked and asked not in by_id:
        metric_keys(asked, uri)  # raises the reason: not found, or deleted
    running = [r["run_id"] for r in rows if r["status"] == "RUNNING"]
    ids = [asked] if asked else []
    ids += [i for i in running + [r["run_id"] for r in rows] if i not in ids]
    run_id = st.selectbox("Run", ids, format_func=lambda i: run_label(by_id[i]), key="live-run")

    @st.fragment(run_every=LIVE_SECONDS)
    def panel() -> None:
        try:
            show_run_state(uri, run_id)
        except WorkbenchError as exc:  # a fragment reruns alone, outside main's handler
            st.error(str(exc))

    panel()


def show_run_state(uri: str, run_id: str) -> None:
    """Status, the Stop and Checkpoint buttons while RUNNING, why it stopped, its checkpoints, its accuracy."""
    state = run_state(run_id, uri)
    status = state["status"]
    left, right = st.columns([1, 3])
    left.metric("Status", status)
    if status == "RUNNING":
        if state["stop_requested"]:
            left.info(f"Stop {state['stop_requested']}: the run ends at its next logged step.")
        elif left.button("Stop run", type="primary", key="stop"):
            request_stop(run_id, uri)
            left.info("Stop requested: the run checkpoints and ends at its next logged step.")
        if left.button("Checkpoint now", key="checkpoint"):
            request_checkpoint(run_id, uri)
            left.info("Checkpoint requested: saved at the run's next logged step.")
    elif state["stop_reason"]:
        at = f" at step {state['stopped_at_step']}" if state["stopped_at_step"] else ""
        left.warning(f"Stopped{at}: {state['stop_reason']} (ended {status})")
    elif state["error"]:
        left.error(state["error"])
    if state["checkpoints"]:
        left.caption("checkpoints at steps " + ", ".join(map(str, state["checkpoints"])))
    if state["attached"]:
        attached = state["attached"]
        left.caption(f"attached policy taken at step {attached['step']}: rules {', '.join(attached['rules'])}")
    histories = metric_histories(run_id, uri, "train/acc") | metric_histories(run_id, uri, "eval/acc")
    if histories:
        figure = px.line(long_frame(histories), x="step", y="value", color="key", title="accuracy")
        if state["stopped_at_step"]:
            figure.add_vline(x=int(state["stopped_at_step"]), line_color="red", annotation_text="stop")
        right.plotly_chart(figure, key="live-chart")
    else:
        right.info("No metrics logged yet (they are sent every few seconds).")


PAGE_FUNCTIONS = {
    "runs": page_runs,
    "compare": page_compare,
    "geometry": page_geometry,
    "policies": page_policies,
    "live": page_live,
}


def main() -> None:
    st.set_page_config(page_title="Training-dynamics workbench", layout="wide")
    uri = st.sidebar.text_input("Tracking URI", resolve_tracking_uri(None), key="uri")
    if "page" not in st.session_state:  # `?page=` opens the session; the radio (one widget, by key) goes on from there
        asked = st.query_params.get("page", "runs")
        st.session_state.page = asked if asked in PAGES else "runs"
    page = st.sidebar.radio("Page", list(PAGES), format_func=PAGES.get, key="page")
    st.query_params["page"] = page
    try:
        rows = cached_run_table(uri)
        if not rows:
            st.info("No runs in this store yet. Start one with `workbench run configs/grokking.yaml`.")
            return
        PAGE_FUNCTIONS[page](uri, rows)
    except WorkbenchError as exc:
        st.error(str(exc))
    finally:
        freeze_loaded_objects()


main()
