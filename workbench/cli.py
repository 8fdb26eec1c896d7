"""The `workbench` command line. Exit codes: 0 success, 2 bad input (one line), 1 a failed run, 130 Ctrl-C
(SIGINT), 143 SIGTERM.

Heavy imports happen inside the verbs so `workbench --help` answers at once.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from workbench.errors import WorkbenchError
from workbench.geometry import FEATURE_METRICS

if TYPE_CHECKING:
    from collections.abc import Callable

    from workbench.stages import StageResult
    from workbench.tracking import Tracker


def cmd_run(args: argparse.Namespace) -> int:
    from workbench.config import load_config
    from workbench.policies import attach_policies

    config = load_config(args.config, args.overrides)
    config = attach_policies(config, args.config, args.policy)  # a bad policy refuses the run before it starts

    from workbench.launch import run_stage, start_stage_run
    from workbench.runtime import (
        configure_torch_threads,
        is_main_process,
        join_process_group,
        resolve_device,
        wait_for_everyone,
    )

    configure_torch_threads()
    join_process_group(resolve_device(config.device))  # under `accelerate launch`: one process per rank
    started = time.monotonic()
    try:
        tracker = start_stage_run(config, str(args.config))
    except WorkbenchError:
        raise
    except Exception as exc:  # e.g. the store refused the params: the run is already marked FAILED
        traceback.print_exc()
        print(f"workbench: run FAILED at its start: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if not is_main_process():
        run_stage(config, tracker)
        wait_for_everyone()
        return 0  # rank 0 reports for every rank
    print(f"run {tracker.run_id} in {tracker.tracking_uri} (experiment '{config.tracking.experiment}')")
    result = _train(tracker, lambda: run_stage(config, tracker), "marked KILLED, everything logged so far is kept")
    if isinstance(result, int):
        return result
    print(f"\nrun {tracker.run_id} finished in {time.monotonic() - started:.0f} s")
    _print_result(result.summary, tracker.tracking_uri)
    return 0


def _train(tracker: Tracker, body: Callable[[], StageResult], interrupted: str) -> StageResult | int:
    """`body` (a `run_stage`, which ends the run however it ends) with SIGINT/SIGTERM turned into a checkpoint and
    a KILLED run (docs/resume.md): the stage's result, or the exit code of a run that did not finish (130/143
    interrupted, 1 failed)."""
    from workbench.liveness import StopSignals
    from workbench.runtime import wait_for_everyone

    signals = StopSignals()
    try:
        with signals:
            result = body()
        wait_for_everyone()
    except WorkbenchError:
        raise
    except KeyboardInterrupt:
        print(f"\nrun {tracker.run_id} interrupted: {interrupted}", file=sys.stderr)
        return signals.exit_code
    except Exception as exc:
        traceback.print_exc()
        print(f"workbench: run {tracker.run_id} FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return result


def _print_result(summary: list[str], tracking_uri: str) -> None:
    for line in summary:
        print(f"  {line}")
    print("look at it:")
    for line in _viewing_commands(tracking_uri):
        print(f"  {line}")


def cmd_resume(args: argparse.Namespace) -> int:
    from workbench.launch import run_stage
    from workbench.resume import reopen_run
    from workbench.runtime import configure_torch_threads

    configure_torch_threads()
    opened = reopen_run(args.run_id, args.tracking_uri, args.force)
    tracker, step = opened.tracker, opened.resumption.checkpoint.step
    print(f"run {tracker.run_id} ({opened.was}) resumed from its checkpoint at step {step}")
    started = time.monotonic()

    result = _train(
        tracker, lambda: run_stage(opened.config, tracker, resume=opened.resumption), "marked KILLED, resumable again"
    )
    if isinstance(result, int):
        return result
    print(f"\nrun {tracker.run_id} finished in {time.monotonic() - started:.0f} s after the resume")
    print(
        f"  {tracker.recomputed} values logged before the crash were recomputed, not logged again; "
        f"largest difference {tracker.max_difference:.3g}"
    )
    _print_result(result.summary, tracker.tracking_uri)
    return 0


def _viewing_commands(tracking_uri: str) -> list[str]:
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///")).resolve()
        ui = f"mlflow ui --backend-store-uri sqlite:///{db}    # then open http://127.0.0.1:5000"
        env = f"MLFLOW_TRACKING_URI=sqlite:///{db} "
    else:
        ui = f"open {tracking_uri} in a browser"
        env = f"MLFLOW_TRACKING_URI={tracking_uri} "
    return [ui, f"{env}streamlit run app.py", f"{env}workbench ls"]


def cmd_ls(args: argparse.Namespace) -> int:
    from workbench.runs import recent_runs

    rows = recent_runs(args.tracking_uri, args.experiment, args.limit)
    if not rows:
        print("no runs yet")
        return 0
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(row[c].ljust(widths[c]) for c in columns))
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from workbench.analyze import analyze_run, parse_features

    features = parse_features(args.features)
    layers = args.layers.split(",") if args.layers else None
    report = analyze_run(args.run_id, features, layers, args.tracking_uri)
    print(f"run {args.run_id}: logged {report.logged} values, {report.skipped} already there")
    for problem in report.problems[:10]:
        print(f"  not computed: {problem}", file=sys.stderr)
    if len(report.problems) > 10:
        print(f"  ... and {len(report.problems) - 10} more", file=sys.stderr)
    nothing = report.logged == 0 and report.skipped == 0
    return 1 if nothing else 0


def cmd_backtest(args: argparse.Namespace) -> int:
    from workbench.backtest import backtest, format_results

    results = backtest(args.policy, args.run_ids, args.experiment, args.tracking_uri)
    print("\n".join(format_results(results)))
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from workbench.policies import STOP_POLL_SECONDS, request_stop

    uri = request_stop(args.run_id, args.tracking_uri)
    print(f"stop requested for run {args.run_id} in {uri}: it checkpoints and ends at its next step boundary")
    print(f"(runs poll for requests every {STOP_POLL_SECONDS:g} s)")
    return 0


def cmd_attach(args: argparse.Namespace) -> int:
    from workbench.policies import STOP_POLL_SECONDS, attach_policy

    try:
        text = args.policy.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkbenchError(f"{args.policy}: cannot read policy: {exc.strerror or exc}") from None
    artifact = attach_policy(args.run_id, text, args.tracking_uri, str(args.policy))
    print(f"policy {args.policy} attached to run {args.run_id} (kept as its artifact {artifact})")
    print(f"the run takes its rules at its next poll (every {STOP_POLL_SECONDS:g} s and at every snapshot)")
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    from workbench.backtest import format_table, run_events

    events = run_events(args.run_id, args.tracking_uri)
    if not events:
        print(f"run {args.run_id}: no events, alerts or stops logged")
        return 0
    rows = [("-" if e.step is None else str(e.step), e.kind, e.name, e.details) for e in events]
    print("\n".join(format_table(("step", "kind", "name", "details"), rows)))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from workbench.report import build_report

    report = build_report(args.run_ids, args.tracking_uri)
    try:
        args.output.write_text(report.html)
    except OSError as exc:
        raise WorkbenchError(f"-o {args.output}: cannot write the report: {exc.strerror or exc}") from None
    for note in report.notes:
        print(f"workbench: {note}", file=sys.stderr)
    print(f"wrote {args.output} ({len(report.html.encode()) / 1e6:.1f} MB): open it in a browser, no network needed")
    return 0


def _verb(
    verbs: argparse._SubParsersAction,
    name: str,
    handler: Callable[[argparse.Namespace], int],
    help: str,
    description: str | None = None,
    run_id: bool = False,
) -> argparse.ArgumentParser:
    """A verb of the CLI: its parser, with `RUN_ID` first where it acts on one run; every verb but `run` reads a
    store and takes `--tracking-uri`."""
    parser = verbs.add_parser(name, help=help, description=description)
    if run_id:
        parser.add_argument("run_id", metavar="RUN_ID")
    if name != "run":
        parser.add_argument(
            "--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db"
        )
    parser.set_defaults(handler=handler)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="workbench",
        description="Tracked LLM training runs that watch the geometry of hidden states.",
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    policy_help = "YAML list of rules (docs/policies.md)"

    run = _verb(
        verbs,
        "run",
        cmd_run,
        "train a stage from a YAML config, tracked in MLflow",
        "Train a stage from a YAML config; key.sub=value arguments override config keys.",
    )
    run.add_argument("config", type=Path, help="YAML config, e.g. configs/grokking.yaml")
    run.add_argument("overrides", nargs="*", metavar="key.sub=value", help="e.g. train.max_steps=500 task.p=59")
    run.add_argument(
        "--policy",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="early-stop policy (YAML list of rules) added to the config's; repeatable; docs/policies.md",
    )

    analyze = _verb(
        verbs,
        "analyze",
        cmd_analyze,
        "compute geometry features over every snapshot of a run and log them to it",
        "Compute geometry features over every stored snapshot of a run and log them to the same "
        "run as geom/<feature>/layer_<i>. Idempotent and resumable; works on a run that is still training.",
        run_id=True,
    )
    analyze.add_argument(
        "--features",
        default=",".join(FEATURE_METRICS),
        help=f"comma-separated, some of: {', '.join(FEATURE_METRICS)} (default: all)",
    )
    analyze.add_argument("--layers", default=None, help="comma-separated layer names or indices (default: all)")

    ls = _verb(verbs, "ls", cmd_ls, "list recent runs with status and key metrics")
    ls.add_argument("--experiment", default=None, help="only this experiment")
    ls.add_argument("--limit", type=int, default=20, help="at most this many runs (default 20)")

    backtest = _verb(
        verbs,
        "backtest",
        cmd_backtest,
        "replay a policy over logged runs: where each would have stopped, and what it would have cost",
        "Replay a policy over the logged metric histories of runs (nothing is logged to them): the "
        "step each run would have stopped at, the share of its step budget saved, the watched metric at the stop "
        "against its best and final values, and everything the policy fired.",
    )
    backtest.add_argument("policy", type=Path, metavar="POLICY", help=policy_help)
    backtest.add_argument("run_ids", nargs="*", metavar="RUN_ID")
    backtest.add_argument("--experiment", default=None, help="also every run of this experiment")

    _verb(
        verbs,
        "stop",
        cmd_stop,
        "ask a running run to checkpoint and stop at its next step boundary",
        "Set the run's workbench.stop_requested tag; the run polls for it, checkpoints and ends "
        "cleanly (KILLED, workbench.stop_reason 'stop requested').",
        run_id=True,
    )
    attach = _verb(
        verbs,
        "attach",
        cmd_attach,
        "attach a policy to a running run: it takes the rules at its next poll",
        "Validate a policy and attach it to a RUNNING run (the tag workbench.attached_policy, and the "
        "artifact policies/attached_<time>.yaml); the run's engine takes the rules at its next poll, an attached "
        "rule replacing the run's rule of the same name.",
        run_id=True,
    )
    attach.add_argument("policy", type=Path, metavar="POLICY", help=policy_help)
    resume = _verb(
        verbs,
        "resume",
        cmd_resume,
        "continue a killed or crashed run from its latest checkpoint, in the same MLflow run",
        "Reopen a KILLED or FAILED run (or a RUNNING one whose process is gone), load its latest "
        "checkpoint and train on to train.max_steps with the same step numbering; docs/resume.md.",
        run_id=True,
    )
    resume.add_argument(
        "--force", action="store_true", help="take over a RUNNING run whose host cannot be checked from here"
    )
    report = _verb(
        verbs,
        "report",
        cmd_report,
        "write runs' report: one self-contained HTML file of curves, geometry, events and config",
        "Write the report every stage run keeps as its report.html artifact (curves with markers, each geometry "
        "feature's layer x step heatmap and per-layer lines, the events, the resolved config) for any logged runs, "
        "side by side; a chain run's report holds its stages. One file, plotly.js inlined: it opens without network.",
    )
    report.add_argument("run_ids", nargs="+", metavar="RUN_ID")
    report.add_argument("-o", "--output", type=Path, default=Path("report.html"), help="default: report.html")
    _verb(
        verbs,
        "events",
        cmd_events,
        "list a run's forecaster events, policy alerts and stops in step order",
        run_id=True,
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse ends `run`'s positionals at the first option: in `run CONFIG --policy p.yaml key=value`,
    # key=value comes back unparsed, and is an override like the others.
    if extra and (args.verb != "run" or any(arg.startswith("-") for arg in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides += extra
    try:
        return args.handler(args)
    except WorkbenchError as exc:
        print(f"workbench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("workbench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
