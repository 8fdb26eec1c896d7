"""Cost of `WorkbenchCallback`: the same TRL SFTTrainer run bare and with the callback, side by side in one process.

The SFT stage's set-up (configs/sft.yaml: the built-in task, a 2-layer d=64 Llama, batch 32) with the
callback at its defaults (`CallbackSnapshotConfig()`: a snapshot every 50 steps of 256 eval-set probes, token
pooling to at most 1 024 points, online TwoNN + MLE + effective rank) logging to a sqlite MLflow store; "bare" is the
same trainer without the callback. Runs alternate (A B A B ...) so drift of a shared machine hits both; we report
each pair's ratio and the median, and, timed directly inside the callback run, the seconds spent in the
callback's own methods as a share of the bare run. Both in wall time and in the process's CPU time, which other
jobs on a shared machine inflate far less.

    python benchmarks/callback_overhead.py                  # 300 steps, 3 pairs
    python benchmarks/callback_overhead.py --steps 600 --pairs 5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workbench.config import SnapshotConfig

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
CALLBACK_EVENTS = ("on_train_begin", "on_step_end", "on_log", "on_train_end")


def timed_train(steps: int, with_callback: bool, tmp: Path, snapshot: SnapshotConfig) -> tuple[Clock, Clock]:
    """Wall and CPU seconds of `trainer.train()`, and of those the seconds spent inside the callback."""
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from pipelines.lm.config import SFTStageConfig
    from pipelines.lm.models import build_causal_lm, train_tokenizer
    from pipelines.lm.supervised import training_arguments
    from pipelines.lm.task import ReversalTask
    from workbench.callback import WorkbenchCallback
    from workbench.tracking import Tracker

    config = SFTStageConfig(train={"max_steps": steps, "eval_every": 10})
    task = ReversalTask(config.task, config.seed)
    tokenizer = train_tokenizer(task.pretraining_text(), config.model.vocab_size)
    torch.manual_seed(0)
    model = build_causal_lm(config.model, tokenizer)
    inside = Clock()
    callbacks, tracker = [], None
    if with_callback:
        tracker = Tracker.start(f"sqlite:///{tmp / 'mlflow.db'}", "callback-overhead")
        callback = WorkbenchCallback(snapshot, tracker=tracker)
        for event in CALLBACK_EVENTS:
            setattr(callback, event, _timed(getattr(callback, event), inside))
        callbacks = [callback]
    args = training_arguments(
        SFTConfig, config, str(tmp / "out"), "cpu", max_length=config.train.max_length, gradient_checkpointing=False
    )
    args = dataclasses.replace(args, eval_strategy="no")  # step time only: both log every 10 steps, neither evaluates
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(task.sft_rows()),
        eval_dataset=Dataset.from_list(task.sft_rows("eval")),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    total = Clock()
    with total:
        trainer.train()
        if tracker is not None:
            _timed(tracker.finish, inside)()  # the final flush is part of the cost
    return total, inside


class Clock:
    """Accumulated wall seconds and CPU seconds of this process (all threads) over the `with` blocks. CPU time
    is what a shared machine's other jobs do not inflate much; wall time is what the user waits."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def __enter__(self) -> None:
        self._start = (time.perf_counter(), time.process_time())

    def __exit__(self, *exc: object) -> None:
        self.wall += time.perf_counter() - self._start[0]
        self.cpu += time.process_time() - self._start[1]


def _timed(call, clock: Clock):
    def wrapper(*args, **kwargs):
        with clock:
            return call(*args, **kwargs)

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="training steps per run")
    parser.add_argument("--pairs", type=int, default=3, help="bare/callback pairs")
    parser.add_argument(
        "--snapshot-from",
        type=Path,
        default=None,
        help="take the snapshot settings from this stage config (default: the callback's, CallbackSnapshotConfig())",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "callback_overhead.json")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from transformers.utils import logging as hf_logging

    from workbench.config import CallbackSnapshotConfig, load_config
    from workbench.runtime import configure_torch_threads

    hf_logging.disable_progress_bar()
    threads = configure_torch_threads()
    snapshot = load_config(args.snapshot_from).snapshot if args.snapshot_from else CallbackSnapshotConfig()
    pairs = []
    with tempfile.TemporaryDirectory() as tmp:
        timed_train(20, True, Path(tmp), snapshot)  # warm-up: imports, allocator, MLflow schema
        for i in range(args.pairs):
            with_cb, inside = timed_train(args.steps, True, Path(tmp), snapshot)
            bare, _ = timed_train(args.steps, False, Path(tmp), snapshot)
            pair = {"callback_s": with_cb.wall, "bare_s": bare.wall, "inside_callback_s": inside.wall}
            pair.update(ratio=with_cb.wall / bare.wall, direct_share=inside.wall / bare.wall)
            pair.update(cpu_ratio=with_cb.cpu / bare.cpu, cpu_direct_share=inside.cpu / bare.cpu)
            pair.update(bare_step_ms=1000 * bare.wall / args.steps)
            pairs.append(pair)
            print(
                f"pair {i}: with callback {with_cb.wall:.2f} s (inside it {inside.wall:.2f} s), bare {bare.wall:.2f} s "
                f"({pair['bare_step_ms']:.1f} ms/step), ratio {pair['ratio']:.3f}, "
                f"direct share {100 * pair['direct_share']:.1f} %; CPU time: ratio {pair['cpu_ratio']:.3f}, "
                f"direct share {100 * pair['cpu_direct_share']:.1f} %",
                flush=True,
            )
    ratio = statistics.median(p["ratio"] for p in pairs)
    result = {
        "what": "TRL SFTTrainer on the built-in task (configs/sft.yaml sizes), with WorkbenchCallback vs without, "
        "alternating pairs in one process",
        "snapshot_settings": str(args.snapshot_from) if args.snapshot_from else "CallbackSnapshotConfig() defaults",
        "steps": args.steps,
        "snapshot": snapshot.model_dump(mode="json"),
        "log_every": 10,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {threads}",
        "date": time.strftime("%Y-%m-%d"),
        "pairs": pairs,
        "median_bare_step_ms": statistics.median(p["bare_step_ms"] for p in pairs),
        "median_ratio": ratio,
        "median_overhead_percent": 100 * (ratio - 1),
        "median_direct_share_percent": 100 * statistics.median(p["direct_share"] for p in pairs),
        "median_cpu_overhead_percent": 100 * (statistics.median(p["cpu_ratio"] for p in pairs) - 1),
        "median_cpu_direct_share_percent": 100 * statistics.median(p["cpu_direct_share"] for p in pairs),
        "load_average_1min_at_end": os.getloadavg()[0],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"median overhead of the callback: paired {100 * (ratio - 1):+.1f} %, "
        f"timed directly {result['median_direct_share_percent']:.1f} %; in CPU time paired "
        f"{result['median_cpu_overhead_percent']:+.1f} %, directly {result['median_cpu_direct_share_percent']:.1f} % "
        f"-> {args.out}"
    )


if __name__ == "__main__":
    main()
