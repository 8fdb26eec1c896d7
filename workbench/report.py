"""report.html: runs' picture in one self-contained file, written into every stage run when it ends, however it
ended (`write_run_report`, called by workbench/launch.py and WorkbenchCallback), and by `workbench report RUN_ID...
-o FILE` for any logged runs, side by side.

One HTML file with plotly.js packed inside it and nothing to fetch, so it opens from disk and in the MLflow
UI's artifact preview: a table of the runs (status, how each ended, its one-value facts such as the grokking
step), their metric curves with markers at memorisation, grokking, forecasts, policy alerts, domain switches and
the stop, the layer x step heatmap and per-layer lines of each logged geometry feature (the app's figures,
workbench/figures.py), the events table (`workbench events`) and the resolved config (the run's `config.yaml`,
else its params). A chain run's report holds every stage, those it reused from an earlier chain run and a stage
that failed included; a continual run's domains are joined by step, as in the app.
"""

from __future__ import annotations

import base64
import gzip
import html
import re
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench import tags
from workbench.backtest import RunEvent, run_events, runs_landmarks
from workbench.errors import first_line
from workbench.figures import Histories, Marks, curves, heatmap, layer_lines, run_label
from workbench.runs import DOMAIN_TAG, bulk_metric_histories, continual_histories, geometry_features, run_rows
from workbench.snapshots import _no_download_bar
from workbench.tracking import ReplicaTracker, open_store

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from workbench.tracking import Tracker

