"""Workbench app, first cut: the runs in a tracking store and one run's training and geometry curves.

    streamlit run app.py      # store: $MLFLOW_TRACKING_URI, else ./mlflow.db (as the CLI)

Data access lives in `workbench.runs`, shared with the CLI; this file only lays out the page.
"""

import pandas as pd
import plotly.express as px
import streamlit as st

from workbench.errors import WorkbenchError
from workbench.runs import metric_histories, recent_runs
from workbench.tracking import resolve_tracking_uri

st.set_page_config(page_title="Training-dynamics workbench", layout="wide")
uri = st.sidebar.text_input("Tracking URI", resolve_tracking_uri(None))
try:
    runs = recent_runs(uri, limit=200)
except WorkbenchError as exc:
    st.error(str(exc))
    st.stop()
if not runs:
    st.info("No runs in this store yet. Start one with `workbench run configs/grokking.yaml`.")
    st.stop()

st.header("Runs")
st.dataframe(pd.DataFrame(runs), hide_index=True)

run_id = st.selectbox(
    "Run",
    [r["run_id"] for r in runs],
    format_func=lambda i: next(f"{r['name']} ({i[:8]}, {r['status']})" for r in runs if r["run_id"] == i),
)
histories = metric_histories(run_id, uri)


def long_frame(keys: list[str]) -> pd.DataFrame:
    return pd.DataFrame(
        [{"metric": key, "step": s, "value": v} for key in keys for s, v in zip(*histories[key], strict=True)]
    )


landmarks = {key.removeprefix("grokking/"): histories[key][1][-1] for key in histories if key.startswith("grokking/")}
accuracy = [k for k in ("train/acc", "eval/acc") if k in histories]
if accuracy:
    figure = px.line(long_frame(accuracy), x="step", y="value", color="metric", title="Accuracy")
    for name, step in landmarks.items():
        figure.add_vline(x=step, line_dash="dot", annotation_text=name.removesuffix("_step"))
    st.plotly_chart(figure)

features = sorted({key.split("/")[1] for key in histories if key.startswith("geom/")})
if features:
    feature = st.selectbox("Geometry feature", features)
    keys = [k for k in histories if k.startswith(f"geom/{feature}/")]
    frame = long_frame(keys).assign(layer=lambda f: f["metric"].str.rsplit("/", n=1).str[-1])
    figure = px.line(frame, x="step", y="value", color="layer", title=f"{feature} per layer")
    for name, step in landmarks.items():
        figure.add_vline(x=step, line_dash="dot", annotation_text=name.removesuffix("_step"))
    st.plotly_chart(figure)
