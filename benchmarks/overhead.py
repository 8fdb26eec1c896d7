"""Cost of tracking: the grokking loop with and without instrumentation, side by side in one process.

"Tracked" = MLflow metric logging (sqlite store in a temporary directory) + hidden-state snapshots +
online geometry at the config's interval; "untracked" = the same loop, same evaluation cadence, with
logging and instrumentation off. The two alternate (A B A B ...) so drift of a shared machine hits both;
we report each pair's ratio and the median. On a shared 2-core machine two 40 s runs of the same loop differ
by a few %, so we also time the tracking calls themselves (instrument, metric logging, final flush) inside
the tracked run: their share of the untracked time is the overhead measured directly.

    python benchmarks/overhead.py                      # the default job, 3 pairs
    python benchmarks/overhead.py --steps 300 --pairs 5 task.p=59
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]


def timed_train(config, tracked: bool, tmp: Path) -> tuple[float, float]:
    """Wall seconds of one training run, and of that the seconds spent in tracking calls."""
    import torch

    from pipelines.grokking.stage import LoopHooks, build_model, make_dataset, make_probe_set, train
    from workbench.instrument import Instrument
    from workbench.tracking import Tracker

    torch.manual_seed(config.seed)
    data = make_dataset(config.task, config.seed)
    model = build_model(config.model, vocab_size=config.task.p + 1)
    inside = [0.0]
    if tracked:
        tracker = Tracker.start(f"sqlite:///{tmp / 'mlflow.db'}", "overhead")
        instrument = Instrument(config.snapshot, make_probe_set(data, config.snapshot.probes, config.seed), tracker)

        class timed:  # noqa: N801 - used like a decorator: timed(call) is call, its time counted
            def __init__(self, call):
                self.call = call

            def __call__(self, *args):
                start = time.perf_counter()
                try:
                    return self.call(*args)
                finally:
                    inside[0] += time.perf_counter() - start

            def __getattr__(self, name):  # the instrument's `due`, asked by the loop
                return getattr(self.call, name)

        log, hook = timed(tracker.log_metrics), timed(instrument)
    else:
        tracker, log, hook = None, (lambda metrics, step: None), None
    start = time.perf_counter()
    train(config, model, data, "cpu", LoopHooks(log, hook))
    if tracker is not None:
        timed(tracker.finish)()  # the final flush is part of the cost
    return time.perf_counter() - start, inside[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "grokking.yaml"))
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default: the config's)")
    parser.add_argument("--pairs", type=int, default=3, help="tracked/untracked pairs")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "overhead.json")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from workbench.config import load_config
    from workbench.runtime import configure_torch_threads

    threads = configure_torch_threads()
    steps = [f"train.max_steps={args.steps}"] if args.steps else []
    config = load_config(args.config, [*args.overrides, *steps])
    pairs = []
    with tempfile.TemporaryDirectory() as tmp:
        timed_train(config, tracked=False, tmp=Path(tmp))  # warm-up: imports, allocator, MLflow schema
        for i in range(args.pairs):
            tracked, inside = timed_train(config, tracked=True, tmp=Path(tmp))
            untracked, _ = timed_train(config, tracked=False, tmp=Path(tmp))
            pair = {"tracked_s": tracked, "untracked_s": untracked, "tracking_calls_s": inside}
            pair.update(ratio=tracked / untracked, direct_share=inside / untracked)
            pairs.append(pair)
            print(
                f"pair {i}: tracked {tracked:.2f} s (tracking calls {inside:.2f} s), untracked {untracked:.2f} s, "
                f"ratio {pair['ratio']:.3f}, direct share {100 * pair['direct_share']:.1f} %",
                flush=True,
            )
    ratio = statistics.median(p["ratio"] for p in pairs)
    result = {
        "what": "grokking loop, tracking on vs off, alternating pairs in one process",
        "config": os.path.relpath(args.config, ROOT),
        "overrides": args.overrides,
        "steps": config.train.max_steps,
        "snapshot_every": config.snapshot.every,
        "eval_every": config.train.eval_every,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {threads}",
        "date": time.strftime("%Y-%m-%d"),
        "pairs": pairs,
        "median_ratio": ratio,
        "median_overhead_percent": 100 * (ratio - 1),
        "median_direct_share_percent": 100 * statistics.median(p["direct_share"] for p in pairs),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"median overhead of tracking: paired {100 * (ratio - 1):+.1f} %, "
        f"timed directly {result['median_direct_share_percent']:.1f} % -> {args.out}"
    )


if __name__ == "__main__":
    main()