REPORT_FILE = "report.html"
CONFIG_FILE = "config.yaml"  # the resolved config workbench/launch.py logs with every stage run
CONTINUAL_STAGE = "tod_continual"  # its nested per-domain runs are shown joined into it (pipelines/tod/continual.py)
STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1300px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
.note { background: #fff6d5; border-left: 4px solid #e0b000; padding: 0.4em 0.8em; }
.meta { color: #666; font-size: 0.9em; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
"""


@dataclass
class Report:
    html: str
    notes: list[str]  # what the report says about its runs before anything else: still RUNNING, no geometry
    figures: list[go.Figure]  # its figures, in page order: the curves, then each feature's heatmap and lines


@dataclass
class _Run:
    """What the report shows of one run."""

    row: dict  # workbench.runs.run_table's row
    histories: Histories  # every metric
    marks: Marks
    events: list[RunEvent]
    config: str
    error: str  # the exception a FAILED run died of

    @property
    def label(self) -> str:
        return run_label(self.row)


def write_run_report(tracker: Tracker) -> None:
    """Write `report.html` into the tracker's run from what it logged; call it once the run has ended. It never
    fails the run: an error while building or logging the report is one line on stderr and the run's tag
    `workbench.report_error`, and the run keeps its status. On ranks other than 0 it does nothing."""
    if isinstance(tracker, ReplicaTracker):
        return
    try:
        tracker.log_text(build_report([tracker.run_id], tracker.tracking_uri).html, REPORT_FILE)
    except Exception as exc:  # a report must never end a run that trained
        reason = f"{type(exc).__name__}: {first_line(exc)}"[:500]
        print(f"workbench: run {tracker.run_id}: {REPORT_FILE} not written: {reason}", file=sys.stderr)
        try:
            tracker.set_tags({tags.REPORT_ERROR: reason})
        except Exception:  # the store itself is failing; the line above says what went wrong
            pass


def build_report(run_ids: Sequence[str], tracking_uri: str | None = None) -> Report:
    """The report of the runs, each followed by the runs nested in it (a chain's stages); a run the store lacks,
    or deleted, is a one-line `WorkbenchError`."""
    client, uri = open_store(tracking_uri)
    requested = run_rows(run_ids, uri)
    groups = {row["run_id"]: [row, *_stages(client, row, uri)] for row in requested}
    rows = [row for group in groups.values() for row in group]
    ids = [row["run_id"] for row in rows]
    histories = bulk_metric_histories(ids, "", uri)
    marks = runs_landmarks(ids, uri)
    runs = []
    for row in rows:
        run_id = row["run_id"]
        if row["stage"] == CONTINUAL_STAGE:
            joined, switches = continual_histories(run_id, "", uri)
            histories[run_id] = {**histories[run_id], **joined}
            marks[run_id] = sorted(marks[run_id] + switches)
        run = client.get_run(run_id)
        error = run.data.tags.get(tags.ERROR, "")
        runs.append(_Run(row, histories[run_id], marks[run_id], run_events(run_id, uri), _config(client, run), error))
    notes = [
        f"run {row['run_id']} is still RUNNING: this report shows what it had logged by {datetime.now():%Y-%m-%d %H:%M}"
        for row in rows
        if row["status"] == "RUNNING"
    ]
    for run_id, group in groups.items():
        if not any(geometry_features(histories[row["run_id"]]) for row in group):
            notes.append(
                f"run {run_id} logged no geometry: `geom/` metrics come with its snapshots (snapshot.enabled), "
                f"or from `workbench analyze {run_id}` over stored ones"
            )
    body = _body(runs, notes, uri)
    return Report(_html(body, runs[0].label), notes, [part for part in body if not isinstance(part, str)])


def _stages(client: Any, row: dict, uri: str) -> list[dict]:
    """A chain's stages in order, those it reused from an earlier chain run included (its tags
    `workbench.chain.<i>.run_id`), then the runs nested in it that no such tag names, in the order they started
    (a stage that failed, a stage trained on the fly). A continual run's per-domain runs are not listed: the run
    shows them joined."""
    if row["stage"] == CONTINUAL_STAGE:
        return []
    run_tags = client.get_run(row["run_id"]).data.tags
    indexed = {
        int(key.split(".")[2]): run_id  # as pipelines/chain/stage.py reads them on resume_from
        for key, run_id in run_tags.items()
        if key.startswith(tags.CHAIN_PREFIX) and key.endswith(".run_id")
    }
    stages = [indexed[i] for i in sorted(indexed)]
    experiments = [e.experiment_id for e in client.search_experiments()]
    nested = client.search_runs(
        experiments, f"tags.mlflow.parentRunId = '{row['run_id']}'", order_by=["attribute.start_time ASC"]
    )
    stages += [r.info.run_id for r in nested if DOMAIN_TAG not in r.data.tags and r.info.run_id not in stages]
    return run_rows(stages, uri)


def _config(client: Any, run: Any) -> str:
    """The run's resolved config (its `config.yaml`), else its params (a run opened by WorkbenchCallback)."""
    try:
        with tempfile.TemporaryDirectory(prefix="workbench-report-") as tmp, _no_download_bar():
            return Path(client.download_artifacts(run.info.run_id, CONFIG_FILE, tmp)).read_text()
    except Exception:  # MLflow raises several types for a missing artifact
        params = run.data.params
        return "".join(f"{key}: {params[key]}\n" for key in sorted(params)) or "(no config.yaml and no params logged)"


# --- the page ------------------------------------------------------------------------------------------------


def _body(runs: list[_Run], notes: list[str], uri: str) -> list[str | go.Figure]:
    """The page's parts in order: HTML, every text escaped, and figures."""
    title = " · ".join(run.label for run in runs[:4]) + (" ..." if len(runs) > 4 else "")
    shown = re.sub(r"//[^/@]*@", "//", uri)  # a password in the store's URI stays out of a file that is shared
    body: list[str | go.Figure] = [f"<h1>{_e(title)}</h1>"]
    body.append(f"<p class='meta'>Written {datetime.now():%Y-%m-%d %H:%M:%S} from the tracking store {_e(shown)}.</p>")
    body += [f"<p class='note'>{_e(note)}</p>" for note in notes]
    body += ["<h2>Runs</h2>", _runs_table(runs)]
    body += ["<h2>Curves</h2>", *_curves(runs)]
    body += ["<h2>Geometry</h2>", *_geometry(runs)]
    body.append("<h2>Events</h2>")
    for run in runs:
        rows = [("-" if e.step is None else str(e.step), e.kind, e.name, e.details) for e in run.events]
        body += [f"<h3>{_e(run.label)}</h3>", _table(("step", "kind", "name", "details"), rows, "no events")]
    body.append("<h2>Config</h2>")
    body += [f"<details><summary>{_e(run.label)}</summary><pre>{_e(run.config)}</pre></details>" for run in runs]
    return body


def _html(body: list[str | go.Figure], title: str) -> str:
    """One page: each figure as its JSON beside an empty div, drawn once the packed plotly.js is unpacked."""
    parts, figures = [], 0
    for part in body:
        if isinstance(part, str):
            parts.append(part)
        else:
            figure_json = part.to_json().replace("</", "<\\/")  # a label's "</script>" cannot end the script
            parts.append(
                f'<div id="figure-{figures}" class="figure"></div>'
                f'<script type="application/json" data-figure="figure-{figures}">{figure_json}</script>'
            )
            figures += 1
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{_e(title)}: report</title><style>{STYLE}</style></head>\n<body>\n"
        + "\n".join(parts)
        + f'\n<script id="plotly-gzip" type="application/octet-stream">{packed_plotlyjs()}</script>\n'
        + DRAW_FIGURES
        + "\n</body></html>\n"
    )


# plotly.js is 4.8 MB; gzipped and base64-encoded it is 40 % of that, and every browser since 2023 unpacks it with
# its own DecompressionStream (https://developer.mozilla.org/docs/Web/API/DecompressionStream): nothing is fetched.
DRAW_FIGURES = """<script>
(async () => {
  const packed = Uint8Array.from(atob(document.getElementById("plotly-gzip").textContent), c => c.charCodeAt(0));
  const unpacked = new Blob([packed]).stream().pipeThrough(new DecompressionStream("gzip"));
  const plotly = document.createElement("script");
  plotly.textContent = await new Response(unpacked).text();
  document.head.append(plotly);
  for (const data of document.querySelectorAll("script[data-figure]")) {
    const figure = JSON.parse(data.textContent);
    await Plotly.newPlot(data.dataset.figure, figure.data, figure.layout, {responsive: true, displaylogo: false});
  }
  document.documentElement.dataset.figures = "drawn";  // for whoever waits on the page (a screenshot, a test)
})();
</script>"""


@cache
def packed_plotlyjs() -> str:
    """plotly.js, gzipped and base64-encoded (once per process: packing it takes a fraction of a second)."""
    from plotly.offline import get_plotlyjs

    return base64.b64encode(gzip.compress(get_plotlyjs().encode(), compresslevel=9, mtime=0)).decode()


def _runs_table(runs: list[_Run]) -> str:
    rows = []
    for run in runs:
        row = run.row
        steps = [step for key, (s, _) in run.histories.items() if not key.startswith("event/") for step in s]
        facts = [
            f"{key} = {values[0]:.4g}"
            for key, (_, values) in sorted(run.histories.items())
            if len(values) == 1 and not key.startswith("event/")  # events have their table
        ]
        ended = row["stop_reason"] or run.error or "-"
        rows.append(
            (
                run.label,
                row["stage"],
                row["status"],
                f"{row['started']:%Y-%m-%d %H:%M}",
                str(max(steps, default="-")),
                ended,
                "; ".join(facts),
            )
        )
    return _table(("run", "stage", "status", "started", "last step", "how it ended", "facts"), rows, "")


def _curves(runs: list[_Run]) -> list[str | go.Figure]:
    """Every metric logged more than once (geometry and events aside), a panel each, a line per run."""
    metrics = sorted(
        {
            key
            for run in runs
            for key, (steps, _) in run.histories.items()
            if len(steps) > 1 and not key.startswith(("geom/", "event/"))
        }
    )
    if not metrics:
        return ["<p>No metric logged more than once.</p>"]
    several = len(runs) > 1
    shown = [(run.label, run.histories, _named_marks(run, several)) for run in runs]
    return [curves(shown, metrics)]


def _named_marks(run: _Run, several: bool) -> Marks:
    """A run's marks, labelled with its short id when several runs share the plot."""
    return [(step, f"{run.row['run_id'][:8]}: {text}" if several else text) for step, text in run.marks]


def _geometry(runs: list[_Run]) -> list[str | go.Figure]:
    """Each feature's layer x step heatmap of every run that logged it, then each run's per-layer lines."""
    features = sorted({feature for run in runs for feature in geometry_features(run.histories)})
    if not features:
        return ["<p>No geometry logged: no <code>geom/</code> metrics in these runs.</p>"]
    parts: list[str | go.Figure] = []
    for feature in features:
        prefix = f"geom/{feature}/"
        series = {run.row["run_id"]: {k: v for k, v in run.histories.items() if k.startswith(prefix)} for run in runs}
        drawn = [run for run in runs if series[run.row["run_id"]]]
        missing = [run.label for run in runs if not series[run.row["run_id"]]]
        parts.append(f"<h3>{_e(feature)}</h3>")
        if missing:
            parts.append(f"<p>Not logged by {_e(', '.join(missing))}.</p>")
        parts.append(heatmap(feature, [(run.row, series[run.row["run_id"]], run.marks) for run in drawn]))
        parts += [layer_lines(feature, run.label, series[run.row["run_id"]], run.marks) for run in drawn]
    return parts


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], empty: str) -> str:
    if not rows:
        return f"<p>{_e(empty)}</p>" if empty else ""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _e(text: str) -> str:
    return html.escape(str(text))
