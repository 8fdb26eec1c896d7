"""The plotly figures of runs' data, shared by the app (app.py) and the report (workbench/report.py): metric curves by
step, the layer x step heatmap of a geometry feature, per-layer lines, each with markers where something happened.

Figures are built as plain data, without plotly's Python-side validation (it cost 0.5 s on the heatmap's 60 marker
shapes, docs/app.md "Speed"). Marker labels that would overlap (events a few steps apart) are set on further rows:
`label_levels`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative

Histories = dict[str, tuple[list, list]]  # metric key -> (steps, values)
Marks = list[tuple[int, str]]  # (step, label), sorted by step

LABEL_FONT = {"size": 10}
LABEL_CHAR_PX = 6  # the width of a character of a marker label at LABEL_FONT
LABEL_ROW_PX = 14  # the height of a row of marker labels
PLOT_WIDTH_PX = 600  # the plot width labels are spaced for: about the narrowest (the MLflow UI's HTML preview)
LABEL_BACKGROUND = "rgba(255, 255, 255, 0.75)"  # a label over a heatmap's cells stays readable
PANEL_PX = 200  # the height of one metric's panel of `curves`
PANEL_GAP_PX = 40  # between two panels
RUN_COLOURS = qualitative.Plotly


def run_label(row: dict) -> str:
    """'chain › stage name (id, STATUS)': a nested stage under its chain run (`workbench.runs.run_table`'s rows)."""
    chain = f"{row['chain']} › " if row["chain"] else ""
    return f"{chain}{row['name'] or row['run_id'][:8]} ({row['run_id'][:8]}, {row['status']})"


def label_levels(marks: Marks, span: float) -> list[int]:
    """A row for each mark's label (0 = the first), so that labels on one row never overlap: a label, written from
    its step to the right, takes its text's width, estimated for a plot PLOT_WIDTH_PX wide showing `span` steps."""
    ends: list[float] = []  # the step where the last label of each row ends
    levels = []
    for step, text in marks:
        level = next((i for i, end in enumerate(ends) if end <= step), len(ends))
        if level == len(ends):
            ends.append(0.0)
        ends[level] = step + span * (len(text) * LABEL_CHAR_PX + 8) / PLOT_WIDTH_PX
        levels.append(level)
    return levels


def _span(steps: Sequence[int], marks: Marks) -> float:
    every = [*steps, *(step for step, _ in marks)]
    return max(max(every) - min(every), 1) if every else 1


def marker_layout(marks: Marks, span: float) -> dict:
    """Layout shapes and annotations: a dotted line at each step across the whole plot, its label above the plot
    on the first row where it overlaps no other (hover shows it too), and the top margin those rows need. Set at
    once (`add_vline` costs ~30 ms a line)."""
    line = {"type": "line", "xref": "x", "yref": "paper", "y0": 0, "y1": 1, "line": {"dash": "dot", "width": 1}}
    label = {"xref": "x", "yref": "paper", "y": 1, "yanchor": "bottom", "xanchor": "left", "showarrow": False}
    label["font"] = LABEL_FONT
    levels = label_levels(marks, span)
    return {
        "shapes": [{**line, "x0": step, "x1": step} for step, _ in marks],
        "annotations": [
            {**label, "x": step, "text": text, "yshift": LABEL_ROW_PX * level, "hovertext": f"step {step}: {text}"}
            for (step, text), level in zip(marks, levels, strict=True)
        ],
        "margin": {"t": 50 + LABEL_ROW_PX * (max(levels, default=-1) + 1)},
    }


def curves(runs: Sequence[tuple[str, Histories, Marks]], metrics: Sequence[str]) -> go.Figure:
    """Runs' metrics by step: a panel per metric, one above the other on matching step axes, a line per run (one
    colour per run, across the panels), the runs' marks across all panels. `runs` = (label, histories, marks)."""
    area = PANEL_PX * len(metrics) + PANEL_GAP_PX * (len(metrics) - 1)  # the panels' height, in pixels
    marks = sorted(mark for _, _, run_marks in runs for mark in run_marks)
    steps = [s for _, histories, _ in runs for m in metrics if m in histories for s in histories[m][0]]
    layout = marker_layout(marks, _span(steps, marks))
    layout["margin"]["b"] = 90
    layout |= {
        "height": area + layout["margin"]["t"] + layout["margin"]["b"],
        "legend": {"orientation": "h", "yref": "container", "y": 0, "yanchor": "bottom"},
    }
    traces = []
    for i, metric in enumerate(metrics):
        axis = "" if i == 0 else str(i + 1)
        top = 1 - i * (PANEL_PX + PANEL_GAP_PX) / area
        domain = [max(0.0, round(top - PANEL_PX / area, 6)), round(top, 6)]  # plotly.js drops a domain outside [0, 1]
        layout[f"yaxis{axis}"] = {"domain": domain, "title": {"text": metric}, "anchor": f"x{axis}"}
        layout[f"xaxis{axis}"] = {"anchor": f"y{axis}", **({"matches": "x"} if i else {})}
        for r, (label, histories, _) in enumerate(runs):
            if metric not in histories:
                continue
            steps, values = histories[metric]
            traces.append(
                {
                    "type": "scatter",
                    "mode": "lines+markers" if len(steps) < 100 else "lines",
                    "x": steps,
                    "y": values,
                    "name": label,
                    "legendgroup": label,
                    "showlegend": not any(t["name"] == label for t in traces),
                    "line": {"color": RUN_COLOURS[r % len(RUN_COLOURS)]},
                    "xaxis": f"x{axis}",
                    "yaxis": f"y{axis}",
                }
            )
    if metrics:
        layout[f"xaxis{len(metrics) if len(metrics) > 1 else ''}"]["title"] = {"text": "step"}
    return go.Figure({"data": traces, "layout": layout}, _validate=False)


def heatmap(feature: str, runs: Sequence[tuple[dict, Histories, Marks]]) -> go.Figure:
    """Layer x step heatmaps of one feature, the runs stacked in one heatmap trace on one colour scale: a band of
    rows per run (a layer a row) under a blank row naming the run, each run's marks across its band, their labels
    from the blank row down, on as many rows as they need not to overlap. `runs` = (run_table row, the feature's
    histories, marks).

    One trace, not a subplot per run: plotly.js draws it in a fraction of the time of 20 subplots (docs/app.md,
    "Speed")."""
    steps = sorted({step for _, histories, _ in runs for s, _ in histories.values() for step in s})
    column = {step: i for i, step in enumerate(steps)}
    span = _span(steps, [mark for _, _, marks in runs for mark in marks])
    bands, rows, ticks, shapes, labels = [], [], [], [], []
    for row, histories, marks in runs:
        keys = sorted(histories)
        title = f"{run_label(row)}: {len(keys)} layers × {len({x for s, _ in histories.values() for x in s})} snapshots"
        top = len(rows)
        rows += [title, *(f"{key.rsplit('/', 1)[1]} · {row['run_id'][:8]}" for key in keys)]
        ticks += [f"<b>{title}</b>", *(key.rsplit("/", 1)[1] for key in keys)]
        z = np.full((len(keys) + 1, len(steps)), np.nan, dtype=np.float32)  # the title row stays blank
        for i, key in enumerate(keys, start=1):
            s, v = histories[key]
            z[i, [column[x] for x in s]] = v
        bands.append(z)
        line = {"type": "line", "xref": "x", "yref": "y", "y0": top + 0.5, "y1": len(rows) - 0.5}
        shapes += [{**line, "x0": step, "x1": step, "line": {"dash": "dot", "width": 1}} for step, _ in marks]
        label = {"y": top, "showarrow": False, "xanchor": "left", "font": LABEL_FONT, "bgcolor": LABEL_BACKGROUND}
        labels += [
            {**label, "x": step, "text": text, "yshift": -LABEL_ROW_PX * level, "hovertext": f"step {step}: {text}"}
            for (step, text), level in zip(marks, label_levels(marks, span), strict=True)
        ]
    trace = {
        "type": "heatmap",
        "z": np.vstack(bands),  # float32: half the bytes to send, and 7 digits where the hover shows 4
        "x": steps,
        "y": rows,
        "colorscale": "Viridis",
        "colorbar": {"title": {"text": feature}},
        "hovertemplate": f"%{{y}}<br>step %{{x}}<br>{feature} %{{z:.4g}}<extra></extra>",
    }
    layout = {
        "shapes": shapes,
        "annotations": labels,
        "height": 120 + 18 * len(rows),
        "margin": {"t": 20, "b": 30},
        "xaxis": {"title": {"text": "step"}},
        "yaxis": {"autorange": "reversed", "tickmode": "array", "tickvals": rows, "ticktext": ticks},
    }
    return go.Figure({"data": [trace], "layout": layout}, _validate=False)


def layer_lines(feature: str, label: str, histories: Histories, marks: Marks) -> go.Figure:
    """One line per layer of one run's feature, with its marks."""
    traces = [
        {"type": "scatter", "mode": "lines", "x": s, "y": v, "name": k.rsplit("/", 1)[1]}
        for k, (s, v) in histories.items()
    ]
    layout = {
        "title": {
            "text": f"{feature} per layer: {label}",
            "yref": "container",
            "y": 1,
            "yanchor": "top",
            "pad": {"t": 10},
        },
        "xaxis": {"title": {"text": "step"}},
        "yaxis": {"title": {"text": feature}},
    }
    steps = [step for s, _ in histories.values() for step in s]
    return go.Figure(
        {"data": traces, "layout": {**layout, **marker_layout(marks, _span(steps, marks))}}, _validate=False
    )
